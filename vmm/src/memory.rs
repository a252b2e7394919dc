//! Guest memory: one memfd holding all of the guest's RAM, mapped as
//! vm-memory regions around the 32-bit MMIO hole, and after it the memory
//! hot-plug region (virtio-mem), mapped `MAP_NORESERVE` and backed only
//! where the guest plugged and touched it: the file is sparse, and what the
//! guest unplugs is punched out of it again ([`MemfdBackend`]).
//!
//! Backing RAM with a memfd (rather than anonymous memory) lets processes
//! outside the VMM map the same pages: vhost-user backends such as
//! virtiofsd receive the fd and each region's offset in it.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use virtio_devices::mem::MemoryBackend;
use vm_memory::mmap::{GuestRegionMmap, MmapRegion};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::arch::layout::{hotplug_region, ram_ranges};

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
    #[error("cannot map the memory hot-plug region")]
    MapHotplug(#[source] vm_memory::mmap::MmapRegionError),
    #[error("cannot register the memory hot-plug region")]
    AddHotplug(#[source] vm_memory::GuestRegionCollectionError),
}

/// The memory hot-plug region: where it is in the guest and in the memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotplugRegion {
    pub addr: u64,
    pub size: u64,
    /// Offset of the region in the memfd (right after boot RAM).
    pub file_offset: u64,
}

/// Guest RAM and the memfd behind it.
pub struct GuestRam {
    /// Boot RAM and the hot-plug region (devices and vhost-user backends
    /// see both).
    pub mem: GuestMemoryMmap,
    pub memfd: File,
    /// Bytes of boot RAM (what the e820 map describes).
    pub boot_size: u64,
    pub hotplug: Option<HotplugRegion>,
    /// `memfd` is a snapshot's memory file mapped privately: the guest's
    /// memory is the mapping, not the file.
    pub private: bool,
}

impl GuestRam {
    /// Gives the hot-plug region's unplugged blocks back to the host.
    pub fn hotplug_backend(&self) -> Result<Option<MemfdBackend>, MemoryError> {
        let Some(region) = self.hotplug else { return Ok(None) };
        let memfd = self.memfd.try_clone().map_err(MemoryError::Memfd)?;
        Ok(Some(MemfdBackend { memfd, region }))
    }
}

/// Frees unplugged memory by punching holes into the memfd: the pages go
/// back to the host at once, for every process that maps them.
pub struct MemfdBackend {
    memfd: File,
    region: HotplugRegion,
}

impl MemoryBackend for MemfdBackend {
    fn discard(&self, offset_in_region: u64, len: u64) -> std::io::Result<()> {
        let inside = offset_in_region.checked_add(len).is_some_and(|end| end <= self.region.size);
        let (Some(offset), true) = (self.region.file_offset.checked_add(offset_in_region), inside) else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        };
        let (offset, len) = (i64::try_from(offset), i64::try_from(len));
        let (Ok(offset), Ok(len)) = (offset, len) else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate on an fd this struct owns; punching a hole
        // frees file pages (they read as zeros after) and touches no
        // memory of this process directly.
        let rc = unsafe {
            libc::fallocate(self.memfd.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Creates `size` bytes of guest RAM and a hot-plug region of
/// `hotplug_size` bytes (none if 0).
pub fn create_guest_memory(size: u64, hotplug_size: u64) -> Result<GuestRam, MemoryError> {
    let name: &CStr = c"skiff-guest-ram";
    // SAFETY: `name` is a valid NUL-terminated string and the flags are valid.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let memfd = unsafe { File::from_raw_fd(fd) };
    let total = size.checked_add(hotplug_size).ok_or(MemoryError::TooLarge(size))?;
    memfd.set_len(total).map_err(|source| MemoryError::Truncate { size: total, source })?;
    let mut offset = 0u64;
    let mut ranges = Vec::new();
    for (addr, len) in ram_ranges(size) {
        let len_usize = usize::try_from(len).map_err(|_| MemoryError::TooLarge(size))?;
        let file = memfd.try_clone().map_err(MemoryError::Memfd)?;
        ranges.push((addr, len_usize, Some(FileOffset::new(file, offset))));
        offset += len;
    }
    let mut mem = GuestMemoryMmap::from_ranges_with_files(ranges).map_err(MemoryError::Map)?;
    let hotplug =
        hotplug_region(size, hotplug_size).map(|(addr, len)| HotplugRegion { addr, size: len, file_offset: offset });
    if let Some(h) = hotplug {
        let len = usize::try_from(h.size).map_err(|_| MemoryError::TooLarge(h.size))?;
        let file = FileOffset::new(memfd.try_clone().map_err(MemoryError::Memfd)?, h.file_offset);
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let map = MmapRegion::build(Some(file), len, prot, libc::MAP_SHARED | libc::MAP_NORESERVE)
            .map_err(MemoryError::MapHotplug)?;
        let region = GuestRegionMmap::new(map, GuestAddress(h.addr)).ok_or(MemoryError::TooLarge(h.size))?;
        mem = mem.insert_region(std::sync::Arc::new(region)).map_err(MemoryError::AddHotplug)?;
    }
    advise_huge_pages(&mem);
    Ok(GuestRam { mem, memfd, boot_size: size, hotplug, private: false })
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
    fn hotplug_region_is_sparse_and_holes_are_punched() {
        let ram = create_guest_memory(64 << 20, 256 << 20).unwrap();
        let h = ram.hotplug.unwrap();
        assert_eq!((h.addr, h.size, h.file_offset), (1 << 32, 256 << 20, 64 << 20));
        assert_eq!(ram.mem.num_regions(), 2);
        assert_eq!(ram.memfd.metadata().unwrap().len(), 320 << 20);
        let blocks = |ram: &GuestRam| {
            use std::os::unix::fs::MetadataExt;
            ram.memfd.metadata().unwrap().blocks() * 512
        };
        let before = blocks(&ram);
        let addr = GuestAddress(h.addr + (4 << 20));
        ram.mem.write_slice(&[0xab; 2 << 20], addr).unwrap();
        assert!(blocks(&ram) >= before + (2 << 20), "written pages are allocated");
        let backend = ram.hotplug_backend().unwrap().unwrap();
        backend.discard(4 << 20, 2 << 20).unwrap();
        assert!(blocks(&ram) <= before, "the hole gives them back");
        assert_eq!(ram.mem.read_obj::<u64>(addr).unwrap(), 0);
        assert!(backend.discard(h.size, 4096).is_err(), "past the region");
        assert!(backend.discard(u64::MAX, 2).is_err());
        assert!(create_guest_memory(64 << 20, 0).unwrap().hotplug_backend().unwrap().is_none());
    }

    #[test]
    fn regions_share_one_memfd() {
        let ram = create_guest_memory(64 << 20, 0).unwrap();
        assert_eq!(ram.mem.num_regions(), 1);
        let r = ram.mem.iter().next().unwrap();
        assert_eq!(r.file_offset().unwrap().start(), 0);
        ram.mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        assert_eq!(ram.memfd.metadata().unwrap().len(), 64 << 20);
    }
}
