//! Bind mounts added to and removed from a running container (disk
//! devices hot-plugged): the host directory is cloned into a detached
//! mount here (`open_tree`), then a short-lived child enters the
//! container's mount namespace (`setns`), makes the target directory and
//! attaches the mount there (`move_mount`), or detaches it on removal.
//! The child does only system calls between fork and exec (of
//! `/bin/true`), so it is safe from the daemon's threads.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Component, Path};

use skiff_storage::idmap::{move_mount, Detached};

/// Errors of container mounts.
#[derive(Debug, thiserror::Error)]
pub enum NsMountError {
    /// The target is not a clean absolute path.
    #[error("{0:?} is not an absolute path without '..'")]
    BadTarget(String),
    /// The host path cannot be cloned.
    #[error("cloning the mount of {0}")]
    Clone(String, #[source] io::Error),
    /// The container's mount namespace is gone.
    #[error("opening the mount namespace of pid {0}")]
    Namespace(i32, #[source] io::Error),
    /// Attaching or detaching inside failed.
    #[error("{what} {target} in the container")]
    Inside {
        /// What was being done.
        what: &'static str,
        /// The path inside.
        target: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// The directories from `/` down to `target`, as C strings.
fn prefixes(target: &str) -> Result<Vec<CString>, NsMountError> {
    let bad = || NsMountError::BadTarget(target.to_string());
    let p = Path::new(target);
    if !p.is_absolute() || target.contains('\0') {
        return Err(bad());
    }
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in p.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => {
                cur.push('/');
                cur.push_str(n.to_str().ok_or_else(bad)?);
                out.push(CString::new(cur.clone()).map_err(|_| bad())?);
            }
            _ => return Err(bad()),
        }
    }
    if out.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

fn mount_ns(pid: i32) -> Result<File, NsMountError> {
    File::open(format!("/proc/{pid}/ns/mnt")).map_err(|e| NsMountError::Namespace(pid, e))
}

/// Runs `inside` in a child that entered `ns` (a mount namespace fd).
async fn in_namespace(
    ns: File,
    what: &'static str,
    target: &str,
    inside: impl Fn() -> io::Result<()> + Send + Sync + 'static,
) -> Result<(), NsMountError> {
    let mut cmd = tokio::process::Command::new("/bin/true");
    let fd = ns.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and makes only system calls (setns, mkdir,
    // move_mount, umount2) on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNS) != 0 {
                return Err(io::Error::last_os_error());
            }
            inside()
        });
    }
    let inside_err = |source| NsMountError::Inside { what, target: target.to_string(), source };
    let status = cmd.status().await.map_err(inside_err)?;
    drop(ns);
    if !status.success() {
        return Err(inside_err(io::Error::other(format!("helper ended with {status}"))));
    }
    Ok(())
}

/// Bind-mounts host directory `source` at `target` in the container whose init is `pid`.
pub async fn add(pid: i32, source: &Path, target: &str, readonly: bool) -> Result<(), NsMountError> {
    let dirs = prefixes(target)?;
    let detached = Detached::clone_of(source).map_err(|e| NsMountError::Clone(source.display().to_string(), e))?;
    if readonly {
        detached.set_readonly().map_err(|e| NsMountError::Clone(source.display().to_string(), e))?;
    }
    let ns = mount_ns(pid)?;
    let fd = detached.raw_fd();
    in_namespace(ns, "attaching the mount at", target, move || {
        for d in &dirs {
            // SAFETY: d is a NUL-terminated path made before the fork.
            if unsafe { libc::mkdir(d.as_ptr(), 0o755) } != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EEXIST) {
                    return Err(e);
                }
            }
        }
        move_mount(fd, dirs.last().expect("prefixes are never empty"))
    })
    .await?;
    drop(detached);
    Ok(())
}

/// Detaches whatever is mounted at `target` in the container whose init is `pid`.
pub async fn remove(pid: i32, target: &str) -> Result<(), NsMountError> {
    let path = prefixes(target)?.pop().expect("prefixes are never empty");
    let ns = mount_ns(pid)?;
    in_namespace(ns, "detaching", target, move || {
        // SAFETY: path is a NUL-terminated string made before the fork.
        if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_clean_absolute_paths() {
        let p = prefixes("/srv/data").unwrap();
        assert_eq!(p, [CString::new("/srv").unwrap(), CString::new("/srv/data").unwrap()]);
        for bad in ["relative", "/", "/a/../b", "/a\0b"] {
            assert!(prefixes(bad).is_err(), "{bad:?}");
        }
    }
}
