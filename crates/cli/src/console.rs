//! `skiff console`: the instance's console, attached
//! (`POST /1.0/instances/{name}/console`, a websocket operation with the
//! streams `control` and `0`) or its log (`GET .../console`).

use anyhow::Context;
use futures::StreamExt;
use hyper::Method;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::client::{self, Body, Client};
use crate::exec;
use crate::term;
use crate::ws;

/// `POST /1.0/instances/{name}/console` (not in skiff-api: LXD's `InstanceConsolePost`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsolePost {
    /// `console` (text) or `vga` (SPICE, not supported).
    #[serde(rename = "type")]
    pub kind: String,
    /// Columns.
    pub width: u16,
    /// Rows.
    pub height: u16,
}

/// Ctrl+a.
const CTRL_A: u8 = 0x01;

/// Finds `Ctrl+a q` in what the user types; `Ctrl+a a` sends a Ctrl+a.
#[derive(Debug, Default)]
pub struct Detach {
    prefix: bool,
}

impl Detach {
    /// The bytes to forward from `input`, and whether the user asked to detach.
    pub fn feed(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.prefix {
                self.prefix = false;
                match b {
                    b'q' => return (out, true),
                    b'a' | CTRL_A => out.push(CTRL_A),
                    _ => out.extend_from_slice(&[CTRL_A, b]),
                }
            } else if b == CTRL_A {
                self.prefix = true;
            } else {
                out.push(b);
            }
        }
        (out, false)
    }
}

/// The console log (`GET /1.0/instances/{name}/console`).
pub async fn log(client: &Client, name: &str) -> anyhow::Result<Vec<u8>> {
    let path = format!("/1.0/instances/{}/console", client::encode_segment(name));
    let fail = || format!("Failed to get the console log of \"{name}\"");
    let raw = client.raw(Method::GET, &path, &[], Body::Empty).await.with_context(fail)?;
    if raw.is_json() || !raw.status.is_success() {
        // An error envelope, or a log sent as a JSON string.
        let env = raw.envelope().with_context(fail)?;
        if env.kind == skiff_api::ResponseType::Error {
            return Err(client::ClientError::Remote { code: env.error_code, message: env.error }).with_context(fail);
        }
        return Ok(env.metadata.as_str().map(|s| s.as_bytes().to_vec()).unwrap_or_default());
    }
    Ok(raw.body.to_vec())
}

/// Attaches to the console until the user detaches or it closes.
pub async fn attach(client: &Client, name: &str) -> anyhow::Result<()> {
    let (width, height) = term::size();
    let body = client::json(&ConsolePost { kind: "console".into(), width, height });
    let path = format!("/1.0/instances/{}/console", client::encode_segment(name));
    let fail = || format!("Failed to attach to the console of \"{name}\"");
    let op = client.start_op(Method::POST, &path, Some(&body)).await.with_context(fail)?;
    let fds = exec::fds(&op)?;
    let mut control = match fds.contains_key("control") {
        true => {
            let (sink, stream) = exec::connect(client, &op, &fds, "control").await?.split();
            tokio::spawn(ws::drain(stream));
            Some(sink)
        }
        false => None,
    };
    let (mut sink, stream) = exec::connect(client, &op, &fds, "0").await?.split();
    eprint!("To detach from the console, press: <ctrl>+a q\r\n");
    let raw = term::RawMode::enable();
    let mut input = term::stdin_chunks();
    let mut output = tokio::spawn(ws::copy_to(stream, tokio::io::stdout()));
    let mut detach = Detach::default();
    let mut stdin_open = true;
    loop {
        tokio::select! {
            chunk = input.recv(), if stdin_open => match chunk {
                Some(chunk) => {
                    let (bytes, quit) = detach.feed(&chunk);
                    if !bytes.is_empty() && !send(&mut sink, bytes).await {
                        break;
                    }
                    if quit {
                        break;
                    }
                }
                // stdin ended: keep showing the console until it closes.
                None => stdin_open = false,
            },
            _ = &mut output => break,
        }
    }
    ws::finish(&mut sink, true).await;
    if let Some(ctl) = control.as_mut() {
        ws::finish(ctl, true).await;
    }
    output.abort();
    let _ = tokio::io::stdout().flush().await;
    drop(raw);
    eprintln!();
    Ok(())
}

async fn send(sink: &mut ws::WsSink, bytes: Vec<u8>) -> bool {
    use futures::SinkExt;
    sink.send(tokio_tungstenite::tungstenite::Message::binary(bytes)).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detach_keys() {
        let mut d = Detach::default();
        assert_eq!(d.feed(b"ls\r"), (b"ls\r".to_vec(), false));
        assert_eq!(d.feed(&[CTRL_A]), (vec![], false));
        assert_eq!(d.feed(b"q"), (vec![], true));
        let mut d = Detach::default();
        assert_eq!(d.feed(&[b'x', CTRL_A, b'a', CTRL_A, b'z']), (vec![b'x', CTRL_A, CTRL_A, b'z'], false));
        assert_eq!(d.feed(&[CTRL_A, b'q', b'y']), (vec![], true));
    }
}
