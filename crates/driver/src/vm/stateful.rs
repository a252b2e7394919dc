//! Stateful snapshots of thin VMs: the disk snapshot of the instance's
//! volume plus the VM's memory and device state, saved by its monitor
//! (skiff-vmm's `vm.snapshot` and the monitor's `run.json`), and VMs started
//! from them.
//!
//! ```text
//! INSTANCE_DIR/snapshots/SNAP/   state, memory, run.json   (a stateful snapshot)
//! INSTANCE_DIR/saved-state/      the same, hard-linked     (a copy's: its next start restores it)
//!
//! save:    pause ─► volume snapshot ─► monitor snapshot into snapshots/.SNAP.partial ─► rename ─► resume
//! restore: (stopped) volume snapshot "undo" ─► volume restore SNAP ─► launch with restore=snapshots/SNAP
//!          ─► on failure: volume back from "undo"; "undo" deleted either way
//! copy:    new volume from the snapshot's disk state ─► snapshots/SNAP linked to NEW/saved-state
//! start:   saved-state/ present ─► launch with restore=saved-state ─► removed once running
//! ```
//!
//! Memory files are hard-linked, not copied: a copy costs no disk. (A thin
//! VM has virtio-fs, so skiff-vmm restores it into a memfd filled from the
//! file's data ranges: restored VMs do not share guest pages.)

use std::path::{Path, PathBuf};

use skiff_run::monitor::{self, ControlRequest, SAVED_RUN};

use super::VmDriver;
use crate::{volumes, DriverError, InstanceSpec};

/// Where an instance's stateful snapshots are, in its directory.
const SNAPSHOTS: &str = "snapshots";
/// The state a copy starts from.
const SAVED: &str = "saved-state";

fn host(what: String) -> impl FnOnce(std::io::Error) -> DriverError {
    move |e| DriverError::Host(format!("{what}: {e}"))
}

/// The directory of snapshot `snap`'s memory and device state.
pub(super) fn snapshot_dir(inst: &InstanceSpec, snap: &str) -> PathBuf {
    inst.dir.join(SNAPSHOTS).join(snap)
}

/// Whether `dir` holds a whole saved VM (`run.json` is written last).
pub(super) fn is_saved(dir: &Path) -> bool {
    dir.join(SAVED_RUN).is_file()
}

/// The state the instance's next start restores, if any.
pub(super) fn saved_state(inst: &InstanceSpec) -> Option<PathBuf> {
    let dir = inst.dir.join(SAVED);
    is_saved(&dir).then_some(dir)
}

/// Removes snapshot `snap`'s state, if it has one.
pub(super) fn delete(inst: &InstanceSpec, snap: &str) -> Result<(), DriverError> {
    let dir = snapshot_dir(inst, snap);
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(host(format!("removing {}", dir.display()))(e)),
        _ => Ok(()),
    }
}

/// Renames snapshot `old`'s state, if it has one.
pub(super) fn rename(inst: &InstanceSpec, old: &str, new: &str) -> Result<(), DriverError> {
    let from = snapshot_dir(inst, old);
    if !from.exists() {
        return Ok(());
    }
    let to = snapshot_dir(inst, new);
    std::fs::rename(&from, &to).map_err(host(format!("renaming {} to {}", from.display(), to.display())))
}

/// Hard-links every file of `src` into the new directory `dst` (copies
/// where a link is not possible); on failure `dst` is removed.
fn link_tree(src: &Path, dst: &Path) -> Result<(), DriverError> {
    let result = (|| {
        std::fs::create_dir(dst)?;
        for entry in std::fs::read_dir(src)? {
            let entry = entry?;
            if !entry.file_type()?.is_file() {
                continue;
            }
            let to = dst.join(entry.file_name());
            if std::fs::hard_link(entry.path(), &to).is_err() {
                std::fs::copy(entry.path(), &to)?;
            }
        }
        Ok(())
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_dir_all(dst);
        host(format!("linking {} to {}", src.display(), dst.display()))(e)
    })
}

/// A volume snapshot name of Skiff's own, for undoing a restore.
fn undo_name() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("skiff-undo-restore-{nanos}")
}

impl VmDriver {
    /// Takes stateful snapshot `snap` of the running instance.
    pub(super) async fn save(&self, inst: &InstanceSpec, snap: &str, keep_paused: bool) -> Result<(), DriverError> {
        let handle = self.monitor(inst)?;
        let dir = snapshot_dir(inst, snap);
        let parent = inst.dir.join(SNAPSHOTS);
        let partial = parent.join(format!(".{snap}.partial"));
        // Leftovers of a save that died half-way (the daemon knows no such snapshot).
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&parent).map_err(host(format!("creating {}", parent.display())))?;
        handle.change(ControlRequest::Pause).await?;
        // Paused: the disk and the memory are saved at the same instant.
        let saved = async {
            volumes::snapshot_create(&self.pool, &inst.name, snap).await?;
            let memory = match handle.snapshot(&partial).await {
                Ok(()) => std::fs::rename(&partial, &dir).map_err(host(format!("renaming {}", partial.display()))),
                Err(e) => Err(e.into()),
            };
            if memory.is_err() {
                let _ = volumes::snapshot_delete(&self.pool, &inst.name, snap).await;
            }
            memory
        }
        .await;
        if saved.is_err() {
            let _ = std::fs::remove_dir_all(&partial);
        }
        let resumed =
            if keep_paused { Ok(()) } else { handle.change(ControlRequest::Resume).await.map_err(DriverError::from) };
        saved.and(resumed)
    }

    /// Restores stateful snapshot `snap` into the stopped instance.
    pub(super) async fn restore(&self, inst: &InstanceSpec, snap: &str) -> Result<(), DriverError> {
        if monitor::attach(&self.runtime_dir(inst)).is_ok() {
            return Err(DriverError::Running(inst.name.clone()));
        }
        let dir = snapshot_dir(inst, snap);
        if !is_saved(&dir) {
            return Err(DriverError::Unsupported(format!(
                "snapshot {snap} of {} has no memory state (it was taken without --stateful): restore it without \
                 --stateful",
                inst.name
            )));
        }
        skiff_run::vm::check_snapshot_dir(&dir).map_err(|e| DriverError::Monitor(e.into()))?;
        let undo = undo_name();
        volumes::unmount(&self.pool, &inst.name).await?;
        volumes::snapshot_create(&self.pool, &inst.name, &undo).await?;
        let result = async {
            volumes::snapshot_restore(&self.pool, &inst.name, snap).await?;
            self.launch(inst, Some(dir)).await
        }
        .await;
        if result.is_err() {
            // Back to the disk as it was; the launch unmounted the volume.
            if let Err(e) = volumes::snapshot_restore(&self.pool, &inst.name, &undo).await {
                log::warn!("{}: putting the disk back after a failed restore: {e}", inst.name);
            }
        }
        let _ = volumes::snapshot_delete(&self.pool, &inst.name, &undo).await;
        result
    }

    /// Starts the instance from the state a copy gave it; the state goes
    /// once the VM runs (it keeps what it needs of the memory file).
    pub(super) async fn start_saved(&self, inst: &InstanceSpec, dir: PathBuf) -> Result<(), DriverError> {
        self.launch(inst, Some(dir.clone())).await?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    /// Makes `new`'s volume (and with `stateful` its saved state) from
    /// `source`'s snapshot `snap`.
    pub(super) async fn copy(
        &self,
        source: &InstanceSpec,
        snap: &str,
        new: &InstanceSpec,
        stateful: bool,
    ) -> Result<(), DriverError> {
        let from = snapshot_dir(source, snap);
        if stateful && !is_saved(&from) {
            return Err(DriverError::Unsupported(format!(
                "snapshot {snap} of {} has no memory state (it was taken without --stateful): copy it stateless",
                source.name
            )));
        }
        std::fs::create_dir_all(&new.dir).map_err(host(format!("creating {}", new.dir.display())))?;
        let (pool, src, name, s) = (self.pool.clone(), self.volume(source)?, new.name.clone(), snap.to_string());
        volumes::blocking(move || pool.create_from_snapshot(&name, &src, &s).map(drop)).await?;
        if stateful {
            if let Err(e) = link_tree(&from, &new.dir.join(SAVED)) {
                let _ = volumes::delete(&self.pool, &new.name).await;
                return Err(e);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_tree_links_files_and_leaves_nothing_on_failure() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("memory"), b"mem").unwrap();
        std::fs::write(src.join(SAVED_RUN), b"{}").unwrap();
        std::fs::create_dir(src.join("sub")).unwrap();
        let dst = d.path().join("dst");
        link_tree(&src, &dst).unwrap();
        use std::os::unix::fs::MetadataExt;
        let (a, b) = (std::fs::metadata(src.join("memory")).unwrap(), std::fs::metadata(dst.join("memory")).unwrap());
        assert_eq!(a.ino(), b.ino(), "linked, not copied");
        assert!(is_saved(&dst) && !dst.join("sub").exists());
        // dst exists now: a second link fails and removes it.
        assert!(link_tree(&src, &dst).is_err());
        assert!(!dst.exists());
    }
}
