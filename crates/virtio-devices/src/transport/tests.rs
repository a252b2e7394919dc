//! Drives the transport like a guest driver would.

use std::sync::Arc;

use vm_device::interrupt::{InterruptError, InterruptGroup, InterruptManager};

use super::*;
use crate::pci::bus::RangeAllocator;
use crate::pci::msix::tests::TestGroup;
use crate::rng::Rng;
use crate::state::StateError;
use crate::test_utils::*;

struct TestManager(Arc<TestGroup>);

impl InterruptManager for TestManager {
    fn create_msi_group(&self, _count: usize) -> Result<Arc<dyn InterruptGroup>, InterruptError> {
        Ok(self.0.clone())
    }
}

struct Driver {
    dev: VirtioPciDevice,
    group: Arc<TestGroup>,
}

impl Driver {
    fn new(mem: &GuestMemoryMmap) -> Self {
        Self::with_device(mem, Arc::new(Mutex::new(Rng::new())))
    }
    fn with_device(mem: &GuestMemoryMmap, device: Arc<Mutex<dyn VirtioDevice>>) -> Self {
        let group = Arc::new(TestGroup::default());
        let mut dev =
            VirtioPciDevice::new(device, atomic_mem(mem), &TestManager(group.clone())).unwrap();
        let mut alloc = RangeAllocator::new((0xc000_0000, 0x1000_0000), (0, 0), (0, 0));
        dev.allocate_bars(&mut alloc).unwrap();
        Driver { dev, group }
    }
    fn w(&mut self, off: u64, v: u64, len: usize) {
        self.dev.write_bar(0, off, &v.to_le_bytes()[..len]);
    }
    fn r(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.read_bar(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    fn status(&mut self) -> u8 {
        self.r(0x14, 1) as u8
    }
    fn negotiate(&mut self, driver_features: u64) -> bool {
        self.w(0x14, 0, 1);
        self.w(0x14, 3, 1);
        self.w(0x08, 0, 4);
        self.w(0x0c, driver_features & 0xffff_ffff, 4);
        self.w(0x08, 1, 4);
        self.w(0x0c, driver_features >> 32, 4);
        self.w(0x14, 0xb, 1);
        self.status() & status::FEATURES_OK != 0
    }
    fn setup_queue(&mut self, index: u16, tq: &TestQueue, vector: u16) {
        let (d, a, u) = tq.addrs();
        self.w(0x16, index.into(), 2);
        self.w(0x18, 16, 2);
        self.w(0x20, d, 8);
        self.w(0x28, a, 4);
        self.w(0x2c, a >> 32, 4);
        self.w(0x30, u, 8);
        self.w(0x1a, vector.into(), 2);
        self.w(0x1c, 1, 2);
    }
    /// Enables MSI-X and programs every vector unmasked.
    fn enable_msix(&mut self) {
        let reg = self.dev.msix_reg;
        let v = self.dev.read_config_register(reg);
        self.dev
            .write_config_register(reg, 2, &((v >> 16) as u16 | 0x8000).to_le_bytes());
        for i in 0..4u64 {
            self.w(MSIX_TABLE_OFFSET + 16 * i, 0xfee0_0000, 8);
            self.w(MSIX_TABLE_OFFSET + 16 * i + 8, 0x20 + i, 4);
            self.w(MSIX_TABLE_OFFSET + 16 * i + 12, 0, 4);
        }
    }
}

fn find_caps(dev: &mut VirtioPciDevice) -> Vec<(u8, u8, usize)> {
    let mut caps = Vec::new();
    let mut ptr = (dev.read_config_register(13) & 0xff) as usize;
    while ptr != 0 && caps.len() < 16 {
        let v = dev.read_config_register(ptr / 4);
        caps.push((v as u8, (v >> 24) as u8, ptr));
        ptr = ((v >> 8) & 0xff) as usize;
    }
    caps
}

#[test]
fn identity_and_capabilities() {
    let mem = single_region_mem(0x10_0000);
    let mut d = Driver::new(&mem);
    assert_eq!(d.dev.read_config_register(0), 0x1044_1af4);
    assert_eq!(
        d.dev.read_config_register(2) & 0xff,
        1,
        "revision 1: modern"
    );
    let caps = find_caps(&mut d.dev);
    let vendor: Vec<u8> = caps.iter().filter(|c| c.0 == 0x09).map(|c| c.1).collect();
    assert_eq!(vendor, vec![1, 2, 3, 4, 5]);
    let msix = caps.iter().find(|c| c.0 == 0x11).unwrap();
    let ctl = d.dev.read_config_register(msix.2 / 4) >> 16;
    assert_eq!(ctl & 0x7ff, 1, "two vectors: queue + config");
    // BAR0 is a 64-bit memory BAR at the allocated address.
    assert_eq!(d.dev.read_config_register(4), 0xc000_0004);
    assert_eq!(d.dev.ioeventfds()[0].0, 0xc000_0000 + NOTIFY_OFFSET);
}

#[test]
fn feature_negotiation() {
    let mem = single_region_mem(0x10_0000);
    let mut d = Driver::new(&mem);
    d.w(0x00, 1, 4);
    assert_eq!(d.r(0x04, 4) & 1, 1, "VERSION_1 offered");
    // Legacy-only driver (no VERSION_1) is refused.
    assert!(!d.negotiate(0));
    // Unknown feature bits are refused.
    assert!(!d.negotiate(1 << 32 | 1 << 63));
    assert!(d.negotiate(1 << 32));
    // Features are frozen after FEATURES_OK.
    d.w(0x08, 0, 4);
    d.w(0x0c, 0xffff, 4);
    assert_eq!(d.r(0x0c, 4), 0);
}

#[test]
fn rng_end_to_end_with_msix_and_reset() {
    let mem = single_region_mem(0x10_0000);
    let mut d = Driver::new(&mem);
    assert!(d.negotiate(1 << 32));
    let mut tq = TestQueue::new(&mem, 0x1000, 16, 0x2_0000);
    d.setup_queue(0, &tq, 0);
    d.w(0x10, 1, 2);
    d.enable_msix();
    d.w(0x14, 0xf, 1);
    assert!(d.dev.is_active());
    let (_, addrs) = tq.add_chain(&[(Writable, 32)]);
    // Notify through the BAR (no ioeventfd registered in this test).
    d.w(NOTIFY_OFFSET, 0, 2);
    assert!(wait_until(|| tq.used_idx() == 1));
    assert_eq!(tq.used_entry(0).1, 32);
    assert!(tq.read(addrs[0], 32).iter().any(|&b| b != 0));
    assert!(wait_until(|| d.group.fired.lock().unwrap().contains(&0)));
    // ISR was set and reading clears it.
    assert_eq!(d.r(ISR_OFFSET, 1), 1);
    assert_eq!(d.r(ISR_OFFSET, 1), 0);
    // Reset stops the device; status and queues read back as new.
    d.w(0x14, 0, 1);
    assert!(!d.dev.is_active());
    assert_eq!(d.status(), 0);
    d.w(0x16, 0, 2);
    assert_eq!(d.r(0x1c, 2), 0);
    assert_eq!(d.r(0x1a, 2), u64::from(NO_VECTOR));
    // And it can be brought up again, this time with event index.
    assert!(d.negotiate(1 << 32 | 1 << 29));
    let mut tq = TestQueue::new(&mem, 0x1000, 16, 0x3_0000);
    d.setup_queue(0, &tq, 0);
    d.w(0x14, 0xf, 1);
    assert!(d.dev.is_active());
    tq.add_chain(&[(Writable, 8)]);
    d.w(NOTIFY_OFFSET, 0, 2);
    assert!(wait_until(|| tq.used_idx() == 1));
}

#[test]
fn refused_features_never_activate() {
    let mem = single_region_mem(0x10_0000);
    let mut d = Driver::new(&mem);
    let tq = TestQueue::new(&mem, 0x1000, 16, 0x2_0000);
    d.setup_queue(0, &tq, 0);
    d.w(0x14, 3, 1);
    // No VERSION_1, and FEATURES_OK with DRIVER_OK in a single write.
    d.w(0x14, 0xf, 1);
    assert!(!d.dev.is_active());
    assert_eq!(d.status() & status::FEATURES_OK, 0);
}

#[test]
fn invalid_rings_set_needs_reset() {
    let mem = single_region_mem(0x10_0000);
    let mut d = Driver::new(&mem);
    assert!(d.negotiate(1 << 32));
    d.w(0x16, 0, 2);
    d.w(0x20, 0xdead_0000_0000, 8);
    d.w(0x1c, 1, 2);
    d.w(0x14, 0xf, 1);
    assert!(!d.dev.is_active());
    assert_ne!(d.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn pci_cfg_window_reaches_common_config() {
    let mem = single_region_mem(0x10_0000);
    let mut d = Driver::new(&mem);
    let caps = find_caps(&mut d.dev);
    let cap = caps.iter().find(|c| c.0 == 0x09 && c.1 == 5).unwrap().2;
    let base = cap / 4;
    d.dev.write_config_register(base + 1, 0, &[0]);
    d.dev
        .write_config_register(base + 2, 0, &0x12u32.to_le_bytes());
    d.dev
        .write_config_register(base + 3, 0, &2u32.to_le_bytes());
    assert_eq!(
        d.dev.read_config_register(base + 4),
        1,
        "num_queues through the window"
    );
    // A bogus length reads zero and writes nothing.
    d.dev
        .write_config_register(base + 3, 0, &3u32.to_le_bytes());
    assert_eq!(d.dev.read_config_register(base + 4), 0);
}

#[test]
fn garbage_accesses_are_harmless() {
    let mem = single_region_mem(0x10_0000);
    let mut d = Driver::new(&mem);
    for off in (0..BAR_SIZE + 0x100).step_by(0x1f3) {
        for len in [1usize, 2, 3, 4, 8] {
            d.w(off, u64::MAX, len);
            d.r(off, len);
        }
    }
    for reg in 0..80 {
        d.dev.write_config_register(reg, 0, &[0xff; 4]);
        d.dev.read_config_register(reg);
    }
    // Still the same device, and a driver can bring it up and use it.
    assert_eq!(d.dev.read_config_register(0), 0x1044_1af4);
    assert_eq!(d.dev.read_config_register(80), 0xffff_ffff);
    d.w(0x14, 0, 1);
    assert_eq!(d.status(), 0);
    assert_eq!(d.r(0x12, 2), 1, "num_queues");
    assert!(d.negotiate(1 << 32));
    let mut tq = TestQueue::new(&mem, 0x1000, 16, 0x2_0000);
    d.setup_queue(0, &tq, 0);
    d.w(0x14, 0xf, 1);
    assert!(d.dev.is_active());
    tq.add_chain(&[(Writable, 16)]);
    d.w(NOTIFY_OFFSET, 0, 2);
    assert!(wait_until(|| tq.used_idx() == 1));
    assert_eq!(tq.used_entry(0).1, 16);
}

#[test]
fn multi_queue_device_uses_each_queues_vector() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let vsock = crate::vsock::Vsock::new(3, &path).unwrap();
    let mem = single_region_mem(0x40_0000);
    let mut d = Driver::with_device(&mem, Arc::new(Mutex::new(vsock)));
    assert_eq!(d.r(0x12, 2), 3, "rx, tx, event queues");
    assert!(d.negotiate(1 << 32));
    // rx -> vector 2, tx -> vector 0, event -> vector 1; config -> 3.
    let mut rxq = TestQueue::new(&mem, 0x1000, 16, 0x10_0000);
    let txq = TestQueue::new(&mem, 0x2000, 16, 0x20_0000);
    let evq = TestQueue::new(&mem, 0x3000, 16, 0x30_0000);
    d.setup_queue(0, &rxq, 2);
    d.setup_queue(1, &txq, 0);
    d.setup_queue(2, &evq, 1);
    d.w(0x10, 3, 2);
    d.enable_msix();
    d.w(0x14, 0xf, 1);
    assert!(d.dev.is_active());
    rxq.add_chain(&[(Writable, 4096)]);
    d.w(NOTIFY_OFFSET, 0, 2);
    let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
    writeln!(s, "CONNECT 52").unwrap();
    assert!(wait_until(|| rxq.used_idx() == 1), "REQUEST delivered");
    assert!(wait_until(|| d.group.fired.lock().unwrap().contains(&2)));
    assert!(!d.group.fired.lock().unwrap().contains(&0));
    // Config vector on a config change.
    d.dev.config_changed();
    assert!(d.group.fired.lock().unwrap().contains(&3));
}

/// Records what the transport tells it.
#[derive(Default)]
struct Probe {
    acks: Arc<Mutex<Vec<u64>>>,
}

impl VirtioDevice for Probe {
    fn device_type(&self) -> u32 {
        4
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn features(&self) -> u64 {
        crate::device::RING_FEATURES
    }
    fn ack_features(&mut self, features: u64) {
        self.acks.lock().unwrap().push(features);
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(
        &mut self,
        _mem: GuestMemoryAtomic<GuestMemoryMmap>,
        _interrupt: Arc<dyn VirtioInterrupt>,
        _queues: Vec<ActiveQueue>,
    ) -> Result<(), crate::device::ActivateError> {
        Ok(())
    }
    fn reset(&mut self) -> bool {
        true
    }
}

/// Once the features are accepted, the driver cannot change them: not by
/// clearing FEATURES_OK and setting it again, not after DRIVER_OK.
#[test]
fn features_cannot_be_renegotiated_on_an_active_device() {
    let mem = single_region_mem(0x10_0000);
    let probe = Probe::default();
    let acks = probe.acks.clone();
    let mut d = Driver::with_device(&mem, Arc::new(Mutex::new(probe)));
    assert!(d.negotiate(1 << 32));
    let tq = TestQueue::new(&mem, 0x1000, 16, 0x2_0000);
    d.setup_queue(0, &tq, 0);
    d.w(0x14, 0xf, 1);
    assert!(d.dev.is_active());
    // Clear FEATURES_OK, write new features, set it again.
    d.w(0x14, 0x7, 1);
    d.w(0x08, 0, 4);
    d.w(0x0c, 1 << 29, 4);
    d.w(0x14, 0xf, 1);
    assert_eq!(*acks.lock().unwrap(), vec![1 << 32], "acked once");
    assert_eq!(d.r(0x0c, 4), 0, "driver features unchanged");
    assert_eq!(d.status() & 0xf, 0xf, "FEATURES_OK and DRIVER_OK stay set");
}

/// A guest hammering a device's read-only configuration, or the common
/// configuration with nonsense, logs a bounded number of lines.
#[test]
fn guest_config_floods_are_rate_limited() {
    let mem = single_region_mem(0x10_0000);
    let mut d = Driver::new(&mem);
    let ((), logs) = capture_logs(|| {
        for i in 0..200u64 {
            d.w(DEVICE_CONFIG_OFFSET + i % 8, i, 4);
            d.w(0x38 + i % 16, i, 2);
        }
    });
    let limit = crate::ratelimit::LINES_PER_SECOND as usize;
    assert!(
        logs.len() <= limit + 1,
        "{} lines: {:?}",
        logs.len(),
        &logs[..3]
    );
}

#[test]
fn saved_state_restores_into_a_fresh_function_and_the_queue_goes_on() {
    let mem = single_region_mem(0x10_0000);
    let mut d = Driver::new(&mem);
    assert!(d.negotiate(1 << 32));
    let mut tq = TestQueue::new(&mem, 0x1000, 16, 0x2_0000);
    d.setup_queue(0, &tq, 0);
    d.enable_msix();
    d.w(0x14, 0xf, 1);
    tq.add_chain(&[(Writable, 16)]);
    d.w(NOTIFY_OFFSET, 0, 2);
    assert!(wait_until(|| tq.used_idx() == 1));
    lock(d.dev.device()).pause();
    let state = d.dev.save_state().unwrap();
    assert!(state.active);
    let p = state.progress[0];
    assert_eq!((p.index, p.next_avail, p.next_used), (0, 1, 1));
    drop(d);

    // A fresh function over a fresh device takes it and serves the next
    // request where the first one stopped.
    let mut r = Driver::new(&mem);
    r.dev.restore_state(&state).unwrap();
    assert!(r.dev.is_active());
    assert_eq!(r.status(), 0xf);
    assert_eq!(r.dev.read_config_register(4), state.config[4]);
    tq.add_chain(&[(Writable, 24)]);
    r.w(NOTIFY_OFFSET, 0, 2);
    assert!(wait_until(|| tq.used_idx() == 2));
    assert_eq!(tq.used_entry(1).1, 24);
    assert!(wait_until(|| r.group.fired.lock().unwrap().contains(&0)));

    // Shapes that do not fit are refused before anything changes.
    let mut bad = state.clone();
    bad.queues.push(bad.queues[0].clone());
    assert!(matches!(
        Driver::new(&mem).dev.restore_state(&bad),
        Err(StateError::Mismatch(_))
    ));
    let mut bad = state.clone();
    bad.config[0] = 0x1234_5678;
    assert!(Driver::new(&mem).dev.restore_state(&bad).is_err());
    let mut bad = state.clone();
    bad.queues[0].size = 3;
    assert!(matches!(
        Driver::new(&mem).dev.restore_state(&bad),
        Err(StateError::BadQueue { .. })
    ));
    let mut bad = state;
    bad.msix.table.pop();
    let mut f = Driver::new(&mem);
    assert!(f.dev.restore_state(&bad).is_err());
    assert!(!f.dev.is_active());
}
