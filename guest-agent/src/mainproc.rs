//! The thin VM's main process: started from an OCI process spec, watched,
//! restarted per policy, stopped with its stop signal then SIGKILL; its
//! exit is reported to the host, and as PID 1 the guest then powers off.
//!
//! ```text
//!   (none) --start--> Running --exit--> Exited --restart policy--> Running
//!                        |                 \--no restart--> power off (PID 1)
//!                        \--stop: stop signal, timeout, SIGKILL--> Exited
//! ```

use std::io;
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use skiff_agent_proto::{
    AgentMessage, ErrorCode, Event, ExitStatus, MainProcess, PowerAction, Welcome,
};

use crate::cli::Address;
use crate::exec::{environment, set_identity};
use crate::files::error_chain;
use crate::power;
use crate::reaper::Reaper;
use crate::sink::Sink;
use crate::socket::connect;
use crate::sys::Syscall;

/// Pause before a restart, so a crash loop does not spin.
const RESTART_DELAY: Duration = Duration::from_millis(500);

/// Errors of starting the main process.
#[derive(Debug, thiserror::Error)]
pub enum MainError {
    /// It already runs.
    #[error("the main process is already running")]
    Running,
    /// `args` is empty.
    #[error("the main process has no args")]
    NoArgs,
    /// fork or exec failed.
    #[error("starting {0:?}")]
    Spawn(String, #[source] io::Error),
    /// The monitor thread could not be started.
    #[error("starting the monitor thread")]
    Thread(#[source] io::Error),
}

impl MainError {
    /// The protocol's error code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            MainError::Running => ErrorCode::Busy,
            MainError::NoArgs => ErrorCode::BadRequest,
            MainError::Spawn(_, e) if e.kind() == io::ErrorKind::NotFound => ErrorCode::NotFound,
            _ => ErrorCode::Io,
        }
    }
}

#[derive(Default)]
struct State {
    pid: Option<i32>,
    spec: Option<MainProcess>,
    last: Option<ExitStatus>,
    stopping: bool,
    /// Exited, and a restart is due (counts as running for waiters).
    restarting: bool,
}

/// Supervises the main process and sends events to the host.
#[derive(Default)]
pub struct MainSupervisor {
    state: Mutex<State>,
    changed: Condvar,
    events: Mutex<Events>,
}

/// The event connection: where it goes, and the open one if any.
#[derive(Default)]
struct Events {
    target: Option<Address>,
    sink: Option<Sink>,
    ready: Option<Welcome>,
}

impl MainSupervisor {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connects the event connection and sends `ready`. If the host is
    /// not listening yet, every later event tries again, and each new
    /// connection starts with `ready`.
    pub fn announce(&self, target: Address, ready: Welcome) {
        let mut ev = self.events.lock().unwrap_or_else(|e| e.into_inner());
        ev.target = Some(target);
        ev.ready = Some(ready);
        Self::connect(&mut ev);
    }

    fn connect(ev: &mut Events) -> bool {
        if ev.sink.is_some() {
            return true;
        }
        let Some(target) = &ev.target else {
            return false;
        };
        match connect(target) {
            Ok(stream) => {
                let sink = Sink::new(stream);
                let ready = ev.ready.clone().map(Event::Ready);
                if ready.is_some_and(|r| sink.send(&AgentMessage::Event { event: r }).is_err()) {
                    return false;
                }
                ev.sink = Some(sink);
                true
            }
            Err(e) => {
                eprintln!("skiff-agent: event connection: {}", error_chain(&e));
                false
            }
        }
    }

    /// Sends an event to the host (reconnecting once if needed).
    pub fn emit(&self, event: Event) {
        let mut ev = self.events.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..2 {
            if !Self::connect(&mut ev) {
                return;
            }
            let msg = AgentMessage::Event {
                event: event.clone(),
            };
            match ev.sink.as_ref().map(|s| s.send(&msg)) {
                Some(Ok(())) => return,
                _ => ev.sink = None,
            }
        }
    }

    /// Starts the main process through `reaper`; returns its pid. When it
    /// ends for good, PID 1 (`pid1`) powers the guest off through `sys`.
    pub fn start(
        self: &Arc<Self>,
        reaper: &Arc<Reaper>,
        sys: &Arc<dyn Syscall>,
        pid1: bool,
        spec: MainProcess,
    ) -> Result<i32, MainError> {
        let mut st = self.lock();
        if st.pid.is_some() || st.restarting {
            return Err(MainError::Running);
        }
        let (pid, exited) = spawn(reaper, &spec)?;
        *st = State {
            pid: Some(pid),
            spec: Some(spec),
            last: None,
            stopping: false,
            restarting: false,
        };
        drop(st);
        let me = self.clone();
        let (reaper, sys) = (reaper.clone(), sys.clone());
        std::thread::Builder::new()
            .name("main-process".into())
            .spawn(move || me.monitor(exited, &reaper, sys.as_ref(), pid1))
            .map_err(MainError::Thread)?;
        Ok(pid)
    }

    fn monitor(
        &self,
        mut exited: Receiver<ExitStatus>,
        reaper: &Reaper,
        sys: &dyn Syscall,
        pid1: bool,
    ) {
        loop {
            let status = exited.recv().unwrap_or(ExitStatus::Exited { code: 255 });
            let mut st = self.lock();
            let spec = st.spec.clone();
            let restart = !st.stopping
                && spec
                    .as_ref()
                    .is_some_and(|s| s.restart.restarts(status.code()));
            st.pid = None;
            st.last = Some(status);
            st.restarting = restart;
            drop(st);
            self.changed.notify_all();
            eprintln!("skiff-agent: main process exited: {status:?}, restarting: {restart}");
            self.emit(Event::MainExited {
                status,
                restarting: restart,
            });
            let Some(spec) = spec.filter(|_| restart) else {
                break;
            };
            std::thread::sleep(RESTART_DELAY);
            let mut st = self.lock();
            st.restarting = false;
            let respawned = if st.stopping {
                None
            } else {
                Some(spawn(reaper, &spec))
            };
            match respawned {
                Some(Ok((pid, rx))) => {
                    st.pid = Some(pid);
                    exited = rx;
                }
                other => {
                    if let Some(Err(e)) = other {
                        eprintln!("skiff-agent: restarting the main process: {e}");
                    }
                    drop(st);
                    self.changed.notify_all();
                    break;
                }
            }
        }
        if pid1 {
            power::shutdown(sys, PowerAction::Poweroff, power::GRACE);
        }
    }

    /// Waits until the main process is not running; its last status, or
    /// `None` if it never ran.
    pub fn wait(&self) -> Option<ExitStatus> {
        self.wait_locked(self.lock())
    }

    /// Stops the main process: its stop signal, then SIGKILL after
    /// `timeout`. Returns how it ended (`None` if it never ran).
    pub fn stop(&self, timeout: Duration) -> Option<ExitStatus> {
        let mut st = self.lock();
        st.stopping = true;
        let Some(pid) = st.pid else {
            return self.wait_locked(st);
        };
        let signal = st.spec.as_ref().map_or(libc::SIGTERM, |s| s.stop_signal);
        // SAFETY: plain syscall; `pid` is our unreaped child.
        unsafe { libc::kill(pid, signal) };
        let deadline = Instant::now() + timeout;
        while st.pid.is_some() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                return self.wait_locked(st);
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.last
    }

    fn wait_locked(&self, mut st: MutexGuard<'_, State>) -> Option<ExitStatus> {
        while st.pid.is_some() || st.restarting {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.last
    }
}

fn spawn(reaper: &Reaper, spec: &MainProcess) -> Result<(i32, Receiver<ExitStatus>), MainError> {
    let (program, args) = spec.args.split_first().ok_or(MainError::NoArgs)?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(environment(&spec.env, spec.terminal))
        .current_dir(&spec.cwd)
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    // SAFETY: isatty only inspects fd 0.
    let on_tty = spec.terminal && unsafe { libc::isatty(0) } == 1;
    set_identity(&mut cmd, Some(spec.user.clone()), on_tty);
    let (child, exited) = reaper
        .spawn(&mut cmd)
        .map_err(|e| MainError::Spawn(program.clone(), e))?;
    Ok((child.id() as i32, exited))
}
