//! Reaching the agent: a plain Unix socket, or the VMM's hybrid vsock
//! socket (Firecracker's model: connect to the Unix socket, send
//! `CONNECT <port>\n`, read `OK <host port>\n`, then the stream is the
//! guest's vsock connection).

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::{timeout, Instant};

use skiff_agent_proto::AGENT_VSOCK_PORT;

/// Longest accepted hybrid-vsock answer line.
const MAX_HYBRID_LINE: usize = 64;

/// Errors of reaching the agent.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// connect(2) failed.
    #[error("connecting to {0}")]
    Connect(String, #[source] io::Error),
    /// The hybrid-vsock handshake failed (I/O).
    #[error("hybrid vsock handshake with {0}")]
    Handshake(String, #[source] io::Error),
    /// The VMM refused the connection or answered garbage.
    #[error("hybrid vsock {0}: VMM answered {1:?}")]
    Refused(String, String),
    /// No answer in time.
    #[error("connecting to {0} timed out")]
    Timeout(String),
    /// The VMM kept closing the connection before its `OK`: the guest
    /// refused it (nothing listens on the port) or did not answer in time.
    #[error("the guest did not accept a connection to {0} within {1:?} (nothing listening on the port, or the guest did not answer)")]
    NotAccepted(String, Duration),
}

impl TransportError {
    /// The VMM closed the stream before its `OK`, which it does when the
    /// guest refuses or does not answer: worth another try.
    fn guest_declined(&self) -> bool {
        matches!(self, TransportError::Handshake(_, e)
            if matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset))
    }
}

/// First pause before another try at a connection the guest declined;
/// it doubles up to [`MAX_RETRY_PAUSE`].
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(20);
const MAX_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// Where the agent is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// A Unix socket the agent listens on itself (host tests).
    Unix(PathBuf),
    /// The VMM's hybrid vsock Unix socket and the guest port.
    HybridVsock {
        /// The VMM's vsock Unix socket.
        path: PathBuf,
        /// The guest's vsock port.
        port: u32,
    },
    /// AF_VSOCK from the host to a guest CID (QEMU with vhost-vsock, for
    /// comparisons; needs /dev/vhost-vsock on the host).
    Vsock {
        /// The guest's context id.
        cid: u32,
        /// The guest's vsock port.
        port: u32,
    },
}

impl Transport {
    /// The agent's default port behind a VMM's hybrid vsock socket.
    pub fn vsock(path: impl Into<PathBuf>) -> Self {
        Transport::HybridVsock {
            path: path.into(),
            port: AGENT_VSOCK_PORT,
        }
    }

    /// Opens a stream to the agent within `limit`.
    ///
    /// Through a VMM's hybrid vsock socket a connection the guest declines
    /// (no listener yet, or no answer within the VMM's set-up time on a
    /// guest that is slow to run) is tried again until `limit`, as a
    /// guest's own AF_VSOCK connect would wait: a busy or just-restored
    /// guest is not a dead one.
    pub async fn connect(&self, limit: Duration) -> Result<UnixStream, TransportError> {
        let deadline = Instant::now() + limit;
        let mut pause = FIRST_RETRY_PAUSE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match timeout(left, self.connect_inner()).await {
                Err(_) => return Err(TransportError::Timeout(self.to_string())),
                Ok(Err(e)) if e.guest_declined() => {
                    if Instant::now() + pause >= deadline {
                        return Err(TransportError::NotAccepted(self.to_string(), limit));
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_RETRY_PAUSE);
                }
                Ok(r) => return r,
            }
        }
    }

    async fn connect_inner(&self) -> Result<UnixStream, TransportError> {
        let path = match self {
            Transport::Unix(p) | Transport::HybridVsock { path: p, .. } => p,
            Transport::Vsock { cid, port } => {
                let (cid, port) = (*cid, *port);
                let std = tokio::task::spawn_blocking(move || vsock_connect(cid, port))
                    .await
                    .map_err(|e| TransportError::Connect(self.to_string(), io::Error::other(e)))?
                    .map_err(|e| TransportError::Connect(self.to_string(), e))?;
                return UnixStream::from_std(std)
                    .map_err(|e| TransportError::Connect(self.to_string(), e));
            }
        };
        let mut s = UnixStream::connect(path)
            .await
            .map_err(|e| TransportError::Connect(self.to_string(), e))?;
        if let Transport::HybridVsock { port, .. } = self {
            let hs = |e| TransportError::Handshake(self.to_string(), e);
            s.write_all(format!("CONNECT {port}\n").as_bytes())
                .await
                .map_err(hs)?;
            // Byte by byte: nothing past the newline may be consumed.
            let mut line = Vec::new();
            loop {
                let b = s.read_u8().await.map_err(hs)?;
                if b == b'\n' {
                    break;
                }
                line.push(b);
                if line.len() > MAX_HYBRID_LINE {
                    break;
                }
            }
            let line = String::from_utf8_lossy(&line).into_owned();
            if !line.starts_with("OK ") {
                return Err(TransportError::Refused(self.to_string(), line));
            }
        }
        Ok(s)
    }
}

/// A connected AF_VSOCK stream, in a `UnixStream` wrapper: tokio only
/// reads, writes and polls the fd, which works the same for any stream
/// socket (its address methods must not be used).
fn vsock_connect(cid: u32, port: u32) -> io::Result<std::os::unix::net::UnixStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain syscall; the fd is owned right below.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: the pointer and length describe `addr`, which outlives the call.
    let r = unsafe {
        libc::connect(
            fd,
            &addr as *const libc::sockaddr_vm as *const libc::sockaddr,
            len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let stream = std::os::unix::net::UnixStream::from(owned);
    stream.set_nonblocking(true)?;
    Ok(stream)
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Unix(p) => write!(f, "unix:{}", p.display()),
            Transport::HybridVsock { path, port } => {
                write!(f, "hybrid-vsock:{}:{port}", path.display())
            }
            Transport::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    #[tokio::test]
    async fn hybrid_handshake_then_stream() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        let vmm = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut r = tokio::io::BufReader::new(s);
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            assert_eq!(line, "CONNECT 1024\n");
            let mut s = r.into_inner();
            s.write_all(b"OK 1073741824\nhello").await.unwrap();
        });
        let mut s = Transport::vsock(&path)
            .connect(Duration::from_secs(5))
            .await
            .unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"hello");
        vmm.await.unwrap();
    }

    #[tokio::test]
    async fn refused_and_silent_vmm() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(b"NOPE\n").await.unwrap();
            let (_silent, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let t = Transport::vsock(&path);
        assert!(matches!(
            t.connect(Duration::from_secs(5)).await,
            Err(TransportError::Refused(..))
        ));
        assert!(matches!(
            t.connect(Duration::from_millis(200)).await,
            Err(TransportError::Timeout(_))
        ));
    }

    /// The VMM closes the stream before `OK` when the guest refuses or is
    /// slow to answer: the client tries again until its limit, then says so.
    #[tokio::test]
    async fn declined_connections_are_retried_until_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        let vmm = tokio::spawn(async move {
            for _ in 0..2 {
                let (s, _) = l.accept().await.unwrap();
                drop(s);
            }
            let (s, _) = l.accept().await.unwrap();
            let mut r = tokio::io::BufReader::new(s);
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            r.into_inner().write_all(b"OK 1073741825\n").await.unwrap();
            // Then it declines every connection.
            let mut declined = 0;
            while let Ok(Ok((s, _))) = timeout(Duration::from_secs(2), l.accept()).await {
                drop(s);
                declined += 1;
            }
            declined
        });
        let t = Transport::vsock(&path);
        t.connect(Duration::from_secs(5)).await.unwrap();
        let started = Instant::now();
        let e = t.connect(Duration::from_millis(600)).await.unwrap_err();
        assert!(matches!(e, TransportError::NotAccepted(..)), "{e}");
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "gave up after {:?}",
            started.elapsed()
        );
        assert!(vmm.await.unwrap() >= 3);
    }
}
