//! A guest's-eye view of the whole stack through the public API only, as
//! the VMM wires it: port and MMIO buses, the PCI root bus with 0xCF8 and
//! ECAM, a virtio-blk device on the virtio-pci transport, ioeventfds and
//! MSI-X delivered through an interrupt manager.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_devices::block::{Block, BlockConfig};
use virtio_devices::pci::bus::{RangeAllocator, PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_SIZE};
use virtio_devices::pci::{IoEventRegistrar, PciBus, PciConfigIo, PciConfigMmio, PciDevice};
use virtio_devices::{GuestMemoryMmap, VirtioDevice, VirtioPciDevice};
use vm_device::interrupt::{EventFd, InterruptError, InterruptGroup, InterruptManager, MsiMessage};
use vm_device::Bus;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};

const ECAM_BASE: u64 = 0xe000_0000;

/// Records MSI routes and fired vectors, like KVM GSI routes + irqfds.
#[derive(Default)]
struct Msi {
    routes: Mutex<Vec<(usize, MsiMessage, bool)>>,
    fired: Mutex<Vec<usize>>,
}

impl InterruptGroup for Msi {
    fn len(&self) -> usize {
        8
    }
    fn trigger(&self, index: usize) -> Result<(), InterruptError> {
        self.fired.lock().unwrap().push(index);
        Ok(())
    }
    fn notifier(&self, _index: usize) -> Option<&EventFd> {
        None
    }
    fn update(&self, index: usize, msg: MsiMessage, masked: bool) -> Result<(), InterruptError> {
        self.routes.lock().unwrap().push((index, msg, masked));
        Ok(())
    }
}

struct Manager(Arc<Msi>);

impl InterruptManager for Manager {
    fn create_msi_group(&self, count: usize) -> Result<Arc<dyn InterruptGroup>, InterruptError> {
        assert_eq!(count, 2, "one queue + config");
        Ok(self.0.clone())
    }
}

/// KVM's ioeventfd table.
#[derive(Default)]
struct IoEvents(Mutex<Vec<(u64, EventFd)>>);

impl IoEventRegistrar for IoEvents {
    fn register_ioevent(&self, fd: &EventFd, addr: u64) -> std::io::Result<()> {
        self.0.lock().unwrap().push((addr, fd.try_clone()?));
        Ok(())
    }
    fn unregister_ioevent(&self, _fd: &EventFd, addr: u64) -> std::io::Result<()> {
        self.0.lock().unwrap().retain(|(a, _)| *a != addr);
        Ok(())
    }
}

struct Machine {
    mmio: Arc<Bus>,
    pio: Arc<Bus>,
    ioevents: Arc<IoEvents>,
    mem: GuestMemoryMmap,
}

impl Machine {
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        // KVM signals an ioeventfd instead of exiting.
        if let Some((_, fd)) = self
            .ioevents
            .0
            .lock()
            .unwrap()
            .iter()
            .find(|(a, _)| *a == addr)
        {
            fd.write(1).unwrap();
            return;
        }
        assert!(self.mmio.write(addr, data), "nothing at {addr:#x}");
    }
    fn mmio_read(&self, addr: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        assert!(self.mmio.read(addr, &mut b[..len]));
        u64::from_le_bytes(b)
    }
    fn cfg_read(&self, slot: u32, reg: u32) -> u32 {
        self.pio.write(
            PCI_CONFIG_IO_PORT,
            &(0x8000_0000 | slot << 11 | reg << 2).to_le_bytes(),
        );
        let mut b = [0u8; 4];
        self.pio.read(PCI_CONFIG_IO_PORT + 4, &mut b);
        u32::from_le_bytes(b)
    }
    fn ecam_write(&self, slot: u64, offset: u64, data: &[u8]) {
        self.mmio_write(ECAM_BASE + (slot << 15) + offset, data);
    }
}

fn w(m: &Machine, addr: u64, v: u64, len: usize) {
    m.mmio_write(addr, &v.to_le_bytes()[..len]);
}

#[test]
fn guest_reads_a_disk_through_pci() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .write_all(&[0x5a; 4096])
        .unwrap();

    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
    let machine = Machine {
        mmio: Arc::new(Bus::new()),
        pio: Arc::new(Bus::new()),
        ioevents: Arc::new(IoEvents::default()),
        mem: mem.clone(),
    };
    let pci = Arc::new(Mutex::new(PciBus::new(
        machine.mmio.clone(),
        machine.pio.clone(),
        machine.ioevents.clone(),
    )));
    machine
        .pio
        .insert(
            Arc::new(Mutex::new(PciConfigIo::new(pci.clone()))),
            PCI_CONFIG_IO_PORT,
            PCI_CONFIG_IO_SIZE,
        )
        .unwrap();
    machine
        .mmio
        .insert(
            Arc::new(Mutex::new(PciConfigMmio::new(pci.clone()))),
            ECAM_BASE,
            1 << 20,
        )
        .unwrap();

    let msi = Arc::new(Msi::default());
    let block: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(
        Block::new(&BlockConfig {
            path: img,
            format: None,
            readonly: true,
            serial: None,
        })
        .unwrap(),
    ));
    let dev = VirtioPciDevice::new(
        block,
        GuestMemoryAtomic::new(mem.clone()),
        &Manager(msi.clone()),
    )
    .unwrap();
    let mut alloc = RangeAllocator::new((0xc000_0000, 0x1000_0000), (1 << 36, 1 << 30), (0, 0));
    let dev: Arc<Mutex<dyn PciDevice>> = Arc::new(Mutex::new(dev));
    let slot = pci.lock().unwrap().attach(None, dev, &mut alloc).unwrap();

    // Enumerate with port I/O: a virtio-blk (0x1042) in slot 1.
    assert_eq!(machine.cfg_read(0, 0), 0x0d57_8086);
    assert_eq!(machine.cfg_read(u32::from(slot), 0), 0x1042_1af4);
    let bar = u64::from(machine.cfg_read(1, 4) & !0xf) | u64::from(machine.cfg_read(1, 5)) << 32;
    assert_eq!(bar, 1 << 36);
    // Walk the capabilities for MSI-X.
    let mut ptr = machine.cfg_read(1, 13) & 0xff;
    let mut msix_cap = 0;
    while ptr != 0 {
        let v = machine.cfg_read(1, ptr / 4);
        if v & 0xff == 0x11 {
            msix_cap = ptr;
        }
        ptr = (v >> 8) & 0xff;
    }
    assert_ne!(msix_cap, 0);
    // Memory decoding + bus master, MSI-X on, through ECAM.
    machine.ecam_write(1, 4, &[0x06, 0x00]);
    machine.ecam_write(1, u64::from(msix_cap) + 3, &[0x80]);
    for v in 0..2u64 {
        w(&machine, bar + 0x4000 + 16 * v, 0xfee0_0000, 8);
        w(&machine, bar + 0x4000 + 16 * v + 8, 0x30 + v, 4);
        w(&machine, bar + 0x4000 + 16 * v + 12, 0, 4);
    }
    assert!(msi
        .routes
        .lock()
        .unwrap()
        .iter()
        .any(|r| r.0 == 1 && !r.2 && r.1.data == 0x31));

    // Driver handshake.
    w(&machine, bar + 0x14, 0, 1);
    w(&machine, bar + 0x14, 3, 1);
    w(&machine, bar, 0, 4);
    let f_lo = machine.mmio_read(bar + 4, 4);
    assert_ne!(f_lo & 1 << 5, 0, "read-only disk");
    w(&machine, bar + 0x08, 1, 4);
    w(&machine, bar + 0x0c, 1, 4);
    w(&machine, bar + 0x14, 0xb, 1);
    assert_eq!(machine.mmio_read(bar + 0x14, 1), 0xb);
    w(&machine, bar + 0x10, 0, 2);
    // Queue 0: 8 entries at 0x1000, vector 1.
    let (desc, avail, used) = (0x1000u64, 0x1100u64, 0x1200u64);
    w(&machine, bar + 0x16, 0, 2);
    w(&machine, bar + 0x18, 8, 2);
    w(&machine, bar + 0x20, desc, 8);
    w(&machine, bar + 0x28, avail, 8);
    w(&machine, bar + 0x30, used, 8);
    w(&machine, bar + 0x1a, 1, 2);
    w(&machine, bar + 0x1c, 1, 2);
    w(&machine, bar + 0x14, 0xf, 1);

    // One read of sector 0: header, 512-byte buffer, status.
    let put = |addr: u64, len: u32, flags: u16, next: u16, i: u64| {
        let d = GuestAddress(desc + 16 * i);
        mem.write_obj(addr, d).unwrap();
        mem.write_obj(len, GuestAddress(d.0 + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(d.0 + 12)).unwrap();
        mem.write_obj(next, GuestAddress(d.0 + 14)).unwrap();
    };
    mem.write_slice(&[0u8; 16], GuestAddress(0x2000)).unwrap();
    put(0x2000, 16, 1, 1, 0);
    put(0x3000, 512, 3, 2, 1);
    put(0x4000, 1, 2, 0, 2);
    mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
    mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
    // Notify queue 0 at its notification address: an ioeventfd.
    assert_eq!(machine.ioevents.0.lock().unwrap()[0].0, bar + 0x3000);
    w(&machine, bar + 0x3000, 0, 2);

    let mut done = false;
    for _ in 0..400 {
        if machine.mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap() == 1 {
            done = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(done, "request completed");
    let mut sector = [0u8; 512];
    mem.read_slice(&mut sector, GuestAddress(0x3000)).unwrap();
    assert_eq!(sector, [0x5a; 512]);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(0x4000)).unwrap(),
        0,
        "VIRTIO_BLK_S_OK"
    );
    for _ in 0..400 {
        if msi.fired.lock().unwrap().contains(&1) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(msi.fired.lock().unwrap().contains(&1), "queue vector fired");

    // Hot-unplug: BAR and ioeventfd gone, the slot reads as empty.
    pci.lock().unwrap().detach(slot, &mut alloc).unwrap();
    assert!(machine.ioevents.0.lock().unwrap().is_empty());
    assert_eq!(machine.cfg_read(1, 0), 0xffff_ffff);
    let mut b = [0u8; 4];
    assert!(!machine.mmio.read(bar, &mut b));
}
