//! Loading a Linux kernel, initramfs and command line into guest memory and
//! writing the boot structures of its protocol.
//!
//! * An ELF `vmlinux` with a PVH note boots through PVH (32-bit entry,
//!   `hvm_start_info`); one without boots through the 64-bit Linux boot
//!   protocol at its ELF entry.
//! * A `bzImage` boots through the 64-bit Linux boot protocol: its
//!   protected-mode part is loaded at 1 MiB and entered at `+0x200`.
//!
//! [`probe_kernel`] reads only headers, so the command line is checked
//! before any VM exists.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::layout::*;
use super::regs::BootEntry;

/// Errors from probing and loading the kernel and initramfs.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a Linux kernel (neither an ELF vmlinux nor a bzImage)")]
    NotAKernel { path: String },
    #[error("{path} is truncated: the {format} header promises {expected} bytes but the file has {actual}")]
    Truncated { path: String, format: &'static str, expected: u64, actual: u64 },
    #[error("{path} is a bzImage older than boot protocol 2.06 ({version:#x}); it cannot be booted directly")]
    OldBzImage { path: String, version: u16 },
    #[error("{path} is empty")]
    EmptyInitramfs { path: String },
    #[error("cannot load the kernel into guest memory")]
    Load(#[source] linux_loader::loader::Error),
    #[error("the kernel command line is invalid")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("the kernel command line is {len} bytes; at most {max} fit")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("the initramfs ({size} bytes) does not fit in guest memory above the kernel; give the VM more memory")]
    InitramfsTooBig { size: u64 },
    #[error("cannot write the initramfs into guest memory")]
    InitramfsWrite(#[source] vm_memory::GuestMemoryError),
    #[error("cannot write the boot parameters into guest memory")]
    BootParams(#[source] linux_loader::configurator::Error),
}

/// The kind of kernel image a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// Checks that `path` holds a kernel this VMM can boot and is not truncated.
pub fn probe_kernel(path: &Path) -> Result<KernelFormat, BootError> {
    let p = path.display().to_string();
    let mut f = File::open(path).map_err(|source| BootError::Open { path: p.clone(), source })?;
    let len = f.metadata().map_err(|source| BootError::Read { path: p.clone(), source })?.len();
    let mut head = [0u8; 0x270];
    let n = read_up_to(&mut f, &mut head).map_err(|source| BootError::Read { path: p.clone(), source })?;
    let head = &head[..n];
    if head.len() >= 64 && head.starts_with(b"\x7fELF") {
        // ELF64: program headers must lie inside the file.
        if head[4] != 2 {
            return Err(BootError::NotAKernel { path: p });
        }
        let u64_at = |o: usize| u64::from_le_bytes(head[o..o + 8].try_into().unwrap_or_default());
        let u16_at = |o: usize| u16::from_le_bytes(head[o..o + 2].try_into().unwrap_or_default());
        let ph_end = u64_at(0x20) + u64::from(u16_at(0x36)) * u64::from(u16_at(0x38));
        let mut end = ph_end;
        // The last PT_LOAD segment's file extent gives the minimum size.
        let mut ph = vec![0u8; ph_end.saturating_sub(u64_at(0x20)) as usize];
        if ph_end <= len && !ph.is_empty() {
            f.seek(SeekFrom::Start(u64_at(0x20))).map_err(|source| BootError::Read { path: p.clone(), source })?;
            f.read_exact(&mut ph).map_err(|source| BootError::Read { path: p.clone(), source })?;
            for e in ph.chunks_exact(u16_at(0x36).max(1) as usize) {
                if e.len() >= 0x28 && u32::from_le_bytes(e[0..4].try_into().unwrap_or_default()) == 1 {
                    let off = u64::from_le_bytes(e[8..16].try_into().unwrap_or_default());
                    let filesz = u64::from_le_bytes(e[0x20..0x28].try_into().unwrap_or_default());
                    end = end.max(off.saturating_add(filesz));
                }
            }
        }
        if end > len {
            return Err(BootError::Truncated { path: p, format: "ELF", expected: end, actual: len });
        }
        return Ok(KernelFormat::Elf);
    }
    if head.len() >= 0x268 && &head[0x202..0x206] == b"HdrS" {
        let version = u16::from_le_bytes([head[0x206], head[0x207]]);
        if version < 0x0206 {
            return Err(BootError::OldBzImage { path: p, version });
        }
        let setup_sects = match head[0x1f1] {
            0 => 4,
            n => u64::from(n),
        };
        let payload_off = u64::from(u32::from_le_bytes(head[0x248..0x24c].try_into().unwrap_or_default()));
        let payload_len = u64::from(u32::from_le_bytes(head[0x24c..0x250].try_into().unwrap_or_default()));
        let expected = (setup_sects + 1) * 512 + payload_off + payload_len;
        if expected > len {
            return Err(BootError::Truncated { path: p, format: "bzImage", expected, actual: len });
        }
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::NotAKernel { path: p })
}

/// Checks that an initramfs exists and is not empty; returns its size.
pub fn probe_initramfs(path: &Path) -> Result<u64, BootError> {
    let p = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| BootError::Open { path: p.clone(), source })?;
    if meta.len() == 0 {
        return Err(BootError::EmptyInitramfs { path: p });
    }
    Ok(meta.len())
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// What the VMM needs to boot the loaded kernel.
pub struct LoadedKernel {
    pub entry: BootEntry,
    setup_header: Option<setup_header>,
    kernel_end: u64,
}

/// Loads the kernel at `path` into `mem`.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let p = path.display().to_string();
    let mut f = File::open(path).map_err(|source| BootError::Open { path: p.clone(), source })?;
    match probe_kernel(path)? {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(BootError::Load)?;
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => BootEntry::Pvh(addr),
                _ => BootEntry::Linux64(r.kernel_load),
            };
            Ok(LoadedKernel { entry, setup_header: None, kernel_end: r.kernel_end })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(BootError::Load)?;
            Ok(LoadedKernel {
                entry: BootEntry::Linux64(r.kernel_load.unchecked_add(0x200)),
                setup_header: r.setup_header,
                kernel_end: r.kernel_end,
            })
        }
    }
}

/// Where an initramfs lies in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct InitramfsRegion {
    pub addr: GuestAddress,
    pub size: u64,
}

/// Loads the initramfs at the top of low RAM (below the 32-bit hole and the
/// kernel's `initrd_addr_max`), page aligned, above the kernel.
pub fn load_initramfs(mem: &GuestMemoryMmap, kernel: &LoadedKernel, path: &Path) -> Result<InitramfsRegion, BootError> {
    let p = path.display().to_string();
    let mut f = File::open(path).map_err(|source| BootError::Open { path: p.clone(), source })?;
    let size = f.metadata().map_err(|source| BootError::Read { path: p.clone(), source })?.len();
    let low_end = mem.iter().next().map(|r| r.start_addr().raw_value() + r.len()).unwrap_or(0);
    let addr_max =
        kernel.setup_header.map(|h| u64::from(h.initrd_addr_max) + 1).unwrap_or(MMIO_HOLE_START).min(low_end);
    let start = addr_max.checked_sub(size).map(|s| s & !0xfff).filter(|s| *s >= kernel.kernel_end.max(HIMEM_START));
    let start = start.ok_or(BootError::InitramfsTooBig { size })?;
    mem.read_exact_volatile_from(GuestAddress(start), &mut f, size as usize).map_err(BootError::InitramfsWrite)?;
    Ok(InitramfsRegion { addr: GuestAddress(start), size })
}

/// Writes the command line at [`CMDLINE_START`].
pub fn load_command_line(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize, BootError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong { len: cmdline.len(), max: CMDLINE_MAX_SIZE - 1 });
    }
    let c = Cmdline::try_from(cmdline, CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &c).map_err(BootError::Load)?;
    Ok(cmdline.len() + 1)
}

/// Writes the protocol's boot structures: `hvm_start_info` with its memory
/// map and module list for PVH, or the zero page for the Linux protocol.
/// The e820 map describes `ram_size` bytes of boot RAM; the memory
/// hot-plug region, also in `mem`, stays out of it (virtio-mem tells the
/// guest about it).
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    kernel: &LoadedKernel,
    cmdline_size: usize,
    initramfs: Option<InitramfsRegion>,
    rsdp: GuestAddress,
) -> Result<(), BootError> {
    let e820 = e820_map(ram_size);
    match kernel.entry {
        BootEntry::Pvh(_) => {
            let mut info = hvm_start_info {
                magic: linux_loader::loader::elf::start_info::XEN_HVM_START_MAGIC_VALUE,
                version: 1,
                cmdline_paddr: CMDLINE_START,
                rsdp_paddr: rsdp.raw_value(),
                memmap_paddr: PVH_MEMMAP_START,
                memmap_entries: e820.len() as u32,
                ..Default::default()
            };
            let memmap: Vec<hvm_memmap_table_entry> = e820
                .iter()
                .map(|e| hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.kind as u32, reserved: 0 })
                .collect();
            let mut modules = Vec::new();
            if let Some(i) = initramfs {
                info.nr_modules = 1;
                info.modlist_paddr = PVH_MODLIST_START;
                modules.push(hvm_modlist_entry { paddr: i.addr.raw_value(), size: i.size, ..Default::default() });
            }
            let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
            params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
            if !modules.is_empty() {
                params.set_modules(&modules, GuestAddress(PVH_MODLIST_START));
            }
            PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem).map_err(BootError::BootParams)
        }
        BootEntry::Linux64(_) => {
            let mut bp = boot_params::default();
            if let Some(hdr) = kernel.setup_header {
                bp.hdr = hdr;
            } else {
                bp.hdr.header = 0x5372_6448; // "HdrS"
                bp.hdr.kernel_alignment = 0x0100_0000;
            }
            bp.hdr.type_of_loader = 0xff;
            bp.hdr.boot_flag = 0xaa55;
            bp.hdr.cmd_line_ptr = CMDLINE_START as u32;
            bp.hdr.cmdline_size = cmdline_size as u32;
            if let Some(i) = initramfs {
                bp.hdr.ramdisk_image = i.addr.raw_value() as u32;
                bp.hdr.ramdisk_size = i.size as u32;
            }
            bp.acpi_rsdp_addr = rsdp.raw_value();
            for (slot, e) in bp.e820_table.iter_mut().zip(e820.iter()) {
                *slot = boot_e820_entry { addr: e.addr, size: e.size, r#type: e.kind as u32 };
            }
            bp.e820_entries = e820.len().min(bp.e820_table.len()) as u8;
            let params = BootParams::new(&bp, GuestAddress(ZERO_PAGE_START));
            LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem).map_err(BootError::BootParams)
        }
    }
}

/// Reads the byte at `addr`; used by tests.
#[cfg(test)]
fn read_u32(mem: &GuestMemoryMmap, addr: u64) -> u32 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn rejects_non_kernels_and_truncated_images() {
        let f = file_with(b"#!/bin/sh\necho hi\n");
        assert!(matches!(probe_kernel(f.path()), Err(BootError::NotAKernel { .. })));
        let empty = file_with(b"");
        assert!(matches!(probe_kernel(empty.path()), Err(BootError::NotAKernel { .. })));
        // A bzImage header that promises more than the file holds.
        let mut img = vec![0u8; 0x1000];
        img[0x1f1] = 4;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&0x100u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&0x10_0000u32.to_le_bytes());
        let f = file_with(&img);
        assert!(matches!(probe_kernel(f.path()), Err(BootError::Truncated { format: "bzImage", .. })));
        assert!(matches!(probe_kernel(Path::new("/nonexistent/vmlinux")), Err(BootError::Open { .. })));
    }

    #[test]
    fn cmdline_limits() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        assert_eq!(load_command_line(&mem, "console=ttyS0").unwrap(), 14);
        let long = "a".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(load_command_line(&mem, &long), Err(BootError::CmdlineTooLong { .. })));
    }

    #[test]
    fn pvh_start_info_carries_memmap_and_initramfs() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let k = LoadedKernel {
            entry: BootEntry::Pvh(GuestAddress(0x100_0000)),
            setup_header: None,
            kernel_end: 0x200_0000,
        };
        let initrd = file_with(&[0xab; 5000]);
        let region = load_initramfs(&mem, &k, initrd.path()).unwrap();
        assert_eq!(region.addr.raw_value() % 4096, 0);
        assert!(region.addr.raw_value() + 5000 <= 64 << 20);
        write_boot_params(&mem, mem.iter().map(|r| r.len()).sum(), &k, 10, Some(region), GuestAddress(ACPI_START))
            .unwrap();
        assert_eq!(read_u32(&mem, PVH_INFO_START), 0x336e_c578);
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.rsdp_paddr, ACPI_START);
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!((m.paddr, m.size), (region.addr.raw_value(), 5000));
    }

    #[test]
    fn initramfs_that_does_not_fit_is_refused() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let k =
            LoadedKernel { entry: BootEntry::Pvh(GuestAddress(0x10_0000)), setup_header: None, kernel_end: 0x30_0000 };
        let initrd = file_with(&vec![0; 2 << 20]);
        assert!(matches!(load_initramfs(&mem, &k, initrd.path()), Err(BootError::InitramfsTooBig { .. })));
    }
}
