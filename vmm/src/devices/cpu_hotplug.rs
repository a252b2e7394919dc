//! ACPI CPU hot-plug: processor devices `\_SB.CPUS.Cxxx` (`ACPI0007`) for
//! every possible vCPU, with `_STA`, `_MAT` and `_EJ0`, backed by a small
//! MMIO register block, as Linux's ACPI processor driver and Windows expect.
//! The MADT lists the possible vCPUs beyond the boot ones as
//! online-capable but not enabled, so the guest sizes itself for them.
//!
//! | offset | size | register                                                    |
//! |--------|------|-------------------------------------------------------------|
//! | 0      | 4    | `CSEL`: write selects a vCPU                                 |
//! | 4      | 1    | bit 0 `CPEN` present; bit 1 `CINS` being inserted, bit 2 `CRMV` to be removed (write 1 to acknowledge); bit 3 `CEJ0` write 1: the guest ejected it |
//!
//! ```text
//!  add:    VMM starts the vCPU, CPEN = CINS = 1 ─► GED ─► CSCN: Notify(Cxxx, 1) ─► the guest adds it (offline);
//!          the guest (its agent, or udev) onlines it
//!  remove: VMM sets CRMV ─► GED ─► CSCN: Notify(Cxxx, 3) ─► the guest offlines it, calls _EJ0
//!          ─► CEJ0 write ─► eventfd ─► VMM stops the vCPU's thread (only now)
//! ```

use acpi_tables::aml;
use acpi_tables::Aml;
use vm_device::BusDevice;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Size of the register block.
pub const CPU_HOTPLUG_SIZE: u64 = 8;
const CSEL: u64 = 0;
const STATUS: u64 = 4;
const CPEN: u8 = 1 << 0;
const CINS: u8 = 1 << 1;
const CRMV: u8 = 1 << 2;
const CEJ0: u8 = 1 << 3;

#[derive(Clone, Copy, Default)]
struct Slot {
    present: bool,
    inserting: bool,
    removing: bool,
}

/// The register block.
pub struct CpuHotplug {
    slots: Vec<Slot>,
    selected: usize,
    ejected: Vec<u8>,
    evt: EventFd,
}

impl CpuHotplug {
    /// `max` possible vCPUs, the first `boot` present.
    pub fn new(boot: u8, max: u8) -> std::io::Result<Self> {
        let slots = (0..max).map(|i| Slot { present: i < boot, ..Slot::default() }).collect();
        Ok(Self { slots, selected: 0, ejected: Vec::new(), evt: EventFd::new(EFD_NONBLOCK)? })
    }

    /// vCPU `id` was started: tell the guest on the next scan.
    pub fn insert(&mut self, id: u8) {
        if let Some(s) = self.slots.get_mut(usize::from(id)) {
            *s = Slot { present: true, inserting: true, removing: false };
        }
    }

    /// Ask the guest to eject vCPU `id` on the next scan.
    pub fn request_remove(&mut self, id: u8) {
        if let Some(s) = self.slots.get_mut(usize::from(id)).filter(|s| s.present) {
            s.removing = true;
        }
    }

    /// Whether a removal the guest has not finished is pending.
    pub fn removal_pending(&self) -> bool {
        self.slots.iter().any(|s| s.present && s.removing)
    }

    /// vCPUs the guest ejected since the last call; they are no longer
    /// present.
    pub fn take_ejected(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.ejected)
    }

    /// Written when the guest ejects a vCPU.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

impl BusDevice for CpuHotplug {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match (offset, data.len()) {
            (CSEL, 4) => data.copy_from_slice(&(self.selected as u32).to_le_bytes()),
            (STATUS, 1) => {
                if let Some(s) = self.slots.get(self.selected) {
                    let bit = |on: bool, b: u8| if on { b } else { 0 };
                    data[0] = bit(s.present, CPEN) | bit(s.inserting, CINS) | bit(s.removing, CRMV);
                }
            }
            _ => {}
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (CSEL, 4) => {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                self.selected = u32::from_le_bytes(b) as usize;
            }
            (STATUS, 1) => {
                let id = self.selected;
                let Some(s) = self.slots.get_mut(id) else { return };
                let v = data[0];
                if v & CINS != 0 {
                    s.inserting = false;
                }
                if v & CRMV != 0 {
                    s.removing = false;
                }
                // Only a vCPU the VMM asked to remove can be ejected: the
                // boot vCPU and the others stay whatever the guest writes.
                if v & CEJ0 != 0 && s.present && id != 0 {
                    s.present = false;
                    self.ejected.push(id as u8);
                    let _ = self.evt.write(1);
                }
            }
            _ => {}
        }
    }
}

fn cpu_name(id: u8) -> String {
    format!("C{id:03X}")
}

/// `\_SB.CPUS` with one processor device per possible vCPU and the scan
/// method `\_SB_.CPUS.CSCN` (the GED's CPU handler).
pub fn cpu_hotplug_aml(base: u64, max: u8) -> Vec<u8> {
    let size = CPU_HOTPLUG_SIZE as u32;
    let region = aml::OpRegion::new("PRST".into(), aml::OpRegionSpace::SystemMemory, &base, &size);
    let sel = aml::Field::new(
        "PRST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"CSEL", 32)],
    );
    let flags = aml::Field::new(
        "PRST".into(),
        aml::FieldAccessType::Byte,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![
            aml::FieldEntry::Reserved(32),
            aml::FieldEntry::Named(*b"CPEN", 1),
            aml::FieldEntry::Named(*b"CINS", 1),
            aml::FieldEntry::Named(*b"CRMV", 1),
            aml::FieldEntry::Named(*b"CEJ0", 1),
        ],
    );
    let lock = aml::Mutex::new("CPLK".into(), 0);
    let (acquire, release) = (aml::Acquire::new("CPLK".into(), 0xffff), aml::Release::new("CPLK".into()));
    let (csel, cpen, cins, crmv, cej0) = (
        aml::Path::new("CSEL"),
        aml::Path::new("CPEN"),
        aml::Path::new("CINS"),
        aml::Path::new("CRMV"),
        aml::Path::new("CEJ0"),
    );
    let (one, fifteen) = (1u8, 0x0fu8);

    // CSTA(id): 0x0F when present, else 0.
    let select = aml::Store::new(&csel, &aml::Arg(0));
    let zero_l0 = aml::Store::new(&aml::Local(0), &aml::ZERO);
    let set_l0 = aml::Store::new(&aml::Local(0), &fifteen);
    let is_present = aml::Equal::new(&cpen, &one);
    let if_present = aml::If::new(&is_present, vec![&set_l0]);
    let ret_l0 = aml::Return::new(&aml::Local(0));
    let csta =
        aml::Method::new("CSTA".into(), 1, true, vec![&acquire, &select, &zero_l0, &if_present, &release, &ret_l0]);

    // CPEJ(id): the guest let go of it (sets the CEJ0 bit).
    let eject = aml::Store::new(&cej0, &one);
    let cej0_m = aml::Method::new("CPEJ".into(), 1, true, vec![&acquire, &select, &eject, &release]);

    // CTFY(id, event): notify processor device `id`.
    let names: Vec<(u8, aml::Path)> = (0..max).map(|i| (i, aml::Path::new(&cpu_name(i)))).collect();
    let ids: Vec<u8> = names.iter().map(|(i, _)| *i).collect();
    let eqs: Vec<aml::Equal> = ids.iter().map(|i| aml::Equal::new(&aml::Arg(0), i)).collect();
    let notifies: Vec<aml::Notify> = names.iter().map(|(_, p)| aml::Notify::new(p, &aml::Arg(1))).collect();
    let ifs: Vec<aml::If> = eqs.iter().zip(&notifies).map(|(e, n)| aml::If::new(e, vec![n])).collect();
    let ctfy = aml::Method::new("CTFY".into(), 2, true, ifs.iter().map(|i| i as &dyn Aml).collect());

    // CSCN: for every vCPU, notify insertions (1) and eject requests (3).
    let three = 3u8;
    let sel_l0 = aml::Store::new(&csel, &aml::Local(0));
    let (ins_call, rmv_call) = (
        aml::MethodCall::new("CTFY".into(), vec![&aml::Local(0), &one]),
        aml::MethodCall::new("CTFY".into(), vec![&aml::Local(0), &three]),
    );
    let (ack_ins, ack_rmv) = (aml::Store::new(&cins, &one), aml::Store::new(&crmv, &one));
    let (is_ins, is_rmv) = (aml::Equal::new(&cins, &one), aml::Equal::new(&crmv, &one));
    let if_ins = aml::If::new(&is_ins, vec![&ins_call, &ack_ins]);
    let if_rmv = aml::If::new(&is_rmv, vec![&rmv_call, &ack_rmv]);
    let next = aml::Add::new(&aml::Local(0), &aml::Local(0), &one);
    let max_v = max;
    let more = aml::LessThan::new(&aml::Local(0), &max_v);
    let lp = aml::While::new(&more, vec![&sel_l0, &if_ins, &if_rmv, &next]);
    let cscn = aml::Method::new("CSCN".into(), 0, true, vec![&acquire, &zero_l0, &lp, &release]);

    // The processor devices.
    struct Cpu {
        name: String,
        uid: u8,
        mat: aml::BufferData,
    }
    let cpus: Vec<Cpu> = (0..max)
        .map(|i| Cpu { name: cpu_name(i), uid: i, mat: aml::BufferData::new(vec![0, 8, i, i, 1, 0, 0, 0]) })
        .collect();
    let mut devices = Vec::new();
    for c in &cpus {
        let mut out = Vec::new();
        let hid = aml::Name::new("_HID".into(), &"ACPI0007");
        let uid = aml::Name::new("_UID".into(), &c.uid);
        let mat = aml::Name::new("_MAT".into(), &c.mat);
        let sta_call = aml::MethodCall::new("CSTA".into(), vec![&c.uid]);
        let sta_ret = aml::Return::new(&sta_call);
        let sta = aml::Method::new("_STA".into(), 0, false, vec![&sta_ret]);
        let ej_call = aml::MethodCall::new("CPEJ".into(), vec![&c.uid]);
        let ej0 = aml::Method::new("_EJ0".into(), 1, false, vec![&ej_call]);
        aml::Device::new(c.name.as_str().into(), vec![&hid, &uid, &mat, &sta, &ej0]).to_aml_bytes(&mut out);
        devices.push(out);
    }
    let raw: Vec<crate::arch::acpi::RawAml> = devices.iter().map(|d| crate::arch::acpi::RawAml(d)).collect();
    let hid = aml::Name::new("_HID".into(), &"ACPI0010");
    let cid = aml::EISAName::new("PNP0A05");
    let cid = aml::Name::new("_CID".into(), &cid);
    let mut children: Vec<&dyn Aml> = vec![&hid, &cid, &region, &sel, &flags, &lock, &csta, &cej0_m, &ctfy, &cscn];
    children.extend(raw.iter().map(|r| r as &dyn Aml));
    let mut out = Vec::new();
    aml::Device::new("CPUS".into(), children).to_aml_bytes(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(hp: &mut CpuHotplug, id: u32) -> u8 {
        hp.write(0, CSEL, &id.to_le_bytes());
        let mut d = [0u8; 1];
        hp.read(0, STATUS, &mut d);
        d[0]
    }

    #[test]
    fn insert_remove_eject() {
        let mut hp = CpuHotplug::new(2, 4).unwrap();
        assert_eq!(status(&mut hp, 1), CPEN);
        assert_eq!(status(&mut hp, 2), 0);
        hp.insert(2);
        assert_eq!(status(&mut hp, 2), CPEN | CINS);
        hp.write(0, STATUS, &[CINS]);
        assert_eq!(status(&mut hp, 2), CPEN);
        hp.request_remove(3); // not present: nothing to remove
        assert!(!hp.removal_pending());
        hp.request_remove(2);
        assert!(hp.removal_pending());
        assert_eq!(status(&mut hp, 2), CPEN | CRMV);
        hp.write(0, STATUS, &[CRMV | CEJ0]);
        assert_eq!(hp.eventfd().read().unwrap(), 1);
        assert_eq!(hp.take_ejected(), vec![2]);
        assert_eq!(status(&mut hp, 2), 0);
        // The boot vCPU and out-of-range selections are not ejectable.
        status(&mut hp, 0);
        hp.write(0, STATUS, &[CEJ0]);
        status(&mut hp, 200);
        hp.write(0, STATUS, &[CEJ0]);
        assert!(hp.take_ejected().is_empty());
        assert_eq!(status(&mut hp, 0), CPEN);
    }

    #[test]
    fn aml_has_every_cpu() {
        let aml = cpu_hotplug_aml(0xfe00_2000, 8);
        let count = |s: &[u8]| aml.windows(s.len()).filter(|w| *w == s).count();
        assert_eq!(count(b"ACPI0007"), 8);
        assert_eq!(count(b"_EJ0"), 8);
        assert!(count(b"C007") >= 2 && count(b"C008") == 0);
        assert!(count(b"CSCN") == 1 && count(b"ACPI0010") == 1);
        // Method names must not collide with the register fields' names.
        assert_eq!(count(b"CEJ0"), 2, "the field and the method that sets it");
        assert_eq!(count(b"CPEJ"), 1 + 8, "the method and one call per CPU");
    }
}
