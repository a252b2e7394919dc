//! virtio-rng: one queue whose writable buffers are filled from the host's
//! `getrandom(2)`.
//!
//! This is the smallest device and the template for new ones: a struct that
//! implements [`VirtioDevice`] and [`WorkerDevice`] (it supplies the
//! handler, [`crate::lifecycle`] runs it), an [`EpollHandler`] with a typed
//! event token, and counters shared with the worker.

use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;

use crate::device::{
    take_queue, ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt, RING_FEATURES,
};
use crate::lifecycle::{device_counters, Lifecycle, WorkerDevice};
use crate::ratelimit::LogLimiter;
use crate::worker::{drain_eventfd, enum_tokens, EpollCtx, EpollHandler, WorkerError, WorkerQueue};
use crate::GuestMemoryMmap;

/// Queue size offered to the driver.
const QUEUE_SIZE: u16 = 256;
/// At most this many random bytes are produced per descriptor chain.
const MAX_BYTES_PER_CHAIN: usize = 64 * 1024;

/// Errors of the rng device.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// `getrandom(2)` failed.
    #[error("getrandom")]
    GetRandom(#[source] std::io::Error),
}

/// Fills `buf` with random bytes from the kernel.
pub fn getrandom(buf: &mut [u8]) -> Result<(), RngError> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes and
        // getrandom writes at most that many.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(RngError::GetRandom(e));
        }
        done += n as usize;
    }
    Ok(())
}

device_counters! {
    /// What the rng device did.
    pub struct RngCounters {
        /// Queue notifications handled.
        notifications,
        /// Descriptor chains completed.
        requests,
        /// Random bytes written into guest buffers.
        bytes,
    }
}

/// The virtio-rng device.
pub struct Rng {
    log: Arc<LogLimiter>,
    acked_features: u64,
    life: Lifecycle<RngHandler>,
    counters: Arc<RngCounters>,
}

impl Rng {
    /// A new, inactive rng device.
    pub fn new() -> Self {
        Rng {
            log: Arc::new(LogLimiter::new("virtio-rng")),
            acked_features: 0,
            life: Lifecycle::new("virtio-rng"),
            counters: Arc::default(),
        }
    }
}

impl WorkerDevice for Rng {
    type Handler = RngHandler;
    fn lifecycle(&mut self) -> &mut Lifecycle<RngHandler> {
        &mut self.life
    }
    fn handler(
        &self,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        mut queues: Vec<ActiveQueue>,
    ) -> Result<RngHandler, ActivateError> {
        Ok(RngHandler {
            mem,
            interrupt,
            queue: take_queue(&mut queues, 0)?.into(),
            log: self.log.clone(),
            counters: self.counters.clone(),
        })
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        RING_FEATURES
    }
    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    crate::lifecycle::lifecycle_methods!(snapshot);
    fn reset(&mut self) -> bool {
        self.reset_worker();
        self.acked_features = 0;
        true
    }
}

/// Events of the rng worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    /// The driver added buffers to the request queue.
    Queue,
}
enum_tokens!(Token: Queue);

/// The rng worker's handler.
pub struct RngHandler {
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    interrupt: Arc<dyn VirtioInterrupt>,
    queue: WorkerQueue,
    log: Arc<LogLimiter>,
    counters: Arc<RngCounters>,
}

impl RngHandler {
    /// The request queue (its state after the worker stopped, say).
    pub fn queue(&self) -> &WorkerQueue {
        &self.queue
    }
}

/// Fills the writable part of `chain` with random bytes; returns the count.
pub fn fill_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    log: &LogLimiter,
) -> u32 {
    let mut writer = match chain.writer(mem) {
        Ok(w) => w,
        Err(e) => {
            crate::guest_log!(
                log,
                log::Level::Warn,
                "virtio-rng: bad descriptor chain: {e}"
            );
            return 0;
        }
    };
    let len = writer.available_bytes().min(MAX_BYTES_PER_CHAIN);
    let mut buf = vec![0u8; len];
    if let Err(e) = getrandom(&mut buf) {
        log::error!("virtio-rng: {e}");
        return 0;
    }
    match writer.write_all(&buf) {
        Ok(()) => len as u32,
        Err(e) => {
            crate::guest_log!(
                log,
                log::Level::Warn,
                "virtio-rng: cannot write guest buffer: {e}"
            );
            writer.bytes_written() as u32
        }
    }
}

impl crate::lifecycle::QueueOwner for RngHandler {
    fn queue_progress(&self) -> Vec<crate::state::QueueProgress> {
        vec![crate::state::QueueProgress::of(
            self.queue.index,
            &self.queue.queue,
        )]
    }
}

impl EpollHandler for RngHandler {
    type Token = Token;

    fn register(&mut self, ctx: &EpollCtx<Token>) -> std::io::Result<()> {
        ctx.add(self.queue.event.as_raw_fd(), Token::Queue, EventSet::IN)
    }

    fn handle_event(
        &mut self,
        ctx: &EpollCtx<Token>,
        token: Token,
        _events: EventSet,
    ) -> Result<(), WorkerError> {
        match token {
            Token::Queue => {
                drain_eventfd(&self.queue.event);
                self.counters.notifications.inc();
                let mem = self.mem.memory();
                let irq = self.interrupt.as_ref();
                let (log, counters) = (&*self.log, &*self.counters);
                self.queue.serve(ctx, "virtio-rng", irq, |q| {
                    q.process(&mem, irq, |chain| {
                        let len = fill_chain(&mem, chain, log);
                        counters.requests.inc();
                        counters.bytes.add(u64::from(len));
                        len
                    })
                    .map(drop)
                })?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::*;

    fn activate(
        mem: &GuestMemoryMmap,
    ) -> (
        Rng,
        TestQueue,
        Arc<RecordingInterrupt>,
        vmm_sys_util::eventfd::EventFd,
    ) {
        let tq = TestQueue::new(mem, 0, 16, 0x1_0000);
        let aq = tq.active(0);
        let kick = aq.event.try_clone().unwrap();
        let irq = recorder();
        let mut rng = Rng::new();
        rng.activate(atomic_mem(mem), irq.clone(), vec![aq])
            .unwrap();
        (rng, tq, irq, kick)
    }

    #[test]
    fn fills_writable_buffers() {
        let mem = single_region_mem(0x10_0000);
        let (mut rng, mut tq, irq, kick) = activate(&mem);
        let (_, addrs) = tq.add_chain(&[(Writable, 64), (Writable, 64)]);
        kick.write(1).unwrap();
        assert!(wait_until(|| tq.used_idx() == 1));
        assert_eq!(tq.used_entry(0), (0, 128));
        let bytes = tq.read(addrs[0], 64);
        assert!(bytes.iter().any(|&b| b != 0), "random bytes expected");
        assert!(wait_until(|| irq.count() >= 1));
        assert!(rng.reset());
    }

    #[test]
    fn counters_follow_the_guest() {
        let mem = single_region_mem(0x10_0000);
        let (mut rng, mut tq, irq, kick) = activate(&mem);
        assert_eq!(rng.counters()["requests"], 0);
        tq.add_chain(&[(Writable, 64), (Writable, 64)]);
        tq.add_chain(&[(Writable, 32)]);
        kick.write(1).unwrap();
        assert!(wait_until(|| tq.used_idx() == 2));
        assert!(wait_until(|| irq.count() >= 1));
        let c = rng.counters();
        assert_eq!(c["requests"], 2);
        assert_eq!(c["bytes"], 160);
        assert_eq!(c["notifications"], 1);
        assert_eq!(c["interrupts"], irq.count() as u64);
        // Counters survive a reset and keep counting after re-activation.
        assert!(rng.reset());
        let mut tq = TestQueue::new(&mem, 0x4000, 16, 0x8_0000);
        let aq = tq.active(0);
        let kick = aq.event.try_clone().unwrap();
        rng.activate(atomic_mem(&mem), irq.clone(), vec![aq])
            .unwrap();
        tq.add_chain(&[(Writable, 8)]);
        kick.write(1).unwrap();
        assert!(wait_until(|| tq.used_idx() == 1));
        assert_eq!(rng.counters()["requests"], 3);
        assert_eq!(rng.counters()["bytes"], 168);
    }

    #[test]
    fn bad_chains_complete_with_zero() {
        let mem = single_region_mem(0x10_0000);
        let (_rng, mut tq, _irq, kick) = activate(&mem);
        // Buffer outside guest memory.
        tq.add_raw_chain(&[(0x1000_0000, 64, Writable)]);
        // Readable only: nothing to fill.
        tq.add_chain(&[(Readable, 16)]);
        // Absurd length: capped.
        let big = tq.alloc(0x8_0000);
        tq.add_raw_chain(&[(big, 0x8_0000, Writable)]);
        kick.write(1).unwrap();
        assert!(wait_until(|| tq.used_idx() == 3));
        assert_eq!(tq.used_entry(0).1, 0);
        assert_eq!(tq.used_entry(1).1, 0);
        assert_eq!(tq.used_entry(2).1, MAX_BYTES_PER_CHAIN as u32);
    }

    /// Driven directly: the corrupt ring is given up in one turn, nothing
    /// is used, the driver is asked for a reset.
    #[test]
    fn corrupt_avail_index_does_not_hang() {
        let mem = single_region_mem(0x10_0000);
        let mut tq = TestQueue::new(&mem, 0, 16, 0x1_0000);
        let aq = tq.active(0);
        let kick = aq.event.try_clone().unwrap();
        let irq = recorder();
        let handler = Rng::new()
            .handler(atomic_mem(&mem), irq.clone(), vec![aq])
            .unwrap();
        tq.set_avail_idx(1000);
        let (turns, used) = within(5, move || {
            let mut el = crate::worker::EventLoop::new(handler).unwrap();
            kick.write(1).unwrap();
            let first = el.run_until_idle(10).unwrap();
            kick.write(1).unwrap();
            (first + el.run_until_idle(10).unwrap(), tq.used_idx())
        });
        assert_eq!(turns, 1, "one turn, then the queue is no longer watched");
        assert_eq!(used, 0);
        assert_eq!(irq.needs_reset.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
