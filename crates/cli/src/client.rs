//! The transport to skiffd: HTTP/1.1 over its Unix socket, the `/1.0`
//! response envelope, operations (`/wait`) and operation websockets.
//!
//! Every request opens its own connection (`Host: skiff`); answers are
//! read whole. Errors say what went wrong in the daemon's own words.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::body::Bytes;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use skiff_api::{Operation, Response, ResponseType, StatusCode as ApiStatus};
use tokio::net::UnixStream;
use tokio_tungstenite::WebSocketStream;

/// The default state directory of skiffd.
pub const DEFAULT_DIR: &str = "/var/lib/skiff";

/// What can go wrong talking to skiffd.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No daemon listens on the socket.
    #[error(
        "skiffd is not running (no socket at {0}). Start it with \"systemctl start skiffd\", or run \"skiffd &\" as \
         root; see the README."
    )]
    NotRunning(PathBuf),
    /// The socket exists but cannot be used.
    #[error("cannot connect to skiffd at {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// HTTP failed (connection reset, bad framing).
    #[error("talking to skiffd: {0}")]
    Http(#[from] hyper::Error),
    /// A request could not be built.
    #[error("bad request: {0}")]
    Request(#[from] hyper::http::Error),
    /// skiffd answered with an error.
    #[error("{message}")]
    Remote {
        /// The HTTP status.
        code: u16,
        /// skiffd's message.
        message: String,
    },
    /// The answer did not have the expected shape.
    #[error("unexpected answer from skiffd: {0}")]
    Decode(String),
    /// A background operation failed or was cancelled.
    #[error("{0}")]
    Operation(String),
    /// A websocket failed.
    #[error("websocket: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
}

impl ClientError {
    /// The HTTP status of a daemon error.
    pub fn code(&self) -> Option<u16> {
        match self {
            ClientError::Remote { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Result of the client.
pub type Result<T> = std::result::Result<T, ClientError>;

/// An answer read whole.
#[derive(Debug)]
pub struct RawResponse {
    /// The HTTP status.
    pub status: StatusCode,
    /// Its headers.
    pub headers: HeaderMap,
    /// Its body.
    pub body: Bytes,
}

impl RawResponse {
    /// A header as a string (the first of `names` present).
    pub fn header(&self, names: &[&str]) -> Option<String> {
        names.iter().find_map(|n| self.headers.get(*n)).and_then(|v| v.to_str().ok()).map(str::to_string)
    }

    /// Whether the body is JSON (an envelope).
    pub fn is_json(&self) -> bool {
        self.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("json"))
    }

    /// The body as an envelope; a non-JSON error body becomes its text.
    pub fn envelope(&self) -> Result<Response<Value>> {
        match serde_json::from_slice::<Response<Value>>(&self.body) {
            Ok(r) => Ok(r),
            Err(_) if !self.status.is_success() => Err(ClientError::Remote {
                code: self.status.as_u16(),
                message: text_or_status(&self.body, self.status),
            }),
            Err(e) => Err(ClientError::Decode(format!("{e} (HTTP {})", self.status))),
        }
    }
}

fn text_or_status(body: &[u8], status: StatusCode) -> String {
    let t = String::from_utf8_lossy(body).trim().to_string();
    if t.is_empty() {
        status.to_string()
    } else {
        t
    }
}

/// A request body: nothing, JSON, raw bytes or a file streamed as it is read.
pub enum Body<'a> {
    /// No body.
    Empty,
    /// A JSON value.
    Json(&'a Value),
    /// Raw bytes (file contents).
    Raw(Bytes),
    /// A file, sent in chunks (image tarballs).
    File(tokio::fs::File),
}

/// A file as a stream of body frames.
fn file_frames(
    file: tokio::fs::File,
) -> impl futures::Stream<Item = std::io::Result<hyper::body::Frame<Bytes>>> + Send {
    futures::stream::try_unfold(file, |mut f| async move {
        let mut buf = vec![0u8; 1 << 20];
        let n = tokio::io::AsyncReadExt::read(&mut f, &mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        Ok(Some((hyper::body::Frame::data(Bytes::from(buf)), f)))
    })
}

/// The client of one skiffd.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client of the daemon listening on `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client { socket: socket.into() }
    }

    /// The socket: `--socket`, else `$SKIFF_SOCKET`, else `$SKIFF_DIR/unix.socket`.
    pub fn socket_path(flag: Option<&Path>) -> PathBuf {
        if let Some(p) = flag {
            return p.to_path_buf();
        }
        if let Some(p) = std::env::var_os("SKIFF_SOCKET").filter(|p| !p.is_empty()) {
            return p.into();
        }
        let dir = std::env::var_os("SKIFF_DIR").filter(|p| !p.is_empty()).unwrap_or_else(|| DEFAULT_DIR.into());
        PathBuf::from(dir).join("unix.socket")
    }

    async fn connect(&self) -> Result<UnixStream> {
        UnixStream::connect(&self.socket).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning(self.socket.clone())
            }
            _ => ClientError::Connect { path: self.socket.clone(), source: e },
        })
    }

    /// Sends one request and reads the whole answer.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Body<'_>,
    ) -> Result<RawResponse> {
        let stream = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            // The connection ends with the answer; its error, if any, shows in send_request.
            let _ = conn.await;
        });
        let mut req = Request::builder().method(method).uri(path).header(HOST, "skiff");
        let body = match body {
            Body::Empty => Either::Left(Full::new(Bytes::new())),
            Body::Json(v) => {
                req = req.header(CONTENT_TYPE, "application/json");
                let b = serde_json::to_vec(v).map_err(|e| ClientError::Decode(e.to_string()))?;
                Either::Left(Full::new(Bytes::from(b)))
            }
            Body::Raw(b) => {
                req = req.header(CONTENT_TYPE, "application/octet-stream");
                Either::Left(Full::new(b))
            }
            Body::File(f) => {
                req = req.header(CONTENT_TYPE, "application/octet-stream");
                Either::Right(StreamBody::new(Box::pin(file_frames(f))))
            }
        };
        for (k, v) in headers {
            let name = HeaderName::from_bytes(k.as_bytes()).map_err(hyper::http::Error::from)?;
            let value = HeaderValue::from_str(v).map_err(hyper::http::Error::from)?;
            req = req.header(name, value);
        }
        let resp = sender.send_request(req.body(body)?).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(RawResponse { status: parts.status, headers: parts.headers, body })
    }

    /// Sends a request and returns the envelope (an error envelope is an `Err`).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<(Response<Value>, RawResponse)> {
        let raw = self.raw(method, path, headers, body.map_or(Body::Empty, Body::Json)).await?;
        let env = raw.envelope()?;
        if env.kind == ResponseType::Error {
            let code = if env.error_code != 0 { env.error_code } else { raw.status.as_u16() };
            return Err(ClientError::Remote { code, message: env.error });
        }
        Ok((env, raw))
    }

    /// `GET path`, the metadata as `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        Ok(self.get_etag(path).await?.0)
    }

    /// `GET path`, the metadata as `T` and the ETag header.
    pub async fn get_etag<T: DeserializeOwned>(&self, path: &str) -> Result<(T, Option<String>)> {
        let (env, raw) = self.request(Method::GET, path, &[], None).await?;
        let etag = raw.header(&["etag"]);
        Ok((decode(env.metadata)?, etag))
    }

    /// Sends a request and returns the metadata of a sync answer, or the
    /// finished operation's metadata after waiting for an async one.
    pub async fn run(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value> {
        self.run_with(method, path, &[], body).await
    }

    /// [`Client::run`] with extra headers (`If-Match`).
    pub async fn run_with(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<Value> {
        let (env, _) = self.request(method, path, headers, body).await?;
        match env.kind {
            ResponseType::Async => {
                let op: Operation = decode(env.metadata)?;
                Ok(self.wait(&op.id).await?.metadata)
            }
            _ => Ok(env.metadata),
        }
    }

    /// Sends a request that must start an operation, and returns it.
    pub async fn start_op(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Operation> {
        let (env, _) = self.request(method, path, &[], body).await?;
        if env.kind != ResponseType::Async {
            return Err(ClientError::Decode("expected an operation (an async answer)".into()));
        }
        decode(env.metadata)
    }

    /// Waits for an operation to end (`/wait?timeout=30` in a loop); its
    /// error when it failed or was cancelled.
    pub async fn wait(&self, id: &str) -> Result<Operation> {
        loop {
            let op: Operation = self.get(&format!("/1.0/operations/{id}/wait?timeout=30")).await?;
            if op.is_final() {
                return finished(op);
            }
        }
    }

    /// Polls an operation every `every` and calls `seen` with each record
    /// until it ends (for progress display).
    pub async fn poll(&self, id: &str, every: Duration, mut seen: impl FnMut(&Operation)) -> Result<Operation> {
        loop {
            let op: Operation = self.get(&format!("/1.0/operations/{id}")).await?;
            seen(&op);
            if op.is_final() {
                return finished(op);
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Connects a websocket at `path` (`/1.0/events?...`, an operation's stream).
    pub async fn websocket(&self, path: &str) -> Result<WebSocketStream<UnixStream>> {
        let stream = self.connect().await?;
        let (ws, _) = tokio_tungstenite::client_async(format!("ws://skiff{path}"), stream).await?;
        Ok(ws)
    }

    /// Connects one stream of a websocket operation.
    pub async fn op_websocket(&self, id: &str, secret: &str) -> Result<WebSocketStream<UnixStream>> {
        self.websocket(&format!("/1.0/operations/{id}/websocket?secret={}", encode_query(secret))).await
    }
}

/// An operation that ended: `Ok` on success, its error otherwise.
fn finished(op: Operation) -> Result<Operation> {
    match op.status_code() {
        ApiStatus::Success => Ok(op),
        ApiStatus::Cancelled => {
            Err(ClientError::Operation(if op.err.is_empty() { "the operation was cancelled".into() } else { op.err }))
        }
        _ => {
            Err(ClientError::Operation(if op.err.is_empty() { format!("the operation {}", op.status) } else { op.err }))
        }
    }
}

/// Decodes the metadata of an answer.
pub fn decode<T: DeserializeOwned>(v: Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| ClientError::Decode(e.to_string()))
}

/// A value as JSON for a request body.
pub fn json<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Percent-encodes a query value (keeps unreserved characters and `/`).
pub fn encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-encodes a path segment (an instance, snapshot or alias name).
pub fn encode_segment(s: &str) -> String {
    encode_query(s).replace('/', "%2F")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding() {
        assert_eq!(encode_query("/etc/a b?&"), "/etc/a%20b%3F%26");
        assert_eq!(encode_segment("a/b"), "a%2Fb");
    }

    #[test]
    fn socket_flag_wins() {
        assert_eq!(Client::socket_path(Some(Path::new("/x/s"))), PathBuf::from("/x/s"));
    }
}
