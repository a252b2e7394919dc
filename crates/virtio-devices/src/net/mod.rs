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
use crate::ratelimit::LogLimiter;
use crate::worker::{
    drain_eventfd, next_chain, signal_used_queue, spawn_worker, EpollCtx, EpollHandler,
    WorkerError, WorkerHandle, WorkerQueue, CHAIN_BUDGET,
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

/// The virtio-net device.
pub struct Net {
    log: Arc<LogLimiter>,
    backend: File,
    mac: [u8; 6],
    acked_features: u64,
    worker: Option<WorkerHandle>,
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
            worker: None,
        }
    }

    /// The MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
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
            dropped: 0,
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
    fn activate(
        &mut self,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        let handler = self.handler(mem, interrupt, queues)?;
        self.worker = Some(spawn_worker("virtio-net", handler)?);
        Ok(())
    }
    fn reset(&mut self) -> bool {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
        self.acked_features = 0;
        true
    }
}

/// Events of the net worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    RxQueue = 0,
    TxQueue = 1,
    Tap = 2,
}

impl Token {
    fn from_u64(v: u64) -> Option<Token> {
        [Token::RxQueue, Token::TxQueue, Token::Tap]
            .into_iter()
            .find(|t| *t as u64 == v)
    }
}

struct NetHandler {
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
    dropped: u64,
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
    fn process_tx(&mut self, ctx: &EpollCtx) -> Result<(), WorkerError> {
        let mem = self.mem.memory();
        let (tap, dropped, log) = (&mut self.tap, &mut self.dropped, &*self.log);
        let irq = self.interrupt.as_ref();
        self.tx.serve(ctx, "virtio-net", irq, |q| {
            q.process(&mem, irq, |chain| {
                let Some(frame) = read_tx_frame(&mem, chain, log) else {
                    *dropped += 1;
                    return 0;
                };
                if let Err(e) = tap.write(&frame) {
                    // A full tap queue drops the frame, as a NIC would.
                    crate::guest_log!(log, log::Level::Debug, "virtio-net: tap write: {e}");
                    *dropped += 1;
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
        dropped: &mut u64,
        log: &LogLimiter,
    ) -> Result<Delivery, WorkerError> {
        let Some(chain) = next_chain(&mut queue.queue, mem)? else {
            return Ok(Delivery::NoBuffer);
        };
        let head = chain.head_index();
        let len = write_frame(mem, chain, frame, log);
        if len == 0 {
            *dropped += 1;
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
    fn process_rx(&mut self, ctx: &EpollCtx) -> Result<(), WorkerError> {
        let mem = self.mem.memory();
        let irq = self.interrupt.as_ref();
        let (tap, frame, dropped) = (&mut self.tap, &mut self.frame, &mut self.dropped);
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
                match Self::deliver(q, &mem, frame, dropped, log)? {
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
                ctx.add(fd, Token::Tap as u64, EventSet::IN)
            } else {
                ctx.remove(fd)
            };
            r.map_err(WorkerError::Epoll)?;
            self.tap_watched = want;
        }
        Ok(())
    }
}

impl EpollHandler for NetHandler {
    fn register(&mut self, ctx: &EpollCtx) -> io::Result<()> {
        ctx.add(
            self.rx.event.as_raw_fd(),
            Token::RxQueue as u64,
            EventSet::IN,
        )?;
        ctx.add(
            self.tx.event.as_raw_fd(),
            Token::TxQueue as u64,
            EventSet::IN,
        )?;
        ctx.add(self.tap.as_raw_fd(), Token::Tap as u64, EventSet::IN)
    }

    fn handle_event(
        &mut self,
        ctx: &EpollCtx,
        token: u64,
        _events: EventSet,
    ) -> Result<(), WorkerError> {
        match Token::from_u64(token) {
            Some(Token::RxQueue) => {
                drain_eventfd(&self.rx.event);
                self.process_rx(ctx)?;
            }
            Some(Token::TxQueue) => {
                drain_eventfd(&self.tx.event);
                self.process_tx(ctx)?;
            }
            Some(Token::Tap) => self.process_rx(ctx)?,
            None => log::warn!("virtio-net: unknown token {token}"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::*;
    use crate::worker::EventLoop;
    use std::os::unix::net::UnixDatagram;
    use vmm_sys_util::eventfd::EventFd;

    struct Fx {
        _net: Net,
        peer: UnixDatagram,
        txq: TestQueue,
        tx_kick: EventFd,
    }

    fn fixture() -> Fx {
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let mem = single_region_mem(0x40_0000);
        let rxq = TestQueue::new(&mem, 0, 16, 0x1_0000);
        let txq = TestQueue::new(&mem, 0x1000, 16, 0x20_0000);
        let (rx, tx) = (rxq.active(0), txq.active(1));
        let tx_kick = tx.event.try_clone().unwrap();
        let mut net = Net::with_backend(
            tap::raw_backend(OwnedFd::from(a)),
            parse_mac("52:54:00:12:34:56").unwrap(),
        );
        net.activate(atomic_mem(&mem), recorder(), vec![rx, tx])
            .unwrap();
        Fx {
            _net: net,
            peer: b,
            txq,
            tx_kick,
        }
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn mac_parsing_and_config() {
        assert_eq!(
            parse_mac("52:54:00:ab:CD:ef").unwrap(),
            [0x52, 0x54, 0, 0xab, 0xcd, 0xef]
        );
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:00",
            "5:54:00:ab:cd:ef",
            "zz:54:00:ab:cd:ef",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        let (a, _b) = UnixDatagram::pair().unwrap();
        let net = Net::with_backend(tap::raw_backend(OwnedFd::from(a)), generated_mac(7));
        let mut cfg = [0u8; 8];
        net.read_config(0, &mut cfg);
        assert_eq!(&cfg[..6], &[0x52, 0x54, 0, 0, 0, 7]);
        assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
    }

    #[test]
    fn tx_frames_reach_the_tap() {
        let mut fx = fixture();
        let f = frame(b"\xff\xff\xff\xff\xff\xffethernet frame");
        // Header and payload in separate descriptors.
        let (_, addrs) = fx.txq.add_chain(&[
            (Readable, VNET_HDR_LEN as u32),
            (Readable, (f.len() - VNET_HDR_LEN) as u32),
        ]);
        fx.txq.write(addrs[0], &f[..VNET_HDR_LEN]);
        fx.txq.write(addrs[1], &f[VNET_HDR_LEN..]);
        fx.tx_kick.write(1).unwrap();
        let mut buf = [0u8; 256];
        let n = fx.peer.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &f[..]);
        // A runt without a full header is dropped, not sent.
        fx.txq.add_chain(&[(Readable, 4)]);
        fx.tx_kick.write(1).unwrap();
        assert!(wait_until(|| fx.txq.used_idx() == 2));
    }

    /// Driven directly, so "nothing was delivered" is a fact: frames wait
    /// in the tap until the guest posts buffers.
    #[test]
    fn rx_frames_wait_for_buffers() {
        let (a, peer) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mem = single_region_mem(0x40_0000);
        let mut rxq = TestQueue::new(&mem, 0, 16, 0x1_0000);
        let txq = TestQueue::new(&mem, 0x1000, 16, 0x20_0000);
        let (rx, tx) = (rxq.active(0), txq.active(1));
        let rx_kick = rx.event.try_clone().unwrap();
        let net = Net::with_backend(tap::raw_backend(OwnedFd::from(a)), generated_mac(6));
        let handler = net
            .handler(atomic_mem(&mem), recorder(), vec![rx, tx])
            .unwrap();
        let mut el = EventLoop::new(handler).unwrap();
        peer.send(&frame(b"first")).unwrap();
        peer.send(&frame(b"second")).unwrap();
        el.run_until_idle(10).unwrap();
        assert_eq!(rxq.used_idx(), 0);
        let (_, a1) = rxq.add_chain(&[(Writable, 1526)]);
        let (_, a2) = rxq.add_chain(&[(Writable, 1526)]);
        rx_kick.write(1).unwrap();
        el.run_until_idle(10).unwrap();
        assert_eq!(rxq.used_idx(), 2);
        assert_eq!(rxq.used_entry(0).1 as usize, VNET_HDR_LEN + 5);
        let got = rxq.read(a1[0], VNET_HDR_LEN + 5);
        assert_eq!(&got[VNET_HDR_LEN..], b"first");
        assert_eq!(&got[10..12], &[1, 0], "num_buffers = 1");
        assert_eq!(
            &rxq.read(a2[0], VNET_HDR_LEN + 6)[VNET_HDR_LEN..],
            b"second"
        );
        // Too small a buffer: the frame is dropped, the buffer returned empty.
        peer.send(&frame(&[0u8; 100])).unwrap();
        rxq.add_chain(&[(Writable, 20)]);
        rx_kick.write(1).unwrap();
        el.run_until_idle(10).unwrap();
        assert_eq!(rxq.used_idx(), 3);
        assert_eq!(rxq.used_entry(2).1, 0);
    }

    #[test]
    fn corrupt_rx_ring_does_not_block_reset() {
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.send(&frame(b"waiting")).unwrap();
        let mem = single_region_mem(0x40_0000);
        let mut rxq = TestQueue::new(&mem, 0, 16, 0x1_0000);
        let txq = TestQueue::new(&mem, 0x1000, 16, 0x20_0000);
        rxq.set_avail_idx(1000);
        let mut net = Net::with_backend(tap::raw_backend(OwnedFd::from(a)), generated_mac(3));
        net.activate(
            atomic_mem(&mem),
            recorder(),
            vec![rxq.active(0), txq.active(1)],
        )
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(within(5, move || net.reset()));
        assert_eq!(rxq.used_idx(), 0);
    }

    /// Driven directly: the corrupt receive ring is given up after one
    /// turn, logged once, the driver asked for a reset, and transmit
    /// still works.
    #[test]
    fn corrupt_rx_ring_stops_only_that_queue() {
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        for _ in 0..3 {
            b.send(&frame(b"waiting")).unwrap();
        }
        let mem = single_region_mem(0x40_0000);
        let mut rxq = TestQueue::new(&mem, 0, 16, 0x1_0000);
        let mut txq = TestQueue::new(&mem, 0x1000, 16, 0x20_0000);
        rxq.set_avail_idx(1000);
        let (rx, tx) = (rxq.active(0), txq.active(1));
        let (rx_kick, tx_kick) = (rx.event.try_clone().unwrap(), tx.event.try_clone().unwrap());
        let net = Net::with_backend(tap::raw_backend(OwnedFd::from(a)), generated_mac(3));
        let irq = recorder();
        let handler = net
            .handler(atomic_mem(&mem), irq.clone(), vec![rx, tx])
            .unwrap();
        let ((turns, mut el), logs) = within(5, move || {
            capture_logs(|| {
                let mut el = EventLoop::new(handler).unwrap();
                for _ in 0..3 {
                    rx_kick.write(1).unwrap();
                    el.run_until_idle(10).unwrap();
                }
                (el.run_until_idle(10).unwrap(), el)
            })
        });
        assert_eq!(turns, 0, "nothing left to do");
        let broken: Vec<_> = logs.iter().filter(|l| l.contains("stopped")).collect();
        assert_eq!(broken.len(), 1, "{logs:?}");
        assert_eq!(rxq.used_idx(), 0);
        assert_eq!(irq.needs_reset.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Transmit is unaffected.
        let f = frame(b"still here");
        let (_, addrs) = txq.add_chain(&[(Readable, f.len() as u32)]);
        txq.write(addrs[0], &f);
        tx_kick.write(1).unwrap();
        el.run_until_idle(10).unwrap();
        assert_eq!(txq.used_idx(), 1);
        b.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        let n = b.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], &f[..]);
    }

    /// The backend hangs up (read returns 0): the worker neither loops in
    /// `read_frame` nor spins on the level-triggered end-of-file, logs it
    /// once, and transmit is still served.
    #[test]
    fn backend_eof_is_not_a_loop() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        drop(b);
        let mem = single_region_mem(0x40_0000);
        let rxq = TestQueue::new(&mem, 0, 16, 0x1_0000);
        let mut txq = TestQueue::new(&mem, 0x1000, 16, 0x20_0000);
        let (rx, tx) = (rxq.active(0), txq.active(1));
        let tx_kick = tx.event.try_clone().unwrap();
        let net = Net::with_backend(tap::raw_backend(OwnedFd::from(a)), generated_mac(4));
        let handler = net
            .handler(atomic_mem(&mem), recorder(), vec![rx, tx])
            .unwrap();
        let ((turns, mut el), logs) = within(5, move || {
            capture_logs(|| {
                let mut el = EventLoop::new(handler).unwrap();
                (el.run_until_idle(10).unwrap(), el)
            })
        });
        assert!(turns < 10, "still busy after {turns} turns");
        let eof: Vec<_> = logs.iter().filter(|l| l.contains("hung up")).collect();
        assert_eq!(eof.len(), 1, "{logs:?}");
        txq.add_chain(&[(Readable, 4)]);
        tx_kick.write(1).unwrap();
        el.run_until_idle(10).unwrap();
        assert_eq!(txq.used_idx(), 1);
    }

    /// Bad transmit chains by the hundred log a bounded number of lines.
    #[test]
    fn bad_tx_chains_are_logged_at_a_bounded_rate() {
        let (a, _b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mem = single_region_mem(0x40_0000);
        let rxq = TestQueue::new(&mem, 0, 16, 0x1_0000);
        let mut txq = TestQueue::new(&mem, 0x1000, 16, 0x20_0000);
        let (rx, tx) = (rxq.active(0), txq.active(1));
        let tx_kick = tx.event.try_clone().unwrap();
        let net = Net::with_backend(tap::raw_backend(OwnedFd::from(a)), generated_mac(5));
        let handler = net
            .handler(atomic_mem(&mem), recorder(), vec![rx, tx])
            .unwrap();
        let mut el = EventLoop::new(handler).unwrap();
        let ((), logs) = capture_logs(|| {
            for _ in 0..20 {
                for _ in 0..10 {
                    txq.add_raw_chain(&[(0x4000_0000, 64, Readable)]);
                }
                tx_kick.write(1).unwrap();
                el.run_until_idle(10).unwrap();
            }
        });
        assert_eq!(txq.used_idx(), 200);
        let limit = crate::ratelimit::LINES_PER_SECOND as usize;
        assert!(
            logs.len() <= limit + 1,
            "{} lines: {:?}",
            logs.len(),
            &logs[..3]
        );
    }

    #[test]
    fn real_tap_opens_when_permitted() {
        match tap::open_tap("skifftest0") {
            Ok(t) => {
                let flags = std::fs::read_to_string("/sys/class/net/skifftest0/flags").unwrap();
                let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
                assert_eq!(flags & 1, 1, "IFF_UP set");
                let net = Net::with_backend(t, generated_mac(1));
                assert_eq!(net.mac()[0], 0x52);
            }
            // Unprivileged environments cannot create taps.
            Err(e @ (TapError::OpenTun(_) | TapError::Ioctl { .. })) => {
                eprintln!("SKIPPED: real_tap_opens_when_permitted: cannot create a tap: {e}");
            }
            Err(e) => panic!("{e}"),
        }
        assert!(matches!(
            tap::open_tap("this-name-is-too-long"),
            Err(TapError::InvalidName(_))
        ));
    }

    /// The kernel answers an ARP request sent by the guest through a real
    /// tap: the virtio-net header and frame layout match what the tap
    /// expects, both ways. Needs CAP_NET_ADMIN and `ip`; otherwise it
    /// only checks that the tap cannot be opened.
    #[test]
    fn kernel_answers_arp_through_a_real_tap() {
        let name = format!("skt{}", std::process::id() % 100_000);
        let tap = match tap::open_tap(&name) {
            Ok(tap) => tap,
            Err(e) => {
                eprintln!("SKIPPED: kernel_answers_arp_through_a_real_tap: no tap ({e}; needs CAP_NET_ADMIN and /dev/net/tun)");
                return;
            }
        };
        let subnet = 10 + std::process::id() % 200;
        let host_ip = [10, 99, subnet as u8, 1];
        let guest_ip = [10, 99, subnet as u8, 2];
        let ok = std::process::Command::new("ip")
            .args(["addr", "add", &format!("10.99.{subnet}.1/24"), "dev", &name])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIPPED: kernel_answers_arp_through_a_real_tap: `ip addr add` failed");
            return;
        }
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let mem = single_region_mem(0x40_0000);
        let rxq = TestQueue::new(&mem, 0, 64, 0x1_0000);
        let mut txq = TestQueue::new(&mem, 0x2000, 16, 0x20_0000);
        let (rx, tx) = (rxq.active(0), txq.active(1));
        let rx_kick = rx.event.try_clone().unwrap();
        let tx_kick = tx.event.try_clone().unwrap();
        let mut net = Net::with_backend(tap, mac);
        net.activate(atomic_mem(&mem), recorder(), vec![rx, tx])
            .unwrap();
        let mut rxq = rxq;
        let bufs: Vec<u64> = (0..32)
            .map(|_| rxq.add_chain(&[(Writable, 1526)]).1[0])
            .collect();
        rx_kick.write(1).unwrap();

        let mut frame = vec![0u8; VNET_HDR_LEN];
        frame.extend_from_slice(&[0xff; 6]);
        frame.extend_from_slice(&mac);
        frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        frame.extend_from_slice(&mac);
        frame.extend_from_slice(&guest_ip);
        frame.extend_from_slice(&[0; 6]);
        frame.extend_from_slice(&host_ip);
        let (_, addrs) = txq.add_chain(&[(Readable, frame.len() as u32)]);
        txq.write(addrs[0], &frame);
        tx_kick.write(1).unwrap();

        // Other frames (IPv6 router solicitations, ...) may come first.
        let found = wait_until(|| {
            (0..rxq.used_idx()).any(|i| {
                let (head, len) = rxq.used_entry(i);
                let f = rxq.read(bufs[usize::from(head)], len as usize);
                let eth = &f[VNET_HDR_LEN..];
                eth.len() >= 42
                    && eth[..6] == mac
                    && eth[12..14] == [0x08, 0x06]
                    && eth[20..22] == [0, 2]
                    && eth[28..32] == host_ip
            })
        });
        assert!(found, "ARP reply from the host kernel");
        assert!(net.reset());
    }
}
