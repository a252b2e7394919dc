//! Device worker threads: an epoll loop over named event tokens with a kill
//! eventfd, and the queue-draining helper every device uses.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{ActiveQueue, VirtioInterrupt, VirtioInterruptType};
use crate::GuestMemoryMmap;

/// The token the worker loop reserves for its kill eventfd.
const KILL_TOKEN: u64 = u64::MAX;

/// Chains one wake-up processes on a queue before the worker goes back to
/// epoll (where a kill or other events are seen); the rest waits for the
/// next turn.
pub const CHAIN_BUDGET: usize = 256;

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
    /// The avail index announces buffers that cannot be read.
    #[error("avail index announces buffers that cannot be read")]
    CorruptRing,
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

/// What one turn of an [`EventLoop`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// This many events were handled (0: none was ready in time).
    Handled(usize),
    /// The kill eventfd fired; the loop must end.
    Killed,
}

/// A handler with its epoll set: the body of a worker thread, and what
/// tests drive directly (one [`EventLoop::turn`] at a time) so that "nothing
/// happened" is a fact rather than a guess after a sleep.
pub struct EventLoop<H> {
    ctx: EpollCtx,
    handler: H,
    events: Vec<EpollEvent>,
}

impl<H: EpollHandler> EventLoop<H> {
    /// Registers `handler`'s fds in a new epoll set.
    pub fn new(mut handler: H) -> Result<Self, WorkerError> {
        let ctx = EpollCtx::new().map_err(WorkerError::Epoll)?;
        handler.register(&ctx).map_err(WorkerError::Epoll)?;
        Ok(EventLoop {
            ctx,
            handler,
            events: vec![EpollEvent::default(); 64],
        })
    }

    /// Waits up to `timeout_ms` (-1: forever) for events and handles the
    /// ready ones, stopping at the kill token.
    pub fn turn(&mut self, timeout_ms: i32) -> Result<Turn, WorkerError> {
        let n = match self.ctx.epoll.wait(timeout_ms, &mut self.events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(Turn::Handled(0)),
            Err(e) => return Err(WorkerError::Epoll(e)),
        };
        for ev in &self.events[..n] {
            if ev.data() == KILL_TOKEN {
                return Ok(Turn::Killed);
            }
            self.handler
                .handle_event(&self.ctx, ev.data(), ev.event_set())?;
        }
        Ok(Turn::Handled(n))
    }

    /// Handles events until none is ready (at most `max_turns` turns);
    /// returns the number of turns that handled something.
    pub fn run_until_idle(&mut self, max_turns: usize) -> Result<usize, WorkerError> {
        for turns in 0..max_turns {
            if self.turn(0)? != Turn::Handled(0) {
                continue;
            }
            return Ok(turns);
        }
        Ok(max_turns)
    }

    /// The handler.
    pub fn handler(&mut self) -> &mut H {
        &mut self.handler
    }
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
pub fn spawn_worker<H: EpollHandler>(name: &str, handler: H) -> Result<WorkerHandle, WorkerError> {
    let kill = EventFd::new(EFD_NONBLOCK).map_err(WorkerError::Epoll)?;
    let mut event_loop = EventLoop::new(handler)?;
    event_loop
        .ctx
        .add(
            std::os::unix::io::AsRawFd::as_raw_fd(&kill),
            KILL_TOKEN,
            EventSet::IN,
        )
        .map_err(WorkerError::Epoll)?;
    let thread_name = name.to_string();
    let thread = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || loop {
            match event_loop.turn(-1) {
                Ok(Turn::Handled(_)) => {}
                Ok(Turn::Killed) => return,
                Err(e) => {
                    log::error!("{thread_name}: worker stopped: {e}");
                    return;
                }
            }
        })
        .map_err(WorkerError::Spawn)?;
    Ok(WorkerHandle {
        kill,
        thread: Some(thread),
    })
}

/// Drains an eventfd (queue notification or kill), ignoring "nothing to read".
pub fn drain_eventfd(evt: &EventFd) {
    if let Err(e) = evt.read() {
        if e.kind() != io::ErrorKind::WouldBlock {
            log::warn!("eventfd read: {e}");
        }
    }
}

/// Writes `evt` so the worker comes back to this queue on its next turn.
fn rearm(evt: &EventFd) {
    if let Err(e) = evt.write(1) {
        log::warn!("eventfd re-arm: {e}");
    }
}

/// The next available chain of `queue`, or `None` once the ring is empty
/// (notifications are then enabled). A corrupt avail index is an error,
/// never a loop: `pop_descriptor_chain` would return `None` while
/// `enable_notification` keeps announcing buffers.
pub fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, WorkerError> {
    // Twice at most: the driver may add buffers between the two reads.
    for _ in 0..2 {
        if let Some(chain) = queue.iter(mem).map_err(WorkerError::Queue)?.next() {
            return Ok(Some(chain));
        }
        if !queue.enable_notification(mem).map_err(WorkerError::Queue)? {
            return Ok(None);
        }
    }
    Err(WorkerError::CorruptRing)
}

/// A queue served by a worker. A corrupt ring marks it broken: it is then
/// left alone until the device is reset (logged once, its eventfd no
/// longer watched, the driver told that the device needs a reset).
pub struct WorkerQueue {
    /// Index of the queue in the device.
    pub index: usize,
    /// The queue.
    pub queue: Queue,
    /// Its notification eventfd.
    pub event: EventFd,
    broken: bool,
}

impl From<ActiveQueue> for WorkerQueue {
    fn from(q: ActiveQueue) -> Self {
        WorkerQueue {
            index: q.index,
            queue: q.queue,
            event: q.event,
            broken: false,
        }
    }
}

impl WorkerQueue {
    /// Whether a corrupt ring stopped this queue.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Stops serving the queue after `err` (see the type's documentation).
    pub fn mark_broken(
        &mut self,
        ctx: &EpollCtx,
        device: &str,
        err: &WorkerError,
        interrupt: &dyn VirtioInterrupt,
    ) {
        if self.broken {
            return;
        }
        self.broken = true;
        log::error!("{device}: queue {} stopped until reset: {err}", self.index);
        if let Err(e) = ctx.remove(self.event.as_raw_fd()) {
            log::warn!("{device}: queue {}: epoll: {e}", self.index);
        }
        interrupt.device_needs_reset();
    }

    /// Runs `work` on the queue unless it is broken; a queue error from it
    /// marks the queue broken instead of stopping the worker.
    pub fn serve(
        &mut self,
        ctx: &EpollCtx,
        device: &str,
        interrupt: &dyn VirtioInterrupt,
        work: impl FnOnce(&mut Self) -> Result<(), WorkerError>,
    ) -> Result<(), WorkerError> {
        if self.broken {
            return Ok(());
        }
        match work(self) {
            Err(e @ (WorkerError::Queue(_) | WorkerError::CorruptRing)) => {
                self.mark_broken(ctx, device, &e, interrupt);
                Ok(())
            }
            other => other,
        }
    }

    /// Comes back to this queue on the worker's next turn (after other
    /// events, a kill included).
    pub fn rearm(&self) {
        rearm(&self.event);
    }

    /// [`process_queue`] on this queue.
    pub fn process<F>(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &dyn VirtioInterrupt,
        f: F,
    ) -> Result<usize, WorkerError>
    where
        F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
    {
        process_queue(
            &mut self.queue,
            mem,
            self.index as u16,
            interrupt,
            &self.event,
            f,
        )
    }
}

/// Processes the available chains of `queue` with `f`, which returns the
/// number of bytes it wrote into the chain. Follows the virtio loop: with
/// notifications disabled drain the queue, re-enable them, and go again if
/// the driver added buffers meanwhile, but at most [`CHAIN_BUDGET`] chains:
/// then `kick` (the queue's eventfd) is written so the rest is done on the
/// worker's next turn. Signals `interrupt` for queue `queue_index` if any
/// chain was used and the driver wants to know.
pub fn process_queue<F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    queue_index: u16,
    interrupt: &dyn VirtioInterrupt,
    kick: &EventFd,
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
        let chains: Vec<_> = queue
            .iter(mem)
            .map_err(WorkerError::Queue)?
            .take(CHAIN_BUDGET - used)
            .collect();
        for chain in chains {
            let head = chain.head_index();
            let len = f(chain);
            queue.add_used(mem, head, len).map_err(WorkerError::Queue)?;
            used += 1;
        }
        if used >= CHAIN_BUDGET {
            rearm(kick);
            break;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::*;

    /// A driver on another vCPU that republishes a buffer for every one
    /// the device completes: one wake-up must still end.
    #[test]
    fn process_queue_is_bounded_while_the_driver_refills() {
        let used = within(5, || {
            let mem = single_region_mem(0x10_0000);
            let mut tq = TestQueue::new(&mem, 0, 16, 0x1_0000);
            let mut q = tq.create_queue();
            tq.add_raw_chain(&[(0x8000, 16, Writable)]);
            let irq = recorder();
            let kick = EventFd::new(EFD_NONBLOCK).unwrap();
            let used = process_queue(&mut q, &mem, 0, irq.as_ref(), &kick, |_| {
                tq.add_raw_chain(&[(0x8000, 16, Writable)]);
                0
            })
            .unwrap();
            // The rest is for the next turn: the queue re-signalled itself.
            assert_eq!(kick.read().unwrap(), 1);
            used
        });
        assert_eq!(used, CHAIN_BUDGET);
    }
}
