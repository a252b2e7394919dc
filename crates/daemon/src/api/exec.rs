//! `POST /1.0/instances/{name}/exec`: a command in the instance through
//! the driver's agent. Three shapes, as in LXD:
//! - `wait-for-websocket` + `interactive`: a TTY; websocket `0` carries
//!   stdin and output, `control` takes window-resize and signals;
//! - `wait-for-websocket`, not interactive: websockets `0` (stdin; the
//!   client closes it at EOF), `1` stdout, `2` stderr, `control`;
//! - neither: no stdin; with `record-output` stdout and stderr are kept as
//!   `exec_<op>.stdout|stderr` logs of the instance.
//!
//! The exit code is the operation's `metadata.return`.

use std::collections::BTreeMap;

use axum::extract::ws::Message;
use axum::extract::{Path, State};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use skiff_agent_client::{AgentClient, ExecEvent};
use skiff_agent_proto::{ExecRequest, User, WindowSize};
use skiff_api::{ExecControl, ExecPost, OperationClass};
use skiff_driver::InstanceSpec;

use super::{accepted, ApiErr, ApiResult, App, Body};
use crate::db::Status;
use crate::instances as inst;
use crate::ops::{OpError, Streams};

/// Largest recorded output per stream (the rest is dropped, and said so).
const MAX_RECORD: usize = 64 << 20;

/// The main process's environment (the image's with `environment.*` over
/// it, as the driver computes it), then the request's.
pub(super) fn environment(spec: &InstanceSpec, extra: &BTreeMap<String, String>) -> Vec<String> {
    let base = skiff_driver::config::main_process(spec).map(|m| m.env).unwrap_or_default();
    let mut env: BTreeMap<String, String> =
        base.iter().filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))).collect();
    env.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// `POST /1.0/instances/{name}/exec`.
pub async fn exec(State(d): State<App>, Path(name): Path<String>, Body(req): Body<ExecPost>) -> ApiResult {
    let r = inst::row(&d, &name)?;
    if r.status == Status::Frozen {
        return Err(ApiErr::bad(format!("Instance {name:?} is frozen (paused): resume it with skiff start")));
    }
    if r.status != Status::Running {
        return Err(ApiErr::bad(format!("Instance {name:?} is not running")));
    }
    if req.command.is_empty() {
        return Err(ApiErr::bad("exec needs a command"));
    }
    let spec = inst::spec(&d, &r)?;
    let agent = inst::driver(&d, &r)?.agent(&spec).map_err(|e| ApiErr::bad(crate::images::chain(&e)))?;
    let user =
        (req.user != 0 || req.group != 0).then(|| User { uid: req.user, gid: req.group, additional_gids: vec![] });
    let size = WindowSize {
        rows: if req.height > 0 { req.height } else { 24 },
        cols: if req.width > 0 { req.width } else { 80 },
    };
    let tty = req.interactive.then_some(size);
    let request = ExecRequest {
        argv: req.command.clone(),
        env: environment(&spec, &req.environment),
        cwd: (!req.cwd.is_empty()).then(|| req.cwd.clone()),
        user,
        tty,
        stdin: req.wait_for_websocket,
    };
    let meta = json!({"command": req.command, "environment": req.environment, "interactive": req.interactive});
    if req.wait_for_websocket {
        let fds: &[&str] = if req.interactive { &["0", "control"] } else { &["0", "1", "2", "control"] };
        let (op, streams) = d.ops.create(OperationClass::Websocket, "Executing command", Some(&name), meta, false, fds);
        d.ops.run(&op, async move { run_ws(agent, request, streams, tty.is_some()).await });
        return accepted(&op);
    }
    let (op, _) = d.ops.create(OperationClass::Task, "Executing command", Some(&name), meta, false, &[]);
    let dir = inst::instance_dir(&d, &name).join("logs");
    let (id, record) = (op.id(), req.record_output);
    d.ops.run(&op, async move {
        let out = agent.exec(request).await.map_err(|e| OpError::Failed(crate::images::chain(&e)))?;
        let out = out.output().await.map_err(|e| OpError::Failed(crate::images::chain(&e)))?;
        let mut meta = json!({"return": out.status.code()});
        if record {
            std::fs::create_dir_all(&dir).map_err(|e| OpError::Failed(format!("exec log directory: {e}")))?;
            let mut output = serde_json::Map::new();
            for (fd, bytes) in [("1", &out.stdout), ("2", &out.stderr)] {
                let file = format!("exec_{id}.{}", if fd == "1" { "stdout" } else { "stderr" });
                let data = &bytes[..bytes.len().min(MAX_RECORD)];
                std::fs::write(dir.join(&file), data).map_err(|e| OpError::Failed(format!("writing {file}: {e}")))?;
                output.insert(fd.into(), Value::String(format!("/1.0/instances/{name}/logs/{file}")));
            }
            meta["output"] = Value::Object(output);
        }
        Ok(Some(meta))
    });
    accepted(&op)
}

pub(super) async fn run_ws(
    agent: AgentClient,
    request: ExecRequest,
    streams: Streams,
    tty: bool,
) -> Result<Option<Value>, OpError> {
    let required: &[&str] = if tty { &["0"] } else { &["0", "1", "2"] };
    let mut socks = streams.connect(required).await?;
    let fail = |e: skiff_agent_client::ClientError| OpError::Failed(crate::images::chain(&e));
    let mut session = agent.exec(request).await.map_err(fail)?;
    let ctl = session.control();
    let (control_tx, control_rx) = match socks.remove("control") {
        Some(ws) => {
            let (tx, rx) = ws.split();
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    let (stdin_tx, mut stdin_rx) = socks.remove("0").ok_or(OpError::NoClients)?.split();
    let mut out1 = socks.remove("1").map(|s| s.split().0);
    let mut out2 = socks.remove("2").map(|s| s.split().0);
    let mut out0 = tty.then_some(stdin_tx);
    // stdin: websocket 0 → the process, until the client closes it.
    let c = ctl.clone();
    let stdin_task = tokio::spawn(async move {
        while let Some(Ok(msg)) = stdin_rx.next().await {
            // LXD's clients mark stdin's end with an empty message (a
            // barrier) or close the websocket.
            let data = match msg {
                Message::Binary(b) if !b.is_empty() => b.to_vec(),
                Message::Text(t) if !t.is_empty() => t.as_bytes().to_vec(),
                Message::Binary(_) | Message::Text(_) | Message::Close(_) => break,
                _ => continue,
            };
            if c.write_stdin(&data).await.is_err() {
                break;
            }
        }
        let _ = c.close_stdin().await;
    });
    // control: window-resize and signals.
    let c = ctl.clone();
    let control_task = tokio::spawn(async move {
        let Some(mut control_rx) = control_rx else { return };
        while let Some(Ok(msg)) = control_rx.next().await {
            let text = match msg {
                Message::Text(t) => t.to_string(),
                Message::Binary(b) => String::from_utf8_lossy(&b).into_owned(),
                Message::Close(_) => break,
                _ => continue,
            };
            let Ok(m) = serde_json::from_str::<ExecControl>(&text) else { continue };
            match m.command.as_str() {
                "window-resize" => {
                    let w = m.args.get("width").and_then(|v| v.parse().ok()).unwrap_or(80);
                    let h = m.args.get("height").and_then(|v| v.parse().ok()).unwrap_or(24);
                    let _ = c.resize(h, w).await;
                }
                "signal" if m.signal > 0 => {
                    let _ = c.signal(m.signal).await;
                }
                _ => {}
            }
        }
    });
    let mut status = None;
    loop {
        match session.next_event().await {
            Ok(Some(ExecEvent::Stdout(b))) => {
                let sink = if tty { out0.as_mut() } else { out1.as_mut() };
                if let Some(s) = sink {
                    let _ = s.send(Message::Binary(b.into())).await;
                }
            }
            Ok(Some(ExecEvent::Stderr(b))) => {
                if let Some(s) = out2.as_mut() {
                    let _ = s.send(Message::Binary(b.into())).await;
                }
            }
            Ok(Some(ExecEvent::Exit(s))) => {
                status = Some(s);
                break;
            }
            Ok(None) => break,
            Err(e) => {
                stdin_task.abort();
                control_task.abort();
                return Err(fail(e));
            }
        }
    }
    stdin_task.abort();
    control_task.abort();
    for s in [out0.as_mut(), out1.as_mut(), out2.as_mut()].into_iter().flatten() {
        let _ = s.send(Message::Close(None)).await;
    }
    if let Some(mut control_tx) = control_tx {
        let _ = control_tx.send(Message::Close(None)).await;
    }
    let status = status.ok_or_else(|| OpError::Failed("the exec ended without an exit status".into()))?;
    Ok(Some(json!({"return": status.code()})))
}
