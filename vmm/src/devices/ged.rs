//! The ACPI Generic Event Device (`ACPI0013`): how a hardware-reduced
//! platform tells the guest that something happened. One edge-triggered
//! interrupt and one 32-bit register of event bits (reading it clears it);
//! the DSDT's `_EVT` method reads the bits and calls the handler of each
//! kind: the CPU, memory and PCI hot-plug controllers' scan methods and
//! the power button's notify.
//!
//! ```text
//!  VMM: Ged::notify(bits) ─► irqfd (GSI GED_IRQ) ─► guest: \_SB.GED_._EVT
//!        └─ pending |= bits      reads GDAT (clears) ◄─┘   └─► CSCN / PSCN / VGEN.GNOT / Notify(PWRB, 0x80)
//! ```

use acpi_tables::aml;
use acpi_tables::Aml;
use vm_device::BusDevice;
use vmm_sys_util::eventfd::EventFd;

/// Event bits of the register.
pub mod event {
    /// A vCPU was added or is to be removed.
    pub const CPU: u32 = 1 << 0;
    /// A PCI device was added or is to be removed.
    pub const PCI: u32 = 1 << 2;
    /// The power button was pressed.
    pub const POWER_BUTTON: u32 = 1 << 3;
    /// The VM generation ID changed (a restore).
    pub const GENERATION_ID: u32 = 1 << 4;
}

/// Size of the register window.
pub const GED_SIZE: u64 = 4;

/// The device: pending event bits and the interrupt.
pub struct Ged {
    pending: u32,
    irq: EventFd,
}

impl Ged {
    /// A GED raising `irq` (an irqfd for its GSI).
    pub fn new(irq: EventFd) -> Self {
        Self { pending: 0, irq }
    }

    /// Records `bits` and interrupts the guest.
    pub fn notify(&mut self, bits: u32) -> std::io::Result<()> {
        self.pending |= bits;
        self.irq.write(1)
    }
}

impl BusDevice for Ged {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&std::mem::take(&mut self.pending).to_le_bytes());
        }
    }

    fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {}
}

/// `GED_` and the power button `PWRB`, for the DSDT's `\_SB` scope, for a
/// GED at `base` on `gsi`. `handlers` pairs event bits with the method to
/// call (e.g. `\_SB_.PCI0.PSCN`).
pub fn ged_aml(base: u64, gsi: u32, handlers: &[(u32, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    let irq = aml::Interrupt::new(true, true, false, false, gsi);
    let crs = aml::ResourceTemplate::new(vec![&irq]);
    let (base_v, size_v) = (base, GED_SIZE as u32);
    let region = aml::OpRegion::new("GDST".into(), aml::OpRegionSpace::SystemMemory, &base_v, &size_v);
    let field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 32)],
    );
    let calls: Vec<aml::MethodCall> =
        handlers.iter().map(|(_, m)| aml::MethodCall::new(aml::Path::new(m), vec![])).collect();
    let bits: Vec<u32> = handlers.iter().map(|(b, _)| *b).collect();
    let masks: Vec<aml::And> = bits.iter().map(|b| aml::And::new(&aml::ZERO, &aml::Local(0), b)).collect();
    let power = aml::Path::new("\\_SB_.PWRB");
    let press = 0x80u8;
    let notify_power = aml::Notify::new(&power, &press);
    let power_bit = event::POWER_BUTTON;
    let power_mask = aml::And::new(&aml::ZERO, &aml::Local(0), &power_bit);
    let mut ifs: Vec<aml::If> = masks.iter().zip(&calls).map(|(m, c)| aml::If::new(m, vec![c])).collect();
    ifs.push(aml::If::new(&power_mask, vec![&notify_power]));
    let gdat = aml::Path::new("GDAT");
    let load = aml::Store::new(&aml::Local(0), &gdat);
    let mut body: Vec<&dyn Aml> = vec![&load];
    body.extend(ifs.iter().map(|i| i as &dyn Aml));
    let evt = aml::Method::new("_EVT".into(), 1, true, body);
    let hid = aml::Name::new("_HID".into(), &"ACPI0013");
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let crs = aml::Name::new("_CRS".into(), &crs);
    aml::Device::new("GED_".into(), vec![&hid, &uid, &crs, &region, &field, &evt]).to_aml_bytes(&mut out);
    let pwrb_hid = aml::EISAName::new("PNP0C0C");
    let pwrb = [aml::Name::new("_HID".into(), &pwrb_hid), aml::Name::new("_UID".into(), &aml::ZERO)];
    aml::Device::new("PWRB".into(), vec![&pwrb[0], &pwrb[1]]).to_aml_bytes(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_clears_pending_bits() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut ged = Ged::new(irq.try_clone().unwrap());
        ged.notify(event::PCI).unwrap();
        ged.notify(event::POWER_BUTTON).unwrap();
        assert_eq!(irq.read().unwrap(), 2);
        let mut d = [0u8; 4];
        ged.read(0, 0, &mut d);
        assert_eq!(u32::from_le_bytes(d), event::PCI | event::POWER_BUTTON);
        ged.read(0, 0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0);
        let mut short = [0xffu8; 2];
        ged.read(0, 0, &mut short);
        assert_eq!(short, [0, 0]);
    }

    #[test]
    fn aml_names_the_device_and_handlers() {
        let aml = ged_aml(0xfe00_0000, 5, &[(event::PCI, "\\_SB_.PHPR.PSCN")]);
        let has = |s: &[u8]| aml.windows(s.len()).any(|w| w == s);
        assert!(has(b"ACPI0013") && has(b"_EVT") && has(b"GDAT") && has(b"PSCN") && has(b"PWRB"));
        // The power button's _HID is the EISA id of PNP0C0C.
        assert!(has(&[0x41, 0xd0, 0x0c, 0x0c]));
    }
}
