//! Paths inside a rootfs: lexical cleaning, resolution as if the rootfs
//! were `/`, and reading the image's own small files (`/etc/passwd`).

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use super::MAX_SYMLINKS;

/// Resolves `rel` inside `root`, following symlinks as if `root` were `/`
/// (absolute targets and `..` are clamped to `root`); the last component is
/// followed only when `follow_last`. Returns a path relative to `root` whose
/// components are not symlinks (they may not exist yet). `ELOOP` after
/// 40 links.
pub fn resolve_in_root(root: &Path, rel: &Path, follow_last: bool) -> io::Result<PathBuf> {
    let mut pending: Vec<OsString> = rel.iter().rev().map(OsStr::to_os_string).collect();
    let mut out = PathBuf::new();
    let mut links = 0;
    while let Some(c) = pending.pop() {
        if c == ".." {
            out.pop();
            continue;
        }
        if c == "." || c.is_empty() || c == "/" {
            continue;
        }
        let cand = out.join(&c);
        let full = root.join(&cand);
        let is_last = pending.is_empty();
        match fs::symlink_metadata(&full) {
            Ok(m) if m.file_type().is_symlink() && (follow_last || !is_last) => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = fs::read_link(&full)?;
                if target.is_absolute() {
                    out = PathBuf::new();
                }
                for tc in target.components().rev() {
                    match tc {
                        Component::Normal(x) => pending.push(x.to_os_string()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => out = cand,
        }
    }
    Ok(out)
}

/// Largest image file [`read_in_root`] reads: 4 MiB (an `/etc/passwd` of
/// 50,000 users is about 3 MiB).
pub const MAX_IMAGE_FILE: u64 = 4 << 20;

/// Reads a small text file of a rootfs (`etc/passwd`), resolving its path
/// inside the rootfs: symlinks, absolute or `..`, never lead out of it.
/// Refuses what is not a regular file (a FIFO would block, a device or
/// `/proc`-like file never end) and files over [`MAX_IMAGE_FILE`].
pub fn read_in_root(root: &Path, rel: &Path) -> io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::FileTypeExt;
    let f = open_in_root(root, rel).map_err(|e| match e.raw_os_error() {
        // What open(2) says of a socket (or a device without a driver).
        Some(libc::ENXIO) => io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a regular file (a socket or device)", rel.display()),
        ),
        _ => e,
    })?;
    let m = f.metadata()?;
    let t = m.file_type();
    if !t.is_file() {
        let kind = if t.is_fifo() {
            "a FIFO"
        } else if t.is_socket() {
            "a socket"
        } else if t.is_char_device() || t.is_block_device() {
            "a device"
        } else if t.is_dir() {
            "a directory"
        } else {
            "special"
        };
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a regular file ({kind})", rel.display()),
        ));
    }
    let too_big = |size: u64| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: {size} bytes, over the {MAX_IMAGE_FILE}-byte limit",
                rel.display()
            ),
        )
    };
    if m.len() > MAX_IMAGE_FILE {
        return Err(too_big(m.len()));
    }
    let mut buf = Vec::new();
    f.take(MAX_IMAGE_FILE + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_IMAGE_FILE {
        return Err(too_big(buf.len() as u64));
    }
    String::from_utf8(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Opens `rel` for reading without blocking (`O_NONBLOCK`: a FIFO opens at
/// once) or taking a terminal (`O_NOCTTY`), resolved inside `root` by the
/// kernel (`openat2` with `RESOLVE_IN_ROOT`), or on kernels before 5.6 by
/// [`resolve_in_root`] and an `O_NOFOLLOW` open of the symlink-free result.
fn open_in_root(root: &Path, rel: &Path) -> io::Result<fs::File> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::{AsRawFd, FromRawFd};
    let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;
    let dir = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(root)?;
    let c = std::ffi::CString::new(rel.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: open_how is plain data; all-zero is its valid "nothing set".
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: dir is an open directory, c a NUL-terminated path and how a
    // valid open_how of the size passed; the kernel only reads them.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd >= 0 {
        // SAFETY: openat2 returned a new descriptor that nothing else owns.
        return Ok(unsafe { fs::File::from_raw_fd(fd as i32) });
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::ENOSYS) {
        return Err(e);
    }
    open_resolved(root, rel, flags)
}

/// The `openat2` fallback: resolved in user space, then opened without
/// following a symlink swapped in meanwhile.
fn open_resolved(root: &Path, rel: &Path, flags: i32) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let p = resolve_in_root(root, rel, true)?;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags | libc::O_NOFOLLOW)
        .open(root.join(p))
}

/// Lexically cleans an archive path; `None` if `..` climbs above the top.
pub fn clean(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(x) => out.push(x),
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// `read_in_root` on another thread: a hang shows as a failure.
    fn read_soon(root: &Path, rel: &str) -> io::Result<String> {
        let (tx, rx) = mpsc::channel();
        let (root, rel) = (root.to_path_buf(), PathBuf::from(rel));
        std::thread::spawn(move || {
            let _ = tx.send(read_in_root(&root, &rel));
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("read_in_root hung")
    }

    #[test]
    fn special_and_huge_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("rootfs");
        fs::create_dir_all(root.join("etc")).unwrap();
        let c =
            std::ffi::CString::new(root.join("etc/passwd").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: c is a valid NUL-terminated path; mkfifo only reads it.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let _sock = std::os::unix::net::UnixListener::bind(root.join("etc/group")).unwrap();
        let f = fs::File::create(root.join("etc/shadow")).unwrap();
        f.set_len(64 << 20).unwrap();
        fs::create_dir(root.join("etc/dir")).unwrap();
        for (p, why) in [
            ("etc/passwd", "not a regular file"),
            ("etc/group", "not a regular file"),
            ("etc/dir", "not a regular file"),
            ("etc/shadow", "over the 4194304-byte limit"),
        ] {
            let e = read_soon(&root, p).unwrap_err();
            assert!(e.to_string().contains(why), "{p}: {e}");
        }
    }

    #[test]
    fn symlinks_stay_in_the_rootfs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("rootfs");
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::create_dir_all(root.join("usr/share")).unwrap();
        fs::write(dir.path().join("host"), "host:x:0:0::/:/bin/sh\n").unwrap();
        fs::write(root.join("usr/share/passwd"), "img:x:1:1::/:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink("../usr/share/passwd", root.join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("../../../host", root.join("etc/group")).unwrap();
        let host = dir.path().join("host");
        std::os::unix::fs::symlink(&host, root.join("etc/abs")).unwrap();
        assert_eq!(
            read_soon(&root, "etc/passwd").unwrap(),
            "img:x:1:1::/:/bin/sh\n"
        );
        for p in ["etc/group", "etc/abs"] {
            let e = read_soon(&root, p).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::NotFound, "{p}: {e}");
        }
        // The same through the fallback for kernels without openat2.
        let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY;
        assert!(open_resolved(&root, Path::new("etc/passwd"), flags).is_ok());
        for p in ["etc/group", "etc/abs"] {
            let e = open_resolved(&root, Path::new(p), flags).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::NotFound, "{p}: {e}");
        }
        let c =
            std::ffi::CString::new(root.join("etc/fifo").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: c is a valid NUL-terminated path; mkfifo only reads it.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        // Opens at once (O_NONBLOCK), so read_in_root can refuse it.
        assert!(open_resolved(&root, Path::new("etc/fifo"), flags).is_ok());
    }
}
