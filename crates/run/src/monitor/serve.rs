//! The monitor process itself (`skiff-run monitor`): boots the VM, reports
//! on the status pipe, serves the control socket, follows the agent's events
//! and skiff-vmm, and writes the exit file when the VM ends.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use skiff_agent_proto::Event;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc, oneshot, Semaphore};

use super::proto::{
    now_secs, BootReport, ControlReply, ControlRequest, DeviceSpec, EndReason, ExitInfo, LaunchSpec, Launched,
    MonitorEvent, MonitorState, MonitorStatus, SavedRun, SAVED_RUN,
};
use super::{error_chain, MonitorError, CONTROL_SOCKET};
use crate::control::{read_request_line, ServeLimits};
use crate::kernel::KernelSearch;
use crate::runtime::{self, VSOCK_SOCKET};
use crate::vm::{self, RestoreOptions, ThinVm, VmExtras, VmOptions};
use crate::{initramfs, Stopped};

/// How long connections that wait for the end get to receive it.
const FAREWELL: Duration = Duration::from_secs(3);
/// Grace for the guest to power off after the main process stopped.
const POWEROFF_GRACE: Duration = Duration::from_secs(15);
/// Slack on top of the main process's stop timeout for the agent to answer.
const STOP_SLACK: Duration = Duration::from_secs(15);
/// The control socket's limits: 64 KiB request lines, 5 s to send one, and
/// 64 connections at once (an `events` subscription holds one for the
/// VM's life).
const SERVE_LIMITS: ServeLimits =
    ServeLimits { max_line: 64 * 1024, max_connections: 64, read_timeout: Duration::from_secs(5) };
/// How long skiff-vmm may take to write a snapshot (guest memory to disk).
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);

/// What the monitor keeps of the VM beyond [`MonitorStatus`]: the devices
/// it has by name (for a snapshot's [`SavedRun`]).
struct Running {
    devices: Vec<DeviceSpec>,
    shares: Vec<vm::Share>,
    cpus: u8,
    memory_mib: u64,
}
/// State shared between the monitor's loop and its control connections.
struct Shared {
    status: Mutex<MonitorStatus>,
    events: broadcast::Sender<MonitorEvent>,
    stop: mpsc::Sender<(u64, bool)>,
    /// Runtime changes (pause, devices, resize) for the loop that owns the VM.
    changes: mpsc::Sender<(ControlRequest, oneshot::Sender<ControlReply>)>,
    /// Set once the VM ended.
    end: Mutex<Option<ExitInfo>>,
    /// Held (cloned) by connections that wait for the end; dropped by the
    /// loop at the end so it can wait for them to finish.
    farewell: Mutex<Option<mpsc::Sender<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Turns the spec into boot options: the kernel, initramfs and programs
/// found the way `skiff-run` finds them.
pub fn vm_options(spec: &LaunchSpec) -> Result<(VmOptions, VmExtras), MonitorError> {
    let (root, name) = super::split_runtime_dir(&spec.runtime_dir)?;
    let cache = runtime::cache_dir();
    let kernel = KernelSearch::host(&cache.join("kernels")).find(spec.kernel.as_deref())?;
    let initramfs = match &spec.initramfs {
        Some(p) => p.clone(),
        None => {
            let agent = initramfs::find_agent(spec.agent.as_deref())?;
            initramfs::ensure(&agent, &kernel, Path::new("/"), &cache.join("initramfs"))?
        }
    };
    let vmm = match &spec.vmm {
        Some(p) => p.clone(),
        None => vm::find_vmm()?,
    };
    let virtiofsd = match &spec.virtiofsd {
        Some(p) => p.clone(),
        None => vm::find_virtiofsd()?,
    };
    let opts = VmOptions {
        name,
        runtime_root: root,
        rootfs: spec.rootfs.clone(),
        shares: spec.shares.clone(),
        kernel,
        initramfs,
        cpus: spec.cpus,
        memory_mib: spec.memory_mib,
        hostname: spec.hostname.clone(),
        vmm,
        virtiofsd,
        boot_timeout: Duration::from_secs(spec.boot_timeout_secs),
        bundle: if spec.label.is_empty() { spec.name.clone() } else { spec.label.clone() },
    };
    let extras = VmExtras {
        console_log: Some(spec.console_log.clone()),
        nic: spec.nic.clone(),
        max_cpus: spec.max_cpus,
        memory_hotplug_mib: spec.memory_hotplug_mib,
    };
    Ok((opts, extras))
}

/// The status pipe: one [`BootReport`] line, then closed.
struct StatusPipe(Option<std::fs::File>);

impl StatusPipe {
    fn new(fd: Option<i32>) -> StatusPipe {
        let file = fd.filter(|&fd| {
            // SAFETY: F_SETFD on an fd number; fails harmlessly (EBADF) when it is not open. Children must
            // not inherit the pipe, or the launcher would wait for them instead of this process.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) == 0 }
        });
        // SAFETY: the fd is open (checked above) and handed to this process for it alone.
        StatusPipe(file.map(|fd| std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    fn send(&mut self, report: &BootReport) {
        let line = serde_json::to_string(report).unwrap_or_default() + "\n";
        if let Some(mut f) = self.0.take() {
            let _ = f.write_all(line.as_bytes());
        } else {
            eprintln!("{}", line.trim_end());
        }
    }
}

/// Runs the monitor for the spec at `spec_path` (which it removes after
/// reading); the process's exit code.
pub async fn run(spec_path: &Path, status_fd: Option<i32>) -> i32 {
    let mut pipe = StatusPipe::new(status_fd);
    let spec = match read_spec(spec_path) {
        Ok(s) => s,
        Err(e) => {
            pipe.send(&BootReport::Failed { message: error_chain(&e) });
            return 1;
        }
    };
    let name = spec.name.clone();
    eprintln!("skiff-run monitor {name}: booting (pid {})", std::process::id());
    // A launcher that dies before the boot report (skiffd SIGKILLed
    // mid-launch, a ^C'd skiff-run) abandons the VM: nobody would adopt a
    // monitor that never reported, so the boot is dropped (its skiff-vmm and
    // virtiofsd are killed with it) rather than left running unowned.
    let booted = match status_fd {
        Some(_) => {
            let parent = std::os::unix::process::parent_id();
            tokio::select! {
                b = boot(&spec) => b,
                () = launcher_gone(parent) => Err(MonitorError::LauncherGone(parent)),
            }
        }
        None => boot(&spec).await,
    };
    let (vm, launched, listener, running, restarts) = match booted {
        Ok(v) => v,
        Err(e) => {
            let message = error_chain(&e);
            eprintln!("skiff-run monitor {name}: boot failed: {message}");
            pipe.send(&BootReport::Failed { message });
            return 1;
        }
    };
    let _ = std::fs::remove_file(&spec.exit_file);
    eprintln!("skiff-run monitor {name}: ready, main process pid {}", launched.main_pid);
    pipe.send(&BootReport::Ready(launched.clone()));
    drop(pipe);
    let info = supervise(&spec, vm, &launched, listener, running, restarts).await;
    eprintln!("skiff-run monitor {name}: ended: {:?}", info.reason);
    0
}

/// Returns once this process's parent is no longer `parent` (it died and
/// the process was re-parented).
async fn launcher_gone(parent: u32) {
    while std::os::unix::process::parent_id() == parent {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn read_spec(path: &Path) -> Result<LaunchSpec, MonitorError> {
    let data = std::fs::read(path).map_err(|e| MonitorError::Io(format!("reading {}", path.display()), e))?;
    let _ = std::fs::remove_file(path);
    serde_json::from_slice(&data).map_err(|e| MonitorError::Protocol(format!("{}: {e}", path.display())))
}

/// What [`boot`] hands to [`supervise`].
type Booted = (ThinVm, Launched, UnixListener, Running, u32);

/// Boots (or restores), configures the network, starts the main process
/// and binds the control socket; on failure everything started is stopped.
async fn boot(spec: &LaunchSpec) -> Result<Booted, MonitorError> {
    if let Some(dir) = &spec.restore {
        return restore(spec, dir).await;
    }
    if let Some(os) = &spec.os {
        let (vm, listener) = super::os::boot(spec, os).await?;
        let launched = launched(spec, &vm, 0, "firmware".into());
        let running = Running { devices: vec![], shares: vec![], cpus: spec.cpus, memory_mib: spec.memory_mib };
        return Ok((vm, launched, listener, running, 0));
    }
    let (opts, extras) = vm_options(spec)?;
    let kernel = opts.kernel.to_string();
    let mut vm = ThinVm::boot_with(&opts, &extras).await?;
    match start(spec, &mut vm).await {
        Ok((main_pid, listener)) => {
            let launched = launched(spec, &vm, main_pid, kernel);
            let running = Running {
                devices: spec.devices.clone(),
                shares: spec.shares.clone(),
                cpus: spec.cpus,
                memory_mib: spec.memory_mib,
            };
            Ok((vm, launched, listener, running, 0))
        }
        Err(e) => {
            let _ = vm.shutdown(Duration::from_secs(5)).await;
            Err(e)
        }
    }
}

fn launched(spec: &LaunchSpec, vm: &ThinVm, main_pid: i32, kernel: String) -> Launched {
    Launched {
        name: spec.name.clone(),
        monitor_pid: std::process::id(),
        vmm_pid: vm.vmm_pid().unwrap_or(0),
        main_pid,
        runtime_dir: vm.runtime_dir().to_path_buf(),
        vsock_socket: vm.runtime_dir().join(VSOCK_SOCKET),
        kernel,
        started_at: now_secs(),
    }
}

/// Reads a snapshot directory's [`SavedRun`].
pub fn read_saved_run(dir: &Path) -> Result<SavedRun, MonitorError> {
    let path = dir.join(SAVED_RUN);
    let data = std::fs::read(&path).map_err(|e| MonitorError::Io(format!("reading {}", path.display()), e))?;
    serde_json::from_slice(&data).map_err(|e| MonitorError::Protocol(format!("{}: {e}", path.display())))
}

/// Brings the VM back from snapshot `dir`: its devices given anew, the
/// network set up again for a clone, the control socket bound.
async fn restore(spec: &LaunchSpec, dir: &Path) -> Result<Booted, MonitorError> {
    let saved = read_saved_run(dir)?;
    if saved.nic.is_some() != spec.nic.is_some() {
        return Err(MonitorError::BadSnapshot(format!(
            "the snapshot was taken {} a NIC, the VM is to have {}",
            if saved.nic.is_some() { "with" } else { "without" },
            if spec.nic.is_some() { "one" } else { "none" }
        )));
    }
    let (root, name) = super::split_runtime_dir(&spec.runtime_dir)?;
    let opts = RestoreOptions {
        name,
        runtime_root: root,
        snapshot: dir.to_path_buf(),
        rootfs: spec.rootfs.clone(),
        shares: saved.shares.clone(),
        devices: saved.devices.clone(),
        vmm: match &spec.vmm {
            Some(p) => p.clone(),
            None => vm::find_vmm()?,
        },
        virtiofsd: match &spec.virtiofsd {
            Some(p) => p.clone(),
            None => vm::find_virtiofsd()?,
        },
        timeout: Duration::from_secs(spec.boot_timeout_secs),
        bundle: if spec.label.is_empty() { spec.name.clone() } else { spec.label.clone() },
        cpus: saved.cpus,
        memory_mib: saved.memory_mib,
    };
    let extras = VmExtras { console_log: Some(spec.console_log.clone()), nic: spec.nic.clone(), ..Default::default() };
    let vm = ThinVm::restore(&opts, &extras).await?;
    let result = async {
        // A clone has another name and MAC: the guest takes the MAC (Linux
        // read the old one when it probed the NIC) and asks DHCP again.
        let new_mac = spec.nic.as_ref().filter(|n| saved.nic.as_ref().is_some_and(|s| s.mac != n.mac));
        if let Some(nic) = new_mac {
            vm.agent().set_mac(None, &nic.mac).await.map_err(MonitorError::Network)?;
        }
        if let Some(net) = spec.network.as_ref().filter(|_| saved.name != spec.name || new_mac.is_some()) {
            vm.agent().configure_network(net.clone()).await.map_err(MonitorError::Network)?;
        }
        let path = vm.runtime_dir().join(CONTROL_SOCKET);
        UnixListener::bind(&path).map_err(|e| MonitorError::Io(format!("binding {}", path.display()), e))
    }
    .await;
    match result {
        Ok(listener) => {
            let kernel = format!("restored from {}", dir.display());
            let launched = launched(spec, &vm, saved.main_pid.unwrap_or(0), kernel);
            let running = Running {
                devices: saved.devices,
                shares: saved.shares,
                cpus: saved.cpus,
                memory_mib: saved.memory_mib,
            };
            Ok((vm, launched, listener, running, saved.restarts))
        }
        Err(e) => {
            let mut vm = vm;
            vm.kill_vmm();
            let _ = vm.shutdown(Duration::ZERO).await;
            Err(e)
        }
    }
}

async fn start(spec: &LaunchSpec, vm: &mut ThinVm) -> Result<(i32, UnixListener), MonitorError> {
    for device in &spec.devices {
        add_device(spec, vm, device).await.map_err(|e| MonitorError::Device(device.name().to_string(), Box::new(e)))?;
    }
    let agent = vm.agent();
    if let Some(net) = &spec.network {
        agent.configure_network(net.clone()).await.map_err(MonitorError::Network)?;
    }
    let pid = agent.start_main(spec.main.clone()).await.map_err(|e| {
        MonitorError::MainStart(spec.main.args.first().cloned().unwrap_or_default(), Box::new(e), vm.diagnostics())
    })?;
    let path = vm.runtime_dir().join(CONTROL_SOCKET);
    let listener = UnixListener::bind(&path).map_err(|e| MonitorError::Io(format!("binding {}", path.display()), e))?;
    Ok((pid, listener))
}

async fn add_device(spec: &LaunchSpec, vm: &mut ThinVm, device: &DeviceSpec) -> Result<(), vm::HotplugError> {
    match device {
        DeviceSpec::Share { name, source, path, readonly } => {
            let virtiofsd = match &spec.virtiofsd {
                Some(p) => p.clone(),
                None => vm::find_virtiofsd().map_err(|e| vm::HotplugError::Virtiofsd(name.clone(), Box::new(e)))?,
            };
            vm.add_share(&virtiofsd, name, source, path, *readonly).await
        }
        DeviceSpec::Disk { name, source, readonly } => vm.add_disk(name, source, *readonly).await,
    }
}

/// A runtime change, made by the loop that owns the VM.
async fn change(
    spec: &LaunchSpec,
    vm: &mut ThinVm,
    shared: &Shared,
    running: &mut Running,
    request: ControlRequest,
) -> ControlReply {
    let result = match request {
        ControlRequest::Pause => vm.pause().await,
        ControlRequest::Resume => vm.resume().await,
        ControlRequest::AddDevice { device } => add_device(spec, vm, &device).await.map(|()| {
            running.devices.push(device);
        }),
        ControlRequest::RemoveDevice { name } => vm.remove_device(&name).await.map(|()| {
            running.devices.retain(|d| d.name() != name);
        }),
        ControlRequest::Resize { cpus, memory_mib } => vm.resize(cpus, memory_mib).await.map(|()| {
            running.cpus = cpus.unwrap_or(running.cpus);
            running.memory_mib = memory_mib.unwrap_or(running.memory_mib);
        }),
        ControlRequest::Snapshot { dir } => {
            return match snapshot(spec, vm, shared, running, &dir).await {
                Ok(()) => ControlReply::Done,
                Err(message) => ControlReply::Error { message },
            }
        }
        other => return ControlReply::Error { message: format!("{other:?} is not a runtime change") },
    };
    match result {
        Ok(()) => ControlReply::Done,
        Err(e) => ControlReply::Error { message: error_chain(&e) },
    }
}

/// Saves the paused VM into `dir`: skiff-vmm's files, then the
/// [`SavedRun`] (written last, so a directory with it is complete).
async fn snapshot(
    spec: &LaunchSpec,
    vm: &ThinVm,
    shared: &Shared,
    running: &Running,
    dir: &Path,
) -> Result<(), String> {
    if !dir.is_absolute() {
        return Err(format!("snapshot directory {} is not absolute", dir.display()));
    }
    let _ = std::fs::remove_file(dir.join(SAVED_RUN));
    vm.snapshot(dir, SNAPSHOT_TIMEOUT).await.map_err(|e| error_chain(&e))?;
    let status = lock(&shared.status).clone();
    let saved = SavedRun {
        name: spec.name.clone(),
        cpus: running.cpus,
        memory_mib: running.memory_mib,
        rootfs: spec.rootfs.clone(),
        main: spec.main.clone(),
        shares: running.shares.clone(),
        devices: running.devices.clone(),
        main_pid: status.main_pid,
        restarts: status.restarts,
        nic: spec.nic.clone(),
    };
    let data = serde_json::to_vec_pretty(&saved).map_err(|e| e.to_string())?;
    std::fs::write(dir.join(SAVED_RUN), data).map_err(|e| format!("writing {}: {e}", dir.join(SAVED_RUN).display()))
}

/// Follows the VM until it ends; the exit info (also written to the exit
/// file and sent to every subscriber).
async fn supervise(
    spec: &LaunchSpec,
    mut vm: ThinVm,
    launched: &Launched,
    listener: UnixListener,
    mut running: Running,
    restarts: u32,
) -> ExitInfo {
    let (stop_tx, mut stop_rx) = mpsc::channel(8);
    let (changes_tx, mut changes_rx) = mpsc::channel::<(ControlRequest, oneshot::Sender<ControlReply>)>(8);
    let (farewell_tx, mut farewell_rx) = mpsc::channel::<()>(1);
    let shared = Arc::new(Shared {
        status: Mutex::new(MonitorStatus {
            name: spec.name.clone(),
            state: MonitorState::Running,
            monitor_pid: std::process::id(),
            vmm_pid: launched.vmm_pid,
            main_pid: Some(launched.main_pid).filter(|p| *p > 0),
            restarts,
            last_main_exit: None,
            started_at: launched.started_at,
        }),
        events: broadcast::channel(64).0,
        stop: stop_tx,
        changes: changes_tx,
        end: Mutex::new(None),
        farewell: Mutex::new(Some(farewell_tx)),
    });
    let acceptor = tokio::spawn(accept_loop(listener, shared.clone(), SERVE_LIMITS));
    let (ev_tx, mut ev_rx) = mpsc::channel(16);
    let mut reader = read_agent_events(&mut vm, ev_tx.clone());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
    let default_stop = spec.main.stop_timeout_secs;
    let request = loop {
        tokio::select! {
            st = vm.vmm_exited() => {
                if !super::os::is_reset(spec, &st) {
                    break Err(st.ok());
                }
                eprintln!("skiff-run monitor {}: the guest reset: booting it again", spec.name);
                reader.abort();
                // A stop (or SIGTERM) during the new boot ends it: the
                // boot may take up to its timeout, nobody waits that long
                // for a stop.
                let rebooted = tokio::select! {
                    r = super::os::reboot(spec, &mut vm) => r,
                    Some(req) = stop_rx.recv() => break Ok(req),
                    Some(()) = recv_signal(&mut term) => break Ok((default_stop, false)),
                    Some(()) = recv_signal(&mut int) => break Ok((default_stop, false)),
                };
                if let Err(e) = rebooted {
                    eprintln!("skiff-run monitor {}: reboot failed: {}", spec.name, error_chain(&e));
                    break Err(None);
                }
                eprintln!("skiff-run monitor {}: ready again after the reset", spec.name);
                lock(&shared.status).vmm_pid = vm.vmm_pid().unwrap_or(0);
                reader = read_agent_events(&mut vm, ev_tx.clone());
            }
            Some(ev) = ev_rx.recv() => on_agent_event(&shared, ev),
            Some(req) = stop_rx.recv() => break Ok(req),
            Some((req, reply)) = changes_rx.recv() => {
                let _ = reply.send(change(spec, &mut vm, &shared, &mut running, req).await);
            }
            Some(()) = recv_signal(&mut term) => break Ok((default_stop, false)),
            Some(()) = recv_signal(&mut int) => break Ok((default_stop, false)),
        }
    };
    let (reason, stopped) = match request {
        Err(status) => {
            let reason = match status.map(|s| s.code()) {
                Some(Some(0)) => EndReason::Poweroff,
                _ => EndReason::Failed,
            };
            (reason, vm.shutdown(Duration::ZERO).await)
        }
        Ok((timeout, force)) => {
            lock(&shared.status).state = MonitorState::Stopping;
            eprintln!("skiff-run monitor {}: stopping (timeout {timeout} s, force {force})", spec.name);
            let stopped = match spec.os {
                Some(_) => super::os::stop(vm, timeout, force).await,
                None => stop(&shared, vm, timeout, force).await,
            };
            (if force { EndReason::Killed } else { EndReason::Stopped }, stopped)
        }
    };
    reader.abort();
    while let Ok(ev) = ev_rx.try_recv() {
        on_agent_event(&shared, ev);
    }
    let info = exit_info(spec, &shared, reason, stopped);
    write_exit_file(&spec.exit_file, &info);
    *lock(&shared.end) = Some(info.clone());
    let _ = shared.events.send(MonitorEvent::Stopped(info.clone()));
    acceptor.abort();
    lock(&shared.farewell).take();
    let _ = tokio::time::timeout(FAREWELL, farewell_rx.recv()).await;
    info
}

/// Forwards the agent's events (taken out of the VM) to `tx` from a task.
fn read_agent_events(vm: &mut ThinVm, tx: mpsc::Sender<Event>) -> tokio::task::JoinHandle<()> {
    let mut agent_events = vm.take_events();
    tokio::spawn(async move {
        while let Some(ev) = match agent_events.as_mut() {
            Some(a) => a.next().await,
            None => None,
        } {
            if tx.send(ev).await.is_err() {
                break;
            }
        }
    })
}

async fn recv_signal(s: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

fn on_agent_event(shared: &Shared, ev: Event) {
    let Event::MainExited { status, restarting } = ev else { return };
    let restarts = {
        let mut st = lock(&shared.status);
        st.main_pid = None;
        st.last_main_exit = Some(status);
        if restarting {
            // Counted from the guest's events: never trusted not to wrap.
            st.restarts = st.restarts.saturating_add(1);
        }
        st.restarts
    };
    let _ = shared.events.send(MonitorEvent::MainExited { status, restarting, restarts });
}

/// A clean stop (the main process with its timeout, then power off), or a
/// forced one (SIGKILL to skiff-vmm). Bounded either way.
async fn stop(shared: &Shared, mut vm: ThinVm, timeout: u64, force: bool) -> Result<Stopped, crate::VmError> {
    if force {
        vm.kill_vmm();
        let _ = tokio::time::timeout(Duration::from_secs(5), vm.vmm_exited()).await;
        return vm.shutdown(Duration::ZERO).await;
    }
    let grace = Duration::from_secs(timeout);
    let agent = vm.agent();
    tokio::select! {
        r = tokio::time::timeout(grace + STOP_SLACK, agent.stop_main(grace)) => {
            if let Ok(Ok(status)) = r {
                lock(&shared.status).last_main_exit = Some(status);
            }
        }
        _ = vm.vmm_exited() => {}
    }
    vm.shutdown(POWEROFF_GRACE).await
}

fn exit_info(
    spec: &LaunchSpec,
    shared: &Shared,
    reason: EndReason,
    stopped: Result<Stopped, crate::VmError>,
) -> ExitInfo {
    use std::os::unix::process::ExitStatusExt;
    let st = lock(&shared.status).clone();
    let (code, signal, diagnostics) = match stopped {
        Ok(s) => (s.status.code(), s.status.signal(), s.diagnostics),
        Err(e) => (None, None, format!("stopping the VM: {}", error_chain(&e))),
    };
    let reason = match (reason, code) {
        // A full OS VM that resets while it is being stopped has stopped.
        (EndReason::Stopped, Some(c)) if c != 0 && !(spec.os.is_some() && c == vm::RESET_EXIT_CODE) => {
            EndReason::Failed
        }
        (r, _) => r,
    };
    ExitInfo {
        name: spec.name.clone(),
        reason,
        vmm_exit_code: code,
        vmm_signal: signal,
        last_main_exit: st.last_main_exit,
        restarts: st.restarts,
        started_at: st.started_at,
        ended_at: now_secs(),
        diagnostics,
    }
}

/// Writes the exit file atomically (a temporary file renamed over it).
pub fn write_exit_file(path: &Path, info: &ExitInfo) {
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let data = serde_json::to_vec_pretty(info).unwrap_or_default();
    if let Err(e) = std::fs::write(&tmp, data).and_then(|_| std::fs::rename(&tmp, path)) {
        eprintln!("skiff-run monitor {}: writing {}: {e}", info.name, path.display());
    }
}

/// Serves connections, at most `limits.max_connections` at once (more are
/// answered with an error and closed).
async fn accept_loop(listener: UnixListener, shared: Arc<Shared>, limits: ServeLimits) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    while let Ok((s, _)) = listener.accept().await {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            let busy = serde_json::to_string(&ControlReply::Error { message: "busy".into() }).unwrap_or_default();
            // Best effort, never waiting: the socket buffer takes it.
            let _ = s.try_write(format!("{busy}\n").as_bytes());
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            serve_conn(s, shared, limits).await;
            drop(slot);
        });
    }
}

/// Parses a control request line.
pub fn parse_request(line: &str) -> Result<ControlRequest, String> {
    serde_json::from_str::<ControlRequest>(line.trim()).map_err(|e| format!("bad request: {e}"))
}

async fn write_line<T: serde::Serialize>(w: &mut tokio::net::unix::OwnedWriteHalf, v: &T) -> std::io::Result<()> {
    let line = serde_json::to_string(v).map_err(std::io::Error::other)? + "\n";
    w.write_all(line.as_bytes()).await
}

async fn serve_conn(stream: UnixStream, shared: Arc<Shared>, limits: ServeLimits) {
    let (r, mut w) = stream.into_split();
    let line = match read_request_line(r, limits.max_line, limits.read_timeout).await {
        Ok(Some(line)) => line,
        Ok(None) => return,
        Err(e) => {
            let _ = write_line(&mut w, &ControlReply::Error { message: e.to_string() }).await;
            return;
        }
    };
    let request = match parse_request(&line) {
        Ok(r) => r,
        Err(message) => {
            let _ = write_line(&mut w, &ControlReply::Error { message }).await;
            return;
        }
    };
    // Subscribe before looking at the end, so the end cannot slip between.
    let mut rx = shared.events.subscribe();
    let _farewell = lock(&shared.farewell).clone();
    let ended = lock(&shared.end).clone();
    match request {
        ControlRequest::Status => {
            let reply = match ended {
                Some(info) => ControlReply::Stopped(info),
                None => ControlReply::Status(lock(&shared.status).clone()),
            };
            let _ = write_line(&mut w, &reply).await;
        }
        ControlRequest::Stop { timeout_secs, force } => {
            if ended.is_none() {
                let _ = shared.stop.try_send((timeout_secs, force));
            }
            let info = match ended {
                Some(info) => Some(info),
                None => wait_end(&mut rx).await,
            };
            if let Some(info) = info {
                let _ = write_line(&mut w, &ControlReply::Stopped(info)).await;
            }
        }
        ControlRequest::Pause
        | ControlRequest::Resume
        | ControlRequest::Snapshot { .. }
        | ControlRequest::AddDevice { .. }
        | ControlRequest::RemoveDevice { .. }
        | ControlRequest::Resize { .. } => {
            let reply = match ended {
                Some(_) => ControlReply::Error { message: "the VM has ended".into() },
                None => {
                    let (tx, rx) = oneshot::channel();
                    match shared.changes.send((request, tx)).await {
                        Ok(()) => rx.await.unwrap_or(ControlReply::Error { message: "the VM ended meanwhile".into() }),
                        Err(_) => ControlReply::Error { message: "the VM is stopping".into() },
                    }
                }
            };
            let _ = write_line(&mut w, &reply).await;
        }
        ControlRequest::Events => {
            if write_line(&mut w, &ControlReply::Subscribed).await.is_err() {
                return;
            }
            if let Some(info) = ended {
                let _ = write_line(&mut w, &MonitorEvent::Stopped(info)).await;
                return;
            }
            loop {
                match rx.recv().await {
                    Ok(ev) => {
                        let last = matches!(ev, MonitorEvent::Stopped(_));
                        if write_line(&mut w, &ev).await.is_err() || last {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    }
}

async fn wait_end(rx: &mut broadcast::Receiver<MonitorEvent>) -> Option<ExitInfo> {
    loop {
        match rx.recv().await {
            Ok(MonitorEvent::Stopped(info)) => return Some(info),
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn shared() -> Arc<Shared> {
        let status = MonitorStatus {
            name: "t".into(),
            state: MonitorState::Running,
            monitor_pid: 1,
            vmm_pid: 2,
            main_pid: Some(3),
            restarts: 0,
            last_main_exit: None,
            started_at: 0,
        };
        Arc::new(Shared {
            status: Mutex::new(status),
            events: broadcast::channel(4).0,
            stop: mpsc::channel(1).0,
            changes: mpsc::channel(1).0,
            end: Mutex::new(None),
            farewell: Mutex::new(None),
        })
    }

    async fn answer(mut s: UnixStream) -> Option<String> {
        let mut out = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
        r.ok().map(|_| String::from_utf8_lossy(&out).into_owned())
    }

    #[tokio::test]
    async fn the_control_socket_caps_lines_connections_and_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONTROL_SOCKET);
        let limits = ServeLimits { max_line: 1024, max_connections: 3, read_timeout: Duration::from_millis(300) };
        let task = tokio::spawn(accept_loop(UnixListener::bind(&path).unwrap(), shared(), limits));

        let mut s = UnixStream::connect(&path).await.unwrap();
        s.write_all(b"{\"op\":\"status\"}\n").await.unwrap();
        assert!(answer(s).await.unwrap().contains("\"reply\":\"status\""));

        let mut s = UnixStream::connect(&path).await.unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(300), s.write_all(&vec![b' '; 1 << 20])).await;
        let a = answer(s).await.expect("closed after a line over the limit");
        assert!(a.contains("request line over 1024 bytes"), "{a}");

        let silent = UnixStream::connect(&path).await.unwrap();
        let a = answer(silent).await.expect("closed after the read timeout");
        assert!(a.contains("no request line"), "{a}");

        let mut idle = Vec::new();
        for _ in 0..limits.max_connections {
            idle.push(UnixStream::connect(&path).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let s = UnixStream::connect(&path).await.unwrap();
        let a = tokio::time::timeout(Duration::from_millis(200), answer(s)).await.ok().flatten();
        assert!(a.as_deref().is_some_and(|a| a.contains("busy")), "{a:?}");
        task.abort();
    }
}
