//! The HTTP side of the control socket: accepting connections, reading
//! requests with limits, and writing replies.
//!
//! Limits, so that a caller cannot exhaust the VMM: at most
//! [`MAX_CONNECTIONS`] connections at a time (more get 503 and are
//! closed), [`MAX_HEAD`] bytes of request line and headers, [`MAX_BODY`]
//! bytes of body (413), and [`IDLE_TIMEOUT`] to send a request. Keep-alive
//! works; `Connection: close` ends the connection after the reply.

use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::{route, ApiCall, VmReply};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Request line plus headers.
pub const MAX_HEAD: usize = 16 << 10;
/// Request body.
pub const MAX_BODY: usize = 64 << 10;
/// How long a connection may take to send a request.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection waits for the VM's loop to answer; longer than
/// any request takes (a device removal waits 10 s for the guest).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_HEADERS: usize = 32;

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("cannot listen on {path}")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(String),
    #[error("another process answers on {0}")]
    InUse(String),
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
}

/// The listening socket; dropping it removes the socket file and waits
/// (up to [`DRAIN_TIMEOUT`]) for answers still being written.
pub struct ApiServer {
    path: PathBuf,
    active: Arc<AtomicUsize>,
}

/// How long dropping the server waits for connections to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Removes a stale socket at `path`; refuses anything else.
fn clear_stale(path: &Path) -> Result<(), ApiServerError> {
    let shown = || path.display().to_string();
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(m) if !m.file_type().is_socket() => Err(ApiServerError::NotASocket(shown())),
        Ok(_) if UnixStream::connect(path).is_ok() => Err(ApiServerError::InUse(shown())),
        Ok(_) => std::fs::remove_file(path).map_err(|source| ApiServerError::Bind { path: shown(), source }),
    }
}

impl ApiServer {
    /// Binds `path` and serves it: each request goes to `calls`, and `wake`
    /// is written so the VM's loop looks.
    pub fn start(path: &Path, calls: Sender<ApiCall>, wake: Arc<EventFd>) -> Result<Self, ApiServerError> {
        clear_stale(path)?;
        let listener = UnixListener::bind(path)
            .map_err(|source| ApiServerError::Bind { path: path.display().to_string(), source })?;
        let active = Arc::new(AtomicUsize::new(0));
        let counted = active.clone();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                        active.fetch_sub(1, Ordering::SeqCst);
                        let mut s = stream;
                        let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                        let reply = VmReply::error(503, format!("more than {MAX_CONNECTIONS} connections"));
                        let _ = write_reply(&mut s, &reply, true);
                        continue;
                    }
                    let (calls, wake, active) = (calls.clone(), wake.clone(), active.clone());
                    let spawned = std::thread::Builder::new().name("api-conn".into()).spawn(move || {
                        serve(stream, &calls, &wake);
                        active.fetch_sub(1, Ordering::SeqCst);
                    });
                    if spawned.is_err() {
                        log::warn!("control API: cannot start a connection thread");
                    }
                }
            })
            .map_err(ApiServerError::Thread)?;
        Ok(Self { path: path.to_path_buf(), active: counted })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let deadline = std::time::Instant::now() + DRAIN_TIMEOUT;
        while self.active.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// One parsed request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
    pub close: bool,
}

/// What reading a request came to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Incoming {
    Request(Request),
    /// The peer closed the connection between requests.
    Closed,
    /// A bad request: answer this, then close.
    Bad(VmReply),
}

/// Reads one request from `s`; `buf` keeps bytes that belong to the next.
pub(crate) fn read_request(s: &mut impl Read, buf: &mut Vec<u8>) -> Incoming {
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let method = req.method.unwrap_or("").to_string();
                let path = req.path.unwrap_or("").to_string();
                let mut length = 0usize;
                let mut close = req.version == Some(0);
                for h in req.headers.iter() {
                    let value = String::from_utf8_lossy(h.value);
                    if h.name.eq_ignore_ascii_case("content-length") {
                        match value.trim().parse() {
                            Ok(n) => length = n,
                            Err(_) => return Incoming::Bad(VmReply::error(400, "bad Content-Length")),
                        }
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        return Incoming::Bad(VmReply::error(
                            400,
                            "chunked bodies are not supported; send Content-Length",
                        ));
                    } else if h.name.eq_ignore_ascii_case("connection") {
                        close = value.trim().eq_ignore_ascii_case("close");
                    }
                }
                if length > MAX_BODY {
                    return Incoming::Bad(VmReply::error(413, format!("a {length}-byte body is more than {MAX_BODY}")));
                }
                while buf.len() < head_len + length {
                    match s.read(&mut chunk) {
                        Ok(0) => return Incoming::Bad(VmReply::error(400, "the body ended early")),
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        Err(_) => return Incoming::Closed,
                    }
                }
                let body = buf[head_len..head_len + length].to_vec();
                buf.drain(..head_len + length);
                return Incoming::Request(Request { method, path, body, close });
            }
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
                return Incoming::Bad(VmReply::error(431, format!("request head longer than {MAX_HEAD} bytes")));
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Incoming::Bad(VmReply::error(400, format!("malformed request: {e}"))),
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return Incoming::Closed,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

pub(crate) fn write_reply(s: &mut impl Write, reply: &VmReply, close: bool) -> std::io::Result<()> {
    let body = reply.body.as_deref().unwrap_or("");
    let mut head = format!("HTTP/1.1 {} {}\r\nServer: skiff-vmm\r\n", reply.status, reason(reply.status));
    if reply.body.is_some() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())
}

fn serve(mut s: UnixStream, calls: &Sender<ApiCall>, wake: &EventFd) {
    let _ = s.set_read_timeout(Some(IDLE_TIMEOUT));
    let _ = s.set_write_timeout(Some(IDLE_TIMEOUT));
    let mut buf = Vec::new();
    loop {
        let (reply, close) = match read_request(&mut s, &mut buf) {
            Incoming::Closed => return,
            Incoming::Bad(reply) => (reply, true),
            Incoming::Request(req) => {
                let reply = match route(&req.method, &req.path, &req.body) {
                    Err(reply) => reply,
                    Ok(request) => ask(calls, wake, request),
                };
                (reply, req.close)
            }
        };
        if write_reply(&mut s, &reply, close).is_err() || close {
            return;
        }
    }
}

/// Hands `request` to the VM's loop and waits for the answer.
fn ask(calls: &Sender<ApiCall>, wake: &EventFd, request: super::VmRequest) -> VmReply {
    let (reply, answer) = channel();
    if calls.send(ApiCall { request, reply }).is_err() {
        return VmReply::error(503, "the VM is shutting down");
    }
    let _ = wake.write(1);
    answer.recv_timeout(ANSWER_TIMEOUT).unwrap_or_else(|_| VmReply::error(504, "the VM's loop did not answer in time"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(input: &[u8]) -> Vec<Incoming> {
        let mut r = input;
        let mut buf = Vec::new();
        let mut out = Vec::new();
        loop {
            let x = read_request(&mut r, &mut buf);
            let end = !matches!(x, Incoming::Request(_));
            out.push(x);
            if end {
                return out;
            }
        }
    }

    #[test]
    fn pipelined_requests_and_limits() {
        let two = b"GET /api/v1/vm.info HTTP/1.1\r\nHost: x\r\n\r\nPUT /api/v1/vm.resize HTTP/1.1\r\nContent-Length: 11\r\nConnection: close\r\n\r\n{\"vcpus\":2}";
        let got = read_all(two);
        assert_eq!(got.len(), 3);
        assert!(matches!(&got[0], Incoming::Request(r) if r.method == "GET" && r.body.is_empty() && !r.close));
        assert!(matches!(&got[1], Incoming::Request(r) if r.body == b"{\"vcpus\":2}" && r.close));
        assert_eq!(got[2], Incoming::Closed);

        let big = format!("PUT /api/v1/vm.add-disk HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        assert!(matches!(&read_all(big.as_bytes())[0], Incoming::Bad(r) if r.status == 413));
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_HEAD + 10));
        assert!(matches!(&read_all(long.as_bytes())[0], Incoming::Bad(r) if r.status == 431));
        assert!(matches!(&read_all(b"\x00\x01garbage\r\n\r\n")[0], Incoming::Bad(r) if r.status == 400));
        let short = b"PUT /api/v1/vm.resize HTTP/1.1\r\nContent-Length: 50\r\n\r\n{}";
        assert!(matches!(&read_all(short)[0], Incoming::Bad(r) if r.status == 400));
        let chunked = b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(&read_all(chunked)[0], Incoming::Bad(r) if r.status == 400));
    }

    #[test]
    fn socket_round_trip_and_stale_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        std::fs::write(&path, b"not a socket").unwrap();
        let (tx, rx) = channel::<ApiCall>();
        let wake = Arc::new(EventFd::new(0).unwrap());
        assert!(matches!(ApiServer::start(&path, tx.clone(), wake.clone()), Err(ApiServerError::NotASocket(_))));
        std::fs::remove_file(&path).unwrap();
        // A stale socket nobody answers on is replaced.
        drop(UnixListener::bind(&path).unwrap());
        let server = ApiServer::start(&path, tx.clone(), wake.clone()).unwrap();
        assert!(matches!(ApiServer::start(&path, tx, wake.clone()), Err(ApiServerError::InUse(_))));
        std::thread::spawn(move || {
            for call in rx {
                let _ = call.reply.send(VmReply::json(&serde_json::json!({ "got": format!("{:?}", call.request) })));
            }
        });
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"GET /api/v1/vm.info HTTP/1.1\r\n\r\nGET /api/v1/nope HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("{\"got\":\"Info\"}"), "{out}");
        assert!(out.contains("HTTP/1.1 404 Not Found\r\n"), "{out}");
        assert!(wake.read().unwrap() >= 1);
        drop(server);
        assert!(!path.exists());
    }
}
