//! `skiff-run`: runs an OCI runtime bundle in a thin VM, like `runc run`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use skiff_agent_proto::{ExecRequest, ExitStatus, User};
use skiff_run::attach::{self, RawMode};
use skiff_run::kernel::KernelSearch;
use skiff_run::monitor::{self, EndReason, LaunchSpec};
use skiff_run::{control, initramfs, runtime, vm, Bundle, Share, ThinVm, VmOptions};

/// Runs the process of an OCI runtime bundle (BUNDLE/config.json) in a thin
/// VM whose root is BUNDLE/rootfs over virtio-fs, with its stdio attached
/// (a TTY when attached to one), and exits with its exit code (128+N when
/// signal N killed it). While it runs, `exec` runs more commands in it,
/// `list` shows the running VMs and `kill` signals a VM's main process.
///
/// The kernel is --kernel, else the project's (/var/lib/skiff/kernels/
/// current/vmlinux), else Debian's cloud kernel from /boot; the initramfs
/// (the static skiff-agent as /init, plus the virtio modules for a
/// distribution kernel) is built once and cached.
#[derive(Debug, Parser)]
#[command(name = "skiff-run", version, subcommand_precedence_over_arg = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
    /// Directory of the per-VM runtime directories (default: $SKIFF_RUN_ROOT,
    /// /run/skiff-run as root, else $XDG_RUNTIME_DIR/skiff-run).
    #[arg(long, global = true, value_name = "DIR")]
    root: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Guest kernel (vmlinux or bzImage).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initramfs to boot instead of the built one.
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,
    /// The static skiff-agent for the initramfs (default: $SKIFF_AGENT, next
    /// to skiff-run, or target/guest/...).
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// vCPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    cpus: u8,
    /// Memory in MiB.
    #[arg(long, default_value_t = 512, value_name = "MIB")]
    memory: u64,
    /// The VM's name (default: vm-XXXXXXXX).
    #[arg(long)]
    name: Option<String>,
    /// Another directory shared over virtio-fs as TAG (the guest mounts it
    /// later, e.g. through the agent); repeatable.
    #[arg(long = "share", value_name = "TAG=DIR")]
    shares: Vec<String>,
    /// Seconds the guest's agent may take to come up.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    boot_timeout: u64,
    /// Never give the process a TTY, even when attached to a terminal.
    #[arg(long)]
    no_tty: bool,
    /// Run detached: a monitor process keeps the VM; the main process's
    /// output goes to the console log. Prints the VM's name once its main
    /// process runs; `stop` ends it.
    #[arg(short = 'd', long)]
    detach: bool,
    /// Start the VM from snapshot DIR (made by `skiff-run snapshot`)
    /// instead of booting it: its processes go on where they were. Runs
    /// detached, as -d. The rootfs is BUNDLE's if given, else the
    /// snapshot's; the kernel, vCPUs and memory are the snapshot's.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initramfs", "shares"])]
    restore: Option<PathBuf>,
    /// The bundle directory (config.json and rootfs/).
    #[arg(value_name = "BUNDLE")]
    bundle: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Runs a command in a running VM, with stdio attached.
    Exec {
        /// The VM.
        name: String,
        /// Run on a TTY (of the host terminal's size, followed).
        #[arg(short = 't', long)]
        tty: bool,
        /// Environment variable; repeatable.
        #[arg(short = 'e', long = "env", value_name = "K=V")]
        env: Vec<String>,
        /// Working directory.
        #[arg(short = 'w', long, value_name = "DIR")]
        cwd: Option<String>,
        /// User as UID[:GID].
        #[arg(short = 'u', long, value_name = "UID[:GID]")]
        user: Option<String>,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Lists the running VMs.
    List,
    /// Stops a detached VM: its main process (stop signal, SIGKILL after
    /// --timeout), then the guest.
    Stop {
        /// The VM.
        name: String,
        /// Seconds between the stop signal and SIGKILL.
        #[arg(short = 't', long, default_value_t = 10, value_name = "SECS")]
        timeout: u64,
        /// Kill the VM at once.
        #[arg(short = 'f', long)]
        force: bool,
    },
    /// Runs the monitor of a detached VM (started by `-d` and by skiffd).
    #[command(hide = true)]
    Monitor {
        /// The VM's runtime directory (identifies the monitor in /proc).
        #[arg(long, value_name = "DIR")]
        runtime_dir: PathBuf,
        /// The pipe the boot report is written to.
        #[arg(long, value_name = "FD")]
        status_fd: Option<i32>,
        /// The launch spec (JSON; removed once read).
        spec: PathBuf,
    },
    /// Saves a detached VM to DIR (its memory, vCPUs and devices; skiff-vmm's
    /// `state` and `memory` files and run.json): the VM is paused, saved,
    /// and then resumed, or stopped with --stop. `skiff-run --restore DIR`
    /// starts it again, as often as wanted (one snapshot, many clones).
    Snapshot {
        /// The VM.
        name: String,
        /// The directory to save into (created if missing).
        dir: PathBuf,
        /// Stop the VM once saved instead of resuming it.
        #[arg(long)]
        stop: bool,
    },
    /// Sends a signal (default TERM) to a VM's main process; the VM powers
    /// off when it exits.
    Kill {
        /// The VM.
        name: String,
        /// Signal name or number.
        #[arg(default_value = "TERM")]
        signal: String,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Some(Cmd::Monitor { spec, status_fd, .. }) = &cli.command {
        // One thread: the children's PR_SET_PDEATHSIG follows the thread that
        // started them, which must live as long as the monitor.
        let code = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt.block_on(monitor::run(spec, *status_fd)),
            Err(e) => fail(anyhow::Error::new(e).context("starting the runtime")),
        };
        std::process::exit(code);
    }
    let root = cli.root.clone().unwrap_or_else(runtime::default_root);
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => fail(anyhow::Error::new(e).context("starting the runtime")),
    };
    let result = rt.block_on(async {
        match cli.command {
            None if cli.run.detach || cli.run.restore.is_some() => detach(cli.run, &root).await.map(|_| 0),
            None => run(cli.run, &root).await,
            Some(Cmd::Exec { name, tty, env, cwd, user, command }) => {
                exec(&root, &name, tty, env, cwd, user, command).await
            }
            Some(Cmd::List) => list(&root).map(|_| 0),
            Some(Cmd::Kill { name, signal }) => kill(&root, &name, &signal).await.map(|_| 0),
            Some(Cmd::Stop { name, timeout, force }) => stop(&root, &name, timeout, force).await,
            Some(Cmd::Snapshot { name, dir, stop }) => snapshot(&root, &name, &dir, stop).await.map(|_| 0),
            Some(Cmd::Monitor { .. }) => unreachable!("handled above"),
        }
    });
    // Exit at once: a blocked read of stdin must not hold the process.
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => fail(e),
    }
}

fn fail(e: anyhow::Error) -> ! {
    eprintln!("skiff-run: {e:#}");
    std::process::exit(125)
}

fn exit_code(status: ExitStatus) -> i32 {
    status.code()
}

fn parse_shares(specs: &[String]) -> Result<Vec<Share>> {
    specs
        .iter()
        .map(|s| {
            let Some((tag, dir)) = s.split_once('=') else { bail!("--share {s}: expected TAG=DIR") };
            if tag.is_empty() || tag == "rootfs" || tag.len() > 36 {
                bail!("--share {s}: bad tag (1-36 bytes, not 'rootfs')");
            }
            let dir = std::fs::canonicalize(dir).with_context(|| format!("--share {s}: no directory {dir}"))?;
            Ok(Share { tag: tag.into(), dir })
        })
        .collect()
}

fn valid_hostname(h: &str) -> bool {
    !h.is_empty() && h.len() <= 63 && h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

async fn run(args: RunArgs, root: &Path) -> Result<i32> {
    let bundle_dir = args.bundle.context("no bundle given (see skiff-run --help)")?;
    let bundle = Bundle::open(&bundle_dir)?;
    let name = args.name.clone().unwrap_or_else(runtime::random_name);
    runtime::check_name(&name)?;
    let shares = parse_shares(&args.shares)?;
    let cache = runtime::cache_dir();
    let kernel = KernelSearch::host(&cache.join("kernels")).find(args.kernel.as_deref())?;
    let initramfs = match args.initramfs {
        Some(p) => p,
        None => {
            let agent = initramfs::find_agent(args.agent.as_deref())?;
            initramfs::ensure(&agent, &kernel, Path::new("/"), &cache.join("initramfs"))?
        }
    };
    eprintln!("skiff-run: {name}: kernel {kernel}, initramfs {}", initramfs.display());
    let hostname = bundle.process.hostname.clone().filter(|h| valid_hostname(h)).unwrap_or_else(|| name.clone());
    let opts = VmOptions {
        name: name.clone(),
        runtime_root: root.to_path_buf(),
        rootfs: bundle.rootfs.clone(),
        shares,
        kernel,
        initramfs,
        cpus: args.cpus,
        memory_mib: args.memory,
        hostname: Some(hostname),
        vmm: vm::find_vmm()?,
        virtiofsd: vm::find_virtiofsd()?,
        boot_timeout: Duration::from_secs(args.boot_timeout),
        bundle: bundle.dir.display().to_string(),
    };
    let mut thin = ThinVm::boot(&opts).await.with_context(|| format!("booting {name}"))?;
    let tty = !args.no_tty && attach::isatty(0) && attach::isatty(1);
    let agent = thin.agent();
    let dir = thin.runtime_dir().to_path_buf();
    let mut tasks = Vec::new();
    let raw = if tty { RawMode::enter(0).ok() } else { None };
    let attached = attach::run_attached(&agent, bundle.exec_request(), tty, |ctl| {
        if let Ok(t) = control::serve(&dir, ctl.clone()) {
            tasks.push(t);
        }
        if !tty {
            tasks.push(attach::forward_signals(ctl));
        }
    })
    .await;
    drop(raw);
    for t in tasks {
        t.abort();
    }
    let status = match attached {
        Ok(s) => s,
        Err(e) => {
            let _ = thin.shutdown(Duration::from_secs(10)).await;
            return Err(anyhow::Error::new(e).context(format!("running the main process of {name}")));
        }
    };
    // Drain a main_exited event if one came (restart policies are the agent's).
    let _ = thin.next_event(Duration::ZERO).await;
    let stopped = thin.shutdown(Duration::from_secs(20)).await?;
    if !stopped.powered_off {
        eprintln!("skiff-run: {name}: the guest did not power off within 20 s; skiff-vmm was stopped");
    } else if !stopped.status.success() {
        eprintln!("skiff-run: {name}: skiff-vmm ended with {}", stopped.status);
    }
    Ok(exit_code(status))
}

/// Where a detached VM's console, exit file and monitor log go: outside its
/// runtime directory, which goes away with the VM.
fn log_dir(root: &Path, name: &str) -> PathBuf {
    root.join(".logs").join(name)
}

async fn detach(args: RunArgs, root: &Path) -> Result<()> {
    let restore = args.restore.as_deref().map(std::path::absolute).transpose()?;
    let saved = restore.as_deref().map(monitor::read_saved_run).transpose()?;
    let (rootfs, main, label) = match (&args.bundle, &saved) {
        (Some(dir), _) => {
            let bundle = Bundle::open(dir)?;
            (bundle.rootfs.clone(), bundle.process.clone(), bundle.dir.display().to_string())
        }
        (None, Some(s)) => (s.rootfs.clone(), s.main.clone(), s.rootfs.display().to_string()),
        (None, None) => bail!("no bundle given (see skiff-run --help)"),
    };
    let name = args.name.clone().unwrap_or_else(runtime::random_name);
    runtime::check_name(&name)?;
    let hostname = main.hostname.clone().filter(|h| valid_hostname(h)).unwrap_or_else(|| name.clone());
    let root = if root.is_absolute() { root.to_path_buf() } else { std::env::current_dir()?.join(root) };
    let logs = log_dir(&root, &name);
    let spec = LaunchSpec {
        name: name.clone(),
        runtime_dir: root.join(&name),
        rootfs,
        shares: parse_shares(&args.shares)?,
        kernel: args.kernel.map(std::path::absolute).transpose()?,
        initramfs: args.initramfs.map(std::path::absolute).transpose()?,
        agent: args.agent.map(std::path::absolute).transpose()?,
        vmm: None,
        virtiofsd: None,
        monitor_program: Some(std::env::current_exe().context("finding skiff-run itself")?),
        cpus: args.cpus,
        memory_mib: args.memory,
        max_cpus: None,
        memory_hotplug_mib: 0,
        devices: vec![],
        hostname: Some(hostname),
        boot_timeout_secs: args.boot_timeout,
        nic: None,
        network: None,
        main,
        console_log: logs.join("console.log"),
        exit_file: logs.join("exit.json"),
        monitor_log: logs.join("monitor.log"),
        label,
        restore,
        os: None,
    };
    let launched = monitor::launch(&spec).await.with_context(|| format!("starting {name}"))?;
    eprintln!(
        "skiff-run: {name}: running (monitor pid {}, {}); console {}",
        launched.monitor_pid,
        launched.kernel,
        spec.console_log.display()
    );
    println!("{name}");
    Ok(())
}

async fn snapshot(root: &Path, name: &str, dir: &Path, stop_after: bool) -> Result<()> {
    let (rdir, _) = runtime::find(root, name)?;
    let handle = monitor::attach(&rdir).with_context(|| format!("{name} is not a detached VM"))?;
    let dir = std::path::absolute(dir)?;
    handle.change(monitor::ControlRequest::Pause).await.with_context(|| format!("pausing {name}"))?;
    let saved = handle.snapshot(&dir).await.with_context(|| format!("saving {name} to {}", dir.display()));
    if saved.is_ok() && stop_after {
        handle.stop(Duration::ZERO, true).await.with_context(|| format!("stopping {name}"))?;
        return Ok(());
    }
    handle.change(monitor::ControlRequest::Resume).await.with_context(|| format!("resuming {name}"))?;
    saved
}

async fn stop(root: &Path, name: &str, timeout: u64, force: bool) -> Result<i32> {
    let (dir, _) = runtime::find(root, name)?;
    let handle = monitor::attach(&dir).with_context(|| format!("{name} is not a detached VM (stop it with kill)"))?;
    let info = handle.stop(Duration::from_secs(timeout), force).await.with_context(|| format!("stopping {name}"))?;
    let exit_file = log_dir(root, name).join("exit.json");
    let info = match info {
        Some(i) => i,
        None => serde_json::from_slice(
            &std::fs::read(&exit_file).with_context(|| format!("reading {}", exit_file.display()))?,
        )?,
    };
    if info.reason == EndReason::Failed {
        eprintln!("skiff-run: {name}: skiff-vmm failed\n{}", info.diagnostics);
    }
    Ok(info.last_main_exit.map(exit_code).unwrap_or(0))
}

fn parse_user(s: &str) -> Result<User> {
    let (u, g) = s.split_once(':').unwrap_or((s, s));
    Ok(User {
        uid: u.parse().with_context(|| format!("--user {s}: not numeric"))?,
        gid: g.parse().with_context(|| format!("--user {s}: not numeric"))?,
        additional_gids: Vec::new(),
    })
}

async fn exec(
    root: &Path,
    name: &str,
    tty: bool,
    env: Vec<String>,
    cwd: Option<String>,
    user: Option<String>,
    command: Vec<String>,
) -> Result<i32> {
    let (dir, _) = runtime::find(root, name)?;
    let agent =
        skiff_agent_client::AgentClient::new(skiff_agent_client::Transport::vsock(dir.join(runtime::VSOCK_SOCKET)));
    for e in &env {
        if !e.contains('=') {
            bail!("--env {e}: expected K=V");
        }
    }
    let request = ExecRequest {
        argv: command,
        env,
        cwd,
        user: user.as_deref().map(parse_user).transpose()?,
        tty: None,
        stdin: true,
    };
    let raw = if tty && attach::isatty(0) { RawMode::enter(0).ok() } else { None };
    let mut fwd = None;
    let status = attach::run_attached(&agent, request, tty, |ctl| {
        if !tty {
            fwd = Some(attach::forward_signals(ctl));
        }
    })
    .await;
    drop(raw);
    if let Some(f) = fwd {
        f.abort();
    }
    Ok(exit_code(status.with_context(|| format!("exec in {name}"))?))
}

fn list(root: &Path) -> Result<()> {
    println!("{:<20} {:>8} {:>4} {:>7}  {:<20} {:<40} KERNEL", "NAME", "PID", "CPUS", "MEMORY", "STARTED", "BUNDLE");
    for s in runtime::list(root) {
        println!(
            "{:<20} {:>8} {:>4} {:>6}M  {:<20} {:<40} {}",
            s.name, s.runner_pid, s.cpus, s.memory_mib, s.started, s.bundle, s.kernel
        );
    }
    Ok(())
}

async fn kill(root: &Path, name: &str, signal: &str) -> Result<()> {
    let sig = runtime::parse_signal(signal).with_context(|| format!("unknown signal {signal:?}"))?;
    let (dir, _) = runtime::find(root, name)?;
    if monitor::attach(&dir).is_ok() {
        bail!("{name} runs detached: stop it with `skiff-run stop {name}`");
    }
    control::send_signal(&dir, sig).await.with_context(|| format!("signalling the main process of {name}"))?;
    Ok(())
}
