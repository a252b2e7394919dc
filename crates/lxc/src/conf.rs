//! The LXC config of a container, generated from the instance at every
//! start (nothing of LXC's own templates or `lxc-create`): Debian's
//! `common.conf` (capabilities, device cgroup, seccomp) and, unprivileged,
//! `userns.conf` with Skiff's id map; the rootfs (the instance's volume);
//! the NIC as a veth on the managed bridge; limits as cgroup keys; the
//! agent and its socket directory under `/.skiff`; disk devices as bind
//! mounts; the init: the agent for OCI application containers, the
//! image's own for system containers.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use skiff_storage::idmap::IdMap;

/// Where the agent's binary appears in the container.
pub const AGENT_IN_CONTAINER: &str = "/.skiff/skiff-agent";
/// Where the agent's socket directory appears in the container.
pub const SOCKETS_IN_CONTAINER: &str = "/.skiff/sock";
/// The agent's socket in its socket directory.
pub const AGENT_SOCKET: &str = "agent.sock";
/// The socket the agent sends its events to.
pub const EVENT_SOCKET: &str = "events.sock";
/// CFS period for `limits.cpu`.
const CPU_PERIOD_US: u64 = 100_000;

/// The host's cgroup layout, for the limit keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cgroups {
    /// cgroup v1 controllers (also the hybrid layout).
    V1,
    /// The unified hierarchy only.
    V2,
}

impl Cgroups {
    /// What this host has.
    pub fn detect() -> Cgroups {
        if Path::new("/sys/fs/cgroup/memory").is_dir() {
            Cgroups::V1
        } else {
            Cgroups::V2
        }
    }

    /// `(key, value)` pairs for the limits, as `lxc-cgroup` takes them.
    pub fn limits(self, limits: &Limits) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(mib) = limits.memory_mib {
            let bytes = (mib << 20).to_string();
            match self {
                Cgroups::V1 => out.push(("memory.limit_in_bytes", bytes)),
                Cgroups::V2 => out.push(("memory.max", bytes)),
            }
        }
        if let Some(cpus) = limits.cpus {
            let quota = u64::from(cpus) * CPU_PERIOD_US;
            match self {
                Cgroups::V1 => {
                    out.push(("cpu.cfs_period_us", CPU_PERIOD_US.to_string()));
                    out.push(("cpu.cfs_quota_us", quota.to_string()));
                }
                Cgroups::V2 => out.push(("cpu.max", format!("{quota} {CPU_PERIOD_US}"))),
            }
        }
        if let Some(n) = limits.processes {
            out.push(("pids.max", n.to_string()));
        }
        out
    }

    fn prefix(self) -> &'static str {
        match self {
            Cgroups::V1 => "lxc.cgroup",
            Cgroups::V2 => "lxc.cgroup2",
        }
    }
}

/// Resource limits (unset: none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// CPUs' worth of time (CFS quota).
    pub cpus: Option<u8>,
    /// Memory in MiB.
    pub memory_mib: Option<u64>,
    /// Most processes.
    pub processes: Option<u32>,
}

/// A bind mount from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    /// Host path (directory or file).
    pub source: PathBuf,
    /// Absolute path in the container.
    pub target: String,
    /// Read-only.
    pub readonly: bool,
    /// Whether the source is a file.
    pub file: bool,
}

/// The container's NIC: a veth on a bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Veth {
    /// The bridge.
    pub bridge: String,
    /// The host-side name.
    pub host_name: String,
    /// The container side's MAC address.
    pub mac: String,
}

/// What the container runs as its init.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Init {
    /// The agent, which runs the image's entrypoint (OCI application containers).
    Agent,
    /// The image's own init (system containers).
    System,
}

/// Everything that goes into a container's LXC config.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The container (instance) name, also its hostname.
    pub name: String,
    /// The mounted rootfs.
    pub rootfs: PathBuf,
    /// The id map; `None` for a privileged container.
    pub idmap: Option<IdMap>,
    /// Its NIC.
    pub nic: Option<Veth>,
    /// Its limits.
    pub limits: Limits,
    /// The static agent on the host.
    pub agent: PathBuf,
    /// The agent's socket directory on the host.
    pub sockets: PathBuf,
    /// Disk devices and other bind mounts.
    pub mounts: Vec<BindMount>,
    /// Its init.
    pub init: Init,
    /// The console log.
    pub console_log: PathBuf,
    /// The host's cgroup layout.
    pub cgroups: Cgroups,
}

/// Debian's LXC configs.
const COMMON_CONF: &str = "/usr/share/lxc/config/common.conf";
const USERNS_CONF: &str = "/usr/share/lxc/config/userns.conf";

/// Errors of building a config.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfError {
    /// A value would break the config's line format.
    #[error("{what} {value:?} cannot go into an LXC config (newline, NUL or space)")]
    Unsafe {
        /// What it is.
        what: &'static str,
        /// The value.
        value: String,
    },
}

fn safe<'a>(what: &'static str, v: &'a str) -> Result<&'a str, ConfError> {
    if v.is_empty() || v.contains(['\n', '\r', '\0', ' ', '\t']) {
        return Err(ConfError::Unsafe { what, value: v.to_string() });
    }
    Ok(v)
}

fn path_str<'a>(what: &'static str, p: &'a Path) -> Result<&'a str, ConfError> {
    safe(what, p.to_str().ok_or_else(|| ConfError::Unsafe { what, value: p.to_string_lossy().into_owned() })?)
}

/// The agent's command line as a container's init.
pub fn agent_init_command() -> String {
    format!(
        "{AGENT_IN_CONTAINER} --container --listen unix:{SOCKETS_IN_CONTAINER}/{AGENT_SOCKET} --notify unix:{SOCKETS_IN_CONTAINER}/{EVENT_SOCKET}"
    )
}

/// The agent's command line in a system container (started after boot).
pub fn agent_service_command() -> Vec<String> {
    vec![
        AGENT_IN_CONTAINER.into(),
        "--daemon".into(),
        "--listen".into(),
        format!("unix:{SOCKETS_IN_CONTAINER}/{AGENT_SOCKET}"),
    ]
}

/// LXC's generated AppArmor profile where AppArmor confines processes
/// here and LXC can build the profile (the parser is installed and its
/// cache writable); otherwise none (`unconfined`), as on hosts without
/// AppArmor: the user namespace, seccomp and capabilities still apply.
fn apparmor_profile() -> &'static str {
    let enabled = std::fs::read_to_string("/sys/module/apparmor/parameters/enabled").is_ok_and(|v| v.trim() == "Y");
    let parser = ["/sbin/apparmor_parser", "/usr/sbin/apparmor_parser"].iter().any(|p| Path::new(p).is_file());
    let cache = std::fs::create_dir_all("/var/cache/lxc/apparmor").is_ok() && {
        // SAFETY: access reads a NUL-terminated string literal.
        unsafe { libc::access(c"/var/cache/lxc/apparmor".as_ptr(), libc::W_OK) == 0 }
    };
    if enabled && parser && cache {
        "generated"
    } else {
        "unconfined"
    }
}

/// The config text.
pub fn render(spec: &Spec) -> Result<String, ConfError> {
    let mut c = String::new();
    let mut line = |k: &str, v: &str| {
        let _ = writeln!(c, "{k} = {v}");
    };
    line("lxc.include", COMMON_CONF);
    if let Some(map) = spec.idmap {
        line("lxc.include", USERNS_CONF);
        line("lxc.idmap", &format!("u 0 {} {}", map.host_base, map.count));
        line("lxc.idmap", &format!("g 0 {} {}", map.host_base, map.count));
    }
    line("lxc.uts.name", safe("name", &spec.name)?);
    line("lxc.rootfs.path", &format!("dir:{}", path_str("rootfs", &spec.rootfs)?));
    line("lxc.autodev", "1");
    line("lxc.apparmor.profile", apparmor_profile());
    line("lxc.console.logfile", path_str("console log", &spec.console_log)?);
    line("lxc.console.size", "auto");
    line("lxc.console.buffer.size", "auto");
    match &spec.nic {
        Some(nic) => {
            line("lxc.net.0.type", "veth");
            line("lxc.net.0.link", safe("bridge", &nic.bridge)?);
            line("lxc.net.0.veth.pair", safe("veth name", &nic.host_name)?);
            line("lxc.net.0.hwaddr", safe("MAC address", &nic.mac)?);
            line("lxc.net.0.name", "eth0");
            line("lxc.net.0.flags", "up");
        }
        None => line("lxc.net.0.type", "empty"),
    }
    let prefix = spec.cgroups.prefix();
    for (key, value) in spec.cgroups.limits(&spec.limits) {
        line(&format!("{prefix}.{key}"), &value);
    }
    line(
        "lxc.mount.entry",
        &format!("{} .skiff/skiff-agent none bind,ro,create=file 0 0", path_str("agent", &spec.agent)?),
    );
    line("lxc.mount.entry", &format!("{} .skiff/sock none bind,create=dir 0 0", path_str("sockets", &spec.sockets)?));
    for m in &spec.mounts {
        let target = safe("mount path", m.target.trim_start_matches('/'))?;
        let create = if m.file { "file" } else { "dir" };
        let ro = if m.readonly { ",ro" } else { "" };
        line(
            "lxc.mount.entry",
            &format!("{} {target} none bind,create={create}{ro} 0 0", path_str("mount source", &m.source)?),
        );
    }
    match spec.init {
        Init::Agent => {
            line("lxc.init.cmd", &agent_init_command());
            line("lxc.tty.max", "0");
            // The agent powers the container off with reboot(2); SIGKILL is
            // what LXC sends it on stop (it has no SIGPWR handler).
            line("lxc.signal.halt", "SIGKILL");
        }
        Init::System => {
            line("lxc.signal.halt", "SIGRTMIN+3");
        }
    }
    Ok(c)
}

/// Limits from an instance's expanded config.
pub fn limits(config: &BTreeMap<String, String>) -> Limits {
    let memory_mib = config.get("limits.memory").and_then(|v| skiff_driver::parse_memory(v).ok()).map(|b| b >> 20);
    Limits {
        cpus: config.get("limits.cpu").and_then(|v| v.trim().parse().ok()),
        memory_mib,
        processes: config.get("limits.processes").and_then(|v| v.parse().ok()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        Spec {
            name: "web".into(),
            rootfs: "/var/lib/skiff/storage/volumes/web/rootfs".into(),
            idmap: Some(IdMap { host_base: 1_000_000, count: 65536 }),
            nic: Some(Veth { bridge: "skiffbr0".into(), host_name: "skf1234".into(), mac: "0a:00:00:00:00:01".into() }),
            limits: Limits { cpus: Some(2), memory_mib: Some(256), processes: Some(100) },
            agent: "/usr/lib/skiff/skiff-agent".into(),
            sockets: "/run/skiff/ct/i1/sock".into(),
            mounts: vec![BindMount { source: "/srv/data".into(), target: "/data".into(), readonly: true, file: false }],
            init: Init::Agent,
            console_log: "/var/lib/skiff/instances/web/console.log".into(),
            cgroups: Cgroups::V1,
        }
    }

    #[test]
    fn an_unprivileged_oci_container() {
        let c = render(&spec()).unwrap();
        for want in [
            "lxc.include = /usr/share/lxc/config/userns.conf\n",
            "lxc.idmap = u 0 1000000 65536\n",
            "lxc.rootfs.path = dir:/var/lib/skiff/storage/volumes/web/rootfs\n",
            "lxc.net.0.link = skiffbr0\n",
            "lxc.net.0.veth.pair = skf1234\n",
            "lxc.cgroup.memory.limit_in_bytes = 268435456\n",
            "lxc.cgroup.cpu.cfs_quota_us = 200000\n",
            "lxc.cgroup.pids.max = 100\n",
            "lxc.mount.entry = /srv/data data none bind,create=dir,ro 0 0\n",
            "lxc.init.cmd = /.skiff/skiff-agent --container --listen unix:/.skiff/sock/agent.sock",
        ] {
            assert!(c.contains(want), "{want:?} missing in\n{c}");
        }
    }

    #[test]
    fn a_privileged_system_container_on_cgroup2() {
        let mut s = spec();
        s.idmap = None;
        s.init = Init::System;
        s.cgroups = Cgroups::V2;
        s.nic = None;
        let c = render(&s).unwrap();
        assert!(!c.contains("lxc.idmap"));
        assert!(!c.contains("lxc.init.cmd"));
        assert!(c.contains("lxc.cgroup2.memory.max = 268435456\n"));
        assert!(c.contains("lxc.cgroup2.cpu.max = 200000 100000\n"));
        assert!(c.contains("lxc.net.0.type = empty\n"));
    }

    #[test]
    fn values_that_would_break_lines_are_refused() {
        let mut s = spec();
        s.mounts[0].target = "/a\nlxc.include = /etc/evil".into();
        assert!(matches!(render(&s), Err(ConfError::Unsafe { .. })));
        let mut s = spec();
        s.mounts[0].source = "/with space".into();
        assert!(matches!(render(&s), Err(ConfError::Unsafe { .. })));
    }
}
