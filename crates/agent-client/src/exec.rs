//! Exec sessions: the output as a stream of events, and a cloneable
//! control handle for stdin, signals and window size.

use std::collections::VecDeque;
use std::time::Duration;

use skiff_agent_proto::frame::{encode_control, encode_data};
use skiff_agent_proto::{
    AgentMessage, Channel, ClientMessage, ExitStatus, Frame, Reply, Request, WindowSize,
    MAX_DATA_CHUNK,
};

use crate::conn::{write_within, Connection, Writer};
use crate::ClientError;

/// Something that happened to a running exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Standard output (or TTY output).
    Stdout(Vec<u8>),
    /// Standard error.
    Stderr(Vec<u8>),
    /// It ended; no events follow.
    Exit(ExitStatus),
}

/// A finished exec with its whole output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// How it ended.
    pub status: ExitStatus,
    /// All of stdout.
    pub stdout: Vec<u8>,
    /// All of stderr.
    pub stderr: Vec<u8>,
}

/// Feeds a running exec; cheap to clone and usable from other tasks.
#[derive(Clone)]
pub struct ExecControl {
    writer: Writer,
    id: u64,
    limit: Duration,
}

impl ExecControl {
    /// Sends stdin bytes (cut into chunks).
    pub async fn write_stdin(&self, bytes: &[u8]) -> Result<(), ClientError> {
        for chunk in bytes.chunks(MAX_DATA_CHUNK) {
            let frame = encode_data(self.id, Channel::Stdin, chunk)?;
            write_within(&self.writer, &frame, self.limit, "writing stdin").await?;
        }
        Ok(())
    }

    /// Ends stdin (on a TTY: sends end-of-file, ^D).
    pub async fn close_stdin(&self) -> Result<(), ClientError> {
        let frame = encode_data(self.id, Channel::Stdin, &[])?;
        write_within(&self.writer, &frame, self.limit, "closing stdin").await
    }

    /// Sends a signal to the process.
    pub async fn signal(&self, signal: i32) -> Result<(), ClientError> {
        self.control(Request::Signal { signal }).await
    }

    /// Resizes its TTY.
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), ClientError> {
        self.control(Request::Resize(WindowSize { rows, cols }))
            .await
    }

    async fn control(&self, request: Request) -> Result<(), ClientError> {
        let frame = encode_control(&ClientMessage::Request {
            id: self.id,
            request,
        })?;
        write_within(&self.writer, &frame, self.limit, "sending a control").await
    }
}

/// A running exec.
pub struct ExecSession {
    conn: Connection,
    id: u64,
    pid: Option<i32>,
    pending: VecDeque<ExecEvent>,
    done: bool,
}

impl ExecSession {
    /// Sends the exec request on `conn` and waits (request timeout) until
    /// the agent started it or answered that it could not.
    pub(crate) async fn start(mut conn: Connection, request: Request) -> Result<Self, ClientError> {
        let id = conn.new_id();
        conn.send(&ClientMessage::Request { id, request }).await?;
        let mut s = ExecSession {
            conn,
            id,
            pid: None,
            pending: VecDeque::new(),
            done: false,
        };
        let limit = s.conn.timeouts.request;
        while s.pid.is_none() && !s.done {
            let frame = s
                .conn
                .recv_within(limit, "waiting for exec to start")
                .await?;
            if let Some(ev) = s.handle(frame)? {
                s.pending.push_back(ev);
            }
        }
        Ok(s)
    }

    /// The process's pid in the guest (`None` if it could not be run).
    pub fn pid(&self) -> Option<i32> {
        self.pid
    }

    /// A handle for stdin, signals and resizes.
    pub fn control(&self) -> ExecControl {
        ExecControl {
            writer: self.conn.writer.clone(),
            id: self.id,
            limit: self.conn.timeouts.request,
        }
    }

    fn handle(&mut self, frame: Frame<AgentMessage>) -> Result<Option<ExecEvent>, ClientError> {
        match frame {
            Frame::Data(d) if d.id == self.id => Ok(match d.channel {
                Channel::Stdout => Some(ExecEvent::Stdout(d.bytes)),
                Channel::Stderr => Some(ExecEvent::Stderr(d.bytes)),
                _ => None,
            }),
            Frame::Control(AgentMessage::Reply { id, reply }) if id == self.id => match reply {
                Reply::ExecStarted { pid } => {
                    self.pid = Some(pid);
                    Ok(None)
                }
                Reply::ExecExit { status } => {
                    self.done = true;
                    Ok(Some(ExecEvent::Exit(status)))
                }
                Reply::Error(e) => Err(ClientError::Agent(e)),
                other => Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
            },
            Frame::Control(AgentMessage::Reply {
                reply: Reply::Error(e),
                ..
            }) => Err(ClientError::Agent(e)),
            other => Err(ClientError::Protocol(format!(
                "unexpected frame in exec: {other:?}"
            ))),
        }
    }

    /// The next event; `None` after the exit event. Waits as long as the
    /// process runs (no timeout: wrap it in one if needed).
    pub async fn next_event(&mut self) -> Result<Option<ExecEvent>, ClientError> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Ok(Some(ev));
            }
            if self.done {
                return Ok(None);
            }
            let frame = self.conn.recv().await?;
            if let Some(ev) = self.handle(frame)? {
                return Ok(Some(ev));
            }
        }
    }

    /// Collects all output until the process ends.
    pub async fn output(mut self) -> Result<ExecOutput, ClientError> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(ev) = self.next_event().await? {
            match ev {
                ExecEvent::Stdout(b) => stdout.extend_from_slice(&b),
                ExecEvent::Stderr(b) => stderr.extend_from_slice(&b),
                ExecEvent::Exit(status) => {
                    return Ok(ExecOutput {
                        status,
                        stdout,
                        stderr,
                    })
                }
            }
        }
        Err(ClientError::Protocol(
            "exec ended without an exit status".into(),
        ))
    }
}
