//! virtio-mem (device id 24, VIRTIO 1.2 §5.15): a region of guest physical
//! memory that the driver plugs and unplugs block by block, towards a size
//! the host requests.
//!
//! The VMM maps the whole region (backed lazily, so unplugged blocks cost
//! nothing) and keeps it out of the firmware memory map; the device hands
//! the driver its geometry in the configuration space and answers one
//! request queue (`PLUG`, `UNPLUG`, `UNPLUG_ALL`, `STATE`). Unplugged
//! blocks go back to the host through a [`MemoryBackend`]. The host changes
//! the target with [`MemHandle::set_requested_size`] and then signals a
//! configuration change (the transport's `config_changed`).
//!
//! Neither `VIRTIO_MEM_F_ACPI_PXM` nor `VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE`
//! is offered: one NUMA node, and unplugged memory stays mapped (a guest
//! that reads it gets zeros, at the cost of the pages it touches).
//!
//! Device reset does not change which blocks are plugged (§5.15.5: the
//! device must not modify plugged memory on reset); a driver that starts
//! with memory plugged (after a reboot, say) sends `UNPLUG_ALL` first,
//! which Linux does.

mod state;

use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;

pub use state::{
    MemError, MemGeometry, MemState, MemoryBackend, Response, CONFIG_SIZE, MIN_BLOCK_SIZE,
    REQ_PLUG, REQ_SIZE, REQ_STATE, REQ_UNPLUG, REQ_UNPLUG_ALL, RESP_ACK, RESP_BUSY, RESP_ERROR,
    RESP_NACK, RESP_SIZE, STATE_MIXED, STATE_PLUGGED, STATE_UNPLUGGED,
};

use crate::device::{
    read_config_bytes, take_queue, ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt,
    RING_FEATURES,
};
use crate::lifecycle::{device_counters, Lifecycle, WorkerDevice};
use crate::ratelimit::LogLimiter;
use crate::worker::{drain_eventfd, enum_tokens, EpollCtx, EpollHandler, WorkerError, WorkerQueue};
use crate::GuestMemoryMmap;

/// The virtio device id of virtio-mem.
pub const VIRTIO_ID_MEM: u32 = 24;
/// Queue size offered to the driver (Linux sends one request at a time).
const QUEUE_SIZE: u16 = 128;

device_counters! {
    /// What the virtio-mem device did.
    pub struct MemCounters {
        /// Queue notifications handled.
        notifications,
        /// Requests answered (any response).
        requests,
        /// Blocks plugged by acknowledged `PLUG` requests.
        plugged_blocks,
        /// Blocks given back by acknowledged `UNPLUG` requests.
        unplugged_blocks,
        /// `UNPLUG_ALL` requests acknowledged.
        unplug_all,
        /// Requests refused with `NACK`.
        nacks,
        /// Requests answered with `ERROR`, and chains too small for one.
        errors,
    }
}

fn lock(state: &Mutex<MemState>) -> MutexGuard<'_, MemState> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The VMM's handle on a virtio-mem device: the requested size and what the
/// guest plugged, shared with the device and its worker.
#[derive(Clone)]
pub struct MemHandle(Arc<Mutex<MemState>>);

impl MemHandle {
    /// Sets the size the guest should plug (a multiple of the block size,
    /// at most the region); signal a configuration change afterwards.
    pub fn set_requested_size(&self, bytes: u64) -> Result<(), MemError> {
        lock(&self.0).set_requested_size(bytes)
    }
    /// What the guest should have plugged.
    pub fn requested_size(&self) -> u64 {
        lock(&self.0).requested_size()
    }
    /// What the guest has plugged.
    pub fn plugged_size(&self) -> u64 {
        lock(&self.0).plugged_size()
    }
    /// The region.
    pub fn geometry(&self) -> MemGeometry {
        lock(&self.0).geometry()
    }
}

/// The virtio-mem device.
pub struct VirtioMem {
    log: Arc<LogLimiter>,
    acked_features: u64,
    life: Lifecycle<MemHandler>,
    counters: Arc<MemCounters>,
    state: Arc<Mutex<MemState>>,
}

impl VirtioMem {
    /// A device for the region `geometry`, nothing plugged or requested;
    /// unplugged memory is given back through `backend`.
    pub fn new(geometry: MemGeometry, backend: Arc<dyn MemoryBackend>) -> Result<Self, MemError> {
        Ok(VirtioMem {
            log: Arc::new(LogLimiter::new("virtio-mem")),
            acked_features: 0,
            life: Lifecycle::new("virtio-mem"),
            counters: Arc::default(),
            state: Arc::new(Mutex::new(MemState::new(geometry, backend)?)),
        })
    }

    /// The VMM's handle on the sizes.
    pub fn handle(&self) -> MemHandle {
        MemHandle(self.state.clone())
    }
}

impl WorkerDevice for VirtioMem {
    type Handler = MemHandler;
    fn lifecycle(&mut self) -> &mut Lifecycle<MemHandler> {
        &mut self.life
    }
    fn handler(
        &self,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        mut queues: Vec<ActiveQueue>,
    ) -> Result<MemHandler, ActivateError> {
        Ok(MemHandler {
            mem,
            interrupt,
            queue: take_queue(&mut queues, 0)?.into(),
            state: self.state.clone(),
            log: self.log.clone(),
            counters: self.counters.clone(),
        })
    }
}

impl VirtioDevice for VirtioMem {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_MEM
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
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&lock(&self.state).config(), offset, data);
    }
    crate::lifecycle::lifecycle_methods!();
    fn reset(&mut self) -> bool {
        // Plugged blocks stay plugged (see the module documentation).
        self.reset_worker();
        self.acked_features = 0;
        true
    }
}

/// Events of the virtio-mem worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    /// The driver queued requests.
    Queue,
}
enum_tokens!(Token: Queue);

/// The virtio-mem worker's handler.
pub struct MemHandler {
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    interrupt: Arc<dyn VirtioInterrupt>,
    queue: WorkerQueue,
    state: Arc<Mutex<MemState>>,
    log: Arc<LogLimiter>,
    counters: Arc<MemCounters>,
}

/// Serves one request chain: reads the request from its readable part,
/// executes it and writes the response into its writable part. Returns the
/// bytes written. A chain without room for a whole response is not
/// executed (the driver could not learn the outcome) and completes with 0.
pub fn process_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    state: &Mutex<MemState>,
    log: &LogLimiter,
    counters: &MemCounters,
) -> u32 {
    counters.requests.inc();
    let bad = |what: &dyn std::fmt::Display| {
        crate::guest_log!(
            log,
            log::Level::Warn,
            "virtio-mem: bad request chain: {what}"
        );
        counters.errors.inc();
        0
    };
    let (mut reader, mut writer) = match (chain.clone().reader(mem), chain.writer(mem)) {
        (Ok(r), Ok(w)) => (r, w),
        (Err(e), _) | (_, Err(e)) => return bad(&e),
    };
    if writer.available_bytes() < RESP_SIZE {
        return bad(&"no room for the response");
    }
    let mut req = [0u8; REQ_SIZE];
    let n = reader.available_bytes().min(REQ_SIZE);
    if let Err(e) = reader.read_exact(&mut req[..n]) {
        return bad(&e);
    }
    let resp = lock(state).handle(&req[..n]);
    let nb_blocks = u64::from(u16::from_le_bytes([req[16], req[17]]));
    let kind = u16::from_le_bytes([req[0], req[1]]);
    match (resp.kind, kind) {
        (RESP_ACK, REQ_PLUG) => counters.plugged_blocks.add(nb_blocks),
        (RESP_ACK, REQ_UNPLUG) => counters.unplugged_blocks.add(nb_blocks),
        (RESP_ACK, REQ_UNPLUG_ALL) => counters.unplug_all.inc(),
        (RESP_NACK, _) => counters.nacks.inc(),
        (RESP_ERROR, _) => counters.errors.inc(),
        _ => {}
    }
    match writer.write_all(&resp.to_bytes()) {
        Ok(()) => RESP_SIZE as u32,
        Err(e) => {
            crate::guest_log!(
                log,
                log::Level::Warn,
                "virtio-mem: cannot write the response: {e}"
            );
            writer.bytes_written() as u32
        }
    }
}

impl EpollHandler for MemHandler {
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
                let (state, log, counters) = (&*self.state, &*self.log, &*self.counters);
                self.queue.serve(ctx, "virtio-mem", irq, |q| {
                    q.process(&mem, irq, |chain| {
                        process_chain(&mem, chain, state, log, counters)
                    })
                    .map(drop)
                })?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
