//! `snapshot create|restore|delete|list|rename`:
//! `POST /1.0/instances/{name}/snapshots {name}`, `PUT /1.0/instances/{name} {restore}`,
//! `DELETE .../snapshots/{snap}`, `GET .../snapshots?recursion=1`,
//! `POST .../snapshots/{old} {name: new}`.

use anyhow::Context;
use hyper::Method;
use serde_json::Value;
use skiff_api::{InstancePut, InstanceSnapshot, InstanceSnapshotPost, InstanceSnapshotsPost};

use super::{instance_path, Ctx};
use crate::cli::SnapshotCmd;
use crate::client::{self, encode_segment};
use crate::format;

/// Runs a `snapshot` command.
pub async fn run(ctx: &Ctx, c: SnapshotCmd) -> anyhow::Result<i32> {
    let client = &ctx.client;
    match c {
        SnapshotCmd::Create { name, snap } => {
            let body = InstanceSnapshotsPost { name: snap.clone().unwrap_or_default(), stateful: false };
            client
                .run(Method::POST, &instance_path(&name, "/snapshots"), Some(&client::json(&body)))
                .await
                .with_context(|| format!("Failed to snapshot \"{name}\""))?;
        }
        SnapshotCmd::Restore { name, snap } => {
            let body = InstancePut { restore: Some(snap.clone()), ..Default::default() };
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
