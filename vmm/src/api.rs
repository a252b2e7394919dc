//! The control socket (`--api-socket PATH`).
//!
//! Protocol: a client connects to the Unix socket and sends one JSON object
//! per line; each gets one JSON line back. Requests:
//!
//! | request                 | reply                                              |
//! |-------------------------|----------------------------------------------------|
//! | `{"op":"ping"}`         | `{"ok":true,"version":"0.1.0"}`                    |
//! | `{"op":"info"}`         | `{"ok":true,"cpus":N,"memory_mib":M,"uptime_ms":T,"vm_exits":E}` |
//! | `{"op":"stop"}`         | `{"ok":true}`, then the VM stops (exit status 0)   |
//!
//! Anything else gets `{"ok":false,"error":"..."}` and the connection stays
//! usable. Lines longer than 64 KiB close the connection. The socket file is
//! removed when the VMM ends.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

use crate::config::VmConfig;
use crate::exit::{ExitReason, ExitState};
use crate::vstate::vcpu::exit_count;

const MAX_LINE: u64 = 64 * 1024;

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot listen on {path}")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
}

/// Static facts about the VM the API reports.
#[derive(Clone)]
pub struct VmInfo {
    cpus: u8,
    memory_mib: u64,
    start: Instant,
}

impl VmInfo {
    pub fn new(config: &VmConfig, start: Instant) -> Self {
        Self { cpus: config.cpus, memory_mib: config.memory_mib, start }
    }
}

/// Handles one request line; pure apart from `stop`'s effect on `exit`.
pub fn handle_request(line: &str, info: &VmInfo, exit: &ExitState) -> Value {
    let req: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return json!({"ok": false, "error": format!("malformed request: {e}")}),
    };
    match req.get("op").and_then(Value::as_str) {
        Some("ping") => json!({"ok": true, "version": env!("CARGO_PKG_VERSION")}),
        Some("info") => json!({
            "ok": true,
            "cpus": info.cpus,
            "memory_mib": info.memory_mib,
            "uptime_ms": info.start.elapsed().as_millis() as u64,
            "vm_exits": exit_count(),
        }),
        Some("stop") => {
            exit.request(ExitReason::Stopped("API request".into()));
            json!({"ok": true})
        }
        Some(other) => json!({"ok": false, "error": format!("unknown op '{other}'")}),
        None => json!({"ok": false, "error": "request has no \"op\" string"}),
    }
}

/// The server thread; dropping it removes the socket file.
pub struct ApiServer {
    path: PathBuf,
}

impl ApiServer {
    /// Binds `path` (replacing a stale socket) and serves it on a thread.
    pub fn start(path: &Path, info: VmInfo, exit: Arc<ExitState>) -> Result<Self, ApiError> {
        let _ = std::fs::remove_file(path);
        let listener =
            UnixListener::bind(path).map_err(|source| ApiError::Bind { path: path.display().to_string(), source })?;
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let (info, exit) = (info.clone(), exit.clone());
                    let _ =
                        std::thread::Builder::new().name("api-conn".into()).spawn(move || serve(stream, &info, &exit));
                }
            })
            .map_err(ApiError::Thread)?;
        Ok(Self { path: path.to_path_buf() })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(stream: UnixStream, info: &VmInfo, exit: &ExitState) {
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match reader.by_ref().take(MAX_LINE).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if !line.ends_with('\n') && line.len() as u64 >= MAX_LINE => return,
            Ok(_) => {}
        }
        if line.trim().is_empty() {
            continue;
        }
        let reply = handle_request(line.trim(), info, exit);
        if writeln!(writer, "{reply}").is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> VmInfo {
        VmInfo { cpus: 2, memory_mib: 128, start: Instant::now() }
    }

    #[test]
    fn requests_table() {
        let exit = ExitState::new().unwrap();
        let cases = [
            (r#"{"op":"ping"}"#, true),
            (r#"{"op":"info"}"#, true),
            (r#"{"op":"dance"}"#, false),
            (r#"{"nope":1}"#, false),
            ("not json", false),
        ];
        for (req, ok) in cases {
            assert_eq!(handle_request(req, &info(), &exit)["ok"], json!(ok), "{req}");
        }
        assert_eq!(handle_request(r#"{"op":"info"}"#, &info(), &exit)["cpus"], json!(2));
        assert_eq!(exit.reason(), None);
        handle_request(r#"{"op":"stop"}"#, &info(), &exit);
        assert!(matches!(exit.reason(), Some(ExitReason::Stopped(_))));
    }

    #[test]
    fn socket_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let exit = Arc::new(ExitState::new().unwrap());
        let server = ApiServer::start(&path, info(), exit).unwrap();
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"{\"op\":\"ping\"}\ngarbage\n").unwrap();
        let mut r = BufReader::new(s);
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        assert!(l.contains("\"ok\":true"));
        l.clear();
        r.read_line(&mut l).unwrap();
        assert!(l.contains("malformed"));
        drop(server);
        assert!(!path.exists());
    }
}
