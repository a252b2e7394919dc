//! Exec sessions: the output as a stream of events, and a cloneable
//! control handle for stdin, signals and window size.
//!
//! Once the agent started the process, a task of the session reads the
//! connection: it takes the agent's stdin credit (protocol version 2) as it
//! arrives and queues output for [`ExecSession::next_event`] in a small
//! bounded buffer. Stdin therefore flows while nobody reads the output, as
//! long as the process produces little of it; a process whose output is
//! not read stops at the buffer, like a pipe.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{timeout_at, Instant};

use skiff_agent_proto::frame::{encode_control, encode_data};
use skiff_agent_proto::{
    AgentMessage, Channel, ClientMessage, ExitStatus, Frame, Reply, Request, WindowSize,
    MAX_DATA_CHUNK, STDIN_CREDIT_VERSION, STDIN_WINDOW,
};

use crate::conn::{write_frame, write_within, Connection, Writer};
use crate::{agent_error, describe, ClientError};

/// Output chunks the session buffers for a reader that falls behind.
const EVENT_BUFFER: usize = 8;
/// Output the session buffers before the agent acknowledged the exec with
/// `exec_started` (an agent sends none then, except a command-not-found
/// message before `exec_exit`); beyond it the connection is dropped.
pub const MAX_PRESTART_OUTPUT: usize = 1 << 20;
/// What each buffered event counts on top of its bytes, so that a flood of
/// empty chunks is capped as well.
const EVENT_OVERHEAD: usize = 64;

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

/// The stdin the agent will still take before it credits more back.
struct StdinWindow {
    /// One permit per byte; closed when the exec has ended.
    credit: Semaphore,
    /// Whether the agent does flow control (protocol version 2); without
    /// it only the transport holds stdin back.
    limited: bool,
}

impl StdinWindow {
    fn new(limited: bool) -> Self {
        StdinWindow {
            credit: Semaphore::new(STDIN_WINDOW as usize),
            limited,
        }
    }

    /// Waits until `n` (at most a data chunk) bytes may be sent.
    async fn take(&self, n: usize) -> Result<(), ClientError> {
        if !self.limited {
            return match self.credit.is_closed() {
                true => Err(ClientError::ExecEnded),
                false => Ok(()),
            };
        }
        let n = u32::try_from(n.min(MAX_DATA_CHUNK)).unwrap_or(u32::MAX);
        match self.credit.acquire_many(n).await {
            Ok(permit) => {
                permit.forget();
                Ok(())
            }
            Err(_) => Err(ClientError::ExecEnded),
        }
    }

    /// The agent wrote `bytes` to the process. Never more than the window
    /// is outstanding, whatever an agent claims.
    fn give(&self, bytes: u64) {
        let room = (STDIN_WINDOW as usize).saturating_sub(self.credit.available_permits());
        let n = usize::try_from(bytes).unwrap_or(usize::MAX).min(room);
        if n > 0 && !self.credit.is_closed() {
            self.credit.add_permits(n);
        }
    }

    fn close(&self) {
        self.credit.close();
    }
}

/// Closes the window when the session's reader task ends, however it ends.
struct CloseOnDrop(Arc<StdinWindow>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Feeds a running exec; cheap to clone and usable from other tasks.
#[derive(Clone)]
pub struct ExecControl {
    writer: Writer,
    id: u64,
    limit: Duration,
    window: Arc<StdinWindow>,
}

impl ExecControl {
    /// Sends stdin bytes (cut into chunks). Waits, without a time limit,
    /// while the process does not take them (back-pressure): at most
    /// [`STDIN_WINDOW`] bytes are ever on their way. Fails with
    /// [`ClientError::ExecEnded`] once the exec has ended.
    pub async fn write_stdin(&self, bytes: &[u8]) -> Result<(), ClientError> {
        for chunk in bytes.chunks(MAX_DATA_CHUNK) {
            self.window.take(chunk.len()).await?;
            let frame = encode_data(self.id, Channel::Stdin, chunk)?;
            write_frame(&self.writer, &frame).await?;
        }
        Ok(())
    }

    /// Ends stdin (on a TTY: sends end-of-file, ^D). Like stdin, it waits
    /// for the data before it without a time limit.
    pub async fn close_stdin(&self) -> Result<(), ClientError> {
        let frame = encode_data(self.id, Channel::Stdin, &[])?;
        write_frame(&self.writer, &frame).await
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

/// What a frame means to the exec `id`.
enum Incoming {
    Started(i32),
    Credit(u64),
    Event(ExecEvent),
    Ignored,
}

fn classify(id: u64, frame: Frame<AgentMessage>) -> Result<Incoming, ClientError> {
    match frame {
        Frame::Data(d) if d.id == id => Ok(match d.channel {
            Channel::Stdout => Incoming::Event(ExecEvent::Stdout(d.bytes)),
            Channel::Stderr => Incoming::Event(ExecEvent::Stderr(d.bytes)),
            _ => Incoming::Ignored,
        }),
        Frame::Control(AgentMessage::StdinCredit { id: cid, bytes }) if cid == id => {
            Ok(Incoming::Credit(bytes))
        }
        Frame::Control(AgentMessage::Reply { id: rid, reply }) if rid == id => match reply {
            Reply::ExecStarted { pid } => Ok(Incoming::Started(pid)),
            Reply::ExecExit { status } => Ok(Incoming::Event(ExecEvent::Exit(status))),
            Reply::Error(e) => Err(agent_error(e)),
            other => Err(ClientError::Protocol(format!(
                "unexpected reply {}",
                describe(&Frame::Control(AgentMessage::Reply { id, reply: other }))
            ))),
        },
        Frame::Control(AgentMessage::Reply {
            reply: Reply::Error(e),
            ..
        }) => Err(agent_error(e)),
        other => Err(ClientError::Protocol(format!(
            "unexpected frame in exec: {}",
            describe(&other)
        ))),
    }
}

/// The session's reader task: credit goes to the window, everything else
/// to the session, until the exit, an error, or the session is dropped.
async fn read_events(
    mut conn: Connection,
    id: u64,
    window: Arc<StdinWindow>,
    tx: mpsc::Sender<Result<ExecEvent, ClientError>>,
) {
    let _close = CloseOnDrop(window.clone());
    loop {
        let frame = tokio::select! {
            f = conn.recv() => f,
            () = tx.closed() => return,
        };
        let item = match frame.and_then(|f| classify(id, f)) {
            Ok(Incoming::Credit(n)) => {
                window.give(n);
                continue;
            }
            Ok(Incoming::Started(_) | Incoming::Ignored) => continue,
            Ok(Incoming::Event(ev)) => Ok(ev),
            Err(e) => Err(e),
        };
        let last = !matches!(item, Ok(ExecEvent::Stdout(_) | ExecEvent::Stderr(_)));
        if last {
            window.close();
        }
        if tx.send(item).await.is_err() || last {
            return;
        }
    }
}

/// A running exec.
pub struct ExecSession {
    pid: Option<i32>,
    pending: VecDeque<ExecEvent>,
    done: bool,
    control: ExecControl,
    events: mpsc::Receiver<Result<ExecEvent, ClientError>>,
    reader: Option<JoinHandle<()>>,
    /// Output bytes [`ExecSession::output`] collects ([`crate::Limits`]).
    output_limit: u64,
}

fn event_len(ev: &ExecEvent) -> usize {
    match ev {
        ExecEvent::Stdout(b) | ExecEvent::Stderr(b) => b.len(),
        ExecEvent::Exit(_) => 0,
    }
}

impl Drop for ExecSession {
    fn drop(&mut self) {
        if let Some(r) = &self.reader {
            r.abort();
        }
    }
}

impl ExecSession {
    /// Sends the exec request on `conn` and waits (request timeout, for
    /// the whole wait) until the agent started it or answered that it
    /// could not. Output before that is buffered up to
    /// [`MAX_PRESTART_OUTPUT`]; beyond, the connection is dropped.
    pub(crate) async fn start(mut conn: Connection, request: Request) -> Result<Self, ClientError> {
        let id = conn.new_id();
        conn.send(&ClientMessage::Request { id, request }).await?;
        let limited = conn.welcome.version >= STDIN_CREDIT_VERSION;
        let window = Arc::new(StdinWindow::new(limited));
        let limit = conn.timeouts.request;
        let deadline = Instant::now() + limit;
        let (mut pid, mut pending, mut done, mut buffered) = (None, VecDeque::new(), false, 0);
        while pid.is_none() && !done {
            let frame = timeout_at(deadline, conn.recv())
                .await
                .map_err(|_| ClientError::Timeout("waiting for exec to start"))??;
            match classify(id, frame)? {
                Incoming::Started(p) => pid = Some(p),
                Incoming::Credit(n) => window.give(n),
                Incoming::Event(ev) => {
                    done = matches!(ev, ExecEvent::Exit(_));
                    buffered += EVENT_OVERHEAD + event_len(&ev);
                    if buffered > MAX_PRESTART_OUTPUT {
                        return Err(ClientError::Overflow(format!(
                            "more than {MAX_PRESTART_OUTPUT} bytes of output before exec_started"
                        )));
                    }
                    pending.push_back(ev);
                }
                Incoming::Ignored => {}
            }
        }
        let conn_limit = conn.limits.exec_output;
        let control = ExecControl {
            writer: conn.writer.clone(),
            id,
            limit,
            window: window.clone(),
        };
        let (tx, events) = mpsc::channel(EVENT_BUFFER);
        let reader = if done {
            window.close();
            None
        } else {
            Some(tokio::spawn(read_events(conn, id, window, tx)))
        };
        Ok(ExecSession {
            pid,
            pending,
            done,
            control,
            events,
            reader,
            output_limit: conn_limit,
        })
    }

    /// The process's pid in the guest (`None` if it could not be run).
    pub fn pid(&self) -> Option<i32> {
        self.pid
    }

    /// A handle for stdin, signals and resizes.
    pub fn control(&self) -> ExecControl {
        self.control.clone()
    }

    /// The next event; `None` after the exit event. Waits as long as the
    /// process runs (no timeout: wrap it in one if needed).
    pub async fn next_event(&mut self) -> Result<Option<ExecEvent>, ClientError> {
        if let Some(ev) = self.pending.pop_front() {
            return Ok(Some(ev));
        }
        if self.done {
            return Ok(None);
        }
        match self.events.recv().await {
            Some(Ok(ev)) => {
                self.done = matches!(ev, ExecEvent::Exit(_));
                Ok(Some(ev))
            }
            Some(Err(e)) => {
                self.done = true;
                Err(e)
            }
            None => {
                self.done = true;
                Err(ClientError::Closed)
            }
        }
    }

    /// Collects all output until the process ends; more than
    /// [`crate::Limits::exec_output`] bytes is an error (the connection is
    /// dropped).
    pub async fn output(mut self) -> Result<ExecOutput, ClientError> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut total: u64 = 0;
        while let Some(ev) = self.next_event().await? {
            total = total.saturating_add(event_len(&ev) as u64);
            if total > self.output_limit {
                return Err(ClientError::Overflow(format!(
                    "exec output over the limit of {} bytes",
                    self.output_limit
                )));
            }
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
