//! `network list|info`: `GET /1.0/networks?recursion=1`,
//! `GET /1.0/networks/{name}` and `.../leases`.

use std::fmt::Write as _;

use anyhow::Context;
use serde_json::Value;
use skiff_api::{Network, NetworkLease};

use super::Ctx;
use crate::cli::NetworkCmd;
use crate::client::{self, encode_segment};
use crate::format::{self, Table};

/// NAME, TYPE, MANAGED, IPV4, DESCRIPTION, USED BY, STATE.
pub fn network_table(nets: &[Network]) -> Table {
    let mut t = Table::new(&["NAME", "TYPE", "MANAGED", "IPV4", "DESCRIPTION", "USED BY", "STATE"]);
    for n in nets {
        t.row(vec![
            n.name.clone(),
            n.kind.clone(),
            if n.managed { "YES" } else { "NO" }.into(),
            n.config.get("ipv4.address").cloned().unwrap_or_default(),
            n.description.clone(),
            n.used_by.len().to_string(),
            n.status.to_uppercase(),
        ]);
    }
    t
}

/// Runs a `network` command.
pub async fn run(ctx: &Ctx, c: NetworkCmd) -> anyhow::Result<i32> {
    match c {
        NetworkCmd::List { format } => {
            let raw: Vec<Value> =
                ctx.client.get("/1.0/networks?recursion=1").await.context("Failed to list networks")?;
            let nets: Vec<Network> = client::decode(Value::Array(raw.clone()))?;
            format::print_list(format, &network_table(&nets), &raw)?;
        }
        NetworkCmd::Info { name } => {
            let fail = || format!("Failed to get the network \"{name}\"");
            let path = format!("/1.0/networks/{}", encode_segment(&name));
            let net: Network = ctx.client.get(&path).await.with_context(fail)?;
            let leases: Vec<NetworkLease> = ctx.client.get(&format!("{path}/leases")).await.with_context(fail)?;
            format::emit(render(&net, &leases));
        }
    }
    Ok(0)
}

/// The text of `network info`.
pub fn render(net: &Network, leases: &[NetworkLease]) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "Name: {}", net.name);
    let _ = writeln!(o, "Type: {}", net.kind);
    let _ = writeln!(o, "Managed: {}", net.managed);
    let _ = writeln!(o, "Status: {}", net.status);
    if !net.description.is_empty() {
        let _ = writeln!(o, "Description: {}", net.description);
    }
    if !net.config.is_empty() {
        let _ = writeln!(o, "Config:");
        for (k, v) in &net.config {
            let _ = writeln!(o, "  {k}: {v}");
        }
    }
    if !net.used_by.is_empty() {
        let _ = writeln!(o, "Used by:");
        for u in &net.used_by {
            let _ = writeln!(o, "  {u}");
        }
    }
    let _ = writeln!(o, "\nLeases:");
    let mut t = Table::new(&["HOSTNAME", "MAC ADDRESS", "IP ADDRESS", "TYPE"]);
    for l in leases {
        t.row(vec![l.hostname.clone(), l.hwaddr.clone(), l.address.clone(), l.kind.to_uppercase()]);
    }
    o += &t.boxed();
    o
}
