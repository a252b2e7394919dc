//! Events the agent sends on its own: ready, main process exited.
//!
//! The agent connects to the host's vsock port 1025; with the hybrid vsock
//! the VMM turns that into a connection to the Unix socket
//! `<vsock uds>_1025`, which [`EventListener`] listens on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::timeout;

use skiff_agent_proto::frame::{body_len, decode_body, HEADER_LEN};
use skiff_agent_proto::{AgentMessage, Event, Frame, EVENT_VSOCK_PORT};

use crate::ClientError;

/// The Unix socket the VMM connects guest-initiated connections to port
/// `port` to: `<vsock uds>_<port>`.
pub fn host_port_path(vsock_uds: &Path, port: u32) -> PathBuf {
    let mut s = vsock_uds.as_os_str().to_owned();
    s.push(format!("_{port}"));
    s.into()
}

/// Listens for the agent's event connection.
pub struct EventListener {
    listener: UnixListener,
}

impl EventListener {
    /// Listens on `path` (a stale socket file is replaced).
    pub fn bind(path: &Path) -> Result<Self, ClientError> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|e| ClientError::Local(path.into(), e))?;
        Ok(EventListener { listener })
    }

    /// Listens where a VMM with vsock socket `vsock_uds` delivers the
    /// agent's events.
    pub fn bind_for_vsock(vsock_uds: &Path) -> Result<Self, ClientError> {
        Self::bind(&host_port_path(vsock_uds, EVENT_VSOCK_PORT))
    }

    /// Waits up to `limit` for the agent to connect.
    pub async fn accept(&self, limit: Duration) -> Result<EventStream, ClientError> {
        let (s, _) = timeout(limit, self.listener.accept())
            .await
            .map_err(|_| ClientError::Timeout("waiting for the agent's event connection"))?
            .map_err(ClientError::Io)?;
        Ok(EventStream {
            reader: BufReader::new(s),
        })
    }
}

/// The agent's events, in order.
pub struct EventStream {
    reader: BufReader<UnixStream>,
}

impl EventStream {
    /// The next event within `limit`; `None` when the agent closed the
    /// connection (e.g. the guest powered off).
    pub async fn next(&mut self, limit: Duration) -> Result<Option<Event>, ClientError> {
        timeout(limit, self.next_inner())
            .await
            .map_err(|_| ClientError::Timeout("waiting for an event"))?
    }

    async fn next_inner(&mut self) -> Result<Option<Event>, ClientError> {
        loop {
            let mut header = [0u8; HEADER_LEN];
            match self.reader.read_exact(&mut header).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(ClientError::Io(e)),
            }
            let mut body = vec![0u8; body_len(header)?];
            self.reader
                .read_exact(&mut body)
                .await
                .map_err(ClientError::Io)?;
            if let Frame::Control(AgentMessage::Event { event }) = decode_body(&body)? {
                return Ok(Some(event));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_path_appends_port() {
        assert_eq!(
            host_port_path(Path::new("/run/vm/v.sock"), 1025),
            Path::new("/run/vm/v.sock_1025")
        );
    }
}
