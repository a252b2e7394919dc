//! The runner's control socket (`control.sock` in the runtime directory):
//! `skiff-run kill` reaches the process that attached the main process.
//! One request line, one answer line: `signal N` → `ok` or `error MSG`.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use skiff_agent_client::ExecControl;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::runtime::CONTROL_SOCKET;

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Binding or connecting failed.
    #[error("control socket {0}")]
    Socket(String, #[source] std::io::Error),
    /// The runner refused the request.
    #[error("the runner answered {0:?}")]
    Refused(String),
    /// No answer in time.
    #[error("the runner did not answer")]
    Timeout,
    /// A request line longer than the server takes.
    #[error("request line over {0} bytes")]
    LineTooLong(usize),
    /// No request line in time.
    #[error("no request line within {0:?}")]
    ReadTimeout(Duration),
}

/// Limits of a control socket's server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// Longest request line.
    pub max_line: usize,
    /// Connections served at once; more are answered `error busy`.
    pub max_connections: usize,
    /// Time a client gets to send its request line.
    pub read_timeout: Duration,
}

impl Default for ServeLimits {
    /// 64 KiB lines, 16 connections, 5 s to send the request.
    fn default() -> Self {
        ServeLimits { max_line: 64 * 1024, max_connections: 16, read_timeout: Duration::from_secs(5) }
    }
}

/// Serves `signal N` requests for `main` until aborted.
pub fn serve(dir: &Path, main: ExecControl) -> Result<tokio::task::JoinHandle<()>, ControlError> {
    serve_with(dir, ServeLimits::default(), move |sig| {
        let main = main.clone();
        async move { main.signal(sig).await.map_err(|e| e.to_string()) }
    })
}

/// Parses a request line: the signal of `signal N`.
pub fn parse_request(line: &str) -> Option<i32> {
    line.trim().strip_prefix("signal ").and_then(|n| n.parse::<i32>().ok())
}

/// [`serve`] with other limits and any signal action. A request line over
/// [`ServeLimits::max_line`] is answered with an error and the connection
/// closed; so is a client that sends no line within
/// [`ServeLimits::read_timeout`]; beyond [`ServeLimits::max_connections`]
/// connections are answered `error busy` and closed.
pub fn serve_with<F, Fut>(
    dir: &Path,
    limits: ServeLimits,
    signal: F,
) -> Result<tokio::task::JoinHandle<()>, ControlError>
where
    F: Fn(i32) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let path = dir.join(CONTROL_SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| ControlError::Socket(path.display().to_string(), e))?;
    let signal = Arc::new(signal);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    Ok(tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                // Best effort, never waiting: the socket buffer takes it.
                let _ = s.try_write(b"error busy\n");
                continue;
            };
            let signal = signal.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let (r, mut w) = s.into_split();
                let line = match read_request_line(r, limits.max_line, limits.read_timeout).await {
                    Ok(Some(line)) => line,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = w.write_all(format!("error {e}\n").as_bytes()).await;
                        return;
                    }
                };
                let answer = match parse_request(&line) {
                    Some(sig) => match signal(sig).await {
                        Ok(()) => "ok\n".to_string(),
                        Err(e) => format!("error {e}\n"),
                    },
                    None => "error unknown request\n".to_string(),
                };
                let _ = w.write_all(answer.as_bytes()).await;
            });
        }
    }))
}

/// Reads one request line of at most `max` bytes (newline not counted)
/// within `limit`, holding no more than that in memory. `Ok(None)`: the
/// client closed first. Not UTF-8 is read lossily (it parses as nothing).
pub async fn read_request_line<R: AsyncRead + Unpin>(
    r: R,
    max: usize,
    limit: Duration,
) -> Result<Option<String>, ControlError> {
    let read = async {
        let mut buf = Vec::new();
        let mut r = BufReader::new(r.take(max as u64 + 1));
        r.read_until(b'\n', &mut buf).await.map_err(|e| ControlError::Socket("reading a request".into(), e))?;
        if buf.is_empty() {
            return Ok(None);
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
        }
        if buf.len() > max {
            return Err(ControlError::LineTooLong(max));
        }
        Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
    };
    tokio::time::timeout(limit, read).await.map_err(|_| ControlError::ReadTimeout(limit))?
}

/// Asks the runner of the VM in `dir` to signal its main process.
pub async fn send_signal(dir: &Path, signal: i32) -> Result<(), ControlError> {
    let path = dir.join(CONTROL_SOCKET);
    let fut = async {
        let mut s =
            UnixStream::connect(&path).await.map_err(|e| ControlError::Socket(path.display().to_string(), e))?;
        s.write_all(format!("signal {signal}\n").as_bytes())
            .await
            .map_err(|e| ControlError::Socket(path.display().to_string(), e))?;
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .await
            .map_err(|e| ControlError::Socket(path.display().to_string(), e))?;
        match line.trim() {
            "ok" => Ok(()),
            other => Err(ControlError::Refused(other.to_string())),
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut).await.map_err(|_| ControlError::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn limits() -> ServeLimits {
        ServeLimits { max_line: 1024, max_connections: 4, read_timeout: Duration::from_millis(300) }
    }

    /// A server whose signals land in the returned list.
    fn server(dir: &Path) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Vec<i32>>>) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let seen = got.clone();
        let h = serve_with(dir, limits(), move |sig| {
            seen.lock().unwrap().push(sig);
            async { Ok(()) }
        })
        .unwrap();
        (h, got)
    }

    /// What the server answers before it closes, within 2 s.
    async fn answer(mut s: UnixStream) -> Option<String> {
        let mut out = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
        r.ok().map(|_| String::from_utf8_lossy(&out).into_owned())
    }

    #[tokio::test]
    async fn requests_are_answered() {
        let dir = tempfile::tempdir().unwrap();
        let (h, got) = server(dir.path());
        send_signal(dir.path(), 15).await.unwrap();
        assert_eq!(*got.lock().unwrap(), [15]);
        let mut s = UnixStream::connect(dir.path().join(CONTROL_SOCKET)).await.unwrap();
        s.write_all(b"reboot\n").await.unwrap();
        assert_eq!(answer(s).await.as_deref(), Some("error unknown request\n"));
        h.abort();
    }

    #[tokio::test]
    async fn a_line_over_the_limit_closes_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let (h, got) = server(dir.path());
        let mut s = UnixStream::connect(dir.path().join(CONTROL_SOCKET)).await.unwrap();
        // Far more than the limit, no newline, and the client stays.
        let _ = tokio::time::timeout(Duration::from_millis(500), s.write_all(&vec![b's'; 1 << 20])).await;
        let a = answer(s).await.expect("the server closed the connection");
        assert!(a.starts_with("error request line"), "{a:?}");
        assert!(got.lock().unwrap().is_empty());
        h.abort();
    }

    #[tokio::test]
    async fn a_silent_client_is_dropped_after_the_read_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let (h, _) = server(dir.path());
        let s = UnixStream::connect(dir.path().join(CONTROL_SOCKET)).await.unwrap();
        assert!(answer(s).await.is_some(), "still open after the read timeout");
        h.abort();
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_are_turned_away() {
        let dir = tempfile::tempdir().unwrap();
        let (h, got) = server(dir.path());
        let path = dir.path().join(CONTROL_SOCKET);
        let mut idle = Vec::new();
        for _ in 0..limits().max_connections {
            idle.push(UnixStream::connect(&path).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut s = UnixStream::connect(&path).await.unwrap();
        s.write_all(b"signal 9\n").await.unwrap();
        let a = tokio::time::timeout(Duration::from_millis(200), answer(s)).await;
        assert_eq!(a.ok().flatten().as_deref(), Some("error busy\n"));
        assert!(got.lock().unwrap().is_empty());
        // Once the idle ones are gone, requests are served again.
        drop(idle);
        tokio::time::sleep(Duration::from_millis(50)).await;
        send_signal(dir.path(), 2).await.unwrap();
        assert_eq!(*got.lock().unwrap(), [2]);
        h.abort();
    }
}
