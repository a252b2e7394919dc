//! Id-mapped mounts (Linux 5.12+, `mount_setattr(MOUNT_ATTR_IDMAP)`): a tree owned by host root seen through a
//! user-namespace mapping, so an unprivileged container (whose root is host uid `host_base`) owns its image's files
//! without a chown of the image. The new mount API calls live here too, as detached mounts ([`Detached`]) that are
//! moved into place, also into another process's mount namespace (hot-plugged bind mounts of containers).
//!
//! ```text
//! user namespace: a forked child unshares CLONE_NEWUSER and waits; its uid_map/gid_map are written from here;
//!                 /proc/<child>/ns/user is opened, the child is killed
//! id-mapped bind: open_tree(src, OPEN_TREE_CLONE) → mount_setattr(IDMAP, userns) → move_mount(→ dst)
//! ```

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// A range of ids: container ids `0..count` are host ids `host_base..host_base + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    /// The host id of the container's root.
    pub host_base: u32,
    /// How many ids are mapped.
    pub count: u32,
}

impl IdMap {
    /// The line for `/proc/<pid>/uid_map` and `gid_map`.
    pub fn map_line(&self) -> String {
        format!("0 {} {}\n", self.host_base, self.count)
    }
}

// The kernel's `struct mount_attr` (linux/mount.h).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x0000_0004;

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// A mount not attached anywhere yet (an `open_tree` clone); dropped unattached, it goes away.
#[derive(Debug)]
pub struct Detached(OwnedFd);

impl Detached {
    /// A detached recursive-free copy of the mount of `source` (a bind mount in waiting).
    pub fn clone_of(source: &Path) -> io::Result<Detached> {
        let c = cpath(source)?;
        // SAFETY: open_tree reads the NUL-terminated path, which outlives the call; the result is a new fd or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_open_tree,
                libc::AT_FDCWD,
                c.as_ptr(),
                OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor owned by nobody else.
        Ok(Detached(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// Applies `map` to the mount: files owned by host id `host_base + n` appear as `n`, and what is written
    /// through it as id `n` lands as `host_base + n`.
    pub fn idmap(&self, map: IdMap) -> io::Result<()> {
        let userns = userns_fd(map)?;
        self.set_attr(&MountAttr {
            attr_set: MOUNT_ATTR_IDMAP,
            attr_clr: 0,
            propagation: 0,
            userns_fd: userns.as_raw_fd() as u64,
        })
    }

    /// Makes the mount read-only.
    pub fn set_readonly(&self) -> io::Result<()> {
        self.set_attr(&MountAttr { attr_set: MOUNT_ATTR_RDONLY, attr_clr: 0, propagation: 0, userns_fd: 0 })
    }

    fn set_attr(&self, attr: &MountAttr) -> io::Result<()> {
        // SAFETY: the empty path and `attr` outlive the call, and the size passed is attr's.
        let r = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                self.0.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Attaches the mount at `target` (in the caller's mount namespace).
    pub fn attach(self, target: &Path) -> io::Result<()> {
        let c = cpath(target)?;
        move_mount(self.0.as_raw_fd(), &c)
    }

    /// The descriptor, for attaching in another mount namespace with [`move_mount`] from a child process.
    pub fn raw_fd(&self) -> i32 {
        self.0.as_raw_fd()
    }
}

/// `move_mount(fd, "", AT_FDCWD, target, MOVE_MOUNT_F_EMPTY_PATH)`: only a system call, so it may run in a forked
/// child (say after `setns` into a container's mount namespace).
pub fn move_mount(fd: i32, target: &CString) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated and outlive the call.
    let r = unsafe {
        libc::syscall(libc::SYS_move_mount, fd, c"".as_ptr(), libc::AT_FDCWD, target.as_ptr(), MOVE_MOUNT_F_EMPTY_PATH)
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A user namespace with `map` for uids and gids, as an fd (`/proc/<pid>/ns/user` of a short-lived child).
pub fn userns_fd(map: IdMap) -> io::Result<File> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array, which is valid.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh and owned here.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the child calls only async-signal-safe functions (unshare, write, pause, _exit) before it is killed.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: plain system calls on valid arguments, in the forked child.
        unsafe {
            let ok: u8 = (libc::unshare(libc::CLONE_NEWUSER) == 0).into();
            libc::write(wr.as_raw_fd(), (&ok as *const u8).cast(), 1);
            loop {
                libc::pause();
            }
        }
    }
    drop(wr);
    let result = (|| {
        let mut ok = 0u8;
        // SAFETY: reads one byte into `ok`.
        let n = unsafe { libc::read(rd.as_raw_fd(), (&mut ok as *mut u8).cast(), 1) };
        if n != 1 || ok != 1 {
            return Err(io::Error::other("the helper could not make a user namespace"));
        }
        for file in ["uid_map", "gid_map"] {
            OpenOptions::new().write(true).open(format!("/proc/{pid}/{file}"))?.write_all(map.map_line().as_bytes())?;
        }
        File::open(format!("/proc/{pid}/ns/user"))
    })();
    // SAFETY: pid is our child; it is killed and reaped here.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    result
}

/// Bind-mounts `source` on `target` through `map` (see the module doc).
pub fn idmapped_bind(source: &Path, target: &Path, map: IdMap) -> io::Result<()> {
    let d = Detached::clone_of(source)?;
    d.idmap(map)?;
    d.attach(target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn map_lines() {
        assert_eq!(IdMap { host_base: 1_000_000, count: 65536 }.map_line(), "0 1000000 65536\n");
    }

    #[test]
    fn an_idmapped_bind_shows_root_files_as_the_mapped_ids() {
        if !root() {
            eprintln!("skipped: needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&dst).unwrap();
        std::fs::write(src.join("f"), b"x").unwrap();
        let map = IdMap { host_base: 1_000_000, count: 65536 };
        match idmapped_bind(&src, &dst, map) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                eprintln!("skipped: no mount permission here: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        }
        let uid = std::fs::metadata(dst.join("f")).unwrap().uid();
        // Host root has no id inside the mapping: it cannot create files through the mount.
        let write = std::fs::write(dst.join("g"), b"y");
        crate::sys::umount(&dst, 0).unwrap();
        assert_eq!(uid, 1_000_000);
        assert!(write.is_err());
    }
}
