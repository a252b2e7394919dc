//! Listening, and serving one connection: handshake, then requests one at
//! a time (see the protocol in `skiff_agent_proto`). One thread per
//! connection, plus per exec one waiter, one pump per output stream and
//! one stdin writer (so a process that does not read its stdin never
//! blocks the connection thread; see `stdin`).

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;

use serde_json::Value;
use skiff_agent_proto::frame::read_frame;
use skiff_agent_proto::{
    negotiate, AgentMessage, Channel, ClientMessage, ErrorCode, Frame, FrameError, Reply, Request,
    Welcome, STDIN_CREDIT_VERSION,
};

use crate::exec::{self, ExecHandle, Started};
use crate::files::{self, error_chain};
use crate::mainproc::MainSupervisor;
use crate::reaper::Reaper;
use crate::sink::Sink;
use crate::socket::Listener;
use crate::sys::Syscall;
use crate::{mount, network, power};

/// What every connection shares.
pub struct Agent {
    /// Waits for all children.
    pub reaper: Arc<Reaper>,
    /// The OS.
    pub sys: Arc<dyn Syscall>,
    /// Whether the agent is the thin VM's init.
    pub pid1: bool,
    /// Whether the guest's clock follows the clients' (a VM's init: see
    /// [`crate::clock`]).
    pub host_clock: bool,
    /// The main process (thin VM).
    pub main: Arc<MainSupervisor>,
}

impl Agent {
    /// The agent's identity for a protocol version.
    pub fn welcome(&self, version: u32) -> Welcome {
        Welcome {
            version,
            agent: env!("CARGO_PKG_VERSION").into(),
            pid1: self.pid1,
        }
    }
}

/// Accepts connections forever, a thread each.
pub fn serve(agent: Arc<Agent>, listener: Listener) {
    loop {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("skiff-agent: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        };
        let agent = agent.clone();
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .spawn(move || {
                match serve_connection(&agent, stream) {
                    Ok(()) => {}
                    // The host went away mid-frame: nothing to report.
                    Err(FrameError::Io(e))
                        if matches!(
                            e.kind(),
                            io::ErrorKind::ConnectionReset
                                | io::ErrorKind::BrokenPipe
                                | io::ErrorKind::UnexpectedEof
                        ) => {}
                    Err(e) => eprintln!("skiff-agent: connection: {}", error_chain(&e)),
                }
            });
        if let Err(e) = spawned {
            eprintln!("skiff-agent: spawning a connection thread: {e}");
        }
    }
}

/// The id of a message that failed to decode, if it has one.
fn id_of(v: &Value) -> u64 {
    v.get("id").and_then(Value::as_u64).unwrap_or(0)
}

/// Serves one connection until the peer closes it.
pub fn serve_connection(agent: &Agent, stream: File) -> Result<(), FrameError> {
    let mut reader = stream.try_clone().map_err(FrameError::Io)?;
    let sink = Arc::new(Sink::new(stream));
    let hello = match read_frame::<Value, _>(&mut reader)? {
        None => return Ok(()),
        Some(Frame::Control(v)) => serde_json::from_value::<ClientMessage>(v).ok(),
        Some(Frame::Data(_)) => None,
    };
    let Some(ClientMessage::Hello(hello)) = hello else {
        let _ = sink.error(0, ErrorCode::BadRequest, "expected hello");
        return Ok(());
    };
    let Some(version) = negotiate(&hello) else {
        let msg = format!(
            "no common version in {}..={}",
            hello.min_version, hello.max_version
        );
        let _ = sink.error(0, ErrorCode::UnsupportedVersion, msg);
        return Ok(());
    };
    if let Some(t) = hello.time_ns.filter(|_| agent.host_clock) {
        crate::clock::follow(agent.sys.as_ref(), t);
    }
    sink.send(&AgentMessage::Welcome(agent.welcome(version)))
        .map_err(FrameError::Io)?;

    let mut exec: Option<(u64, Arc<ExecHandle>)> = None;
    let result = loop {
        let frame = match read_frame::<Value, _>(&mut reader) {
            Ok(Some(f)) => f,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        if exec.as_ref().is_some_and(|(_, h)| h.done()) {
            exec = None;
        }
        let msg = match frame {
            Frame::Data(d) => {
                if let Some((id, h)) = &exec {
                    if d.id == *id && d.channel == Channel::Stdin {
                        h.stdin(&d.bytes);
                    }
                }
                continue;
            }
            Frame::Control(v) => match serde_json::from_value::<ClientMessage>(v.clone()) {
                Ok(m) => m,
                Err(e) => {
                    let _ = sink.error(
                        id_of(&v),
                        ErrorCode::BadRequest,
                        format!("malformed message: {e}"),
                    );
                    continue;
                }
            },
        };
        let (id, request) = match msg {
            ClientMessage::Request { id, request } => (id, request),
            ClientMessage::Unknown => {
                let _ = sink.error(0, ErrorCode::UnknownRequest, "unknown message type");
                continue;
            }
            ClientMessage::Hello(_)
            | ClientMessage::Entry { .. }
            | ClientMessage::EndOfEntries { .. } => {
                let _ = sink.error(0, ErrorCode::BadRequest, "message out of place");
                continue;
            }
        };
        match (request, &exec) {
            (Request::Signal { signal }, Some((eid, h))) if *eid == id => {
                if let Err(e) = h.signal(signal) {
                    eprintln!("skiff-agent: signal {signal} to {}: {e}", h.pid);
                }
            }
            (Request::Resize(size), Some((eid, h))) if *eid == id => {
                if let Err(e) = h.resize(size) {
                    eprintln!("skiff-agent: resize of {}: {e}", h.pid);
                }
            }
            (Request::Signal { .. } | Request::Resize(_), _) => {
                let _ = sink.error(id, ErrorCode::NotFound, "no running exec with this id");
            }
            (_, Some(_)) => {
                let _ = sink.error(id, ErrorCode::Busy, "an exec is running on this connection");
            }
            (Request::Exec(req), None) => {
                let credit = version >= STDIN_CREDIT_VERSION;
                match exec::start(&req, id, &agent.reaper, sink.clone(), credit) {
                    Ok(Started::Running(h)) => {
                        let _ = sink.reply(id, Reply::ExecStarted { pid: h.pid });
                        exec = Some((id, h));
                    }
                    Ok(Started::NotRun { code, message }) => {
                        let ch = if req.tty.is_some() {
                            Channel::Stdout
                        } else {
                            Channel::Stderr
                        };
                        let _ = sink.data(id, ch, message.as_bytes());
                        let _ = sink.reply(
                            id,
                            Reply::ExecExit {
                                status: skiff_agent_proto::ExitStatus::Exited { code },
                            },
                        );
                    }
                    Err(e) => {
                        let code = match &e {
                            exec::ExecError::NoCwd(_) => ErrorCode::NotFound,
                            exec::ExecError::EmptyArgv => ErrorCode::BadRequest,
                            _ => ErrorCode::Io,
                        };
                        let _ = sink.error(id, code, error_chain(&e));
                    }
                }
            }
            (Request::Push(req), None) => {
                if !files::push(&mut reader, &sink, id, &req) {
                    break Ok(());
                }
            }
            (Request::Pull(req), None) => {
                if !files::pull(&sink, id, &req) {
                    break Ok(());
                }
            }
            (request, None) => {
                let reply = handle_simple(agent, request);
                let _ = sink.reply(id, reply);
            }
        }
    };
    if let Some((_, h)) = exec {
        h.kill_all();
    }
    result
}

fn handle_simple(agent: &Agent, request: Request) -> Reply {
    let err = |code, e: &dyn std::error::Error| {
        Reply::Error(skiff_agent_proto::ErrorReply {
            code,
            message: error_chain(e),
        })
    };
    match request {
        Request::Ping => Reply::Pong(agent.welcome(skiff_agent_proto::PROTOCOL_VERSION)),
        Request::Mount(req) => match mount::mount(agent.sys.as_ref(), &req) {
            Ok(()) => Reply::Ok,
            Err(e) => err(e.code(), &e),
        },
        Request::Unmount(req) => match mount::unmount(agent.sys.as_ref(), &req) {
            Ok(()) => Reply::Ok,
            Err(e) => err(e.code(), &e),
        },
        Request::Network(cfg) => match network::apply(&agent.sys, &cfg, Path::new("/etc")) {
            Ok(()) => Reply::Ok,
            Err(e) => err(e.code(), &e),
        },
        Request::SetMac(req) => {
            let iface = req.interface.as_deref().unwrap_or("eth0");
            match crate::netmac::set_mac(iface, &req.mac) {
                Ok(()) => Reply::Ok,
                Err(e) => err(e.code(), &e),
            }
        }
        Request::Power(req) => {
            match power::request(&agent.sys, agent.pid1, req.action, power::GRACE, |cmd| {
                agent.reaper.spawn(cmd).map(drop)
            }) {
                Ok(()) => Reply::Ok,
                Err(e) => err(ErrorCode::Unsupported, &e),
            }
        }
        Request::StartMain(spec) => {
            match agent
                .main
                .start(&agent.reaper, &agent.sys, agent.pid1, spec)
            {
                Ok(pid) => Reply::ExecStarted { pid },
                Err(e) => err(e.code(), &e),
            }
        }
        Request::StopMain { timeout_secs } => match agent
            .main
            .stop(std::time::Duration::from_secs(timeout_secs))
        {
            Some(status) => Reply::MainExited { status },
            None => Reply::Error(skiff_agent_proto::ErrorReply {
                code: ErrorCode::NotFound,
                message: "no main process".into(),
            }),
        },
        Request::WaitMain => match agent.main.wait() {
            Some(status) => Reply::MainExited { status },
            None => Reply::Error(skiff_agent_proto::ErrorReply {
                code: ErrorCode::NotFound,
                message: "no main process".into(),
            }),
        },
        Request::Unknown => Reply::Error(skiff_agent_proto::ErrorReply {
            code: ErrorCode::UnknownRequest,
            message: "unknown request".into(),
        }),
        // Handled by the connection loop.
        Request::Exec(_)
        | Request::Signal { .. }
        | Request::Resize(_)
        | Request::Push(_)
        | Request::Pull(_) => Reply::Error(skiff_agent_proto::ErrorReply {
            code: ErrorCode::BadRequest,
            message: "request out of place".into(),
        }),
    }
}
