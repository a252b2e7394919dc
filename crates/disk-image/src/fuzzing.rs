//! Entry point for the cargo-fuzz target in `fuzz/` (feature `fuzzing`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::PathBuf;

use crate::DiskImage;

/// The fuzz bytes as a qcow2 image file: checked, opened (read-write when
/// the first byte after the header is odd), read whole up to 4 MiB, written
/// and flushed. Errors are expected; a panic, a hang or a huge allocation
/// is a bug.
pub fn qcow2(data: &[u8]) {
    // SAFETY: memfd_create with a static NUL-terminated name; checked below.
    let fd = unsafe { libc::memfd_create(c"fuzz-qcow2".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: `fd` is a fresh descriptor we own.
    let file = unsafe { File::from_raw_fd(fd) };
    file.write_all_at(data, 0).expect("memfd write");
    let readonly = data.get(72).is_none_or(|b| b & 1 == 0);
    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let Ok(disk) = crate::qcow2::Qcow2Image::open(file, &path, readonly) else {
        return;
    };
    exercise(&disk, 4 << 20, data.len() as u64);
}

/// Reads `disk` whole up to `limit` bytes; when it is writable, writes 4 KiB
/// at a sector picked by `seed` and flushes. Errors are ignored: this is
/// for finding panics and hangs.
pub fn exercise(disk: &dyn DiskImage, limit: u64, seed: u64) {
    let size = disk.size().min(limit);
    let mut buf = vec![0u8; 64 << 10];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        let _ = disk.read_at(&mut buf[..n], off);
        off += n as u64;
    }
    if !disk.readonly() && size >= 4096 {
        let _ = disk.write_at(&[0x5a; 4096], (seed % (size - 4095)) & !511);
        let _ = disk.flush();
    }
}
