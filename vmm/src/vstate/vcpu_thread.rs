//! The thread of one vCPU and the handle the VMM drives it with.
//!
//! Each vCPU runs on its own thread with a small state machine:
//!
//! ```text
//!            Resume                     the vCPU hits a stop reason
//!   Paused ─────────► Running ───────────────────────────► Exited
//!     ▲                  │                                    │
//!     └──── Pause ───────┘          Finish (any state) ───────┴──► thread ends
//! ```
//!
//! The VMM sends [`VcpuEvent`]s on a channel and *kicks* the thread: a
//! real-time signal whose handler sets the vCPU's `immediate_exit`, so a
//! `KVM_RUN` in progress returns `EINTR` and one about to start returns at
//! once; the thread then reads the channel and answers on another. A thread
//! blocked while paused wakes on the channel itself. The thread gives its
//! [`Vcpu`] back when it ends: KVM cannot destroy a vCPU, so a hot-removed
//! one is kept to be started again on a later hot-add.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Once;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::kvm_run;

use super::vcpu::{RunOutcome, Vcpu};

/// What the VMM asks of a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuEvent {
    /// Stop running guest code and wait.
    Pause,
    /// Run guest code again.
    Resume,
    /// End the thread and give the vCPU back.
    Finish,
}

/// What a vCPU thread answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuResponse {
    /// It is parked.
    Paused,
    /// It runs.
    Resumed,
    /// It stopped for good (a stop reason was hit, or `Finish`).
    Exited,
}

/// Where a vCPU thread is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuState {
    /// Parked, waiting for `Resume`.
    Paused,
    /// Running guest code.
    Running,
    /// Hit a reason for the VM to stop; waits for `Finish`.
    Exited,
}

/// Why a vCPU thread did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum VcpuThreadError {
    #[error("cannot start the thread of vCPU {id}")]
    Spawn {
        id: u8,
        #[source]
        source: std::io::Error,
    },
    #[error("vCPU {id} did not {what} within {ms} ms")]
    NoAnswer { id: u8, what: &'static str, ms: u128 },
    #[error("the thread of vCPU {id} is gone")]
    Gone { id: u8 },
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] std::io::Error),
}

thread_local! {
    // The `kvm_run` of the vCPU this thread runs, for the kick handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // A const-initialized thread-local of a `Copy` type: reading it takes no
    // lock and allocates nothing, so it is safe in a signal handler.
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's vCPU `kvm_run` mapping, set
        // by `thread_main` while it owns the vCPU and cleared before the
        // vCPU is given back; writing one byte of it races with nothing but
        // KVM, which reads the flag on entry.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// Installs the kick handler once per process.
fn install_kick_handler() -> Result<(), VcpuThreadError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: sigaction is plain data; zeroed is a valid empty value.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_kick as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        // SAFETY: `act.sa_mask` is a valid sigset_t to initialize.
        unsafe { libc::sigemptyset(&mut act.sa_mask) };
        // SAFETY: the handler is async-signal-safe (see `on_kick`); the old
        // action is not needed.
        if unsafe { libc::sigaction(kick_signal(), &act, std::ptr::null_mut()) } != 0 {
            result = Err(VcpuThreadError::Signal(std::io::Error::last_os_error()));
        }
    });
    result
}

/// A vCPU thread's stack. Its exits run device code (bus dispatch, virtio
/// activation), none of it deeply recursive; std's 2 MiB default is a
/// whole transparent huge page on hosts with THP `always`, which the first
/// touch makes resident (2 MiB of the VMM's RSS per vCPU). 1 MiB cannot hold
/// an aligned huge page, so only the pages used are resident.
const VCPU_STACK_SIZE: usize = 1 << 20;

/// The VMM's side of one vCPU thread.
pub struct VcpuHandle {
    id: u8,
    events: Sender<VcpuEvent>,
    responses: Receiver<VcpuResponse>,
    thread: Option<JoinHandle<Vcpu>>,
    state: VcpuState,
}

impl VcpuHandle {
    /// Starts a thread for `vcpu`, running or paused.
    pub fn spawn(vcpu: Vcpu, start: VcpuState) -> Result<Self, VcpuThreadError> {
        install_kick_handler()?;
        let id = vcpu.id();
        let (events, event_rx) = channel();
        let (response_tx, responses) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .stack_size(VCPU_STACK_SIZE)
            .spawn(move || thread_main(vcpu, event_rx, response_tx, start))
            .map_err(|source| VcpuThreadError::Spawn { id, source })?;
        Ok(Self { id, events, responses, thread: Some(thread), state: start })
    }

    /// The vCPU's id.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Where the thread was when it last answered.
    pub fn state(&self) -> VcpuState {
        self.state
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            // SAFETY: the pthread is alive until joined, which only
            // `finish` does after taking the handle out of `self.thread`.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }

    fn ask(&mut self, event: VcpuEvent, what: &'static str, timeout: Duration) -> Result<(), VcpuThreadError> {
        let id = self.id;
        self.events.send(event).map_err(|_| VcpuThreadError::Gone { id })?;
        self.kick();
        let answer = match self.responses.recv_timeout(timeout) {
            Ok(a) => a,
            Err(RecvTimeoutError::Timeout) => {
                return Err(VcpuThreadError::NoAnswer { id, what, ms: timeout.as_millis() });
            }
            Err(RecvTimeoutError::Disconnected) => return Err(VcpuThreadError::Gone { id }),
        };
        self.state = match answer {
            VcpuResponse::Paused => VcpuState::Paused,
            VcpuResponse::Resumed => VcpuState::Running,
            VcpuResponse::Exited => VcpuState::Exited,
        };
        Ok(())
    }

    /// Parks the vCPU; returns once it is parked (or has exited).
    pub fn pause(&mut self, timeout: Duration) -> Result<(), VcpuThreadError> {
        self.ask(VcpuEvent::Pause, "pause", timeout)
    }

    /// Lets a parked vCPU run again.
    pub fn resume(&mut self, timeout: Duration) -> Result<(), VcpuThreadError> {
        self.ask(VcpuEvent::Resume, "resume", timeout)
    }

    /// Ends the thread and returns the vCPU. A thread that does not answer
    /// in time is left behind (it ends with the process).
    pub fn finish(mut self, timeout: Duration) -> Result<Vcpu, VcpuThreadError> {
        let id = self.id;
        self.ask(VcpuEvent::Finish, "stop", timeout)?;
        let thread = self.thread.take().ok_or(VcpuThreadError::Gone { id })?;
        thread.join().map_err(|_| VcpuThreadError::Gone { id })
    }
}

/// The next state for `event`, after answering it; `None` ends the thread.
fn transition(state: VcpuState, event: VcpuEvent, responses: &Sender<VcpuResponse>) -> Option<VcpuState> {
    let (next, answer) = match (state, event) {
        (_, VcpuEvent::Finish) => return None,
        (VcpuState::Exited, _) => (VcpuState::Exited, VcpuResponse::Exited),
        (_, VcpuEvent::Pause) => (VcpuState::Paused, VcpuResponse::Paused),
        (_, VcpuEvent::Resume) => (VcpuState::Running, VcpuResponse::Resumed),
    };
    let _ = responses.send(answer);
    Some(next)
}

fn thread_main(mut vcpu: Vcpu, events: Receiver<VcpuEvent>, responses: Sender<VcpuResponse>, start: VcpuState) -> Vcpu {
    KVM_RUN.with(|p| p.set(vcpu.kvm_run_ptr()));
    let mut state = start;
    loop {
        let event = if state == VcpuState::Running {
            match events.try_recv() {
                Ok(e) => Some(e),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => break,
            }
        } else {
            match events.recv() {
                Ok(e) => Some(e),
                Err(_) => break,
            }
        };
        if let Some(event) = event {
            match transition(state, event, &responses) {
                Some(next) => state = next,
                None => break,
            }
            continue;
        }
        match vcpu.run_once() {
            RunOutcome::Continue => {}
            RunOutcome::Interrupted => vcpu.clear_immediate_exit(),
            RunOutcome::Stop(reason) => {
                vcpu.request_exit(reason);
                state = VcpuState::Exited;
            }
        }
    }
    KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    let _ = responses.send(VcpuResponse::Exited);
    vcpu
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions() {
        let (tx, rx) = channel();
        assert_eq!(transition(VcpuState::Running, VcpuEvent::Pause, &tx), Some(VcpuState::Paused));
        assert_eq!(transition(VcpuState::Paused, VcpuEvent::Pause, &tx), Some(VcpuState::Paused));
        assert_eq!(transition(VcpuState::Paused, VcpuEvent::Resume, &tx), Some(VcpuState::Running));
        assert_eq!(transition(VcpuState::Exited, VcpuEvent::Resume, &tx), Some(VcpuState::Exited));
        assert_eq!(transition(VcpuState::Running, VcpuEvent::Finish, &tx), None);
        let answers: Vec<_> = rx.try_iter().collect();
        use VcpuResponse::*;
        assert_eq!(answers, vec![Paused, Paused, Resumed, Exited]);
    }
}
