//! virtio-fs through a vhost-user backend (virtiofsd): the device model is
//! only a frontend. The backend maps guest memory from the memfd behind
//! each region, reads the rings itself, is kicked by the queue eventfds
//! (KVM ioeventfds) and signals completions on per-queue "call" eventfds.
//! When the interrupt layer has an eventfd per vector
//! ([`VirtioInterrupt::notifier`], normally the vector's irqfd) the backend
//! gets that one and interrupts the guest without us; otherwise a small
//! worker forwards each call to [`VirtioInterrupt::trigger`]. With direct
//! irqfds, MSI-X masking is up to the VMM's `InterruptGroup::update`.
//!
//! The device cannot be paused: the rings are served by virtiofsd's own
//! threads, which vhost-user gives no way to park (see [`Fs`]'s
//! `VirtioDevice::pause`). Its counters are the interrupts it forwarded.
//!
//! Snapshots ([`snapshot`]): the rings are stopped (`GET_VRING_BASE`),
//! virtiofsd hands over its state (its inodes and open files, by path or
//! file handle: `SET_DEVICE_STATE_FD`) and the rings start again; a
//! restored device gives a fresh virtiofsd that state before its rings
//! start, so the guest's mount and open files go on.
//!
//! Guest memory must be file-backed (`GuestRegionMmap::file_offset()`),
//! otherwise activation fails with [`ActivateError::MemoryNotShareable`].

use std::collections::BTreeMap;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_FS;
use virtio_queue::QueueT;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{
    read_config_bytes, ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt,
    VirtioInterruptType, RING_FEATURES,
};
use crate::lifecycle::{with_interrupts, Lifecycle};
use crate::state::{QueueProgress, StateError};
use crate::worker::{drain_eventfd, EpollCtx, EpollHandler, EventToken, WorkerError};
use crate::GuestMemoryMmap;

mod snapshot;

/// Longest tag (the config field is 36 bytes).
pub const MAX_TAG_LEN: usize = 36;
/// Default queue size.
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;

/// Errors setting up virtio-fs.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is empty, too long or contains NUL.
    #[error("invalid virtio-fs tag {0:?}")]
    InvalidTag(String),
    /// Queue counts or sizes are out of range.
    #[error("invalid queue configuration")]
    InvalidQueues,
    /// The backend socket could not be reached or refused the handshake.
    #[error("vhost-user backend at {path}")]
    Backend {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: vhost::Error,
    },
    /// The backend lacks a feature virtio-fs needs.
    #[error("vhost-user backend does not offer VIRTIO_F_VERSION_1")]
    NoVersion1,
}

/// One shared directory.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// Mount tag seen by the guest (`mount -t virtiofs TAG /mnt`).
    pub tag: String,
    /// virtiofsd's vhost-user socket.
    pub socket: PathBuf,
    /// Request queues (besides the high-priority queue).
    pub num_request_queues: u16,
    /// Size of each queue (power of two).
    pub queue_size: u16,
}

impl FsConfig {
    /// One request queue of [`DEFAULT_QUEUE_SIZE`].
    pub fn new(tag: &str, socket: PathBuf) -> Self {
        FsConfig {
            tag: tag.to_string(),
            socket,
            num_request_queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
        }
    }
}

/// The virtio-fs device (vhost-user frontend).
pub struct Fs {
    config: [u8; 40],
    socket: PathBuf,
    frontend: Frontend,
    backend_features: u64,
    protocol: bool,
    /// The backend can save and load its state
    /// (`VHOST_USER_PROTOCOL_F_DEVICE_STATE`).
    device_state: bool,
    acked_features: u64,
    queue_sizes: Vec<u16>,
    started: Vec<usize>,
    /// The rings of the active device (to start them again after a
    /// snapshot stopped them) and the memory they live in.
    rings: Vec<Ring>,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    /// Set by `pause`: rings started now are enabled only on `resume`
    /// (a device activated from a snapshot must not interrupt the guest
    /// before its vCPUs are restored).
    paused: bool,
    /// Started rings waiting for `resume` to be enabled.
    pending_enable: Vec<usize>,
    /// The backend's state taken by the last snapshot.
    saved_state: Option<Vec<u8>>,
    life: Lifecycle<CallForwarder>,
}

/// A ring as the driver programmed it, and its eventfds.
struct Ring {
    index: usize,
    size: u16,
    max_size: u16,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    kick: EventFd,
    call: EventFd,
}

fn backend_err(path: &std::path::Path) -> impl Fn(vhost::Error) -> FsError + '_ {
    move |source| FsError::Backend {
        path: path.to_path_buf(),
        source,
    }
}

impl Fs {
    /// Connects to the backend and negotiates what can be before the guest
    /// driver shows up.
    pub fn new(cfg: &FsConfig) -> Result<Self, FsError> {
        let tag = cfg.tag.as_bytes();
        if tag.is_empty() || tag.len() > MAX_TAG_LEN || tag.contains(&0) {
            return Err(FsError::InvalidTag(cfg.tag.clone()));
        }
        if cfg.num_request_queues == 0
            || cfg.num_request_queues > 64
            || !cfg.queue_size.is_power_of_two()
        {
            return Err(FsError::InvalidQueues);
        }
        let num_queues = usize::from(cfg.num_request_queues) + 1;
        let err = backend_err(&cfg.socket);
        let mut frontend = Frontend::connect(&cfg.socket, num_queues as u64).map_err(&err)?;
        frontend.set_owner().map_err(&err)?;
        let backend_features = frontend.get_features().map_err(&err)?;
        if backend_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(FsError::NoVersion1);
        }
        let protocol = backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        let mut device_state = false;
        if protocol {
            let offered = frontend.get_protocol_features().map_err(&err)?;
            let wanted = VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::DEVICE_STATE;
            frontend
                .set_protocol_features(offered & wanted)
                .map_err(&err)?;
            device_state = offered.contains(VhostUserProtocolFeatures::DEVICE_STATE);
            if offered.contains(VhostUserProtocolFeatures::MQ) {
                let max = frontend.get_queue_num().map_err(&err)?;
                if max < num_queues as u64 {
                    return Err(FsError::InvalidQueues);
                }
            }
        }
        let mut config = [0u8; 40];
        config[..tag.len()].copy_from_slice(tag);
        config[36..40].copy_from_slice(&u32::from(cfg.num_request_queues).to_le_bytes());
        Ok(Fs {
            config,
            socket: cfg.socket.clone(),
            frontend,
            backend_features,
            protocol,
            device_state,
            acked_features: 0,
            queue_sizes: vec![cfg.queue_size; num_queues],
            started: Vec::new(),
            rings: Vec::new(),
            mem: None,
            paused: false,
            pending_enable: Vec::new(),
            saved_state: None,
            life: Lifecycle::new("virtio-fs"),
        })
    }

    fn setup_backend(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &[ActiveQueue],
        calls: &[EventFd],
    ) -> Result<(), ActivateError> {
        let features = self.acked_features
            | (self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits());
        let fe = &mut self.frontend;
        fe.set_features(features)
            .map_err(ActivateError::VhostUser)?;
        let mut regions = Vec::new();
        for region in mem.iter() {
            let info = VhostUserMemoryRegionInfo::from_guest_region(region)
                .map_err(|_| ActivateError::MemoryNotShareable(region.start_addr().0))?;
            regions.push(info);
        }
        fe.set_mem_table(&regions)
            .map_err(ActivateError::VhostUser)?;
        let mut rings = Vec::with_capacity(queues.len());
        let mut bases = Vec::with_capacity(queues.len());
        for (q, call) in queues.iter().zip(calls) {
            let queue = &q.queue;
            rings.push(Ring {
                index: q.index,
                size: queue.size(),
                max_size: queue.max_size(),
                desc_table: queue.desc_table(),
                avail_ring: queue.avail_ring(),
                used_ring: queue.used_ring(),
                kick: q.event.try_clone().map_err(ActivateError::Io)?,
                call: call.try_clone().map_err(ActivateError::Io)?,
            });
            bases.push(queue.next_avail());
        }
        self.rings = rings;
        self.start_rings(mem, &bases)
    }

    /// Starts every ring of `self.rings` at its base in `bases` (same
    /// order). Rings are enabled now, or on `resume` while paused.
    fn start_rings(&mut self, mem: &GuestMemoryMmap, bases: &[u16]) -> Result<(), ActivateError> {
        let fe = &mut self.frontend;
        for (ring, base) in self.rings.iter().zip(bases) {
            let hva = |a: u64| {
                mem.get_host_address(GuestAddress(a))
                    .map(|p| p as u64)
                    .map_err(|_| ActivateError::BadQueueAddress(a))
            };
            let config = VringConfigData {
                queue_max_size: ring.max_size,
                queue_size: ring.size,
                flags: 0,
                desc_table_addr: hva(ring.desc_table)?,
                used_ring_addr: hva(ring.used_ring)?,
                avail_ring_addr: hva(ring.avail_ring)?,
                log_addr: None,
            };
            let i = ring.index;
            // From its first message on, the ring counts as started: a
            // failure below stops it again.
            self.started.push(i);
            fe.set_vring_num(i, ring.size)
                .map_err(ActivateError::VhostUser)?;
            fe.set_vring_addr(i, &config)
                .map_err(ActivateError::VhostUser)?;
            fe.set_vring_base(i, *base)
                .map_err(ActivateError::VhostUser)?;
            fe.set_vring_call(i, &ring.call)
                .map_err(ActivateError::VhostUser)?;
            fe.set_vring_kick(i, &ring.kick)
                .map_err(ActivateError::VhostUser)?;
            if self.protocol {
                if self.paused {
                    self.pending_enable.push(i);
                } else {
                    fe.set_vring_enable(i, true)
                        .map_err(ActivateError::VhostUser)?;
                }
            }
        }
        Ok(())
    }

    /// The backend socket path.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn features(&self) -> u64 {
        self.backend_features & (RING_FEATURES | 1 << VIRTIO_F_VERSION_1)
    }
    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn activate(
        &mut self,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if self.life.is_active() {
            return Err(ActivateError::AlreadyActive);
        }
        // Where the interrupt layer offers an eventfd per vector (an irqfd),
        // the backend signals it directly; otherwise we forward.
        let mut calls = Vec::new();
        let mut forwarded = Vec::new();
        for q in &queues {
            let index = q.index as u16;
            match interrupt.notifier(VirtioInterruptType::Queue(index)) {
                Some(fd) => calls.push(fd),
                None => {
                    let fd = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Io)?;
                    forwarded.push((index, fd.try_clone().map_err(ActivateError::Io)?));
                    calls.push(fd);
                }
            }
        }
        let handler = CallForwarder {
            interrupt: self.life.counting(interrupt),
            calls: forwarded,
        };
        let started = self
            .setup_backend(&mem.memory(), &queues, &calls)
            .and_then(|()| self.life.start(handler));
        if started.is_err() {
            self.stop_rings();
        } else {
            self.mem = Some(mem);
        }
        started
    }
    fn reset(&mut self) -> bool {
        self.life.stop();
        self.stop_rings();
        self.acked_features = 0;
        true
    }
    /// Rings already served go on: they are served by virtiofsd's threads,
    /// which vhost-user cannot park (stopping the rings with
    /// `GET_VRING_BASE` would lose in-flight requests), and parking only
    /// our call forwarder would merely delay interrupts; the backend may
    /// touch guest memory while the VM is paused. Rings started while
    /// paused (a restore, the end of a snapshot) are enabled on `resume`.
    fn pause(&mut self) {
        self.paused = true;
    }
    /// Enables the rings started while paused.
    fn resume(&mut self) {
        self.paused = false;
        for i in std::mem::take(&mut self.pending_enable) {
            if let Err(e) = self.frontend.set_vring_enable(i, true) {
                log::error!("virtio-fs: enable ring {i}: {e}");
            }
        }
    }
    /// `interrupts`: the backend's completions we forwarded (zero when the
    /// backend signals the guest's irqfds directly).
    fn counters(&self) -> BTreeMap<&'static str, u64> {
        with_interrupts(BTreeMap::new(), &self.life)
    }
    /// Stops the rings, takes virtiofsd's state and starts them again (see
    /// [`snapshot`]).
    fn queue_progress(&mut self) -> Result<Vec<QueueProgress>, StateError> {
        self.snapshot_rings()
    }
    fn backend_state(&mut self) -> Option<Vec<u8>> {
        self.saved_state.take()
    }
    fn restoring(&mut self, backend_state: Option<&[u8]>) -> Result<(), StateError> {
        match backend_state {
            Some(state) => self.load_backend_state(state),
            None => Ok(()),
        }
    }
}

impl Fs {
    /// Stops the backend's started rings; it keeps its state for the next
    /// activation, which sends everything again.
    fn stop_rings(&mut self) {
        self.halt_rings();
        self.rings.clear();
        self.mem = None;
    }

    /// Disables and stops every started ring; returns the backend's next
    /// available index of each (`None` where it did not answer).
    fn halt_rings(&mut self) -> Vec<(usize, Option<u16>)> {
        self.pending_enable.clear();
        let mut bases = Vec::new();
        for i in std::mem::take(&mut self.started) {
            if self.protocol {
                if let Err(e) = self.frontend.set_vring_enable(i, false) {
                    log::warn!("virtio-fs: disable ring {i}: {e}");
                }
            }
            match self.frontend.get_vring_base(i) {
                Ok(base) => bases.push((i, Some(base as u16))),
                Err(e) => {
                    log::warn!("virtio-fs: stop ring {i}: {e}");
                    bases.push((i, None));
                }
            }
        }
        bases
    }
}

/// The event of a [`CallForwarder`]: the call eventfd at this position in
/// its list fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallSlot(usize);

impl EventToken for CallSlot {
    fn to_raw(self) -> u64 {
        self.0 as u64
    }
    fn from_raw(raw: u64) -> Option<Self> {
        usize::try_from(raw).ok().map(CallSlot)
    }
}

/// Forwards the backend's "used buffers" eventfds to the guest interrupt.
pub struct CallForwarder {
    interrupt: Arc<dyn VirtioInterrupt>,
    calls: Vec<(u16, EventFd)>,
}

impl EpollHandler for CallForwarder {
    type Token = CallSlot;

    fn register(&mut self, ctx: &EpollCtx<CallSlot>) -> io::Result<()> {
        for (slot, (_, fd)) in self.calls.iter().enumerate() {
            ctx.add(fd.as_raw_fd(), CallSlot(slot), EventSet::IN)?;
        }
        Ok(())
    }

    fn handle_event(
        &mut self,
        _ctx: &EpollCtx<CallSlot>,
        CallSlot(slot): CallSlot,
        _events: EventSet,
    ) -> Result<(), WorkerError> {
        let Some((queue, fd)) = self.calls.get(slot) else {
            log::error!("virtio-fs: unknown call slot {slot}");
            return Ok(());
        };
        drain_eventfd(fd);
        if let Err(e) = self.interrupt.trigger(VirtioInterruptType::Queue(*queue)) {
            log::warn!("virtio-fs: interrupt for queue {queue}: {e}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
