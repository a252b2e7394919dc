//! ACPI tables the VMM writes for the guest, so it needs no firmware.
//!
//! The platform is *hardware-reduced* ACPI, as Cloud Hypervisor's: no PM
//! timer, no SCI, no legacy PIC, and the FADT says there is no CMOS RTC and
//! no VGA, so the guest skips those probes (each probe costs VM exits). Power
//! off and reset go through the FADT's sleep-control and reset registers,
//! which [`crate::devices::acpi_pm`] answers.
//!
//! ```text
//! ACPI_START: RSDP → XSDT → FADT (→ DSDT), MADT, extra tables (e.g. MCFG)
//! ```
//!
//! Later devices extend the tables through [`AcpiExtras`]: AML for the
//! DSDT's `\_SB` scope (a PCI host bridge, hot-plug controllers) and whole
//! extra tables.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;

const OEM_ID: [u8; 6] = *b"SKIFF ";
const OEM_TABLE_ID: [u8; 8] = *b"SKIFFVMM";
const OEM_REVISION: u32 = 1;

/// The sleep type value of S5 in `\_S5_` (what the guest writes, shifted).
pub const S5_SLEEP_TYPE: u8 = 5;

/// Errors while building or writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the ACPI tables ({size} bytes) do not fit in the BIOS area")]
    TooLarge { size: u64 },
    #[error("cannot write the ACPI tables into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// What other parts of the VMM add to the tables.
#[derive(Default)]
pub struct AcpiExtras {
    /// AML placed in the DSDT's `\_SB_` scope.
    pub sb_aml: Vec<u8>,
    /// Complete tables (with checksums) linked from the XSDT.
    pub tables: Vec<Vec<u8>>,
}

/// AML bytes made elsewhere, placed as they are.
pub(crate) struct RawAml<'a>(pub &'a [u8]);

impl Aml for RawAml<'_> {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.0);
    }
}

fn dsdt(extras: &AcpiExtras) -> Vec<u8> {
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let s5_type = S5_SLEEP_TYPE;
    let zero = 0u8;
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&s5_type, &zero])).to_aml_bytes(&mut t);
    let io = aml::IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&io, &irq]);
    let hid = aml::EISAName::new("PNP0501");
    let (hid, uid, crs) = (
        aml::Name::new("_HID".into(), &hid),
        aml::Name::new("_UID".into(), &zero),
        aml::Name::new("_CRS".into(), &com1_crs),
    );
    let com1 = aml::Device::new("COM1".into(), vec![&hid, &uid, &crs]);
    let raw = RawAml(&extras.sb_aml);
    aml::Scope::new("_SB_".into(), vec![&com1, &raw]).to_aml_bytes(&mut t);
    t.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    // IAPC_BOOT_ARCH: VGA not present (bit 2), no PCIe ASPM (bit 4), CMOS
    // RTC not present (bit 5). No 8042 bit: the kernel skips its probe; the
    // controller still answers the reboot write on port 0x64.
    f.iapc_boot_arch = ((1u16 << 2) | (1 << 4) | (1 << 5)).into();
    let reg = |port: u16| GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, u64::from(port));
    f.sleep_control_reg = reg(ACPI_PM_PORT);
    f.sleep_status_reg = reg(ACPI_PM_PORT + 1);
    f.reset_reg = reg(ACPI_PM_PORT + 2);
    f.reset_value = 1;
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"SKIFFVMM").into();
    let mut out = Vec::new();
    f.finalize().to_aml_bytes(&mut out);
    out
}

/// MADT local APIC flags: enabled, or online-capable (can be hot-added;
/// ACPI 6.3, MADT revision 5).
const LAPIC_ENABLED: u8 = 1;
const LAPIC_ONLINE_CAPABLE: u8 = 2;

fn madt(cpus: u8, max_cpus: u8) -> Vec<u8> {
    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.write_u32(36, APIC_START as u32);
    t.write_u32(40, 0); // flags: no dual 8259 set-up to disable
    for id in 0..max_cpus.max(cpus) {
        // Processor local APIC: type 0, length 8, UID, APIC ID, flags.
        let flags = if id < cpus { LAPIC_ENABLED } else { LAPIC_ONLINE_CAPABLE };
        t.append_slice(&[0, 8, id, id, flags, 0, 0, 0]);
    }
    // I/O APIC: type 1, length 12, ID (after the CPUs'), address, GSI base 0.
    let mut ioapic = vec![1, 12, max_cpus.max(cpus), 0];
    ioapic.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    t.append_slice(&ioapic);
    // Interrupt source override: ISA IRQ 0 (PIT) is GSI 2.
    t.append_slice(&[2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
    // Local APIC NMI on LINT1 of every processor.
    t.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    t.as_slice().to_vec()
}

fn align8(x: u64) -> u64 {
    (x + 7) & !7
}

/// Builds the tables for `cpus` vCPUs at boot (and `max_cpus` possible
/// ones) and writes them at [`ACPI_START`]. Returns the RSDP's address.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    cpus: u8,
    max_cpus: u8,
    extras: &AcpiExtras,
) -> Result<GuestAddress, AcpiError> {
    let rsdp_addr = ACPI_START;
    let mut next = align8(rsdp_addr + Rsdp::len() as u64);
    let mut place = |bytes: &[u8]| {
        let at = next;
        next = align8(next + bytes.len() as u64);
        (at, bytes.to_vec())
    };
    let dsdt = place(&dsdt(extras));
    let fadt = place(&fadt(dsdt.0));
    let madt = place(&madt(cpus, max_cpus));
    let extra: Vec<(u64, Vec<u8>)> = extras.tables.iter().map(|t| place(t)).collect();

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt.0);
    xsdt.add_entry(madt.0);
    for (addr, _) in &extra {
        xsdt.add_entry(*addr);
    }
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt = place(&xsdt_bytes);
    if next > VMGENID_START {
        return Err(AcpiError::TooLarge { size: next - ACPI_START });
    }
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt.0).to_aml_bytes(&mut rsdp);

    for (addr, bytes) in [(rsdp_addr, rsdp)].into_iter().chain([dsdt, fadt, madt, xsdt]).chain(extra) {
        mem.write_slice(&bytes, GuestAddress(addr)).map_err(AcpiError::Write)?;
    }
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_have_valid_checksums_and_cpus() {
        let m = madt(4, 6);
        assert!(checksum_ok(&m));
        assert_eq!(&m[0..4], b"APIC");
        assert_eq!(u32::from_le_bytes(m[4..8].try_into().unwrap()) as usize, m.len());
        let lapics: Vec<&[u8]> = m[44..].chunks(8).take_while(|c| c[0] == 0).collect();
        assert_eq!(lapics.len(), 6);
        assert!(lapics[..4].iter().all(|l| l[4] == LAPIC_ENABLED));
        assert!(lapics[4..].iter().all(|l| l[4] == LAPIC_ONLINE_CAPABLE));
        // The IOAPIC's ID comes after every possible CPU's.
        assert_eq!(m[44 + 6 * 8 + 2], 6);
        let f = fadt(0x1234);
        assert!(checksum_ok(&f));
        assert_eq!(&f[0..4], b"FACP");
        let d = dsdt(&AcpiExtras::default());
        assert!(checksum_ok(&d));
        // The \_S5_ name is in the DSDT.
        assert!(d.windows(4).any(|w| w == b"_S5_"));
    }

    #[test]
    fn written_tables_are_linked() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let rsdp = create_acpi_tables(&mem, 2, 2, &AcpiExtras::default()).unwrap();
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, rsdp).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        let xsdt: u64 = mem.read_obj(GuestAddress(rsdp.0 + 24)).unwrap();
        let mut s = [0u8; 4];
        mem.read_slice(&mut s, GuestAddress(xsdt)).unwrap();
        assert_eq!(&s, b"XSDT");
        let first: u64 = mem.read_obj(GuestAddress(xsdt + 36)).unwrap();
        mem.read_slice(&mut s, GuestAddress(first)).unwrap();
        assert_eq!(&s, b"FACP");
    }
}
