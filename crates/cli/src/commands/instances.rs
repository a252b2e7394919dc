//! Instances: `launch`/`init` (`POST /1.0/instances`), `list`
//! (`GET /1.0/instances?recursion=2`), `start`/`stop`/`restart`
//! (`PUT /1.0/instances/{name}/state`), `delete` (`DELETE /1.0/instances/{name}`),
//! `exec` and `console`.

use anyhow::Context;
use hyper::Method;
use serde_json::Value;
use skiff_api::{InstanceFull, InstanceStatePut, InstanceType, InstancesPost, StateAction, StatusCode};

use super::{instance_path, Ctx, Reported};
use crate::cli::{ConsoleArgs, CreateArgs, DeleteArgs, ExecArgs, ListArgs};
use crate::client::{self, Client};
use crate::format::{self, Table};
use crate::{console, creds, exec, image_ref, progress, remote, term};

/// `launch` (`start`) and `init`.
pub async fn create(ctx: &Ctx, a: CreateArgs, start: bool) -> anyhow::Result<i32> {
    let cfg = remote::Config::load()?;
    let source = image_ref::source(&a.image, &cfg, creds::docker_lookup)?;
    let kind = Some(if a.vm { InstanceType::VirtualMachine } else { InstanceType::Container });
    let post = InstancesPost {
        name: a.name.clone().unwrap_or_default(),
        kind,
        source,
        config: a.config.into_iter().collect(),
        ephemeral: a.ephemeral,
        description: a.description.unwrap_or_default(),
        ..Default::default()
    };
    match &a.name {
        Some(n) => ctx.say(format!("Creating {n}")),
        None => ctx.say("Creating the instance"),
    }
    let fail = || "Failed to create the instance".to_string();
    let op =
        ctx.client.start_op(Method::POST, "/1.0/instances", Some(&client::json(&post))).await.with_context(fail)?;
    let done = progress::wait(&ctx.client, &op, ctx.tty && !ctx.quiet).await.with_context(fail)?;
    let name = match a.name {
        Some(n) => n,
        None => {
            let url = done.resources.get("instances").and_then(|v| v.first()).cloned().unwrap_or_default();
            let n = url.rsplit('/').next().unwrap_or_default().to_string();
            ctx.say(format!("Instance name is: {n}"));
            n
        }
    };
    if start {
        ctx.say(format!("Starting {name}"));
        change_state(&ctx.client, &name, StateAction::Start, false, None)
            .await
            .with_context(|| format!("Failed to start \"{name}\""))?;
    }
    Ok(0)
}

/// `PUT /1.0/instances/{name}/state`, waiting for the operation.
pub async fn change_state(
    client: &Client,
    name: &str,
    action: StateAction,
    force: bool,
    timeout: Option<i64>,
) -> anyhow::Result<()> {
    let body = InstanceStatePut { action, timeout: timeout.unwrap_or(-1), force, stateful: false };
    client.run(Method::PUT, &instance_path(name, "/state"), Some(&client::json(&body))).await?;
    Ok(())
}

/// `start`, `stop`, `restart` of several instances: each failure is printed.
pub async fn state(
    ctx: &Ctx,
    verb: &str,
    names: Vec<String>,
    force: bool,
    timeout: Option<i64>,
) -> anyhow::Result<i32> {
    let action = match verb {
        "start" => StateAction::Start,
        "stop" => StateAction::Stop,
        "pause" => StateAction::Freeze,
        _ => StateAction::Restart,
    };
    let mut failed = 0;
    for name in &names {
        if let Err(e) = change_state(&ctx.client, name, action, force, timeout).await {
            if names.len() == 1 || super::not_running(&e) {
                return Err(e.context(format!("Failed to {verb} \"{name}\"")));
            }
            eprintln!("Error: Failed to {verb} \"{name}\": {e:#}");
            failed += 1;
        }
    }
    if failed > 0 {
        return Err(Reported(failed).into());
    }
    Ok(0)
}

/// `delete [--force]`.
pub async fn delete(ctx: &Ctx, a: DeleteArgs) -> anyhow::Result<i32> {
    let mut failed = 0;
    for name in &a.names {
        if let Err(e) = delete_one(&ctx.client, name, a.force).await {
            let e = e.context(format!("Failed to delete \"{name}\""));
            if a.names.len() == 1 || super::not_running(&e) {
                return Err(e);
            }
            eprintln!("Error: {e:#}");
            failed += 1;
        }
    }
    if failed > 0 {
        return Err(Reported(failed).into());
    }
    Ok(0)
}

async fn delete_one(client: &Client, name: &str, force: bool) -> anyhow::Result<()> {
    if force {
        let inst: skiff_api::Instance = client.get(&instance_path(name, "")).await?;
        if StatusCode::from_code(inst.status_code) != StatusCode::Stopped {
            change_state(client, name, StateAction::Stop, true, None).await?;
        }
    }
    client.run(Method::DELETE, &instance_path(name, ""), None).await?;
    Ok(())
}

/// IPv4 (`family` inet) or IPv6 global addresses, `10.0.0.2 (eth0)`, one per line.
pub fn addresses(inst: &InstanceFull, family: &str) -> String {
    let mut out = Vec::new();
    if let Some(net) = inst.state.as_ref().and_then(|s| s.network.as_ref()) {
        for (iface, st) in net {
            if iface == "lo" {
                continue;
            }
            for a in &st.addresses {
                if a.family == family && a.scope == "global" {
                    out.push(format!("{} ({iface})", a.address));
                }
            }
        }
    }
    out.join("\n")
}

/// `CONTAINER` or `VIRTUAL-MACHINE`.
pub fn type_name(kind: InstanceType) -> String {
    kind.as_str().to_uppercase()
}

fn matches(inst: &InstanceFull, filter: &str) -> bool {
    let i = &inst.instance;
    match filter.split_once('=') {
        None => i.name.starts_with(filter),
        Some(("status" | "state", v)) => i.status.eq_ignore_ascii_case(v),
        Some(("type", v)) => i.kind.as_str() == v || type_name(i.kind).eq_ignore_ascii_case(v),
        Some(("name", v)) => i.name.starts_with(v),
        Some((k, v)) => i.expanded_config.get(k).or_else(|| i.config.get(k)).is_some_and(|c| c == v),
    }
}

/// The list table for `columns` (n s 4 6 t S d c).
pub fn list_table(list: &[InstanceFull], columns: &str) -> anyhow::Result<Table> {
    let mut headers = Vec::new();
    for c in columns.chars() {
        headers.push(match c {
            'n' => "NAME",
            's' => "STATE",
            '4' => "IPV4",
            '6' => "IPV6",
            't' => "TYPE",
            'S' => "SNAPSHOTS",
            'd' => "DESCRIPTION",
            'c' => "CREATED AT",
            _ => anyhow::bail!("Unknown column '{c}' (n s 4 6 t S d c)"),
        });
    }
    let mut t = Table::new(&headers);
    for inst in list {
        let i = &inst.instance;
        t.row(
            columns
                .chars()
                .map(|c| match c {
                    'n' => i.name.clone(),
                    's' => i.status.to_uppercase(),
                    '4' => addresses(inst, "inet"),
                    '6' => addresses(inst, "inet6"),
                    't' => type_name(i.kind),
                    'S' => inst.snapshots.as_ref().map_or(0, Vec::len).to_string(),
                    'd' => i.description.clone(),
                    _ => format::time(&i.created_at),
                })
                .collect(),
        );
    }
    Ok(t)
}

/// `list [FILTER]`.
pub async fn list(ctx: &Ctx, a: ListArgs) -> anyhow::Result<i32> {
    let raw: Vec<Value> = ctx.client.get("/1.0/instances?recursion=2").await.context("Failed to list instances")?;
    let mut shown = Vec::new();
    let mut parsed = Vec::new();
    for v in raw {
        let inst: InstanceFull = client::decode(v.clone()).context("Failed to list instances")?;
        if a.filter.iter().all(|f| matches(&inst, f)) {
            shown.push(v);
            parsed.push(inst);
        }
    }
    let table = list_table(&parsed, &a.columns)?;
    format::print_list(a.format, &table, &shown)?;
    Ok(0)
}

/// `exec`: the command's exit code.
pub async fn exec(ctx: &Ctx, a: ExecArgs) -> anyhow::Result<i32> {
    let interactive = a.interactive(term::is_tty(0) && term::is_tty(1));
    let req = exec::ExecRequest {
        name: a.name.clone(),
        command: a.command.clone(),
        environment: a.env.iter().cloned().collect(),
        cwd: a.cwd.clone().unwrap_or_default(),
        user: a.user.unwrap_or(0),
        group: a.group.unwrap_or(0),
        interactive,
        no_stdin: a.disable_stdin,
    };
    exec::run(&ctx.client, req).await
}

/// `console [--show-log]`.
pub async fn console(ctx: &Ctx, a: ConsoleArgs) -> anyhow::Result<i32> {
    if a.show_log {
        let log = console::log(&ctx.client, &a.name).await?;
        format::emit(&log);
        return Ok(0);
    }
    console::attach(&ctx.client, &a.name).await?;
    Ok(0)
}

/// Sample data shared by tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use serde_json::json;
    use skiff_api::InstanceFull;

    /// A running VM with an address and a snapshot, and a stopped container.
    pub(crate) fn sample() -> Vec<InstanceFull> {
        let v = json!([{
            "architecture": "x86_64", "config": {"limits.cpu": "2"}, "created_at": "2026-11-22T00:06:16Z",
            "expanded_config": {"limits.cpu": "2"}, "name": "web", "status": "Running", "status_code": 103,
            "type": "virtual-machine",
            "state": {"status": "Running", "status_code": 103, "pid": 42, "network": {
                "lo": {"addresses": [{"family": "inet", "address": "127.0.0.1", "netmask": "8", "scope": "local"}]},
                "eth0": {"addresses": [
                    {"family": "inet", "address": "10.118.0.5", "netmask": "24", "scope": "global"},
                    {"family": "inet6", "address": "fe80::1", "netmask": "64", "scope": "link"}]}}},
            "snapshots": [{"name": "s0", "created_at": "2026-11-22T00:07:00Z"}]
        }, {
            "architecture": "x86_64", "created_at": "2026-11-22T00:06:16Z", "name": "db", "status": "Stopped",
            "status_code": 102, "type": "container", "state": null, "snapshots": null
        }]);
        serde_json::from_value(v).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::sample;
    use super::*;

    #[test]
    fn table_and_filters() {
        let list = sample();
        let t = list_table(&list, "ns4tS").unwrap();
        assert_eq!(t.rows[0], ["web", "RUNNING", "10.118.0.5 (eth0)", "VIRTUAL-MACHINE", "1"]);
        assert_eq!(t.rows[1], ["db", "STOPPED", "", "CONTAINER", "0"]);
        assert!(list_table(&list, "nx").is_err());
        assert!(matches(&list[0], "we") && !matches(&list[1], "we"));
        assert!(matches(&list[0], "limits.cpu=2") && matches(&list[1], "status=stopped"));
        assert!(matches(&list[1], "type=container"));
        assert_eq!(t.csv(), "web,RUNNING,10.118.0.5 (eth0),VIRTUAL-MACHINE,1\ndb,STOPPED,,CONTAINER,0\n");
    }
}
