use super::*;
use crate::pci::config::PciBarRegionType;
use crate::pci::{allocate_config_bars, config_bar_ranges};
use vmm_sys_util::eventfd::EventFd;

/// A device with one 64-bit BAR whose reads return the offset, and one
/// ioeventfd at BAR + 0x10.
struct Dummy {
    config: PciConfiguration,
    evt: EventFd,
    writes: Vec<(u64, u64)>,
    mapped: u64,
    unplugged: bool,
}

impl Dummy {
    fn new() -> Self {
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: 0x1234,
            device_id: 0x5678,
            class: 0xff,
            subclass: 0,
            prog_if: 0,
            revision: 0,
            subsystem_vendor_id: 0,
            subsystem_id: 0,
        });
        config
            .add_bar(PciBar {
                index: 0,
                size: 0x1000,
                region_type: PciBarRegionType::Memory64,
                prefetchable: false,
            })
            .unwrap();
        Dummy {
            config,
            evt: EventFd::new(0).unwrap(),
            writes: Vec::new(),
            mapped: 0,
            unplugged: false,
        }
    }
}

impl PciDevice for Dummy {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }
    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) -> Vec<BarReprogram> {
        self.config.write_reg(reg, offset, data)
    }
    fn allocate_bars(&mut self, a: &mut dyn BarAllocator) -> Result<Vec<PciBarRange>, PciError> {
        let r = allocate_config_bars(&mut self.config, a)?;
        self.mapped = r[0].addr;
        Ok(r)
    }
    fn bar_ranges(&self) -> Vec<PciBarRange> {
        config_bar_ranges(&self.config)
    }
    fn move_bar(&mut self, mv: &BarReprogram) {
        self.config.bar_moved(mv.bar.index, mv.new_addr);
        self.mapped = mv.new_addr;
    }
    fn refuse_bar_move(&mut self, mv: &BarReprogram) {
        self.config.restore_bar(mv.bar.index);
    }
    fn read_bar(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8);
    }
    fn write_bar(&mut self, base: u64, offset: u64, _data: &[u8]) {
        self.writes.push((base, offset));
    }
    fn ioeventfds(&self) -> Vec<(u64, &EventFd)> {
        vec![(self.mapped + 0x10, &self.evt)]
    }
    fn unplugged(&mut self) {
        self.unplugged = true;
    }
}

struct FailingRegistry;
impl IoEventRegistrar for FailingRegistry {
    fn register_ioevent(&self, _fd: &EventFd, _addr: u64) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
    }
    fn unregister_ioevent(&self, _fd: &EventFd, _addr: u64) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn failed_attach_leaves_nothing_behind() {
    let mmio = Arc::new(Bus::new());
    let mut bus = PciBus::new(
        mmio.clone(),
        Arc::new(Bus::new()),
        Arc::new(FailingRegistry),
    );
    let mut alloc = RangeAllocator::new((0, 0), (1 << 40, 0x1000), (0, 0));
    let r = bus.attach(None, Arc::new(Mutex::new(Dummy::new())), &mut alloc);
    assert!(matches!(r, Err(PciError::IoEvent(_))));
    assert_eq!(bus.slots(), vec![0]);
    let mut d = [0u8; 1];
    assert!(!mmio.read(1 << 40, &mut d));
    // The window (exactly one BAR big) is free again.
    let bar = PciBar {
        index: 0,
        size: 0x1000,
        region_type: PciBarRegionType::Memory64,
        prefetchable: false,
    };
    assert_eq!(alloc.allocate(&bar), Some(1 << 40));
}

#[derive(Default)]
struct Registry(Mutex<Vec<u64>>);
impl IoEventRegistrar for Registry {
    fn register_ioevent(&self, _fd: &EventFd, addr: u64) -> std::io::Result<()> {
        self.0.lock().unwrap().push(addr);
        Ok(())
    }
    fn unregister_ioevent(&self, _fd: &EventFd, addr: u64) -> std::io::Result<()> {
        self.0.lock().unwrap().retain(|&a| a != addr);
        Ok(())
    }
}

struct Setup {
    bus: Arc<Mutex<PciBus>>,
    mmio: Arc<Bus>,
    reg: Arc<Registry>,
    alloc: RangeAllocator,
}

fn setup() -> Setup {
    let mmio = Arc::new(Bus::new());
    let reg = Arc::new(Registry::default());
    let bus = PciBus::new(mmio.clone(), Arc::new(Bus::new()), reg.clone());
    Setup {
        bus: Arc::new(Mutex::new(bus)),
        mmio,
        reg,
        alloc: RangeAllocator::new((0xc000_0000, 0x1000_0000), (1 << 40, 1 << 30), (0, 0)),
    }
}

fn cf8_read(io: &mut PciConfigIo, slot: u32, reg: u32) -> u32 {
    io.write(
        0xcf8,
        0,
        &(0x8000_0000 | slot << 11 | reg << 2).to_le_bytes(),
    );
    let mut d = [0u8; 4];
    io.read(0xcf8, 4, &mut d);
    u32::from_le_bytes(d)
}

#[test]
fn config_io_and_ecam_see_the_same_devices() {
    let mut s = setup();
    let slot = s
        .bus
        .lock()
        .unwrap()
        .attach(None, Arc::new(Mutex::new(Dummy::new())), &mut s.alloc)
        .unwrap();
    assert_eq!(slot, 1);
    let mut io = PciConfigIo::new(s.bus.clone());
    assert_eq!(cf8_read(&mut io, 0, 0), 0x0d57_8086);
    assert_eq!(cf8_read(&mut io, 1, 0), 0x5678_1234);
    assert_eq!(cf8_read(&mut io, 2, 0), 0xffff_ffff);
    // Sub-dword read of the device id through port 0xCFE.
    cf8_read(&mut io, 1, 0);
    let mut w = [0u8; 2];
    io.read(0xcf8, 6, &mut w);
    assert_eq!(u16::from_le_bytes(w), 0x5678);
    // Disabled address: all ones.
    io.write(0xcf8, 0, &0x0000_0800u32.to_le_bytes());
    let mut d = [0u8; 4];
    io.read(0xcf8, 4, &mut d);
    assert_eq!(d, [0xff; 4]);

    let mut ecam = PciConfigMmio::new(s.bus.clone());
    ecam.read(0, 1 << 15, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x5678_1234);
    ecam.read(0, 1 << 20 | 1 << 15, &mut d);
    assert_eq!(d, [0xff; 4], "bus 1 does not exist");
    ecam.read(0, (1 << 15) + 2, &mut d);
    assert_eq!(d, [0xff; 4], "dword-crossing access");
}

#[test]
fn attach_maps_bars_and_ioevents_detach_undoes() {
    let mut s = setup();
    let dev = Arc::new(Mutex::new(Dummy::new()));
    let slot = s
        .bus
        .lock()
        .unwrap()
        .attach(Some(3), dev.clone(), &mut s.alloc)
        .unwrap();
    let base = dev.lock().unwrap().config.bar_addr(0);
    assert_eq!(base, 1 << 40);
    let mut d = [0u8; 1];
    assert!(s.mmio.read(base + 7, &mut d));
    assert_eq!(d[0], 7);
    assert_eq!(*s.reg.0.lock().unwrap(), vec![base + 0x10]);
    assert!(matches!(
        s.bus
            .lock()
            .unwrap()
            .attach(Some(3), dev.clone(), &mut s.alloc),
        Err(PciError::SlotUnavailable(3))
    ));
    s.bus.lock().unwrap().detach(slot, &mut s.alloc).unwrap();
    assert!(dev.lock().unwrap().unplugged);
    assert!(!s.mmio.read(base, &mut d));
    assert!(s.reg.0.lock().unwrap().is_empty());
    // The range is free again: hot-plug a new device in its place.
    let slot2 = s
        .bus
        .lock()
        .unwrap()
        .attach(None, Arc::new(Mutex::new(Dummy::new())), &mut s.alloc)
        .unwrap();
    assert_eq!(slot2, 1);
    assert!(s.mmio.read(base, &mut d));
}

#[test]
fn guest_bar_move_remaps() {
    let mut s = setup();
    let dev = Arc::new(Mutex::new(Dummy::new()));
    s.bus
        .lock()
        .unwrap()
        .attach(Some(1), dev.clone(), &mut s.alloc)
        .unwrap();
    let mut ecam = PciConfigMmio::new(s.bus.clone());
    let dev_base = 1u64 << 15;
    // Like Linux: decoding off, program both halves, decoding on.
    ecam.write(0, dev_base + 0x10, &0xd000_0000u32.to_le_bytes());
    ecam.write(0, dev_base + 0x14, &0u32.to_le_bytes());
    ecam.write(0, dev_base + 4, &[0x06, 0]);
    let mut d = [0u8; 1];
    assert!(s.mmio.read(0xd000_0003, &mut d));
    assert_eq!(d[0], 3);
    assert!(!s.mmio.read(1 << 40, &mut d));
    assert_eq!(*s.reg.0.lock().unwrap(), vec![0xd000_0010]);
}

/// Something else on the MMIO bus, like the VMM's ECAM window.
struct Neighbour;
impl BusDevice for Neighbour {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0xec);
    }
    fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {}
}

const NEIGHBOUR: u64 = 0xe000_0000;

/// Programs BAR0 of slot 1 like Linux (decoding off, both halves,
/// decoding on).
fn program_bar(ecam: &mut PciConfigMmio, addr: u64) {
    let dev = 1u64 << 15;
    ecam.write(0, dev + 4, &[0x04, 0]);
    ecam.write(0, dev + 0x10, &(addr as u32).to_le_bytes());
    ecam.write(0, dev + 0x14, &((addr >> 32) as u32).to_le_bytes());
    ecam.write(0, dev + 4, &[0x06, 0]);
}

fn bar0(ecam: &mut PciConfigMmio) -> u64 {
    let dev = 1u64 << 15;
    let (mut lo, mut hi) = ([0u8; 4], [0u8; 4]);
    ecam.read(0, dev + 0x10, &mut lo);
    ecam.read(0, dev + 0x14, &mut hi);
    u64::from(u32::from_le_bytes(hi)) << 32 | u64::from(u32::from_le_bytes(lo) & !0xf)
}

#[test]
fn refused_bar_moves_change_nothing_and_spare_neighbours() {
    let mut s = setup();
    s.mmio
        .insert(Arc::new(Mutex::new(Neighbour)), NEIGHBOUR, 0x10_0000)
        .unwrap();
    let dev = Arc::new(Mutex::new(Dummy::new()));
    s.bus
        .lock()
        .unwrap()
        .attach(Some(1), dev.clone(), &mut s.alloc)
        .unwrap();
    let mut ecam = PciConfigMmio::new(s.bus.clone());
    let home = 1u64 << 40;
    let mut d = [0u8; 1];
    // Onto the neighbour, then where the end would overflow: refused,
    // the BAR reads back where it is, mapping and ioeventfd unchanged.
    for bad in [NEIGHBOUR + 0x1000, 0xffff_ffff_ffff_f000] {
        program_bar(&mut ecam, bad);
        assert_eq!(bar0(&mut ecam), home, "write to {bad:#x} ignored");
        assert!(s.mmio.read(home + 7, &mut d));
        assert_eq!(d[0], 7);
        assert_eq!(*s.reg.0.lock().unwrap(), vec![home + 0x10]);
        assert!(s.mmio.read(NEIGHBOUR + 0x1000, &mut d));
        assert_eq!(d[0], 0xec, "neighbour intact");
    }
    // A later good move takes the BAR and its ioeventfd along and
    // leaves the neighbour alone.
    program_bar(&mut ecam, 0xd000_0000);
    assert_eq!(bar0(&mut ecam), 0xd000_0000);
    assert!(s.mmio.read(0xd000_0003, &mut d));
    assert_eq!(d[0], 3);
    assert!(!s.mmio.read(home, &mut d));
    assert_eq!(*s.reg.0.lock().unwrap(), vec![0xd000_0010]);
    assert!(s.mmio.read(NEIGHBOUR, &mut d));
    assert_eq!(d[0], 0xec, "neighbour intact");
    // With the allocator's windows, a free range outside them is refused.
    let windows = s.alloc.windows();
    s.bus.lock().unwrap().set_bar_windows(windows);
    program_bar(&mut ecam, 0x8000_0000);
    assert_eq!(bar0(&mut ecam), 0xd000_0000);
    assert!(!s.mmio.read(0x8000_0000, &mut d));
    program_bar(&mut ecam, 0xc000_0000);
    assert_eq!(bar0(&mut ecam), 0xc000_0000, "inside the 32-bit window");
    assert_eq!(*s.reg.0.lock().unwrap(), vec![0xc000_0010]);
    // Hot-unplug removes the BAR where it is now, nothing else.
    s.bus.lock().unwrap().detach(1, &mut s.alloc).unwrap();
    assert!(!s.mmio.read(0xc000_0000, &mut d));
    assert!(s.mmio.read(NEIGHBOUR, &mut d));
    assert!(s.reg.0.lock().unwrap().is_empty());
}

#[test]
fn allocator_aligns_and_reuses() {
    let mut a = RangeAllocator::new((0x1000, 0x3000), (0, 0), (0, 0));
    let bar = PciBar {
        index: 0,
        size: 0x2000,
        region_type: PciBarRegionType::Memory32,
        prefetchable: false,
    };
    let first = a.allocate(&bar).unwrap();
    assert_eq!(first, 0x2000);
    assert!(a.allocate(&bar).is_none());
    a.free(&PciBarRange { bar, addr: first });
    assert_eq!(a.allocate(&bar), Some(0x2000));
}

#[test]
fn chipset_functions_and_reset_control() {
    let s = setup();
    {
        let mut bus = s.bus.lock().unwrap();
        bus.set_chipset_function(1, 0, Arc::new(Mutex::new(Dummy::new())))
            .unwrap();
        bus.set_chipset_function(1, 3, Arc::new(Mutex::new(Dummy::new())))
            .unwrap();
        // Slot 1 is taken: devices start at 2.
        assert_eq!(bus.next_free_slot(), Some(2));
        assert!(bus
            .set_chipset_function(1, 0, Arc::new(Mutex::new(Dummy::new())))
            .is_err());
        assert!(bus
            .set_chipset_function(1, 8, Arc::new(Mutex::new(Dummy::new())))
            .is_err());
        assert_eq!(bus.read_config(0, 1, 3, 0), 0x5678_1234);
        assert_eq!(bus.read_config(0, 1, 2, 0), 0xffff_ffff);
        assert_eq!(bus.read_config(1, 1, 3, 0), 0xffff_ffff);
        // Writes to a function without BARs to move are taken.
        bus.write_config(0, 1, 3, 15, 0, &[9]);
        assert_eq!(bus.read_config(0, 1, 3, 15) & 0xff, 9);
    }
    let resets = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let r = resets.clone();
    let mut io = PciConfigIo::new(s.bus.clone()).with_reset_control(Box::new(move || {
        r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }));
    io.write(0xcf8, 1, &[0x02]); // no reset bit
    io.write(0xcf8, 1, &[0x06]);
    assert_eq!(resets.load(std::sync::atomic::Ordering::SeqCst), 1);
    // The address register still works.
    assert_eq!(cf8_read(&mut io, 1, 0), 0x5678_1234);
    // Without the hook, 0xCF9 is ignored.
    let mut plain = PciConfigIo::new(s.bus.clone());
    plain.write(0xcf8, 1, &[0x06]);
}
