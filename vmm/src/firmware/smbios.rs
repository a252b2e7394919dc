//! SMBIOS tables for firmware-booted VMs, handed to the firmware the way
//! QEMU does: `etc/smbios/smbios-tables` (the structures, ending with the
//! end-of-table structure) and `etc/smbios/smbios-anchor` (an SMBIOS 3.0
//! entry point whose only use is to give the version and the tables'
//! size). OVMF checks the anchor against the tables, installs every
//! structure through its SMBIOS protocol (keeping the handles) and adds
//! its own BIOS information (type 0) when there is none, then publishes
//! the entry points itself. So the guest's `dmidecode`, Linux's
//! /sys/class/dmi/id, cloud-init's platform checks and Windows read:
//! type 1 (system: manufacturer "Skiff", the VM's UUID), 2 (baseboard),
//! 3 (chassis), 4 (one processor socket with the VM's vCPUs as cores),
//! 16/17/19 (the memory array, its devices and where it is mapped),
//! 32 (boot status) and 127 (end).

use uuid::Uuid;

/// The fw_cfg files.
pub const ANCHOR_FILE: &str = "etc/smbios/smbios-anchor";
pub const TABLES_FILE: &str = "etc/smbios/smbios-tables";

/// Structure types.
const SYSTEM: u8 = 1;
const BASEBOARD: u8 = 2;
const CHASSIS: u8 = 3;
const PROCESSOR: u8 = 4;
const MEMORY_ARRAY: u8 = 16;
const MEMORY_DEVICE: u8 = 17;
const MEMORY_MAPPED: u8 = 19;
const BOOT_INFO: u8 = 32;
const END: u8 = 127;

/// Memory is described as devices of at most this size (as QEMU does).
const DIMM_MAX: u64 = 16 << 30;
/// "Not provided" / "unknown" handle and size values.
const NO_HANDLE: u16 = 0xfffe;
const NO_CACHE: u16 = 0xffff;
/// Sizes in MiB at or above this go into a device's extended size.
const SIZE_EXTENDED: u64 = 0x7fff;
/// Addresses in KiB at or above this go into the 64-bit extended fields.
const ADDRESS_EXTENDED: u64 = 0xffff_ffff;

/// What the tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmbiosInfo {
    /// The system UUID (type 1).
    pub uuid: Uuid,
    /// vCPUs at boot and at most (CPU hot-plug).
    pub cpus: u8,
    pub max_cpus: u8,
    /// Boot RAM as (guest address, size) ranges.
    pub ram: Vec<(u64, u64)>,
    /// Bytes of the memory hot-plug region (counted in the array's
    /// capacity, not as devices).
    pub hotplug: u64,
}

/// One structure: its formatted area and its strings.
struct Structure {
    area: Vec<u8>,
    strings: Vec<String>,
}

impl Structure {
    fn new(kind: u8, handle: u16, len: u8) -> Self {
        let mut area = vec![0u8; usize::from(len)];
        area[0] = kind;
        area[1] = len;
        area[2..4].copy_from_slice(&handle.to_le_bytes());
        Structure { area, strings: Vec::new() }
    }

    fn put(&mut self, off: usize, bytes: &[u8]) -> &mut Self {
        self.area[off..off + bytes.len()].copy_from_slice(bytes);
        self
    }

    fn u8(&mut self, off: usize, v: u8) -> &mut Self {
        self.put(off, &[v])
    }

    fn u16(&mut self, off: usize, v: u16) -> &mut Self {
        self.put(off, &v.to_le_bytes())
    }

    fn u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.put(off, &v.to_le_bytes())
    }

    fn u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.put(off, &v.to_le_bytes())
    }

    /// A string field: its number in the string set (0, "none", for an
    /// empty string). NULs would end the string early: they are dropped.
    fn string(&mut self, off: usize, s: &str) -> &mut Self {
        let s: String = s.chars().filter(|&c| c != '\0').collect();
        if s.is_empty() {
            return self.u8(off, 0);
        }
        self.strings.push(s);
        let n = self.strings.len() as u8;
        self.u8(off, n)
    }

    /// The formatted area, then each string with its NUL, then the NUL
    /// that ends the set (two NULs when there are no strings).
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.area);
        for s in &self.strings {
            out.extend_from_slice(s.as_bytes());
            out.push(0);
        }
        if self.strings.is_empty() {
            out.push(0);
        }
        out.push(0);
    }
}

/// A UUID as SMBIOS 2.6 and later store it: the first three fields
/// little-endian, the rest as is.
fn smbios_uuid(uuid: &Uuid) -> [u8; 16] {
    let mut b = *uuid.as_bytes();
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    b
}

/// The host CPU's signature (CPUID 1 EAX, EDX: the guest's CPUID passes
/// them through) and its brand string.
fn cpu_identity() -> (u64, String) {
    use std::arch::x86_64::__cpuid;
    let leaf1 = __cpuid(1);
    let id = u64::from(leaf1.eax) | u64::from(leaf1.edx) << 32;
    let mut brand = Vec::with_capacity(48);
    if __cpuid(0x8000_0000).eax >= 0x8000_0004 {
        for leaf in 0x8000_0002..=0x8000_0004u32 {
            let r = __cpuid(leaf);
            for v in [r.eax, r.ebx, r.ecx, r.edx] {
                brand.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    let brand = String::from_utf8_lossy(&brand).trim_matches(|c: char| c == '\0' || c == ' ').to_string();
    (id, brand)
}

/// The structures for `info` (the contents of `etc/smbios/smbios-tables`).
pub fn tables(info: &SmbiosInfo) -> Vec<u8> {
    let mut out = Vec::new();
    let version = env!("CARGO_PKG_VERSION");

    // Type 1, system information (SMBIOS 2.4 layout, 27 bytes).
    let mut s = Structure::new(SYSTEM, u16::from(SYSTEM) << 8, 0x1b);
    s.string(4, "Skiff").string(5, "Skiff VM").string(6, version);
    s.put(8, &smbios_uuid(&info.uuid)).u8(0x18, 0x06); // wake-up: power switch
    s.string(0x1a, "Virtual Machine");
    s.write(&mut out);

    // Type 2, baseboard (15 bytes): a motherboard in the chassis below.
    let chassis = u16::from(CHASSIS) << 8;
    let mut s = Structure::new(BASEBOARD, u16::from(BASEBOARD) << 8, 0x0f);
    s.string(4, "Skiff").string(5, "Skiff VM").string(6, version);
    s.u8(9, 0x01).u16(0x0b, chassis).u8(0x0d, 0x0a); // hosting board; motherboard
    s.write(&mut out);

    // Type 3, chassis (SMBIOS 2.7 layout with no contained elements).
    let mut s = Structure::new(CHASSIS, chassis, 0x16);
    s.string(4, "Skiff").u8(5, 0x01).string(6, version); // type: other
    s.u8(9, 0x03).u8(0x0a, 0x03).u8(0x0b, 0x03).u8(0x0c, 0x02); // safe, safe, safe; security unknown
    s.write(&mut out);

    // Type 4, processor (SMBIOS 3.0 layout, 48 bytes): one socket with
    // the VM's vCPUs as cores, the boot ones enabled.
    let (id, brand) = cpu_identity();
    let mut s = Structure::new(PROCESSOR, u16::from(PROCESSOR) << 8, 0x30);
    s.string(4, "CPU 0").u8(5, 0x03).u8(6, 0xfe).string(7, "Skiff").u64(8, id); // central; family in 0x28
    s.string(0x10, if brand.is_empty() { "Skiff vCPU" } else { &brand });
    s.u8(0x18, 0x41).u8(0x19, 0x01); // populated, enabled; upgrade: other
    s.u16(0x1a, NO_CACHE).u16(0x1c, NO_CACHE).u16(0x1e, NO_CACHE);
    let (max, boot) = (info.max_cpus.max(info.cpus), info.cpus);
    s.u8(0x23, max).u8(0x24, boot).u8(0x25, max);
    s.u16(0x26, 0x0004); // 64-bit capable
    s.u16(0x28, 0x0001).u16(0x2a, u16::from(max)).u16(0x2c, u16::from(boot)).u16(0x2e, u16::from(max));
    s.write(&mut out);

    // Type 16, the memory array (SMBIOS 2.7 layout, 23 bytes).
    let boot_bytes: u64 = info.ram.iter().map(|r| r.1).sum();
    let capacity = boot_bytes.saturating_add(info.hotplug);
    let devices = boot_bytes.div_ceil(DIMM_MAX).max(1);
    let array = u16::from(MEMORY_ARRAY) << 8;
    let mut s = Structure::new(MEMORY_ARRAY, array, 0x17);
    s.u8(4, 0x01).u8(5, 0x03).u8(6, 0x03); // location other; system memory; no ECC
    if capacity >> 10 < 0x8000_0000 {
        s.u32(7, (capacity >> 10) as u32);
    } else {
        s.u32(7, 0x8000_0000).u64(0x0f, capacity);
    }
    s.u16(0x0b, NO_HANDLE).u16(0x0d, devices as u16);
    s.write(&mut out);

    // Type 17, memory devices (SMBIOS 2.8 layout, 40 bytes) of up to
    // 16 GiB each.
    let mut left = boot_bytes;
    for i in 0..devices {
        let size = left.min(DIMM_MAX);
        left -= size;
        let mib = size >> 20;
        let mut s = Structure::new(MEMORY_DEVICE, (u16::from(MEMORY_DEVICE) << 8) + i as u16, 0x28);
        s.u16(4, array).u16(6, NO_HANDLE).u16(8, 64).u16(0x0a, 64);
        if mib < SIZE_EXTENDED {
            s.u16(0x0c, mib as u16);
        } else {
            s.u16(0x0c, SIZE_EXTENDED as u16).u32(0x1c, mib as u32);
        }
        s.u8(0x0e, 0x09).string(0x10, &format!("DIMM {i}")).u8(0x12, 0x07); // DIMM; RAM
        s.u16(0x13, 0x0002).string(0x17, "Skiff"); // type detail: other
        s.write(&mut out);
    }

    // Type 19, where the array is mapped: one per RAM range (below and
    // above the PCI hole).
    for (i, &(start, size)) in info.ram.iter().enumerate() {
        let end = start + size.max(1) - 1;
        let mut s = Structure::new(MEMORY_MAPPED, (u16::from(MEMORY_MAPPED) << 8) + i as u16, 0x1f);
        if end >> 10 < ADDRESS_EXTENDED {
            s.u32(4, (start >> 10) as u32).u32(8, (end >> 10) as u32);
        } else {
            s.u32(4, ADDRESS_EXTENDED as u32).u32(8, ADDRESS_EXTENDED as u32).u64(0x0f, start).u64(0x17, end);
        }
        s.u16(0x0c, array).u8(0x0e, devices as u8);
        s.write(&mut out);
    }

    // Type 32, system boot information: no errors.
    Structure::new(BOOT_INFO, u16::from(BOOT_INFO) << 8, 0x0b).write(&mut out);
    Structure::new(END, u16::from(END) << 8, 4).write(&mut out);
    out
}

/// An SMBIOS 3.0 entry point for tables of `len` bytes (the firmware
/// reads its version and size; it builds the guest's own entry points).
pub fn anchor(len: usize) -> Vec<u8> {
    let mut a = vec![0u8; 0x18];
    a[0..5].copy_from_slice(b"_SM3_");
    a[6] = 0x18; // length
    a[7] = 3; // SMBIOS 3.0, document revision 0
    a[10] = 1; // entry point revision
    a[12..16].copy_from_slice(&(len as u32).to_le_bytes());
    let sum = a.iter().fold(0u8, |s, b| s.wrapping_add(*b));
    a[5] = 0u8.wrapping_sub(sum);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A structure as the firmware walks them: (type, handle, formatted
    /// area, strings).
    type Parsed = (u8, u16, Vec<u8>, Vec<String>);

    /// Walks the tables as OVMF does (up to and including type 127),
    /// checking the framing.
    fn parse(mut t: &[u8]) -> Vec<Parsed> {
        let mut out = Vec::new();
        loop {
            let len = usize::from(t[1]);
            assert!(len >= 4, "structure too short");
            let (area, rest) = t.split_at(len);
            let end = rest.windows(2).position(|w| w == [0, 0]).expect("no double NUL") + 2;
            let strings = rest[..end - 2]
                .split(|&b| b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8(s.to_vec()).unwrap())
                .collect();
            let kind = area[0];
            out.push((kind, u16::from_le_bytes([area[2], area[3]]), area.to_vec(), strings));
            t = &rest[end..];
            if kind == END {
                assert!(t.is_empty(), "bytes after the end structure");
                return out;
            }
        }
    }

    fn string(s: &Parsed, off: usize) -> &str {
        match s.2[off] {
            0 => "",
            n => &s.3[usize::from(n) - 1],
        }
    }

    fn info(ram: Vec<(u64, u64)>) -> SmbiosInfo {
        SmbiosInfo {
            uuid: Uuid::parse_str("6f1d3a2c-1b2a-4c3d-8e4f-5a6b7c8d9e0f").unwrap(),
            cpus: 2,
            max_cpus: 4,
            ram,
            hotplug: 0,
        }
    }

    #[test]
    fn tables_have_the_required_structures_with_unique_handles() {
        let t = tables(&info(vec![(0, 1 << 30)]));
        let parsed = parse(&t);
        let kinds: Vec<u8> = parsed.iter().map(|s| s.0).collect();
        assert_eq!(kinds, [1, 2, 3, 4, 16, 17, 19, 32, 127]);
        let mut handles: Vec<u16> = parsed.iter().map(|s| s.1).collect();
        handles.sort_unstable();
        handles.dedup();
        assert_eq!(handles.len(), parsed.len());
        assert!(handles.iter().all(|&h| h < 0xff00), "reserved handle in {handles:x?}");
        // Lengths as the spec versions used define them.
        let lens: Vec<usize> = parsed.iter().map(|s| s.2.len()).collect();
        assert_eq!(lens, [0x1b, 0x0f, 0x16, 0x30, 0x17, 0x28, 0x1f, 0x0b, 4]);
    }

    #[test]
    fn system_names_skiff_and_the_uuid_reads_back_as_linux_prints_it() {
        let i = info(vec![(0, 1 << 30)]);
        let parsed = parse(&tables(&i));
        let sys = &parsed[0];
        assert_eq!((string(sys, 4), string(sys, 5)), ("Skiff", "Skiff VM"));
        assert_eq!(string(sys, 6), env!("CARGO_PKG_VERSION"));
        // Linux prints SMBIOS >= 2.6 UUIDs with the first three fields
        // little-endian (%pUl).
        let b = &sys.2[8..24];
        let text = format!(
            "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{}",
            b[3],
            b[2],
            b[1],
            b[0],
            b[5],
            b[4],
            b[7],
            b[6],
            b[8],
            b[9],
            b[10..].iter().map(|x| format!("{x:02x}")).collect::<String>()
        );
        assert_eq!(text, i.uuid.to_string());
        // The chassis the baseboard names is the type 3 structure.
        assert_eq!(u16::from_le_bytes([parsed[1].2[0x0b], parsed[1].2[0x0c]]), parsed[2].1);
    }

    #[test]
    fn processor_counts_boot_and_most_vcpus() {
        let parsed = parse(&tables(&info(vec![(0, 1 << 30)])));
        let cpu = &parsed[3];
        assert_eq!((cpu.2[0x23], cpu.2[0x24], cpu.2[0x25]), (4, 2, 4));
        assert_eq!(cpu.2[0x18], 0x41);
        assert!(!string(cpu, 0x10).is_empty());
    }

    #[test]
    fn memory_devices_add_up_and_mappings_follow_the_ram_ranges() {
        // 20 GiB: 3 GiB below the hole, 17 GiB above it; a hot-plug region.
        let ram = vec![(0, 3 << 30), (1 << 32, 17 << 30)];
        let mut i = info(ram.clone());
        i.hotplug = 8 << 30;
        let parsed = parse(&tables(&i));
        let array = parsed.iter().find(|s| s.0 == MEMORY_ARRAY).unwrap();
        let cap_kib = u32::from_le_bytes(array.2[7..11].try_into().unwrap());
        assert_eq!(u64::from(cap_kib), 28 << 20);
        let devs: Vec<&Parsed> = parsed.iter().filter(|s| s.0 == MEMORY_DEVICE).collect();
        assert_eq!(u16::from_le_bytes([array.2[0x0d], array.2[0x0e]]) as usize, devs.len());
        let total_mib: u64 = devs
            .iter()
            .map(|d| {
                assert_eq!(u16::from_le_bytes([d.2[4], d.2[5]]), array.1);
                u64::from(u16::from_le_bytes([d.2[0x0c], d.2[0x0d]]))
            })
            .sum();
        assert_eq!(total_mib, 20 << 10);
        assert_eq!(devs.len(), 2);
        let maps: Vec<(u64, u64)> = parsed
            .iter()
            .filter(|s| s.0 == MEMORY_MAPPED)
            .map(|m| {
                let kib = |o: usize| u64::from(u32::from_le_bytes(m.2[o..o + 4].try_into().unwrap()));
                (kib(4) << 10, ((kib(8) + 1) << 10) - (kib(4) << 10))
            })
            .collect();
        assert_eq!(maps, ram);
    }

    #[test]
    fn big_memory_uses_the_extended_fields() {
        // 8 TiB above 4 GiB: KiB addresses no longer fit 32 bits.
        let parsed = parse(&tables(&info(vec![(0, 3 << 30), (1 << 32, 8 << 40)])));
        let map = parsed.iter().filter(|s| s.0 == MEMORY_MAPPED).nth(1).unwrap();
        assert_eq!(u32::from_le_bytes(map.2[4..8].try_into().unwrap()), u32::MAX);
        assert_eq!(u64::from_le_bytes(map.2[0x0f..0x17].try_into().unwrap()), 1 << 32);
        assert_eq!(u64::from_le_bytes(map.2[0x17..0x1f].try_into().unwrap()), (1 << 32) + (8 << 40) - 1);
        let array = parsed.iter().find(|s| s.0 == MEMORY_ARRAY).unwrap();
        assert_eq!(u32::from_le_bytes(array.2[7..11].try_into().unwrap()), 0x8000_0000);
        assert_eq!(u64::from_le_bytes(array.2[0x0f..0x17].try_into().unwrap()), (3 << 30) + (8 << 40));
    }

    #[test]
    fn anchor_matches_what_ovmf_checks() {
        let t = tables(&info(vec![(0, 256 << 20)]));
        let a = anchor(t.len());
        assert_eq!(a.len(), 24);
        assert_eq!(&a[..5], b"_SM3_");
        assert_eq!(a[7], 3);
        assert_eq!(u32::from_le_bytes(a[12..16].try_into().unwrap()) as usize, t.len());
        assert_eq!(a.iter().fold(0u8, |s, b| s.wrapping_add(*b)), 0);
    }

    #[test]
    fn strings_drop_nuls_and_empty_ones_are_none() {
        let mut s = Structure::new(SYSTEM, 0x100, 0x1b);
        s.string(4, "a\0b").string(5, "");
        let mut out = Vec::new();
        s.write(&mut out);
        let p = parse(&[out, Structure::new(END, 0x7f00, 4).area, vec![0, 0]].concat());
        assert_eq!((string(&p[0], 4), p[0].2[5]), ("ab", 0));
    }
}
