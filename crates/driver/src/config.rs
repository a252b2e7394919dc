//! Instance config keys (Incus names) for VMs: validation and their mapping
//! to the VM's size and main process.
//!
//! | key | meaning |
//! |---|---|
//! | `limits.cpu` | vCPUs (1-255; default 1) |
//! | `limits.memory` | memory: `512MiB`, `1GiB`, `256MB`, `1073741824` (bytes); default 512 MiB |
//! | `limits.memory.hotplug` | the most `limits.memory` may grow to while the VM runs (virtio-mem; the guest could touch this much); unset: memory changes need a restart |
//! | `environment.NAME` | environment variable, over the image's |
//! | `oci.entrypoint` | shell-words command line replacing the image's entrypoint and cmd |
//! | `oci.cwd` | working directory (absolute) |
//! | `oci.uid`, `oci.gid` | identity of the main process |
//! | `boot.autorestart` | `true`: the agent restarts the main process whenever it exits |
//! | `boot.autostart`, `boot.autostart.delay`, `boot.autostart.priority` | the daemon's |
//! | `user.*`, `volatile.*`, `image.*` | free-form or the daemon's; accepted |

use std::collections::BTreeMap;

use skiff_agent_proto::{main_process_from_config, MainProcess, OciError, RestartPolicy};

use crate::{DriverError, InstanceKind, InstanceSpec};

/// vCPUs when `limits.cpu` is not set.
pub const DEFAULT_CPUS: u8 = 1;
/// Memory in MiB when `limits.memory` is not set.
pub const DEFAULT_MEMORY_MIB: u64 = 512;
/// Smallest memory a thin VM boots with.
const MIN_MEMORY_MIB: u64 = 64;

/// Errors of instance config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A key this driver does not know.
    #[error("unknown config key {0:?}")]
    UnknownKey(String),
    /// A known key with a bad value.
    #[error("config key {key:?}: {why}")]
    BadValue {
        /// The key.
        key: String,
        /// What is wrong with its value.
        why: String,
    },
    /// The image's runtime config has no usable process.
    #[error("the image's config")]
    Image(#[source] OciError),
}

impl From<ConfigError> for DriverError {
    fn from(e: ConfigError) -> DriverError {
        match e {
            ConfigError::UnknownKey(key) => DriverError::Config { key, why: "unknown key".into() },
            ConfigError::BadValue { key, why } => DriverError::Config { key, why },
            ConfigError::Image(e) => DriverError::Image(e.to_string()),
        }
    }
}

fn bad(key: &str, why: impl Into<String>) -> ConfigError {
    ConfigError::BadValue { key: key.into(), why: why.into() }
}

/// Parses a memory size the way Incus does: a number with an optional unit
/// (`B`, `kB`/`MB`/`GB`/`TB` powers of 1000, `KiB`/`MiB`/`GiB`/`TiB` powers
/// of 1024; also `K`/`M`/`G`/`T` as powers of 1024); bytes.
pub fn parse_memory(s: &str) -> Result<u64, ConfigError> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad("limits.memory", format!("{s:?} is not a size like 512MiB or 1GiB")))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1000,
        "MB" => 1000u64.pow(2),
        "GB" => 1000u64.pow(3),
        "TB" => 1000u64.pow(4),
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "TiB" | "T" => 1 << 40,
        other => {
            return Err(bad("limits.memory", format!("unknown unit {other:?} (use B, kB, MB, GB, KiB, MiB, GiB)")))
        }
    };
    n.checked_mul(mult).ok_or_else(|| bad("limits.memory", format!("{s:?} is too large")))
}

/// Splits a command line into words like a POSIX shell does (no expansion):
/// single quotes keep everything, double quotes keep all but `\"`, `\\`,
/// `\$` and `` \` ``, a backslash outside quotes escapes the next character.
pub fn split_words(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err("unterminated single quote".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => cur.push(c),
                            Some('\n') => {}
                            Some(c) => {
                                cur.push('\\');
                                cur.push(c);
                            }
                            None => return Err("unterminated double quote".into()),
                        },
                        Some(c) => cur.push(c),
                        None => return Err("unterminated double quote".into()),
                    }
                }
            }
            '\\' => match chars.next() {
                Some('\n') => {}
                Some(c) => {
                    in_word = true;
                    cur.push(c);
                }
                None => return Err("trailing backslash".into()),
            },
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// Parses a boolean config value (`true`/`1`/`yes`/`on`, `false`/`0`/`no`/`off`/empty).
pub fn parse_bool(key: &str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err(bad(key, format!("{v:?} is not a boolean (true or false)"))),
    }
}

fn parse_id(key: &str, v: &str) -> Result<u32, ConfigError> {
    v.parse().map_err(|_| bad(key, format!("{v:?} is not a numeric id")))
}

/// Checks every key and value of a VM's config; the first problem names its key.
pub fn validate(config: &BTreeMap<String, String>) -> Result<(), DriverError> {
    validate_for(InstanceKind::VirtualMachine, config)
}

/// Checks every key and value for an instance of `kind`: the keys both
/// kinds take, and those of its own (VMs: `limits.memory.hotplug`;
/// containers: `limits.processes`, `security.privileged`).
pub fn validate_for(kind: InstanceKind, config: &BTreeMap<String, String>) -> Result<(), DriverError> {
    for (key, value) in config {
        match (key.as_str(), kind) {
            ("limits.memory.hotplug", InstanceKind::Container) => {
                return Err(bad(key, "only VMs take it (a container's memory limit changes live as it is)").into())
            }
            ("limits.processes", InstanceKind::Container) => {
                value
                    .parse::<u32>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| bad(key, format!("{value:?} is not a process count")))?;
            }
            ("security.privileged", InstanceKind::Container) => {
                parse_bool(key, value)?;
            }
            ("limits.processes" | "security.privileged", InstanceKind::VirtualMachine) => {
                return Err(bad(key, "only containers take it").into())
            }
            (k, InstanceKind::Container) if k.starts_with("cloud-init.") => {
                return Err(bad(key, "only VMs of disk images take it (a NoCloud seed disk)").into())
            }
            _ => validate_key(key, value)?,
        }
    }
    crate::vm::seed::validate(config).map_err(|why| bad("cloud-init.user-data", why))?;
    Ok(())
}

fn validate_key(key: &str, v: &str) -> Result<(), ConfigError> {
    if let Some(name) = key.strip_prefix("environment.") {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(bad(key, "the variable name must be non-empty, without '=' or NUL"));
        }
        return Ok(());
    }
    if ["user.", "volatile.", "image."].iter().any(|p| key.starts_with(p)) {
        return Ok(());
    }
    match key {
        // A full OS VM's NoCloud seed (crate::vm::seed); the total size is
        // checked over the whole configuration.
        "cloud-init.user-data" | "cloud-init.vendor-data" | "cloud-init.network-config" => {}
        "limits.cpu" => {
            cpus(v)?;
        }
        "limits.memory" => {
            memory_mib(v)?;
        }
        "limits.memory.hotplug" => {
            parse_memory(v)?;
        }
        "oci.entrypoint" => {
            let words = split_words(v).map_err(|e| bad(key, e))?;
            if words.is_empty() {
                return Err(bad(key, "empty command"));
            }
        }
        "oci.cwd" => {
            if !v.starts_with('/') {
                return Err(bad(key, format!("{v:?} is not an absolute path")));
            }
        }
        "oci.uid" | "oci.gid" => {
            parse_id(key, v)?;
        }
        "boot.autorestart" | "boot.autostart" => {
            parse_bool(key, v)?;
        }
        "boot.autostart.delay" | "boot.autostart.priority" => {
            v.parse::<u64>().map_err(|_| bad(key, format!("{v:?} is not a number")))?;
        }
        _ => return Err(ConfigError::UnknownKey(key.into())),
    }
    Ok(())
}

fn cpus(v: &str) -> Result<u8, ConfigError> {
    match v.trim().parse::<u8>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(bad("limits.cpu", format!("{v:?} is not a vCPU count (1-255; CPU sets are not supported)"))),
    }
}

fn memory_mib(v: &str) -> Result<u64, ConfigError> {
    let mib = parse_memory(v)? >> 20;
    if mib < MIN_MEMORY_MIB {
        return Err(bad("limits.memory", format!("{v:?} is below {MIN_MEMORY_MIB} MiB")));
    }
    Ok(mib)
}

/// The VM's size from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    /// vCPUs.
    pub cpus: u8,
    /// Memory in MiB.
    pub memory_mib: u64,
}

/// MiB the memory may grow by at runtime: `limits.memory.hotplug` less the
/// boot memory, rounded up to virtio-mem's 128 MiB; 0 without the key.
pub fn memory_hotplug_mib(config: &BTreeMap<String, String>) -> Result<u64, DriverError> {
    let Some(v) = config.get("limits.memory.hotplug") else { return Ok(0) };
    let max = parse_memory(v)? >> 20;
    let boot = vm_size(config)?.memory_mib;
    if max < boot {
        return Err(bad("limits.memory.hotplug", format!("{v:?} is below limits.memory ({boot} MiB)")).into());
    }
    Ok((max - boot).div_ceil(128) * 128)
}

/// Possible vCPUs a VM always has room for, whatever the host: a small
/// host can still give a VM a second vCPU while it runs.
const MIN_MAX_CPUS: usize = 4;

/// The most vCPUs a VM may grow to at runtime (`limits.cpu` applied live):
/// the host's CPUs, at least [`MIN_MAX_CPUS`], at most 64, and never fewer
/// than it boots with. Each possible vCPU costs the guest an ACPI entry,
/// not a thread: threads start when the vCPU is added.
pub fn max_cpus(boot: u8) -> u8 {
    let host = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    (host.clamp(MIN_MAX_CPUS, 64) as u8).max(boot)
}

/// `(vCPUs, memory MiB)` from `limits.cpu` and `limits.memory`, or the defaults.
pub fn resources(config: &BTreeMap<String, String>) -> Result<(u8, u64), DriverError> {
    let s = vm_size(config)?;
    Ok((s.cpus, s.memory_mib))
}

/// `limits.cpu` and `limits.memory`, or the defaults.
pub fn vm_size(config: &BTreeMap<String, String>) -> Result<VmSize, ConfigError> {
    Ok(VmSize {
        cpus: config.get("limits.cpu").map(|v| cpus(v)).transpose()?.unwrap_or(DEFAULT_CPUS),
        memory_mib: config.get("limits.memory").map(|v| memory_mib(v)).transpose()?.unwrap_or(DEFAULT_MEMORY_MIB),
    })
}

/// The instance's main process (see [`main_process_from`]).
pub fn main_process(inst: &InstanceSpec) -> Result<MainProcess, DriverError> {
    main_process_from(&inst.image_config, &inst.config).map_err(Into::into)
}

/// The main process: the image's runtime config (`config.json`) with the
/// instance's `oci.*` overrides, `environment.*` merged over the image's
/// environment, and `boot.autorestart` as the agent's restart policy.
pub fn main_process_from(
    image_config: &serde_json::Value,
    config: &BTreeMap<String, String>,
) -> Result<MainProcess, ConfigError> {
    let json = serde_json::to_vec(image_config).unwrap_or_default();
    let mut p = match main_process_from_config(&json) {
        Ok(p) => p,
        // An image without a command is fine when the instance gives one.
        Err(OciError::NoArgs) if config.contains_key("oci.entrypoint") => {
            let mut v = image_config.clone();
            v["process"]["args"] = serde_json::json!(["/bin/sh"]);
            main_process_from_config(&serde_json::to_vec(&v).unwrap_or_default()).map_err(ConfigError::Image)?
        }
        Err(e) => return Err(ConfigError::Image(e)),
    };
    if let Some(ep) = config.get("oci.entrypoint") {
        p.args = split_words(ep).map_err(|e| bad("oci.entrypoint", e))?;
        if p.args.is_empty() {
            return Err(bad("oci.entrypoint", "empty command"));
        }
    }
    if let Some(cwd) = config.get("oci.cwd") {
        validate_key("oci.cwd", cwd)?;
        p.cwd = cwd.clone();
    }
    if let Some(uid) = config.get("oci.uid") {
        p.user.uid = parse_id("oci.uid", uid)?;
    }
    if let Some(gid) = config.get("oci.gid") {
        p.user.gid = parse_id("oci.gid", gid)?;
    }
    for (key, value) in config {
        if let Some(name) = key.strip_prefix("environment.") {
            let prefix = format!("{name}=");
            p.env.retain(|e| !e.starts_with(&prefix));
            p.env.push(format!("{name}={value}"));
        }
    }
    let autorestart = config.get("boot.autorestart").map(|v| parse_bool("boot.autorestart", v)).transpose()?;
    p.restart = if autorestart == Some(true) { RestartPolicy::Always } else { RestartPolicy::Never };
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn memory_units() {
        let table: &[(&str, u64)] = &[
            ("512MiB", 512 << 20),
            ("1GiB", 1 << 30),
            ("256MB", 256_000_000),
            ("2G", 2 << 30),
            ("1073741824", 1 << 30),
            ("64 MiB", 64 << 20),
            ("1kB", 1000),
            ("3KiB", 3072),
        ];
        for (s, want) in table {
            assert_eq!(parse_memory(s).unwrap(), *want, "{s}");
        }
        for s in ["", "MiB", "12XB", "-1GiB", "1.5GiB", "99999999999999999999GiB"] {
            let e = parse_memory(s).unwrap_err().to_string();
            assert!(e.contains("limits.memory"), "{s}: {e}");
        }
        assert_eq!(vm_size(&cfg(&[("limits.memory", "256MB")])).unwrap().memory_mib, 244);
        assert_eq!(vm_size(&cfg(&[])).unwrap(), VmSize { cpus: 1, memory_mib: 512 });
        assert_eq!(
            vm_size(&cfg(&[("limits.cpu", "4"), ("limits.memory", "2GiB")])).unwrap(),
            VmSize { cpus: 4, memory_mib: 2048 }
        );
    }

    #[test]
    fn validation_names_the_key_and_why() {
        let ok = cfg(&[
            ("limits.cpu", "2"),
            ("limits.memory", "1GiB"),
            ("environment.FOO", "bar baz"),
            ("oci.entrypoint", "sh -c 'echo hi'"),
            ("oci.cwd", "/srv"),
            ("oci.uid", "1000"),
            ("oci.gid", "1000"),
            ("boot.autostart", "true"),
            ("boot.autostart.delay", "5"),
            ("boot.autorestart", "false"),
            ("user.note", "anything"),
            ("volatile.eth0.hwaddr", "52:54:00:00:00:01"),
            ("image.os", "alpine"),
        ]);
        validate(&ok).unwrap();
        let e = validate(&cfg(&[("limits.cpus", "2")])).unwrap_err().to_string();
        assert_eq!(e, "config limits.cpus: unknown key");
        // Keys of one kind only.
        let c = InstanceKind::Container;
        validate_for(c, &cfg(&[("limits.processes", "100"), ("security.privileged", "true")])).unwrap();
        for (kind, key, value) in [
            (c, "limits.memory.hotplug", "2GiB"),
            (c, "limits.processes", "0"),
            (c, "security.privileged", "maybe"),
            (InstanceKind::VirtualMachine, "limits.processes", "100"),
            (InstanceKind::VirtualMachine, "security.privileged", "true"),
        ] {
            let e = validate_for(kind, &cfg(&[(key, value)])).unwrap_err().to_string();
            assert!(e.contains(key), "{kind:?} {key}={value}: {e}");
        }
        let table: &[(&str, &str, &str)] = &[
            ("limits.cpus", "2", "config limits.cpus: unknown key"),
            ("security.nesting", "true", "unknown key"),
            ("limits.cpu", "0", "limits.cpu"),
            ("limits.cpu", "0-3", "CPU sets"),
            ("limits.memory", "lots", "limits.memory"),
            ("limits.memory", "1MiB", "below 64 MiB"),
            ("oci.entrypoint", "sh -c 'oops", "unterminated single quote"),
            ("oci.entrypoint", "  ", "empty command"),
            ("oci.cwd", "srv", "not an absolute path"),
            ("oci.uid", "root", "not a numeric id"),
            ("boot.autorestart", "maybe", "not a boolean"),
            ("environment.", "x", "variable name"),
        ];
        for (k, v, want) in table {
            let e = validate(&cfg(&[(k, v)])).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains(k.trim_end_matches('.')), "{k}={v}: {e}");
        }
    }

    #[test]
    fn shell_words() {
        let table: &[(&str, &[&str])] = &[
            ("nginx -g 'daemon off;'", &["nginx", "-g", "daemon off;"]),
            (r#"sh -c "echo \"hi\" \$HOME""#, &["sh", "-c", r#"echo "hi" $HOME"#]),
            (r"a\ b c\\d", &["a b", r"c\d"]),
            ("  x   ''  y ", &["x", "", "y"]),
            (r#""a\nb""#, &[r"a\nb"]),
            ("don''t a'b c'd", &["dont", "ab cd"]),
        ];
        for (s, want) in table {
            assert_eq!(split_words(s).unwrap(), *want, "{s}");
        }
        for s in ["'open", "\"open", "end\\"] {
            assert!(split_words(s).is_err(), "{s}");
        }
    }

    fn image() -> serde_json::Value {
        json!({
            "ociVersion": "1.0.2",
            "process": {
                "args": ["/docker-entrypoint.sh", "nginx", "-g", "daemon off;"],
                "env": ["PATH=/usr/bin:/bin", "NGINX_VERSION=1.27", "KEEP=1"],
                "cwd": "/",
                "user": {"uid": 101, "gid": 101}
            },
            "annotations": {"org.opencontainers.image.stopSignal": "SIGQUIT"}
        })
    }

    #[test]
    fn main_process_merges_the_instance_config_over_the_image() {
        let p = main_process_from(&image(), &cfg(&[])).unwrap();
        assert_eq!(p.args[0], "/docker-entrypoint.sh");
        assert_eq!(p.restart, RestartPolicy::Never);
        assert_eq!(p.stop_signal, 3);

        let c = cfg(&[
            ("environment.NGINX_VERSION", "1.28"),
            ("environment.NEW", "a=b c"),
            ("oci.entrypoint", r#"/bin/sh -c "exec nginx -g 'daemon off;'""#),
            ("oci.cwd", "/srv"),
            ("oci.uid", "0"),
            ("oci.gid", "7"),
            ("boot.autorestart", "true"),
        ]);
        let p = main_process_from(&image(), &c).unwrap();
        assert_eq!(p.args, ["/bin/sh", "-c", "exec nginx -g 'daemon off;'"]);
        assert_eq!(p.env, ["PATH=/usr/bin:/bin", "KEEP=1", "NEW=a=b c", "NGINX_VERSION=1.28"]);
        assert_eq!((p.cwd.as_str(), p.user.uid, p.user.gid), ("/srv", 0, 7));
        assert_eq!(p.restart, RestartPolicy::Always);
    }

    #[test]
    fn an_image_without_a_command_needs_an_entrypoint() {
        let mut img = image();
        img["process"]["args"] = json!([]);
        let e = main_process_from(&img, &cfg(&[])).unwrap_err();
        assert!(matches!(e, ConfigError::Image(OciError::NoArgs)), "{e:?}");
        let p = main_process_from(&img, &cfg(&[("oci.entrypoint", "sleep infinity")])).unwrap();
        assert_eq!(p.args, ["sleep", "infinity"]);
        assert!(matches!(main_process_from(&serde_json::Value::Null, &cfg(&[])), Err(ConfigError::Image(_))));
    }
}
