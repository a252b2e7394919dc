//! `skiff exec`: `POST /1.0/instances/{name}/exec` with
//! `wait-for-websocket`, then the operation's websockets, connected like
//! LXD's client does: `control` first, then the data streams.
//!
//! - interactive (a PTY in the instance): one stream `0` carries stdin
//!   and the terminal's output; the local terminal is in raw mode; window
//!   size changes go to `control` as `window-resize`.
//! - non-interactive: `0` stdin (binary messages, then the barrier and a
//!   close frame at EOF), `1` stdout, `2` stderr; SIGINT, SIGTERM, SIGHUP,
//!   SIGQUIT, SIGUSR1 and SIGUSR2 go to `control` as `signal`.
//!
//! The exit code is the operation's `metadata.return`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, Context};
use futures::StreamExt;
use hyper::Method;
use serde_json::{json, Value};
use skiff_api::{ExecControl, ExecPost, Operation};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::client::{self, Client};
use crate::term;
use crate::ws::{self, WsSink};

/// How long output may still arrive after the operation ended.
const DRAIN: Duration = Duration::from_secs(5);

/// What to run and how.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecRequest {
    /// The instance.
    pub name: String,
    /// argv.
    pub command: Vec<String>,
    /// Extra environment.
    pub environment: BTreeMap<String, String>,
    /// Working directory ("" for the instance's default).
    pub cwd: String,
    /// uid (0: default).
    pub user: u32,
    /// gid (0: default).
    pub group: u32,
    /// With a PTY.
    pub interactive: bool,
    /// Send EOF at once instead of reading stdin.
    pub no_stdin: bool,
}

/// The streams of a websocket operation: fd name → secret.
pub fn fds(op: &Operation) -> anyhow::Result<BTreeMap<String, String>> {
    let fds = op.metadata.get("fds").cloned().unwrap_or(Value::Null);
    serde_json::from_value(fds).map_err(|_| anyhow!("the operation {} lists no websocket streams (fds)", op.id))
}

/// Connects the stream `fd` of the websocket operation `op`.
pub async fn connect(
    client: &Client,
    op: &Operation,
    fds: &BTreeMap<String, String>,
    fd: &str,
) -> anyhow::Result<ws::Ws> {
    let secret = fds.get(fd).ok_or_else(|| anyhow!("the operation has no websocket stream \"{fd}\""))?;
    client.op_websocket(&op.id, secret).await.with_context(|| format!("Failed to connect the \"{fd}\" stream"))
}

/// Runs the command and returns its exit code.
pub async fn run(client: &Client, req: ExecRequest) -> anyhow::Result<i32> {
    let (width, height) = if req.interactive { term::size() } else { (0, 0) };
    let post = ExecPost {
        command: req.command.clone(),
        environment: req.environment.clone(),
        wait_for_websocket: true,
        record_output: false,
        interactive: req.interactive,
        width,
        height,
        user: req.user,
        group: req.group,
        cwd: req.cwd.clone(),
    };
    let fail = || format!("Failed to run a command in \"{}\"", req.name);
    let path = format!("/1.0/instances/{}/exec", client::encode_segment(&req.name));
    let op = client.start_op(Method::POST, &path, Some(&client::json(&post))).await.with_context(fail)?;
    let fds = fds(&op)?;
    let control = if fds.contains_key("control") {
        let (sink, stream) = connect(client, &op, &fds, "control").await?.split();
        tokio::spawn(ws::drain(stream));
        Some(sink)
    } else {
        None
    };
    let result = if req.interactive {
        interactive(client, &op, &fds, control, req.no_stdin).await
    } else {
        pipes(client, &op, &fds, control, req.no_stdin).await
    };
    let done = result.with_context(fail)?;
    Ok(exit_code(&done))
}

/// The command's exit code from a finished exec operation.
pub fn exit_code(op: &Operation) -> i32 {
    op.metadata.get("return").and_then(Value::as_i64).map(|r| r as i32).unwrap_or(0)
}

fn stdin(no_stdin: bool) -> mpsc::Receiver<Vec<u8>> {
    if no_stdin {
        closed_channel()
    } else {
        term::stdin_chunks()
    }
}

/// A channel that is already at EOF.
pub fn closed_channel() -> mpsc::Receiver<Vec<u8>> {
    mpsc::channel(1).1
}

async fn interactive(
    client: &Client,
    op: &Operation,
    fds: &BTreeMap<String, String>,
    control: Option<WsSink>,
    no_stdin: bool,
) -> anyhow::Result<Operation> {
    let (mut sink, stream) = connect(client, op, fds, "0").await?.split();
    // Raw mode before the stdin reader starts, so that its first read is raw too.
    let raw = term::RawMode::enable();
    let stdin = stdin(no_stdin);
    let output = tokio::spawn(ws::copy_to(stream, tokio::io::stdout()));
    let input = tokio::spawn(async move { ws::send_from(&mut sink, stdin, false).await });
    let resize = control.map(|ctl| tokio::spawn(forward_resizes(ctl)));
    let result = client.wait(&op.id).await;
    let _ = tokio::time::timeout(DRAIN, output).await;
    input.abort();
    if let Some(r) = resize {
        r.abort();
    }
    drop(raw);
    Ok(result?)
}

async fn pipes(
    client: &Client,
    op: &Operation,
    fds: &BTreeMap<String, String>,
    control: Option<WsSink>,
    no_stdin: bool,
) -> anyhow::Result<Operation> {
    let stdin = stdin(no_stdin);
    let (mut sink0, stream0) = connect(client, op, fds, "0").await?.split();
    let (_sink1, stream1) = connect(client, op, fds, "1").await?.split();
    let (_sink2, stream2) = connect(client, op, fds, "2").await?.split();
    tokio::spawn(ws::drain(stream0));
    let input = tokio::spawn(async move { ws::send_from(&mut sink0, stdin, true).await });
    let out = tokio::spawn(ws::copy_to(stream1, tokio::io::stdout()));
    let err = tokio::spawn(ws::copy_to(stream2, tokio::io::stderr()));
    let signals = control.map(|ctl| tokio::spawn(forward_signals(ctl)));
    let result = client.wait(&op.id).await;
    let _ = tokio::time::timeout(DRAIN, async {
        let _ = out.await;
        let _ = err.await;
    })
    .await;
    input.abort();
    if let Some(s) = signals {
        s.abort();
    }
    Ok(result?)
}

/// The control message for a window size.
pub fn resize_message(width: u16, height: u16) -> Value {
    let mut args = BTreeMap::new();
    args.insert("width".to_string(), width.to_string());
    args.insert("height".to_string(), height.to_string());
    json!({"command": "window-resize", "args": args})
}

/// The control message for a signal.
pub fn signal_message(signal: i32) -> Value {
    client::json(&ExecControl { command: "signal".into(), args: BTreeMap::new(), signal })
}

async fn forward_resizes(mut ctl: WsSink) {
    let Ok(mut winch) = signal(SignalKind::window_change()) else { return };
    while winch.recv().await.is_some() {
        let (w, h) = term::size();
        if !ws::send_json(&mut ctl, &resize_message(w, h)).await {
            return;
        }
    }
}

/// Signals forwarded to the command in non-interactive mode.
const FORWARDED: [i32; 6] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2];

async fn forward_signals(mut ctl: WsSink) {
    let (tx, mut rx) = mpsc::channel::<i32>(8);
    for sig in FORWARDED {
        let Ok(mut s) = signal(SignalKind::from_raw(sig)) else { continue };
        let tx = tx.clone();
        tokio::spawn(async move {
            while s.recv().await.is_some() {
                if tx.send(sig).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    while let Some(sig) = rx.recv().await {
        if !ws::send_json(&mut ctl, &signal_message(sig)).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages() {
        assert_eq!(resize_message(100, 30), json!({"command":"window-resize","args":{"width":"100","height":"30"}}));
        let s = signal_message(2);
        assert_eq!((s["command"].as_str(), s["signal"].as_i64()), (Some("signal"), Some(2)));
    }

    #[test]
    fn exit_codes() {
        let op: Operation = serde_json::from_value(json!({"id":"x","class":"websocket","description":"",
            "created_at":"","updated_at":"","status":"Success","status_code":200,"metadata":{"return":130}}))
        .unwrap();
        assert_eq!(exit_code(&op), 130);
    }
}
