//! Detached VMs: a small monitor process per VM (like conmon or a
//! containerd shim) that outlives whoever started it.
//!
//! [`launch`] writes the [`LaunchSpec`] next to the runtime directory and
//! starts `skiff-run monitor --runtime-dir DIR --status-fd 3 SPEC` in a
//! session of its own (stdin `/dev/null`, stdout and stderr to
//! [`LaunchSpec::monitor_log`]). The monitor owns the [`crate::ThinVm`]
//! (virtiofsd and skiff-vmm die with it through `PR_SET_PDEATHSIG`), boots
//! it, sends the agent the network set-up, starts the main process through
//! the agent's `start_main`, binds its control socket and writes one
//! [`BootReport`] line on the status pipe. [`launch`] returns when that line
//! arrives; a failure (or no line within the boot timeout plus a margin for
//! building an initramfs) leaves no process and no runtime directory.
//!
//! ```text
//!   launch ──spawn (setsid)──► monitor ──► virtiofsd, skiff-vmm ──► agent ready
//!      ▲                          │  network set-up, start_main, bind monitor.sock
//!      └──── status pipe: {"result":"ready",...} | {"result":"failed","message":...}
//!   monitor loop: skiff-vmm exit │ agent events (main_exited) │ stop request │ SIGTERM
//!   end: stop virtiofsd, remove the runtime dir, write the exit file, tell subscribers, exit
//! ```
//!
//! A spec with [`LaunchSpec::os`] is a full OS VM (see `os.rs`): booted
//! through UEFI firmware from its disk, no virtiofsd or main process; a
//! stop presses the ACPI power button (SIGKILL after the timeout), and a
//! guest reset (skiff-vmm's status [`crate::vm::RESET_EXIT_CODE`]) boots
//! it again on the same disk and variable store instead of ending it.
//!
//! # Control protocol
//! `monitor.sock` in the runtime directory; each connection carries one
//! request line (JSON) and gets JSON lines back:
//!
//! - `{"op":"status"}` → `{"reply":"status","name":..,"state":"running"|"stopping",
//!   "monitor_pid":..,"vmm_pid":..,"main_pid":..|null,"restarts":N,"last_main_exit":{..}|null,"started_at":..}`
//! - `{"op":"stop","timeout_secs":10,"force":false}` → when the VM has ended:
//!   `{"reply":"stopped", ..ExitInfo}`. A clean stop asks the agent to stop the
//!   main process (stop signal, SIGKILL after `timeout_secs`), then powers the
//!   guest off (skiff-vmm gets SIGTERM, then SIGKILL, if it does not end);
//!   `force` SIGKILLs skiff-vmm at once. Then the monitor exits.
//! - `{"op":"events"}` → `{"reply":"subscribed"}`, then one line per event:
//!   `{"event":"main_exited","status":{..},"restarting":bool,"restarts":N}`, and
//!   last `{"event":"stopped", ..ExitInfo}`, after which the connection closes.
//! - anything else → `{"reply":"error","message":..}`.
//!
//! When skiff-vmm ends for any reason, the monitor notices at once, writes
//! the [`ExitInfo`] to [`LaunchSpec::exit_file`], stops virtiofsd, removes the
//! runtime directory and exits. SIGTERM to the monitor is a clean stop.
//!
//! After the caller restarts, [`attach`] finds the monitor again through the
//! runtime directory's `state.json` (its `runner_pid`), checking through
//! `/proc/PID/cmdline` that the process is this VM's monitor.

mod os;
mod proto;
mod serve;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use skiff_agent_client::{AgentClient, ClientError, Transport};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

pub use proto::{
    now_secs, BootReport, ControlReply, ControlRequest, DeviceSpec, EndReason, ExitInfo, LaunchSpec, Launched,
    MonitorEvent, MonitorState, MonitorStatus, SavedRun, SAVED_RUN,
};
/// How long a runtime change may take (a device removal waits up to 10 s
/// for the guest, a share's mount up to 15 s for its driver).
pub const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);

pub use serve::{parse_request, read_saved_run, run, vm_options, write_exit_file, SNAPSHOT_TIMEOUT};

use crate::runtime::{self, RuntimeError, VSOCK_SOCKET};
use crate::vm::{find_program, tail, VmError};

/// The monitor's control socket in the runtime directory.
pub const CONTROL_SOCKET: &str = "monitor.sock";
/// Longest path of a unix socket (sun_path less its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// The longest socket name in a runtime directory (`vsock.sock_1025`).
const LONGEST_SOCKET: &str = "vsock.sock_1025";
/// Time on top of the boot timeout for finding a kernel and building an initramfs.
const LAUNCH_MARGIN: Duration = Duration::from_secs(180);
/// Reply time for `status` and for subscribing.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Time on top of the stop timeout for the monitor to power off and clean up.
const STOP_MARGIN: Duration = Duration::from_secs(60);

/// Errors of launching, attaching to and controlling monitors.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// The runtime directory is not usable.
    #[error("runtime directory {0}: {1}")]
    BadRuntimeDir(PathBuf, &'static str),
    /// A file or process operation failed.
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
    /// Kernel search failed.
    #[error("finding a kernel")]
    Kernel(#[from] crate::kernel::KernelError),
    /// Initramfs build failed.
    #[error("building the initramfs")]
    Initramfs(#[from] crate::initramfs::BuildError),
    /// Booting the VM failed.
    #[error("booting the VM")]
    Vm(#[from] VmError),
    /// Runtime directory handling failed.
    #[error("runtime directory")]
    Runtime(#[from] RuntimeError),
    /// The agent refused the network set-up.
    #[error("configuring the guest's network")]
    Network(#[source] ClientError),
    /// A device of the spec could not be added.
    #[error("adding device {0}")]
    Device(String, #[source] Box<crate::vm::HotplugError>),
    /// The main process did not start.
    #[error("starting the main process {0:?}\n{2}")]
    MainStart(String, #[source] Box<ClientError>, String),
    /// A snapshot does not fit the VM to restore from it.
    #[error("cannot restore: {0}")]
    BadSnapshot(String),
    /// A VM runs in this runtime directory already.
    #[error("a monitor (pid {1}) already runs in {0}")]
    InUse(PathBuf, u32),
    /// What this kind of VM cannot do.
    #[error("{0}")]
    Unsupported(String),
    /// The monitor reported a failed boot.
    #[error("{0}")]
    BootFailed(String),
    /// The monitor ended without a report.
    /// The launcher died before the boot report: the boot is abandoned.
    #[error("the launcher (pid {0}) exited before the boot finished: the VM is abandoned")]
    LauncherGone(u32),
    #[error("the monitor exited without a boot report; its log:\n{0}")]
    MonitorDied(String),
    /// The monitor did not report within the time limit (it was killed).
    #[error("the monitor did not report within {0} s (killed); its log:\n{1}")]
    LaunchTimeout(u64, String),
    /// No monitor runs for this runtime directory.
    #[error("no monitor runs for {0}")]
    NotRunning(PathBuf),
    /// A malformed line or an unexpected answer.
    #[error("monitor protocol: {0}")]
    Protocol(String),
    /// The monitor answered with an error.
    #[error("the monitor refused: {0}")]
    Refused(String),
    /// The monitor did not answer in time.
    #[error("the monitor did not answer within {0} s")]
    Timeout(u64),
}

/// An error and its causes on one line, `: `-separated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The runtime root and the VM's directory name.
fn split_runtime_dir(dir: &Path) -> Result<(PathBuf, String), MonitorError> {
    let bad = |why| MonitorError::BadRuntimeDir(dir.into(), why);
    if !dir.is_absolute() {
        return Err(bad("not absolute"));
    }
    let name = dir.file_name().and_then(|n| n.to_str()).ok_or_else(|| bad("no last component"))?;
    runtime::check_name(name)?;
    if dir.as_os_str().len() + 1 + LONGEST_SOCKET.len() > MAX_SOCKET_PATH {
        return Err(bad("too long for unix sockets (108 bytes with vsock.sock_1025)"));
    }
    Ok((dir.parent().ok_or_else(|| bad("no parent"))?.to_path_buf(), name.to_string()))
}

fn spec_file(dir: &Path) -> PathBuf {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dir.with_file_name(format!(".{name}.spec.json"))
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> MonitorError {
    move |e| MonitorError::Io(what, e)
}

/// Starts a detached monitor for `spec` and waits until its VM's agent is
/// ready and the main process started, or for its error. On error nothing
/// is left: no process, no runtime directory.
pub async fn launch(spec: &LaunchSpec) -> Result<Launched, MonitorError> {
    let (root, _) = split_runtime_dir(&spec.runtime_dir)?;
    if let Ok(h) = attach(&spec.runtime_dir) {
        return Err(MonitorError::InUse(spec.runtime_dir.clone(), h.pid()));
    }
    let program = match &spec.monitor_program {
        Some(p) => p.clone(),
        None => find_program("skiff-run", "SKIFF_RUN", &[])?,
    };
    std::fs::create_dir_all(&root).map_err(io(format!("creating {}", root.display())))?;
    let spec_path = spec_file(&spec.runtime_dir);
    let data = serde_json::to_vec(spec).map_err(|e| MonitorError::Protocol(e.to_string()))?;
    write_private(&spec_path, &data)?;
    if let Some(parent) = spec.monitor_log.parent() {
        std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
    }
    let log =
        std::fs::File::create(&spec.monitor_log).map_err(io(format!("creating {}", spec.monitor_log.display())))?;
    let log2 = log.try_clone().map_err(io("log file".into()))?;
    let (read_end, write_end) = pipe()?;
    let mut cmd = std::process::Command::new(&program);
    cmd.arg("monitor")
        .arg("--runtime-dir")
        .arg(&spec.runtime_dir)
        .arg("--status-fd")
        .arg("3")
        .arg(&spec_path)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2);
    let wfd = write_end.as_raw_fd();
    // SAFETY: setsid, dup2 and fcntl are async-signal-safe; they only touch this child's session and fds.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if wfd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0);
            } else if libc::dup2(wfd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    drop(write_end);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&spec_path);
            return Err(MonitorError::Io(format!("starting {}", program.display()), e));
        }
    };
    let pid = child.id();
    // Reap the monitor whenever it ends while this process lives.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait());
    });
    let limit = Duration::from_secs(spec.boot_timeout_secs) + LAUNCH_MARGIN;
    let report = tokio::time::timeout(limit, read_report(read_end)).await;
    let fail = |e: MonitorError| async {
        let mut done_rx = done_rx;
        if done_rx.try_recv().is_err() {
            // SAFETY: the monitor is our child, not reaped yet (`done_rx` is empty), and leads its own
            // process group (setsid): the group is it and the skiff-vmm and virtiofsd it started.
            unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            let _ = tokio::time::timeout(Duration::from_secs(10), done_rx).await;
        }
        let _ = std::fs::remove_file(&spec_path);
        remove_leftovers(&spec.runtime_dir);
        Err(e)
    };
    match report {
        Ok(Ok(Some(BootReport::Ready(l)))) => Ok(l),
        Ok(Ok(Some(BootReport::Failed { message }))) => fail(MonitorError::BootFailed(message)).await,
        Ok(Ok(None)) => fail(MonitorError::MonitorDied(tail(&spec.monitor_log, 30))).await,
        Ok(Err(e)) => fail(e).await,
        Err(_) => fail(MonitorError::LaunchTimeout(limit.as_secs(), tail(&spec.monitor_log, 30))).await,
    }
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), MonitorError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(format!("writing {}", path.display())))?;
    std::io::Write::write_all(&mut f, data).map_err(io(format!("writing {}", path.display())))
}

fn pipe() -> Result<(OwnedFd, OwnedFd), MonitorError> {
    let mut fds = [0i32; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(MonitorError::Io("creating a pipe".into(), std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 succeeded: both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

async fn read_report(read_end: OwnedFd) -> Result<Option<BootReport>, MonitorError> {
    let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(read_end).map_err(io("status pipe".into()))?;
    let mut buf = Vec::new();
    rx.take(1 << 20).read_to_end(&mut buf).await.map_err(io("reading the status pipe".into()))?;
    let text = String::from_utf8_lossy(&buf);
    match text.lines().find(|l| !l.trim().is_empty()) {
        None => Ok(None),
        Some(line) => {
            serde_json::from_str(line).map(Some).map_err(|e| MonitorError::Protocol(format!("{line:?}: {e}")))
        }
    }
}

/// The command line of process `pid`, split at NULs.
fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
        })
        .unwrap_or_default()
}

/// Whether `pid` is the monitor of the VM in `dir` (not just any process
/// that got the pid after the monitor died).
pub fn is_monitor(pid: u32, dir: &Path) -> bool {
    if pid == 0 || !runtime::alive(pid) {
        return false;
    }
    let args = cmdline(pid);
    let want = dir.as_os_str().to_string_lossy();
    args.iter().any(|a| a == "monitor") && args.windows(2).any(|w| w[0] == "--runtime-dir" && w[1] == want)
}

/// Removes what a VM whose monitor is gone left in `dir` (processes whose
/// command line names a path in it, e.g. a skiff-vmm or virtiofsd that
/// outlived a SIGKILLed monitor, then the directory). Does nothing while
/// the monitor lives; whether anything was removed.
pub fn remove_leftovers(dir: &Path) -> bool {
    if let Ok(state) = runtime::read_state(dir) {
        if is_monitor(state.runner_pid, dir) {
            return false;
        }
    }
    let _ = std::fs::remove_file(spec_file(dir));
    if !dir.exists() {
        return false;
    }
    let prefix = format!("{}/", dir.display());
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for pid in rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
            if pid != std::process::id() && cmdline(pid).iter().any(|a| a.contains(&prefix)) {
                // SAFETY: plain kill of a process that belongs to the dead VM in `dir`.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    true
}

/// Finds the live monitor of the VM in `dir`.
pub fn attach(dir: &Path) -> Result<MonitorHandle, MonitorError> {
    let not = || MonitorError::NotRunning(dir.into());
    let state = runtime::read_state(dir).map_err(|_| not())?;
    if !is_monitor(state.runner_pid, dir) || !dir.join(CONTROL_SOCKET).exists() {
        return Err(not());
    }
    Ok(MonitorHandle { dir: dir.to_path_buf(), pid: state.runner_pid, vmm_pid: state.vmm_pid })
}

/// A handle on a running monitor.
#[derive(Debug, Clone)]
pub struct MonitorHandle {
    dir: PathBuf,
    pid: u32,
    vmm_pid: u32,
}

impl MonitorHandle {
    /// The monitor's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// skiff-vmm's pid.
    pub fn vmm_pid(&self) -> u32 {
        self.vmm_pid
    }

    /// The runtime directory.
    pub fn runtime_dir(&self) -> &Path {
        &self.dir
    }

    /// The hybrid vsock socket the agent is behind.
    pub fn vsock_socket(&self) -> PathBuf {
        self.dir.join(VSOCK_SOCKET)
    }

    /// A full OS VM's interactive serial console (see
    /// [`runtime::SERIAL_SOCKET`]); absent for thin VMs.
    pub fn serial_socket(&self) -> Option<PathBuf> {
        Some(self.dir.join(runtime::SERIAL_SOCKET)).filter(|p| p.exists())
    }

    /// A client of the VM's agent (exec, files, mounts).
    pub fn agent(&self) -> AgentClient {
        AgentClient::new(Transport::vsock(self.vsock_socket()))
    }

    /// Whether the monitor still runs.
    pub fn alive(&self) -> bool {
        is_monitor(self.pid, &self.dir)
    }

    async fn request(&self, req: &ControlRequest) -> Result<BufReader<UnixStream>, MonitorError> {
        let path = self.dir.join(CONTROL_SOCKET);
        let mut s = UnixStream::connect(&path).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                MonitorError::NotRunning(self.dir.clone())
            }
            _ => MonitorError::Io(format!("connecting to {}", path.display()), e),
        })?;
        let line = serde_json::to_string(req).map_err(|e| MonitorError::Protocol(e.to_string()))? + "\n";
        s.write_all(line.as_bytes()).await.map_err(io(format!("writing to {}", path.display())))?;
        Ok(BufReader::new(s))
    }

    /// A runtime change (pause, resume, add_device, remove_device,
    /// resize), made by the monitor; returns once done. Hot-plug waits for
    /// the guest, so this allows [`CHANGE_TIMEOUT`].
    pub async fn change(&self, req: ControlRequest) -> Result<(), MonitorError> {
        self.change_within(req, CHANGE_TIMEOUT).await
    }

    /// Saves the paused VM into `dir` (see [`ControlRequest::Snapshot`]);
    /// allows [`SNAPSHOT_TIMEOUT`] plus a margin.
    pub async fn snapshot(&self, dir: &Path) -> Result<(), MonitorError> {
        let req = ControlRequest::Snapshot { dir: dir.to_path_buf() };
        self.change_within(req, SNAPSHOT_TIMEOUT + REQUEST_TIMEOUT).await
    }

    async fn change_within(&self, req: ControlRequest, limit: Duration) -> Result<(), MonitorError> {
        let fut = async {
            let mut r = self.request(&req).await?;
            match read_line::<ControlReply>(&mut r).await? {
                Some(ControlReply::Done) => Ok(()),
                Some(ControlReply::Stopped(_)) | None => Err(MonitorError::NotRunning(self.dir.clone())),
                Some(ControlReply::Error { message }) => Err(MonitorError::Refused(message)),
                Some(other) => Err(MonitorError::Protocol(format!("unexpected {other:?}"))),
            }
        };
        tokio::time::timeout(limit, fut)
            .await
            .map_err(|_| MonitorError::Protocol(format!("no answer to {req:?} within {limit:?}")))?
    }

    /// The VM's state. A VM that ended meanwhile answers
    /// [`MonitorError::NotRunning`].
    pub async fn status(&self) -> Result<MonitorStatus, MonitorError> {
        let fut = async {
            let mut r = self.request(&ControlRequest::Status).await?;
            match read_line::<ControlReply>(&mut r).await? {
                Some(ControlReply::Status(s)) => Ok(s),
                Some(ControlReply::Stopped(_)) | None => Err(MonitorError::NotRunning(self.dir.clone())),
                Some(ControlReply::Error { message }) => Err(MonitorError::Refused(message)),
                Some(other) => Err(MonitorError::Protocol(format!("unexpected {other:?}"))),
            }
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut)
            .await
            .map_err(|_| MonitorError::Timeout(REQUEST_TIMEOUT.as_secs()))?
    }

    /// Stops the VM (see the protocol) and returns how it ended; bounded by
    /// `timeout` plus a margin. `None` if the monitor went away without
    /// saying (read the exit file then).
    pub async fn stop(&self, timeout: Duration, force: bool) -> Result<Option<ExitInfo>, MonitorError> {
        let limit = timeout + STOP_MARGIN;
        let fut = async {
            let req = ControlRequest::Stop { timeout_secs: timeout.as_secs(), force };
            let mut r = self.request(&req).await?;
            match read_line::<ControlReply>(&mut r).await? {
                Some(ControlReply::Stopped(info)) => Ok(Some(info)),
                None => Ok(None),
                Some(ControlReply::Error { message }) => Err(MonitorError::Refused(message)),
                Some(other) => Err(MonitorError::Protocol(format!("unexpected {other:?}"))),
            }
        };
        let r = tokio::time::timeout(limit, fut).await.map_err(|_| MonitorError::Timeout(limit.as_secs()))?;
        if r.is_err() && !self.alive() {
            return Ok(None);
        }
        r
    }

    /// Subscribes to the VM's events.
    pub async fn events(&self) -> Result<MonitorEvents, MonitorError> {
        let fut = async {
            let mut r = self.request(&ControlRequest::Events).await?;
            match read_line::<ControlReply>(&mut r).await? {
                Some(ControlReply::Subscribed) => Ok(MonitorEvents { reader: r }),
                None => Err(MonitorError::NotRunning(self.dir.clone())),
                Some(ControlReply::Error { message }) => Err(MonitorError::Refused(message)),
                Some(other) => Err(MonitorError::Protocol(format!("unexpected {other:?}"))),
            }
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut)
            .await
            .map_err(|_| MonitorError::Timeout(REQUEST_TIMEOUT.as_secs()))?
    }
}

async fn read_line<T: serde::de::DeserializeOwned>(r: &mut BufReader<UnixStream>) -> Result<Option<T>, MonitorError> {
    let mut line = String::new();
    match r.read_line(&mut line).await {
        Ok(0) => Ok(None),
        Ok(_) => {
            serde_json::from_str(line.trim()).map(Some).map_err(|e| MonitorError::Protocol(format!("{line:?}: {e}")))
        }
        Err(e) => Err(MonitorError::Io("reading from the monitor".into(), e)),
    }
}

/// A subscription to a monitor's events.
pub struct MonitorEvents {
    reader: BufReader<UnixStream>,
}

impl MonitorEvents {
    /// The next event; `None` when the monitor closed the connection (after
    /// [`MonitorEvent::Stopped`], or because it died).
    pub async fn next(&mut self) -> Result<Option<MonitorEvent>, MonitorError> {
        read_line(&mut self.reader).await
    }
}
