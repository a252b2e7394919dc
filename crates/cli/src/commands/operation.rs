//! `operation list|show|cancel` (`GET /1.0/operations?recursion=1`,
//! `GET|DELETE /1.0/operations/{id}`) and `monitor` (the `/1.0/events`
//! websocket).

use anyhow::Context;
use futures::StreamExt;
use hyper::Method;
use serde_json::Value;
use skiff_api::Operation;
use tokio_tungstenite::tungstenite::Message;

use super::Ctx;
use crate::cli::{EventFormat, MonitorArgs, OperationCmd};
use crate::client::{self, encode_segment};
use crate::format::{self, Table};

/// The operations of `GET /1.0/operations?recursion=1` (grouped by status,
/// `{"running": [...], "success": [...]}`), flattened.
pub fn flatten(v: Value) -> anyhow::Result<Vec<Operation>> {
    let mut out = Vec::new();
    match v {
        Value::Object(groups) => {
            for (_, list) in groups {
                out.extend(client::decode::<Vec<Operation>>(list)?);
            }
        }
        Value::Array(_) => out = client::decode(v)?,
        _ => {}
    }
    out.sort_by(|a, b| a.created_at.cmp(&b.created_at));
    Ok(out)
}

/// ID, CLASS, DESCRIPTION, STATUS, CANCELABLE, CREATED.
pub fn operation_table(ops: &[Operation]) -> Table {
    let mut t = Table::new(&["ID", "CLASS", "DESCRIPTION", "STATUS", "CANCELABLE", "CREATED"]);
    for o in ops {
        let class = serde_json::to_value(o.class).ok().and_then(|v| v.as_str().map(str::to_uppercase));
        t.row(vec![
            o.id.clone(),
            class.unwrap_or_default(),
            o.description.clone(),
            o.status.to_uppercase(),
            if o.may_cancel { "YES" } else { "NO" }.into(),
            format::time(&o.created_at),
        ]);
    }
    t
}

/// Runs an `operation` command.
pub async fn run(ctx: &Ctx, c: OperationCmd) -> anyhow::Result<i32> {
    let client = &ctx.client;
    match c {
        OperationCmd::List { format } => {
            let v: Value = client.get("/1.0/operations?recursion=1").await.context("Failed to list operations")?;
            let ops = flatten(v)?;
            format::print_list(format, &operation_table(&ops), &ops)?;
        }
        OperationCmd::Show { id } => {
            let op: Value = client
                .get(&format!("/1.0/operations/{}", encode_segment(&id)))
                .await
                .with_context(|| format!("Failed to get the operation {id}"))?;
            format::emit(serde_yaml::to_string(&op)?);
        }
        OperationCmd::Cancel { id } => {
            client
                .request(Method::DELETE, &format!("/1.0/operations/{}", encode_segment(&id)), &[], None)
                .await
                .with_context(|| format!("Failed to cancel the operation {id}"))?;
        }
    }
    Ok(0)
}

/// `monitor`: prints each event until the connection ends.
pub async fn monitor(ctx: &Ctx, a: MonitorArgs) -> anyhow::Result<i32> {
    let mut path = "/1.0/events".to_string();
    if !a.kinds.is_empty() {
        let kinds: Vec<String> = a
            .kinds
            .iter()
            .map(|k| clap::ValueEnum::to_possible_value(k).map(|v| v.get_name().to_string()).unwrap_or_default())
            .collect();
        path += &format!("?type={}", kinds.join(","));
    }
    let ws = ctx.client.websocket(&path).await.context("Failed to connect to the event stream")?;
    let (_sink, mut stream) = ws.split();
    while let Some(msg) = stream.next().await {
        let text = match msg.context("The event stream failed")? {
            Message::Text(t) => t.to_string(),
            Message::Binary(b) => String::from_utf8_lossy(&b).into_owned(),
            Message::Close(_) => break,
            _ => continue,
        };
        let Ok(event) = serde_json::from_str::<Value>(&text) else { continue };
        match a.format {
            EventFormat::Json => format::emit(format!("{event}\n")),
            EventFormat::Yaml => format::emit(format!("{}\n", serde_yaml::to_string(&event)?)),
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flattens_groups() {
        let op = |id: &str, t: &str| {
            json!({"id": id, "class": "task", "description": "Creating instance", "created_at": t,
                "updated_at": t, "status": "Running", "status_code": 103})
        };
        let v = json!({"running": [op("b", "2026-11-22T00:00:02Z")], "success": [op("a", "2026-11-22T00:00:01Z")]});
        let ops = flatten(v).unwrap();
        assert_eq!(ops.iter().map(|o| o.id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(operation_table(&ops).rows[0][1], "TASK");
    }
}
