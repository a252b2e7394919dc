//! The control messages, one JSON object per control frame.
//!
//! Every enum is internally tagged (`"type"`), and the two that a newer
//! peer may extend ([`Request`], [`ClientMessage`]) have a catch-all
//! `Unknown` variant, so an unknown request decodes and gets an
//! [`ErrorCode::UnknownRequest`] reply instead of breaking the connection.

use serde::{Deserialize, Serialize};

use crate::oci::MainProcess;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 2;
/// The oldest protocol version this crate still speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 1;
/// The first version with exec stdin flow control
/// ([`AgentMessage::StdinCredit`]).
pub const STDIN_CREDIT_VERSION: u32 = 2;
/// Stdin bytes a client may send an exec (from protocol version
/// [`STDIN_CREDIT_VERSION`] on) beyond what the agent has credited back.
pub const STDIN_WINDOW: u64 = 1024 * 1024;
/// The vsock port the agent listens on in the guest.
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// The host vsock port the agent connects to to announce readiness and the
/// main process's exit (with the hybrid vsock: the host Unix socket
/// `<vsock uds path>_1025`).
pub const EVENT_VSOCK_PORT: u32 = 1025;

/// First message of every connection, client → agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Oldest version the client speaks.
    pub min_version: u32,
    /// Newest version the client speaks.
    pub max_version: u32,
    /// Free-form client name, for logs.
    #[serde(default)]
    pub client: String,
    /// The client's wall clock when it sent the hello, in nanoseconds
    /// since the Unix epoch. A thin VM's agent (PID 1 of a VM) sets the
    /// guest's clock from it when the two are more than
    /// [`CLOCK_SLACK_MS`] apart: a VM restored from a snapshot wakes with
    /// the time it was saved at, and a thin VM keeps the host's time as a
    /// container does. Older clients send none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_ns: Option<u64>,
}

/// How far a thin VM's clock may be from a client's before the agent sets
/// it (see [`Hello::time_ns`]).
pub const CLOCK_SLACK_MS: u64 = 200;

impl Hello {
    /// The hello of this crate's version range, with this host's time.
    pub fn current(client: &str) -> Self {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            client: client.to_string(),
            time_ns: now.ok().and_then(|d| u64::try_from(d.as_nanos()).ok()),
        }
    }
}

/// The agent's answer to [`Hello`] (and its identity in pings and events).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version chosen for this connection.
    pub version: u32,
    /// The agent's own version.
    pub agent: String,
    /// Whether the agent runs as PID 1 (thin VM init).
    #[serde(default)]
    pub pid1: bool,
}

/// Picks the protocol version for a hello, if the ranges overlap.
pub fn negotiate(hello: &Hello) -> Option<u32> {
    let v = hello.max_version.min(PROTOCOL_VERSION);
    (v >= hello.min_version && v >= MIN_PROTOCOL_VERSION).then_some(v)
}

/// Control messages from the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// Version handshake; must come first.
    Hello(Hello),
    /// A request, with the id its replies and data frames carry.
    Request {
        /// Request id, chosen by the client.
        id: u64,
        /// The request.
        request: Request,
    },
    /// The header of the next entry of a pushed file tree.
    Entry {
        /// Id of the push request.
        id: u64,
        /// The entry.
        entry: FileEntry,
    },
    /// The end of a pushed file tree.
    EndOfEntries {
        /// Id of the push request.
        id: u64,
    },
    /// A message type this version does not know.
    #[serde(other)]
    Unknown,
}

/// Control messages from the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// Answer to [`Hello`].
    Welcome(Welcome),
    /// A reply to a request.
    Reply {
        /// Id of the request.
        id: u64,
        /// The reply.
        reply: Reply,
    },
    /// The header of the next entry of a pulled file tree.
    Entry {
        /// Id of the pull request.
        id: u64,
        /// The entry.
        entry: FileEntry,
    },
    /// An unsolicited event (on the event connection).
    Event {
        /// The event.
        event: Event,
    },
    /// The exec `id` passed `bytes` more bytes of stdin to its process: the
    /// client may send that many more (protocol version 2 on; see
    /// [`STDIN_WINDOW`]). Never sent after the exec's `exec_exit`.
    StdinCredit {
        /// Id of the exec request.
        id: u64,
        /// Bytes written to the process (or dropped, once it closed its
        /// stdin).
        bytes: u64,
    },
    /// A message type this version does not know.
    #[serde(other)]
    Unknown,
}

/// What the host asks of the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Liveness and version; replies [`Reply::Pong`].
    Ping,
    /// Runs a process; replies [`Reply::ExecStarted`], output data frames,
    /// then [`Reply::ExecExit`].
    Exec(ExecRequest),
    /// Sends a signal to the exec running under the same id.
    Signal {
        /// Signal number.
        signal: i32,
    },
    /// Resizes the TTY of the exec running under the same id.
    Resize(WindowSize),
    /// Writes a file tree (entries and data frames follow); replies `Ok`.
    Push(PushRequest),
    /// Reads a file tree; the agent sends entries and data, then `Ok`.
    Pull(PullRequest),
    /// Mounts a filesystem; replies `Ok`.
    Mount(MountRequest),
    /// Unmounts a filesystem; replies `Ok`.
    Unmount(UnmountRequest),
    /// Configures networking, hostname, hosts and resolv.conf; replies `Ok`.
    Network(NetworkConfig),
    /// Gives an interface another MAC address; replies `Ok`.
    SetMac(MacRequest),
    /// Powers the guest off or reboots it; replies `Ok` first.
    Power(PowerRequest),
    /// Starts the main process (thin VM); replies `ExecStarted`.
    StartMain(MainProcess),
    /// Stops the main process: its stop signal, then SIGKILL after the
    /// timeout; replies `MainExited`.
    StopMain {
        /// Seconds between the stop signal and SIGKILL.
        timeout_secs: u64,
    },
    /// Waits for the main process to exit; replies `MainExited`.
    WaitMain,
    /// A request this version does not know.
    #[serde(other)]
    Unknown,
}

/// Replies from the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// The request succeeded.
    Ok,
    /// Answer to [`Request::Ping`].
    Pong(Welcome),
    /// The process started.
    ExecStarted {
        /// Its pid in the guest.
        pid: i32,
    },
    /// The process ended; all its output was sent before this.
    ExecExit {
        /// How it ended.
        status: ExitStatus,
    },
    /// The main process ended.
    MainExited {
        /// How it ended.
        status: ExitStatus,
    },
    /// The request failed.
    Error(ErrorReply),
}

/// A failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Machine-readable kind.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

/// Kinds of failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request type is unknown to this agent.
    UnknownRequest,
    /// The message was malformed or out of place.
    BadRequest,
    /// No common protocol version.
    UnsupportedVersion,
    /// Another request is still running on this connection.
    Busy,
    /// A path, process or device does not exist.
    NotFound,
    /// Permission denied.
    PermissionDenied,
    /// An operating-system call failed.
    Io,
    /// Not available in this guest.
    Unsupported,
    /// A code from a newer version.
    #[serde(other)]
    Other,
}

/// Unsolicited events, sent by the agent on the event connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The agent is up and serving.
    Ready(Welcome),
    /// The main process ended; the guest powers off or restarts it next.
    MainExited {
        /// How it ended.
        status: ExitStatus,
        /// Whether the agent restarts it (restart policy).
        restarting: bool,
    },
    /// An event from a newer version.
    #[serde(other)]
    Unknown,
}

/// A process to run.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Environment, `KEY=VALUE`; a default `PATH` is added if missing.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory (default `/`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Identity (default: the agent's).
    #[serde(default)]
    pub user: Option<User>,
    /// Run on a new TTY of this size (stdout carries the TTY output,
    /// stderr is unused); `None`: separate pipes.
    #[serde(default)]
    pub tty: Option<WindowSize>,
    /// Whether stdin data follows; without it stdin is `/dev/null`.
    #[serde(default)]
    pub stdin: bool,
}

/// A process identity.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct User {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary groups.
    #[serde(default)]
    pub additional_gids: Vec<u32>,
}

/// A TTY size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExitStatus {
    /// It exited with this code.
    Exited {
        /// Exit code.
        code: i32,
    },
    /// A signal killed it.
    Signaled {
        /// Signal number.
        signal: i32,
    },
}

impl ExitStatus {
    /// The shell's view: the code, or 128 + signal.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Exited { code } => code,
            ExitStatus::Signaled { signal } => 128 + signal,
        }
    }

    /// Decodes a `waitpid` status word.
    pub fn from_wait_status(status: i32) -> Self {
        if libc::WIFSIGNALED(status) {
            ExitStatus::Signaled {
                signal: libc::WTERMSIG(status),
            }
        } else {
            ExitStatus::Exited {
                code: libc::WEXITSTATUS(status),
            }
        }
    }
}

/// One entry of a file-tree stream. A regular file's contents follow as
/// data frames on [`crate::Channel::File`], ended by an empty one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the tree's root, `/`-separated; empty for the root.
    pub path: String,
    /// What it is.
    pub kind: EntryKind,
    /// Permission bits (`0o7777` at most).
    pub mode: u32,
    /// Owner to set, if any.
    #[serde(default)]
    pub uid: Option<u32>,
    /// Group to set, if any.
    #[serde(default)]
    pub gid: Option<u32>,
}

/// Kinds of file-tree entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EntryKind {
    /// A regular file of this size.
    File {
        /// Size in bytes.
        size: u64,
    },
    /// A directory; its entries follow.
    Dir,
    /// A symbolic link.
    Symlink {
        /// Its target, as stored.
        target: String,
    },
}

/// Where a pushed tree goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushRequest {
    /// Absolute guest path of the tree's root.
    pub path: String,
    /// Create missing parent directories.
    #[serde(default)]
    pub parents: bool,
}

/// What to pull.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequest {
    /// Absolute guest path (a file, directory or symlink).
    pub path: String,
}

/// A mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRequest {
    /// A virtio-fs tag, a block device path, or a source for `fstype`.
    pub source: String,
    /// Absolute guest path; created if missing.
    pub target: String,
    /// Filesystem type (`virtiofs`, `ext4`, ...).
    pub fstype: String,
    /// mount(8)-style options (`ro`, `nosuid`, ..., others go to the fs).
    #[serde(default)]
    pub options: Vec<String>,
}

/// An unmount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmountRequest {
    /// Absolute guest path.
    pub target: String,
    /// Detach now, clean up when no longer busy.
    #[serde(default)]
    pub lazy: bool,
}

/// A new MAC address for an interface: for a clone restored from a
/// snapshot onto another NIC identity (Linux reads a virtio NIC's MAC only
/// when it probes the device, so the guest goes on with the snapshot's
/// until told). The DHCP lease the agent renews on the interface is
/// dropped (it is the old address's): follow with a `network` request for
/// `dhcp` to lease again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MacRequest {
    /// Interface (default `eth0`).
    #[serde(default)]
    pub interface: Option<String>,
    /// The address, `52:54:00:12:34:56`.
    pub mac: String,
}

/// Network set-up of one interface plus name resolution.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// Interface (default `eth0`).
    #[serde(default)]
    pub interface: Option<String>,
    /// How the interface gets its address.
    #[serde(default)]
    pub addressing: Addressing,
    /// MTU to set.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Name servers for resolv.conf (written when not empty).
    #[serde(default)]
    pub dns: Vec<String>,
    /// Search domains for resolv.conf.
    #[serde(default)]
    pub search: Vec<String>,
    /// Hostname to set (also added to /etc/hosts).
    #[serde(default)]
    pub hostname: Option<String>,
    /// Extra /etc/hosts lines.
    #[serde(default)]
    pub hosts: Vec<HostEntry>,
}

/// How an interface gets its address.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum Addressing {
    /// Leave the address alone.
    #[default]
    Unchanged,
    /// A fixed address.
    Static {
        /// IPv4 address with prefix, `10.0.0.2/24`.
        address: String,
        /// Default gateway.
        #[serde(default)]
        gateway: Option<String>,
    },
    /// Ask a DHCP server (the agent's own DHCP client: the lease sets the
    /// address, netmask, default route, MTU unless `mtu` is given and
    /// resolv.conf unless `dns` is given; renewed in the background).
    Dhcp,
}

/// One /etc/hosts line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostEntry {
    /// Address.
    pub address: String,
    /// Names.
    pub names: Vec<String>,
}

/// A power request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowerRequest {
    /// What to do.
    pub action: PowerAction,
}

/// Power actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerAction {
    /// Stop processes, sync, power off.
    Poweroff,
    /// Stop processes, sync, reboot.
    Reboot,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_request_and_message_decode_to_unknown() {
        let m: ClientMessage = serde_json::from_str(
            r#"{"type":"request","id":7,"request":{"type":"frobnicate","x":[1,2]}}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            ClientMessage::Request {
                id: 7,
                request: Request::Unknown
            }
        );
        let m: ClientMessage = serde_json::from_str(r#"{"type":"teleport","to":"mars"}"#).unwrap();
        assert_eq!(m, ClientMessage::Unknown);
        let e: ErrorCode = serde_json::from_str(r#""quota_exceeded""#).unwrap();
        assert_eq!(e, ErrorCode::Other);
    }

    #[test]
    fn exec_request_defaults_and_wire_shape() {
        let m: ClientMessage = serde_json::from_str(
            r#"{"type":"request","id":1,"request":{"type":"exec","argv":["true"]}}"#,
        )
        .unwrap();
        let want = ExecRequest {
            argv: vec!["true".into()],
            ..Default::default()
        };
        assert_eq!(
            m,
            ClientMessage::Request {
                id: 1,
                request: Request::Exec(want)
            }
        );
        let reply = AgentMessage::Reply {
            id: 1,
            reply: Reply::ExecExit {
                status: ExitStatus::Signaled { signal: 9 },
            },
        };
        let s = serde_json::to_string(&reply).unwrap();
        assert_eq!(
            s,
            r#"{"type":"reply","id":1,"reply":{"type":"exec_exit","status":{"kind":"signaled","signal":9}}}"#
        );
        assert_eq!(serde_json::from_str::<AgentMessage>(&s).unwrap(), reply);
        let credit = AgentMessage::StdinCredit {
            id: 4,
            bytes: 65536,
        };
        let s = serde_json::to_string(&credit).unwrap();
        assert_eq!(s, r#"{"type":"stdin_credit","id":4,"bytes":65536}"#);
        assert_eq!(serde_json::from_str::<AgentMessage>(&s).unwrap(), credit);
    }

    #[test]
    fn negotiation_picks_highest_common_version() {
        let table = [
            ((1, 1), Some(1)),
            ((1, 9), Some(2)),
            ((2, 3), Some(2)),
            ((3, 4), None),
            ((0, 0), None),
        ];
        for ((min, max), want) in table {
            let h = Hello {
                min_version: min,
                max_version: max,
                client: String::new(),
                time_ns: None,
            };
            assert_eq!(negotiate(&h), want, "{min}..{max}");
        }
    }

    #[test]
    fn exit_status_from_wait_status() {
        assert_eq!(
            ExitStatus::from_wait_status(3 << 8),
            ExitStatus::Exited { code: 3 }
        );
        assert_eq!(
            ExitStatus::from_wait_status(9),
            ExitStatus::Signaled { signal: 9 }
        );
        assert_eq!(ExitStatus::Signaled { signal: 15 }.code(), 143);
    }

    #[test]
    fn every_request_round_trips() {
        let reqs = vec![
            Request::Ping,
            Request::Signal { signal: 15 },
            Request::Resize(WindowSize {
                rows: 50,
                cols: 132,
            }),
            Request::Push(PushRequest {
                path: "/a".into(),
                parents: true,
            }),
            Request::Pull(PullRequest { path: "/a".into() }),
            Request::Mount(MountRequest {
                source: "data".into(),
                target: "/mnt".into(),
                fstype: "virtiofs".into(),
                options: vec!["ro".into()],
            }),
            Request::Unmount(UnmountRequest {
                target: "/mnt".into(),
                lazy: true,
            }),
            Request::Network(NetworkConfig {
                addressing: Addressing::Static {
                    address: "10.0.0.2/24".into(),
                    gateway: Some("10.0.0.1".into()),
                },
                ..Default::default()
            }),
            Request::SetMac(MacRequest {
                interface: None,
                mac: "52:54:00:12:34:56".into(),
            }),
            Request::Power(PowerRequest {
                action: PowerAction::Reboot,
            }),
            Request::StopMain { timeout_secs: 10 },
            Request::WaitMain,
        ];
        for r in reqs {
            let m = ClientMessage::Request { id: 3, request: r };
            let s = serde_json::to_string(&m).unwrap();
            assert_eq!(serde_json::from_str::<ClientMessage>(&s).unwrap(), m, "{s}");
        }
    }
}
