//! `/1.0/instances`: list, create, get, update, delete, state, snapshots.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use serde_json::{json, Value};
use skiff_api::instance::{MemoryState, NetworkAddress, NetworkState};
use skiff_api::{
    Instance, InstanceFull, InstancePut, InstanceSnapshot, InstanceSnapshotPost, InstanceSnapshotsPost, InstanceState,
    InstanceStatePut, InstanceType, InstancesPost, OperationClass, StateAction, StatusCode,
};
use skiff_driver::RunStatus;

use super::{accepted, etag_of, if_match, recursion, sync, sync_etag, ApiErr, ApiResult, App, Body};
use crate::db::{InstanceRow, Status};
use crate::instances::{self as inst, InstanceError, STOP_TIMEOUT};
use crate::ops::OpError;
use crate::snapshots;

fn status_of(r: &InstanceRow) -> StatusCode {
    match r.status {
        Status::Running => StatusCode::Running,
        Status::Frozen => StatusCode::Frozen,
        Status::Error => StatusCode::Error,
        _ => StatusCode::Stopped,
    }
}

fn devices(d: &App, r: &InstanceRow) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut all = r.devices.clone();
    if d.net.is_some() {
        all.entry("eth0".into()).or_insert_with(|| {
            BTreeMap::from([
                ("name".into(), "eth0".into()),
                ("network".into(), crate::daemon::BRIDGE.into()),
                ("type".into(), "nic".into()),
            ])
        });
    }
    all.entry("root".into()).or_insert_with(|| {
        BTreeMap::from([("path".into(), "/".into()), ("pool".into(), "default".into()), ("type".into(), "disk".into())])
    });
    all
}

/// The API object of a row.
pub fn to_api(d: &App, r: &InstanceRow) -> Instance {
    let s = status_of(r);
    Instance {
        architecture: "x86_64".into(),
        config: r.config.clone(),
        devices: r.devices.clone(),
        ephemeral: r.ephemeral,
        profiles: vec!["default".into()],
        stateful: snapshots::has_saved_state(d, r),
        description: r.description.clone(),
        created_at: r.created_at.clone(),
        expanded_config: crate::daemon::Daemon::expanded(&r.config),
        expanded_devices: devices(d, r),
        name: r.name.clone(),
        status: s.name().into(),
        status_code: s.code(),
        last_used_at: r.last_used_at.clone(),
        location: "none".into(),
        kind: if r.kind == "container" { InstanceType::Container } else { InstanceType::VirtualMachine },
        project: "default".into(),
    }
}

fn memory_bytes(config: &BTreeMap<String, String>) -> u64 {
    config
        .get("limits.memory")
        .and_then(|m| skiff_driver::parse_memory(m).ok())
        .unwrap_or(skiff_driver::DEFAULT_MEMORY_MIB << 20)
}

async fn state_of(d: &App, r: &InstanceRow) -> InstanceState {
    let s = status_of(r);
    let run = inst::status(d, r).await;
    let pid = match &run {
        Some(RunStatus::Running { main_pid, .. }) => main_pid.map(i64::from).unwrap_or(0),
        _ => 0,
    };
    let mut network = BTreeMap::new();
    if let (Some(net), Some(mac)) = (&d.net, r.config.get("volatile.eth0.hwaddr")) {
        let mut addresses = Vec::new();
        if r.status.is_up() {
            if let Some(ip) = net.lease(mac) {
                addresses.push(NetworkAddress {
                    family: "inet".into(),
                    address: ip.to_string(),
                    netmask: net.subnet().1.to_string(),
                    scope: "global".into(),
                });
            }
        }
        network.insert(
            "eth0".to_string(),
            NetworkState {
                addresses,
                counters: BTreeMap::new(),
                hwaddr: mac.clone(),
                host_name: r.config.get("volatile.eth0.host_name").cloned().unwrap_or_default(),
                mtu: 1500,
                state: if r.status.is_up() { "up".into() } else { "down".into() },
                kind: "broadcast".into(),
            },
        );
    }
    InstanceState {
        status: s.name().into(),
        status_code: s.code(),
        disk: BTreeMap::new(),
        memory: MemoryState { total: memory_bytes(&r.config), ..Default::default() },
        network: Some(network),
        pid,
        processes: if r.status.is_up() { -1 } else { 0 },
        cpu: Default::default(),
    }
}

fn snapshot_api(d: &App, r: &InstanceRow, s: &crate::db::SnapshotRow) -> InstanceSnapshot {
    InstanceSnapshot {
        name: s.name.clone(),
        created_at: s.created_at.clone(),
        expires_at: skiff_api::time::ZERO.into(),
        stateful: snapshots::is_stateful(d, r, &s.name),
        config: s.config.clone(),
        devices: r.devices.clone(),
        expanded_config: s.config.clone(),
        expanded_devices: r.devices.clone(),
        architecture: "x86_64".into(),
        ephemeral: r.ephemeral,
        profiles: vec!["default".into()],
        last_used_at: skiff_api::time::ZERO.into(),
        size: -1,
    }
}

fn visible(d: &App) -> Result<Vec<InstanceRow>, ApiErr> {
    Ok(d.db().instances()?.into_iter().filter(|r| r.status != Status::Creating).collect())
}

/// `GET /1.0/instances`.
pub async fn list(State(d): State<App>, Query(q): Query<HashMap<String, String>>) -> ApiResult {
    let rows = visible(&d)?;
    match recursion(&q) {
        0 => sync(rows.iter().map(|r| format!("/1.0/instances/{}", r.name)).collect::<Vec<_>>()),
        1 => sync(rows.iter().map(|r| to_api(&d, r)).collect::<Vec<_>>()),
        _ => {
            let mut out = Vec::new();
            for r in &rows {
                let snaps = d.db().snapshots(&r.name)?;
                out.push(InstanceFull {
                    instance: to_api(&d, r),
                    state: Some(state_of(&d, r).await),
                    snapshots: Some(snaps.iter().map(|s| snapshot_api(&d, r, s)).collect()),
                    backups: None,
                });
            }
            sync(out)
        }
    }
}

/// `POST /1.0/instances`.
pub async fn create(State(d): State<App>, Body(mut req): Body<InstancesPost>) -> ApiResult {
    if req.source.kind == "copy" {
        return copy(d, req).await;
    }
    let row = inst::begin_create(&d, &mut req)?;
    let (op, _) = d.ops.create(OperationClass::Task, "Creating instance", Some(&row.name), Value::Null, true, &[]);
    let (d2, o) = (d.clone(), op.clone());
    d.ops.run(&op, async move {
        let kept = row.clone();
        tokio::select! {
            r = inst::create(&d2, row, req, o.clone()) => r.map(|_| None).map_err(|e| OpError::Failed(e.to_string())),
            _ = o.on_cancel() => {
                // The create stopped wherever it was: remove what it made.
                inst::discard(&d2, &kept).await;
                Err(OpError::Cancelled)
            }
        }
    });
    accepted(&op)
}

/// `POST /1.0/instances` with source type `copy`: a new instance from a
/// snapshot (`lxc copy NAME/SNAP NEW`); stopped once made.
async fn copy(d: App, mut req: InstancesPost) -> ApiResult {
    let from = snapshots::prepare_copy(&d, &mut req)?;
    let row = inst::begin_create(&d, &mut req)?;
    let (op, _) = d.ops.create(OperationClass::Task, "Copying instance", Some(&row.name), Value::Null, false, &[]);
    let d2 = d.clone();
    d.ops.run(&op, async move {
        snapshots::copy(&d2, row, from).await.map(|_| None).map_err(|e| OpError::Failed(e.to_string()))
    });
    accepted(&op)
}

fn etag_for(inst: &Instance) -> String {
    etag_of(&json!({"config": inst.config, "devices": inst.devices, "ephemeral": inst.ephemeral,
        "description": inst.description, "profiles": inst.profiles}))
}

/// `GET /1.0/instances/{name}` (`recursion=1`: with state and snapshots).
pub async fn get_one(
    State(d): State<App>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let r = inst::row(&d, &name)?;
    let i = to_api(&d, &r);
    let tag = etag_for(&i);
    if recursion(&q) >= 1 {
        let snaps = d.db().snapshots(&name)?;
        let full = InstanceFull {
            state: Some(state_of(&d, &r).await),
            snapshots: Some(snaps.iter().map(|s| snapshot_api(&d, &r, s)).collect()),
            backups: None,
            instance: i,
        };
        return sync_etag(full, tag);
    }
    sync_etag(i, tag)
}

fn check_etag(d: &App, name: &str, h: &HeaderMap) -> Result<(), ApiErr> {
    if let Some(want) = if_match(h) {
        let r = inst::row(d, name)?;
        if etag_for(&to_api(d, &r)) != want {
            return Err(ApiErr::new(412, "ETag doesn't match: the instance changed since you read it"));
        }
    }
    Ok(())
}

/// `PUT /1.0/instances/{name}`: replace config, or restore a snapshot.
pub async fn put(
    State(d): State<App>,
    Path(name): Path<String>,
    h: HeaderMap,
    Body(req): Body<InstancePut>,
) -> ApiResult {
    if let Some(snap) = req.restore.clone() {
        // The lxc client names it NAME/SNAP.
        let snap = snap.strip_prefix(&format!("{name}/")).map(str::to_string).unwrap_or(snap);
        let stateful = req.stateful.unwrap_or(false);
        snapshots::check_restore(&d, &name, &snap, stateful)?;
        let (op, _) = d.ops.create(OperationClass::Task, "Restoring snapshot", Some(&name), Value::Null, false, &[]);
        let d2 = d.clone();
        d.ops.run(&op, async move {
            let restored = snapshots::restore(&d2, &name, &snap, stateful).await;
            restored.map(|_| None).map_err(|e| OpError::Failed(e.to_string()))
        });
        return accepted(&op);
    }
    check_etag(&d, &name, &h)?;
    inst::update(&d, &name, req, true).await?;
    let (op, _) = d.ops.create(OperationClass::Task, "Updating instance", Some(&name), Value::Null, false, &[]);
    d.ops.run(&op, async { Ok(None) });
    accepted(&op)
}

/// `PATCH /1.0/instances/{name}`: merge config.
pub async fn patch(
    State(d): State<App>,
    Path(name): Path<String>,
    h: HeaderMap,
    Body(req): Body<InstancePut>,
) -> ApiResult {
    check_etag(&d, &name, &h)?;
    inst::update(&d, &name, req, false).await?;
    sync(Value::Null)
}

/// `DELETE /1.0/instances/{name}` (`?force=true` stops it first).
pub async fn delete(
    State(d): State<App>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let r = inst::row(&d, &name)?;
    let force = q.get("force").is_some_and(|v| v == "true" || v == "1");
    if r.status.is_up() && !force {
        return Err(InstanceError::BadRequest("Instance is running".into()).into());
    }
    let (op, _) = d.ops.create(OperationClass::Task, "Deleting instance", Some(&name), Value::Null, false, &[]);
    let d2 = d.clone();
    d.ops.run(&op, async move {
        inst::delete(&d2, &name, force).await.map(|_| None).map_err(|e| OpError::Failed(e.to_string()))
    });
    accepted(&op)
}

/// `GET /1.0/instances/{name}/state`.
pub async fn state(State(d): State<App>, Path(name): Path<String>) -> ApiResult {
    let r = inst::row(&d, &name)?;
    sync(state_of(&d, &r).await)
}

/// `PUT /1.0/instances/{name}/state`.
pub async fn state_put(State(d): State<App>, Path(name): Path<String>, Body(req): Body<InstanceStatePut>) -> ApiResult {
    inst::row(&d, &name)?;
    let timeout = Duration::from_secs(if req.timeout > 0 { req.timeout as u64 } else { STOP_TIMEOUT });
    let (desc, action) = match req.action {
        StateAction::Start => ("Starting instance", req.action),
        StateAction::Stop => ("Stopping instance", req.action),
        StateAction::Restart => ("Restarting instance", req.action),
        StateAction::Freeze => ("Freezing instance", req.action),
        StateAction::Unfreeze => ("Unfreezing instance", req.action),
    };
    let (op, _) = d.ops.create(OperationClass::Task, desc, Some(&name), Value::Null, false, &[]);
    let d2 = d.clone();
    let force = req.force;
    d.ops.run(&op, async move {
        let r = match action {
            StateAction::Start => inst::start(&d2, &name).await,
            StateAction::Stop => inst::stop(&d2, &name, timeout, force).await,
            StateAction::Freeze => inst::set_frozen(&d2, &name, true).await,
            StateAction::Unfreeze => inst::set_frozen(&d2, &name, false).await,
            _ => {
                let stopped = inst::stop(&d2, &name, timeout, force).await;
                match stopped {
                    Ok(()) | Err(InstanceError::Conflict(_)) => inst::start(&d2, &name).await.map(|_| {
                        d2.events.lifecycle("instance-restarted", &format!("/1.0/instances/{name}"), Value::Null)
                    }),
                    Err(e) => Err(e),
                }
            }
        };
        r.map(|_| None).map_err(|e| OpError::Failed(e.to_string()))
    });
    accepted(&op)
}

/// `GET /1.0/instances/{name}/snapshots`.
pub async fn snapshots(
    State(d): State<App>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let r = inst::row(&d, &name)?;
    let snaps = d.db().snapshots(&name)?;
    if recursion(&q) >= 1 {
        sync(snaps.iter().map(|s| snapshot_api(&d, &r, s)).collect::<Vec<_>>())
    } else {
        sync(snaps.iter().map(|s| format!("/1.0/instances/{name}/snapshots/{}", s.name)).collect::<Vec<_>>())
    }
}

/// `POST /1.0/instances/{name}/snapshots`.
pub async fn snapshot_post(
    State(d): State<App>,
    Path(name): Path<String>,
    Body(req): Body<InstanceSnapshotsPost>,
) -> ApiResult {
    snapshots::check_create(&d, &name, req.stateful)?;
    let (op, _) = d.ops.create(OperationClass::Task, "Snapshotting instance", Some(&name), Value::Null, false, &[]);
    let d2 = d.clone();
    d.ops.run(&op, async move {
        let made = snapshots::create(&d2, &name, &req.name, req.stateful).await;
        made.map(|_| None).map_err(|e| OpError::Failed(e.to_string()))
    });
    accepted(&op)
}

/// `GET /1.0/instances/{name}/snapshots/{snap}`.
pub async fn snapshot_get(State(d): State<App>, Path((name, snap)): Path<(String, String)>) -> ApiResult {
    let r = inst::row(&d, &name)?;
    let s = d.db().snapshots(&name)?.into_iter().find(|s| s.name == snap).ok_or(InstanceError::SnapshotNotFound)?;
    sync(snapshot_api(&d, &r, &s))
}

/// `POST /1.0/instances/{name}/snapshots/{snap}`: rename.
pub async fn snapshot_rename(
    State(d): State<App>,
    Path((name, snap)): Path<(String, String)>,
    Body(req): Body<InstanceSnapshotPost>,
) -> ApiResult {
    inst::row(&d, &name)?;
    let (op, _) = d.ops.create(OperationClass::Task, "Renaming snapshot", Some(&name), Value::Null, false, &[]);
    let d2 = d.clone();
    d.ops.run(&op, async move {
        snapshots::rename(&d2, &name, &snap, &req.name).await.map(|_| None).map_err(|e| OpError::Failed(e.to_string()))
    });
    accepted(&op)
}

/// `DELETE /1.0/instances/{name}/snapshots/{snap}`.
pub async fn snapshot_delete(State(d): State<App>, Path((name, snap)): Path<(String, String)>) -> ApiResult {
    inst::row(&d, &name)?;
    let (op, _) = d.ops.create(OperationClass::Task, "Deleting snapshot", Some(&name), Value::Null, false, &[]);
    let d2 = d.clone();
    d.ops.run(&op, async move {
        snapshots::delete(&d2, &name, &snap).await.map(|_| None).map_err(|e| OpError::Failed(e.to_string()))
    });
    accepted(&op)
}
