//! `snapshot create|restore|delete|list|rename`:
//! `POST /1.0/instances/{name}/snapshots {name, stateful}`, `PUT /1.0/instances/{name} {restore, stateful}`,
//! `DELETE .../snapshots/{snap}`, `GET .../snapshots?recursion=1`,
//! `POST .../snapshots/{old} {name: new}`; and `copy NAME/SNAP NEW`:
//! `POST /1.0/instances {name, source: {type: copy, source: NAME/SNAP}, stateful}`.

use anyhow::Context;
use hyper::Method;
use serde_json::Value;
use skiff_api::{InstancePut, InstanceSnapshot, InstanceSnapshotPost, InstanceSnapshotsPost, InstancesPost};

use super::{instance_path, Ctx};
use crate::cli::SnapshotCmd;
use crate::client::{self, encode_segment};
use crate::format;

/// Runs a `snapshot` command.
pub async fn run(ctx: &Ctx, c: SnapshotCmd) -> anyhow::Result<i32> {
    let client = &ctx.client;
    match c {
        SnapshotCmd::Create { name, snap, stateful } => {
            let body = InstanceSnapshotsPost { name: snap.clone().unwrap_or_default(), stateful };
            client
                .run(Method::POST, &instance_path(&name, "/snapshots"), Some(&client::json(&body)))
                .await
                .with_context(|| format!("Failed to snapshot \"{name}\""))?;
        }
        SnapshotCmd::Restore { name, snap, stateful } => {
            let body = InstancePut { restore: Some(snap.clone()), stateful: Some(stateful), ..Default::default() };
            client
                .run(Method::PUT, &instance_path(&name, ""), Some(&client::json(&body)))
                .await
                .with_context(|| format!("Failed to restore \"{name}\" to \"{snap}\""))?;
        }
        SnapshotCmd::Delete { name, snap } => {
            client
                .run(Method::DELETE, &instance_path(&name, &format!("/snapshots/{}", encode_segment(&snap))), None)
                .await
                .with_context(|| format!("Failed to delete the snapshot \"{name}/{snap}\""))?;
        }
        SnapshotCmd::List { name, format } => {
            let raw: Vec<Value> = client
                .get(&instance_path(&name, "/snapshots?recursion=1"))
                .await
                .with_context(|| format!("Failed to list the snapshots of \"{name}\""))?;
            let snaps: Vec<InstanceSnapshot> = client::decode(Value::Array(raw.clone()))?;
            format::print_list(format, &super::info::snapshot_table(&snaps), &raw)?;
        }
        SnapshotCmd::Rename { name, old, new } => {
            let body = InstanceSnapshotPost { name: new.clone() };
            let path = instance_path(&name, &format!("/snapshots/{}", encode_segment(&old)));
            client
                .run(Method::POST, &path, Some(&client::json(&body)))
                .await
                .with_context(|| format!("Failed to rename the snapshot \"{name}/{old}\" to \"{new}\""))?;
        }
    }
    Ok(0)
}

/// `copy NAME/SNAP NEW`: stateful when the snapshot is (unless `stateless`).
pub async fn copy(ctx: &Ctx, source: String, name: String, stateless: bool) -> anyhow::Result<i32> {
    let client = &ctx.client;
    let Some((inst, snap)) = source.split_once('/') else {
        anyhow::bail!("{source}: expected NAME/SNAP (Skiff copies instances from their snapshots)");
    };
    let path = instance_path(inst, &format!("/snapshots/{}", encode_segment(snap)));
    let shown: InstanceSnapshot = client.get(&path).await.with_context(|| format!("Failed to read \"{source}\""))?;
    let mut post = InstancesPost { name: name.clone(), stateful: shown.stateful && !stateless, ..Default::default() };
    post.source.kind = "copy".into();
    post.source.source = Some(source.clone());
    client
        .run(Method::POST, "/1.0/instances", Some(&client::json(&post)))
        .await
        .with_context(|| format!("Failed to copy \"{source}\" to \"{name}\""))?;
    Ok(0)
}
