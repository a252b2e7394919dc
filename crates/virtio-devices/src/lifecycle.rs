//! The device lifecycle, shared by every in-process device: a [`Worker`]
//! thread that owns its handler (stop gives it back, pause parks it), the
//! [`Lifecycle`] a device keeps it in, the [`WorkerDevice`] trait through
//! which a device supplies only its handler, and the I/O counters devices
//! report through [`crate::VirtioDevice::counters`].
//!
//! ```text
//!   activate ─► Worker::spawn(handler) ─► running ◄─► paused (pause/resume)
//!                                            │           │
//!   reset ◄──── Worker::stop() -> handler ◄──┴───────────┘
//! ```

use std::collections::BTreeMap;
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{ActivateError, ActiveQueue, VirtioInterrupt, VirtioInterruptType};
use crate::state::{QueueProgress, StateError};
use crate::worker::{drain_eventfd, EpollHandler, EventLoop, Turn, WorkerError, CONTROL_TOKEN};
use crate::GuestMemoryMmap;

/// What the owner asked of a worker thread.
#[derive(Debug, Default)]
struct State {
    /// End the thread.
    stop: bool,
    /// Park between turns until cleared.
    pause: bool,
    /// The thread is parked (touches nothing until resumed or stopped).
    parked: bool,
    /// The thread has ended (stopped, failed or panicked).
    exited: bool,
}

/// The state shared by a [`Worker`] and its thread.
struct Control {
    /// Wakes the thread out of epoll to look at `state`.
    event: EventFd,
    state: Mutex<State>,
    changed: Condvar,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed
            .wait(guard)
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Called by the thread on a control event: parks while paused.
    /// Returns whether the thread goes on.
    fn park_if_paused(&self) -> bool {
        let mut s = self.lock();
        if s.pause && !s.stop {
            s.parked = true;
            self.changed.notify_all();
            while s.pause && !s.stop {
                s = self.wait(s);
            }
            s.parked = false;
        }
        !s.stop
    }
}

/// Marks the thread as ended however it ends (a panic included), so that
/// [`Worker::pause`] never waits for a thread that is gone.
struct ExitGuard(Arc<Control>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.0.lock().exited = true;
        self.0.changed.notify_all();
    }
}

/// A worker thread running an [`EventLoop`] over its handler `H`. The
/// thread owns the handler while it runs; [`Worker::stop`] gives it back.
/// Dropping a worker stops it (and drops the handler).
pub struct Worker<H: EpollHandler> {
    name: String,
    control: Arc<Control>,
    thread: Option<JoinHandle<EventLoop<H>>>,
}

impl<H: EpollHandler> Worker<H> {
    /// Runs `handler` on a new thread named `name`.
    pub fn spawn(name: &str, handler: H) -> Result<Self, WorkerError> {
        Self::spawn_with(name, handler, false)
    }

    /// Runs `handler` on a new thread named `name`; with `paused` the
    /// thread parks before its first turn, touching nothing until
    /// [`Worker::resume`] (a worker started while the VM is paused, or
    /// started again over a handler during a snapshot).
    pub fn spawn_with(name: &str, handler: H, paused: bool) -> Result<Self, WorkerError> {
        let control = Arc::new(Control {
            event: EventFd::new(EFD_NONBLOCK).map_err(WorkerError::Epoll)?,
            state: Mutex::new(State {
                pause: paused,
                ..State::default()
            }),
            changed: Condvar::new(),
        });
        let mut event_loop = EventLoop::new(handler)?;
        event_loop
            .ctx()
            .add_raw(control.event.as_raw_fd(), CONTROL_TOKEN, EventSet::IN)
            .map_err(WorkerError::Epoll)?;
        let thread_control = control.clone();
        let thread_name = name.to_string();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let _exit = ExitGuard(thread_control.clone());
                run(&mut event_loop, &thread_control, &thread_name);
                event_loop
            })
            .map_err(WorkerError::Spawn)?;
        Ok(Worker {
            name: name.to_string(),
            control,
            thread: Some(thread),
        })
    }

    /// Parks the worker between two turns and returns once it is parked
    /// (or has ended): from then on it touches neither guest memory nor
    /// its fds. Events that arrive meanwhile (queue notifications) stay
    /// pending and are handled after [`Worker::resume`].
    pub fn pause(&self) {
        let mut s = self.control.lock();
        if !s.pause {
            s.pause = true;
            if let Err(e) = self.control.event.write(1) {
                log::error!("{}: cannot signal pause: {e}", self.name);
                s.pause = false;
                return;
            }
        }
        while !s.parked && !s.exited {
            s = self.control.wait(s);
        }
    }

    /// Lets a paused worker go on (nothing if it is not paused).
    pub fn resume(&self) {
        let mut s = self.control.lock();
        s.pause = false;
        self.control.changed.notify_all();
    }

    /// Whether the worker is parked by [`Worker::pause`].
    pub fn is_parked(&self) -> bool {
        self.control.lock().parked
    }

    /// Stops the worker (paused or not), waits for its thread and gives
    /// back the handler with the state it ended in.
    pub fn stop(mut self) -> Result<H, WorkerError> {
        self.shutdown().map(EventLoop::into_handler)
    }

    fn shutdown(&mut self) -> Result<EventLoop<H>, WorkerError> {
        let Some(thread) = self.thread.take() else {
            return Err(WorkerError::Panicked);
        };
        {
            let mut s = self.control.lock();
            s.stop = true;
            self.control.changed.notify_all();
        }
        // A parked thread sees `stop` through the condvar; a running one
        // needs the wake-up. Without it the thread is left behind rather
        // than joined forever.
        self.control.event.write(1).map_err(WorkerError::Signal)?;
        thread.join().map_err(|_| WorkerError::Panicked)
    }
}

impl<H: EpollHandler> Drop for Worker<H> {
    fn drop(&mut self) {
        if self.thread.is_some() {
            if let Err(e) = self.shutdown() {
                log::error!("{}: stop: {e}", self.name);
            }
        }
    }
}

/// The body of a worker thread.
fn run<H: EpollHandler>(event_loop: &mut EventLoop<H>, control: &Control, name: &str) {
    if !control.park_if_paused() {
        return;
    }
    loop {
        match event_loop.turn(-1) {
            Ok(Turn::Handled(_)) => {}
            Ok(Turn::Control) => {
                drain_eventfd(&control.event);
                if !control.park_if_paused() {
                    return;
                }
            }
            Err(e) => {
                log::error!("{name}: worker stopped: {e}");
                return;
            }
        }
    }
}

/// An event counter, shared between a device and its worker.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Declares a device's counter struct (every field a [`Counter`]) with a
/// `to_map` that names each value after its field.
macro_rules! device_counters {
    ($(#[$m:meta])* $vis:vis struct $name:ident { $($(#[$fm:meta])* $field:ident),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Default)]
        $vis struct $name {
            $($(#[$fm])* pub $field: $crate::lifecycle::Counter,)+
        }

        impl $name {
            /// The counters by name.
            pub fn to_map(&self) -> std::collections::BTreeMap<&'static str, u64> {
                [$((stringify!($field), self.$field.get())),+].into_iter().collect()
            }
        }
    };
}
pub(crate) use device_counters;

/// Counts the interrupts a device raises on the way to the transport.
struct CountingInterrupt {
    inner: Arc<dyn VirtioInterrupt>,
    raised: Arc<Counter>,
}

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, int_type: VirtioInterruptType) -> io::Result<()> {
        self.raised.inc();
        self.inner.trigger(int_type)
    }
    fn notifier(&self, int_type: VirtioInterruptType) -> Option<EventFd> {
        self.inner.notifier(int_type)
    }
    fn device_needs_reset(&self) {
        self.inner.device_needs_reset()
    }
}

/// Where a device keeps its worker: at most one, started on activation,
/// stopped (giving the handler back) on reset, paused with the VM (a
/// worker started while paused starts parked). It also counts the
/// interrupts the worker raises.
pub struct Lifecycle<H: EpollHandler> {
    name: String,
    worker: Option<Worker<H>>,
    paused: bool,
    interrupts: Arc<Counter>,
}

impl<H: EpollHandler> Lifecycle<H> {
    /// No worker yet; `name` names its thread.
    pub fn new(name: impl Into<String>) -> Self {
        Lifecycle {
            name: name.into(),
            worker: None,
            paused: false,
            interrupts: Arc::default(),
        }
    }

    /// Whether a worker runs (or is paused).
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    /// `interrupt`, counted in [`Lifecycle::interrupts`].
    pub fn counting(&self, interrupt: Arc<dyn VirtioInterrupt>) -> Arc<dyn VirtioInterrupt> {
        Arc::new(CountingInterrupt {
            inner: interrupt,
            raised: self.interrupts.clone(),
        })
    }

    /// Interrupts raised through [`Lifecycle::counting`] interrupts.
    pub fn interrupts(&self) -> u64 {
        self.interrupts.get()
    }

    /// Starts a worker for `handler`.
    pub fn start(&mut self, handler: H) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        // A paused lifecycle's worker parks before its first turn: a turn
        // before `pause` returned could touch guest memory and its queues
        // (a snapshot's saved queue positions would then be stale).
        let worker = Worker::spawn_with(&self.name, handler, self.paused)?;
        if self.paused {
            worker.pause();
        }
        self.worker = Some(worker);
        Ok(())
    }

    /// Stops the worker, if any, and gives back its handler (`None` if
    /// there was no worker or its thread panicked).
    pub fn stop(&mut self) -> Option<H> {
        match self.worker.take()?.stop() {
            Ok(handler) => Some(handler),
            Err(e) => {
                log::error!("{}: stop: {e}", self.name);
                None
            }
        }
    }

    /// Pauses the worker, if any (see [`Worker::pause`]), and the ones
    /// started until [`Lifecycle::resume`].
    pub fn pause(&mut self) {
        self.paused = true;
        if let Some(w) = &self.worker {
            w.pause();
        }
    }

    /// Resumes the worker, if any.
    pub fn resume(&mut self) {
        self.paused = false;
        if let Some(w) = &self.worker {
            w.resume();
        }
    }

    /// Whether the worker is parked.
    pub fn is_paused(&self) -> bool {
        self.worker.as_ref().is_some_and(Worker::is_parked)
    }

    /// The progress of the worker's queues, for a snapshot: the worker is
    /// stopped (its handler comes back with the queues as it left them)
    /// and started again over the same handler, parked if the lifecycle is
    /// paused. Nothing without a worker.
    pub fn queue_progress(&mut self) -> Result<Vec<QueueProgress>, StateError>
    where
        H: QueueOwner,
    {
        let Some(worker) = self.worker.take() else {
            return Ok(Vec::new());
        };
        let handler = worker
            .stop()
            .map_err(|e| StateError::Worker(ActivateError::Worker(e)))?;
        let progress = handler.queue_progress();
        self.start(handler).map_err(StateError::Worker)?;
        Ok(progress)
    }
}

/// A handler that can tell where its queues are (see
/// [`Lifecycle::queue_progress`]). Its `register` must add every fd it
/// serves, so that a worker started again over it loses nothing.
pub trait QueueOwner {
    /// Each queue's progress.
    fn queue_progress(&self) -> Vec<QueueProgress>;
}

/// A device whose activation is one worker over one handler: it supplies
/// the handler, the provided methods do the rest. Its
/// [`crate::VirtioDevice`] implementation forwards `activate` to
/// [`WorkerDevice::activate_worker`], `reset` to
/// [`WorkerDevice::reset_worker`], and `pause`/`resume` to the
/// [`Lifecycle`].
pub trait WorkerDevice {
    /// The worker's handler.
    type Handler: EpollHandler;

    /// Where the device keeps its worker.
    fn lifecycle(&mut self) -> &mut Lifecycle<Self::Handler>;

    /// The handler for the queues the driver made ready (fails with
    /// [`ActivateError::MissingQueue`] for one it needs and did not get).
    fn handler(
        &self,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<Self::Handler, ActivateError>;

    /// Builds the handler (its interrupts counted) and starts its worker.
    fn activate_worker(
        &mut self,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if self.lifecycle().is_active() {
            return Err(ActivateError::AlreadyActive);
        }
        let interrupt = self.lifecycle().counting(interrupt);
        let handler = self.handler(mem, interrupt, queues)?;
        self.lifecycle().start(handler)
    }

    /// Stops the worker and gives back its handler, if there was one.
    fn reset_worker(&mut self) -> Option<Self::Handler> {
        self.lifecycle().stop()
    }
}

/// The [`crate::VirtioDevice`] methods a [`WorkerDevice`] forwards to its
/// lifecycle: `activate` (to [`WorkerDevice::activate_worker`]), `pause`,
/// `resume`, and `counters` (its `counters` field's map plus the
/// interrupts); `lifecycle_methods!(snapshot)` adds `queue_progress` for a
/// device whose only state is its queues (its handler must be a
/// [`QueueOwner`]). Expands inside `impl VirtioDevice for ...` of a device that
/// keeps its [`Lifecycle`] in a field `life` and its counters (made with
/// `device_counters!`) in a field `counters`.
macro_rules! lifecycle_methods {
    () => {
        fn activate(
            &mut self,
            mem: vm_memory::GuestMemoryAtomic<$crate::GuestMemoryMmap>,
            interrupt: std::sync::Arc<dyn $crate::VirtioInterrupt>,
            queues: Vec<$crate::ActiveQueue>,
        ) -> Result<(), $crate::ActivateError> {
            $crate::lifecycle::WorkerDevice::activate_worker(self, mem, interrupt, queues)
        }
        fn pause(&mut self) {
            self.life.pause();
        }
        fn resume(&mut self) {
            self.life.resume();
        }
        fn counters(&self) -> std::collections::BTreeMap<&'static str, u64> {
            $crate::lifecycle::with_interrupts(self.counters.to_map(), &self.life)
        }
    };
    (snapshot) => {
        $crate::lifecycle::lifecycle_methods!();
        fn queue_progress(
            &mut self,
        ) -> Result<Vec<$crate::state::QueueProgress>, $crate::state::StateError> {
            self.life.queue_progress()
        }
    };
}
pub(crate) use lifecycle_methods;

/// Adds the interrupt count of `lifecycle` to a device's counters.
pub fn with_interrupts<H: EpollHandler>(
    mut counters: BTreeMap<&'static str, u64>,
    lifecycle: &Lifecycle<H>,
) -> BTreeMap<&'static str, u64> {
    counters.insert("interrupts", lifecycle.interrupts());
    counters
}

#[cfg(test)]
mod tests;
