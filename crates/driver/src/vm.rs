//! The thin-VM driver: an instance is a copy-on-write volume over its
//! image's rootfs (skiff-storage), served by virtiofsd to a skiff-vmm VM
//! whose agent runs the image's entrypoint. Each running VM is kept by a
//! detached monitor process (`skiff-run monitor`, see
//! `skiff_run::monitor`), so VMs outlive the daemon; the driver watches
//! every monitor's events and re-attaches after a daemon restart.
//!
//! ```text
//! start: volume.mount → LaunchSpec (rootfs, cpus, memory, tap, DHCP, main
//!        process) → monitor::launch (returns when the entrypoint runs) →
//!        watcher task (monitor events → DriverEvent)
//! stop:  monitor stop (main process stop signal, then power off; force:
//!        SIGKILL) → volume.unmount
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use skiff_agent_client::{AgentClient, Transport};
use skiff_run::monitor::{self, ControlRequest, EndReason, ExitInfo, LaunchSpec, MonitorEvent};
use skiff_storage::Pool;
use tokio::sync::broadcast;

use crate::{config, volumes};

mod os;
pub mod seed;
mod stateful;
use crate::{Driver, DriverError, DriverEvent, InstanceKind, InstanceSpec, RunStatus};
pub use os::DEFAULT_OS_MEMORY_MIB;

/// Events buffered for a slow daemon.
const EVENT_BACKLOG: usize = 256;
/// Seconds a guest's agent may take to come up.
const BOOT_TIMEOUT_SECS: u64 = 120;

/// Where the VM driver finds things.
#[derive(Debug, Clone, Default)]
pub struct VmDriverConfig {
    /// The storage pool's directory (`$SKIFF_DIR/storage`).
    pub storage_root: PathBuf,
    /// Where runtime directories of running VMs go (short: unix sockets).
    pub runtime_root: PathBuf,
    /// Guest kernel (default: the usual search).
    pub kernel: Option<PathBuf>,
    /// Initramfs (default: built and cached).
    pub initramfs: Option<PathBuf>,
    /// The static agent (default: the usual search).
    pub agent: Option<PathBuf>,
    /// skiff-vmm (default: the usual search).
    pub vmm: Option<PathBuf>,
    /// virtiofsd (default: the usual search).
    pub virtiofsd: Option<PathBuf>,
    /// skiff-run, which runs the monitors (default: next to this program).
    pub monitor_program: Option<PathBuf>,
    /// The UEFI firmware full OS VMs boot (default: skiff-vmm's, Debian's
    /// OVMF_CODE_4M.fd).
    pub firmware: Option<PathBuf>,
}

/// The thin-VM driver.
pub struct VmDriver {
    cfg: VmDriverConfig,
    pool: Pool,
    events: broadcast::Sender<DriverEvent>,
    watching: Arc<Mutex<HashMap<String, tokio::task::JoinHandle<()>>>>,
}

fn host(what: &str) -> impl FnOnce(std::io::Error) -> DriverError + '_ {
    move |e| DriverError::Host(format!("{what}: {e}"))
}

/// A one-line account of how a VM ended.
pub fn describe(info: &ExitInfo) -> String {
    let how = match info.reason {
        EndReason::Poweroff => "the guest powered off".to_string(),
        EndReason::Stopped => "stopped".to_string(),
        EndReason::Killed => "killed (forced stop)".to_string(),
        EndReason::Failed => match (info.vmm_exit_code, info.vmm_signal) {
            (Some(3), _) => "the guest kernel panicked".to_string(),
            (Some(c), _) => format!("skiff-vmm failed (exit {c})"),
            (_, Some(s)) => format!("skiff-vmm was killed by signal {s}"),
            _ => "skiff-vmm failed".to_string(),
        },
    };
    match &info.last_main_exit {
        Some(s) => format!("{how}; the entrypoint last ended with {}", s.code()),
        None => how,
    }
}

impl VmDriver {
    /// Opens the storage pool and the runtime directory.
    pub fn new(cfg: VmDriverConfig) -> Result<VmDriver, DriverError> {
        let pool = Pool::open(&cfg.storage_root)?;
        std::fs::create_dir_all(cfg.runtime_root.join("vm")).map_err(host("creating the runtime directory"))?;
        if let Ok(removed) = pool.cleanup_partial() {
            for r in removed {
                log::info!("storage: removed half-made {r}");
            }
        }
        Ok(VmDriver { cfg, pool, events: broadcast::channel(EVENT_BACKLOG).0, watching: Arc::default() })
    }

    /// The runtime directory of an instance's VM (short: unix sockets).
    /// The monitor of a running instance.
    fn monitor(&self, inst: &InstanceSpec) -> Result<monitor::MonitorHandle, DriverError> {
        monitor::attach(&self.runtime_dir(inst)).map_err(|_| DriverError::NotRunning(inst.name.clone()))
    }

    fn runtime_dir(&self, inst: &InstanceSpec) -> PathBuf {
        let short: String = inst.id.chars().filter(|c| c.is_ascii_hexdigit()).take(12).collect();
        self.cfg.runtime_root.join("vm").join(format!("i{short}"))
    }

    fn exit_file(inst: &InstanceSpec) -> PathBuf {
        inst.dir.join("exit.json")
    }

    fn last_exit(inst: &InstanceSpec) -> Option<String> {
        let bytes = std::fs::read(Self::exit_file(inst)).ok()?;
        serde_json::from_slice::<ExitInfo>(&bytes).ok().map(|i| describe(&i))
    }

    fn launch_spec(
        &self,
        inst: &InstanceSpec,
        rootfs: PathBuf,
        restore: Option<PathBuf>,
    ) -> Result<LaunchSpec, DriverError> {
        let (cpus, memory_mib) = config::resources(&inst.config)?;
        let main = config::main_process(inst)?;
        let network = crate::network_config(inst);
        Ok(LaunchSpec {
            name: inst.name.clone(),
            runtime_dir: self.runtime_dir(inst),
            rootfs,
            shares: vec![],
            kernel: self.cfg.kernel.clone(),
            initramfs: self.cfg.initramfs.clone(),
            agent: self.cfg.agent.clone(),
            vmm: self.cfg.vmm.clone(),
            virtiofsd: self.cfg.virtiofsd.clone(),
            monitor_program: self.cfg.monitor_program.clone(),
            cpus,
            memory_mib,
            max_cpus: Some(config::max_cpus(cpus)),
            memory_hotplug_mib: config::memory_hotplug_mib(&inst.config)?,
            devices: crate::devices::device_specs(&inst.devices)?,
            hostname: Some(inst.name.clone()),
            boot_timeout_secs: BOOT_TIMEOUT_SECS,
            nic: inst.nic.as_ref().map(|n| skiff_run::Nic { tap: n.tap.clone(), mac: n.mac.clone() }),
            network,
            main,
            console_log: inst.dir.join("console.log"),
            exit_file: Self::exit_file(inst),
            monitor_log: inst.dir.join("monitor.log"),
            label: inst.config.get("image.oci.reference").cloned().unwrap_or_default(),
            restore,
            os: None,
        })
    }

    /// Mounts the volume and launches the VM's monitor (booting, or
    /// restoring from `restore`); on failure the volume is unmounted again.
    async fn launch(&self, inst: &InstanceSpec, restore: Option<PathBuf>) -> Result<(), DriverError> {
        let dir = self.runtime_dir(inst);
        if monitor::attach(&dir).is_ok() {
            return Err(DriverError::Running(inst.name.clone()));
        }
        monitor::remove_leftovers(&dir);
        let volume = self.volume(inst)?;
        let v = volume.clone();
        let rootfs = volumes::blocking(move || v.mount()).await?;
        let _ = std::fs::remove_file(Self::exit_file(inst));
        let result =
            async { monitor::launch(&self.launch_spec(inst, rootfs, restore)?).await.map_err(DriverError::from) }.await;
        match result {
            Ok(_) => {
                self.watch(inst);
                Ok(())
            }
            Err(e) => {
                let _ = tokio::task::spawn_blocking(move || volume.unmount()).await;
                Err(e)
            }
        }
    }

    /// Watches a running VM's monitor: its events become [`DriverEvent`]s;
    /// when the VM ends the volume is unmounted.
    fn watch(&self, inst: &InstanceSpec) {
        let dir = self.runtime_dir(inst);
        let (name, tx, exit_file) = (inst.name.clone(), self.events.clone(), Self::exit_file(inst));
        let volume = self.pool.open_volume(&inst.name).ok();
        let watching = self.watching.clone();
        let key = inst.name.clone();
        let task = tokio::spawn(async move {
            let mut ended: Option<ExitInfo> = None;
            if let Ok(handle) = monitor::attach(&dir) {
                if let Ok(mut events) = handle.events().await {
                    while let Ok(Some(ev)) = events.next().await {
                        match ev {
                            MonitorEvent::MainExited { status, restarting, .. } => {
                                let _ = tx.send(DriverEvent::MainExited { name: name.clone(), status, restarting });
                            }
                            MonitorEvent::Stopped(info) => {
                                ended = Some(info);
                                break;
                            }
                        }
                    }
                }
                // The monitor may still be writing its exit file.
                for _ in 0..50 {
                    if !handle.alive() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            let ended = ended
                .or_else(|| std::fs::read(&exit_file).ok().and_then(|b| serde_json::from_slice::<ExitInfo>(&b).ok()));
            monitor::remove_leftovers(&dir);
            if let Some(v) = volume {
                let _ = tokio::task::spawn_blocking(move || v.unmount()).await;
            }
            let (clean, detail) = match &ended {
                Some(info) => (
                    matches!(info.reason, EndReason::Poweroff | EndReason::Stopped | EndReason::Killed),
                    match info.reason {
                        EndReason::Failed => format!("{}\n{}", describe(info), info.diagnostics),
                        _ => describe(info),
                    },
                ),
                None => (false, "the VM's monitor died without a word".to_string()),
            };
            let _ = tx.send(DriverEvent::Stopped { name: name.clone(), clean, detail });
            watching.lock().unwrap_or_else(|e| e.into_inner()).remove(&name);
        });
        if let Some(old) = self.watching.lock().unwrap_or_else(|e| e.into_inner()).insert(key, task) {
            old.abort();
        }
    }

    fn volume(&self, inst: &InstanceSpec) -> Result<skiff_storage::Volume, DriverError> {
        Ok(self.pool.open_volume(&inst.name)?)
    }
}

#[async_trait::async_trait]
impl Driver for VmDriver {
    fn kind(&self) -> InstanceKind {
        InstanceKind::VirtualMachine
    }

    fn validate_config(&self, config: &BTreeMap<String, String>) -> Result<(), DriverError> {
        config::validate(config)
    }

    async fn create(&self, inst: &InstanceSpec) -> Result<(), DriverError> {
        if os::is_os(inst) {
            return os::create(inst).await;
        }
        seed::refuse_for_thin_vms(inst)?;
        volumes::create(&self.pool, inst).await
    }

    async fn start(&self, inst: &InstanceSpec) -> Result<(), DriverError> {
        if os::is_os(inst) {
            return self.launch_os(inst).await;
        }
        seed::refuse_for_thin_vms(inst)?;
        match stateful::saved_state(inst) {
            Some(dir) => self.start_saved(inst, dir).await,
            None => self.launch(inst, None).await,
        }
    }

    async fn stop(&self, inst: &InstanceSpec, timeout: Duration, force: bool) -> Result<(), DriverError> {
        let dir = self.runtime_dir(inst);
        let handle = monitor::attach(&dir).map_err(|_| DriverError::NotRunning(inst.name.clone()))?;
        // The watcher goes first: its cleanup is repeated below, and the
        // Stopped event it would send for a stop the daemon asked for could
        // reach the daemon late, after a new start, and stop that run's
        // bookkeeping (its tap) under it.
        if let Some(t) = self.watching.lock().unwrap_or_else(|e| e.into_inner()).remove(&inst.name) {
            t.abort();
        }
        if let Err(e) = handle.stop(timeout, force).await {
            if handle.alive() {
                self.watch(inst);
            }
            return Err(e.into());
        }
        for _ in 0..100 {
            if !handle.alive() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        monitor::remove_leftovers(&dir);
        volumes::unmount(&self.pool, &inst.name).await
    }

    async fn freeze(&self, inst: &InstanceSpec, frozen: bool) -> Result<(), DriverError> {
        // skiff-vmm parks every vCPU and device worker (its vm.pause).
        let req = if frozen { ControlRequest::Pause } else { ControlRequest::Resume };
        self.monitor(inst)?.change(req).await.map_err(DriverError::Monitor)
    }

    fn validate_device(&self, name: &str, device: &BTreeMap<String, String>) -> Result<(), DriverError> {
        crate::devices::device_spec(name, device)?;
        Ok(())
    }

    async fn device_add(
        &self,
        inst: &InstanceSpec,
        name: &str,
        device: &BTreeMap<String, String>,
    ) -> Result<(), DriverError> {
        let Some(device) = crate::devices::device_spec(name, device)? else {
            return Err(DriverError::Running(inst.name.clone()));
        };
        self.monitor(inst)?.change(ControlRequest::AddDevice { device }).await.map_err(DriverError::Monitor)
    }

    async fn device_remove(&self, inst: &InstanceSpec, name: &str) -> Result<(), DriverError> {
        let req = ControlRequest::RemoveDevice { name: name.to_string() };
        self.monitor(inst)?.change(req).await.map_err(DriverError::Monitor)
    }

    async fn update_limits(&self, old: &InstanceSpec, new: &InstanceSpec) -> Result<(), DriverError> {
        let (was, will) = (config::vm_size(&old.config)?, config::vm_size(&new.config)?);
        if was == will {
            return Ok(());
        }
        if os::is_os(old) {
            return Err(DriverError::NeedsRestart(format!(
                "instance {} is a full OS VM: limits.cpu and limits.memory apply at its next start",
                old.name
            )));
        }
        if was.memory_mib != will.memory_mib && config::memory_hotplug_mib(&old.config)? == 0 {
            return Err(DriverError::NeedsRestart(format!(
                "instance {} started without memory hot-plug: set limits.memory.hotplug (the most limits.memory may \
                 grow to while it runs) and restart it, or restart it to apply limits.memory",
                old.name
            )));
        }
        let cpus = (was.cpus != will.cpus).then_some(will.cpus);
        let memory_mib = (was.memory_mib != will.memory_mib).then_some(will.memory_mib);
        self.monitor(new)?.change(ControlRequest::Resize { cpus, memory_mib }).await.map_err(DriverError::Monitor)
    }

    async fn status(&self, inst: &InstanceSpec) -> Result<RunStatus, DriverError> {
        match monitor::attach(&self.runtime_dir(inst)) {
            Ok(h) => match h.status().await {
                Ok(s) => Ok(RunStatus::Running {
                    pid: s.monitor_pid,
                    main_pid: s.main_pid,
                    restarts: s.restarts,
                    started_at: s.started_at,
                }),
                // A monitor that lives but is slow to answer (a loaded
                // host) still keeps a running VM: never report it stopped,
                // or a daemon restart would clean up (its tap, say) under it.
                Err(_) if h.alive() => {
                    Ok(RunStatus::Running { pid: h.pid(), main_pid: None, restarts: 0, started_at: 0 })
                }
                Err(_) => Ok(RunStatus::Stopped { last: Self::last_exit(inst) }),
            },
            Err(_) => Ok(RunStatus::Stopped { last: Self::last_exit(inst) }),
        }
    }

    fn agent(&self, inst: &InstanceSpec) -> Result<AgentClient, DriverError> {
        match monitor::attach(&self.runtime_dir(inst)) {
            Ok(h) => Ok(AgentClient::new(Transport::vsock(h.vsock_socket()))),
            Err(_) => Err(DriverError::NotRunning(inst.name.clone())),
        }
    }

    fn console_log(&self, inst: &InstanceSpec) -> PathBuf {
        inst.dir.join("console.log")
    }

    fn serial_console(&self, inst: &InstanceSpec) -> Option<PathBuf> {
        monitor::attach(&self.runtime_dir(inst)).ok()?.serial_socket()
    }

    async fn delete(&self, inst: &InstanceSpec) -> Result<(), DriverError> {
        let dir = self.runtime_dir(inst);
        if monitor::attach(&dir).is_ok() {
            return Err(DriverError::Running(inst.name.clone()));
        }
        monitor::remove_leftovers(&dir);
        volumes::delete(&self.pool, &inst.name).await?;
        os::delete(inst)?;
        let _ = std::fs::remove_file(Self::exit_file(inst));
        Ok(())
    }

    async fn snapshot_create(&self, inst: &InstanceSpec, snap: &str) -> Result<(), DriverError> {
        if os::is_os(inst) {
            if monitor::attach(&self.runtime_dir(inst)).is_ok() {
                return Err(DriverError::Unsupported(format!(
                    "instance {} is running: snapshots of a running full OS VM are not supported yet (its disk \
                     may hold unflushed writes); stop it first",
                    inst.name
                )));
            }
            return os::snapshot_create(inst, snap).await;
        }
        volumes::snapshot_create(&self.pool, &inst.name, snap).await
    }

    async fn snapshot_restore(&self, inst: &InstanceSpec, snap: &str) -> Result<(), DriverError> {
        if monitor::attach(&self.runtime_dir(inst)).is_ok() {
            return Err(DriverError::Running(inst.name.clone()));
        }
        if os::is_os(inst) {
            return os::snapshot_restore(inst, snap).await;
        }
        volumes::snapshot_restore(&self.pool, &inst.name, snap).await
    }

    async fn snapshot_delete(&self, inst: &InstanceSpec, snap: &str) -> Result<(), DriverError> {
        if os::is_os(inst) {
            return os::snapshot_delete(inst, snap).await;
        }
        volumes::snapshot_delete(&self.pool, &inst.name, snap).await?;
        stateful::delete(inst, snap)
    }

    async fn snapshot_rename(&self, inst: &InstanceSpec, old: &str, new: &str) -> Result<(), DriverError> {
        if os::is_os(inst) {
            return os::snapshot_rename(inst, old, new);
        }
        volumes::snapshot_rename(&self.pool, &inst.name, old, new).await?;
        stateful::rename(inst, old, new)
    }

    async fn snapshot_create_stateful(
        &self,
        inst: &InstanceSpec,
        snap: &str,
        keep_paused: bool,
    ) -> Result<(), DriverError> {
        if os::is_os(inst) {
            return Err(DriverError::Unsupported(
                "stateful snapshots of full OS VMs are not supported yet: take a stateless one".into(),
            ));
        }
        self.save(inst, snap, keep_paused).await
    }

    fn snapshot_is_stateful(&self, inst: &InstanceSpec, snap: &str) -> bool {
        stateful::is_saved(&stateful::snapshot_dir(inst, snap))
    }

    async fn snapshot_restore_stateful(&self, inst: &InstanceSpec, snap: &str) -> Result<(), DriverError> {
        self.restore(inst, snap).await
    }

    async fn copy_from_snapshot(
        &self,
        source: &InstanceSpec,
        snap: &str,
        new: &InstanceSpec,
        stateful: bool,
    ) -> Result<(), DriverError> {
        if os::is_os(source) {
            return Err(DriverError::Unsupported("copying full OS VMs is not supported yet".into()));
        }
        self.copy(source, snap, new, stateful).await
    }

    fn has_saved_state(&self, inst: &InstanceSpec) -> bool {
        stateful::saved_state(inst).is_some()
    }

    async fn adopt(&self, inst: &InstanceSpec) -> Result<RunStatus, DriverError> {
        let dir = self.runtime_dir(inst);
        if monitor::attach(&dir).is_ok() {
            self.watch(inst);
            return self.status(inst).await;
        }
        monitor::remove_leftovers(&dir);
        if let Ok(v) = self.pool.open_volume(&inst.name) {
            volumes::blocking(move || v.unmount()).await?;
        }
        Ok(RunStatus::Stopped { last: Self::last_exit(inst) })
    }

    fn events(&self) -> broadcast::Receiver<DriverEvent> {
        self.events.subscribe()
    }
}
