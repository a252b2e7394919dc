//! ACPI PCI hot-plug for the root bus, the way Linux's `acpiphp` and
//! Windows expect it (QEMU's i440fx scheme; Cloud Hypervisor uses the
//! same): every slot 1–31 is an ACPI device under `\_SB.PCI0` with `_ADR`,
//! `_SUN` and `_EJ0`, and a small MMIO register block tells the guest which
//! slots changed.
//!
//! | offset | register | access                                                  |
//! |--------|----------|---------------------------------------------------------|
//! | 0      | `PCIU`   | read: slots with a new device (clears)                   |
//! | 4      | `PCID`   | read: slots whose device is to be ejected (clears)       |
//! | 8      | `B0EJ`   | write: the guest let go of these slots (from `_EJ0`)     |
//! | 12     | `PSEG`   | read: the PCI segment (0)                                |
//!
//! ```text
//!  add:    VMM plugs the device, PCIU |= slot ─► GED ─► PSCN: Notify(Sxxx, 1) ─► acpiphp scans the slot
//!  remove: VMM sets PCID |= slot ─► GED ─► PSCN: Notify(Sxxx, 3) ─► the driver lets go, _EJ0
//!          ─► B0EJ write ─► eventfd ─► VMM unplugs the device (only now)
//! ```

use acpi_tables::aml;
use acpi_tables::Aml;
use vm_device::BusDevice;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Size of the register block.
pub const PCI_HOTPLUG_SIZE: u64 = 16;
const PCIU: u64 = 0;
const PCID: u64 = 4;
const B0EJ: u64 = 8;
/// Slots the guest can see hot-plugged (slot 0 is the host bridge).
const SLOTS: std::ops::Range<u8> = 1..32;

/// The register block.
pub struct PciHotplug {
    up: u32,
    down: u32,
    ejected: u32,
    evt: EventFd,
}

impl PciHotplug {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self { up: 0, down: 0, ejected: 0, evt: EventFd::new(EFD_NONBLOCK)? })
    }

    /// A device was plugged into `slot`: tell the guest on the next scan.
    pub fn announce(&mut self, slot: u8) {
        self.up |= bit(slot);
    }

    /// Ask the guest to eject the device in `slot` on the next scan.
    pub fn request_eject(&mut self, slot: u8) {
        self.down |= bit(slot);
    }

    /// Slots the guest ejected since the last call.
    pub fn take_ejected(&mut self) -> u32 {
        std::mem::take(&mut self.ejected)
    }

    /// Written when the guest ejects a slot.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

fn bit(slot: u8) -> u32 {
    if SLOTS.contains(&slot) {
        1 << slot
    } else {
        0
    }
}

impl BusDevice for PciHotplug {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() != 4 {
            return;
        }
        let v = match offset {
            PCIU => std::mem::take(&mut self.up),
            PCID => std::mem::take(&mut self.down),
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset != B0EJ || data.len() != 4 {
            return;
        }
        let mut b = [0u8; 4];
        b.copy_from_slice(data);
        let slots = u32::from_le_bytes(b) & !1;
        if slots != 0 {
            self.ejected |= slots;
            let _ = self.evt.write(1);
        }
    }
}

fn slot_name(slot: u8) -> String {
    format!("S{slot:03}")
}

/// The AML that goes inside `\_SB.PCI0`: the register block, `PSCN` (the
/// GED handler, `\_SB_.PCI0.PSCN`), `PCEJ`, and one device per slot.
pub fn pci_hotplug_aml(base: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let size = PCI_HOTPLUG_SIZE as u32;
    aml::OpRegion::new("PCST".into(), aml::OpRegionSpace::SystemMemory, &base, &size).to_aml_bytes(&mut out);
    aml::Field::new(
        "PCST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![
            aml::FieldEntry::Named(*b"PCIU", 32),
            aml::FieldEntry::Named(*b"PCID", 32),
            aml::FieldEntry::Named(*b"B0EJ", 32),
            aml::FieldEntry::Named(*b"PSEG", 32),
        ],
    )
    .to_aml_bytes(&mut out);
    aml::Mutex::new("BLCK".into(), 0).to_aml_bytes(&mut out);

    // PCEJ(slot): tell the VMM the guest let go of `slot`.
    let (one, b0ej) = (1u8, aml::Path::new("B0EJ"));
    let shift = aml::ShiftLeft::new(&b0ej, &one, &aml::Arg(0));
    let (acquire, release) = (aml::Acquire::new("BLCK".into(), 0xffff), aml::Release::new("BLCK".into()));
    let ret = aml::Return::new(&aml::ZERO);
    aml::Method::new("PCEJ".into(), 1, true, vec![&acquire, &shift, &release, &ret]).to_aml_bytes(&mut out);

    // DVNT(bits, event): notify every slot whose bit is set.
    let slots: Vec<(u32, aml::Path)> = SLOTS.map(|s| (bit(s), aml::Path::new(&slot_name(s)))).collect();
    let masks: Vec<aml::And> = slots.iter().map(|(b, _)| aml::And::new(&aml::ZERO, &aml::Arg(0), b)).collect();
    let notifies: Vec<aml::Notify> = slots.iter().map(|(_, p)| aml::Notify::new(p, &aml::Arg(1))).collect();
    let ifs: Vec<aml::If> = masks.iter().zip(&notifies).map(|(m, n)| aml::If::new(m, vec![n])).collect();
    aml::Method::new("DVNT".into(), 2, true, ifs.iter().map(|i| i as &dyn Aml).collect()).to_aml_bytes(&mut out);

    // PSCN: insertions (device check) then eject requests.
    let (pciu, pcid, three) = (aml::Path::new("PCIU"), aml::Path::new("PCID"), 3u8);
    let up = aml::MethodCall::new("DVNT".into(), vec![&pciu, &one]);
    let down = aml::MethodCall::new("DVNT".into(), vec![&pcid, &three]);
    aml::Method::new("PSCN".into(), 0, true, vec![&acquire, &up, &down, &release]).to_aml_bytes(&mut out);

    for s in SLOTS {
        let (adr, sun) = (u32::from(s) << 16, u32::from(s));
        let call = aml::MethodCall::new("PCEJ".into(), vec![&sun]);
        let ej0 = aml::Method::new("_EJ0".into(), 1, false, vec![&call]);
        let (adr, sun) = (aml::Name::new("_ADR".into(), &adr), aml::Name::new("_SUN".into(), &sun));
        aml::Device::new(slot_name(s).as_str().into(), vec![&adr, &sun, &ej0]).to_aml_bytes(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers() {
        let mut hp = PciHotplug::new().unwrap();
        hp.announce(3);
        hp.request_eject(5);
        hp.announce(0); // the host bridge is never hot-plugged
        hp.announce(40);
        let read = |hp: &mut PciHotplug, off| {
            let mut d = [0u8; 4];
            hp.read(0, off, &mut d);
            u32::from_le_bytes(d)
        };
        assert_eq!(read(&mut hp, PCIU), 1 << 3);
        assert_eq!(read(&mut hp, PCIU), 0);
        assert_eq!(read(&mut hp, PCID), 1 << 5);
        assert_eq!(hp.take_ejected(), 0);
        hp.write(0, B0EJ, &(1u32 << 5).to_le_bytes());
        hp.write(0, B0EJ, &[1, 2]); // wrong size: ignored
        assert_eq!(hp.eventfd().read().unwrap(), 1);
        assert_eq!(hp.take_ejected(), 1 << 5);
        assert_eq!(hp.take_ejected(), 0);
    }

    #[test]
    fn aml_has_every_slot() {
        let aml = pci_hotplug_aml(0xfe00_1000);
        let count = |s: &[u8]| aml.windows(s.len()).filter(|w| *w == s).count();
        assert_eq!(count(b"_EJ0"), 31);
        assert!(count(b"S031") >= 2, "the slot device and its notify");
        assert_eq!(count(b"S000"), 0);
        assert!(count(b"PSCN") == 1 && count(b"B0EJ") >= 2);
    }
}
