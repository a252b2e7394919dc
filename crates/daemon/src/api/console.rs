//! `POST /1.0/instances/{name}/console`: the interactive console, over the
//! websockets `0` (both ways) and `control` of a websocket operation, as
//! in LXD. Only the text console exists (no VGA).
//!
//! - A full OS VM's console is its serial port: the daemon attaches the
//!   websocket to skiff-vmm's serial console socket, where the guest runs
//!   a getty (and the firmware and bootloader print). A new attach takes
//!   the console over from an earlier one.
//! - A thin VM or container has no getty: its console is a shell on a TTY
//!   through the agent (the image's `/bin/sh`).
//!
//! The console's output so far is its log (`GET .../console`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use axum::extract::ws::Message;
use axum::extract::{Path, State};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use skiff_agent_proto::{ExecRequest, WindowSize};
use skiff_api::OperationClass;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::exec::{environment, run_ws};
use super::{accepted, ApiErr, ApiResult, App, Body};
use crate::db::Status;
use crate::instances as inst;
use crate::ops::{OpError, Streams};

/// Serial output forwarded per websocket message, at most.
const SERIAL_CHUNK: usize = 16 * 1024;

pub async fn console(State(d): State<App>, Path(name): Path<String>, Body(req): Body<Value>) -> ApiResult {
    let kind = req.get("type").and_then(Value::as_str).unwrap_or("console");
    if kind != "console" {
        return Err(ApiErr::bad(format!("console type {kind:?}: only the text console (\"console\") exists")));
    }
    let r = inst::row(&d, &name)?;
    if r.status == Status::Frozen {
        return Err(ApiErr::bad(format!("Instance {name:?} is frozen (paused): resume it with skiff start")));
    }
    if r.status != Status::Running {
        return Err(ApiErr::bad(format!("Instance {name:?} is not running (its last boot's log: GET .../console)")));
    }
    let spec = inst::spec(&d, &r)?;
    let driver = inst::driver(&d, &r)?;
    let create = |d: &App| {
        d.ops.create(OperationClass::Websocket, "Showing console", Some(&name), Value::Null, false, &["0", "control"])
    };
    if let Some(socket) = driver.serial_console(&spec) {
        let (op, streams) = create(&d);
        d.ops.run(&op, async move { attach_serial(socket, streams).await });
        return accepted(&op);
    }
    let agent = driver.agent(&spec).map_err(|e| ApiErr::bad(crate::images::chain(&e)))?;
    let dim = |k: &str, def: u16| {
        req.get(k).and_then(Value::as_u64).filter(|v| *v > 0).map(|v| v.min(1000) as u16).unwrap_or(def)
    };
    let tty = WindowSize { rows: dim("height", 24), cols: dim("width", 80) };
    let request = ExecRequest {
        argv: vec!["/bin/sh".into()],
        env: environment(&spec, &BTreeMap::from([("TERM".to_string(), "xterm".to_string())])),
        cwd: None,
        user: None,
        tty: Some(tty),
        stdin: true,
    };
    let (op, streams) = create(&d);
    d.ops.run(&op, async move { run_ws(agent, request, streams, true).await });
    accepted(&op)
}

/// Joins websocket `0` and the serial console socket until either side
/// closes (the client detaches, the VM stops or reboots, or another client
/// takes the console). `control` carries nothing a serial line can use
/// (its window size stays the guest's business); its close ends the
/// console too.
async fn attach_serial(socket: PathBuf, streams: Streams) -> Result<Option<Value>, OpError> {
    let mut socks = streams.connect(&["0"]).await?;
    let serial = tokio::net::UnixStream::connect(&socket)
        .await
        .map_err(|e| OpError::Failed(format!("attaching to the serial console {}: {e}", socket.display())))?;
    let (mut serial_rx, mut serial_tx) = serial.into_split();
    let (mut ws_tx, mut ws_rx) = socks.remove("0").ok_or(OpError::NoClients)?.split();
    let control = socks.remove("control");
    let input = async {
        while let Some(Ok(msg)) = ws_rx.next().await {
            let data = match msg {
                Message::Binary(b) => b.to_vec(),
                Message::Text(t) => t.as_bytes().to_vec(),
                Message::Close(_) => break,
                _ => continue,
            };
            if serial_tx.write_all(&data).await.is_err() {
                break;
            }
        }
    };
    let output = async {
        let mut buf = vec![0u8; SERIAL_CHUNK];
        loop {
            match serial_rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if ws_tx.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    let control_closed = async {
        match control {
            Some(ws) => {
                let (_, mut rx) = ws.split();
                while let Some(Ok(msg)) = rx.next().await {
                    if matches!(msg, Message::Close(_)) {
                        break;
                    }
                }
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = input => {}
        _ = output => {}
        _ = control_closed => {}
    }
    let _ = ws_tx.send(Message::Close(None)).await;
    Ok(None)
}
