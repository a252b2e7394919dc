//! Full OS VMs: an instance of a disk image ([`ImageKind::Disk`]) is a
//! qcow2 overlay over the image's read-only base in the image store and a
//! UEFI variable store of its own, booted through the firmware by the
//! monitor's full-OS mode (`LaunchSpec::os`); no volume, no virtiofsd.
//!
//! ```text
//! INSTANCE_DIR/os/root.qcow2              the overlay (backing: the base, format recorded)
//! INSTANCE_DIR/os/vars.fd                 OVMF's variables (made by skiff-vmm at first boot)
//! INSTANCE_DIR/os/snapshots/SNAP/         copies of both (reflinked where the file system can)
//! INSTANCE_DIR/os/.partial-*              a snapshot or restore being made; removed when found
//!
//! create:   disk_image::create_overlay (leaves nothing on failure; the daemon removes
//!           INSTANCE_DIR when a create fails or skiffd died during one)
//! start:    LaunchSpec { os: firmware, vars, overlay } → monitor::launch (returns at the agent's ready)
//! stop:     the monitor presses the ACPI power button, waits the timeout, then kills
//! snapshot: (stopped) copy into .partial-SNAP → rename to snapshots/SNAP
//! restore:  (stopped) copy snapshots/SNAP into .partial-restore → rename over root.qcow2, vars.fd
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

use skiff_run::monitor::{self, LaunchSpec};
use skiff_run::vm::OsBoot;

use super::{VmDriver, BOOT_TIMEOUT_SECS};
use crate::{config, DriverError, ImageKind, InstanceSpec};

/// The overlay's file name.
const ROOT: &str = "root.qcow2";
/// The variable store's file name.
const VARS: &str = "vars.fd";
/// Memory of a full OS VM without `limits.memory` (a whole distribution
/// boots in it; a thin VM's default is smaller).
pub const DEFAULT_OS_MEMORY_MIB: u64 = 1024;
/// Seconds a firmware, a bootloader and a whole init may take to bring the
/// agent up.
const OS_BOOT_TIMEOUT_SECS: u64 = 300;

fn host(what: String) -> impl FnOnce(std::io::Error) -> DriverError {
    move |e| DriverError::Host(format!("{what}: {e}"))
}

/// The directory of a full OS VM's disk and variables.
fn os_dir(inst: &InstanceSpec) -> PathBuf {
    inst.dir.join("os")
}

fn snapshot_dir(inst: &InstanceSpec, snap: &str) -> PathBuf {
    os_dir(inst).join("snapshots").join(snap)
}

/// Whether the instance is a full OS VM (of a disk image).
pub(super) fn is_os(inst: &InstanceSpec) -> bool {
    matches!(inst.image_kind, ImageKind::Disk(_))
}

/// Makes the instance's overlay over its image's base.
pub(super) async fn create(inst: &InstanceSpec) -> Result<(), DriverError> {
    let ImageKind::Disk(format) = inst.image_kind else {
        return Err(DriverError::Image("not a disk image".into()));
    };
    let dir = os_dir(inst);
    std::fs::create_dir_all(&dir).map_err(host(format!("creating {}", dir.display())))?;
    let (base, overlay) = (inst.image_rootfs.clone(), dir.join(ROOT));
    tokio::task::spawn_blocking(move || disk_image::create_overlay(&overlay, &base, format))
        .await
        .map_err(|e| DriverError::Host(format!("overlay task: {e}")))?
        .map_err(|e| DriverError::Image(format!("making the instance's disk: {}", monitor::error_chain(&e))))
}

/// Copies `from` to `to` (reflinked where the file system can, sparse).
fn copy_file(from: &Path, to: &Path) -> Result<(), DriverError> {
    let out = Command::new("cp")
        .args(["--reflink=auto", "--sparse=always", "--"])
        .arg(from)
        .arg(to)
        .output()
        .map_err(host("running cp".into()))?;
    if !out.status.success() {
        return Err(DriverError::Host(format!(
            "copying {} to {}: {}",
            from.display(),
            to.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Copies the overlay and the variable store (if the VM has booted once)
/// from `from` into the new directory `to`.
fn copy_disk_state(from: &Path, to: &Path) -> Result<(), DriverError> {
    std::fs::create_dir(to).map_err(host(format!("creating {}", to.display())))?;
    let result = (|| {
        copy_file(&from.join(ROOT), &to.join(ROOT))?;
        if from.join(VARS).is_file() {
            copy_file(&from.join(VARS), &to.join(VARS))?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(to);
    }
    result
}

/// Removes what an interrupted snapshot or restore left.
fn remove_partial(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(".partial-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DriverError> + Send + 'static,
) -> Result<T, DriverError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| DriverError::Host(format!("disk task: {e}")))?
}

/// Snapshots the stopped VM's disk and variables.
pub(super) async fn snapshot_create(inst: &InstanceSpec, snap: &str) -> Result<(), DriverError> {
    let (dir, target) = (os_dir(inst), snapshot_dir(inst, snap));
    blocking(move || {
        remove_partial(&dir);
        if target.exists() {
            return Err(DriverError::Host(format!("snapshot {} exists", target.display())));
        }
        let partial = dir.join(format!(".partial-{}", target.file_name().unwrap_or_default().to_string_lossy()));
        copy_disk_state(&dir, &partial)?;
        let parent = dir.join("snapshots");
        std::fs::create_dir_all(&parent).map_err(host(format!("creating {}", parent.display())))?;
        std::fs::rename(&partial, &target).map_err(|e| {
            let _ = std::fs::remove_dir_all(&partial);
            DriverError::Host(format!("renaming into {}: {e}", target.display()))
        })
    })
    .await
}

/// Puts the stopped VM's disk and variables back as snapshot `snap` had them.
pub(super) async fn snapshot_restore(inst: &InstanceSpec, snap: &str) -> Result<(), DriverError> {
    let (dir, source) = (os_dir(inst), snapshot_dir(inst, snap));
    blocking(move || {
        remove_partial(&dir);
        if !source.join(ROOT).is_file() {
            return Err(DriverError::Host(format!("snapshot {} has no disk", source.display())));
        }
        let partial = dir.join(".partial-restore");
        copy_disk_state(&source, &partial)?;
        let result = (|| {
            // The variables first: a crash between the two renames leaves
            // the old disk with the snapshot's variables, both bootable.
            match partial.join(VARS).is_file() {
                true => std::fs::rename(partial.join(VARS), dir.join(VARS)),
                false => std::fs::remove_file(dir.join(VARS)).or_else(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => Ok(()),
                    _ => Err(e),
                }),
            }
            .map_err(host(format!("restoring {}", dir.join(VARS).display())))?;
            std::fs::rename(partial.join(ROOT), dir.join(ROOT))
                .map_err(host(format!("restoring {}", dir.join(ROOT).display())))
        })();
        let _ = std::fs::remove_dir_all(&partial);
        result
    })
    .await
}

/// Deletes snapshot `snap`.
pub(super) async fn snapshot_delete(inst: &InstanceSpec, snap: &str) -> Result<(), DriverError> {
    let target = snapshot_dir(inst, snap);
    blocking(move || match std::fs::remove_dir_all(&target) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(DriverError::Host(format!("deleting {}: {e}", target.display())))
        }
        _ => Ok(()),
    })
    .await
}

/// Renames snapshot `old` to `new`.
pub(super) fn snapshot_rename(inst: &InstanceSpec, old: &str, new: &str) -> Result<(), DriverError> {
    let (from, to) = (snapshot_dir(inst, old), snapshot_dir(inst, new));
    if to.exists() {
        return Err(DriverError::Host(format!("snapshot {} exists", to.display())));
    }
    std::fs::rename(&from, &to).map_err(host(format!("renaming {}", from.display())))
}

/// Removes the VM's disk, variables and snapshots.
pub(super) fn delete(inst: &InstanceSpec) -> Result<(), DriverError> {
    match std::fs::remove_dir_all(os_dir(inst)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(DriverError::Host(format!("deleting {}: {e}", os_dir(inst).display())))
        }
        _ => Ok(()),
    }
}

/// `limits.cpu`, `limits.memory`, with a full OS VM's default memory.
fn os_resources(inst: &InstanceSpec) -> Result<(u8, u64), DriverError> {
    let (cpus, memory) = config::resources(&inst.config)?;
    let memory = if inst.config.contains_key("limits.memory") { memory } else { DEFAULT_OS_MEMORY_MIB };
    Ok((cpus, memory))
}

impl VmDriver {
    /// The monitor's spec for a full OS VM; `seed` is its cloud-init
    /// NoCloud disk, if it has one ([`super::seed`]).
    fn os_spec(&self, inst: &InstanceSpec, seed: Option<PathBuf>) -> Result<LaunchSpec, DriverError> {
        let ImageKind::Disk(_) = inst.image_kind else {
            return Err(DriverError::Image("not a disk image".into()));
        };
        if let Some(name) = inst.devices.iter().find_map(|(n, d)| {
            (d.get("type").map(String::as_str) == Some("disk") && d.get("path").map(String::as_str) != Some("/"))
                .then_some(n)
        }) {
            return Err(DriverError::Unsupported(format!(
                "device {name:?}: disks and shares of full OS VMs are not supported yet"
            )));
        }
        let (cpus, memory_mib) = os_resources(inst)?;
        let dir = os_dir(inst);
        let mut main: skiff_agent_proto::MainProcess =
            serde_json::from_value(serde_json::json!({"args": ["/sbin/init"]}))
                .map_err(|e| DriverError::Host(format!("main process: {e}")))?;
        // The stop timeout's default when the caller gives none (SIGTERM
        // to the monitor): the guest's whole shutdown.
        main.stop_timeout_secs = 60;
        Ok(LaunchSpec {
            name: inst.name.clone(),
            runtime_dir: self.runtime_dir(inst),
            rootfs: dir.clone(),
            shares: vec![],
            kernel: None,
            initramfs: None,
            agent: None,
            vmm: self.cfg.vmm.clone(),
            virtiofsd: None,
            monitor_program: self.cfg.monitor_program.clone(),
            cpus,
            max_cpus: None,
            memory_mib,
            memory_hotplug_mib: 0,
            devices: vec![],
            hostname: Some(inst.name.clone()),
            boot_timeout_secs: OS_BOOT_TIMEOUT_SECS.max(BOOT_TIMEOUT_SECS),
            nic: inst.nic.as_ref().map(|n| skiff_run::Nic { tap: n.tap.clone(), mac: n.mac.clone() }),
            network: None,
            main,
            console_log: inst.dir.join("console.log"),
            exit_file: Self::exit_file(inst),
            monitor_log: inst.dir.join("monitor.log"),
            label: inst.config.get("image.description").cloned().unwrap_or_else(|| "disk image".into()),
            restore: None,
            os: Some(OsBoot {
                firmware: self.cfg.firmware.clone(),
                vars: dir.join(VARS),
                disk: dir.join(ROOT),
                disk_format: "qcow2".into(),
                seed,
                // The instance's volatile.uuid: the same system UUID at every start.
                uuid: Some(inst.id.clone()),
            }),
        })
    }

    /// Boots a full OS VM through its monitor; returns at the agent's ready.
    pub(super) async fn launch_os(&self, inst: &InstanceSpec) -> Result<(), DriverError> {
        let dir = self.runtime_dir(inst);
        if monitor::attach(&dir).is_ok() {
            return Err(DriverError::Running(inst.name.clone()));
        }
        monitor::remove_leftovers(&dir);
        let _ = std::fs::remove_file(Self::exit_file(inst));
        let seed = super::seed::write(inst, &os_dir(inst))?;
        monitor::launch(&self.os_spec(inst, seed)?).await?;
        self.watch(inst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(dir: &Path) -> InstanceSpec {
        let base = dir.join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        InstanceSpec {
            name: "os1".into(),
            id: "0123456789abcdef".into(),
            config: Default::default(),
            image_rootfs: base,
            image_config: serde_json::Value::Null,
            image_kind: ImageKind::Disk(disk_image::Format::Raw),
            nic: None,
            devices: Default::default(),
            dir: dir.join("inst"),
        }
    }

    #[tokio::test]
    async fn the_overlay_and_variables_are_snapshotted_restored_and_deleted() {
        let d = tempfile::tempdir().unwrap();
        let inst = instance(d.path());
        create(&inst).await.unwrap();
        let (root, vars) = (os_dir(&inst).join(ROOT), os_dir(&inst).join(VARS));
        let info = disk_image::inspect(&root, Some(disk_image::Format::Qcow2)).unwrap();
        assert_eq!(info.backing.as_deref(), Some(inst.image_rootfs.to_str().unwrap()));
        assert_eq!(info.backing_format.as_deref(), Some("raw"));
        // Never booted: no variable store yet.
        snapshot_create(&inst, "s0").await.unwrap();
        assert!(!snapshot_dir(&inst, "s0").join(VARS).exists());
        std::fs::write(&vars, b"vars after s0").unwrap();
        snapshot_create(&inst, "s1").await.unwrap();
        assert!(snapshot_create(&inst, "s1").await.is_err(), "a snapshot was overwritten");
        let before = std::fs::read(&root).unwrap();
        std::fs::write(&root, b"wrecked").unwrap();
        std::fs::write(&vars, b"changed").unwrap();
        snapshot_restore(&inst, "s1").await.unwrap();
        assert_eq!(std::fs::read(&root).unwrap(), before);
        assert_eq!(std::fs::read(&vars).unwrap(), b"vars after s0");
        snapshot_restore(&inst, "s0").await.unwrap();
        assert!(!vars.exists(), "s0 had no variable store");
        snapshot_rename(&inst, "s1", "s2").unwrap();
        snapshot_delete(&inst, "s2").await.unwrap();
        assert!(!snapshot_dir(&inst, "s2").exists());
        let left: Vec<_> = std::fs::read_dir(os_dir(&inst)).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(left.iter().all(|n| n == ROOT || n == "snapshots"), "{left:?}");
        assert!(snapshot_restore(&inst, "nope").await.is_err());
        delete(&inst).unwrap();
        assert!(!os_dir(&inst).exists());
        assert!(std::fs::read(&inst.image_rootfs).unwrap().iter().all(|b| *b == 0), "the base was written");
    }
}
