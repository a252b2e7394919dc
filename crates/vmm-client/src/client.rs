//! A blocking client for skiff-vmm's control socket: one HTTP/1.1 request
//! per connection (`Connection: close`), JSON in and out.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::types::*;

/// Largest reply the client reads.
const MAX_REPLY: u64 = 4 << 20;
/// Longest status or header line the client reads.
const MAX_LINE: u64 = 8 << 10;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket (the VMM is not running).
    #[error("cannot connect to skiff-vmm's control socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The connection broke or timed out.
    #[error("control socket {path}: {what}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What the client was doing.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The VMM answered with an error.
    #[error("skiff-vmm refused {request} ({status}): {message}")]
    Refused {
        /// The request, e.g. `PUT vm.add-disk`.
        request: String,
        /// The HTTP status.
        status: u16,
        /// The VMM's explanation.
        message: String,
    },
    /// The reply is not what the protocol says.
    #[error("control socket {path}: malformed reply: {why}")]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
}

/// A client for one VMM's control socket.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

/// A reply: status and body.
struct Reply {
    status: u16,
    body: Vec<u8>,
}

impl Client {
    /// A client for the socket at `path`, with a 30 s limit per request
    /// (a device removal waits for the guest for up to 10 s).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), timeout: Duration::from_secs(30) }
    }

    /// Changes the per-request time limit.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The socket this client talks to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
        move |source| ClientError::Io { path: self.path.clone(), what, source }
    }

    fn protocol(&self, why: impl Into<String>) -> ClientError {
        ClientError::Protocol { path: self.path.clone(), why: why.into() }
    }

    /// Sends one request; `body` is JSON or empty.
    fn send(&self, method: &str, endpoint: &str, body: &[u8]) -> Result<Reply, ClientError> {
        let mut s = UnixStream::connect(&self.path)
            .map_err(|source| ClientError::Connect { path: self.path.clone(), source })?;
        s.set_read_timeout(Some(self.timeout)).map_err(self.io("set a timeout"))?;
        s.set_write_timeout(Some(self.timeout)).map_err(self.io("set a timeout"))?;
        let mut req = format!("{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        s.write_all(req.as_bytes()).map_err(self.io("send the request"))?;
        s.write_all(body).map_err(self.io("send the request"))?;
        let mut r = BufReader::new(s.take(MAX_REPLY + MAX_LINE * 32));
        let status_line = self.line(&mut r)?;
        let mut parts = status_line.splitn(3, ' ');
        let (version, code) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if !version.starts_with("HTTP/1.") {
            return Err(self.protocol(format!("status line {status_line:?}")));
        }
        let status: u16 = code.parse().map_err(|_| self.protocol(format!("status line {status_line:?}")))?;
        let mut length: Option<u64> = None;
        loop {
            let line = self.line(&mut r)?;
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.trim().eq_ignore_ascii_case("content-length") {
                    let n = value.trim().parse().map_err(|_| self.protocol(format!("header {line:?}")))?;
                    length = Some(n);
                }
            }
        }
        let length = length.unwrap_or(0);
        if length > MAX_REPLY {
            return Err(self.protocol(format!("a {length}-byte body is more than {MAX_REPLY}")));
        }
        let mut body = vec![0; length as usize];
        r.read_exact(&mut body).map_err(self.io("read the reply"))?;
        Ok(Reply { status, body })
    }

    fn line(&self, r: &mut impl BufRead) -> Result<String, ClientError> {
        let mut line = Vec::new();
        r.take(MAX_LINE).read_until(b'\n', &mut line).map_err(self.io("read the reply"))?;
        if !line.ends_with(b"\n") {
            return Err(self.protocol("the reply ended early or has an overlong line"));
        }
        let s = String::from_utf8(line).map_err(|_| self.protocol("a header is not UTF-8"))?;
        Ok(s.trim_end_matches(['\r', '\n']).to_string())
    }

    fn call(&self, method: &str, endpoint: &str, body: Option<&impl Serialize>) -> Result<Vec<u8>, ClientError> {
        let body = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| self.protocol(format!("cannot encode the request: {e}")))?,
            None => Vec::new(),
        };
        let reply = self.send(method, endpoint, &body)?;
        if (200..300).contains(&reply.status) {
            return Ok(reply.body);
        }
        let message = serde_json::from_slice::<ErrorBody>(&reply.body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&reply.body).into_owned());
        Err(ClientError::Refused { request: format!("{method} {endpoint}"), status: reply.status, message })
    }

    fn get<T: DeserializeOwned>(&self, endpoint: &str) -> Result<T, ClientError> {
        let body = self.call("GET", endpoint, None::<&()>)?;
        serde_json::from_slice(&body).map_err(|e| self.protocol(format!("{endpoint}: {e}")))
    }

    fn put<T: DeserializeOwned>(&self, endpoint: &str, body: &impl Serialize) -> Result<T, ClientError> {
        let body = self.call("PUT", endpoint, Some(body))?;
        serde_json::from_slice(&body).map_err(|e| self.protocol(format!("{endpoint}: {e}")))
    }

    fn put_empty(&self, endpoint: &str, body: Option<&impl Serialize>) -> Result<(), ClientError> {
        self.call("PUT", endpoint, body).map(drop)
    }

    /// Whether the VMM answers, and its version and pid.
    pub fn ping(&self) -> Result<Ping, ClientError> {
        self.get("vmm.ping")
    }

    /// State, vCPUs, memory and devices.
    pub fn info(&self) -> Result<VmInfo, ClientError> {
        self.get("vm.info")
    }

    /// VM exits and per-device I/O counters.
    pub fn counters(&self) -> Result<Counters, ClientError> {
        self.get("vm.counters")
    }

    /// Parks every vCPU and device worker; returns once they are parked.
    pub fn pause(&self) -> Result<(), ClientError> {
        self.put_empty("vm.pause", None::<&()>)
    }

    /// Lets a paused VM run again.
    pub fn resume(&self) -> Result<(), ClientError> {
        self.put_empty("vm.resume", None::<&()>)
    }

    /// Presses the ACPI power button: the guest shuts down by itself (the
    /// VMM exits when it powers off). Returns at once.
    pub fn shutdown(&self) -> Result<(), ClientError> {
        self.put_empty("vm.shutdown", None::<&()>)
    }

    /// Ends the VM now, as pulling the plug would; the VMM exits with 0.
    pub fn power_off(&self) -> Result<(), ClientError> {
        self.put_empty("vm.power-off", None::<&()>)
    }

    /// Hot-plugs a disk.
    pub fn add_disk(&self, spec: &DiskSpec) -> Result<DeviceAdded, ClientError> {
        self.put("vm.add-disk", spec)
    }

    /// Hot-plugs a NIC.
    pub fn add_net(&self, spec: &NetSpec) -> Result<DeviceAdded, ClientError> {
        self.put("vm.add-net", spec)
    }

    /// Hot-plugs a virtio-fs share.
    pub fn add_fs(&self, spec: &FsSpec) -> Result<DeviceAdded, ClientError> {
        self.put("vm.add-fs", spec)
    }

    /// Hot-plugs a vsock device.
    pub fn add_vsock(&self, spec: &VsockSpec) -> Result<DeviceAdded, ClientError> {
        self.put("vm.add-vsock", spec)
    }

    /// Asks the guest to eject device `id` and removes it once it has; an
    /// error if the guest does not let go in time (the device then stays).
    pub fn remove_device(&self, id: &str) -> Result<(), ClientError> {
        self.put_empty("vm.remove-device", Some(&RemoveDevice { id: id.to_string() }))
    }

    /// Changes the number of vCPUs or the memory size.
    pub fn resize(&self, resize: &Resize) -> Result<(), ClientError> {
        self.put_empty("vm.resize", Some(resize))
    }

    /// Saves the paused VM into `destination` (state and memory files);
    /// `skiff-vmm --restore DIR` brings it back.
    pub fn snapshot(&self, destination: &Path) -> Result<SnapshotSaved, ClientError> {
        self.put("vm.snapshot", &Snapshot { destination: destination.to_path_buf() })
    }
}
