//! Guest memory in a snapshot: the memfd's bytes written to the memory
//! file (holes stay holes), and on restore the file mapped `MAP_PRIVATE`
//! at the same guest addresses, so several VMs can start from one file and
//! each one's writes stay its own (copy on write).
//!
//! A VM with a vhost-user device (virtio-fs) cannot run on a private
//! mapping: the backend maps guest memory from the file behind it and
//! would see the file, not the guest's copy-on-write pages. Such a VM is
//! restored into a fresh memfd filled from the memory file
//! ([`copy_memory`]; only the file's data ranges are copied): it costs
//! the copy (time and the pages, which clones do not share) and nothing
//! else.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::mmap::{GuestRegionMmap, MmapRegion};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::arch::layout::ram_ranges;
use crate::memory::GuestRam;

const COPY_CHUNK: usize = 1 << 20;

/// Why guest memory cannot be saved or mapped.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the memory file {path} is {found} bytes; the snapshot's guest has {want}")]
    Size { path: String, found: u64, want: u64 },
    #[error("cannot map the memory file")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
    #[error("guest memory of {0} bytes does not fit this host's address space")]
    TooLarge(u64),
    #[error("cannot lay out guest memory")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
    #[error("cannot create shared guest memory")]
    Shared(#[source] crate::memory::MemoryError),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> MemoryFileError + 'a {
    move |source| MemoryFileError::Io { what, path: path.display().to_string(), source }
}

/// The memory file `path` of a guest with `size` bytes of RAM, opened and
/// its size checked.
fn open_memory(path: &Path, size: u64) -> Result<File, MemoryFileError> {
    let file = File::open(path).map_err(io("open", path))?;
    let found = file.metadata().map_err(io("read the size of", path))?.len();
    if found != size {
        return Err(MemoryFileError::Size { path: path.display().to_string(), found, want: size });
    }
    Ok(file)
}

/// `lseek(fd, offset, whence)`; `None` past the last data or hole (ENXIO).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek on an fd `file` owns; it touches no memory.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(e) };
    }
    Ok(Some(r as u64))
}

/// The `[start, end)` ranges of `memfd`'s first `size` bytes that hold
/// data (shmem reports holes for pages never written, a sparse file its
/// holes); `name` names it in errors.
fn data_ranges(memfd: &File, size: u64, name: &Path) -> Result<Vec<(u64, u64)>, MemoryFileError> {
    let err = || io("find data in", name);
    let (mut pos, mut out) = (0u64, Vec::new());
    while pos < size {
        let Some(data) = seek(memfd, pos, libc::SEEK_DATA).map_err(err())? else { break };
        if data >= size {
            break;
        }
        let end = seek(memfd, data, libc::SEEK_HOLE).map_err(err())?.unwrap_or(size).min(size);
        out.push((data, end));
        pos = end;
    }
    Ok(out)
}

/// The guest address of byte `offset` of guest RAM laid out over `size`.
fn guest_addr(size: u64, offset: u64) -> Option<GuestAddress> {
    let mut base = 0u64;
    for (addr, len) in ram_ranges(size) {
        if offset < base + len {
            return Some(GuestAddress(addr.0 + (offset - base)));
        }
        base += len;
    }
    None
}

/// Writes the guest's boot RAM to `path` (replaced), skipping what holds
/// nothing: from a memfd only the ranges with data are read; from a
/// snapshot mapped privately everything is read and chunks of zeros stay
/// holes in the file. Returns the bytes written.
pub fn save_memory(ram: &GuestRam, path: &Path) -> Result<u64, MemoryFileError> {
    let size = ram.boot_size;
    let tmp = path.with_extension("tmp");
    let out = File::create(&tmp).map_err(io("create", &tmp))?;
    out.set_len(size).map_err(io("size", &tmp))?;
    let ranges = if ram.private { vec![(0, size)] } else { data_ranges(&ram.memfd, size, Path::new("guest memory"))? };
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut written = 0u64;
    for (start, end) in ranges {
        let mut at = start;
        while at < end {
            // Chunks stay inside one RAM range: its bounds are MiB-aligned.
            let n = ((end - at) as usize).min(COPY_CHUNK - (at as usize % COPY_CHUNK));
            let chunk = &mut buf[..n];
            if ram.private {
                let addr = guest_addr(size, at).ok_or(MemoryFileError::TooLarge(size))?;
                vm_memory::Bytes::read_slice(&ram.mem, chunk, addr).map_err(|e| MemoryFileError::Io {
                    what: "read",
                    path: "guest memory".into(),
                    source: std::io::Error::other(e.to_string()),
                })?;
            } else {
                ram.memfd.read_exact_at(chunk, at).map_err(io("read", Path::new("guest memory")))?;
            }
            if !ram.private || chunk.iter().any(|&b| b != 0) {
                out.write_all_at(chunk, at).map_err(io("write", &tmp))?;
                written += n as u64;
            }
            at += n as u64;
        }
    }
    out.sync_all().map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename into place", path))?;
    Ok(written)
}

/// Maps the memory file `path` of a guest with `size` bytes of RAM
/// privately, laid out as [`crate::memory::create_guest_memory`] lays out
/// the memfd. A file of another size is refused.
pub fn map_memory(path: &Path, size: u64) -> Result<GuestRam, MemoryFileError> {
    let file = open_memory(path, size)?;
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (addr, len) in ram_ranges(size) {
        let len_usize = usize::try_from(len).map_err(|_| MemoryFileError::TooLarge(size))?;
        let fo = FileOffset::new(file.try_clone().map_err(io("duplicate", path))?, offset);
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let map = MmapRegion::build(Some(fo), len_usize, prot, libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .map_err(MemoryFileError::Map)?;
        regions.push(GuestRegionMmap::new(map, addr).ok_or(MemoryFileError::TooLarge(size))?);
        offset += len;
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(MemoryFileError::Layout)?;
    Ok(GuestRam { mem, memfd: file, boot_size: size, hotplug: None, private: true })
}

/// Guest RAM of `size` bytes in a new memfd (shared, as at boot) filled
/// from the memory file `path`: what a VM with vhost-user devices is
/// restored into. Only the file's data ranges are copied; its holes stay
/// unallocated in the memfd. Returns the RAM and the bytes copied.
pub fn copy_memory(path: &Path, size: u64) -> Result<(GuestRam, u64), MemoryFileError> {
    let file = open_memory(path, size)?;
    let ram = crate::memory::create_guest_memory(size, 0).map_err(MemoryFileError::Shared)?;
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut copied = 0u64;
    for (start, end) in data_ranges(&file, size, path)? {
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(COPY_CHUNK);
            let chunk = &mut buf[..n];
            file.read_exact_at(chunk, at).map_err(io("read", path))?;
            ram.memfd.write_all_at(chunk, at).map_err(io("write", Path::new("guest memory")))?;
            at += n as u64;
            copied += n as u64;
        }
    }
    Ok((ram, copied))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use vm_memory::Bytes;

    #[test]
    fn saved_memory_maps_back_privately_and_sparsely() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let size = 64 << 20;
        let ram = create_guest_memory(size, 0).unwrap();
        ram.mem.write_obj(0x1122_3344u32, GuestAddress(0x1000)).unwrap();
        ram.mem.write_obj(0x5566_7788u32, GuestAddress(40 << 20)).unwrap();
        let copied = save_memory(&ram, &path).unwrap();
        assert!(copied < size / 4, "only touched pages are copied: {copied}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), size);

        let a = map_memory(&path, size).unwrap();
        let b = map_memory(&path, size).unwrap();
        assert_eq!(a.mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0x1122_3344);
        assert_eq!(a.mem.read_obj::<u32>(GuestAddress(40 << 20)).unwrap(), 0x5566_7788);
        a.mem.write_obj(7u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(b.mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0x1122_3344, "writes stay private");
        assert_eq!(std::fs::read(&path).unwrap()[0x1000..0x1004], 0x1122_3344u32.to_le_bytes());

        // A snapshot of the restored VM has its own write, and holes.
        let again = dir.path().join("memory2");
        let copied = save_memory(&a, &again).unwrap();
        assert!(copied < size / 4, "zero chunks are skipped: {copied}");
        let c = map_memory(&again, size).unwrap();
        assert_eq!(c.mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 7);
        assert_eq!(c.mem.read_obj::<u32>(GuestAddress(40 << 20)).unwrap(), 0x5566_7788);

        let e = map_memory(&path, size * 2).err().unwrap();
        assert!(matches!(e, MemoryFileError::Size { .. }), "{e}");

        // Copied into shared memory: the same bytes, writes go to the
        // memfd (which a backend would map), not to the file.
        let (d, copied) = copy_memory(&path, size).unwrap();
        assert!(copied > 0 && copied < size / 4, "only the file's data is copied: {copied}");
        assert!(!d.private);
        assert_eq!(d.mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0x1122_3344);
        assert_eq!(d.mem.read_obj::<u32>(GuestAddress(40 << 20)).unwrap(), 0x5566_7788);
        d.mem.write_obj(9u32, GuestAddress(0x1000)).unwrap();
        let mut word = [0u8; 4];
        d.memfd.read_exact_at(&mut word, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(word), 9);
        assert_eq!(std::fs::read(&path).unwrap()[0x1000..0x1004], 0x1122_3344u32.to_le_bytes());
        assert!(matches!(copy_memory(&path, size / 2), Err(MemoryFileError::Size { .. })));
    }
}
