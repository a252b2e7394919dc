//! Device worker threads: an epoll loop over named event tokens with a kill
//! eventfd, and the queue-draining helper every device uses.

use std::io;
use std::os::unix::io::RawFd;
use std::thread::JoinHandle;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{VirtioInterrupt, VirtioInterruptType};
use crate::GuestMemoryMmap;

/// The token the worker loop reserves for its kill eventfd.
const KILL_TOKEN: u64 = u64::MAX;

/// Errors of the worker helpers.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// An epoll operation failed.
    #[error("epoll")]
    Epoll(#[source] io::Error),
    /// The worker thread could not be spawned.
    #[error("spawn worker thread")]
    Spawn(#[source] io::Error),
    /// A queue's rings could not be accessed.
    #[error("virtqueue access")]
    Queue(#[source] virtio_queue::Error),
}

/// The epoll set of a worker, handed to the handler so that it can add,
/// modify and remove fds (for example one per vsock connection).
pub struct EpollCtx {
    epoll: Epoll,
}

impl EpollCtx {
    /// A new epoll set (workers get theirs from [`spawn_worker`]).
    pub fn new() -> io::Result<Self> {
        Ok(EpollCtx {
            epoll: Epoll::new()?,
        })
    }

    /// Watches `fd` for `events`, reported with `token`.
    pub fn add(&self, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }
    /// Changes the events watched on `fd`.
    pub fn modify(&self, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }
    /// Stops watching `fd`.
    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

/// What a worker does with its events.
pub trait EpollHandler: Send + 'static {
    /// Registers the handler's fds (queue eventfds, sockets, ...).
    fn register(&mut self, ctx: &EpollCtx) -> io::Result<()>;
    /// Handles one event. Returning an error stops the worker (the device
    /// then stays silent until reset); guest mistakes must not be errors.
    fn handle_event(
        &mut self,
        ctx: &EpollCtx,
        token: u64,
        events: EventSet,
    ) -> Result<(), WorkerError>;
}

/// A running worker thread; dropping it stops the thread.
pub struct WorkerHandle {
    kill: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Stops the worker and waits for its thread.
    pub fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            if let Err(e) = self.kill.write(1) {
                log::error!("cannot signal worker to stop: {e}");
                return;
            }
            if thread.join().is_err() {
                log::error!("device worker thread panicked");
            }
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `handler` on a new thread named `name` until the handle is stopped.
pub fn spawn_worker<H: EpollHandler>(
    name: &str,
    mut handler: H,
) -> Result<WorkerHandle, WorkerError> {
    let kill = EventFd::new(EFD_NONBLOCK).map_err(WorkerError::Epoll)?;
    let ctx = EpollCtx {
        epoll: Epoll::new().map_err(WorkerError::Epoll)?,
    };
    ctx.add(
        std::os::unix::io::AsRawFd::as_raw_fd(&kill),
        KILL_TOKEN,
        EventSet::IN,
    )
    .map_err(WorkerError::Epoll)?;
    handler.register(&ctx).map_err(WorkerError::Epoll)?;
    let thread_name = name.to_string();
    let thread = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            if let Err(e) = run_loop(&ctx, &mut handler) {
                log::error!("{thread_name}: worker stopped: {e}");
            }
        })
        .map_err(WorkerError::Spawn)?;
    Ok(WorkerHandle {
        kill,
        thread: Some(thread),
    })
}

fn run_loop<H: EpollHandler>(ctx: &EpollCtx, handler: &mut H) -> Result<(), WorkerError> {
    let mut events = vec![EpollEvent::default(); 64];
    loop {
        let n = match ctx.epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(WorkerError::Epoll(e)),
        };
        for ev in &events[..n] {
            if ev.data() == KILL_TOKEN {
                return Ok(());
            }
            handler.handle_event(ctx, ev.data(), ev.event_set())?;
        }
    }
}

/// Drains an eventfd (queue notification or kill), ignoring "nothing to read".
pub fn drain_eventfd(evt: &EventFd) {
    if let Err(e) = evt.read() {
        if e.kind() != io::ErrorKind::WouldBlock {
            log::warn!("eventfd read: {e}");
        }
    }
}

/// Processes every available chain of `queue` with `f`, which returns the
/// number of bytes it wrote into the chain. Follows the virtio loop: with
/// notifications disabled drain the queue, re-enable them, and go again if
/// the driver added buffers meanwhile. Signals `interrupt` for queue
/// `queue_index` if any chain was used and the driver wants to know.
pub fn process_queue<F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    queue_index: u16,
    interrupt: &dyn VirtioInterrupt,
    mut f: F,
) -> Result<usize, WorkerError>
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
{
    let mut used = 0usize;
    loop {
        queue
            .disable_notification(mem)
            .map_err(WorkerError::Queue)?;
        // `iter` validates the driver's avail index; a corrupt one makes the
        // queue unusable until reset, and must not make us spin.
        let chains: Vec<_> = queue.iter(mem).map_err(WorkerError::Queue)?.collect();
        for chain in chains {
            let head = chain.head_index();
            let len = f(chain);
            queue.add_used(mem, head, len).map_err(WorkerError::Queue)?;
            used += 1;
        }
        if !queue.enable_notification(mem).map_err(WorkerError::Queue)? {
            break;
        }
    }
    if used > 0 {
        signal_used_queue(queue, mem, queue_index, interrupt)?;
    }
    Ok(used)
}

/// Raises the queue interrupt if the driver asked for it (event idx aware).
pub fn signal_used_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    queue_index: u16,
    interrupt: &dyn VirtioInterrupt,
) -> Result<(), WorkerError> {
    if queue.needs_notification(mem).map_err(WorkerError::Queue)? {
        if let Err(e) = interrupt.trigger(VirtioInterruptType::Queue(queue_index)) {
            log::warn!("queue {queue_index}: interrupt failed: {e}");
        }
    }
    Ok(())
}
