//! Thin wrappers over the system calls this crate needs (mount, umount2, renameat2, FICLONE, syncfs, flock) and the
//! mount-table reader. They return `io::Error`; callers add the path and operation when they wrap it.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

fn cstr(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "string contains a NUL byte"))
}

fn cpath(path: &Path) -> io::Result<CString> {
    cstr(path.as_os_str().as_bytes())
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// mount(2). `data` is the filesystem's options string.
pub fn mount(
    source: &str,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = cstr(source.as_bytes())?;
    let target = cpath(target)?;
    let fstype = fstype.map(|t| cstr(t.as_bytes())).transpose()?;
    let data = data.map(|d| cstr(d.as_bytes())).transpose()?;
    // SAFETY: every pointer is either null or points to a NUL-terminated string that outlives the call.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |t| t.as_ptr()),
            flags,
            data.as_ref().map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    })
}

/// Bind-mounts `source` on `target`, then makes the bind nodev and nosuid.
pub fn bind_mount(source: &Path, target: &Path) -> io::Result<()> {
    let source = source.to_str().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "non-UTF-8 path"))?;
    mount(source, target, None, libc::MS_BIND, None)?;
    let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NODEV | libc::MS_NOSUID;
    if let Err(e) = mount("none", target, None, flags, None) {
        let _ = umount(target, libc::MNT_DETACH);
        return Err(e);
    }
    Ok(())
}

/// umount2(2).
pub fn umount(target: &Path, flags: libc::c_int) -> io::Result<()> {
    let target = cpath(target)?;
    // SAFETY: `target` is a NUL-terminated string that outlives the call.
    check(unsafe { libc::umount2(target.as_ptr(), flags) })
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let from = cpath(from)?;
    let to = cpath(to)?;
    // SAFETY: both paths are NUL-terminated strings that outlive the call; AT_FDCWD needs no fd.
    check(unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), flags) })
}

/// Renames `from` to `to`, failing with `EEXIST` if `to` exists (even as an empty directory).
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    renameat2(from, to, libc::RENAME_NOREPLACE)
}

/// Swaps `a` and `b` atomically; both must exist.
pub fn rename_exchange(a: &Path, b: &Path) -> io::Result<()> {
    renameat2(a, b, libc::RENAME_EXCHANGE)
}

/// Makes `dst` share `src`'s extents (ioctl FICLONE): fails with `EOPNOTSUPP`/`EXDEV`/`EINVAL` where the filesystem
/// cannot reflink.
pub fn ficlone(src: &File, dst: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source fd as its argument; both fds are open for the duration of the call.
    check(unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) })
}

/// Flushes the filesystem holding `path` (syncfs(2)) so that what was written under it is durable before a commit
/// rename.
pub fn syncfs(path: &Path) -> io::Result<()> {
    let dir = File::open(path)?;
    // SAFETY: `dir` is an open fd for the duration of the call.
    check(unsafe { libc::syncfs(dir.as_raw_fd()) })
}

/// fsync(2) of a directory, making renames inside it durable.
pub fn fsync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Opens `path` (a directory or file) and takes an exclusive flock(2) on it; the lock lives as long as the returned
/// file. With `wait == false`, fails with `EWOULDBLOCK` if someone else holds it.
pub fn flock_exclusive(path: &Path, wait: bool) -> io::Result<File> {
    let file = File::open(path)?;
    let op = if wait { libc::LOCK_EX } else { libc::LOCK_EX | libc::LOCK_NB };
    // SAFETY: `file` is an open fd for the duration of the call.
    check(unsafe { libc::flock(file.as_raw_fd(), op) })?;
    Ok(file)
}

/// The page size: mount(2) copies at most one page of options.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

/// Mount points of this process's mount namespace, from /proc/self/mountinfo, in mount order.
pub fn mount_points() -> io::Result<Vec<PathBuf>> {
    let table = std::fs::read("/proc/self/mountinfo")?;
    Ok(parse_mountinfo(&table))
}

/// The mount points (field 5) of a mountinfo table, with the kernel's octal escapes (`\040` for space, ...) undone.
fn parse_mountinfo(table: &[u8]) -> Vec<PathBuf> {
    table
        .split(|&b| b == b'\n')
        .filter_map(|line| line.split(|&b| b == b' ').nth(4))
        .map(|field| PathBuf::from(std::ffi::OsString::from_vec(unescape(field))))
        .collect()
}

fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal =
            field.get(i + 1..i + 4).filter(|d| field[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') << 6 | (d[1] - b'0') << 3 | (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_mount_points_are_unescaped() {
        let table = b"22 27 0:21 / /proc rw,relatime - proc proc rw\n\
                      90 27 0:50 / /srv/my\\040pool/a\\134b rw - overlay overlay rw,lowerdir=/x\n";
        assert_eq!(parse_mountinfo(table), vec![PathBuf::from("/proc"), PathBuf::from("/srv/my pool/a\\b")]);
    }

    #[test]
    fn own_mount_table_has_root() {
        assert!(mount_points().unwrap().contains(&PathBuf::from("/")));
    }
}
