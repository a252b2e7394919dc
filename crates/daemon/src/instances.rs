//! Instance lifecycle: create from an image, start, stop, delete,
//! snapshots, adoption after a restart, and the reactions to driver
//! events (a VM that ends by itself, `boot.autorestart`, ephemeral
//! instances). Every step that fails undoes what it made; every change of
//! state is one database transaction.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use skiff_api::{InstanceType, InstancesPost};
use skiff_driver::{Driver, DriverError, DriverEvent, ImageKind, InstanceSpec, Nic, RunStatus};

use crate::daemon::{Daemon, Settings};
use crate::db::{write, DbError, InstanceRow, Status};
use crate::images::{chain, ImageError};
use crate::ops::Op;

/// Default seconds a clean stop may take.
pub const STOP_TIMEOUT: u64 = 30;
/// Longest pause between automatic restarts of a crashing instance.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Errors of instance operations, each with its HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// 404.
    #[error("Instance not found")]
    NotFound,
    /// 404.
    #[error("Snapshot not found")]
    SnapshotNotFound,
    /// 400.
    #[error("{0}")]
    BadRequest(String),
    /// 409.
    #[error("{0}")]
    Conflict(String),
    /// 500 (or 4xx for image errors that are the caller's).
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The driver failed.
    #[error("{0}")]
    Driver(String),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// A host operation failed.
    #[error("{0}")]
    Host(String),
}

impl InstanceError {
    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            InstanceError::NotFound | InstanceError::SnapshotNotFound => 404,
            InstanceError::BadRequest(_) => 400,
            InstanceError::Conflict(_) => 409,
            InstanceError::Image(ImageError::NotFound(_)) => 404,
            InstanceError::Image(
                ImageError::BadSource(_) | ImageError::BadReference { .. } | ImageError::Pull { .. },
            ) => 400,
            InstanceError::Image(ImageError::InUse { .. }) => 409,
            _ => 500,
        }
    }
}

/// A driver's error: the caller's when the instance cannot do what was
/// asked (400), else the driver's (500).
pub(crate) fn drv(e: DriverError) -> InstanceError {
    match e {
        DriverError::Unsupported(why) => InstanceError::BadRequest(why),
        e => InstanceError::Driver(chain(&e)),
    }
}

/// The VM driver for these settings.
pub fn vm_driver(s: &Settings) -> Result<Arc<dyn Driver>, DriverError> {
    let cfg = skiff_driver::vm::VmDriverConfig {
        storage_root: s.dir.join("storage"),
        runtime_root: s.run_dir.clone(),
        kernel: s.kernel.clone(),
        ..Default::default()
    };
    Ok(Arc::new(skiff_driver::vm::VmDriver::new(cfg)?))
}

/// The LXC driver for these settings (fails where LXC is missing).
pub fn lxc_driver(s: &Settings, network: bool) -> Result<Arc<dyn Driver>, DriverError> {
    let cfg = skiff_lxc::LxcDriverConfig {
        storage_root: s.dir.join("storage"),
        runtime_root: s.run_dir.clone(),
        agent: None,
        bridge: if network { crate::daemon::BRIDGE.to_string() } else { String::new() },
        idmap: skiff_lxc::DEFAULT_IDMAP,
    };
    Ok(Arc::new(skiff_lxc::LxcDriver::new(cfg)?))
}

/// The driver of an instance.
pub fn driver<'a>(d: &'a Daemon, r: &InstanceRow) -> Result<&'a Arc<dyn Driver>, InstanceError> {
    let kind = match r.kind.as_str() {
        "container" => InstanceType::Container,
        _ => InstanceType::VirtualMachine,
    };
    d.driver_for(kind).map_err(InstanceError::Conflict)
}

/// The instance's directory (console log, exec logs, image config).
pub fn instance_dir(d: &Daemon, name: &str) -> PathBuf {
    d.dir().join("instances").join(name)
}

/// The stored row, or 404.
pub fn row(d: &Daemon, name: &str) -> Result<InstanceRow, InstanceError> {
    match d.db().instance(name)? {
        Some(r) if r.status != Status::Creating => Ok(r),
        _ => Err(InstanceError::NotFound),
    }
}

/// What the driver needs to know of an instance.
pub fn spec(d: &Daemon, r: &InstanceRow) -> Result<InstanceSpec, InstanceError> {
    let dir = instance_dir(d, &r.name);
    let image_config = std::fs::read(dir.join("image-config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    let rootfs = std::fs::read_to_string(dir.join("image-rootfs")).map(PathBuf::from).unwrap_or_default();
    let nic = match (&d.net, r.config.get("volatile.eth0.host_name"), r.config.get("volatile.eth0.hwaddr")) {
        (Some(net), Some(tap), Some(mac)) => Some(Nic { tap: tap.clone(), mac: mac.clone(), gateway: net.gateway() }),
        _ => None,
    };
    let image_kind = match std::fs::read_to_string(dir.join("image-kind")).as_deref().map(str::trim) {
        Ok("system") => ImageKind::System,
        Ok("disk-raw") => ImageKind::Disk(disk_image::Format::Raw),
        Ok("disk-qcow2") => ImageKind::Disk(disk_image::Format::Qcow2),
        _ => ImageKind::Oci,
    };
    Ok(InstanceSpec {
        name: r.name.clone(),
        id: r.id.clone(),
        config: Daemon::expanded(&r.config),
        image_rootfs: rootfs,
        image_config,
        image_kind,
        nic,
        devices: r.devices.clone(),
        dir,
    })
}

pub(crate) fn source(name: &str) -> String {
    format!("/1.0/instances/{name}")
}

pub(crate) fn commit(d: &Daemon, r: &InstanceRow) -> Result<(), InstanceError> {
    d.db().tx(|tx| write::update(tx, r))?;
    Ok(())
}

/// Checks a create request and records the instance as `Creating`; the
/// rest happens in [`create`]. Errors here are the caller's (4xx).
pub fn begin_create(d: &Daemon, req: &mut InstancesPost) -> Result<InstanceRow, InstanceError> {
    if req.name.is_empty() {
        req.name = generated_name(d);
    }
    if !skiff_api::valid_name(&req.name) {
        return Err(InstanceError::BadRequest(format!(
            "invalid instance name {:?}: 1-63 letters, digits and '-', starting with a letter, not ending with '-'",
            req.name
        )));
    }
    // As in Incus, an instance without a type is a container.
    let kind = req.kind.unwrap_or(InstanceType::Container);
    let driver = d.driver_for(kind).map_err(InstanceError::BadRequest)?;
    if let Some(p) = req.profiles.as_ref().filter(|p| p.iter().any(|p| p != "default")) {
        return Err(InstanceError::BadRequest(format!("unknown profiles {p:?} (Skiff has only \"default\")")));
    }
    if !req.architecture.is_empty() && req.architecture != "x86_64" {
        return Err(InstanceError::BadRequest(format!(
            "architecture {:?} is not this host's (x86_64)",
            req.architecture
        )));
    }
    if let Some(k) = req.config.keys().find(|k| k.starts_with("volatile.")) {
        return Err(InstanceError::BadRequest(format!("config key {k:?} is set by skiffd, not by clients")));
    }
    driver.validate_config(&req.config).map_err(|e| InstanceError::BadRequest(chain(&e)))?;
    check_devices(driver.as_ref(), &req.devices)?;
    if kind != InstanceType::Container {
        let alias_target = req.source.alias.as_deref().and_then(|a| d.db().aliases().ok()?.get(a).map(|t| t.0.clone()));
        if d.images.is_system(&req.source, alias_target.as_deref()) {
            let name = req.source.alias.clone().or(req.source.fingerprint.clone()).unwrap_or_default();
            return Err(system_image_vm(&name));
        }
    }
    let now = skiff_api::time::now();
    let mut config = req.config.clone();
    let id = uuid::Uuid::new_v4().to_string();
    config.insert("volatile.uuid".into(), id.clone());
    let row = InstanceRow {
        name: req.name.clone(),
        id,
        kind: kind.as_str().into(),
        status: Status::Creating,
        config,
        devices: req.devices.clone(),
        ephemeral: req.ephemeral,
        description: req.description.clone(),
        image: String::new(),
        created_at: now.clone(),
        last_used_at: skiff_api::time::ZERO.into(),
    };
    d.db().tx(|tx| write::insert(tx, &row)).map_err(|e| match e {
        DbError::Sql(rusqlite::Error::SqliteFailure(f, _)) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
            InstanceError::Conflict(format!("Instance {:?} already exists", row.name))
        }
        e => e.into(),
    })?;
    Ok(row)
}

/// A system image asked for as a VM.
fn system_image_vm(image: &str) -> InstanceError {
    InstanceError::BadRequest(format!(
        "image {image:?} is a system container image (metadata.yaml + rootfs/): it runs as a container; \
         launch it without --vm (a full OS VM boots a disk image: skiff image import DISK --alias NAME)"
    ))
}

fn generated_name(d: &Daemon) -> String {
    const ADJ: &[&str] = &["brave", "calm", "eager", "fond", "keen", "lucid", "noble", "quick", "sunny", "witty"];
    const NOUN: &[&str] = &["otter", "heron", "lynx", "marten", "osprey", "puffin", "seal", "skua", "tern", "wren"];
    loop {
        let u = uuid::Uuid::new_v4();
        let b = u.as_bytes();
        let name = format!("{}-{}", ADJ[b[0] as usize % ADJ.len()], NOUN[b[1] as usize % NOUN.len()]);
        if matches!(d.db().instance(&name), Ok(None)) {
            return name;
        }
    }
}

/// Devices Skiff knows: the NIC on the managed bridge, the root disk, and
/// what the driver takes (disk shares and disks, see `skiff_driver::devices`).
pub(crate) fn check_devices(
    driver: &dyn Driver,
    devs: &BTreeMap<String, BTreeMap<String, String>>,
) -> Result<(), InstanceError> {
    for (name, dev) in devs {
        let kind = dev.get("type").map(String::as_str).unwrap_or("");
        if kind == "nic" && dev.get("network").is_some_and(|n| n != crate::daemon::BRIDGE) {
            return Err(InstanceError::BadRequest(format!(
                "device {name:?} (nic): Skiff has one network, {}",
                crate::daemon::BRIDGE
            )));
        }
        if kind == "nic" && name != "eth0" {
            return Err(InstanceError::BadRequest(format!(
                "device {name:?} (nic): an instance has one NIC (eth0 on {}); more are not supported yet",
                crate::daemon::BRIDGE
            )));
        }
        driver.validate_device(name, dev).map_err(|e| InstanceError::BadRequest(chain(&e)))?;
    }
    Ok(())
}

/// The work of a create operation: the image, the volume, the row; then a
/// start if asked. On failure everything made is removed.
pub async fn create(
    d: &Arc<Daemon>,
    mut row: InstanceRow,
    req: InstancesPost,
    op: Arc<Op>,
) -> Result<(), InstanceError> {
    let result = async {
        let alias_target = match req.source.alias.as_deref() {
            Some(a) if req.source.server.as_deref().is_none_or(str::is_empty) => {
                d.db().aliases()?.get(a).map(|t| t.0.clone())
            }
            _ => None,
        };
        let o = op.clone();
        let image = d.images.resolve(&req.source, alias_target, Arc::new(move |m| o.set_metadata(m))).await?;
        if image.kind == ImageKind::System {
            if row.kind != "container" {
                return Err(system_image_vm(&image.name));
            }
            let rootfs = image.rootfs.clone();
            if !tokio::task::spawn_blocking(move || crate::sysimages::has_init(&rootfs)).await.unwrap_or(false) {
                return Err(InstanceError::BadRequest(format!(
                    "image {:?} has no executable /sbin/init: a system container boots its image's own init",
                    image.name
                )));
            }
        }
        if matches!(image.kind, ImageKind::Disk(_)) && row.kind == "container" {
            return Err(InstanceError::BadRequest(format!(
                "image {:?} is a disk image: it boots as a full OS VM; launch it with --vm",
                image.name
            )));
        }
        let dir = instance_dir(d, &row.name);
        std::fs::create_dir_all(&dir).map_err(|e| InstanceError::Host(format!("creating {}: {e}", dir.display())))?;
        let write = |f: &str, b: &[u8]| {
            std::fs::write(dir.join(f), b).map_err(|e| InstanceError::Host(format!("writing {f}: {e}")))
        };
        write("image-config.json", image.config.to_string().as_bytes())?;
        write("image-rootfs", image.rootfs.as_os_str().as_encoded_bytes())?;
        let kind = match image.kind {
            ImageKind::Oci => "oci".to_string(),
            ImageKind::System => "system".to_string(),
            ImageKind::Disk(f) => format!("disk-{f}"),
        };
        write("image-kind", kind.as_bytes())?;
        row.image = image.fingerprint.clone();
        row.config.insert("volatile.base_image".into(), image.fingerprint.clone());
        match image.kind {
            ImageKind::Oci => {
                row.config.insert("image.oci.reference".into(), image.name.clone());
            }
            // As Incus: the image's properties become image.* keys.
            ImageKind::System | ImageKind::Disk(_) => {
                for (k, v) in &image.properties {
                    row.config.insert(format!("image.{k}"), v.clone());
                }
            }
        }
        give_nic(d, &mut row);
        d.images.add_use(&image.fingerprint, &row.id);
        driver(d, &row)?.create(&spec(d, &row)?).await.map_err(drv)?;
        record_created(d, &mut row)
    }
    .await;
    if let Err(e) = result {
        discard(d, &row).await;
        return Err(e);
    }
    d.events.lifecycle("instance-created", &source(&row.name), json!({"type": row.kind}));
    if req.start {
        start(d, &row.name).await?;
    }
    Ok(())
}

/// Gives a new instance its NIC's identity (tap name and MAC, from its id).
pub(crate) fn give_nic(d: &Daemon, row: &mut InstanceRow) {
    if d.net.is_some() {
        row.config.insert("volatile.eth0.host_name".into(), skiff_net::ident::tap_name(&row.id));
        row.config.insert("volatile.eth0.hwaddr".into(), skiff_net::ident::guest_mac(&row.id));
    }
}

/// Records a new instance whose storage is made as stopped, with its image.
pub(crate) fn record_created(d: &Daemon, row: &mut InstanceRow) -> Result<(), InstanceError> {
    row.status = Status::Stopped;
    d.db().tx(|tx| {
        write::update(tx, row)?;
        tx.execute("UPDATE instances SET image = ?2 WHERE name = ?1", [&row.name, &row.image])
            .map_err(DbError::from)?;
        Ok::<_, DbError>(())
    })?;
    Ok(())
}

/// Removes every trace of an instance that is not running (a failed or
/// interrupted create, or a delete).
pub async fn discard(d: &Daemon, row: &InstanceRow) {
    if let (Ok(s), Ok(driver)) = (spec(d, row), driver(d, row)) {
        if let Err(e) = driver.delete(&s).await {
            log::warn!("{}: driver cleanup: {}", row.name, chain(&e));
        }
    }
    if let Some(net) = &d.net {
        if let Some(tap) = row.config.get("volatile.eth0.host_name") {
            let _ = net.delete_tap(tap);
        }
        if let Some(mac) = row.config.get("volatile.eth0.hwaddr") {
            if let Some(ip) = net.lease(mac) {
                let _ = net.release(mac, ip);
            }
        }
    }
    d.images.remove_use(&row.image, &row.id);
    let _ = std::fs::remove_dir_all(instance_dir(d, &row.name));
    let _ = d.db().tx(|tx| write::delete(tx, &row.name));
}

/// Starts a stopped instance; returns when its entrypoint runs.
pub async fn start(d: &Arc<Daemon>, name: &str) -> Result<(), InstanceError> {
    let lock = d.lock_of(name);
    let _g = lock.lock().await;
    start_locked(d, name).await
}

async fn start_locked(d: &Arc<Daemon>, name: &str) -> Result<(), InstanceError> {
    start_via(d, name, None).await
}

/// Starts a stopped instance (the lock held): booted, or with `snapshot`
/// from that stateful snapshot (its disk and memory; a failure leaves it
/// stopped as it was, rather than in error).
pub(crate) async fn start_via(d: &Arc<Daemon>, name: &str, snapshot: Option<&str>) -> Result<(), InstanceError> {
    let mut r = row(d, name)?;
    if r.status == Status::Frozen && snapshot.is_none() {
        return set_frozen_locked(d, &mut r, false).await;
    }
    if r.status.is_up() {
        return Err(InstanceError::Conflict(format!("Instance {name:?} is already running")));
    }
    let spec = spec(d, &r)?;
    // A VM's NIC is a tap made here; a container's is a veth LXC makes.
    if let (Some(net), Some(_), "virtual-machine") = (&d.net, &spec.nic, r.kind.as_str()) {
        net.create_tap(&r.id).map_err(|e| InstanceError::Host(format!("creating the tap: {}", chain(&e))))?;
    }
    let driver = driver(d, &r)?;
    let started = match snapshot {
        Some(snap) => driver.snapshot_restore_stateful(&spec, snap).await,
        None => driver.start(&spec).await,
    };
    if let Err(e) = started {
        if let (Some(net), Some(nic)) = (&d.net, &spec.nic) {
            let _ = net.delete_tap(&nic.tap);
        }
        if snapshot.is_some() {
            return Err(match drv(e) {
                InstanceError::Driver(why) => InstanceError::Driver(format!("restoring {name}: {why}")),
                other => other,
            });
        }
        r.status = Status::Error;
        let _ = commit(d, &r);
        return Err(InstanceError::Driver(format!("starting {name}: {}", chain(&e))));
    }
    r.status = Status::Running;
    r.last_used_at = skiff_api::time::now();
    r.config.insert("volatile.last_state.power".into(), "RUNNING".into());
    commit(d, &r)?;
    d.events.lifecycle("instance-started", &source(name), Value::Null);
    Ok(())
}

/// Pauses (`true`) or resumes (`false`) a running instance.
pub async fn set_frozen(d: &Arc<Daemon>, name: &str, frozen: bool) -> Result<(), InstanceError> {
    let lock = d.lock_of(name);
    let _g = lock.lock().await;
    let mut r = row(d, name)?;
    match (r.status, frozen) {
        (Status::Running, true) | (Status::Frozen, false) => set_frozen_locked(d, &mut r, frozen).await,
        (Status::Frozen, true) => Err(InstanceError::Conflict(format!("Instance {name:?} is already frozen"))),
        (Status::Running, false) => Err(InstanceError::Conflict(format!("Instance {name:?} is not frozen"))),
        _ => Err(InstanceError::Conflict(format!("Instance {name:?} is not running"))),
    }
}

async fn set_frozen_locked(d: &Arc<Daemon>, r: &mut InstanceRow, frozen: bool) -> Result<(), InstanceError> {
    driver(d, r)?.freeze(&spec(d, r)?, frozen).await.map_err(drv)?;
    r.status = if frozen { Status::Frozen } else { Status::Running };
    r.config.insert("volatile.last_state.power".into(), if frozen { "FROZEN" } else { "RUNNING" }.into());
    commit(d, r)?;
    d.events.lifecycle(if frozen { "instance-paused" } else { "instance-resumed" }, &source(&r.name), Value::Null);
    Ok(())
}

/// Stops a running instance (cleanly within `timeout`, or at once with
/// `force`).
pub async fn stop(d: &Arc<Daemon>, name: &str, timeout: Duration, force: bool) -> Result<(), InstanceError> {
    let lock = d.lock_of(name);
    let _g = lock.lock().await;
    stop_locked(d, name, timeout, force, true).await
}

pub(crate) async fn stop_locked(
    d: &Arc<Daemon>,
    name: &str,
    timeout: Duration,
    force: bool,
    user: bool,
) -> Result<(), InstanceError> {
    let mut r = row(d, name)?;
    if r.status == Status::Error {
        // Its VM already ended badly: a stop settles it as stopped.
        r.status = Status::Stopped;
        commit(d, &r)?;
        return Ok(());
    }
    if r.status == Status::Frozen {
        set_frozen_locked(d, &mut r, false).await?;
    }
    if r.status != Status::Running {
        return Err(InstanceError::Conflict(format!("Instance {name:?} is not running")));
    }
    let spec = spec(d, &r)?;
    driver(d, &r)?.stop(&spec, timeout, force).await.map_err(drv)?;
    after_stop(d, &mut r, Status::Stopped, user).await
}

async fn after_stop(d: &Arc<Daemon>, r: &mut InstanceRow, status: Status, user: bool) -> Result<(), InstanceError> {
    if let (Some(net), Some(tap)) = (&d.net, r.config.get("volatile.eth0.host_name")) {
        let _ = net.delete_tap(tap);
    }
    r.status = status;
    if user {
        r.config.insert("volatile.last_state.power".into(), "STOPPED".into());
    }
    commit(d, r)?;
    d.events.lifecycle("instance-stopped", &source(&r.name), Value::Null);
    if r.ephemeral {
        let row = r.clone();
        discard(d, &row).await;
        d.events.lifecycle("instance-deleted", &source(&row.name), Value::Null);
    }
    Ok(())
}

/// Deletes an instance (stopping it first with `force`).
pub async fn delete(d: &Arc<Daemon>, name: &str, force: bool) -> Result<(), InstanceError> {
    let lock = d.lock_of(name);
    let _g = lock.lock().await;
    let r = row(d, name)?;
    if r.status.is_up() {
        if !force {
            return Err(InstanceError::BadRequest(format!(
                "Instance {name:?} is running; stop it first (or delete with force)"
            )));
        }
        let spec = spec(d, &r)?;
        if r.status == Status::Frozen {
            driver(d, &r)?.freeze(&spec, false).await.map_err(drv)?;
        }
        driver(d, &r)?.stop(&spec, Duration::ZERO, true).await.map_err(drv)?;
    }
    discard(d, &r).await;
    d.events.lifecycle("instance-deleted", &source(name), Value::Null);
    Ok(())
}

/// The driver's view of a running instance.
pub async fn status(d: &Daemon, r: &InstanceRow) -> Option<RunStatus> {
    if !r.status.is_up() {
        return None;
    }
    let s = spec(d, r).ok()?;
    driver(d, r).ok()?.status(&s).await.ok()
}

/// After a restart: is the instance still running? Fixes the row if not.
pub async fn adopt(d: &Arc<Daemon>, r: &InstanceRow) -> bool {
    let Ok(s) = spec(d, r) else { return false };
    let Ok(driver) = driver(d, r) else { return false };
    match driver.adopt(&s).await {
        Ok(RunStatus::Running { .. }) => {
            if !r.status.is_up() {
                let mut r = r.clone();
                r.status = Status::Running;
                let _ = commit(d, &r);
            }
            true
        }
        // Not known (the driver could not tell): leave it as recorded
        // rather than clean up under an instance that may run.
        Err(e) => {
            log::warn!("reconcile: cannot tell whether {} runs: {}", r.name, chain(&e));
            r.status.is_up()
        }
        Ok(_) => {
            if r.status.is_up() {
                let mut r = r.clone();
                log::warn!("reconcile: {} is no longer running", r.name);
                let _ = after_stop(d, &mut r, Status::Stopped, false).await;
            }
            false
        }
    }
}

/// Re-reads every running instance's real state (after lost events).
pub async fn resync(d: &Arc<Daemon>) {
    let rows = d.db().instances().unwrap_or_default();
    for r in rows.iter().filter(|r| r.status.is_up()) {
        adopt(d, r).await;
    }
}

/// Reacts to what the driver saw happen.
pub async fn on_driver_event(d: &Arc<Daemon>, ev: DriverEvent) {
    match ev {
        DriverEvent::MainExited { name, status, restarting } => {
            let code = format!("{status:?}");
            if let Ok(mut r) = row(d, &name) {
                let n: u64 = r.config.get("volatile.restarts").and_then(|v| v.parse().ok()).unwrap_or(0);
                if restarting {
                    r.config.insert("volatile.restarts".into(), (n + 1).to_string());
                }
                r.config.insert("volatile.last_exit".into(), code.clone());
                let _ = commit(d, &r);
            }
            d.events.lifecycle(
                "instance-main-exited",
                &source(&name),
                json!({"status": code, "restarting": restarting}),
            );
        }
        DriverEvent::Stopped { name, clean, detail } => {
            let lock = d.lock_of(&name);
            let _g = lock.lock().await;
            let Ok(mut r) = row(d, &name) else { return };
            if !r.status.is_up() {
                return; // a stop the daemon asked for, already handled
            }
            let autorestart = r.config.get("boot.autorestart").is_some_and(|v| v == "true");
            let status = if clean { Status::Stopped } else { Status::Error };
            r.config.insert("volatile.last_exit".into(), detail.clone());
            if !clean {
                d.events.lifecycle("instance-error", &source(&name), json!({"detail": detail}));
            }
            let _ = after_stop(d, &mut r, status, false).await;
            if autorestart && !r.ephemeral && !clean {
                let n: u32 = r.config.get("volatile.restarts").and_then(|v| v.parse().ok()).unwrap_or(0);
                let delay = Duration::from_secs(1u64 << n.min(6)).min(MAX_BACKOFF);
                r.config.insert("volatile.restarts".into(), (n + 1).to_string());
                let _ = commit(d, &r);
                let me = d.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    if let Err(e) = start(&me, &name).await {
                        me.events.log("error", &format!("autorestart of {name}: {e}"), json!({}));
                    } else {
                        me.events.lifecycle("instance-restarted", &source(&name), json!({"automatic": true}));
                    }
                });
            }
        }
    }
}

/// Applies a PUT/PATCH of config, devices, description, ephemeral. On a
/// running instance, device and `limits.cpu`/`limits.memory` changes are
/// applied live first (hot-plug); if that fails nothing is stored.
pub async fn update(d: &Daemon, name: &str, put: skiff_api::InstancePut, replace: bool) -> Result<(), InstanceError> {
    let old = row(d, name)?;
    let mut r = old.clone();
    if let Some(mut config) = put.config {
        let volatile: BTreeMap<_, _> =
            r.config.iter().filter(|(k, _)| k.starts_with("volatile.")).map(|(k, v)| (k.clone(), v.clone())).collect();
        config.retain(|k, _| !k.starts_with("volatile."));
        let user: BTreeMap<_, _> =
            config.iter().filter(|(k, _)| !k.starts_with("image.")).map(|(k, v)| (k.clone(), v.clone())).collect();
        driver(d, &r)?.validate_config(&user).map_err(|e| InstanceError::BadRequest(chain(&e)))?;
        let mut merged = if replace {
            let mut m = config;
            m.extend(r.config.iter().filter(|(k, _)| k.starts_with("image.")).map(|(k, v)| (k.clone(), v.clone())));
            m
        } else {
            let mut m = r.config.clone();
            m.extend(config);
            m
        };
        merged.extend(volatile);
        r.config = merged;
    }
    if let Some(devices) = put.devices {
        check_devices(driver(d, &r)?.as_ref(), &devices)?;
        r.devices = devices;
    }
    if let Some(e) = put.ephemeral {
        r.ephemeral = e;
    }
    if let Some(desc) = put.description {
        r.description = desc;
    }
    if old.status.is_up() {
        apply_live(d, &old, &r).await?;
    }
    commit(d, &r)?;
    d.events.lifecycle("instance-updated", &source(name), Value::Null);
    Ok(())
}

/// Hot-plugs what changed between `old` and `new` of a running instance:
/// devices removed or changed go first, then those added or changed, then
/// the new size.
async fn apply_live(d: &Daemon, old: &InstanceRow, new: &InstanceRow) -> Result<(), InstanceError> {
    let own = |dev: &BTreeMap<String, String>| !skiff_driver::devices::is_builtin(dev);
    let removed: Vec<&String> =
        old.devices.iter().filter(|(n, dev)| own(dev) && new.devices.get(*n) != Some(*dev)).map(|(n, _)| n).collect();
    let added: Vec<(&String, &BTreeMap<String, String>)> =
        new.devices.iter().filter(|(n, dev)| own(dev) && old.devices.get(*n) != Some(*dev)).collect();
    let limits = |r: &InstanceRow| {
        Daemon::expanded(&r.config).into_iter().filter(|(k, _)| k.starts_with("limits.")).collect::<Vec<_>>()
    };
    let limits_changed = limits(old) != limits(new);
    if removed.is_empty() && added.is_empty() && !limits_changed {
        return Ok(());
    }
    if old.status == Status::Frozen {
        return Err(InstanceError::Conflict(format!(
            "instance {} is frozen: unfreeze it before changing its devices or limits",
            old.name
        )));
    }
    let driver = driver(d, old)?;
    let (was, will) = (spec(d, old)?, spec(d, new)?);
    if limits_changed {
        // Refused before any device changes when the limits cannot apply live.
        if let Err(e) = driver.update_limits(&was, &will).await {
            return Err(match e {
                DriverError::NeedsRestart(why) => InstanceError::Conflict(why),
                e => drv(e),
            });
        }
    }
    for name in removed {
        driver.device_remove(&was, name).await.map_err(drv)?;
    }
    for (name, dev) in added {
        driver.device_add(&will, name, dev).await.map_err(drv)?;
    }
    Ok(())
}
