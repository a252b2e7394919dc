//! Filesystem operations of the unpacker on one path each: never following
//! the last component (`O_NOFOLLOW`, `AT_SYMLINK_NOFOLLOW`, `lsetxattr`).

use std::ffi::CString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::{io_err, UnpackError};

pub(super) fn copy_entry(
    r: &mut impl Read,
    f: &mut fs::File,
    path: &Path,
) -> Result<u64, UnpackError> {
    let mut buf = vec![0u8; 128 * 1024];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(UnpackError::Archive(e)),
        };
        io::Write::write_all(f, &buf[..n]).map_err(io_err("write", path))?;
        total += n as u64;
    }
}

/// Removes whatever is at `p` (a whole tree for a directory); absent is fine.
pub(super) fn remove_any(p: &Path) -> Result<(), UnpackError> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).map_err(io_err("remove", p)),
        Ok(_) => fs::remove_file(p).map_err(io_err("remove", p)),
        Err(_) => Ok(()),
    }
}

pub(super) fn cstr(p: &Path) -> Result<CString, UnpackError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| UnpackError::Io {
        op: "encode",
        path: p.to_path_buf(),
        source: io::Error::from_raw_os_error(libc::EINVAL),
    })
}

pub(super) fn set_times(p: &Path, mtime: i64) -> Result<(), UnpackError> {
    let c = cstr(p)?;
    let ts = libc::timespec {
        tv_sec: mtime as libc::time_t,
        tv_nsec: 0,
    };
    let times = [ts, ts];
    // SAFETY: c is NUL-terminated, times points to two valid timespecs; the
    // call reads both and does not keep them.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(UnpackError::Io {
            op: "set times of",
            path: p.to_path_buf(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

pub(super) fn set_xattr(p: &Path, name: &[u8], value: &[u8]) -> Result<(), UnpackError> {
    let c = cstr(p)?;
    let Ok(n) = CString::new(name) else {
        return Ok(());
    };
    // SAFETY: both strings are NUL-terminated and value is a valid slice of
    // value.len() bytes; lsetxattr only reads them.
    let rc = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // Not supported here, or a namespace we may not write: the
            // rootfs is still usable; say so and go on.
            Some(libc::ENOTSUP) | Some(libc::EPERM) => {
                log::warn!(
                    "{}: xattr {} not set: {e}",
                    p.display(),
                    String::from_utf8_lossy(name)
                );
            }
            _ => {
                return Err(UnpackError::Io {
                    op: "set xattr on",
                    path: p.to_path_buf(),
                    source: e,
                })
            }
        }
    }
    Ok(())
}
