//! Test helpers: mock guest memory, a driver-side virtqueue that lays out
//! descriptor chains, and an interrupt recorder.

#![allow(dead_code)] // helpers shared by tests; not every test uses each one

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{ActiveQueue, VirtioInterrupt, VirtioInterruptType};
use crate::GuestMemoryMmap;

/// Whether a descriptor is read or written by the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Device-readable (driver → device).
    Readable,
    /// Device-writable (device → driver).
    Writable,
}
#[allow(unused_imports)]
pub use Dir::{Readable, Writable};

/// One guest memory region of `size` bytes at address 0.
pub fn single_region_mem(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("mock memory")
}

/// Records the interrupts a device raises.
#[derive(Default)]
pub struct RecordingInterrupt {
    /// Interrupts raised so far.
    pub raised: Mutex<Vec<VirtioInterruptType>>,
    /// Number of queue interrupts.
    pub count: AtomicUsize,
    /// Times the device asked for a reset.
    pub needs_reset: AtomicUsize,
}

impl RecordingInterrupt {
    /// Number of interrupts raised.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl VirtioInterrupt for RecordingInterrupt {
    fn trigger(&self, int_type: VirtioInterruptType) -> std::io::Result<()> {
        self.raised.lock().unwrap().push(int_type);
        self.count.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn notifier(&self, _int_type: VirtioInterruptType) -> Option<EventFd> {
        None
    }
    fn device_needs_reset(&self) {
        self.needs_reset.fetch_add(1, Ordering::SeqCst);
    }
}

/// The driver side of a split virtqueue in mock memory.
///
/// Rings live at `base`; data buffers are handed out from `data_base` up.
pub struct TestQueue {
    mem: GuestMemoryMmap,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    next_data: u64,
}

impl TestQueue {
    /// A queue of `size` entries with rings at `base`, data at `data_base`.
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16, data_base: u64) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        let q = TestQueue {
            mem: mem.clone(),
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            next_data: data_base,
        };
        q.mem.write_obj(0u16, GuestAddress(avail)).unwrap();
        q.mem.write_obj(0u16, GuestAddress(avail + 2)).unwrap();
        q.mem.write_obj(0u16, GuestAddress(used + 2)).unwrap();
        q
    }

    /// Descriptor table, avail ring and used ring addresses.
    pub fn addrs(&self) -> (u64, u64, u64) {
        (self.desc, self.avail, self.used)
    }

    /// A device-side [`Queue`] programmed for this layout.
    pub fn create_queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// An [`ActiveQueue`] with index `index` and a fresh eventfd.
    pub fn active(&self, index: usize) -> ActiveQueue {
        ActiveQueue {
            index,
            queue: self.create_queue(),
            event: EventFd::new(EFD_NONBLOCK).unwrap(),
        }
    }

    /// Allocates a data buffer of `len` bytes and returns its address.
    pub fn alloc(&mut self, len: u32) -> u64 {
        let addr = self.next_data;
        self.next_data += (u64::from(len) + 15) & !15;
        addr
    }

    fn write_desc(&self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = GuestAddress(self.desc + 16 * u64::from(idx));
        self.mem.write_obj(addr, d).unwrap();
        self.mem.write_obj(len, d.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, d.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, d.unchecked_add(14)).unwrap();
    }

    /// Adds a chain of raw descriptors `(addr, len, dir)`; returns its head.
    pub fn add_raw_chain(&mut self, descs: &[(u64, u32, Dir)]) -> u16 {
        let head = self.next_desc;
        for (i, (addr, len, dir)) in descs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % self.size;
            let mut flags = if *dir == Writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let next = (idx + 1) % self.size;
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.write_desc(idx, *addr, *len, flags, next);
        }
        self.next_desc = (self.next_desc + descs.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// Adds a chain of freshly allocated buffers `(dir, len)`; returns the
    /// head and the buffers' addresses.
    pub fn add_chain(&mut self, descs: &[(Dir, u32)]) -> (u16, Vec<u64>) {
        let addrs: Vec<u64> = descs.iter().map(|(_, len)| self.alloc(*len)).collect();
        let raw: Vec<(u64, u32, Dir)> = descs
            .iter()
            .zip(&addrs)
            .map(|((dir, len), addr)| (*addr, *len, *dir))
            .collect();
        (self.add_raw_chain(&raw), addrs)
    }

    /// Adds a single descriptor pointing at an indirect table of `descs`.
    pub fn add_indirect_chain(&mut self, descs: &[(Dir, u32)]) -> (u16, Vec<u64>) {
        let table = self.alloc(16 * descs.len() as u32);
        let mut addrs = Vec::new();
        for (i, (dir, len)) in descs.iter().enumerate() {
            let addr = self.alloc(*len);
            addrs.push(addr);
            let mut flags = if *dir == Writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if i + 1 < descs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let d = GuestAddress(table + 16 * i as u64);
            self.mem.write_obj(addr, d).unwrap();
            self.mem.write_obj(*len, d.unchecked_add(8)).unwrap();
            self.mem.write_obj(flags, d.unchecked_add(12)).unwrap();
            self.mem
                .write_obj(i as u16 + 1, d.unchecked_add(14))
                .unwrap();
        }
        let head = self.next_desc;
        self.write_desc(
            head,
            table,
            16 * descs.len() as u32,
            VRING_DESC_F_INDIRECT as u16,
            0,
        );
        self.next_desc = (self.next_desc + 1) % self.size;
        self.publish(head);
        (head, addrs)
    }

    fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Sets the avail index directly (to simulate a corrupt driver).
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.mem
            .write_obj(idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// The used ring index.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used ring entry `n` as `(head, len)`.
    pub fn used_entry(&self, n: u16) -> (u16, u32) {
        let e = GuestAddress(self.used + 4 + 8 * u64::from(n % self.size));
        let id: u32 = self.mem.read_obj(e).unwrap();
        let len: u32 = self.mem.read_obj(e.unchecked_add(4)).unwrap();
        (id as u16, len)
    }

    /// Reads `len` bytes of guest memory at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Writes `data` to guest memory at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }
}

/// Wraps mock memory for `activate`.
pub fn atomic_mem(mem: &GuestMemoryMmap) -> GuestMemoryAtomic<GuestMemoryMmap> {
    GuestMemoryAtomic::new(mem.clone())
}

/// Polls `cond` for up to two seconds (device workers run on threads).
pub fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..400 {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    cond()
}

/// A shared interrupt recorder usable as `Arc<dyn VirtioInterrupt>`.
pub fn recorder() -> Arc<RecordingInterrupt> {
    Arc::new(RecordingInterrupt::default())
}

/// Runs `f` on its own thread and panics if it has not finished within
/// `secs` seconds (a spinning or blocked device then fails the test
/// instead of hanging it; the stuck thread is leaked).
pub fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(_) => panic!("did not finish within {secs} s (spinning or blocked)"),
    }
}

/// Log records captured on threads that asked for it, as `LEVEL message`.
struct CaptureLogger;

thread_local! {
    static CAPTURED: std::cell::RefCell<Option<Vec<String>>> = const { std::cell::RefCell::new(None) };
}

impl log::Log for CaptureLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        CAPTURED.with(|c| {
            if let Some(v) = c.borrow_mut().as_mut() {
                v.push(format!("{} {}", record.level(), record.args()));
            }
        });
    }
    fn flush(&self) {}
}

static LOGGER: CaptureLogger = CaptureLogger;

/// Runs `f` and returns what it logged on this thread (other threads and
/// tests are not captured).
pub fn capture_logs<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        if log::set_logger(&LOGGER).is_ok() {
            log::set_max_level(log::LevelFilter::Trace);
        }
    });
    CAPTURED.with(|c| *c.borrow_mut() = Some(Vec::new()));
    let r = f();
    let logs = CAPTURED.with(|c| c.borrow_mut().take()).unwrap_or_default();
    (r, logs)
}
