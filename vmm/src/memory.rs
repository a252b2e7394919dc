//! Guest memory: one memfd holding all of the guest's RAM, mapped as
//! vm-memory regions around the 32-bit MMIO hole.
//!
//! Backing RAM with a memfd (rather than anonymous memory) lets processes
//! outside the VMM map the same pages: vhost-user backends such as
//! virtiofsd receive the fd and each region's offset in it.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestMemoryMmap};

use crate::arch::layout::ram_ranges;

/// Errors while creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot create the guest memory file (memfd_create)")]
    Memfd(#[source] std::io::Error),
    #[error("cannot size the guest memory file to {size} bytes")]
    Truncate {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    #[error("guest memory size {0} does not fit the host's address space")]
    TooLarge(u64),
}

/// Guest RAM and the memfd behind it.
pub struct GuestRam {
    pub mem: GuestMemoryMmap,
    pub memfd: File,
}

/// Creates `size` bytes of guest RAM.
pub fn create_guest_memory(size: u64) -> Result<GuestRam, MemoryError> {
    let name: &CStr = c"skiff-guest-ram";
    // SAFETY: `name` is a valid NUL-terminated string and the flags are valid.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let memfd = unsafe { File::from_raw_fd(fd) };
    memfd.set_len(size).map_err(|source| MemoryError::Truncate { size, source })?;
    let mut offset = 0u64;
    let mut ranges = Vec::new();
    for (addr, len) in ram_ranges(size) {
        let len_usize = usize::try_from(len).map_err(|_| MemoryError::TooLarge(size))?;
        let file = memfd.try_clone().map_err(MemoryError::Memfd)?;
        ranges.push((addr, len_usize, Some(FileOffset::new(file, offset))));
        offset += len;
    }
    let mem = GuestMemoryMmap::from_ranges_with_files(ranges).map_err(MemoryError::Map)?;
    advise_huge_pages(&mem);
    Ok(GuestRam { mem, memfd })
}

/// Asks for transparent huge pages on guest RAM: fewer host page faults
/// and 2 MiB EPT/NPT mappings, so far fewer VM exits while the guest first
/// touches its memory. Shared memory gets them when the host's
/// `transparent_hugepage/shmem_enabled` is `advise`, `within_size` or
/// `always`; otherwise the advice is a no-op.
fn advise_huge_pages(mem: &GuestMemoryMmap) {
    const KNOB: &str = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";
    if let Ok(setting) = std::fs::read_to_string(KNOB) {
        if setting.contains("[never]") || setting.contains("[deny]") {
            log::warn!(
                "{KNOB} is off: guest RAM (shared, for vhost-user backends) gets no huge pages and the guest boots \
                 slower; `echo advise > {KNOB}` (scripts/setup does) fixes it"
            );
        }
    }
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
    for region in mem.iter() {
        let Ok(host) = region.get_host_address(MemoryRegionAddress(0)) else { continue };
        // SAFETY: the range is exactly one live mapping owned by `mem`;
        // MADV_HUGEPAGE only changes how the kernel backs it.
        let rc = unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            log::debug!("madvise(MADV_HUGEPAGE) on guest RAM: {}", std::io::Error::last_os_error());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn regions_share_one_memfd() {
        let ram = create_guest_memory(64 << 20).unwrap();
        assert_eq!(ram.mem.num_regions(), 1);
        let r = ram.mem.iter().next().unwrap();
        assert_eq!(r.file_offset().unwrap().start(), 0);
        ram.mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        assert_eq!(ram.memfd.metadata().unwrap().len(), 64 << 20);
    }
}
