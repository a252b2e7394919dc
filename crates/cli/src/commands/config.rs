//! `config show|get|set|unset|edit`: the instance's editable fields
//! (`GET /1.0/instances/{name}` with its ETag), changed with `PATCH`
//! (set: `{"config": {KEY: VALUE}}`) or `PUT` (unset, edit: the whole
//! editable object, since a PATCH merges config keys and cannot drop one),
//! both with `If-Match: <ETag>`; a 412 means someone else changed it.

use std::io::{BufRead, Write};
use std::os::unix::fs::OpenOptionsExt;

use anyhow::{anyhow, bail, Context};
use hyper::Method;
use serde_json::{json, Map, Value};

use super::{instance_path, Ctx};
use crate::cli::{ConfigCmd, DeviceCmd};
use crate::client::{Client, ClientError};
use crate::term;

/// The fields `config show` prints and `config edit` sends back.
const EDITABLE: [&str; 7] = ["architecture", "config", "devices", "ephemeral", "profiles", "stateful", "description"];

/// The editable part of an instance (with `expanded`: the expanded config and devices).
pub fn editable(inst: &Value, expanded: bool) -> Value {
    let mut out = Map::new();
    for k in EDITABLE {
        let src = match (expanded, k) {
            (true, "config") => "expanded_config",
            (true, "devices") => "expanded_devices",
            _ => k,
        };
        if let Some(v) = inst.get(src) {
            out.insert(k.to_string(), v.clone());
        }
    }
    Value::Object(out)
}

/// `KEY=VALUE...` or `KEY VALUE`.
pub fn parse_set(args: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    if args.len() == 2 && !args[0].contains('=') {
        return Ok(vec![(args[0].clone(), args[1].clone())]);
    }
    args.iter()
        .map(|a| match a.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(anyhow!("Invalid argument \"{a}\": expected KEY=VALUE (or KEY VALUE)")),
        })
        .collect()
}

fn explain_412(e: ClientError, name: &str) -> anyhow::Error {
    if e.code() == Some(412) {
        anyhow!("\"{name}\" was changed by someone else since it was read (ETag mismatch); run the command again")
    } else {
        anyhow::Error::from(e)
    }
}

fn if_match(etag: &Option<String>) -> Vec<(&'static str, String)> {
    etag.iter().map(|e| ("If-Match", e.clone())).collect()
}

async fn read(client: &Client, name: &str) -> anyhow::Result<(Value, Option<String>)> {
    client.get_etag(&instance_path(name, "")).await.with_context(|| format!("Failed to get \"{name}\""))
}

/// Runs a `config` command.
pub async fn run(ctx: &Ctx, c: ConfigCmd) -> anyhow::Result<i32> {
    let client = &ctx.client;
    match c {
        ConfigCmd::Show { name, expanded } => {
            let (inst, _) = read(client, &name).await?;
            crate::format::emit(serde_yaml::to_string(&editable(&inst, expanded))?);
        }
        ConfigCmd::Get { name, key } => {
            let (inst, _) = read(client, &name).await?;
            let v = inst
                .pointer(&format!("/config/{}", key.replace('~', "~0").replace('/', "~1")))
                .or_else(|| inst.get("expanded_config").and_then(|c| c.get(&key)));
            crate::format::emit(format!("{}\n", v.and_then(Value::as_str).unwrap_or("")));
        }
        ConfigCmd::Set { name, args } => {
            let pairs = parse_set(&args)?;
            let fail = || format!("Failed to set config on \"{name}\"");
            let (_, etag) = read(client, &name).await?;
            let config: Map<String, Value> = pairs.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
            client
                .run_with(
                    Method::PATCH,
                    &instance_path(&name, ""),
                    &if_match(&etag),
                    Some(&json!({ "config": config })),
                )
                .await
                .map_err(|e| explain_412(e, &name))
                .with_context(fail)?;
        }
        ConfigCmd::Unset { name, key } => {
            let (inst, etag) = read(client, &name).await?;
            let mut body = editable(&inst, false);
            let removed = body.get_mut("config").and_then(Value::as_object_mut).and_then(|c| c.remove(&key));
            if removed.is_none() {
                bail!("Failed to unset \"{key}\" on \"{name}\": the key is not set");
            }
            put(client, &name, &etag, &body).await?;
        }
        ConfigCmd::Edit { name } => edit(client, &name).await?,
        ConfigCmd::Device(cmd) => device(client, cmd).await?,
    }
    Ok(0)
}

/// `config device`: changes the instance's `devices` map and PUTs it.
async fn device(client: &Client, cmd: DeviceCmd) -> anyhow::Result<()> {
    match cmd {
        DeviceCmd::List { name } => {
            let (inst, _) = read(client, &name).await?;
            let devices = inst.get("devices").and_then(Value::as_object).cloned().unwrap_or_default();
            let names: String = devices.keys().map(|k| format!("{k}\n")).collect();
            crate::format::emit(names);
        }
        DeviceCmd::Show { name } => {
            let (inst, _) = read(client, &name).await?;
            crate::format::emit(serde_yaml::to_string(inst.get("devices").unwrap_or(&json!({})))?);
        }
        DeviceCmd::Add { name, device, kind, args } => {
            let (inst, etag) = read(client, &name).await?;
            let mut body = editable(&inst, false);
            let devices = body
                .as_object_mut()
                .context("the instance is not an object")?
                .entry("devices")
                .or_insert_with(|| json!({}));
            let devices = devices.as_object_mut().context("devices is not a map")?;
            if devices.contains_key(&device) {
                bail!("Failed to add device \"{device}\" to \"{name}\": the device exists already");
            }
            let mut settings = Map::new();
            settings.insert("type".into(), Value::String(kind));
            for a in &args {
                let (k, v) =
                    a.split_once('=').with_context(|| format!("Bad device setting {a:?}: expected KEY=VALUE"))?;
                settings.insert(k.into(), Value::String(v.into()));
            }
            devices.insert(device.clone(), Value::Object(settings));
            put(client, &name, &etag, &body).await.with_context(|| format!("Failed to add device \"{device}\""))?;
        }
        DeviceCmd::Remove { name, device } => {
            let (inst, etag) = read(client, &name).await?;
            let mut body = editable(&inst, false);
            let removed = body.get_mut("devices").and_then(Value::as_object_mut).and_then(|d| d.remove(&device));
            if removed.is_none() {
                bail!("Failed to remove device \"{device}\" from \"{name}\": no such device");
            }
            put(client, &name, &etag, &body).await.with_context(|| format!("Failed to remove device \"{device}\""))?;
        }
    }
    Ok(())
}

async fn put(client: &Client, name: &str, etag: &Option<String>, body: &Value) -> anyhow::Result<()> {
    client
        .run_with(Method::PUT, &instance_path(name, ""), &if_match(etag), Some(body))
        .await
        .map_err(|e| explain_412(e, name))
        .with_context(|| format!("Failed to update \"{name}\""))?;
    Ok(())
}

/// `config edit`: $VISUAL/$EDITOR (else vi) on the YAML, then PUT.
async fn edit(client: &Client, name: &str) -> anyhow::Result<()> {
    let (inst, etag) = read(client, name).await?;
    let header = "### Edit the configuration of the instance; lines starting with # are ignored.\n";
    let mut text = format!("{header}{}", serde_yaml::to_string(&editable(&inst, false))?);
    let path = std::env::temp_dir().join(format!("skiff-config-{}-{name}.yaml", std::process::id()));
    let result = loop {
        {
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)?;
            f.write_all(text.as_bytes())?;
        }
        let editor = std::env::var("VISUAL").or_else(|_| std::env::var("EDITOR")).unwrap_or_else(|_| "vi".into());
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{editor} \"$1\""))
            .arg("sh")
            .arg(&path)
            .status()
            .with_context(|| format!("Failed to run the editor \"{editor}\""))?;
        if !status.success() {
            break Err(anyhow!("The editor \"{editor}\" failed ({status})"));
        }
        text = std::fs::read_to_string(&path)?;
        let outcome = match serde_yaml::from_str::<Value>(&text) {
            Ok(body) => put(client, name, &etag, &body).await,
            Err(e) => Err(anyhow!("Invalid YAML: {e}")),
        };
        match outcome {
            Ok(()) => break Ok(()),
            Err(e) if term::is_tty(0) => {
                eprintln!("Error: {e:#}");
                eprint!("Press enter to edit again, or Ctrl+C to give up: ");
                let mut line = String::new();
                if std::io::stdin().lock().read_line(&mut line)? == 0 {
                    break Err(e);
                }
            }
            Err(e) => break Err(e),
        }
    };
    let _ = std::fs::remove_file(&path);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_args() {
        let s = |a: &[&str]| parse_set(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(s(&["a=1", "b=x=y"]).unwrap(), [("a".into(), "1".into()), ("b".into(), "x=y".into())]);
        assert_eq!(s(&["limits.cpu", "2"]).unwrap(), [("limits.cpu".into(), "2".into())]);
        assert!(s(&["a"]).is_err() && s(&["a", "b", "c"]).is_err());
    }

    #[test]
    fn editable_fields() {
        let inst = json!({"name": "web", "status": "Running", "config": {"a": "1"}, "expanded_config": {"a": "1", "b": "2"},
            "devices": {}, "ephemeral": false, "profiles": ["default"], "architecture": "x86_64"});
        let e = editable(&inst, false);
        assert!(e.get("name").is_none() && e.get("status").is_none());
        assert_eq!(e["config"], json!({"a": "1"}));
        assert_eq!(editable(&inst, true)["config"], json!({"a": "1", "b": "2"}));
    }
}
