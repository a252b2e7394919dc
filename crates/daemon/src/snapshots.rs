//! Instance snapshots: stateless ones (the root filesystem) and stateful
//! ones of VMs (also memory and device state, as Incus's `--stateful`),
//! restores, and new instances copied from a snapshot (`skiff copy
//! NAME/SNAP NEW`; from a stateful one the copy's first start restores the
//! saved VM instead of booting). The checks that make a request the
//! caller's error run before its operation starts ([`check_create`],
//! [`check_restore`], [`prepare_copy`]), so a bad request gets a 400.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use skiff_api::{InstanceType, InstancesPost};

use crate::daemon::Daemon;
use crate::db::{write, InstanceRow, SnapshotRow, Status};
use crate::instances::{
    discard, driver, drv, give_nic, instance_dir, record_created, row, source, spec, start_via, stop_locked,
    InstanceError, STOP_TIMEOUT,
};

/// The files of an instance's directory that say what its image is.
const IMAGE_FILES: [&str; 3] = ["image-config.json", "image-rootfs", "image-kind"];

fn snapshot_path(name: &str, snap: &str) -> String {
    format!("{}/snapshots/{snap}", source(name))
}

fn find_snapshot(d: &Daemon, name: &str, snap: &str) -> Result<SnapshotRow, InstanceError> {
    d.db().snapshots(name)?.into_iter().find(|s| s.name == snap).ok_or(InstanceError::SnapshotNotFound)
}

fn no_criu(r: &InstanceRow) -> Result<(), InstanceError> {
    match r.kind.as_str() {
        "container" => Err(InstanceError::BadRequest(skiff_driver::NO_CRIU.into())),
        _ => Ok(()),
    }
}

/// Whether snapshot `snap` of `r` holds memory state.
pub fn is_stateful(d: &Daemon, r: &InstanceRow, snap: &str) -> bool {
    match (spec(d, r), driver(d, r)) {
        (Ok(s), Ok(drv)) => drv.snapshot_is_stateful(&s, snap),
        _ => false,
    }
}

/// Whether the instance's next start restores saved memory state (a copy
/// of a stateful snapshot).
pub fn has_saved_state(d: &Daemon, r: &InstanceRow) -> bool {
    match (spec(d, r), driver(d, r)) {
        (Ok(s), Ok(drv)) => drv.has_saved_state(&s),
        _ => false,
    }
}

/// Refuses a snapshot request that cannot succeed: a stateful one of a
/// container, or of an instance that is not running.
pub fn check_create(d: &Daemon, name: &str, stateful: bool) -> Result<(), InstanceError> {
    let r = row(d, name)?;
    if stateful {
        no_criu(&r)?;
        if !r.status.is_up() {
            return Err(InstanceError::BadRequest(format!(
                "instance {name:?} is not running: a stateful snapshot saves a running VM's memory (start it, or \
                 take a stateless snapshot)"
            )));
        }
    }
    Ok(())
}

/// Creates a snapshot (name generated `snapN` when empty); `stateful`:
/// with the running VM's memory and device state (it is paused meanwhile).
pub async fn create(d: &Arc<Daemon>, name: &str, snap: &str, stateful: bool) -> Result<String, InstanceError> {
    let lock = d.lock_of(name);
    let _g = lock.lock().await;
    check_create(d, name, stateful)?;
    let r = row(d, name)?;
    let existing = d.db().snapshots(name)?;
    let snap = if snap.is_empty() {
        (0..).map(|i| format!("snap{i}")).find(|s| !existing.iter().any(|e| &e.name == s)).unwrap_or_default()
    } else {
        snap.to_string()
    };
    if !skiff_api::valid_name(&snap) {
        return Err(InstanceError::BadRequest(format!("invalid snapshot name {snap:?}")));
    }
    if existing.iter().any(|e| e.name == snap) {
        return Err(InstanceError::Conflict(format!("Snapshot {snap:?} already exists")));
    }
    let (driver, s) = (driver(d, &r)?, spec(d, &r)?);
    if stateful {
        driver.snapshot_create_stateful(&s, &snap, r.status == Status::Frozen).await.map_err(drv)?;
    } else {
        driver.snapshot_create(&s, &snap).await.map_err(drv)?;
    }
    let row = SnapshotRow { name: snap.clone(), created_at: skiff_api::time::now(), config: r.config.clone() };
    d.db().tx(|tx| write::add_snapshot(tx, name, &row))?;
    d.events.lifecycle("instance-snapshot-created", &snapshot_path(name, &snap), Value::Null);
    Ok(snap)
}

/// Refuses a restore that cannot succeed: a stateful one of a container or
/// of a snapshot without memory state.
pub fn check_restore(d: &Daemon, name: &str, snap: &str, stateful: bool) -> Result<(), InstanceError> {
    let r = row(d, name)?;
    find_snapshot(d, name, snap)?;
    if r.ephemeral && r.status.is_up() {
        return Err(InstanceError::BadRequest(format!(
            "instance {name:?} is ephemeral: the stop a restore begins with would delete it"
        )));
    }
    if stateful {
        no_criu(&r)?;
        if !is_stateful(d, &r, snap) {
            return Err(InstanceError::BadRequest(format!(
                "snapshot {snap:?} of {name:?} has no memory state (it was taken without --stateful): restore it \
                 without --stateful"
            )));
        }
    }
    Ok(())
}

/// Restores a snapshot. Stateless: the root filesystem (a running instance
/// is stopped and started again). Stateful: a running instance is stopped
/// at once (its memory is replaced), then it runs from the snapshot's disk
/// and memory; if that fails it stays stopped with its disk unchanged.
pub async fn restore(d: &Arc<Daemon>, name: &str, snap: &str, stateful: bool) -> Result<(), InstanceError> {
    let lock = d.lock_of(name);
    let _g = lock.lock().await;
    check_restore(d, name, snap, stateful)?;
    let r = row(d, name)?;
    let was_running = r.status.is_up();
    if stateful {
        if was_running {
            stop_locked(d, name, Duration::ZERO, true, false).await?;
        }
        start_via(d, name, Some(snap)).await?;
        d.events.lifecycle("instance-snapshot-restored", &snapshot_path(name, snap), Value::Null);
        return Ok(());
    }
    if was_running {
        stop_locked(d, name, Duration::from_secs(STOP_TIMEOUT), false, false).await?;
    }
    let r = row(d, name)?;
    let restored = driver(d, &r)?.snapshot_restore(&spec(d, &r)?, snap).await.map_err(drv);
    if was_running {
        start_via(d, name, None).await?;
    }
    restored?;
    d.events.lifecycle("instance-snapshot-restored", &snapshot_path(name, snap), Value::Null);
    Ok(())
}

/// Deletes a snapshot (its memory state too).
pub async fn delete(d: &Arc<Daemon>, name: &str, snap: &str) -> Result<(), InstanceError> {
    let lock = d.lock_of(name);
    let _g = lock.lock().await;
    let r = row(d, name)?;
    find_snapshot(d, name, snap)?;
    driver(d, &r)?.snapshot_delete(&spec(d, &r)?, snap).await.map_err(drv)?;
    d.db().tx(|tx| write::delete_snapshot(tx, name, snap))?;
    d.events.lifecycle("instance-snapshot-deleted", &snapshot_path(name, snap), Value::Null);
    Ok(())
}

/// Renames a snapshot.
pub async fn rename(d: &Arc<Daemon>, name: &str, old: &str, new: &str) -> Result<(), InstanceError> {
    let lock = d.lock_of(name);
    let _g = lock.lock().await;
    let r = row(d, name)?;
    find_snapshot(d, name, old)?;
    if !skiff_api::valid_name(new) {
        return Err(InstanceError::BadRequest(format!("invalid snapshot name {new:?}")));
    }
    if find_snapshot(d, name, new).is_ok() {
        return Err(InstanceError::Conflict(format!("Snapshot {new:?} already exists")));
    }
    driver(d, &r)?.snapshot_rename(&spec(d, &r)?, old, new).await.map_err(drv)?;
    d.db().tx(|tx| write::rename_snapshot(tx, name, old, new))?;
    d.events.lifecycle("instance-snapshot-renamed", &snapshot_path(name, new), Value::Null);
    Ok(())
}

/// Where a copy comes from: `source.source` is `NAME/SNAP`.
#[derive(Debug, Clone)]
pub struct CopySource {
    /// The instance.
    pub instance: String,
    /// Its snapshot.
    pub snapshot: String,
    /// With the snapshot's memory state.
    pub stateful: bool,
    /// The snapshot's `image.*` keys, which the copy keeps.
    image_keys: BTreeMap<String, String>,
}

/// Checks a `POST /1.0/instances` with source type `copy` and shapes it
/// for [`crate::instances::begin_create`]: the source's type, the
/// snapshot's config under the request's (`volatile.*` dropped: they are
/// the copy's own), `stateful` only from a stateful snapshot.
pub fn prepare_copy(d: &Daemon, req: &mut InstancesPost) -> Result<CopySource, InstanceError> {
    let from = req.source.source.clone().unwrap_or_default();
    let Some((instance, snapshot)) = from.split_once('/') else {
        return Err(InstanceError::BadRequest(format!(
            "copy source {from:?}: Skiff copies from a snapshot, NAME/SNAP (copying a whole instance is not \
             supported yet)"
        )));
    };
    let src = row(d, instance)?;
    let snap = find_snapshot(d, instance, snapshot)?;
    if src.kind == "container" {
        return Err(InstanceError::BadRequest("copying containers is not supported yet".into()));
    }
    if req.stateful && !is_stateful(d, &src, snapshot) {
        return Err(InstanceError::BadRequest(format!("snapshot {from:?} has no memory state: copy it stateless")));
    }
    let kind = InstanceType::VirtualMachine;
    if req.kind.is_some_and(|k| k != kind) {
        return Err(InstanceError::BadRequest(format!("{from:?} is a {}: its copy is one too", src.kind)));
    }
    req.kind = Some(kind);
    let mut config: BTreeMap<String, String> = snap.config.clone();
    config.extend(std::mem::take(&mut req.config));
    config.retain(|k, _| !k.starts_with("volatile."));
    let image_keys: BTreeMap<String, String> =
        config.iter().filter(|(k, _)| k.starts_with("image.")).map(|(k, v)| (k.clone(), v.clone())).collect();
    config.retain(|k, _| !k.starts_with("image."));
    req.config = config;
    if req.devices.is_empty() {
        req.devices = src.devices.clone();
    }
    Ok(CopySource { instance: instance.into(), snapshot: snapshot.into(), stateful: req.stateful, image_keys })
}

/// The work of a copy operation: the image files, the volume (and memory
/// state) from the snapshot, the row. On failure everything made is removed.
pub async fn copy(d: &Arc<Daemon>, mut row: InstanceRow, from: CopySource) -> Result<(), InstanceError> {
    let result = async {
        let src = crate::instances::row(d, &from.instance)?;
        let (src_dir, dir) = (instance_dir(d, &src.name), instance_dir(d, &row.name));
        std::fs::create_dir_all(&dir).map_err(|e| InstanceError::Host(format!("creating {}: {e}", dir.display())))?;
        for f in IMAGE_FILES {
            if let Err(e) = std::fs::copy(src_dir.join(f), dir.join(f)) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(InstanceError::Host(format!("copying {f} of {}: {e}", src.name)));
                }
            }
        }
        row.image = src.image.clone();
        row.config.extend(from.image_keys.clone());
        if let Some(base) = src.config.get("volatile.base_image") {
            row.config.insert("volatile.base_image".into(), base.clone());
        }
        give_nic(d, &mut row);
        d.images.add_use(&row.image, &row.id);
        let (src_spec, new_spec) = (spec(d, &src)?, spec(d, &row)?);
        driver(d, &row)?.copy_from_snapshot(&src_spec, &from.snapshot, &new_spec, from.stateful).await.map_err(drv)?;
        record_created(d, &mut row)
    }
    .await;
    if let Err(e) = result {
        discard(d, &row).await;
        return Err(e);
    }
    d.events.lifecycle("instance-created", &source(&row.name), serde_json::json!({"type": row.kind}));
    Ok(())
}
