//! The protocol between the host (`skiff-agent-client`) and the guest agent
//! (`skiff-agent`).
//!
//! # Transport
//! A byte stream: vsock port [`AGENT_VSOCK_PORT`] (1024) in the guest, which
//! the host reaches through the VMM's hybrid vsock socket (`CONNECT 1024\n`,
//! answered `OK <port>\n`), or a plain Unix socket in host tests.
//!
//! # Frames
//! `len:u32be kind:u8 payload`; kind 1 is a JSON control message
//! ([`ClientMessage`] host → guest, [`AgentMessage`] guest → host), kind 2 a
//! data chunk `id:u64be channel:u8 bytes` (see [`frame`]). Frames are capped
//! at [`MAX_FRAME_LEN`]; a sender cuts data into chunks of at most
//! [`MAX_DATA_CHUNK`], so nothing is ever buffered whole. An empty data
//! chunk ends its stream.
//!
//! # Connections and request ids
//! Every connection starts with [`ClientMessage::Hello`] (the client's
//! version range and wall clock, which a thin VM's agent sets the guest's
//! clock from when they differ: see [`Hello::time_ns`]) answered by [`AgentMessage::Welcome`] (the chosen
//! version) or an `unsupported_version` error reply with id 0 and a close.
//! Then the connection carries requests **one at a time**: each has a
//! client-chosen id, and every reply, entry and data frame of that request
//! carries it; the request is over with its final reply (`ok`, `pong`,
//! `exec_exit`, `main_exited` or `error`), and the next may follow.
//! Concurrency comes from opening more connections (vsock connections are
//! cheap), which gives each stream its own flow control for free: a slow
//! reader of one exec's output never stalls another exec.
//!
//! # Requests
//! - `ping` → `pong` (agent version, protocol version, PID-1 mode).
//! - `exec` → `exec_started {pid}`, then `stdout`/`stderr` data, then
//!   `exec_exit {status}` once all output was sent. While it runs the client
//!   sends `stdin` data (empty chunk: EOF), and `signal` and `resize`
//!   requests under the **same id** (they get no reply). From version 2
//!   stdin is flow-controlled, so a process that does not read it never
//!   blocks the connection (signals and resizes still get through): the
//!   client sends at most [`STDIN_WINDOW`] bytes beyond what the agent
//!   credited back with `stdin_credit {id, bytes}` messages, which it
//!   sends as it writes stdin to the process. A command that
//!   cannot be found answers like a container runtime: a message on stderr
//!   and exit code 127 (126 if it is not executable).
//! - `push {path}` → the client sends `entry` messages, each regular file's
//!   bytes as `file` data ending with an empty chunk, then
//!   `end_of_entries`; the agent replies `ok` or `error` at the end (an
//!   error while writing makes it skip the rest, so the stream stays in
//!   step). `pull {path}` is the mirror image, ending with `ok`.
//! - `mount`, `unmount`, `network`, `set_mac`, `power` → `ok` or `error`.
//! - `start_main`, `stop_main`, `wait_main`: the thin VM's main process.
//! - anything unknown → `error {code: unknown_request}`; a malformed message
//!   → `error {code: bad_request}`; the connection stays usable.
//!
//! # Events
//! The agent connects to the host's vsock port [`EVENT_VSOCK_PORT`] (with
//! the hybrid vsock: the host listens on `<uds>_1025`) and sends
//! [`Event::Ready`] once serving, then [`Event::MainExited`] when the main
//! process ends.

pub mod frame;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod message;
pub mod oci;
pub mod tree;

pub use frame::{Channel, Data, Frame, FrameError, MAX_DATA_CHUNK, MAX_FRAME_LEN};
pub use message::*;
pub use oci::{main_process_from_config, MainProcess, OciError, RestartPolicy};
