//! Tree operations: copying (GNU `cp -a`), removing (never through a mount), measuring, JSON metadata, and the
//! locked temporary directories every multi-step operation builds in before its commit rename.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{sys, StorageError};

/// How `copy_tree` may share data blocks with the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reflink {
    /// Reflink where the filesystem can, copy otherwise.
    Auto,
    /// Reflink or fail.
    Always,
}

/// Copies the tree `src` to `dst` (which must not exist) with `cp -a`: modes, owners, timestamps, xattrs (including
/// `trusted.*`, i.e. overlayfs whiteout/opaque/redirect markers, as root), hard links within the tree, device nodes,
/// fifos, sockets and symlinks are kept.
pub fn copy_tree(src: &Path, dst: &Path, reflink: Reflink) -> Result<(), StorageError> {
    let mode = match reflink {
        Reflink::Auto => "--reflink=auto",
        Reflink::Always => "--reflink=always",
    };
    let mut cmd = Command::new("cp");
    cmd.args(["-a", mode, "--no-target-directory", "--"]).arg(src).arg(dst);
    // If the daemon is killed mid-copy, `cp` must die with it: an orphan would keep writing into the temporary
    // directory that `cleanup_partial` is removing.
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: see above; the closure runs in the forked child before exec and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 || libc::getppid() != parent {
                return Err(std::io::Error::other("parent exited before cp started"));
            }
            Ok(())
        })
    };
    let command = format!("cp -a {mode} --no-target-directory -- {} {}", src.display(), dst.display());
    let out = cmd.output().map_err(|e| StorageError::Command {
        command: command.clone(),
        status: "not started".into(),
        stderr: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(StorageError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// The first mount point at or under `path`, if any.
pub fn mount_inside(path: &Path) -> Result<Option<PathBuf>, StorageError> {
    let mounts = sys::mount_points().map_err(|e| StorageError::io("read mount table for", path, e))?;
    Ok(mounts.into_iter().find(|m| m.starts_with(path)))
}

/// Removes the tree at `path` (absent is fine). Refuses if anything is mounted at or under it: removing through a
/// mount would delete the mounted filesystem's files (through an overlay: whiteouts, never the image itself).
pub fn remove_tree(path: &Path) -> Result<(), StorageError> {
    if let Some(mount) = mount_inside(path)? {
        return Err(StorageError::MountedInside { path: path.to_path_buf(), mount });
    }
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StorageError::io("remove", path, e)),
        _ => Ok(()),
    }
}

/// Bytes allocated on disk by the trees at `paths`: st_blocks × 512 over every entry, each inode counted once (hard
/// links), not descending into other filesystems. Extents shared by reflink are counted in full by each owner.
pub fn usage_bytes(paths: &[PathBuf]) -> Result<u64, StorageError> {
    let mut seen = HashSet::new();
    let mut total = 0u64;
    let mut stack: Vec<(PathBuf, Option<u64>)> = paths.iter().map(|p| (p.clone(), None)).collect();
    while let Some((path, parent_dev)) = stack.pop() {
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(StorageError::io("stat", path, e)),
        };
        if parent_dev.is_some_and(|dev| dev != meta.dev()) {
            continue;
        }
        if meta.nlink() <= 1 || meta.is_dir() || seen.insert((meta.dev(), meta.ino())) {
            total += meta.blocks() * 512;
        }
        if meta.is_dir() {
            let entries = fs::read_dir(&path).map_err(|e| StorageError::io("list", &path, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| StorageError::io("list", &path, e))?;
                stack.push((entry.path(), Some(meta.dev())));
            }
        }
    }
    Ok(total)
}

/// Writes `value` as JSON to `path` and fsyncs it.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StorageError> {
    let text = serde_json::to_vec_pretty(value).expect("metadata serializes");
    let mut file = fs::File::create(path).map_err(|e| StorageError::io("create", path, e))?;
    file.write_all(&text).and_then(|()| file.sync_all()).map_err(|e| StorageError::io("write", path, e))
}

/// Reads JSON from `path`; a missing file is `Io` with `NotFound`.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, StorageError> {
    let text = fs::read(path).map_err(|e| StorageError::io("read", path, e))?;
    serde_json::from_slice(&text).map_err(|source| StorageError::BadMetadata { path: path.to_path_buf(), source })
}

/// Creates a directory, mapping the error.
pub fn mkdir(path: &Path) -> Result<(), StorageError> {
    fs::create_dir(path).map_err(|e| StorageError::io("create directory", path, e))
}

/// A work directory in the pool's `tmp/`, flock'ed for as long as this value lives so that `cleanup_partial` knows
/// it is in use (a killed process drops its locks, which is how its leftovers are told apart). On drop, whatever is
/// still at the path is removed (the error path); the success path renames its contents away first.
pub struct TempDir {
    path: PathBuf,
    _lock: fs::File,
}

impl TempDir {
    /// Creates `<tmp>/<prefix>-<uuid>` and locks it.
    pub fn new(tmp: &Path, prefix: &str) -> Result<TempDir, StorageError> {
        let path = tmp.join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()));
        mkdir(&path)?;
        let lock = sys::flock_exclusive(&path, true).map_err(|e| StorageError::io("lock", &path, e))?;
        Ok(TempDir { path, _lock: lock })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = remove_tree(&self.path) {
            log::warn!("leaving temporary {} for cleanup_partial: {e}", self.path.display());
        }
    }
}
