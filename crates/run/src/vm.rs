//! One thin VM: virtiofsd for each share, skiff-vmm with the vsock, the
//! shares and the initramfs, and the agent's ready event. Everything it
//! started is stopped and its runtime directory removed when it is shut
//! down, when booting fails, and when it is dropped.
//!
//! ```text
//!   boot: runtime dir → virtiofsd (rootfs, shares) → event socket →
//!         skiff-vmm → agent connects to port 1025, sends `ready`
//!   shutdown: power off through the agent → skiff-vmm exits (else
//!         SIGTERM, then SIGKILL) → virtiofsd stopped → dir removed
//! ```

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use skiff_agent_client::{AgentClient, ClientError, EventListener, EventStream, Timeouts, Transport};
use skiff_agent_proto::{Event, PowerAction};
use tokio::process::{Child, Command};

use crate::kernel::Kernel;

mod firmware;
mod hotplug;
mod restore;
use crate::runtime::{self, RuntimeError, VmState, CONSOLE_LOG, VSOCK_SOCKET};
pub use firmware::{OsBoot, OsVmOptions, RESET_EXIT_CODE};
pub use hotplug::{valid_device_name, HotplugError, VMM_API_SOCKET};
pub use restore::{check_snapshot_dir, RestoreOptions};

/// The guest's vsock context id (the hybrid vsock needs no unique one).
const GUEST_CID: u32 = 3;
/// How long virtiofsd gets to create its socket.
const VIRTIOFSD_START: Duration = Duration::from_secs(20);
/// Console lines shown when booting fails.
const CONSOLE_TAIL: usize = 25;
/// Console lines in [`ThinVm::diagnostics`].
const CONSOLE_DIAG_TAIL: usize = 60;
/// skiff-vmm log lines in [`ThinVm::diagnostics`].
const VMM_DIAG_TAIL: usize = 60;
/// How much of the end of a log [`tail`] reads.
pub const TAIL_BYTES: u64 = 64 * 1024;

/// Errors of running a thin VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The runtime directory.
    #[error("runtime directory")]
    Runtime(#[from] RuntimeError),
    /// A program could not be found.
    #[error("cannot find {0} (install it or set {1})")]
    NoProgram(&'static str, &'static str),
    /// A process could not be started.
    #[error("starting {0}")]
    Spawn(String, #[source] std::io::Error),
    /// virtiofsd did not create its socket.
    #[error("virtiofsd for {tag:?} ({dir}) did not start: {log}")]
    Virtiofsd {
        /// The share's tag.
        tag: String,
        /// Its directory.
        dir: String,
        /// virtiofsd's output.
        log: String,
    },
    /// skiff-vmm ended before the agent was ready.
    #[error("skiff-vmm exited ({status}) before the agent was ready\n{report}")]
    VmmExited {
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its stderr and the console's last lines.
        report: String,
    },
    /// The agent did not announce itself in time.
    #[error("timeout: the guest's agent did not answer within {secs} s\n{report}")]
    AgentTimeout {
        /// The limit.
        secs: u64,
        /// The VMM's stderr and the console's last lines.
        report: String,
    },
    /// Talking to the agent failed.
    #[error("agent")]
    Agent(#[from] ClientError),
    /// Waiting for a process failed.
    #[error("waiting for {0}")]
    Wait(&'static str, #[source] std::io::Error),
    /// A directory to restore from is not a usable snapshot.
    #[error("{0} is not a VM snapshot: {1}")]
    NotSnapshot(PathBuf, String),
}

/// A directory shared with the guest over virtio-fs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// The virtio-fs tag the guest mounts.
    pub tag: String,
    /// The host directory.
    pub dir: PathBuf,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// The VM's name (runtime directory, default hostname).
    pub name: String,
    /// The directory of every VM's runtime directory.
    pub runtime_root: PathBuf,
    /// The rootfs, shared as tag `rootfs`.
    pub rootfs: PathBuf,
    /// More shares, mounted later through the agent.
    pub shares: Vec<Share>,
    /// The kernel.
    pub kernel: Kernel,
    /// The initramfs (agent as /init).
    pub initramfs: PathBuf,
    /// vCPUs.
    pub cpus: u8,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Hostname (kernel command line `skiff.hostname=`).
    pub hostname: Option<String>,
    /// skiff-vmm.
    pub vmm: PathBuf,
    /// virtiofsd.
    pub virtiofsd: PathBuf,
    /// How long the agent may take to announce itself.
    pub boot_timeout: Duration,
    /// What the bundle was (for `list`).
    pub bundle: String,
}

/// A network device: a tap the caller created, and the guest's MAC address
/// (skiff-vmm `--net tap=NAME,mac=MAC`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// The host tap device.
    pub tap: String,
    /// The guest's MAC address (`52:54:00:..`).
    pub mac: String,
}

/// Boot settings beyond [`VmOptions`] (kept apart so that callers building
/// `VmOptions` literally keep compiling).
#[derive(Debug, Clone, Default)]
pub struct VmExtras {
    /// Where the guest console goes (truncated at boot); default
    /// `console.log` in the runtime directory.
    pub console_log: Option<PathBuf>,
    /// A network device.
    pub nic: Option<Nic>,
    /// Most vCPUs the VM may grow to at runtime (`None`: the boot count).
    pub max_cpus: Option<u8>,
    /// MiB the memory may grow by at runtime (0: none); a multiple of 128.
    pub memory_hotplug_mib: u64,
}

/// A program: `$ENV`, next to this executable, in PATH, or in `extra`.
pub fn find_program(name: &'static str, env: &'static str, extra: &[&str]) -> Result<PathBuf, VmError> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(p.into());
    }
    let beside = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join(name)));
    let path_dirs = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default();
    beside
        .into_iter()
        .chain(path_dirs.into_iter().map(|d| d.join(name)))
        .chain(extra.iter().map(PathBuf::from))
        .find(|p| p.is_file())
        .ok_or(VmError::NoProgram(name, env))
}

/// skiff-vmm (`$SKIFF_VMM`, next to skiff-run, or in PATH).
pub fn find_vmm() -> Result<PathBuf, VmError> {
    find_program("skiff-vmm", "SKIFF_VMM", &[])
}

/// virtiofsd (`$SKIFF_VIRTIOFSD`, PATH, cargo's bin, Debian's libexec).
pub fn find_virtiofsd() -> Result<PathBuf, VmError> {
    let cargo = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cargo/bin/virtiofsd").display().to_string())
        .unwrap_or_default();
    find_program("virtiofsd", "SKIFF_VIRTIOFSD", &[&cargo, "/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"])
}

/// How a VM ended.
#[derive(Debug, Clone)]
pub struct Stopped {
    /// skiff-vmm's exit status.
    pub status: std::process::ExitStatus,
    /// Whether the guest powered off (rather than skiff-vmm being stopped).
    pub powered_off: bool,
    /// skiff-vmm's log and the console's last lines, read before the
    /// runtime directory was removed (see [`ThinVm::diagnostics`]).
    pub diagnostics: String,
}

/// A running thin VM.
pub struct ThinVm {
    name: String,
    dir: PathBuf,
    console: PathBuf,
    listener: Option<EventListener>,
    vmm: Option<Child>,
    virtiofsd: Vec<Child>,
    events: Option<EventStream>,
    agent: AgentClient,
    state: Option<VmState>,
    /// Devices added at runtime ([`hotplug`]).
    hot: Vec<hotplug::HotDevice>,
    /// The serial console is served on [`runtime::SERIAL_SOCKET`] too
    /// (full OS VMs: their console is a getty on it).
    serial_socket: bool,
}

/// Kills a child at once, without waiting (tokio reaps it).
fn kill_now(child: &mut Child) {
    let _ = child.start_kill();
}

/// Sends `sig` to a child that has not been reaped.
fn signal(child: &Child, sig: i32) {
    if let Some(pid) = child.id() {
        // SAFETY: plain syscall on our own unreaped child.
        unsafe { libc::kill(pid as i32, sig) };
    }
}

fn before_exec(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; it only sets the child's parent
    // death signal, so children do not outlive a killed skiff-run.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

/// The last `lines` lines of a log (empty if it cannot be read), from its
/// last [`TAIL_BYTES`] only: a guest fills its console as it likes. Not
/// UTF-8 is shown lossily, and control characters other than tabs (a
/// guest's terminal escapes) are replaced.
pub fn tail(path: &Path, lines: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(TAIL_BYTES);
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.take(TAIL_BYTES).read_to_end(&mut buf).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    // Reading from the middle of the file: its first line is cut.
    let text = if start > 0 { text.split_once('\n').map_or("", |(_, rest)| rest) } else { &text };
    let all: Vec<&str> = text.lines().collect();
    let shown: Vec<String> = all[all.len().saturating_sub(lines)..]
        .iter()
        .map(|l| l.chars().map(|c| if c.is_control() && c != '\t' { '\u{fffd}' } else { c }).collect())
        .collect();
    shown.join("\n")
}

impl ThinVm {
    /// Creates the runtime directory and the console file; points the agent
    /// client at the VM's vsock socket.
    fn prepare(&mut self, root: &Path, name: &str, console: Option<&Path>, truncate: bool) -> Result<(), VmError> {
        let dir = runtime::create(root, name)?;
        self.agent = AgentClient::new(Transport::vsock(dir.join(VSOCK_SOCKET)));
        self.dir = dir.clone();
        self.console = console.map(Path::to_path_buf).unwrap_or_else(|| dir.join(CONSOLE_LOG));
        let mut open = std::fs::OpenOptions::new();
        open.create(true).append(!truncate).write(true).truncate(truncate);
        open.open(&self.console).map_err(|e| RuntimeError::Io(format!("creating {}", self.console.display()), e))?;
        Ok(())
    }

    /// Starts a virtiofsd for the rootfs and each share; the `--fs`
    /// arguments for skiff-vmm (ids `fs0`, `fs1`, ... as skiff-vmm gives
    /// them at boot when `with_ids`).
    async fn start_shares(
        &mut self,
        virtiofsd: &Path,
        rootfs: &Path,
        more: &[Share],
        with_ids: bool,
    ) -> Result<Vec<String>, VmError> {
        let mut shares = vec![Share { tag: "rootfs".into(), dir: rootfs.to_path_buf() }];
        shares.extend(more.iter().cloned());
        let mut fs_args = Vec::new();
        for (i, share) in shares.iter().enumerate() {
            let socket = self.dir.join(format!("fs{i}.sock"));
            let log = self.dir.join(format!("virtiofsd{i}.log"));
            self.start_virtiofsd(virtiofsd, share, &socket, &log).await?;
            let id = if with_ids { format!(",id=fs{i}") } else { String::new() };
            fs_args.push("--fs".to_string());
            fs_args.push(format!("tag={},socket={}{id}", share.tag, socket.display()));
        }
        Ok(fs_args)
    }

    /// skiff-vmm's `--serial`: the console log, and the console socket if
    /// this VM has one.
    fn serial_arg(&self) -> String {
        let mut arg = format!("file={}", self.console.display());
        if self.serial_socket {
            arg.push_str(&format!(",socket={}", self.dir.join(runtime::SERIAL_SOCKET).display()));
        }
        arg
    }

    /// Starts skiff-vmm with `args` and what every VM has (the control
    /// API, the console, the vsock, the NIC), and records the runtime
    /// directory's `state.json`.
    fn spawn_vmm(&mut self, vmm: &Path, args: &[String], nic: Option<&Nic>, state: VmState) -> Result<(), VmError> {
        let stderr_log = self.dir.join("vmm.log");
        let stderr = std::fs::File::create(&stderr_log)
            .map_err(|e| RuntimeError::Io(format!("creating {}", stderr_log.display()), e))?;
        let mut cmd = Command::new(vmm);
        cmd.args(args)
            .arg("--api-socket")
            .arg(self.dir.join(VMM_API_SOCKET))
            .arg("--serial")
            .arg(self.serial_arg())
            .arg("--vsock")
            .arg(format!("cid={GUEST_CID},socket={}", self.dir.join(VSOCK_SOCKET).display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true);
        if let Some(nic) = nic {
            cmd.arg("--net").arg(format!("tap={},mac={}", nic.tap, nic.mac));
        }
        before_exec(&mut cmd);
        let child = cmd.spawn().map_err(|e| VmError::Spawn(vmm.display().to_string(), e))?;
        let state = VmState { vmm_pid: child.id().unwrap_or(0), ..state };
        self.vmm = Some(child);
        runtime::write_state(&self.dir, &state)?;
        self.state = Some(state);
        Ok(())
    }

    /// Boots the VM and waits for its agent's ready event.
    async fn boot_inner(&mut self, opts: &VmOptions, extras: &VmExtras) -> Result<(), VmError> {
        // skiff-vmm appends: start every boot with an empty console.
        self.prepare(&opts.runtime_root, &opts.name, extras.console_log.as_deref(), true)?;
        let fs_args = self.start_shares(&opts.virtiofsd, &opts.rootfs, &opts.shares, false).await?;
        let events = EventListener::bind_for_vsock(&self.dir.join(VSOCK_SOCKET))?;
        let mut cmdline = "console=ttyS0 reboot=k panic=-1 quiet".to_string();
        if extras.memory_hotplug_mib > 0 {
            // Hot-plugged memory comes online movable, so it can be taken back.
            cmdline.push_str(" memhp_default_state=online_movable");
        }
        let cpus = match extras.max_cpus.filter(|m| *m > opts.cpus) {
            Some(max) => format!("boot={},max={max}", opts.cpus),
            None => opts.cpus.to_string(),
        };
        let memory = match extras.memory_hotplug_mib {
            0 => opts.memory_mib.to_string(),
            h => format!("size={},hotplug={h}", opts.memory_mib),
        };
        if let Some(h) = &opts.hostname {
            cmdline.push_str(&format!(" skiff.hostname={h}"));
        }
        let mut args: Vec<String> = vec![
            "--kernel".into(),
            opts.kernel.path.display().to_string(),
            "--initramfs".into(),
            opts.initramfs.display().to_string(),
            "--cmdline".into(),
            cmdline,
            "--cpus".into(),
            cpus,
            "--memory".into(),
            memory,
            "--rng".into(),
        ];
        args.extend(fs_args);
        let state = VmState::starting(
            &opts.name,
            &opts.bundle,
            opts.kernel.path.display().to_string(),
            opts.cpus,
            opts.memory_mib,
        );
        self.spawn_vmm(&opts.vmm, &args, extras.nic.as_ref(), state)?;
        self.wait_ready(events, opts.boot_timeout).await
    }

    /// Boots the VM and waits for its agent's ready event; on failure everything started is
    /// stopped and reaped before the error returns.
    pub async fn boot(opts: &VmOptions) -> Result<ThinVm, VmError> {
        Self::boot_with(opts, &VmExtras::default()).await
    }

    /// [`ThinVm::boot`] with a console path and a network device.
    pub async fn boot_with(opts: &VmOptions, extras: &VmExtras) -> Result<ThinVm, VmError> {
        let mut vm = ThinVm::unstarted(&opts.name);
        match vm.boot_inner(opts, extras).await {
            Ok(()) => Ok(vm),
            Err(e) => {
                vm.abort().await;
                Err(e)
            }
        }
    }

    /// A VM with nothing started yet.
    fn unstarted(name: &str) -> ThinVm {
        ThinVm {
            name: name.to_string(),
            dir: PathBuf::new(),
            console: PathBuf::new(),
            listener: None,
            vmm: None,
            virtiofsd: Vec::new(),
            hot: Vec::new(),
            events: None,
            agent: AgentClient::new(Transport::Unix(PathBuf::new())),
            state: None,
            serial_socket: false,
        }
    }

    /// Kills and reaps everything, removes the directory.
    async fn abort(&mut self) {
        if let Some(v) = self.vmm.as_mut() {
            kill_now(v);
            let _ = v.wait().await;
        }
        for c in &mut self.virtiofsd {
            kill_now(c);
            let _ = c.wait().await;
        }
        self.virtiofsd.clear();
        self.remove_dir();
    }

    async fn start_virtiofsd(&mut self, bin: &Path, share: &Share, socket: &Path, log: &Path) -> Result<(), VmError> {
        let err = std::fs::File::create(log).map_err(|e| RuntimeError::Io(format!("creating {}", log.display()), e))?;
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--socket-path={}", socket.display()))
            .arg(format!("--shared-dir={}", share.dir.display()))
            .arg("--cache=auto")
            // A restore where a file the guest had open is gone gives the
            // guest errors for that file rather than failing outright.
            .arg("--migration-on-error=guest-error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .kill_on_drop(true);
        // virtiofsd's default sandbox (namespaces) also works unprivileged
        // where user namespaces are allowed; where they are not it fails
        // with its log shown, rather than serving the guest unsandboxed.
        before_exec(&mut cmd);
        let child = cmd.spawn().map_err(|e| VmError::Spawn(bin.display().to_string(), e))?;
        self.virtiofsd.push(child);
        let failed = |log: &Path| VmError::Virtiofsd {
            tag: share.tag.clone(),
            dir: share.dir.display().to_string(),
            log: tail(log, 10),
        };
        let deadline = Instant::now() + VIRTIOFSD_START;
        while !socket.exists() {
            let child = self.virtiofsd.last_mut().expect("pushed above");
            if child.try_wait().map_err(|e| VmError::Wait("virtiofsd", e))?.is_some() || Instant::now() > deadline {
                return Err(failed(log));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// skiff-vmm's log and the console, their last lines.
    fn logs(&self, vmm_lines: usize, console_lines: usize) -> String {
        format!(
            "--- skiff-vmm log ---\n{}\n--- guest console (last {console_lines} lines) ---\n{}",
            tail(&self.dir.join("vmm.log"), vmm_lines),
            tail(&self.console, console_lines)
        )
    }

    /// The short form for boot errors.
    fn report(&self) -> String {
        self.logs(10, CONSOLE_TAIL)
    }

    /// skiff-vmm's log (its last 60 lines: a failure report with registers
    /// fits) and the guest console's last lines, for a caller to show when
    /// something went wrong. [`ThinVm::shutdown`] reads it once more into
    /// [`Stopped::diagnostics`] before it removes the runtime directory.
    pub fn diagnostics(&self) -> String {
        self.logs(VMM_DIAG_TAIL, CONSOLE_DIAG_TAIL)
    }

    /// Waits up to `limit` in all for the agent's connection and its ready
    /// event, or for skiff-vmm to exit.
    async fn wait_ready(&mut self, events: EventListener, limit: Duration) -> Result<(), VmError> {
        let deadline = tokio::time::Instant::now() + limit;
        let vmm = self.vmm.as_mut().expect("started");
        let accepted = tokio::select! {
            r = events.accept(limit) => Some(r),
            st = vmm.wait() => {
                let status = st.map_err(|e| VmError::Wait("skiff-vmm", e))?;
                return Err(VmError::VmmExited { status, report: self.report() });
            }
        };
        let timeout = |vm: &ThinVm| VmError::AgentTimeout { secs: limit.as_secs(), report: vm.report() };
        let mut stream = match accepted {
            Some(Ok(s)) => s,
            Some(Err(ClientError::Timeout(_))) | None => return Err(timeout(self)),
            Some(Err(e)) => return Err(e.into()),
        };
        match until_ready(&mut stream, deadline.saturating_duration_since(tokio::time::Instant::now())).await {
            Ok(()) => {}
            Err(ClientError::Timeout(_)) => return Err(timeout(self)),
            Err(e) => return Err(e.into()),
        }
        self.events = Some(stream);
        self.listener = Some(events);
        Ok(())
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its runtime directory.
    pub fn runtime_dir(&self) -> &Path {
        &self.dir
    }

    /// A client of its agent.
    pub fn agent(&self) -> AgentClient {
        self.agent.clone()
    }

    /// The same client with other timeouts.
    pub fn agent_with(&self, timeouts: Timeouts) -> AgentClient {
        self.agent.clone().with_timeouts(timeouts)
    }

    /// skiff-vmm's pid.
    pub fn vmm_pid(&self) -> Option<u32> {
        self.vmm.as_ref().and_then(Child::id)
    }

    /// The pids of the virtiofsd processes still running.
    pub fn virtiofsd_pids(&self) -> Vec<u32> {
        self.virtiofsd.iter().filter_map(Child::id).collect()
    }

    /// The agent's next event (`None`: the guest closed the connection).
    pub async fn next_event(&mut self, limit: Duration) -> Result<Option<Event>, VmError> {
        match self.events.as_mut() {
            Some(ev) => Ok(ev.next(limit).await?),
            None => Ok(None),
        }
    }

    /// Where the guest console is written.
    pub fn console_log(&self) -> &Path {
        &self.console
    }

    /// Takes the agent's event connection (and the listener its
    /// reconnections arrive on) out, e.g. to read it in a task of its own;
    /// [`ThinVm::next_event`] returns `None` afterwards.
    pub fn take_events(&mut self) -> Option<AgentEvents> {
        if self.events.is_none() && self.listener.is_none() {
            return None;
        }
        Some(AgentEvents { stream: self.events.take(), listener: self.listener.take() })
    }

    /// Waits (without a limit) for skiff-vmm to exit; cancel-safe.
    pub async fn vmm_exited(&mut self) -> Result<std::process::ExitStatus, VmError> {
        match self.vmm.as_mut() {
            Some(vmm) => vmm.wait().await.map_err(|e| VmError::Wait("skiff-vmm", e)),
            None => std::future::pending().await,
        }
    }

    /// Sends SIGKILL to skiff-vmm (reap it with [`ThinVm::vmm_exited`] or
    /// [`ThinVm::shutdown`]).
    pub fn kill_vmm(&mut self) {
        if let Some(v) = self.vmm.as_mut() {
            kill_now(v);
        }
    }

    /// Waits up to `limit` for skiff-vmm to exit by itself (the guest
    /// powered off); `None` if it still runs.
    pub async fn wait_vmm(&mut self, limit: Duration) -> Result<Option<std::process::ExitStatus>, VmError> {
        let Some(vmm) = self.vmm.as_mut() else {
            return Ok(None);
        };
        match tokio::time::timeout(limit, vmm.wait()).await {
            Ok(r) => r.map(Some).map_err(|e| VmError::Wait("skiff-vmm", e)),
            Err(_) => Ok(None),
        }
    }

    /// Powers the guest off through the agent (if it still runs) and waits
    /// up to `grace` for skiff-vmm to exit; then stops skiff-vmm (SIGTERM,
    /// then SIGKILL), stops virtiofsd and removes the runtime directory.
    pub async fn shutdown(mut self, grace: Duration) -> Result<Stopped, VmError> {
        let mut status = self.wait_vmm(Duration::ZERO).await?;
        if status.is_none() {
            let quick = Timeouts { connect: Duration::from_secs(5), request: Duration::from_secs(5), exec: None };
            // The guest may already be going down: an error here is fine.
            let _ = self.agent.clone().with_timeouts(quick).power(PowerAction::Poweroff).await;
            status = self.wait_vmm(grace).await?;
        }
        let powered_off = status.is_some();
        if status.is_none() {
            if let Some(v) = &self.vmm {
                signal(v, libc::SIGTERM);
            }
            status = self.wait_vmm(Duration::from_secs(5)).await?;
        }
        let status = match status {
            Some(s) => s,
            None => {
                let vmm = self.vmm.as_mut().expect("still running");
                kill_now(vmm);
                vmm.wait().await.map_err(|e| VmError::Wait("skiff-vmm", e))?
            }
        };
        self.stop_hot_devices();
        self.stop_virtiofsd().await;
        let diagnostics = self.diagnostics();
        self.remove_dir();
        Ok(Stopped { status, powered_off, diagnostics })
    }

    async fn stop_virtiofsd(&mut self) {
        for child in &mut self.virtiofsd {
            // It exits when the VMM disconnects; give it a moment first.
            if tokio::time::timeout(Duration::from_secs(2), child.wait()).await.is_err() {
                signal(child, libc::SIGTERM);
                if tokio::time::timeout(Duration::from_secs(2), child.wait()).await.is_err() {
                    kill_now(child);
                    let _ = child.wait().await;
                }
            }
        }
        self.virtiofsd.clear();
    }

    fn remove_dir(&mut self) {
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
            self.dir = PathBuf::new();
        }
    }
}

/// Reads the agent's events until `ready`, all of them within `limit` (a
/// guest that sends other events does not stretch it).
async fn until_ready(stream: &mut EventStream, limit: Duration) -> Result<(), ClientError> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match stream.next(left).await? {
            Some(Event::Ready(_)) => return Ok(()),
            Some(_) => continue,
            None => return Err(ClientError::Closed),
        }
    }
}

/// The agent's events, taken out of a [`ThinVm`]. The agent reconnects when
/// its event connection broke, so a closed connection is followed by
/// accepting the next one.
pub struct AgentEvents {
    stream: Option<EventStream>,
    listener: Option<EventListener>,
}

impl AgentEvents {
    /// The next event; waits as long as it takes. `None` once the
    /// connection closed and no listener is left to take a new one.
    pub async fn next(&mut self) -> Option<Event> {
        const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);
        loop {
            if let Some(stream) = self.stream.as_mut() {
                match stream.next(FOREVER).await {
                    Ok(Some(ev)) => return Some(ev),
                    Ok(None) | Err(_) => self.stream = None,
                }
            }
            let listener = self.listener.as_ref()?;
            match listener.accept(FOREVER).await {
                Ok(s) => self.stream = Some(s),
                Err(_) => self.listener = None,
            }
        }
    }
}

impl Drop for ThinVm {
    fn drop(&mut self) {
        if let Some(v) = self.vmm.as_mut() {
            kill_now(v);
        }
        for c in &mut self.virtiofsd {
            kill_now(c);
        }
        self.remove_dir();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test]
    async fn events_other_than_ready_do_not_stretch_the_boot_timeout() {
        use skiff_agent_proto::frame::encode_control;
        use skiff_agent_proto::{AgentMessage, ExitStatus};
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.sock");
        let listener = EventListener::bind(&path).unwrap();
        let mut guest = tokio::net::UnixStream::connect(&path).await.unwrap();
        let mut stream = listener.accept(Duration::from_secs(1)).await.unwrap();
        let event = Event::MainExited { status: ExitStatus::Exited { code: 0 }, restarting: true };
        let frame = encode_control(&AgentMessage::Event { event }).unwrap();
        let chatter = tokio::spawn(async move {
            while guest.write_all(&frame).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let started = Instant::now();
        let r =
            tokio::time::timeout(Duration::from_secs(3), until_ready(&mut stream, Duration::from_millis(300))).await;
        assert!(matches!(r, Ok(Err(ClientError::Timeout(_)))), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        chatter.abort();
    }

    #[test]
    fn tail_reads_only_the_end_of_a_big_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut f = std::fs::File::create(&path).unwrap();
        // 32 MiB of bytes that are not text, then the lines that matter.
        let junk = vec![0xffu8; 1 << 20];
        for _ in 0..32 {
            f.write_all(&junk).unwrap();
        }
        for i in 1..=30 {
            writeln!(f, "line {i}").unwrap();
        }
        drop(f);
        assert_eq!(tail(&path, 3), "line 28\nline 29\nline 30");
        // A guest's terminal escapes do not reach the terminal.
        std::fs::write(&path, b"ok\n\x1b]52;c;cHduZWQ=\x07evil\r\n").unwrap();
        let t = tail(&path, 2);
        assert!(!t.chars().any(|c| c.is_control() && c != '\n'), "{t:?}");
        assert!(t.starts_with("ok\n"), "{t:?}");
        assert_eq!(tail(&dir.path().join("missing"), 5), "");
    }
}
