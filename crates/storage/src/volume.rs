//! A volume: one instance's root filesystem, its mount, and its snapshots.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::fsops::{self, Reflink, TempDir};
use crate::idmap::{self, IdMap};
use crate::name::validate_name;
use crate::pool::{list_names, unix_now};
use crate::{sys, Backend, StorageError};

/// The volume's metadata file, in the volume directory.
pub(crate) const VOLUME_META: &str = "volume.json";
/// A snapshot's metadata file, in the snapshot directory.
const SNAPSHOT_META: &str = "snapshot.json";
/// Mounts stacked on one rootfs that `unmount` peels off before giving up.
const MAX_STACKED_MOUNTS: usize = 16;

/// What `volume.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct VolumeMeta {
    /// The backend the volume was made with (it keeps it even if the pool's changes).
    pub backend: Backend,
    /// The canonical path of the image rootfs (the overlay's lower layer; only read).
    pub image: PathBuf,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapshotMeta {
    created: u64,
}

/// A snapshot of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Its name.
    pub name: String,
    /// When it was taken (second resolution).
    pub created: SystemTime,
}

/// One instance's root filesystem in a [`crate::Pool`]. A handle names the volume by path: after `Pool::rename`,
/// open it again under its new name.
#[derive(Debug, Clone)]
pub struct Volume {
    name: String,
    dir: PathBuf,
    tmp: PathBuf,
    meta: VolumeMeta,
}

/// The overlayfs options string for a mount of `upper` over `lower` at `target`, checked for characters the kernel
/// would split on and for mount(2)'s one-page limit.
pub(crate) fn overlay_options(lower: &Path, upper: &Path, work: &Path, target: &Path) -> Result<String, StorageError> {
    let mut parts = Vec::new();
    for (key, path) in [("lowerdir", lower), ("upperdir", upper), ("workdir", work)] {
        let text =
            path.to_str().ok_or_else(|| StorageError::UnsafeMountPath { path: path.to_path_buf(), ch: '\u{fffd}' })?;
        if let Some(ch) = text.chars().find(|c| matches!(c, ',' | ':' | '\\' | '\n')) {
            return Err(StorageError::UnsafeMountPath { path: path.to_path_buf(), ch });
        }
        parts.push(format!("{key}={text}"));
    }
    // index=off: snapshots and restores copy upper layers around, which the index would take for corruption.
    // metacopy=off: every copied-up file carries its data in the upper layer, so a snapshot of it is complete.
    parts.push("index=off,metacopy=off".to_string());
    let options = parts.join(",");
    let max = sys::page_size() - 1;
    if options.len() > max {
        return Err(StorageError::OptionsTooLong { target: target.to_path_buf(), len: options.len(), max });
    }
    Ok(options)
}

fn not_found(e: &StorageError) -> bool {
    matches!(e, StorageError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
}

impl Volume {
    pub(crate) fn new(name: String, dir: PathBuf, tmp: PathBuf, meta: VolumeMeta) -> Volume {
        Volume { name, dir, tmp, meta }
    }

    /// The volume's (instance's) name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The backend this volume was made with.
    pub fn backend(&self) -> Backend {
        self.meta.backend
    }

    /// The image rootfs the volume was made from.
    pub fn image(&self) -> &Path {
        &self.meta.image
    }

    /// The volume's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the volume is mounted (whether it is now or not).
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Mounts the image id-mapped at `<volume>/lower` and gives the upper layer's top directory to the mapped root.
    fn mapped_lower(&self, map: IdMap) -> Result<PathBuf, StorageError> {
        let lower = self.dir.join("lower");
        fs::create_dir_all(&lower).map_err(|e| StorageError::io("create directory", &lower, e))?;
        let _ = sys::umount(&lower, libc::MNT_DETACH);
        idmap::idmapped_bind(&self.meta.image, &lower, map)
            .map_err(|e| StorageError::io("id-mapped mount of the image on", &lower, e))?;
        let state = self.state();
        std::os::unix::fs::lchown(&state, Some(map.host_base), Some(map.host_base))
            .map_err(|e| StorageError::io("chown", &state, e))?;
        Ok(lower)
    }

    fn snapshot_dir(&self, snap: &str) -> PathBuf {
        self.dir.join("snapshots").join(snap)
    }

    /// Takes the volume's lock (an flock on its directory, so it also excludes other processes) for the length of
    /// an operation.
    pub(crate) fn lock(&self) -> Result<fs::File, StorageError> {
        sys::flock_exclusive(&self.dir, true).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StorageError::VolumeNotFound(self.name.clone()),
            _ => StorageError::io("lock", &self.dir, e),
        })
    }

    /// Mounts the volume if it is not mounted and returns the directory to serve as the instance's root
    /// (`<volume>/rootfs`). Idempotent: an existing mount (e.g. left by a previous daemon, it is a kernel mount) is
    /// found in /proc/self/mountinfo and reused. Overlay volumes mount overlayfs (image below, `state/` above);
    /// copy volumes bind-mount `state/`. Either way the mount is nodev and nosuid on the host (the guest, through
    /// virtiofsd, still sees and creates device nodes and setuid files as usual).
    pub fn mount(&self) -> Result<PathBuf, StorageError> {
        self.mount_mapped(None)
    }

    /// [`Volume::mount`] for an unprivileged container whose ids are `map`: the image layer is an id-mapped mount
    /// (`<volume>/lower`, see [`crate::idmap`]), so the image's root-owned files belong to the container's root,
    /// and the upper layer's top directory belongs to it too; what the container writes lands with its mapped ids.
    /// Overlay volumes only (the copy backends would need every file chowned).
    pub fn mount_mapped(&self, map: Option<IdMap>) -> Result<PathBuf, StorageError> {
        let _lock = self.lock()?;
        let rootfs = self.rootfs();
        if self.mounted()? {
            return Ok(rootfs);
        }
        if map.is_some() && self.meta.backend != Backend::Overlay {
            return Err(StorageError::IdmapUnsupported { volume: self.name.clone(), backend: self.meta.backend });
        }
        fs::create_dir_all(&rootfs).map_err(|e| StorageError::io("create directory", &rootfs, e))?;
        match self.meta.backend {
            Backend::Overlay => {
                let work = self.dir.join("work");
                fs::create_dir_all(&work).map_err(|e| StorageError::io("create directory", &work, e))?;
                if !self.meta.image.is_dir() {
                    return Err(StorageError::BadImage { path: self.meta.image.clone() });
                }
                let lower = match map {
                    Some(map) => self.mapped_lower(map)?,
                    None => self.meta.image.clone(),
                };
                let options = overlay_options(&lower, &self.state(), &work, &rootfs)?;
                let flags = libc::MS_NODEV | libc::MS_NOSUID;
                let mounted = sys::mount("skiff", &rootfs, Some("overlay"), flags, Some(&options));
                if map.is_some() {
                    // overlayfs holds its own reference to the layer: the mapped mount can go at once.
                    let _ = sys::umount(&lower, libc::MNT_DETACH);
                }
                mounted.map_err(|source| StorageError::MountOverlay { target: rootfs.clone(), options, source })?;
            }
            Backend::Reflink | Backend::Copy => {
                sys::bind_mount(&self.state(), &rootfs).map_err(|e| StorageError::io("bind-mount on", &rootfs, e))?
            }
        }
        Ok(rootfs)
    }

    /// Unmounts the volume; nothing to do if it is not mounted. If the mount is busy (say virtiofsd still runs), it
    /// is detached lazily and `Busy` is returned: the volume is no longer mounted in this namespace, but its
    /// filesystem lives on until its users exit (and overlayfs refuses a new mount of the same layers until then).
    pub fn unmount(&self) -> Result<(), StorageError> {
        let _lock = self.lock()?;
        self.unmount_locked()
    }

    fn unmount_locked(&self) -> Result<(), StorageError> {
        let rootfs = self.rootfs();
        let mut detached = false;
        for _ in 0..MAX_STACKED_MOUNTS {
            if !self.mounted()? {
                return match detached {
                    true => Err(StorageError::Busy { path: rootfs }),
                    false => Ok(()),
                };
            }
            match sys::umount(&rootfs, 0) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    log::warn!("{} is busy; detaching it lazily", rootfs.display());
                    sys::umount(&rootfs, libc::MNT_DETACH).map_err(|e| StorageError::io("detach", &rootfs, e))?;
                    detached = true;
                }
                Err(e) => return Err(StorageError::io("unmount", &rootfs, e)),
            }
        }
        Err(StorageError::io("unmount", &rootfs, std::io::Error::other("still mounted after unmounting repeatedly")))
    }

    /// Whether the volume's rootfs is a mount point now (per /proc/self/mountinfo; `false`, with a warning logged, if
    /// the mount table cannot be read: operations that depend on the answer fail instead).
    pub fn is_mounted(&self) -> bool {
        self.mounted().unwrap_or_else(|e| {
            log::warn!("{e}");
            false
        })
    }

    pub(crate) fn mounted(&self) -> Result<bool, StorageError> {
        let rootfs = self.rootfs();
        let mounts = sys::mount_points().map_err(|e| StorageError::io("read mount table for", &rootfs, e))?;
        Ok(mounts.contains(&rootfs))
    }

    /// Takes snapshot `snap`: a copy (reflinked where the filesystem can) of the instance's own state, i.e. the
    /// overlay's upper layer (whiteouts and opaque markers included) or the whole tree for copy backends. Works
    /// mounted or not; for a consistent snapshot the instance should be stopped or frozen. Crash-safe: built in
    /// `tmp/`, renamed into place at the end.
    pub fn snapshot_create(&self, snap: &str) -> Result<(), StorageError> {
        validate_name("snapshot", snap)?;
        let _lock = self.lock()?;
        let dest = self.snapshot_dir(snap);
        let exists = || StorageError::SnapshotExists { volume: self.name.clone(), snapshot: snap.to_string() };
        if fs::symlink_metadata(&dest).is_ok() {
            return Err(exists());
        }
        let build = TempDir::new(&self.tmp, &format!("snapshot-{}-{snap}", self.name))?;
        fsops::copy_tree(&self.state(), &build.path().join("state"), Reflink::Auto)?;
        fsops::write_json(&build.path().join(SNAPSHOT_META), &SnapshotMeta { created: unix_now() })?;
        sys::syncfs(build.path()).map_err(|e| StorageError::io("syncfs", build.path(), e))?;
        sys::rename_noreplace(build.path(), &dest).map_err(|e| match e.raw_os_error() {
            Some(libc::EEXIST) | Some(libc::ENOTEMPTY) => exists(),
            _ => StorageError::io("rename into place", &dest, e),
        })?;
        let parent = self.dir.join("snapshots");
        sys::fsync_dir(&parent).map_err(|e| StorageError::io("fsync", &parent, e))
    }

    /// Replaces the volume's state with a copy of snapshot `snap` (the snapshot stays). The volume must be unmounted
    /// (`Mounted` otherwise). The copy is made in `tmp/` and swapped in with one atomic exchange, so a crash leaves
    /// either the old state or the new one in place (and the other in `tmp/` for `cleanup_partial`).
    pub fn snapshot_restore(&self, snap: &str) -> Result<(), StorageError> {
        validate_name("snapshot", snap)?;
        let _lock = self.lock()?;
        if self.mounted()? {
            return Err(StorageError::Mounted(self.name.clone()));
        }
        let source = self.snapshot_state(snap)?;
        self.replace_state(&source, &format!("restore-{}-{snap}", self.name))
    }

    /// The state directory of snapshot `snap` (`SnapshotNotFound` if there is none).
    pub(crate) fn snapshot_state(&self, snap: &str) -> Result<PathBuf, StorageError> {
        validate_name("snapshot", snap)?;
        let source = self.snapshot_dir(snap).join("state");
        if !source.is_dir() {
            return Err(StorageError::SnapshotNotFound { volume: self.name.clone(), snapshot: snap.to_string() });
        }
        Ok(source)
    }

    /// Replaces the (unmounted) volume's state with a copy of `source`: made in `tmp/` and swapped in with one
    /// atomic exchange, so a crash leaves either the old state or the new one in place.
    pub(crate) fn replace_state(&self, source: &Path, what: &str) -> Result<(), StorageError> {
        let build = TempDir::new(&self.tmp, what)?;
        let new_state = build.path().join("state");
        fsops::copy_tree(source, &new_state, Reflink::Auto)?;
        sys::syncfs(build.path()).map_err(|e| StorageError::io("syncfs", build.path(), e))?;
        sys::rename_exchange(&new_state, &self.state()).map_err(|e| StorageError::io("swap in", self.state(), e))?;
        sys::fsync_dir(&self.dir).map_err(|e| StorageError::io("fsync", &self.dir, e))?;
        // The overlay work directory belonged to the old upper layer: start the new one with an empty one (`mount`
        // recreates it if a crash comes between these two steps).
        let work = self.dir.join("work");
        if work.exists() {
            sys::rename_noreplace(&work, &build.path().join("work")).map_err(|e| StorageError::io("move", &work, e))?;
            fsops::mkdir(&work)?;
        }
        fsops::remove_tree(build.path())
    }

    /// Deletes snapshot `snap`.
    pub fn snapshot_delete(&self, snap: &str) -> Result<(), StorageError> {
        validate_name("snapshot", snap)?;
        let _lock = self.lock()?;
        let dir = self.snapshot_dir(snap);
        if fs::symlink_metadata(&dir).is_err() {
            return Err(StorageError::SnapshotNotFound { volume: self.name.clone(), snapshot: snap.to_string() });
        }
        let trash = TempDir::new(&self.tmp, &format!("snapdelete-{}-{snap}", self.name))?;
        sys::rename_noreplace(&dir, &trash.path().join(snap)).map_err(|e| StorageError::io("move", &dir, e))?;
        fsops::remove_tree(trash.path())
    }

    /// Renames snapshot `old` to `new` (`SnapshotNotFound`, `SnapshotExists`).
    pub fn snapshot_rename(&self, old: &str, new: &str) -> Result<(), StorageError> {
        validate_name("snapshot", old)?;
        validate_name("snapshot", new)?;
        let _lock = self.lock()?;
        let from = self.snapshot_dir(old);
        if fs::symlink_metadata(&from).is_err() {
            return Err(StorageError::SnapshotNotFound { volume: self.name.clone(), snapshot: old.to_string() });
        }
        sys::rename_noreplace(&from, &self.snapshot_dir(new)).map_err(|e| match e.raw_os_error() {
            Some(libc::EEXIST) | Some(libc::ENOTEMPTY) => {
                StorageError::SnapshotExists { volume: self.name.clone(), snapshot: new.to_string() }
            }
            _ => StorageError::io("rename", &from, e),
        })?;
        let parent = self.dir.join("snapshots");
        sys::fsync_dir(&parent).map_err(|e| StorageError::io("fsync", &parent, e))
    }

    /// The volume's snapshots, sorted by name.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>, StorageError> {
        let mut out = Vec::new();
        for name in list_names(&self.dir.join("snapshots"))? {
            let meta: SnapshotMeta = match fsops::read_json(&self.snapshot_dir(&name).join(SNAPSHOT_META)) {
                Err(e) if not_found(&e) => continue, // renamed or deleted meanwhile
                other => other?,
            };
            out.push(SnapshotInfo { name, created: SystemTime::UNIX_EPOCH + Duration::from_secs(meta.created) });
        }
        Ok(out)
    }

    /// Unmounts the volume (a busy mount is detached lazily, as in [`Volume::unmount`], and the deletion goes on)
    /// and removes it with its snapshots. Crash-safe: the volume is first moved into `tmp/`.
    pub fn delete(self) -> Result<(), StorageError> {
        let _lock = self.lock()?;
        match self.unmount_locked() {
            Err(StorageError::Busy { path }) => {
                log::warn!("deleting volume {} while {} is still in use", self.name, path.display())
            }
            other => other?,
        }
        let trash = TempDir::new(&self.tmp, &format!("delete-{}", self.name))?;
        sys::rename_noreplace(&self.dir, &trash.path().join("volume"))
            .map_err(|e| StorageError::io("move", &self.dir, e))?;
        let parent = self.dir.parent().unwrap_or(&self.dir);
        sys::fsync_dir(parent).map_err(|e| StorageError::io("fsync", parent, e))?;
        fsops::remove_tree(trash.path())
    }

    /// Bytes the volume takes on disk: its state, snapshots and metadata (not the image; reflinked extents are
    /// counted in full).
    pub fn usage_bytes(&self) -> Result<u64, StorageError> {
        let parts = [self.state(), self.dir.join("work"), self.dir.join("snapshots"), self.dir.join(VOLUME_META)];
        fsops::usage_bytes(&parts)
    }
}
