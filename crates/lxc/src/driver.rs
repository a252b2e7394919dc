//! [`LxcDriver`]: the [`Driver`] of native containers (see the crate doc).

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use skiff_agent_client::events::{EventListener, EventStream};
use skiff_agent_client::{AgentClient, Transport};
use skiff_agent_proto::{Event, ExitStatus};
use skiff_driver::{
    config, devices, volumes, Driver, DriverError, DriverEvent, ImageKind, InstanceKind, InstanceSpec, RunStatus,
};
use skiff_storage::idmap::IdMap;
use skiff_storage::Pool;
use tokio::io::unix::AsyncFd;
use tokio::sync::broadcast;

use crate::conf::{self, BindMount, Cgroups, Init, Veth, AGENT_SOCKET, EVENT_SOCKET};
use crate::nsmount;
use crate::system::{self, Reboots};
use crate::tools::{Lxc, State};

/// Events buffered for a slow daemon.
const EVENT_BACKLOG: usize = 256;
/// How long a container's agent may take to come up.
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an OCI container may take to end after its main process.
const END_GRACE: Duration = Duration::from_secs(10);
/// The id range of unprivileged containers: the set-up gives root
/// `/etc/subuid` and `/etc/subgid` ranges from here.
pub const DEFAULT_IDMAP: IdMap = IdMap { host_base: 1_000_000, count: 65536 };

/// Where the LXC driver finds things.
#[derive(Debug, Clone)]
pub struct LxcDriverConfig {
    /// The storage pool's directory (shared with the VM driver).
    pub storage_root: PathBuf,
    /// Runtime files: `lxc/` (LXC's container path), `ct/` (agent sockets).
    pub runtime_root: PathBuf,
    /// The static agent (default: the usual search).
    pub agent: Option<PathBuf>,
    /// The managed bridge NICs join.
    pub bridge: String,
    /// The id map of unprivileged containers.
    pub idmap: IdMap,
}

/// The LXC driver.
pub struct LxcDriver {
    cfg: LxcDriverConfig,
    pool: Pool,
    lxc: Lxc,
    agent: PathBuf,
    cgroups: Cgroups,
    events: broadcast::Sender<DriverEvent>,
    watching: Arc<Mutex<HashMap<String, tokio::task::JoinHandle<()>>>>,
}

fn boxed(e: impl std::error::Error + Send + Sync + 'static) -> DriverError {
    DriverError::Container(Box::new(e))
}

fn host(what: &str) -> impl FnOnce(std::io::Error) -> DriverError + '_ {
    move |e| DriverError::Host(format!("{what}: {e}"))
}

/// A pidfd that becomes readable when the process ends.
fn pidfd(pid: i32) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: pidfd_open takes a pid and flags; the result is a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: the OwnedFd stays open, and is the same fd, for as long as the AsyncFd owns it.
    unsafe { AsyncFd::register(owned) }.map_err(std::io::Error::from)
}

/// The last lines of LXC's log that say what went wrong.
fn log_errors(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let errors: Vec<&str> = text.lines().filter(|l| l.contains(" ERROR ")).collect();
    let keep = errors.len().saturating_sub(5);
    errors[keep..].join("\n")
}

impl LxcDriver {
    /// Checks for LXC and the agent, opens the pool and runtime directories.
    pub fn new(cfg: LxcDriverConfig) -> Result<LxcDriver, DriverError> {
        Lxc::available().map_err(boxed)?;
        let agent = skiff_run::initramfs::find_agent(cfg.agent.as_deref()).map_err(boxed)?;
        // LXC resolves mount sources from its own working directory.
        let agent = std::fs::canonicalize(&agent).map_err(host("the agent's path"))?;
        let pool = Pool::open(&cfg.storage_root)?;
        let lxc = Lxc::new(cfg.runtime_root.join("lxc"));
        for d in [lxc.path().to_path_buf(), cfg.runtime_root.join("ct")] {
            std::fs::create_dir_all(&d).map_err(host("creating the runtime directory"))?;
        }
        // An unprivileged container's root walks down to its rootfs and
        // its agent's socket directory: every directory above them needs
        // search permission for others (as Incus gives its own, 0711).
        for d in [cfg.storage_root.join("volumes"), cfg.runtime_root.join("ct")] {
            std::fs::create_dir_all(&d).map_err(host("creating the storage directory"))?;
            searchable(&d).map_err(host("giving others search permission"))?;
        }
        Ok(LxcDriver {
            cfg,
            pool,
            lxc,
            agent,
            cgroups: Cgroups::detect(),
            events: broadcast::channel(EVENT_BACKLOG).0,
            watching: Arc::default(),
        })
    }

    /// The host directory mounted at `/.skiff/sock` (short: Unix sockets).
    fn sockets(&self, inst: &InstanceSpec) -> PathBuf {
        let short: String = inst.id.chars().filter(|c| c.is_ascii_hexdigit()).take(12).collect();
        self.cfg.runtime_root.join("ct").join(format!("i{short}"))
    }

    fn agent_client(&self, inst: &InstanceSpec) -> AgentClient {
        AgentClient::new(Transport::Unix(self.sockets(inst).join(AGENT_SOCKET)))
    }

    fn idmap(inst: &InstanceSpec, map: IdMap) -> Result<Option<IdMap>, DriverError> {
        let privileged = match inst.config.get("security.privileged") {
            Some(v) => config::parse_bool("security.privileged", v)?,
            None => false,
        };
        Ok((!privileged).then_some(map))
    }

    fn last_exit_file(inst: &InstanceSpec) -> PathBuf {
        inst.dir.join("last-exit")
    }

    fn last_exit(inst: &InstanceSpec) -> Option<String> {
        std::fs::read_to_string(Self::last_exit_file(inst)).ok().map(|s| s.trim().to_string())
    }

    /// Disk devices as bind mounts (the root disk and NIC are the daemon's).
    fn mounts(inst: &InstanceSpec) -> Result<Vec<BindMount>, DriverError> {
        let mut out = Vec::new();
        for (name, dev) in &inst.devices {
            if let Some(m) = bind_mount(name, dev)? {
                out.push(m);
            }
        }
        Ok(out)
    }

    fn conf_spec(&self, inst: &InstanceSpec, rootfs: PathBuf, idmap: Option<IdMap>) -> Result<conf::Spec, DriverError> {
        Ok(conf::Spec {
            name: inst.name.clone(),
            rootfs,
            idmap,
            nic: inst.nic.as_ref().map(|n| Veth {
                bridge: self.cfg.bridge.clone(),
                host_name: n.tap.clone(),
                mac: n.mac.clone(),
            }),
            limits: conf::limits(&inst.config),
            agent: self.agent.clone(),
            sockets: self.sockets(inst),
            mounts: Self::mounts(inst)?,
            init: match inst.image_kind {
                ImageKind::Oci => Init::Agent,
                ImageKind::System | ImageKind::Disk(_) => Init::System,
            },
            console_log: inst.dir.join("console.log"),
            stop_target: system::stop_target(inst),
            cgroups: self.cgroups,
        })
    }

    /// Makes the socket directory, owned by the container's root.
    fn prepare_sockets(&self, inst: &InstanceSpec, idmap: Option<IdMap>) -> Result<(), DriverError> {
        let dir = self.sockets(inst);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(host("creating the socket directory"))?;
        if let Some(m) = idmap {
            std::os::unix::fs::chown(&dir, Some(m.host_base), Some(m.host_base))
                .map_err(host("chown of the socket directory"))?;
        }
        std::fs::write(dir.join("started"), skiff_run::monitor::now_secs().to_string())
            .map_err(host("writing the start time"))
    }

    /// Listens where the container's agent sends its events (a socket the
    /// container's root may connect to).
    fn listen_events(&self, inst: &InstanceSpec, idmap: Option<IdMap>) -> Result<EventListener, DriverError> {
        let events = self.sockets(inst).join(EVENT_SOCKET);
        let listener = EventListener::bind(&events).map_err(boxed)?;
        if let Some(m) = idmap {
            std::os::unix::fs::chown(&events, Some(m.host_base), Some(m.host_base))
                .map_err(host("chown of the event socket"))?;
        }
        Ok(listener)
    }

    /// After `lxc-start`: the agent up, the network, the main process.
    async fn bring_up(
        &self,
        inst: &InstanceSpec,
        listener: &EventListener,
        main: Option<skiff_agent_proto::MainProcess>,
    ) -> Result<Option<EventStream>, DriverError> {
        let agent = self.agent_client(inst);
        let stream = match inst.image_kind {
            ImageKind::Oci => {
                let mut s = listener.accept(AGENT_TIMEOUT).await.map_err(boxed)?;
                match s.next(AGENT_TIMEOUT).await.map_err(boxed)? {
                    Some(Event::Ready(_)) => {}
                    other => {
                        return Err(DriverError::Host(format!("the agent's first event was {other:?}, not ready")))
                    }
                }
                Some(s)
            }
            ImageKind::System | ImageKind::Disk(_) => {
                system::settle(self.running_pid(inst).await?).await;
                system::start_agent(&self.lxc, inst, &agent).await?;
                return Ok(None);
            }
        };
        if let Some(net) = skiff_driver::network_config(inst) {
            agent.configure_network(net).await.map_err(boxed)?;
        }
        if let Some(main) = main {
            agent.start_main(main).await.map_err(boxed)?;
        }
        Ok(stream)
    }

    /// Watches a running container: the agent's events become
    /// [`DriverEvent`]s; when its init ends for good (not a reboot of a
    /// system container), its volume is unmounted.
    fn watch(&self, inst: &InstanceSpec, pid: i32, listener: Option<EventListener>, stream: Option<EventStream>) {
        let (name, tx) = (inst.name.clone(), self.events.clone());
        let volume = self.pool.open_volume(&inst.name).ok();
        let (sockets, last_file) = (self.sockets(inst), Self::last_exit_file(inst));
        let watching = self.watching.clone();
        let reboots = (inst.image_kind == ImageKind::System).then(|| Reboots {
            lxc: self.lxc.clone(),
            inst: inst.clone(),
            agent: self.agent_client(inst),
        });
        let task = tokio::spawn(async move {
            let mut pid = pid;
            let mut listener = listener;
            let mut stream = stream;
            let mut last_main: Option<ExitStatus> = None;
            loop {
                if let Ok(fd) = &pidfd(pid) {
                    loop {
                        tokio::select! {
                            _ = fd.readable() => break,
                            s = accept(listener.as_ref()) => match s {
                                Some(s) => stream = Some(s),
                                None => listener = None,
                            },
                            ev = next_event(stream.as_mut()) => match ev {
                                Some(Event::MainExited { status, restarting }) => {
                                    last_main = Some(status);
                                    let _ = tx.send(DriverEvent::MainExited { name: name.clone(), status, restarting });
                                }
                                Some(_) => {}
                                None => stream = None,
                            },
                        }
                    }
                }
                match &reboots {
                    Some(r) => match r.follow(pid).await {
                        Some(new) => pid = new,
                        None => break,
                    },
                    None => break,
                }
            }
            let detail = match last_main {
                Some(s) => format!("the container ended; the entrypoint last ended with {}", s.code()),
                None => "the container ended".to_string(),
            };
            let _ = std::fs::write(&last_file, &detail);
            let _ = std::fs::remove_dir_all(&sockets);
            if let Some(v) = volume {
                let _ = tokio::task::spawn_blocking(move || v.unmount()).await;
            }
            let _ = tx.send(DriverEvent::Stopped { name: name.clone(), clean: true, detail });
            watching.lock().unwrap_or_else(|e| e.into_inner()).remove(&name);
        });
        if let Some(old) = self.watching.lock().unwrap_or_else(|e| e.into_inner()).insert(inst.name.clone(), task) {
            old.abort();
        }
    }

    /// What a stopped container leaves: sockets, the mounted volume.
    async fn cleanup(&self, inst: &InstanceSpec) -> Result<(), DriverError> {
        if let Some(t) = self.watching.lock().unwrap_or_else(|e| e.into_inner()).remove(&inst.name) {
            t.abort();
        }
        let _ = std::fs::remove_dir_all(self.sockets(inst));
        volumes::unmount(&self.pool, &inst.name).await
    }

    async fn running_pid(&self, inst: &InstanceSpec) -> Result<i32, DriverError> {
        match self.lxc.init_pid(&inst.name).await.map_err(boxed)? {
            Some(pid) => Ok(pid),
            None => Err(DriverError::NotRunning(inst.name.clone())),
        }
    }

    /// Waits up to `limit` for the container to stop.
    async fn wait_stopped(&self, name: &str, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if matches!(self.lxc.state(name).await, Ok(State::Stopped)) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The agent's next event connection; `None` when the listener broke.
/// Waits as long as it takes: the agent reconnects only with its next event.
async fn accept(l: Option<&EventListener>) -> Option<EventStream> {
    let Some(l) = l else { return std::future::pending().await };
    loop {
        match l.accept(Duration::from_secs(3600)).await {
            Ok(s) => return Some(s),
            Err(skiff_agent_client::ClientError::Timeout(_)) => continue,
            Err(_) => return None,
        }
    }
}

async fn next_event(s: Option<&mut EventStream>) -> Option<Event> {
    match s {
        Some(s) => s.next(Duration::from_secs(u64::from(u32::MAX))).await.ok().flatten(),
        None => std::future::pending().await,
    }
}

/// Adds search permission for others (`o+x`, not read) to `dir` and each
/// directory above it that lacks it.
fn searchable(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for d in dir.ancestors().filter(|d| d.parent().is_some()) {
        let mode = std::fs::metadata(d)?.permissions().mode();
        if mode & 0o001 == 0 {
            log::info!("giving others search permission on {} (unprivileged containers pass it)", d.display());
            std::fs::set_permissions(d, std::fs::Permissions::from_mode((mode | 0o001) & 0o7777))?;
        }
    }
    Ok(())
}

/// The host's memory (MemTotal) in MiB.
fn host_memory_mib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 =
        info.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib >> 10)
}

/// Whether root's subordinate ids in `file` (`/etc/subuid`, `/etc/subgid`) cover `map`.
fn subids_cover(file: &str, map: IdMap) -> bool {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines().any(|l| {
        let f: Vec<&str> = l.trim().split(':').collect();
        match (f.first(), f.get(1).and_then(|v| v.parse::<u64>().ok()), f.get(2).and_then(|v| v.parse::<u64>().ok())) {
            (Some(&"root") | Some(&"0"), Some(start), Some(count)) => {
                start <= u64::from(map.host_base) && u64::from(map.host_base) + u64::from(map.count) <= start + count
            }
            _ => false,
        }
    })
}

/// A disk device as a bind mount; `None` for the daemon's own devices.
fn bind_mount(name: &str, dev: &BTreeMap<String, String>) -> Result<Option<BindMount>, DriverError> {
    let Some(disk) = devices::disk(name, dev, "containers")? else { return Ok(None) };
    let bad = |why: String| DriverError::Device(devices::DeviceError::Bad { name: name.into(), why });
    let target = disk.path.ok_or_else(|| bad("no path (where it appears in the container)".into()))?;
    if !target.starts_with('/') || target == "/" || target.split('/').any(|c| c == "..") {
        return Err(bad(format!("path {target:?} is not an absolute path below /")));
    }
    Ok(Some(BindMount { source: disk.source, target, readonly: disk.readonly, file: !disk.is_dir }))
}

#[async_trait::async_trait]
impl Driver for LxcDriver {
    fn kind(&self) -> InstanceKind {
        InstanceKind::Container
    }

    fn validate_config(&self, config: &BTreeMap<String, String>) -> Result<(), DriverError> {
        config::validate_for(InstanceKind::Container, config)?;
        if let (Some(mib), Some(host)) = (conf::limits(config).memory_mib, host_memory_mib()) {
            if mib > host {
                return Err(DriverError::Config {
                    key: "limits.memory".into(),
                    why: format!("{mib} MiB is more than this host has ({host} MiB)"),
                });
            }
        }
        Ok(())
    }

    async fn create(&self, inst: &InstanceSpec) -> Result<(), DriverError> {
        if let ImageKind::Disk(_) = inst.image_kind {
            return Err(DriverError::Unsupported(
                "a disk image boots as a full OS VM: launch it with --vm (containers need an OCI or system image)"
                    .into(),
            ));
        }
        if inst.image_kind == ImageKind::Oci {
            config::main_process(inst)?;
        }
        volumes::create(&self.pool, inst).await
    }

    async fn start(&self, inst: &InstanceSpec) -> Result<(), DriverError> {
        if self.lxc.state(&inst.name).await.map_err(boxed)? != State::Stopped {
            return Err(DriverError::Running(inst.name.clone()));
        }
        let main = match inst.image_kind {
            ImageKind::Oci => Some(config::main_process(inst)?),
            ImageKind::System | ImageKind::Disk(_) => None,
        };
        let idmap = Self::idmap(inst, self.cfg.idmap)?;
        if let Some(m) = idmap {
            for file in ["/etc/subuid", "/etc/subgid"] {
                if !subids_cover(file, m) {
                    return Err(DriverError::Host(format!(
                        "{file} gives root no ids {}-{}, which unprivileged containers map to (scripts/setup adds \
                         them), or set security.privileged=true",
                        m.host_base,
                        m.host_base + m.count - 1
                    )));
                }
            }
        }
        let volume = self.pool.open_volume(&inst.name)?;
        let rootfs = volumes::blocking(move || volume.mount_mapped(idmap)).await?;
        let result = async {
            self.prepare_sockets(inst, idmap)?;
            let listener = self.listen_events(inst, idmap)?;
            let text = conf::render(&self.conf_spec(inst, rootfs, idmap)?).map_err(boxed)?;
            let dir = self.lxc.dir(&inst.name);
            std::fs::create_dir_all(&dir).map_err(host("creating the container directory"))?;
            std::fs::write(dir.join("config"), text).map_err(host("writing the LXC config"))?;
            let _ = std::fs::remove_file(dir.join("lxc.log"));
            let _ = std::fs::remove_file(Self::last_exit_file(inst));
            let _ = std::fs::remove_file(system::stop_target(inst));
            if let Err(e) = self.lxc.start(&inst.name).await {
                let log = log_errors(&dir.join("lxc.log"));
                return Err(DriverError::Host(format!("{}\n{log}", skiff_run::monitor::error_chain(&e))));
            }
            let up = self.bring_up(inst, &listener, main).await;
            let stream = match up {
                Ok(s) => s,
                Err(e) => {
                    let _ = self.lxc.stop(&inst.name, Duration::ZERO, true).await;
                    let console = std::fs::read_to_string(inst.dir.join("console.log")).unwrap_or_default();
                    let tail: String = console
                        .lines()
                        .rev()
                        .take(10)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n");
                    return Err(DriverError::Host(format!(
                        "{}\nconsole:\n{tail}",
                        skiff_run::monitor::error_chain(&e)
                    )));
                }
            };
            let pid = self.running_pid(inst).await?;
            let listener = (inst.image_kind == ImageKind::Oci).then_some(listener);
            self.watch(inst, pid, listener, stream);
            Ok(())
        }
        .await;
        if result.is_err() {
            let _ = self.cleanup(inst).await;
        }
        result
    }

    async fn stop(&self, inst: &InstanceSpec, timeout: Duration, force: bool) -> Result<(), DriverError> {
        if self.lxc.state(&inst.name).await.map_err(boxed)? == State::Stopped {
            return Err(DriverError::NotRunning(inst.name.clone()));
        }
        // A stop the daemon asked for needs no Stopped event; the cleanup
        // the watcher would do is done below.
        if let Some(t) = self.watching.lock().unwrap_or_else(|e| e.into_inner()).remove(&inst.name) {
            t.abort();
        }
        let mut stopped = false;
        if !force {
            match inst.image_kind {
                ImageKind::Oci => {
                    // The agent stops the main process, then powers off.
                    if self.agent_client(inst).stop_main(timeout).await.is_ok() {
                        stopped = self.wait_stopped(&inst.name, END_GRACE).await;
                    }
                }
                ImageKind::System | ImageKind::Disk(_) => {
                    stopped = self.lxc.stop(&inst.name, timeout, false).await.is_ok()
                        && self.wait_stopped(&inst.name, END_GRACE).await;
                }
            }
        }
        if !stopped {
            self.lxc.stop(&inst.name, Duration::ZERO, true).await.map_err(boxed)?;
            self.wait_stopped(&inst.name, END_GRACE).await;
        }
        let how = if stopped { "stopped" } else { "killed (forced stop)" };
        let _ = std::fs::write(Self::last_exit_file(inst), how);
        self.cleanup(inst).await
    }

    async fn freeze(&self, inst: &InstanceSpec, frozen: bool) -> Result<(), DriverError> {
        self.running_pid(inst).await?;
        self.lxc.freeze(&inst.name, frozen).await.map_err(boxed)
    }

    fn validate_device(&self, name: &str, device: &BTreeMap<String, String>) -> Result<(), DriverError> {
        bind_mount(name, device).map(drop)
    }

    async fn device_add(
        &self,
        inst: &InstanceSpec,
        name: &str,
        device: &BTreeMap<String, String>,
    ) -> Result<(), DriverError> {
        let Some(m) = bind_mount(name, device)? else {
            return Err(DriverError::Running(inst.name.clone()));
        };
        if m.file {
            return Err(DriverError::Device(devices::DeviceError::Bad {
                name: name.into(),
                why: "a file can be added at start only; directories are added live".into(),
            }));
        }
        let pid = self.running_pid(inst).await?;
        nsmount::add(pid, &m.source, &m.target, m.readonly).await.map_err(boxed)
    }

    async fn device_remove(&self, inst: &InstanceSpec, name: &str) -> Result<(), DriverError> {
        let dev = inst.devices.get(name).ok_or_else(|| {
            DriverError::Device(devices::DeviceError::Bad { name: name.into(), why: "no such device".into() })
        })?;
        let Some(m) = bind_mount(name, dev)? else {
            return Err(DriverError::Running(inst.name.clone()));
        };
        let pid = self.running_pid(inst).await?;
        nsmount::remove(pid, &m.target).await.map_err(boxed)
    }

    async fn update_limits(&self, _old: &InstanceSpec, new: &InstanceSpec) -> Result<(), DriverError> {
        self.running_pid(new).await?;
        let limits = conf::limits(&new.config);
        for (key, value) in self.cgroups.limits(&limits) {
            self.lxc.cgroup_set(&new.name, key, &value).await.map_err(boxed)?;
        }
        Ok(())
    }

    async fn status(&self, inst: &InstanceSpec) -> Result<RunStatus, DriverError> {
        match self.lxc.init_pid(&inst.name).await.map_err(boxed)? {
            Some(pid) => {
                let started_at = std::fs::read_to_string(self.sockets(inst).join("started"))
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
                Ok(RunStatus::Running { pid: pid as u32, main_pid: None, restarts: 0, started_at })
            }
            _ => Ok(RunStatus::Stopped { last: Self::last_exit(inst) }),
        }
    }

    fn agent(&self, inst: &InstanceSpec) -> Result<AgentClient, DriverError> {
        if !self.sockets(inst).join(AGENT_SOCKET).exists() {
            return Err(DriverError::NotRunning(inst.name.clone()));
        }
        Ok(self.agent_client(inst))
    }

    fn console_log(&self, inst: &InstanceSpec) -> PathBuf {
        inst.dir.join("console.log")
    }

    async fn delete(&self, inst: &InstanceSpec) -> Result<(), DriverError> {
        if self.lxc.state(&inst.name).await.unwrap_or(State::Stopped) != State::Stopped {
            return Err(DriverError::Running(inst.name.clone()));
        }
        self.cleanup(inst).await?;
        let _ = std::fs::remove_dir_all(self.lxc.dir(&inst.name));
        volumes::delete(&self.pool, &inst.name).await?;
        let _ = std::fs::remove_file(Self::last_exit_file(inst));
        Ok(())
    }

    async fn snapshot_create(&self, inst: &InstanceSpec, snap: &str) -> Result<(), DriverError> {
        volumes::snapshot_create(&self.pool, &inst.name, snap).await
    }

    async fn snapshot_restore(&self, inst: &InstanceSpec, snap: &str) -> Result<(), DriverError> {
        if self.lxc.state(&inst.name).await.map_err(boxed)? != State::Stopped {
            return Err(DriverError::Running(inst.name.clone()));
        }
        volumes::snapshot_restore(&self.pool, &inst.name, snap).await
    }

    async fn snapshot_delete(&self, inst: &InstanceSpec, snap: &str) -> Result<(), DriverError> {
        volumes::snapshot_delete(&self.pool, &inst.name, snap).await
    }

    async fn snapshot_rename(&self, inst: &InstanceSpec, old: &str, new: &str) -> Result<(), DriverError> {
        volumes::snapshot_rename(&self.pool, &inst.name, old, new).await
    }

    async fn adopt(&self, inst: &InstanceSpec) -> Result<RunStatus, DriverError> {
        if let Some(pid) = self.lxc.init_pid(&inst.name).await.map_err(boxed)? {
            // The agent reconnects to a new listener with its next event.
            let listener = match inst.image_kind {
                ImageKind::Oci => self.listen_events(inst, Self::idmap(inst, self.cfg.idmap)?).ok(),
                ImageKind::System | ImageKind::Disk(_) => None,
            };
            self.watch(inst, pid, listener, None);
            return self.status(inst).await;
        }
        self.cleanup(inst).await?;
        Ok(RunStatus::Stopped { last: Self::last_exit(inst) })
    }

    fn events(&self) -> broadcast::Receiver<DriverEvent> {
        self.events.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn disk_devices_become_bind_mounts() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().to_str().unwrap();
        let m = bind_mount("data", &dev(&[("type", "disk"), ("source", src), ("path", "/data"), ("readonly", "true")]))
            .unwrap()
            .unwrap();
        assert_eq!((m.target.as_str(), m.readonly, m.file), ("/data", true, false));
        assert!(bind_mount("root", &dev(&[("type", "disk"), ("path", "/"), ("pool", "default")])).unwrap().is_none());
        for bad in [
            dev(&[("type", "disk"), ("source", "/no/such/dir"), ("path", "/x")]),
            dev(&[("type", "disk"), ("source", src), ("path", "relative")]),
            dev(&[("type", "disk"), ("source", src), ("path", "/a/../b")]),
            dev(&[("type", "disk"), ("source", src), ("path", "/x"), ("shift", "true")]),
            dev(&[("type", "gpu")]),
        ] {
            assert!(bind_mount("d", &bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn subordinate_ids_must_cover_the_map() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("subuid");
        let map = DEFAULT_IDMAP;
        for (text, ok) in [
            ("root:1000000:1000000000\n", true),
            ("alice:1000000:1000000000\nroot:100000:65536\n", false),
            ("root:1000000:65535\n", false),
            ("0:900000:200000\n", true),
            ("garbage\n", false),
        ] {
            std::fs::write(&f, text).unwrap();
            assert_eq!(subids_cover(f.to_str().unwrap(), map), ok, "{text}");
        }
        assert!(host_memory_mib().unwrap() > 0);
    }

    #[test]
    fn searchable_adds_only_search_permission_where_missing() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("a");
        let b = a.join("b");
        std::fs::create_dir_all(&b).unwrap();
        std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(&b, std::fs::Permissions::from_mode(0o750)).unwrap();
        searchable(&b).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&a), mode(&b)), (0o701, 0o751));
    }

    #[test]
    fn pidfd_becomes_readable_when_the_process_ends() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut child = tokio::process::Command::new("sleep").arg("0.2").spawn().unwrap();
            let fd = pidfd(child.id().unwrap() as i32).unwrap();
            tokio::time::timeout(Duration::from_secs(5), fd.readable()).await.unwrap().unwrap().retain_ready();
            let _ = child.wait().await;
        });
    }
}
