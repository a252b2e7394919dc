//! The VM generation ID (Microsoft's "Virtual Machine Generation ID"
//! specification, which Linux's `vmgenid` driver follows): a 16-byte
//! random GUID in guest memory that changes whenever the VM may have been
//! duplicated. A VM restored from a snapshot gets a new one, and the guest
//! is notified; Linux then reseeds its RNG ("crng reseeded due to virtual
//! machine fork"), so clones of one snapshot do not draw the same numbers.
//!
//! ```text
//! DSDT \_SB_.VGEN: _HID "VMGENCTR", _CID/_DDN "VM_Gen_Counter",
//!                  ADDR = Package { low 32 bits, high 32 bits } of the GUID
//!                  GNOT: Notify(VGEN, 0x80), called by the GED's _EVT
//! VMGENID_START:   the GUID (in the e820-reserved BIOS area)
//! restore: new GUID written → Ged::notify(GENERATION_ID) → guest re-reads it
//! ```

use acpi_tables::aml;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::layout::VMGENID_START;

/// The GED method that tells the guest the ID changed.
pub const NOTIFY_METHOD: &str = "\\_SB_.VGEN.GNOT";

/// Why the generation ID cannot be made or written.
#[derive(Debug, thiserror::Error)]
pub enum VmGenIdError {
    #[error("cannot draw a random generation ID")]
    Random(#[source] std::io::Error),
    #[error("cannot write the generation ID into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// A fresh random GUID from the host's getrandom.
pub fn new_generation_id() -> Result<[u8; 16], VmGenIdError> {
    let mut id = [0u8; 16];
    // SAFETY: getrandom writes at most `id.len()` bytes into `id`.
    let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
    if n != id.len() as isize {
        return Err(VmGenIdError::Random(std::io::Error::last_os_error()));
    }
    Ok(id)
}

/// Writes a new random ID at [`VMGENID_START`]; returns it.
pub fn write_generation_id(mem: &GuestMemoryMmap) -> Result<[u8; 16], VmGenIdError> {
    let id = new_generation_id()?;
    mem.write_slice(&id, GuestAddress(VMGENID_START)).map_err(VmGenIdError::Write)?;
    Ok(id)
}

/// The generation ID as the guest's memory holds it.
pub fn read_generation_id(mem: &GuestMemoryMmap) -> Option<[u8; 16]> {
    mem.read_obj(GuestAddress(VMGENID_START)).ok()
}

/// The ID as a GUID string, for logs.
pub fn format_id(id: &[u8; 16]) -> String {
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

/// The `VGEN` device for the DSDT's `\_SB` scope.
pub fn vmgenid_aml() -> Vec<u8> {
    let mut out = Vec::new();
    let (low, high) = (VMGENID_START as u32, (VMGENID_START >> 32) as u32);
    let addr = aml::Package::new(vec![&low, &high]);
    let name = "VM_Gen_Counter";
    let hid = aml::Name::new("_HID".into(), &"VMGENCTR");
    let cid = aml::Name::new("_CID".into(), &name);
    let ddn = aml::Name::new("_DDN".into(), &name);
    let addr = aml::Name::new("ADDR".into(), &addr);
    let me = aml::Path::new("\\_SB_.VGEN");
    let changed = 0x80u8;
    let notify = aml::Notify::new(&me, &changed);
    let gnot = aml::Method::new("GNOT".into(), 0, false, vec![&notify]);
    aml::Device::new("VGEN".into(), vec![&hid, &cid, &ddn, &addr, &gnot]).to_aml_bytes(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_random_and_land_where_addr_says() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let a = write_generation_id(&mem).unwrap();
        assert_eq!(read_generation_id(&mem), Some(a));
        let b = write_generation_id(&mem).unwrap();
        assert_ne!(a, b);
        assert_eq!(read_generation_id(&mem), Some(b));
        assert_eq!(format_id(&[0xab; 16]).len(), 36);
        let aml = vmgenid_aml();
        let has = |s: &[u8]| aml.windows(s.len()).any(|w| w == s);
        assert!(has(b"VGEN") && has(b"VMGENCTR") && has(b"VM_Gen_Counter") && has(b"ADDR") && has(b"GNOT"));
        // ADDR's low word is the GUID's address (a DWord constant).
        assert!(has(&[0x0c, 0x00, 0xf0, 0x0f, 0x00]), "ADDR's low word");
    }
}
