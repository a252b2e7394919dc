//! The pool: a directory of volumes, the backend new volumes get, and the crash-recovery sweep.

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::fsops::{self, Reflink, TempDir};
use crate::name::validate_name;
use crate::volume::{overlay_options, Volume, VolumeMeta, VOLUME_META};
use crate::{sys, StorageError};

/// How a volume keeps its own changes apart from the image it was made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// overlayfs: the image is the lower layer, the volume's `state/` the upper layer. Creating is instant and a
    /// volume holds only what the instance changed.
    Overlay,
    /// A reflink copy of the image (FICLONE: btrfs, xfs with reflink=1, ...): instant-ish, blocks shared until
    /// written; served through a bind mount.
    Reflink,
    /// A plain `cp -a` copy of the image, served through a bind mount.
    Copy,
}

/// A storage pool rooted at a directory (see the crate docs for its layout).
#[derive(Debug, Clone)]
pub struct Pool {
    root: PathBuf,
    backend: Backend,
}

impl Pool {
    /// Opens (creating if needed) the pool at `root`, e.g. `$SKIFF_DIR/storage`, and picks the backend for new
    /// volumes: overlayfs if the kernel mounts it with an upper layer on this filesystem, else reflink copies if
    /// FICLONE works here, else plain copies.
    pub fn open(root: &Path) -> Result<Pool, StorageError> {
        let root = prepare(root)?;
        let backend = match probe_overlay(&root) {
            Ok(()) => Backend::Overlay,
            Err(overlay) => match probe_reflink(&root) {
                Ok(()) => Backend::Reflink,
                Err(reflink) => {
                    log::info!("pool {}: no overlayfs ({overlay}), no reflink ({reflink})", root.display());
                    Backend::Copy
                }
            },
        };
        log::info!("pool {}: new volumes use {backend:?}", root.display());
        Ok(Pool { root, backend })
    }

    /// Opens the pool at `root` with a given backend for new volumes, after checking that it works here
    /// (`Unsupported` otherwise). Existing volumes keep the backend they were made with.
    pub fn with_backend(root: &Path, backend: Backend) -> Result<Pool, StorageError> {
        let root = prepare(root)?;
        let probe = match backend {
            Backend::Overlay => probe_overlay(&root),
            Backend::Reflink => probe_reflink(&root),
            Backend::Copy => Ok(()),
        };
        probe.map_err(|reason| StorageError::Unsupported { backend, path: root.clone(), reason })?;
        Ok(Pool { root, backend })
    }

    /// The backend new volumes get.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The pool's root directory (canonical).
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn volumes_dir(&self) -> PathBuf {
        self.root.join("volumes")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Creates the volume of instance `name` over the unpacked image at `image_rootfs`, which is shared by every
    /// instance of that image and never written. Fails with `VolumeExists` if the name is taken. Crash-safe: the
    /// volume is built in `tmp/` and renamed into place at the end; `cleanup_partial` removes a half-built one.
    pub fn create(&self, name: &str, image_rootfs: &Path) -> Result<Volume, StorageError> {
        validate_name("volume", name)?;
        let image = fs::canonicalize(image_rootfs)
            .ok()
            .filter(|p| p.is_dir())
            .ok_or_else(|| StorageError::BadImage { path: image_rootfs.to_path_buf() })?;
        let dest = self.volumes_dir().join(name);
        if fs::symlink_metadata(&dest).is_ok() {
            return Err(StorageError::VolumeExists(name.to_string()));
        }
        let build = TempDir::new(&self.tmp_dir(), &format!("create-{name}"))?;
        let dir = build.path();
        let state = dir.join("state");
        match self.backend {
            Backend::Overlay => {
                // Check the options fit before doing anything else (the final paths are what count).
                overlay_options(&image, &dest.join("state"), &dest.join("work"), &dest.join("rootfs"))?;
                mkdir_like(&state, &image)?;
                fsops::mkdir(&dir.join("work"))?;
            }
            Backend::Reflink => fsops::copy_tree(&image, &state, Reflink::Always)?,
            Backend::Copy => fsops::copy_tree(&image, &state, Reflink::Auto)?,
        }
        fsops::mkdir(&dir.join("rootfs"))?;
        fsops::mkdir(&dir.join("snapshots"))?;
        let meta = VolumeMeta { backend: self.backend, image, created: unix_now() };
        fsops::write_json(&dir.join(VOLUME_META), &meta)?;
        sys::syncfs(dir).map_err(|e| StorageError::io("syncfs", dir, e))?;
        sys::rename_noreplace(dir, &dest).map_err(|e| match e.raw_os_error() {
            Some(libc::EEXIST) | Some(libc::ENOTEMPTY) => StorageError::VolumeExists(name.to_string()),
            _ => StorageError::io("rename into place", &dest, e),
        })?;
        sys::fsync_dir(&self.volumes_dir()).map_err(|e| StorageError::io("fsync", self.volumes_dir(), e))?;
        Ok(Volume::new(name.to_string(), dest, self.tmp_dir(), meta))
    }

    /// Creates the volume of instance `name` over `source`'s image with the state of `source`'s snapshot `snap` (a
    /// copy, reflinked where the filesystem can): a new instance from another's snapshot. `SnapshotNotFound`,
    /// `VolumeExists`; on any failure no volume is left.
    pub fn create_from_snapshot(&self, name: &str, source: &Volume, snap: &str) -> Result<Volume, StorageError> {
        let state = {
            let _lock = source.lock()?;
            source.snapshot_state(snap)?
        };
        let volume = self.create(name, source.image())?;
        let copied = {
            let _lock = source.lock()?;
            volume.replace_state(&state, &format!("copy-{name}"))
        };
        match copied {
            Ok(()) => Ok(volume),
            Err(e) => {
                let _ = volume.delete();
                Err(e)
            }
        }
    }

    /// Opens an existing volume (`VolumeNotFound` if there is none of that name).
    pub fn open_volume(&self, name: &str) -> Result<Volume, StorageError> {
        validate_name("volume", name)?;
        let dir = self.volumes_dir().join(name);
        let meta_path = dir.join(VOLUME_META);
        let meta: VolumeMeta = match fsops::read_json(&meta_path) {
            Err(StorageError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(StorageError::VolumeNotFound(name.to_string()))
            }
            other => other?,
        };
        Ok(Volume::new(name.to_string(), dir, self.tmp_dir(), meta))
    }

    /// The names of all volumes, sorted.
    pub fn volumes(&self) -> Result<Vec<String>, StorageError> {
        list_names(&self.volumes_dir())
    }

    /// Removes what killed operations left in `tmp/` (half-built volumes and snapshots, the old state of an
    /// interrupted restore, half-deleted volumes, probe mounts) and returns the removed entries' names, which say
    /// what was interrupted (`create-<volume>-<id>`, `snapshot-<volume>-<snap>-<id>`, `restore-…`, `delete-…`).
    /// Entries locked by operations still running (in any process) are left alone.
    pub fn cleanup_partial(&self) -> Result<Vec<String>, StorageError> {
        let tmp = self.tmp_dir();
        let mut removed = Vec::new();
        for entry in fs::read_dir(&tmp).map_err(|e| StorageError::io("list", &tmp, e))? {
            let entry = entry.map_err(|e| StorageError::io("list", &tmp, e))?;
            let path = entry.path();
            let lock = match sys::flock_exclusive(&path, false) {
                Ok(lock) => Some(lock),
                Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => continue,
                Err(_) => None, // not a directory we can open: nothing can be using it as a TempDir
            };
            // A crash between mount and unmount (the overlay probe) leaves a mount here: detach it first.
            while let Some(mount) = fsops::mount_inside(&path)? {
                sys::umount(&mount, libc::MNT_DETACH).map_err(|e| StorageError::io("detach", &mount, e))?;
            }
            fsops::remove_tree(&path)?;
            drop(lock);
            log::info!("removed partial {}", path.display());
            removed.push(entry.file_name().to_string_lossy().into_owned());
        }
        removed.sort();
        Ok(removed)
    }

    /// Renames an unmounted volume (`Mounted` if it is mounted, `VolumeExists` if `new` is taken).
    pub fn rename(&self, old: &str, new: &str) -> Result<(), StorageError> {
        validate_name("volume", new)?;
        let volume = self.open_volume(old)?;
        let _lock = volume.lock()?;
        if volume.mounted()? {
            return Err(StorageError::Mounted(old.to_string()));
        }
        let to = self.volumes_dir().join(new);
        sys::rename_noreplace(volume.dir(), &to).map_err(|e| match e.raw_os_error() {
            Some(libc::EEXIST) | Some(libc::ENOTEMPTY) => StorageError::VolumeExists(new.to_string()),
            _ => StorageError::io("rename", volume.dir(), e),
        })?;
        sys::fsync_dir(&self.volumes_dir()).map_err(|e| StorageError::io("fsync", self.volumes_dir(), e))
    }
}

/// Creates the pool directories and returns the canonical root.
fn prepare(root: &Path) -> Result<PathBuf, StorageError> {
    for dir in ["volumes", "tmp"] {
        let path = root.join(dir);
        fs::create_dir_all(&path).map_err(|e| StorageError::io("create directory", &path, e))?;
    }
    fs::canonicalize(root).map_err(|e| StorageError::io("resolve", root, e))
}

/// Sorted names of the entries of `dir` that follow the naming rule (skipping anything else).
pub(crate) fn list_names(dir: &Path) -> Result<Vec<String>, StorageError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| StorageError::io("list", dir, e))? {
        let entry = entry.map_err(|e| StorageError::io("list", dir, e))?;
        if let Some(name) = entry.file_name().to_str() {
            if validate_name("volume", name).is_ok() {
                names.push(name.to_string());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Creates directory `path` with the owner and mode of `like` (the overlay's root directory is the upper one's).
fn mkdir_like(path: &Path, like: &Path) -> Result<(), StorageError> {
    let meta = fs::metadata(like).map_err(|e| StorageError::io("stat", like, e))?;
    fsops::mkdir(path)?;
    std::os::unix::fs::chown(path, Some(meta.uid()), Some(meta.gid()))
        .map_err(|e| StorageError::io("chown", path, e))?;
    fs::set_permissions(path, meta.permissions()).map_err(|e| StorageError::io("chmod", path, e))
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Mounts an overlay under `tmp/` with the options volumes use, then deletes a lower file and writes a new one through
/// it (whiteouts need mknod and trusted xattrs on the upper filesystem).
fn probe_overlay(root: &Path) -> Result<(), String> {
    let probe = TempDir::new(&root.join("tmp"), "probe-overlay").map_err(|e| e.to_string())?;
    let dir = probe.path();
    let [lower, upper, work, merged] = ["lower", "upper", "work", "merged"].map(|d| dir.join(d));
    for d in [&lower, &upper, &work, &merged] {
        fs::create_dir(d).map_err(|e| format!("create {}: {e}", d.display()))?;
    }
    fs::write(lower.join("gone"), b"lower").map_err(|e| format!("write probe file: {e}"))?;
    let options = overlay_options(&lower, &upper, &work, &merged).map_err(|e| e.to_string())?;
    sys::mount("overlay", &merged, Some("overlay"), libc::MS_NODEV | libc::MS_NOSUID, Some(&options))
        .map_err(|e| format!("mount overlay: {e}"))?;
    let used = fs::remove_file(merged.join("gone"))
        .map_err(|e| format!("delete a lower file through overlay: {e}"))
        .and_then(|()| {
            let mut f = fs::File::create(merged.join("new")).map_err(|e| format!("create through overlay: {e}"))?;
            f.write_all(b"upper").map_err(|e| format!("write through overlay: {e}"))
        });
    if sys::umount(&merged, 0).is_err() {
        sys::umount(&merged, libc::MNT_DETACH).map_err(|e| format!("unmount probe overlay: {e}"))?;
    }
    used?;
    match lower.join("gone").exists() && upper.join("new").exists() {
        true => Ok(()),
        false => Err("overlay wrote to its lower layer or not to its upper layer".into()),
    }
}

/// Clones a small file under `tmp/` with FICLONE.
fn probe_reflink(root: &Path) -> Result<(), String> {
    let probe = TempDir::new(&root.join("tmp"), "probe-reflink").map_err(|e| e.to_string())?;
    let src_path = probe.path().join("src");
    fs::write(&src_path, [0x5a; 4096]).map_err(|e| format!("write probe file: {e}"))?;
    let src = fs::File::open(&src_path).map_err(|e| format!("open probe file: {e}"))?;
    let dst = fs::File::create(probe.path().join("dst")).map_err(|e| format!("create probe file: {e}"))?;
    sys::ficlone(&src, &dst).map_err(|e| format!("FICLONE: {e}"))
}
