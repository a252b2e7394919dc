//! virtio-net over a tap device: one RX/TX queue pair, a MAC address, no
//! offloads (every frame fits a plain 1514-byte buffer plus header).

pub mod tap;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::io::{AsRawFd, OwnedFd};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::{DescriptorChain, QueueT, Reader, Writer};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;

use crate::device::{
    read_config_bytes, take_queue, ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt,
};
use crate::lifecycle::{device_counters, Lifecycle, WorkerDevice};
use crate::ratelimit::LogLimiter;
use crate::worker::{
    drain_eventfd, enum_tokens, next_chain, signal_used_queue, EpollCtx, EpollHandler, WorkerError,
    WorkerQueue, CHAIN_BUDGET,
};
use crate::GuestMemoryMmap;
use tap::{TapError, VNET_HDR_LEN};

const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
/// Largest frame (with header) moved in either direction.
pub const MAX_FRAME: usize = 65562;

/// Errors creating a net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap could not be opened or configured.
    #[error("tap device")]
    Tap(#[source] TapError),
    /// The MAC address string is malformed.
    #[error("invalid MAC address {0:?}")]
    InvalidMac(String),
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], NetError> {
    let bad = || NetError::InvalidMac(s.to_string());
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

/// A locally administered unicast MAC derived from `seed`.
pub fn generated_mac(seed: u32) -> [u8; 6] {
    let s = seed.to_be_bytes();
    [0x52, 0x54, s[0], s[1], s[2], s[3]]
}

device_counters! {
    /// What the net device did.
    pub struct NetCounters {
        /// Queue notifications handled (receive and transmit).
        notifications,
        /// Frames sent from the guest to the tap.
        tx_frames,
        /// Bytes of those frames (virtio-net headers included).
        tx_bytes,
        /// Frames delivered from the tap to the guest.
        rx_frames,
        /// Bytes of those frames (headers included).
        rx_bytes,
        /// Frames dropped either way (bad chains, small buffers, full tap).
        dropped,
    }
}

/// The virtio-net device.
pub struct Net {
    log: Arc<LogLimiter>,
    backend: File,
    mac: [u8; 6],
    acked_features: u64,
    life: Lifecycle<NetHandler>,
    counters: Arc<NetCounters>,
}

impl Net {
    /// A device on the tap `name` (created if missing).
    pub fn with_tap_name(name: &str, mac: [u8; 6]) -> Result<Self, NetError> {
        Ok(Self::with_backend(
            tap::open_tap(name).map_err(NetError::Tap)?,
            mac,
        ))
    }

    /// A device on an inherited tap fd.
    pub fn with_tap_fd(fd: OwnedFd, mac: [u8; 6]) -> Result<Self, NetError> {
        Ok(Self::with_backend(
            tap::tap_from_fd(fd).map_err(NetError::Tap)?,
            mac,
        ))
    }

    /// A device on any non-blocking fd that carries one frame (with its
    /// 12-byte virtio-net header) per read and write.
    pub fn with_backend(backend: File, mac: [u8; 6]) -> Self {
        Net {
            log: Arc::new(LogLimiter::new("virtio-net")),
            backend,
            mac,
            acked_features: 0,
            life: Lifecycle::new("virtio-net"),
            counters: Arc::default(),
        }
    }

    /// The MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }
}

impl WorkerDevice for Net {
    type Handler = NetHandler;
    fn lifecycle(&mut self) -> &mut Lifecycle<NetHandler> {
        &mut self.life
    }
    fn handler(
        &self,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        mut queues: Vec<ActiveQueue>,
    ) -> Result<NetHandler, ActivateError> {
        let rx = take_queue(&mut queues, RX_QUEUE)?;
        let tx = take_queue(&mut queues, TX_QUEUE)?;
        Ok(NetHandler {
            mem,
            interrupt,
            rx: rx.into(),
            tx: tx.into(),
            tap: self.backend.try_clone().map_err(ActivateError::Io)?,
            frame: Vec::new(),
            tap_watched: true,
            tap_gone: false,
            counters: self.counters.clone(),
            log: self.log.clone(),
        })
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }
    fn features(&self) -> u64 {
        1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS | crate::device::RING_FEATURES
    }
    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 10];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        read_config_bytes(&cfg, offset, data);
    }
    crate::lifecycle::lifecycle_methods!(snapshot);
    /// Another MAC is fine (a clone of a snapshot gets its own): Linux
    /// reads the MAC only at probe, so the guest keeps the old one until
    /// it is told (the agent's `network` request with `mac`).
    fn config_restorable(&self, saved: &[u8], now: &[u8]) -> bool {
        saved.len() == now.len() && saved.get(6..) == now.get(6..)
    }
    fn reset(&mut self) -> bool {
        self.reset_worker();
        self.acked_features = 0;
        true
    }
}

/// Events of the net worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    /// The guest added receive buffers.
    RxQueue,
    /// The guest queued frames to send.
    TxQueue,
    /// The tap has frames.
    Tap,
}
enum_tokens!(Token: RxQueue, TxQueue, Tap);

/// The net worker's handler.
pub struct NetHandler {
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    interrupt: Arc<dyn VirtioInterrupt>,
    rx: WorkerQueue,
    tx: WorkerQueue,
    tap: File,
    /// A frame read from the tap, waiting for a receive buffer.
    frame: Vec<u8>,
    tap_watched: bool,
    /// The backend returned end-of-file.
    tap_gone: bool,
    counters: Arc<NetCounters>,
    log: Arc<LogLimiter>,
}

/// The frame (with its virtio-net header) in a TX chain, if the chain is
/// valid and the frame between a header and [`MAX_FRAME`] long.
pub fn read_tx_frame(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    log: &LogLimiter,
) -> Option<Vec<u8>> {
    let mut reader = match Reader::new(mem, chain) {
        Ok(r) => r,
        Err(e) => {
            crate::guest_log!(log, log::Level::Warn, "virtio-net: bad tx chain: {e}");
            return None;
        }
    };
    let len = reader.available_bytes();
    if !(VNET_HDR_LEN..=MAX_FRAME).contains(&len) {
        crate::guest_log!(
            log,
            log::Level::Debug,
            "virtio-net: tx frame of {len} bytes dropped"
        );
        return None;
    }
    let mut frame = vec![0u8; len];
    if let Err(e) = reader.read_exact(&mut frame) {
        crate::guest_log!(log, log::Level::Warn, "virtio-net: {e}");
        return None;
    }
    Some(frame)
}

/// Copies `frame` into a receive chain; 0 if it does not fit or the chain
/// is bad (the frame is then dropped).
fn write_frame(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    frame: &[u8],
    log: &LogLimiter,
) -> u32 {
    let mut w = match Writer::new(mem, chain) {
        Ok(w) => w,
        Err(e) => {
            crate::guest_log!(log, log::Level::Warn, "virtio-net: bad rx chain: {e}");
            return 0;
        }
    };
    if w.available_bytes() < frame.len() {
        crate::guest_log!(
            log,
            log::Level::Debug,
            "virtio-net: rx buffer too small for {} bytes",
            frame.len()
        );
        return 0;
    }
    match w.write_all(frame) {
        Ok(()) => frame.len() as u32,
        Err(e) => {
            crate::guest_log!(log, log::Level::Warn, "virtio-net: {e}");
            0
        }
    }
}

/// What the tap gave.
enum TapRead {
    /// A frame (with its header).
    Frame(Vec<u8>),
    /// Nothing now (or only runts, skipped; a still readable tap brings
    /// the worker back).
    Nothing,
    /// The backend hung up: it will never give anything again.
    Eof,
}

/// Runt frames skipped in one read before the worker goes back to epoll.
const MAX_RUNTS_PER_READ: usize = 64;

/// Reads the next frame from the tap.
fn read_frame(tap: &mut File) -> TapRead {
    let mut buf = vec![0u8; MAX_FRAME];
    let mut runts = 0;
    while runts < MAX_RUNTS_PER_READ {
        match tap.read(&mut buf) {
            Ok(0) => return TapRead::Eof,
            Ok(n) if n >= VNET_HDR_LEN => {
                buf.truncate(n);
                // num_buffers is 1 without VIRTIO_NET_F_MRG_RXBUF.
                buf[10..12].copy_from_slice(&1u16.to_le_bytes());
                return TapRead::Frame(buf);
            }
            Ok(_) => runts += 1,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return TapRead::Nothing,
            Err(e) => {
                log::warn!("virtio-net: tap read: {e}");
                return TapRead::Nothing;
            }
        }
    }
    TapRead::Nothing
}

enum Delivery {
    Delivered,
    NoBuffer,
}

impl NetHandler {
    fn process_tx(&mut self, ctx: &EpollCtx<Token>) -> Result<(), WorkerError> {
        let mem = self.mem.memory();
        let (tap, counters, log) = (&mut self.tap, &*self.counters, &*self.log);
        let irq = self.interrupt.as_ref();
        self.tx.serve(ctx, "virtio-net", irq, |q| {
            q.process(&mem, irq, |chain| {
                let Some(frame) = read_tx_frame(&mem, chain, log) else {
                    counters.dropped.inc();
                    return 0;
                };
                match tap.write(&frame) {
                    Ok(_) => {
                        counters.tx_frames.inc();
                        counters.tx_bytes.add(frame.len() as u64);
                    }
                    Err(e) => {
                        // A full tap queue drops the frame, as a NIC would.
                        crate::guest_log!(log, log::Level::Debug, "virtio-net: tap write: {e}");
                        counters.dropped.inc();
                    }
                }
                0
            })
            .map(drop)
        })
    }

    /// Moves `frame` into the next receive buffer of `queue`.
    fn deliver(
        queue: &mut WorkerQueue,
        mem: &GuestMemoryMmap,
        frame: &mut Vec<u8>,
        counters: &NetCounters,
        log: &LogLimiter,
    ) -> Result<Delivery, WorkerError> {
        let Some(chain) = next_chain(&mut queue.queue, mem)? else {
            return Ok(Delivery::NoBuffer);
        };
        let head = chain.head_index();
        let len = write_frame(mem, chain, frame, log);
        if len == 0 {
            counters.dropped.inc();
        } else {
            counters.rx_frames.inc();
            counters.rx_bytes.add(u64::from(len));
        }
        queue
            .queue
            .add_used(mem, head, len)
            .map_err(WorkerError::Queue)?;
        frame.clear();
        Ok(Delivery::Delivered)
    }

    /// Reads frames from the tap into receive buffers until either runs
    /// out, or [`CHAIN_BUDGET`] frames were delivered (the tap, still
    /// readable, brings the worker back after its other events).
    fn process_rx(&mut self, ctx: &EpollCtx<Token>) -> Result<(), WorkerError> {
        let mem = self.mem.memory();
        let irq = self.interrupt.as_ref();
        let (tap, frame, counters) = (&mut self.tap, &mut self.frame, &*self.counters);
        let (tap_gone, log) = (&mut self.tap_gone, &*self.log);
        self.rx.serve(ctx, "virtio-net", irq, |q| {
            let mut used = 0;
            while used < CHAIN_BUDGET && !*tap_gone {
                if frame.is_empty() {
                    match read_frame(tap) {
                        TapRead::Frame(f) => *frame = f,
                        TapRead::Nothing => break,
                        TapRead::Eof => {
                            log::error!("virtio-net: the backend hung up, receive stopped");
                            *tap_gone = true;
                            break;
                        }
                    }
                }
                match Self::deliver(q, &mem, frame, counters, log)? {
                    Delivery::Delivered => used += 1,
                    Delivery::NoBuffer => break,
                }
            }
            if used > 0 {
                signal_used_queue(&mut q.queue, &mem, q.index as u16, irq)?;
            }
            Ok(())
        })?;
        // Stop watching the tap while a frame waits for a buffer (or the
        // receive queue is broken, or the tap hung up), so the level-triggered tap event cannot
        // spin the loop.
        let want = self.frame.is_empty() && !self.rx.is_broken() && !self.tap_gone;
        if want != self.tap_watched {
            let fd = self.tap.as_raw_fd();
            let r = if want {
                ctx.add(fd, Token::Tap, EventSet::IN)
            } else {
                ctx.remove(fd)
            };
            r.map_err(WorkerError::Epoll)?;
            self.tap_watched = want;
        }
        Ok(())
    }
}

impl crate::lifecycle::QueueOwner for NetHandler {
    fn queue_progress(&self) -> Vec<crate::state::QueueProgress> {
        [&self.rx, &self.tx]
            .into_iter()
            .map(|q| crate::state::QueueProgress::of(q.index, &q.queue))
            .collect()
    }
}

impl EpollHandler for NetHandler {
    type Token = Token;

    fn register(&mut self, ctx: &EpollCtx<Token>) -> io::Result<()> {
        ctx.add(self.rx.event.as_raw_fd(), Token::RxQueue, EventSet::IN)?;
        ctx.add(self.tx.event.as_raw_fd(), Token::TxQueue, EventSet::IN)?;
        // A worker started again over this handler (a snapshot) watches
        // the tap only if the last one did.
        if self.tap_watched {
            ctx.add(self.tap.as_raw_fd(), Token::Tap, EventSet::IN)?;
        }
        Ok(())
    }

    fn handle_event(
        &mut self,
        ctx: &EpollCtx<Token>,
        token: Token,
        _events: EventSet,
    ) -> Result<(), WorkerError> {
        match token {
            Token::RxQueue => {
                drain_eventfd(&self.rx.event);
                self.counters.notifications.inc();
                self.process_rx(ctx)?;
            }
            Token::TxQueue => {
                drain_eventfd(&self.tx.event);
                self.counters.notifications.inc();
                self.process_tx(ctx)?;
            }
            Token::Tap => self.process_rx(ctx)?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
