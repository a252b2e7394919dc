//! `info NAME`: `GET /1.0/instances/{name}`, `.../state` and
//! `.../snapshots?recursion=1`; `--show-log` adds `GET .../console`.

use std::fmt::Write as _;

use anyhow::Context;
use skiff_api::{Instance, InstanceSnapshot, InstanceState};

use super::{instance_path, Ctx};
use crate::cli::InfoArgs;
use crate::console;
use crate::format::{self, Table};

/// `info`.
pub async fn info(ctx: &Ctx, a: InfoArgs) -> anyhow::Result<i32> {
    let fail = || format!("Failed to get \"{}\"", a.name);
    let inst: Instance = ctx.client.get(&instance_path(&a.name, "")).await.with_context(fail)?;
    // A stopped instance may have no state to show: that is not an error.
    let state: Option<InstanceState> = ctx.client.get(&instance_path(&a.name, "/state")).await.ok();
    let snaps: Vec<InstanceSnapshot> =
        ctx.client.get(&instance_path(&a.name, "/snapshots?recursion=1")).await.unwrap_or_default();
    format::emit(render(&inst, state.as_ref(), &snaps));
    if a.show_log {
        let log = console::log(&ctx.client, &a.name).await?;
        format::emit("\nLog:\n\n");
        format::emit(&log);
    }
    Ok(0)
}

/// The text of `info`.
pub fn render(inst: &Instance, state: Option<&InstanceState>, snaps: &[InstanceSnapshot]) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "Name: {}", inst.name);
    let _ = writeln!(o, "Description: {}", inst.description);
    let _ = writeln!(o, "Status: {}", inst.status.to_uppercase());
    let _ = writeln!(o, "Type: {}", inst.kind.as_str());
    let _ = writeln!(o, "Architecture: {}", inst.architecture);
    if let Some(s) = state.filter(|s| s.pid > 0) {
        let _ = writeln!(o, "PID: {}", s.pid);
    }
    let _ = writeln!(o, "Created: {}", format::time(&inst.created_at));
    let last = format::time(&inst.last_used_at);
    if !last.is_empty() {
        let _ = writeln!(o, "Last Used: {last}");
    }
    if inst.ephemeral {
        let _ = writeln!(o, "Ephemeral: true");
    }
    let volatile: Vec<_> = inst
        .config
        .iter()
        .chain(inst.expanded_config.iter())
        .filter(|(k, _)| k.starts_with("volatile.last_state.") || *k == "volatile.restarts")
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_iter()
        .collect();
    if !volatile.is_empty() {
        let _ = writeln!(o, "\nLast state:");
        for (k, v) in volatile {
            let _ = writeln!(o, "  {}: {v}", k.trim_start_matches("volatile."));
        }
    }
    if let Some(s) = state.filter(|s| s.status_code != 102 || s.memory.usage > 0) {
        let _ = writeln!(o, "\nResources:");
        if s.processes >= 0 {
            let _ = writeln!(o, "  Processes: {}", s.processes);
        }
        let _ = writeln!(o, "  CPU usage:\n    CPU usage (in seconds): {}", s.cpu.usage / 1_000_000_000);
        let _ = writeln!(o, "  Memory usage:\n    Memory (current): {}", format::bytes(s.memory.usage));
        if s.memory.usage_peak > 0 {
            let _ = writeln!(o, "    Memory (peak): {}", format::bytes(s.memory.usage_peak));
        }
        if s.memory.total > 0 {
            let _ = writeln!(o, "    Memory (total): {}", format::bytes(s.memory.total));
        }
        if let Some(net) = s.network.as_ref().filter(|n| !n.is_empty()) {
            let _ = writeln!(o, "  Network usage:");
            for (name, n) in net {
                let _ = writeln!(o, "    {name}:");
                let _ = writeln!(o, "      Type: {}", n.kind);
                let _ = writeln!(o, "      State: {}", n.state.to_uppercase());
                if !n.host_name.is_empty() {
                    let _ = writeln!(o, "      Host interface: {}", n.host_name);
                }
                let _ = writeln!(o, "      MAC address: {}", n.hwaddr);
                let _ = writeln!(o, "      MTU: {}", n.mtu);
                for (k, label) in [("bytes_received", "Bytes received"), ("bytes_sent", "Bytes sent")] {
                    if let Some(b) = n.counters.get(k) {
                        let _ = writeln!(o, "      {label}: {}", format::bytes(*b));
                    }
                }
                if !n.addresses.is_empty() {
                    let _ = writeln!(o, "      IP addresses:");
                    for a in &n.addresses {
                        let _ = writeln!(
                            o,
                            "        {}:{} {}/{} ({})",
                            a.family,
                            " ".repeat(6 - a.family.len().min(5)),
                            a.address,
                            a.netmask,
                            a.scope
                        );
                    }
                }
            }
        }
    }
    if !snaps.is_empty() {
        let _ = writeln!(o, "\nSnapshots:");
        o += &snapshot_table(snaps).boxed();
    }
    o
}

/// NAME, TAKEN AT, EXPIRES AT, STATEFUL.
pub fn snapshot_table(snaps: &[InstanceSnapshot]) -> Table {
    let mut t = Table::new(&["NAME", "TAKEN AT", "EXPIRES AT", "STATEFUL"]);
    for s in snaps {
        let stateful = if s.stateful { "YES" } else { "NO" };
        t.row(vec![s.name.clone(), format::time(&s.created_at), format::time(&s.expires_at), stateful.into()]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders() {
        let full = crate::commands::instances::tests_support::sample();
        let mut inst = full[0].instance.clone();
        inst.config.insert("volatile.last_state.exit_code".into(), "137".into());
        inst.config.insert("volatile.restarts".into(), "2".into());
        let text = render(&inst, full[0].state.as_ref(), full[0].snapshots.as_deref().unwrap());
        for want in [
            "Name: web",
            "Status: RUNNING",
            "Type: virtual-machine",
            "PID: 42",
            "last_state.exit_code: 137",
            "restarts: 2",
            "inet:   10.118.0.5/24 (global)",
            "| s0   |",
        ] {
            assert!(text.contains(want), "{want} in\n{text}");
        }
    }
}
