//! `remote add|list|remove|switch`: the client's configuration file
//! (no API calls; see `crate::remote`).

use std::io::Read;

use anyhow::{bail, Context};
use serde_json::json;

use crate::cli::RemoteCmd;
use crate::format::{self, Table};
use crate::remote::{Config, LOCAL};

/// Runs a `remote` command.
pub fn run(c: RemoteCmd) -> anyhow::Result<i32> {
    let mut cfg = Config::load()?;
    match c {
        RemoteCmd::Add { name, url, protocol, username, password_stdin } => {
            let password = if password_stdin {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s).context("Failed to read the password from stdin")?;
                Some(s.trim_end_matches(['\n', '\r']).to_string())
            } else {
                None
            };
            if password.is_some() && username.is_none() {
                bail!("--password-stdin needs --username");
            }
            let r = cfg.add(&name, &url, &protocol)?;
            r.username = username;
            r.password = password;
            cfg.save()?;
        }
        RemoteCmd::List { format } => {
            let mut t = Table::new(&["NAME", "URL", "PROTOCOL", "AUTH"]);
            let current = |n: &str| if cfg.default_remote == n { format!("{n} (current)") } else { n.to_string() };
            t.row(vec![current(LOCAL), "unix://".into(), "skiff".into(), "".into()]);
            let mut raw = serde_json::Map::new();
            raw.insert(
                LOCAL.into(),
                json!({"addr": "unix://", "protocol": "skiff", "default": cfg.default_remote == LOCAL}),
            );
            for (name, r) in &cfg.remotes {
                let auth = if r.username.is_some() { "basic" } else { "docker config" };
                t.row(vec![current(name), r.addr.clone(), r.protocol.clone(), auth.into()]);
                // Never print passwords.
                raw.insert(
                    name.clone(),
                    json!({"addr": r.addr, "protocol": r.protocol, "username": r.username,
                        "default": cfg.default_remote == *name}),
                );
            }
            format::print_list(format, &t, &raw)?;
        }
        RemoteCmd::Remove { name } => {
            if cfg.remotes.remove(&name).is_none() {
                bail!("Remote {name} doesn't exist");
            }
            if cfg.default_remote == name {
                cfg.default_remote = LOCAL.into();
            }
            cfg.save()?;
        }
        RemoteCmd::Switch { name } => {
            if name != LOCAL && !cfg.remotes.contains_key(&name) {
                bail!("Remote {name} doesn't exist");
            }
            cfg.default_remote = name;
            cfg.save()?;
        }
    }
    Ok(0)
}
