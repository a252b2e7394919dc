//! The host side of Skiff's guest agent protocol (see `skiff_agent_proto`
//! for the wire format), async on tokio.
//!
//! ```no_run
//! # async fn f() -> Result<(), skiff_agent_client::ClientError> {
//! use skiff_agent_client::{AgentClient, Transport};
//! use skiff_agent_proto::ExecRequest;
//! let agent = AgentClient::new(Transport::vsock("/run/skiff/vm1/vsock.sock"));
//! agent.ping().await?;
//! let out = agent.exec_output(ExecRequest { argv: vec!["uname".into(), "-a".into()], ..Default::default() }, None).await?;
//! assert_eq!(out.status.code(), 0);
//! # Ok(()) }
//! ```
//!
//! Every operation opens its own connection (so operations run
//! concurrently without head-of-line blocking), and nothing waits forever
//! on a silent agent: connecting and the handshake are bounded by
//! [`Timeouts::connect`], every reply and every frame of a transfer by
//! [`Timeouts::request`]. Only an exec's output, and its stdin while the
//! process does not read it (back-pressure), wait as long as the process
//! runs, and [`Timeouts::exec`] can bound that too.

#[cfg(feature = "conformance")]
pub mod conformance;
pub mod conn;
pub mod events;
pub mod exec;
pub mod files;
pub mod latency;
pub mod transport;

#[cfg(test)]
mod fake_agent;
#[cfg(test)]
mod hostile_tests;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use skiff_agent_proto::tree::TreeError;
use skiff_agent_proto::{
    ErrorReply, ExecRequest, ExitStatus, FrameError, MacRequest, MainProcess, MountRequest,
    NetworkConfig, PowerAction, PowerRequest, Reply, Request, UnmountRequest, Welcome,
};

pub use conn::Connection;
pub use events::{EventListener, EventStream};
pub use exec::{ExecControl, ExecEvent, ExecOutput, ExecSession};
pub use files::{PullOptions, PushOptions};
pub use transport::{Transport, TransportError};

/// Errors of talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent could not be reached.
    #[error("reaching the agent")]
    Transport(#[from] TransportError),
    /// The agent did not answer in time.
    #[error("agent timed out: {0}")]
    Timeout(&'static str),
    /// The connection failed.
    #[error("connection to the agent")]
    Io(#[source] io::Error),
    /// The agent closed the connection.
    #[error("the agent closed the connection")]
    Closed,
    /// A frame could not be encoded or decoded.
    #[error("bad frame")]
    Frame(#[from] FrameError),
    /// The agent answered with an error.
    #[error("agent error ({:?}): {}", .0.code, .0.message)]
    Agent(ErrorReply),
    /// The agent answered something out of place.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A local file could not be read or written.
    #[error("{}", .0.display())]
    Local(PathBuf, #[source] io::Error),
    /// A local file tree could not be read or written.
    #[error("local file tree")]
    Tree(#[from] TreeError),
    /// The exec has ended: its stdin takes nothing more.
    #[error("the exec has ended")]
    ExecEnded,
    /// The agent sent more than this client takes (see [`Limits`]); the
    /// connection was dropped.
    #[error("the agent sent too much: {0}")]
    Overflow(String),
}

/// Time limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Connecting plus the version handshake.
    pub connect: Duration,
    /// Each reply, and each frame of a transfer.
    pub request: Duration,
    /// A whole exec, from start to exit (`None`: as long as it runs).
    pub exec: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(10),
            request: Duration::from_secs(30),
            exec: None,
        }
    }
}

/// Caps on what the agent (the guest, which may be hostile) can make this
/// client hold in memory or write to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Output bytes [`ExecSession::output`] (and so
    /// [`AgentClient::exec_output`]) collects, stdout and stderr together.
    pub exec_output: u64,
    /// Entries of a pulled tree.
    pub pull_entries: u64,
    /// File bytes of a pulled tree, all files together.
    pub pull_bytes: u64,
}

impl Default for Limits {
    /// 256 MiB of collected exec output; a million entries and 64 GiB for
    /// a pull.
    fn default() -> Self {
        Limits {
            exec_output: 256 << 20,
            pull_entries: skiff_agent_proto::tree::DEFAULT_MAX_ENTRIES,
            pull_bytes: 64 << 30,
        }
    }
}

/// A handle on one guest's agent; cheap to clone.
#[derive(Debug, Clone)]
pub struct AgentClient {
    transport: Transport,
    timeouts: Timeouts,
    limits: Limits,
}

impl AgentClient {
    /// A client with the default timeouts.
    pub fn new(transport: Transport) -> Self {
        AgentClient {
            transport,
            timeouts: Timeouts::default(),
            limits: Limits::default(),
        }
    }

    /// The same client with other limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The same client with other timeouts.
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Where the agent is.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// Opens a connection (for several requests in a row).
    pub async fn connect(&self) -> Result<Connection, ClientError> {
        let mut conn = Connection::open(&self.transport, self.timeouts).await?;
        conn.limits = self.limits;
        Ok(conn)
    }

    async fn simple(&self, request: Request) -> Result<Reply, ClientError> {
        self.connect().await?.request(request).await
    }

    async fn expect_ok(&self, request: Request) -> Result<(), ClientError> {
        match self.simple(request).await? {
            Reply::Ok => Ok(()),
            other => Err(ClientError::Protocol(format!(
                "expected ok, got {}",
                describe_reply(&other)
            ))),
        }
    }

    /// Checks the agent answers; its identity.
    pub async fn ping(&self) -> Result<Welcome, ClientError> {
        match self.simple(Request::Ping).await? {
            Reply::Pong(w) => Ok(defang_welcome(w)),
            other => Err(ClientError::Protocol(format!(
                "expected pong, got {}",
                describe_reply(&other)
            ))),
        }
    }

    /// Starts a process; stream its events and feed it through the session.
    pub async fn exec(&self, request: ExecRequest) -> Result<ExecSession, ClientError> {
        ExecSession::start(self.connect().await?, Request::Exec(request)).await
    }

    /// Runs a process to the end with `stdin` (if any) and collects its
    /// output, within [`Timeouts::exec`] if set.
    pub async fn exec_output(
        &self,
        mut request: ExecRequest,
        stdin: Option<Vec<u8>>,
    ) -> Result<ExecOutput, ClientError> {
        request.stdin = stdin.is_some();
        let run = async {
            let session = self.exec(request).await?;
            let feeder = stdin.map(|data| {
                let ctl = session.control();
                tokio::spawn(async move {
                    ctl.write_stdin(&data).await?;
                    ctl.close_stdin().await
                })
            });
            let out = session.output().await?;
            if let Some(f) = feeder {
                // A process may exit without reading all of its stdin.
                let _ = f.await;
            }
            Ok(out)
        };
        match self.timeouts.exec {
            Some(limit) => tokio::time::timeout(limit, run)
                .await
                .map_err(|_| ClientError::Timeout("exec"))?,
            None => run.await,
        }
    }

    /// Copies the local file or tree at `local` to `remote` in the guest.
    pub async fn push(
        &self,
        local: &Path,
        remote: &str,
        opts: &PushOptions,
    ) -> Result<(), ClientError> {
        files::push(&mut self.connect().await?, local, remote, opts).await
    }

    /// Copies the guest's file or tree at `remote` to `local`.
    pub async fn pull(
        &self,
        remote: &str,
        local: &Path,
        opts: &PullOptions,
    ) -> Result<(), ClientError> {
        files::pull(&mut self.connect().await?, remote, local, opts).await
    }

    /// Mounts a filesystem in the guest (e.g. a virtio-fs tag).
    pub async fn mount(&self, request: MountRequest) -> Result<(), ClientError> {
        self.expect_ok(Request::Mount(request)).await
    }

    /// Unmounts a filesystem in the guest.
    pub async fn unmount(&self, request: UnmountRequest) -> Result<(), ClientError> {
        self.expect_ok(Request::Unmount(request)).await
    }

    /// Configures the guest's network and names.
    pub async fn configure_network(&self, config: NetworkConfig) -> Result<(), ClientError> {
        self.expect_ok(Request::Network(config)).await
    }

    /// Gives the guest's `interface` (default eth0) the MAC `mac` (a clone
    /// restored from a snapshot onto another NIC); follow with
    /// [`AgentClient::configure_network`] for a new lease.
    pub async fn set_mac(&self, interface: Option<&str>, mac: &str) -> Result<(), ClientError> {
        let req = MacRequest {
            interface: interface.map(str::to_string),
            mac: mac.to_string(),
        };
        self.expect_ok(Request::SetMac(req)).await
    }

    /// Powers the guest off or reboots it (the agent answers first).
    pub async fn power(&self, action: PowerAction) -> Result<(), ClientError> {
        self.expect_ok(Request::Power(PowerRequest { action }))
            .await
    }

    /// Starts the thin VM's main process; its pid.
    pub async fn start_main(&self, process: MainProcess) -> Result<i32, ClientError> {
        match self.simple(Request::StartMain(process)).await? {
            Reply::ExecStarted { pid } => Ok(pid),
            other => Err(ClientError::Protocol(format!(
                "expected exec_started, got {}",
                describe_reply(&other)
            ))),
        }
    }

    /// Stops the main process (stop signal, SIGKILL after `grace`).
    pub async fn stop_main(&self, grace: Duration) -> Result<ExitStatus, ClientError> {
        let mut conn = self.connect().await?;
        let id = conn.new_id();
        let request = Request::StopMain {
            timeout_secs: grace.as_secs(),
        };
        conn.send(&skiff_agent_proto::ClientMessage::Request { id, request })
            .await?;
        main_status(conn.reply(id, Some(grace + self.timeouts.request)).await?)
    }

    /// Waits (without a time limit) until the main process exits.
    pub async fn wait_main(&self) -> Result<ExitStatus, ClientError> {
        let mut conn = self.connect().await?;
        let id = conn.new_id();
        conn.send(&skiff_agent_proto::ClientMessage::Request {
            id,
            request: Request::WaitMain,
        })
        .await?;
        main_status(conn.reply(id, None).await?)
    }

    /// Sends a request body this client does not model (tests, newer
    /// agents) on a new connection.
    pub async fn raw_request(&self, request: Value) -> Result<Reply, ClientError> {
        self.connect().await?.raw_request(request).await
    }
}

/// Longest agent error message kept, in bytes.
const MAX_AGENT_MESSAGE: usize = 4096;
/// Longest agent name kept from a welcome, in bytes.
const MAX_AGENT_NAME: usize = 128;

/// Text from the agent, fit to show: at most `max` bytes, control
/// characters (terminal escapes) replaced.
pub(crate) fn defang(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for c in text.chars() {
        if out.len() + c.len_utf8() > max {
            out.push_str("[...]");
            break;
        }
        out.push(if c.is_control() { '\u{fffd}' } else { c });
    }
    out
}

/// An error reply from the agent as an error of this client, its message
/// shortened and defanged.
pub(crate) fn agent_error(mut e: ErrorReply) -> ClientError {
    e.message = defang(&e.message, MAX_AGENT_MESSAGE);
    ClientError::Agent(e)
}

/// A frame from the agent, briefly and defanged, for a protocol error (a
/// data frame's bytes are not printed).
pub(crate) fn describe(
    frame: &skiff_agent_proto::Frame<skiff_agent_proto::AgentMessage>,
) -> String {
    match frame {
        skiff_agent_proto::Frame::Data(d) => format!(
            "data frame (id {}, {:?}, {} bytes)",
            d.id,
            d.channel,
            d.bytes.len()
        ),
        skiff_agent_proto::Frame::Control(m) => defang(&format!("{m:?}"), 512),
    }
}

/// A reply from the agent, briefly and defanged, for a protocol error.
pub(crate) fn describe_reply(reply: &Reply) -> String {
    defang(&format!("{reply:?}"), 512)
}

/// A welcome (or pong) from the agent with its name defanged.
pub(crate) fn defang_welcome(mut w: Welcome) -> Welcome {
    w.agent = defang(&w.agent, MAX_AGENT_NAME);
    w
}

fn main_status(reply: Reply) -> Result<ExitStatus, ClientError> {
    match reply {
        Reply::MainExited { status } => Ok(status),
        other => Err(ClientError::Protocol(format!(
            "expected main_exited, got {}",
            describe_reply(&other)
        ))),
    }
}
