//! System containers: the image's own init (systemd) is the container's
//! PID 1, and Skiff's agent runs beside it, started from outside with
//! `lxc-attach` once the container runs (`skiff-agent --daemon` returns
//! when its socket listens). A reboot from inside (`systemctl reboot`)
//! ends the init and LXC starts the container again on the same mounted
//! volume: the driver's watcher tells that from the end by what LXC's stop
//! hook wrote (`LXC_TARGET`: `stop` or `reboot`), then starts the agent
//! in the new boot and asks it for DHCP again.
//!
//! ```text
//! start: init runs → systemd's bus (settle) → agent (lxc-attach) → ping → DHCP
//! init ends ─► stop hook writes stop-target ─► "stop":   unmount, Stopped
//!                                           └► "reboot": new init pid
//!                                                 → agent (lxc-attach) → ping → DHCP → watch again
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use skiff_agent_client::AgentClient;
use skiff_driver::{DriverError, InstanceSpec};

use crate::conf;
use crate::tools::{Lxc, ToolError};

/// How long LXC's stop hook may take to say why the init ended.
const HOOK_WAIT: Duration = Duration::from_secs(10);
/// How long a rebooting container may take to run its new init.
const REBOOT_WAIT: Duration = Duration::from_secs(60);
/// How long the agent may take to answer once started.
const PING_WAIT: Duration = Duration::from_secs(10);
/// How long a start waits for systemd's bus (see [`settle`]).
const SETTLE_WAIT: Duration = Duration::from_secs(10);
/// Tries at starting the agent in a new boot (the first can come while
/// LXC still sets the container up, and the agent is lost).
const REBOOT_TRIES: u32 = 3;

/// How a system container's init ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// The container stopped.
    Stopped,
    /// It rebooted; its new init's host pid.
    Rebooted(i32),
}

/// The stop hook's file of an instance (host-only: in its directory).
pub(crate) fn stop_target(inst: &InstanceSpec) -> PathBuf {
    inst.dir.join("stop-target")
}

fn boxed(e: impl std::error::Error + Send + Sync + 'static) -> DriverError {
    DriverError::Container(Box::new(e))
}

/// Starts the agent beside the init and waits until it answers; then
/// asks it for DHCP on eth0 when the container has a NIC.
pub(crate) async fn start_agent(lxc: &Lxc, inst: &InstanceSpec, agent: &AgentClient) -> Result<(), DriverError> {
    let cmd = conf::agent_service_command();
    let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
    lxc.attach(&inst.name, &args).await.map_err(boxed)?;
    let deadline = tokio::time::Instant::now() + PING_WAIT;
    loop {
        match agent.ping().await {
            Ok(_) => break,
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(boxed(e)),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    if let Some(net) = skiff_driver::network_config(inst) {
        agent.configure_network(net).await.map_err(boxed)?;
    }
    Ok(())
}

/// When the init is systemd, waits (at most [`SETTLE_WAIT`]) until its
/// private bus socket exists, so that `systemctl` works in an exec that
/// comes right after the start (`systemctl is-system-running --wait`
/// then waits for the rest of the boot). Other inits: at once.
pub(crate) async fn settle(pid: i32) {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    // Seen through the init's root; only its existence is looked at.
    let bus = proc.join("root/run/systemd/private");
    let deadline = tokio::time::Instant::now() + SETTLE_WAIT;
    while tokio::time::Instant::now() < deadline {
        // The init's binary (its name changes: systemd starts as `init`);
        // LXC's own until it has executed the image's.
        let exe = std::fs::read_link(proc.join("exe")).unwrap_or_default();
        let exe = exe.to_string_lossy();
        let lxc = exe.contains("lxc");
        if !exe.ends_with("/systemd") && !lxc || exe.ends_with("/systemd") && bus.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads (and removes) what the stop hook wrote, waiting for it.
async fn hook_target(file: &Path, limit: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Ok(t) = std::fs::read_to_string(file) {
            if !t.trim().is_empty() {
                let _ = std::fs::remove_file(file);
                return Some(t.trim().to_string());
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// After the init `old` ended: a stop, or a reboot and the new init.
pub(crate) async fn after_init_end(lxc: &Lxc, name: &str, file: &Path, old: i32) -> Ended {
    if hook_target(file, HOOK_WAIT).await.as_deref() != Some("reboot") {
        return Ended::Stopped;
    }
    let deadline = tokio::time::Instant::now() + REBOOT_WAIT;
    loop {
        match lxc.init_pid(name).await {
            Ok(Some(pid)) if pid != old => return Ended::Rebooted(pid),
            Err(ToolError::Missing(_)) => return Ended::Stopped,
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Ended::Stopped;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the watcher of a system container needs to follow its reboots.
pub(crate) struct Reboots {
    /// The LXC tools.
    pub lxc: Lxc,
    /// The instance.
    pub inst: InstanceSpec,
    /// Its agent.
    pub agent: AgentClient,
}

impl Reboots {
    /// After the init `old` ended: the new init's pid when the container
    /// rebooted (with its agent started again), `None` when it stopped.
    pub async fn follow(&self, old: i32) -> Option<i32> {
        let name = &self.inst.name;
        match after_init_end(&self.lxc, name, &stop_target(&self.inst), old).await {
            Ended::Stopped => None,
            Ended::Rebooted(pid) => {
                log::info!("{name}: rebooted (init {old} -> {pid}); starting its agent again");
                settle(pid).await;
                for attempt in 1..=REBOOT_TRIES {
                    match start_agent(&self.lxc, &self.inst, &self.agent).await {
                        Ok(()) => break,
                        Err(e) => log::warn!(
                            "{name}: the agent did not start after the reboot (try {attempt} of {REBOOT_TRIES}): {}",
                            skiff_run::monitor::error_chain(&e)
                        ),
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Some(pid)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_hook_file_says_why_and_is_consumed() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("stop-target");
        assert_eq!(hook_target(&f, Duration::from_millis(100)).await, None);
        std::fs::write(&f, "reboot\n").unwrap();
        assert_eq!(hook_target(&f, Duration::from_secs(1)).await.as_deref(), Some("reboot"));
        assert!(!f.exists());
        let lxc = Lxc::new(t.path().join("lxc"));
        std::fs::write(&f, "stop\n").unwrap();
        assert_eq!(after_init_end(&lxc, "c", &f, 1).await, Ended::Stopped);
    }
}
