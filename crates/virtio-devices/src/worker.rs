//! The event loop of device workers (an epoll set over typed event
//! tokens, see [`EventToken`]) and the queue-draining helpers every device
//! uses. The worker threads themselves, with stop and pause, are in
//! [`crate::lifecycle`].

use std::io;
use std::marker::PhantomData;
use std::os::unix::io::{AsRawFd, RawFd};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{ActiveQueue, VirtioInterrupt, VirtioInterruptType};
use crate::GuestMemoryMmap;

/// The raw token the worker loop reserves for its control eventfd (stop
/// and pause requests); handler tokens must encode below it.
pub(crate) const CONTROL_TOKEN: u64 = u64::MAX;

/// Chains one wake-up processes on a queue before the worker goes back to
/// epoll (where a stop or pause request or other events are seen); the rest waits for the
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
    /// The worker's control eventfd could not be written.
    #[error("signal the worker thread")]
    Signal(#[source] io::Error),
    /// The worker thread panicked; its handler is lost.
    #[error("worker thread panicked")]
    Panicked,
}

/// An event token of one worker: what a ready fd means to its handler.
/// Each device has its own type (normally an enum), so the epoll `u64` is
/// an encoding detail of this module.
pub trait EventToken: Copy + std::fmt::Debug + Send + 'static {
    /// The epoll data for this token (below [`u64::MAX`], which the loop
    /// reserves).
    fn to_raw(self) -> u64;
    /// The token `raw` encodes, if any.
    fn from_raw(raw: u64) -> Option<Self>;
}

/// Implements [`EventToken`] for a field-less enum (raw value: the
/// discriminant).
macro_rules! enum_tokens {
    ($t:ident: $($v:ident),+ $(,)?) => {
        impl $crate::worker::EventToken for $t {
            fn to_raw(self) -> u64 {
                self as u64
            }
            fn from_raw(raw: u64) -> Option<Self> {
                [$($t::$v),+].into_iter().find(|t| *t as u64 == raw)
            }
        }
    };
}
pub(crate) use enum_tokens;

/// The epoll set of a worker, handed to the handler so that it can add,
/// modify and remove fds (for example one per vsock connection), each
/// reported with a token of type `T`.
pub struct EpollCtx<T> {
    epoll: Epoll,
    _token: PhantomData<fn(T) -> T>,
}

impl<T: EventToken> EpollCtx<T> {
    /// A new epoll set (workers get theirs from [`EventLoop::new`]).
    pub fn new() -> io::Result<Self> {
        Ok(EpollCtx {
            epoll: Epoll::new()?,
            _token: PhantomData,
        })
    }

    fn raw(token: T) -> io::Result<u64> {
        match token.to_raw() {
            CONTROL_TOKEN => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("event token {token:?} encodes to the reserved control token"),
            )),
            raw => Ok(raw),
        }
    }

    /// Watches `fd` for `events`, reported with `token`.
    pub fn add(&self, fd: RawFd, token: T, events: EventSet) -> io::Result<()> {
        self.add_raw(fd, Self::raw(token)?, events)
    }
    pub(crate) fn add_raw(&self, fd: RawFd, raw: u64, events: EventSet) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, raw))
    }
    /// Changes the events watched on `fd`.
    pub fn modify(&self, fd: RawFd, token: T, events: EventSet) -> io::Result<()> {
        let raw = Self::raw(token)?;
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, raw))
    }
    /// Stops watching `fd`.
    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

/// What a worker does with its events.
pub trait EpollHandler: Send + 'static {
    /// What the handler's fds are reported with.
    type Token: EventToken;
    /// Registers the handler's fds (queue eventfds, sockets, ...).
    fn register(&mut self, ctx: &EpollCtx<Self::Token>) -> io::Result<()>;
    /// Handles one event. Returning an error stops the worker (the device
    /// then stays silent until reset); guest mistakes must not be errors.
    fn handle_event(
        &mut self,
        ctx: &EpollCtx<Self::Token>,
        token: Self::Token,
        events: EventSet,
    ) -> Result<(), WorkerError>;
}

/// What one turn of an [`EventLoop`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// This many events were handled (0: none was ready in time).
    Handled(usize),
    /// The control eventfd fired (a stop or pause request; only workers
    /// from [`crate::lifecycle::Worker`] have one). Events after it in the
    /// same batch are left for the next turn.
    Control,
}

/// A handler with its epoll set: the body of a worker thread, and what
/// tests drive directly (one [`EventLoop::turn`] at a time) so that "nothing
/// happened" is a fact rather than a guess after a sleep.
pub struct EventLoop<H: EpollHandler> {
    ctx: EpollCtx<H::Token>,
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
    /// ready ones, stopping at the control token.
    pub fn turn(&mut self, timeout_ms: i32) -> Result<Turn, WorkerError> {
        let n = match self.ctx.epoll.wait(timeout_ms, &mut self.events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(Turn::Handled(0)),
            Err(e) => return Err(WorkerError::Epoll(e)),
        };
        for ev in &self.events[..n] {
            if ev.data() == CONTROL_TOKEN {
                return Ok(Turn::Control);
            }
            match H::Token::from_raw(ev.data()) {
                Some(token) => self
                    .handler
                    .handle_event(&self.ctx, token, ev.event_set())?,
                // Only registered tokens come back; this is a bug of ours.
                None => log::error!("worker: unknown event token {:#x}", ev.data()),
            }
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

    /// The epoll set.
    pub(crate) fn ctx(&self) -> &EpollCtx<H::Token> {
        &self.ctx
    }

    /// Ends the loop, giving back the handler.
    pub fn into_handler(self) -> H {
        self.handler
    }
}

/// Drains an eventfd (queue notification or control), ignoring "nothing to read".
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
    pub fn mark_broken<T: EventToken>(
        &mut self,
        ctx: &EpollCtx<T>,
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
    pub fn serve<T: EventToken>(
        &mut self,
        ctx: &EpollCtx<T>,
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
    /// events, a stop or pause request included).
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
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

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
