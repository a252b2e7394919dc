//! The fw_cfg files a firmware-booted VM gets: the memory map
//! (`etc/e820`), the boot order, and Skiff's own ACPI tables through QEMU's
//! table-loader protocol (`etc/table-loader` with `etc/acpi/tables` and
//! `etc/acpi/rsdp`): the firmware allocates both blobs, patches the
//! pointers between tables with where it put them, recomputes the
//! checksums, and installs every table a pointer targets. The tables are
//! the ones direct boot writes into guest memory (the same builder), so a
//! firmware-booted guest sees the same MCFG, hot-plug AML and the rest.
//! And the SMBIOS tables ([`super::smbios`]).

use crate::arch::acpi::{build_acpi_blob, AcpiBlob, AcpiExtras, RSDP_XSDT};
use crate::arch::layout::{ram_ranges, E820Kind};
use crate::devices::fw_cfg::{FwCfg, FwCfgError, FILE_NAME_LEN};
use crate::firmware::smbios::{self, SmbiosInfo};

/// The loader's file names.
pub const TABLE_LOADER: &str = "etc/table-loader";
pub const ACPI_TABLES: &str = "etc/acpi/tables";
pub const ACPI_RSDP: &str = "etc/acpi/rsdp";

const CMD_ALLOCATE: u32 = 1;
const CMD_ADD_POINTER: u32 = 2;
const CMD_ADD_CHECKSUM: u32 = 3;
/// Allocation zones: anywhere in 32-bit memory, or the F segment.
const ZONE_HIGH: u8 = 1;
const ZONE_FSEG: u8 = 2;
/// Each loader command is 128 bytes.
const CMD_LEN: usize = 128;

/// Offset of an ACPI table header's checksum byte.
const TABLE_CHECKSUM: usize = 9;
/// The RSDP's checksum (first 20 bytes) and extended checksum (36 bytes).
const RSDP_CHECKSUM: usize = 8;
const RSDP_EXT_CHECKSUM: usize = 32;

fn name(file: &str) -> [u8; FILE_NAME_LEN] {
    let mut n = [0u8; FILE_NAME_LEN];
    let len = file.len().min(FILE_NAME_LEN - 1);
    n[..len].copy_from_slice(&file.as_bytes()[..len]);
    n
}

fn command(kind: u32, body: &[u8]) -> Vec<u8> {
    let mut c = kind.to_le_bytes().to_vec();
    c.extend_from_slice(body);
    c.resize(CMD_LEN, 0);
    c
}

fn allocate(file: &str, align: u32, zone: u8) -> Vec<u8> {
    let mut b = name(file).to_vec();
    b.extend_from_slice(&align.to_le_bytes());
    b.push(zone);
    command(CMD_ALLOCATE, &b)
}

fn add_pointer(dest: &str, src: &str, offset: usize, size: u8) -> Vec<u8> {
    let mut b = name(dest).to_vec();
    b.extend_from_slice(&name(src));
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.push(size);
    command(CMD_ADD_POINTER, &b)
}

fn add_checksum(file: &str, result: usize, start: usize, len: usize) -> Vec<u8> {
    let mut b = name(file).to_vec();
    for v in [result, start, len] {
        b.extend_from_slice(&(v as u32).to_le_bytes());
    }
    command(CMD_ADD_CHECKSUM, &b)
}

/// The three loader files for `blob` (laid out from address 0, so every
/// pointer holds its target's offset in `etc/acpi/tables`): the loader
/// script, the tables and the RSDP, checksum bytes zeroed for the loader
/// to fill in.
pub fn table_loader(mut blob: AcpiBlob) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let mut script = allocate(ACPI_RSDP, 16, ZONE_FSEG);
    script.extend(allocate(ACPI_TABLES, 64, ZONE_HIGH));
    for &p in &blob.pointers {
        script.extend(add_pointer(ACPI_TABLES, ACPI_TABLES, p, 8));
    }
    script.extend(add_pointer(ACPI_RSDP, ACPI_TABLES, RSDP_XSDT, 8));
    for &(start, len) in &blob.table_ranges {
        blob.tables[start + TABLE_CHECKSUM] = 0;
        script.extend(add_checksum(ACPI_TABLES, start + TABLE_CHECKSUM, start, len));
    }
    blob.rsdp[RSDP_CHECKSUM] = 0;
    blob.rsdp[RSDP_EXT_CHECKSUM] = 0;
    script.extend(add_checksum(ACPI_RSDP, RSDP_CHECKSUM, 0, 20));
    script.extend(add_checksum(ACPI_RSDP, RSDP_EXT_CHECKSUM, 0, blob.rsdp.len()));
    (script, blob.tables, blob.rsdp)
}

/// `etc/e820`: the guest's RAM as (address, length, type) entries of 20
/// bytes. The firmware carves its own reservations out of it.
pub fn e820(mem_size: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for (start, size) in ram_ranges(mem_size) {
        out.extend_from_slice(&start.0.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&(E820Kind::Ram as u32).to_le_bytes());
    }
    out
}

/// Adds the memory map, the end of the memory hot-plug region (so the
/// firmware puts its 64-bit PCI window above it), the ACPI tables, the
/// SMBIOS tables and the boot order (OpenFirmware device paths, one per
/// line; empty lets the firmware choose) to `fw_cfg`.
pub fn add_files(
    fw_cfg: &mut FwCfg,
    mem_size: u64,
    hotplug_end: Option<u64>,
    (cpus, max_cpus): (u8, u8),
    acpi: &AcpiExtras,
    smbios_info: &SmbiosInfo,
    bootorder: &[String],
) -> Result<(), FwCfgError> {
    fw_cfg.add_file("etc/e820", e820(mem_size))?;
    if let Some(end) = hotplug_end {
        fw_cfg.add_file("etc/reserved-memory-end", end.to_le_bytes().to_vec())?;
    }
    let (script, tables, rsdp) = table_loader(build_acpi_blob(cpus, max_cpus, acpi, 0));
    fw_cfg.add_file(ACPI_TABLES, tables)?;
    fw_cfg.add_file(ACPI_RSDP, rsdp)?;
    fw_cfg.add_file(TABLE_LOADER, script)?;
    let smbios_tables = smbios::tables(smbios_info);
    fw_cfg.add_file(smbios::ANCHOR_FILE, smbios::anchor(smbios_tables.len()))?;
    fw_cfg.add_file(smbios::TABLES_FILE, smbios_tables)?;
    if !bootorder.is_empty() {
        let mut order = bootorder.join("\n").into_bytes();
        order.push(0);
        fw_cfg.add_file("bootorder", order)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// Runs the loader script as OVMF's AcpiPlatformDxe would, with the
    /// tables at `tables_at`; returns the patched blobs.
    fn run_loader(script: &[u8], mut tables: Vec<u8>, mut rsdp: Vec<u8>, tables_at: u64) -> (Vec<u8>, Vec<u8>) {
        let file = |b: &[u8]| String::from_utf8(b.iter().take_while(|c| **c != 0).copied().collect()).unwrap();
        for c in script.chunks(CMD_LEN) {
            let kind = u32::from_le_bytes(c[0..4].try_into().unwrap());
            match kind {
                CMD_ALLOCATE => {}
                CMD_ADD_POINTER => {
                    let dest = file(&c[4..60]);
                    assert_eq!(file(&c[60..116]), ACPI_TABLES);
                    let off = u32::from_le_bytes(c[116..120].try_into().unwrap()) as usize;
                    assert_eq!(c[120], 8);
                    let blob = if dest == ACPI_TABLES { &mut tables } else { &mut rsdp };
                    let v = u64::from_le_bytes(blob[off..off + 8].try_into().unwrap());
                    blob[off..off + 8].copy_from_slice(&(v + tables_at).to_le_bytes());
                }
                CMD_ADD_CHECKSUM => {
                    let blob = if file(&c[4..60]) == ACPI_TABLES { &mut tables } else { &mut rsdp };
                    let r = |i: usize| u32::from_le_bytes(c[i..i + 4].try_into().unwrap()) as usize;
                    let (res, start, len) = (r(60), r(64), r(68));
                    blob[res] = 0u8.wrapping_sub(sum(&blob[start..start + len]));
                }
                k => panic!("unknown command {k}"),
            }
        }
        (tables, rsdp)
    }

    #[test]
    fn loader_patches_into_valid_linked_tables() {
        let blob = build_acpi_blob(2, 4, &AcpiExtras::default(), 0);
        let ranges = blob.table_ranges.clone();
        let (script, tables, rsdp) = table_loader(blob);
        assert_eq!(script.len() % CMD_LEN, 0);
        let at = 0x7f00_0000;
        let (tables, rsdp) = run_loader(&script, tables, rsdp, at);
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        for (start, len) in ranges {
            assert_eq!(sum(&tables[start..start + len]), 0);
        }
        let xsdt = u64::from_le_bytes(rsdp[24..32].try_into().unwrap()) - at;
        assert_eq!(&tables[xsdt as usize..xsdt as usize + 4], b"XSDT");
        let fadt = u64::from_le_bytes(tables[xsdt as usize + 36..xsdt as usize + 44].try_into().unwrap()) - at;
        assert_eq!(&tables[fadt as usize..fadt as usize + 4], b"FACP");
        let dsdt = u64::from_le_bytes(tables[fadt as usize + 140..fadt as usize + 148].try_into().unwrap()) - at;
        assert_eq!(&tables[dsdt as usize..dsdt as usize + 4], b"DSDT");
    }

    #[test]
    fn files_are_in_the_directory() {
        use vm_device::BusDevice;
        let mem = vm_memory::GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 0x10000)]).unwrap();
        let mut fw = FwCfg::new(mem, 1, 1, 256 << 20);
        let order = ["/pci@i0cf8/scsi@2/disk@0,0".to_string()];
        let info = SmbiosInfo { uuid: uuid::Uuid::nil(), cpus: 1, max_cpus: 1, ram: vec![(0, 256 << 20)], hotplug: 0 };
        add_files(&mut fw, 256 << 20, Some(6 << 30), (1, 1), &AcpiExtras::default(), &info, &order).unwrap();
        fw.write(0x510, 0, &crate::devices::fw_cfg::item::FILE_DIR.to_le_bytes());
        let mut dir = vec![0u8; 4 + 8 * 64];
        fw.read(0x510, 1, &mut dir);
        assert_eq!(u32::from_be_bytes(dir[..4].try_into().unwrap()), 8);
        let names: Vec<String> =
            dir[4..].chunks(64).map(|e| String::from_utf8_lossy(&e[8..]).trim_end_matches('\0').to_string()).collect();
        for want in [
            "bootorder",
            "etc/acpi/rsdp",
            "etc/acpi/tables",
            "etc/e820",
            "etc/reserved-memory-end",
            smbios::ANCHOR_FILE,
            smbios::TABLES_FILE,
            TABLE_LOADER,
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
        }
    }

    #[test]
    fn e820_lists_ram_below_and_above_the_hole() {
        let m = e820(4 << 30);
        assert_eq!(m.len(), 40);
        assert_eq!(u64::from_le_bytes(m[20..28].try_into().unwrap()), 1 << 32);
        assert_eq!(u32::from_le_bytes(m[36..40].try_into().unwrap()), 1);
    }
}
