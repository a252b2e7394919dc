//! A thin VM brought back from a snapshot instead of booted: skiff-vmm
//! `--restore DIR` with everything on the host side made anew (virtiofsd
//! for each share, the vsock socket, the NIC's tap, the disks), matched to
//! the saved devices by id, then the agent answering again.
//!
//! ```text
//!   restore: runtime dir → virtiofsd (rootfs fs0, shares fs1.., named
//!            shares by name) → event listener → skiff-vmm --restore DIR
//!            --fs tag=T,socket=S,id=ID --disk ..,id=NAME --vsock --net →
//!            the agent answers a ping (its vsock connections were reset)
//! ```
//!
//! The guest's agent only reconnects its event connection when it has an
//! event to send, so readiness is a ping rather than a `ready` event; the
//! listener stays bound for the events that come later.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use skiff_agent_client::{EventListener, Timeouts};

use super::hotplug::HotDevice;
use super::{Share, ThinVm, VmError, VmExtras};
use crate::monitor::DeviceSpec;
use crate::runtime::{VmState, VSOCK_SOCKET};

/// Files skiff-vmm's `vm.snapshot` writes, which a restore needs.
const SNAPSHOT_FILES: [&str; 2] = ["state", "memory"];
/// How long the first ping of the restored agent may take; each one that
/// gets no answer doubles it, up to [`PING_MAX`]. A connection request the
/// guest never saw (sent as its vsock transport reset) costs one such wait.
const PING_FIRST: Duration = Duration::from_millis(200);
/// The longest a ping may take.
const PING_MAX: Duration = Duration::from_secs(3);

/// What to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The VM's name (runtime directory); may differ from the saved one (a clone).
    pub name: String,
    /// The directory of every VM's runtime directory.
    pub runtime_root: PathBuf,
    /// The snapshot directory (`state`, `memory`).
    pub snapshot: PathBuf,
    /// The rootfs, shared as tag `rootfs` (id `fs0`).
    pub rootfs: PathBuf,
    /// The shares after it, as they were at boot (ids `fs1`, ...).
    pub shares: Vec<Share>,
    /// Devices added by name, given anew by name (shares get a virtiofsd
    /// and stay mounted where the guest had them).
    pub devices: Vec<DeviceSpec>,
    /// skiff-vmm.
    pub vmm: PathBuf,
    /// virtiofsd.
    pub virtiofsd: PathBuf,
    /// How long the restored agent may take to answer.
    pub timeout: Duration,
    /// What the VM runs (for `list`).
    pub bundle: String,
    /// vCPUs (for `list`).
    pub cpus: u8,
    /// Memory in MiB (for `list`).
    pub memory_mib: u64,
}

/// Checks that `dir` holds what skiff-vmm restores from (it checks the
/// contents itself, with a clear error, before any vCPU runs).
pub fn check_snapshot_dir(dir: &Path) -> Result<(), VmError> {
    for f in SNAPSHOT_FILES {
        match std::fs::metadata(dir.join(f)) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(VmError::NotSnapshot(dir.into(), format!("{f} is not a file"))),
            Err(e) => return Err(VmError::NotSnapshot(dir.into(), format!("{f}: {e}"))),
        }
    }
    Ok(())
}

impl ThinVm {
    /// Restores the VM saved in `opts.snapshot` and waits until its agent
    /// answers; on failure everything started is stopped and reaped and
    /// the runtime directory removed before the error returns.
    pub async fn restore(opts: &RestoreOptions, extras: &VmExtras) -> Result<ThinVm, VmError> {
        let mut vm = ThinVm::unstarted(&opts.name);
        match vm.restore_inner(opts, extras).await {
            Ok(()) => Ok(vm),
            Err(e) => {
                vm.abort().await;
                Err(e)
            }
        }
    }

    async fn restore_inner(&mut self, opts: &RestoreOptions, extras: &VmExtras) -> Result<(), VmError> {
        check_snapshot_dir(&opts.snapshot)?;
        // The console goes on where the saved VM's left off.
        self.prepare(&opts.runtime_root, &opts.name, extras.console_log.as_deref(), false)?;
        let mut args = vec!["--restore".to_string(), opts.snapshot.display().to_string()];
        args.extend(self.start_shares(&opts.virtiofsd, &opts.rootfs, &opts.shares, true).await?);
        for device in &opts.devices {
            args.extend(self.device_args(&opts.virtiofsd, device).await?);
        }
        let events = EventListener::bind_for_vsock(&self.dir.join(VSOCK_SOCKET))?;
        let state = VmState::starting(
            &opts.name,
            &opts.bundle,
            format!("restored from {}", opts.snapshot.display()),
            opts.cpus,
            opts.memory_mib,
        );
        self.spawn_vmm(&opts.vmm, &args, extras.nic.as_ref(), state)?;
        self.listener = Some(events);
        self.wait_answering(opts.timeout).await
    }

    /// A named device's skiff-vmm arguments; a share's virtiofsd is started
    /// and the device recorded, so that `remove_device` works as before.
    async fn device_args(&mut self, virtiofsd: &Path, device: &DeviceSpec) -> Result<Vec<String>, VmError> {
        match device {
            DeviceSpec::Share { name, source, path, .. } => {
                let socket = self.dir.join(format!("hp-{name}.sock"));
                let log = self.dir.join(format!("virtiofsd-{name}.log"));
                let share = Share { tag: name.clone(), dir: source.clone() };
                self.start_virtiofsd(virtiofsd, &share, &socket, &log).await?;
                let child = self.virtiofsd.pop();
                self.hot.push(HotDevice::restored(name, Some(path.clone()), child));
                Ok(vec!["--fs".into(), format!("tag={name},socket={},id={name}", socket.display())])
            }
            DeviceSpec::Disk { name, source, readonly } => {
                self.hot.push(HotDevice::restored(name, None, None));
                let ro = if *readonly { ",readonly=on" } else { "" };
                Ok(vec!["--disk".into(), format!("path={},format=raw,serial={name},id={name}{ro}", source.display())])
            }
        }
    }

    /// Pings the agent until it answers, skiff-vmm exits, or `limit` passes.
    async fn wait_answering(&mut self, limit: Duration) -> Result<(), VmError> {
        let started = Instant::now();
        let deadline = started + limit;
        let mut wait = PING_FIRST;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let agent = self.agent_with(Timeouts { connect: wait, request: wait, exec: None });
            let ping = agent.ping();
            let vmm = self.vmm.as_mut().expect("started");
            tokio::select! {
                r = ping => if r.is_ok() {
                    eprintln!("skiff-run: {}: the agent answered {} ms after skiff-vmm started ({attempt} pings)",
                        self.name, started.elapsed().as_millis());
                    return Ok(());
                },
                st = vmm.wait() => {
                    let status = st.map_err(|e| VmError::Wait("skiff-vmm", e))?;
                    return Err(VmError::VmmExited { status, report: self.report() });
                }
            }
            if Instant::now() >= deadline {
                return Err(VmError::AgentTimeout { secs: limit.as_secs(), report: self.report() });
            }
            wait = (wait * 2).min(PING_MAX);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_directory_needs_state_and_memory() {
        let dir = tempfile::tempdir().unwrap();
        let e = check_snapshot_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("is not a VM snapshot: state"), "{e}");
        std::fs::write(dir.path().join("state"), b"x").unwrap();
        std::fs::create_dir(dir.path().join("memory")).unwrap();
        let e = check_snapshot_dir(dir.path()).unwrap_err().to_string();
        assert!(e.contains("memory is not a file"), "{e}");
        std::fs::remove_dir(dir.path().join("memory")).unwrap();
        std::fs::write(dir.path().join("memory"), b"").unwrap();
        check_snapshot_dir(dir.path()).unwrap();
    }
}
