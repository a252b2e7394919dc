//! Entry points for the cargo-fuzz targets in `fuzz/` (feature `fuzzing`).
//!
//! Each takes raw fuzz bytes as the guest's memory image: a 16-entry split
//! queue lives at fixed addresses (descriptors at 0x0, avail ring at
//! 0x100, used ring at 0x200) and the guest controls every byte of it and
//! of the buffers, then the device's chain handler runs on whatever the
//! "driver" published.

use std::cell::RefCell;
use std::fs::File;
use std::os::unix::io::FromRawFd;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_device::interrupt::{EventFd, InterruptError, InterruptGroup, InterruptManager, MsiMessage};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};

use std::io::Write;
use std::os::unix::io::OwnedFd;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};

use vm_device::{Bus, BusDevice};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use crate::block::request::{handle_request, BlockCounters, Disk};
use crate::console::{Console, ConsoleOutput};
use crate::device::{ActiveQueue, VirtioInterrupt, VirtioInterruptType};
use crate::lifecycle::WorkerDevice;
use crate::net::Net;
use crate::pci::bus::RangeAllocator;
use crate::pci::PciDevice;
use crate::pci::{IoEventRegistrar, PciBus, PciConfigMmio};
use crate::ratelimit::LogLimiter;
use crate::rng::Rng;
use crate::transport::VirtioPciDevice;
use crate::vsock::muxer::Muxer;
use crate::vsock::packet::{read_tx_packet, Header, HDR_SIZE};
use crate::vsock::Vsock;
use crate::worker::EpollCtx;
use crate::worker::{EpollHandler, EventLoop};
use crate::{GuestMemoryMmap, VirtioDevice};

const MEM_SIZE: usize = 1 << 20;
const QUEUE_SIZE: u16 = 16;

fn guest(data: &[u8]) -> (GuestMemoryMmap, Queue) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("fuzz memory");
    let n = data.len().min(MEM_SIZE);
    mem.write_slice(&data[..n], GuestAddress(0)).expect("fits");
    let mut q = Queue::new(QUEUE_SIZE).expect("queue size");
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x100), Some(0));
    q.set_used_ring_address(Some(0x200), Some(0));
    q.set_ready(true);
    (mem, q)
}

fn run_chains(
    data: &[u8],
    mut f: impl FnMut(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>) -> u32,
) {
    let (mem, mut q) = guest(data);
    let mut rounds = 0;
    while let Some(chain) = q.pop_descriptor_chain(&mem) {
        let head = chain.head_index();
        let len = f(&mem, chain);
        let _ = q.add_used(&mem, head, len);
        rounds += 1;
        assert!(
            rounds <= usize::from(QUEUE_SIZE),
            "a queue yields at most its size per pass"
        );
    }
}

fn memfd(len: u64) -> File {
    // SAFETY: memfd_create with a static NUL-terminated name; checked below.
    let fd = unsafe { libc::memfd_create(c"fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: `fd` is a fresh descriptor we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).expect("memfd size");
    f
}

/// virtio-rng request queue.
pub fn rng(data: &[u8]) {
    let log = LogLimiter::new("fuzz");
    run_chains(data, |mem, chain| crate::rng::fill_chain(mem, chain, &log));
}

/// virtio-mem request queue: a 64-block region at 4 GiB, half of it
/// requested, whose discards always succeed; every invariant of the
/// bitmap is checked after each chain.
pub fn mem(data: &[u8]) {
    use crate::mem::{MemCounters, MemGeometry, MemState, MemoryBackend};
    struct Discard;
    impl MemoryBackend for Discard {
        fn discard(&self, _offset: u64, _len: u64) -> std::io::Result<()> {
            Ok(())
        }
    }
    const BLOCK: u64 = 2 << 20;
    let g = MemGeometry {
        addr: 1 << 32,
        region_size: 64 * BLOCK,
        block_size: BLOCK,
    };
    let mut state = MemState::new(g, Arc::new(Discard)).expect("geometry");
    state
        .set_requested_size(32 * BLOCK)
        .expect("requested size");
    let state = Mutex::new(state);
    let (log, counters) = (LogLimiter::new("fuzz"), MemCounters::default());
    run_chains(data, |mem, chain| {
        let len = crate::mem::process_chain(mem, chain, &state, &log, &counters);
        let s = state.lock().expect("state");
        assert!(s.plugged_size() <= s.geometry().region_size);
        len
    });
}

/// virtio-blk request queue against a 64 KiB disk.
pub fn block(data: &[u8]) {
    let readonly = data.first().is_some_and(|b| b & 1 != 0);
    let image = disk_image::raw::RawImage::new(
        memfd(64 * 1024),
        std::path::Path::new("fuzz-disk"),
        readonly,
    )
    .expect("memfd disk");
    let disk = Disk {
        image: Box::new(image),
        size: 64 * 1024,
        readonly,
        serial: Some(b"fuzz".to_vec()),
    };
    let log = LogLimiter::new("fuzz");
    let counters = BlockCounters::default();
    run_chains(data, |mem, chain| {
        handle_request(mem, chain, &disk, &log, &counters)
    });
}

/// virtio-net transmit queue.
pub fn net_tx(data: &[u8]) {
    let log = LogLimiter::new("fuzz");
    run_chains(data, |mem, chain| {
        crate::net::read_tx_frame(mem, chain, &log).map_or(0, |f| f.len() as u32)
    });
}

/// virtio-console transmit queue.
pub fn console_tx(data: &[u8]) {
    let log = LogLimiter::new("fuzz");
    run_chains(data, |mem, chain| {
        crate::console::read_tx_chain(mem, chain, &log).map_or(0, |t| t.len() as u32)
    });
}

/// The long-lived muxer, its epoll set, its directory and host services.
type VsockFixture = (
    Muxer,
    EpollCtx<crate::vsock::Token>,
    tempfile_dir::Dir,
    Vec<UnixListener>,
);

thread_local! {
    static MUXER: RefCell<Option<VsockFixture>> = const { RefCell::new(None) };
}

mod tempfile_dir {
    /// A private directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The vsock packet path: TX chains parsed and routed by one long-lived
/// muxer (guest CID 3, host services listening on ports 0-3), then
/// everything it queued for the guest drained into receive buffers of
/// fuzzed sizes.
pub fn vsock(data: &[u8]) {
    MUXER.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let dir = std::env::temp_dir().join(format!("skiff-vsock-fuzz-{}", std::process::id()));
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join("v.sock");
            let _ = std::fs::remove_file(&path);
            let listener = UnixListener::bind(&path).expect("bind");
            listener.set_nonblocking(true).expect("nonblocking");
            // Host services on ports 0-3, so guest connections get
            // established and their data paths run.
            let services = (0..4)
                .map(|p| {
                    UnixListener::bind(format!("{}_{p}", path.display())).expect("bind service")
                })
                .collect();
            let ctx = EpollCtx::new().expect("epoll");
            let muxer = Muxer::new(3, path, listener);
            *slot = Some((muxer, ctx, tempfile_dir::Dir(dir), services));
        }
        let Some((muxer, ctx, _, _)) = slot.as_mut() else {
            return;
        };
        run_chains(data, |mem, chain| {
            if let Ok((hdr, payload)) = read_tx_packet(mem, chain) {
                muxer.handle_tx_packet(ctx, &hdr, &payload);
            }
            0
        });
        let caps = data.get(..8).unwrap_or(&[]);
        for (i, cap) in caps.iter().cycle().take(64).enumerate() {
            let Some((h, payload)) = muxer.next_rx_packet(ctx, usize::from(*cap) * 64 + i) else {
                break;
            };
            assert!(payload.len() <= usize::from(*cap) * 64 + i);
            let _ = Header::from_bytes(&h.to_bytes());
        }
    });
}

/// A raw vsock header: parsing never panics and round-trips.
pub fn vsock_header(data: &[u8]) {
    if let Some(b) = data.get(..HDR_SIZE) {
        let mut arr = [0u8; HDR_SIZE];
        arr.copy_from_slice(b);
        let h = Header::from_bytes(&arr);
        assert_eq!(h.to_bytes(), arr);
    }
}

struct NullGroup;

impl InterruptGroup for NullGroup {
    fn len(&self) -> usize {
        8
    }
    fn trigger(&self, _index: usize) -> Result<(), InterruptError> {
        Ok(())
    }
    fn notifier(&self, _index: usize) -> Option<&EventFd> {
        None
    }
    fn update(&self, _index: usize, _msg: MsiMessage, _masked: bool) -> Result<(), InterruptError> {
        Ok(())
    }
}

struct NullManager;

impl InterruptManager for NullManager {
    fn create_msi_group(&self, _count: usize) -> Result<Arc<dyn InterruptGroup>, InterruptError> {
        Ok(Arc::new(NullGroup))
    }
}

/// The virtio-pci register files (config space and BAR0) under a stream
/// of 12-byte accesses: `kind, size, offset: u16, value: u64`.
pub fn pci(data: &[u8]) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("fuzz memory");
    let rng: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(Rng::new()));
    let Ok(mut dev) = VirtioPciDevice::new(rng, GuestMemoryAtomic::new(mem), &NullManager) else {
        return;
    };
    for op in data.chunks_exact(12) {
        let len = [1usize, 2, 4, 8][usize::from(op[1] & 3)];
        let offset = u64::from(u16::from_le_bytes([op[2], op[3]]));
        let mut value = [0u8; 8];
        value.copy_from_slice(&op[4..12]);
        match op[0] & 3 {
            0 => {
                let mut buf = [0u8; 8];
                dev.read_bar(0, offset, &mut buf[..len]);
            }
            1 => dev.write_bar(0, offset, &value[..len]),
            2 => {
                dev.read_config_register(offset as usize / 4);
            }
            _ => {
                let within = offset % 4;
                let n = len.min(4 - within as usize);
                dev.write_config_register(offset as usize / 4, within, &value[..n]);
            }
        }
    }
}

/// Turns a receive loop may take to go idle; more means it spins.
const MAX_TURNS: usize = 64;

struct NullIrq;

impl VirtioInterrupt for NullIrq {
    fn trigger(&self, _t: VirtioInterruptType) -> std::io::Result<()> {
        Ok(())
    }
    fn notifier(&self, _t: VirtioInterruptType) -> Option<EventFd> {
        None
    }
}

/// The guest image of `data` with queue 0 (receive) as [`guest`] lays it
/// out, whose device-side avail and used positions also come from the
/// input, and an empty queue 1 (descriptors at 0x800).
fn rx_guest(
    data: &[u8],
) -> (
    GuestMemoryAtomic<GuestMemoryMmap>,
    Vec<ActiveQueue>,
    EventFd,
) {
    let (mem, mut q) = guest(data);
    let word = |at: usize| u16::from_le_bytes([byte(data, at), byte(data, at + 1)]);
    q.set_next_avail(word(0x300));
    q.set_next_used(word(0x302));
    let mut q1 = Queue::new(QUEUE_SIZE).expect("queue size");
    q1.set_size(QUEUE_SIZE);
    q1.set_desc_table_address(Some(0x800), Some(0));
    q1.set_avail_ring_address(Some(0x900), Some(0));
    q1.set_used_ring_address(Some(0xa00), Some(0));
    q1.set_ready(true);
    let kick = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let queues = vec![
        ActiveQueue {
            index: 0,
            queue: q,
            event: kick.try_clone().expect("eventfd"),
        },
        ActiveQueue {
            index: 1,
            queue: q1,
            event: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
        },
    ];
    (GuestMemoryAtomic::new(mem), queues, kick)
}

fn byte(data: &[u8], at: usize) -> u8 {
    data.get(at).copied().unwrap_or(0)
}

/// Kicks the receive queue and asserts the handler goes idle.
fn settle<H: EpollHandler>(handler: H, kick: &EventFd) -> EventLoop<H> {
    let mut el = EventLoop::new(handler).expect("event loop");
    for _ in 0..2 {
        kick.write(1).expect("kick");
        let turns = el.run_until_idle(MAX_TURNS).expect("worker error");
        assert!(turns < MAX_TURNS, "the receive loop does not go idle");
    }
    el
}

/// virtio-net receive: frames from the tap into receive buffers of a
/// fuzzed ring (avail and used indices included).
pub fn net_rx(data: &[u8]) {
    let (mem, mut queues, kick) = rx_guest(data);
    let (tap, peer) = UnixDatagram::pair().expect("socketpair");
    tap.set_nonblocking(true).expect("nonblocking");
    for i in 0..4 {
        let len = 12 + usize::from(byte(data, 0x310 + i)) * 8;
        let _ = peer.send(&vec![i as u8; len]);
    }
    let net = Net::with_backend(crate::net::tap::raw_backend(OwnedFd::from(tap)), [2; 6]);
    queues.truncate(2);
    let handler = net
        .handler(mem, Arc::new(NullIrq), queues)
        .expect("handler");
    settle(handler, &kick);
}

fn scratch_dir() -> tempfile_dir::Dir {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("skiff-rx-fuzz-{}-{n}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    tempfile_dir::Dir(dir)
}

/// virtio-console receive: a client's input into receive buffers of a
/// fuzzed ring.
pub fn console_rx(data: &[u8]) {
    let dir = scratch_dir();
    let path = dir.0.join("c.sock");
    let Ok(console) = Console::new(&ConsoleOutput::Socket(path.clone())) else {
        return;
    };
    let (mem, queues, kick) = rx_guest(data);
    let handler = console
        .handler(mem, Arc::new(NullIrq), queues)
        .expect("handler");
    let mut el = EventLoop::new(handler).expect("event loop");
    let Ok(mut client) = UnixStream::connect(&path) else {
        return;
    };
    el.run_until_idle(MAX_TURNS).expect("accept");
    let _ = client.write_all(&data[..data.len().min(300)]);
    for _ in 0..2 {
        kick.write(1).expect("kick");
        let turns = el.run_until_idle(MAX_TURNS).expect("worker error");
        assert!(turns < MAX_TURNS, "the receive loop does not go idle");
    }
}

/// virtio-vsock receive: a host connection request into receive buffers
/// of a fuzzed ring.
pub fn vsock_rx(data: &[u8]) {
    let dir = scratch_dir();
    let path = dir.0.join("v.sock");
    let Ok(vsock) = Vsock::new(3, &path) else {
        return;
    };
    let (mem, mut queues, kick) = rx_guest(data);
    let event = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    queues.push(ActiveQueue {
        index: 2,
        queue: Queue::new(QUEUE_SIZE).expect("queue size"),
        event,
    });
    let handler = vsock
        .handler(mem, Arc::new(NullIrq), queues)
        .expect("handler");
    let mut hosts = Vec::new();
    for port in 0..u32::from(byte(data, 0x320) % 4 + 1) {
        if let Ok(mut s) = UnixStream::connect(&path) {
            let _ = writeln!(s, "CONNECT {port}");
            hosts.push(s);
        }
    }
    settle(handler, &kick);
}

/// Records the ioeventfd addresses, like KVM would hold them.
#[derive(Default)]
struct IoEvents(Mutex<Vec<u64>>);

impl IoEventRegistrar for IoEvents {
    fn register_ioevent(&self, _fd: &EventFd, addr: u64) -> std::io::Result<()> {
        self.0.lock().expect("lock").push(addr);
        Ok(())
    }
    fn unregister_ioevent(&self, _fd: &EventFd, addr: u64) -> std::io::Result<()> {
        let mut v = self.0.lock().expect("lock");
        if let Some(i) = v.iter().position(|a| *a == addr) {
            v.remove(i);
        }
        Ok(())
    }
}

struct Neighbour;

impl BusDevice for Neighbour {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0xec);
    }
    fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {}
}

/// Base of the neighbour mapping (the VMM's ECAM window, say).
pub const NEIGHBOUR_BASE: u64 = 0xe000_0000;
const NEIGHBOUR_SIZE: u64 = 0x10_0000;

/// BAR relocation through ECAM config writes (6 bytes each: register
/// selector, offset within it, value) to a virtio-pci device on a bus
/// with a neighbour mapping. After every write the neighbour is intact,
/// the device's BAR is mapped exactly where it reads back, and its
/// ioeventfds are inside that range.
pub fn pci_bar_moves(data: &[u8]) {
    let mmio = Arc::new(Bus::new());
    mmio.insert(
        Arc::new(Mutex::new(Neighbour)),
        NEIGHBOUR_BASE,
        NEIGHBOUR_SIZE,
    )
    .expect("neighbour");
    let ioevents = Arc::new(IoEvents::default());
    let bus = Arc::new(Mutex::new(PciBus::new(
        mmio.clone(),
        Arc::new(Bus::new()),
        ioevents.clone(),
    )));
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("memory");
    let rng: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(Rng::new()));
    let Ok(dev) = VirtioPciDevice::new(rng, GuestMemoryAtomic::new(mem), &NullManager) else {
        return;
    };
    let dev = Arc::new(Mutex::new(dev));
    let mut alloc = RangeAllocator::new((0xc000_0000, 0x1000_0000), (1 << 40, 1 << 30), (0, 0));
    if byte(data, 0) & 1 != 0 {
        lock(&bus).set_bar_windows(alloc.windows());
    }
    let shared: Arc<Mutex<dyn PciDevice>> = dev.clone();
    lock(&bus)
        .attach(Some(1), shared, &mut alloc)
        .expect("attach");
    let mut ecam = PciConfigMmio::new(bus.clone());
    for op in data.chunks_exact(6) {
        // Mostly the command register and BAR0/BAR1, sometimes anything.
        let reg: u64 = match op[0] % 8 {
            0 | 1 => 1,
            2 | 3 => 4,
            4 | 5 => 5,
            _ => u64::from(op[0]) % 64,
        };
        let within = u64::from(op[1] % 4);
        let len = [1usize, 2, 4][usize::from(op[1] >> 2) % 3].min(4 - within as usize);
        ecam.write(0, (1 << 15) | (reg * 4 + within), &op[2..2 + len]);
        let (range, _) = mmio.resolve(NEIGHBOUR_BASE).expect("neighbour mapped");
        assert_eq!((range.base, range.len), (NEIGHBOUR_BASE, NEIGHBOUR_SIZE));
        let ranges = lock(&dev).bar_ranges();
        for r in ranges {
            let (m, _) = mmio
                .resolve(r.addr)
                .expect("BAR mapped where it reads back");
            assert_eq!((m.base, m.len), (r.addr, r.bar.size));
            for a in lock(&ioevents.0).iter() {
                assert!(
                    (r.addr..r.addr + r.bar.size).contains(a),
                    "stray ioeventfd {a:#x}"
                );
            }
        }
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    //! A poor man's fuzzer run by `cargo test`: structured random guest
    //! images (plausible queues, random descriptors) through every entry
    //! point.
    use super::*;
    use crate::vsock::packet::{HOST_CID, TYPE_STREAM};

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A memory image with a published queue of random chains. Buffers
    /// mostly point into 0x1000..0x10000 and sometimes anywhere.
    fn image(r: &mut XorShift, vsock: bool) -> Vec<u8> {
        let mut m = vec![0u8; 0x1_0000];
        for b in m.iter_mut().skip(0x1000) {
            *b = r.next() as u8;
        }
        for i in 0..16u64 {
            let d = (i * 16) as usize;
            let addr = if r.below(8) == 0 {
                r.next()
            } else {
                0x1000 + r.below(0xe000)
            };
            let len = match r.below(4) {
                0 => r.next() as u32,
                1 => 44 + r.below(64) as u32,
                _ => r.below(600) as u32,
            };
            let flags = (r.below(8) as u16) & 0x7;
            let next = r.below(17) as u16;
            m[d..d + 8].copy_from_slice(&addr.to_le_bytes());
            m[d + 8..d + 12].copy_from_slice(&len.to_le_bytes());
            m[d + 12..d + 14].copy_from_slice(&flags.to_le_bytes());
            m[d + 14..d + 16].copy_from_slice(&next.to_le_bytes());
            if vsock && addr < 0xf000 {
                let h = Header {
                    src_cid: if r.below(8) == 0 { 9 } else { 3 },
                    dst_cid: HOST_CID,
                    src_port: r.below(4) as u32 + 1000,
                    dst_port: r.below(4) as u32,
                    len: r.below(80) as u32,
                    type_: if r.below(8) == 0 { 2 } else { TYPE_STREAM },
                    op: r.below(9) as u16,
                    flags: r.below(4) as u32,
                    buf_alloc: r.next() as u32,
                    fwd_cnt: r.next() as u32,
                };
                let a = addr as usize;
                m[a..a + HDR_SIZE].copy_from_slice(&h.to_bytes());
            }
        }
        let n = r.below(18) as u16;
        m[0x100 + 2..0x100 + 4].copy_from_slice(&n.to_le_bytes());
        for i in 0..16usize {
            let head = r.below(17) as u16;
            m[0x104 + 2 * i..0x106 + 2 * i].copy_from_slice(&head.to_le_bytes());
        }
        m
    }

    #[test]
    fn entry_points_survive_random_guests() {
        let mut r = XorShift(0x5eed_1234_abcd_ef01);
        for _ in 0..300 {
            let img = image(&mut r, false);
            rng(&img);
            mem(&img);
            block(&img);
            net_tx(&img);
            console_tx(&img);
            let img = image(&mut r, true);
            vsock(&img);
            vsock_header(&img[0x1000..]);
        }
    }

    /// The receive loops on random rings, with random device-side avail
    /// and used positions (often far from the driver's index).
    #[test]
    fn receive_loops_go_idle_on_random_rings() {
        let mut r = XorShift(0x1dea_f00d);
        for i in 0..150 {
            let mut img = image(&mut r, false);
            if i % 3 == 0 {
                let idx = r.next() as u16;
                img[0x102..0x104].copy_from_slice(&idx.to_le_bytes());
            }
            for b in &mut img[0x300..0x330] {
                *b = if i % 2 == 0 { 0 } else { r.next() as u8 };
            }
            net_rx(&img);
            console_rx(&img);
            vsock_rx(&img);
        }
    }

    #[test]
    fn bar_moves_never_disturb_the_neighbour() {
        let mut r = XorShift(77);
        for _ in 0..100 {
            let mut ops: Vec<u8> = (0..6 * 60).map(|_| r.next() as u8).collect();
            // Sometimes aim at the neighbour or the top of the space.
            for op in ops.chunks_exact_mut(6) {
                match r.below(6) {
                    0 => op[2..6].copy_from_slice(&(NEIGHBOUR_BASE as u32).to_le_bytes()),
                    1 => op[2..6].copy_from_slice(&0xffff_f000u32.to_le_bytes()),
                    2 => op[2..6].copy_from_slice(&0xd000_0000u32.to_le_bytes()),
                    _ => {}
                }
            }
            pci_bar_moves(&ops);
        }
    }

    #[test]
    fn pci_registers_survive_random_accesses() {
        let mut r = XorShift(42);
        for _ in 0..50 {
            let ops: Vec<u8> = (0..12 * 200).map(|_| r.next() as u8).collect();
            pci(&ops);
        }
        // Plausible driver sequences: status writes and queue set-up.
        let mut ops = Vec::new();
        let seq = [
            (0x14u16, 0u64, 0u8),
            (0x14, 3, 0),
            (0x08, 1, 2),
            (0x0c, 1, 2),
            (0x14, 0xb, 0),
            (0x1c, 1, 1),
            (0x14, 0xf, 0),
            (0x3000, 0, 1),
            (0x14, 0, 0),
        ];
        for (off, val, size) in seq {
            ops.push(1);
            ops.push(size);
            ops.extend_from_slice(&off.to_le_bytes());
            ops.extend_from_slice(&val.to_le_bytes());
        }
        pci(&ops);
    }
}
