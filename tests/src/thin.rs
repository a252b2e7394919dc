//! One round of thin-VM agent checks, shared by the integration test
//! (`tests/tests/thin_vm.rs`, one round per CI run) and the stress run
//! (`skiff-thin-stress`, N rounds in one box): boot a thin VM whose root is
//! a busybox rootfs over virtio-fs, run the agent-client conformance checks
//! with a main process alive throughout, send a burst of concurrent execs
//! each streaming megabytes, check that no other connection was dropped,
//! end the main process with 7 and see the VM power off by itself.
//!
//! Each check runs even when an earlier one failed; a round returns its
//! failures, and on failure the VMM's log and the guest console's tail.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use skiff_agent_client::{conformance, AgentClient, ExecEvent, Timeouts};
use skiff_agent_proto::{Event, ExecRequest, ExitStatus, MainProcess, MountRequest};
use skiff_run::kernel::{kernel_version, Kernel, KernelOrigin};
use skiff_run::{initramfs, vm, Share, ThinVm, VmOptions};

use crate::qemu::QemuVm;
use crate::{artifact, vmm_binary};

/// How long a nested guest may take to boot to the agent.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// A busybox-static rootfs: /bin with every applet, the usual mount points.
pub fn make_rootfs(root: &Path) -> Result<()> {
    for d in ["bin", "sbin", "dev", "proc", "sys", "run", "tmp", "etc", "root", "mnt", "var"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .context("no busybox (apt-get install busybox-static)")?;
    std::fs::copy(busybox, root.join("bin/busybox"))?;
    let list = Command::new(busybox).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !root.join("bin").join(applet).exists() {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
        }
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(root.join("etc/group"), "root:x:0:\n")?;
    Ok(())
}

/// The cloud kernel artifact (PVH vmlinux) with its modules.
pub fn cloud_kernel() -> Result<Kernel> {
    let path = artifact("vmlinux")?;
    let version = kernel_version(&path)?;
    Ok(Kernel { path, version, needs_modules: true, origin: KernelOrigin::Explicit })
}

/// Runs `check` on its own task: a panic fails only that check.
pub async fn check<F>(failures: &mut Vec<String>, name: &str, check: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let t = Instant::now();
    match tokio::spawn(check).await {
        Ok(()) => eprintln!("ok   {name} ({:.1?})", t.elapsed()),
        Err(e) => {
            let msg = match e.try_into_panic() {
                Ok(p) => p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default(),
                Err(e) => e.to_string(),
            };
            eprintln!("FAIL {name}: {msg}");
            failures.push(format!("{name}: {msg}"));
        }
    }
}

/// Runs `sh -c script`, asserts exit 0, returns stdout.
pub async fn stdout_of(agent: &AgentClient, script: &str) -> String {
    let req = ExecRequest { argv: vec!["sh".into(), "-c".into(), script.into()], ..Default::default() };
    let out = agent.exec_output(req, None).await.expect("exec");
    assert_eq!(out.status.code(), 0, "{script}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether a process is gone (a zombie counts as gone).
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// What a round does besides the conformance checks.
#[derive(Debug, Clone)]
pub struct RoundOptions {
    /// Concurrent execs in the burst.
    pub burst_execs: usize,
    /// Bytes each of them streams to stdout.
    pub burst_bytes: usize,
    /// Guest vCPUs.
    pub cpus: u8,
    /// Also pipe 1 GiB into an exec (minutes in the box).
    pub gib_stdin: bool,
    /// Run the round under QEMU (microvm, vhost-vsock, vhost-user-fs)
    /// instead of skiff-vmm, to compare in the same box.
    pub qemu: bool,
}

impl Default for RoundOptions {
    fn default() -> Self {
        RoundOptions { burst_execs: 24, burst_bytes: 4 << 20, cpus: 2, gib_stdin: false, qemu: false }
    }
}

/// The outcome of a round.
#[derive(Debug)]
pub struct RoundResult {
    /// Failed checks, empty when the round passed.
    pub failures: Vec<String>,
    /// skiff-vmm's log and the console tail (kept for a failed round).
    pub diagnostics: String,
}

/// What a burst exec prints: `yes` lines of its index, cut to `len`.
fn burst_expected(i: usize, len: usize) -> Vec<u8> {
    let line = format!("burst-{i}-0123456789abcdef\n");
    line.as_bytes().iter().copied().cycle().take(len).collect()
}

/// `n` execs at once, each streaming `len` bytes to stdout and exiting with
/// `i % 7`: every stream arrives intact with its exit code.
pub async fn exec_burst(agent: &AgentClient, n: usize, len: usize) {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let agent = agent.clone();
        set.spawn(async move {
            let script = format!("yes burst-{i}-0123456789abcdef | head -c {len}; exit {}", i % 7);
            let req = ExecRequest { argv: vec!["sh".into(), "-c".into(), script], ..Default::default() };
            let mut s = agent.exec(req).await.unwrap_or_else(|e| panic!("burst exec {i}: {e}"));
            let (mut h, mut got, mut err) = (Sha256::new(), 0usize, Vec::new());
            let status = loop {
                match s.next_event().await.unwrap_or_else(|e| panic!("burst exec {i} after {got} bytes: {e}")) {
                    Some(ExecEvent::Stdout(b)) => {
                        got += b.len();
                        h.update(&b);
                    }
                    Some(ExecEvent::Stderr(b)) => err.extend_from_slice(&b),
                    Some(ExecEvent::Exit(st)) => break st,
                    None => {
                        panic!("burst exec {i}: connection ended after {got} bytes without an exit")
                    }
                }
            };
            (i, status, got, hex::encode(h.finalize()), err)
        });
    }
    let mut bad = Vec::new();
    while let Some(r) = set.join_next().await {
        let (i, status, got, sha, err) = match r {
            Ok(v) => v,
            Err(e) => {
                bad.push(format!("{e}"));
                continue;
            }
        };
        let want = hex::encode(Sha256::digest(burst_expected(i, len)));
        if status.code() != (i % 7) as i32 || got != len || sha != want {
            bad.push(format!(
                "exec {i}: status {status:?} (want {}), {got}/{len} bytes, sha ok: {}, stderr {:?}",
                i % 7,
                sha == want,
                String::from_utf8_lossy(&err)
            ));
        }
    }
    assert!(bad.is_empty(), "{} of {n} burst execs failed:\n{}", bad.len(), bad.join("\n"));
}

/// Boots a thin VM under `dir` and runs one round of checks.
pub async fn agent_round(dir: &Path, opts: &RoundOptions) -> Result<RoundResult> {
    let rootfs = dir.join("rootfs");
    if !rootfs.join("bin/busybox").exists() {
        make_rootfs(&rootfs)?;
    }
    // A round's leftovers in the shared rootfs (the main process's stop
    // file above all) must not reach the next round.
    let _ = std::fs::remove_file(rootfs.join("tmp/stop-main"));
    let _ = std::fs::remove_dir_all(rootfs.join("tmp/pushed"));
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    std::fs::write(data.join("hello.txt"), "from the host\n")?;
    let _ = std::fs::remove_file(data.join("back.txt"));
    let kernel = cloud_kernel()?;
    let agent_bin = initramfs::find_agent(None)?;
    let t = Instant::now();
    let initrd = initramfs::ensure(&agent_bin, &kernel, Path::new("/"), &dir.join("cache"))?;
    eprintln!("initramfs {} ready in {:?}", initrd.display(), t.elapsed());
    if opts.qemu {
        return qemu_round(dir, &kernel.path, &initrd, &rootfs, &data, opts).await;
    }
    let vm_opts = VmOptions {
        name: "thin".into(),
        runtime_root: dir.join("run"),
        rootfs: rootfs.clone(),
        shares: vec![Share { tag: "data".into(), dir: data.clone() }],
        kernel,
        initramfs: initrd,
        cpus: opts.cpus,
        memory_mib: 1024,
        hostname: Some("thin-test".into()),
        vmm: vmm_binary()?,
        virtiofsd: vm::find_virtiofsd()?,
        boot_timeout: BOOT_TIMEOUT,
        bundle: rootfs.display().to_string(),
    };
    let t = Instant::now();
    let mut thin = ThinVm::boot(&vm_opts).await.context("booting the thin VM")?;
    eprintln!("agent ready after {:?}", t.elapsed());
    let runtime_dir = thin.runtime_dir().to_path_buf();
    let mut pids = thin.virtiofsd_pids();
    pids.extend(thin.vmm_pid());
    // The nested guest in the box is slow: dozens of execs starting at once
    // take longer than the default 30 s per reply.
    let agent =
        thin.agent_with(Timeouts { connect: Duration::from_secs(60), request: Duration::from_secs(180), exec: None });
    let mut failures = Vec::new();
    run_checks(&agent, dir, &data, opts, &mut failures).await;
    // The main process ran through all of it; now it exits with 7, the host
    // hears it on the event connection, and the guest powers off.
    stop_main(&agent, &mut failures).await;
    match thin.next_event(Duration::from_secs(60)).await {
        Ok(Some(Event::MainExited { status: ExitStatus::Exited { code: 7 }, restarting: false })) => {
            eprintln!("ok   main process exit 7 reported")
        }
        other => failures.push(format!("main_exited 7 expected, got {other:?}")),
    }

    let mut diagnostics = String::new();
    match thin.wait_vmm(Duration::from_secs(120)).await {
        Ok(Some(st)) if st.success() => eprintln!("ok   the VM powered off by itself ({st})"),
        other => {
            diagnostics = thin.diagnostics();
            failures.push(format!("the VM did not power off by itself: {other:?}"));
        }
    }
    let stopped = thin.shutdown(Duration::from_secs(10)).await?;
    if diagnostics.is_empty() {
        diagnostics = stopped.diagnostics;
    }
    if runtime_dir.exists() {
        failures.push(format!("runtime dir {} left behind", runtime_dir.display()));
    }
    let left: Vec<u32> = pids.into_iter().filter(|p| !process_gone(*p)).collect();
    if !left.is_empty() {
        failures.push(format!("processes left running: {left:?}"));
    }
    Ok(RoundResult { failures, diagnostics })
}

/// The same round under QEMU (see [`crate::qemu`]); the agent's events
/// have no listener there, so the end is seen as QEMU exiting.
async fn qemu_round(
    dir: &Path,
    kernel: &Path,
    initrd: &Path,
    rootfs: &Path,
    data: &Path,
    opts: &RoundOptions,
) -> Result<RoundResult> {
    let shares = [
        Share { tag: "rootfs".into(), dir: rootfs.to_path_buf() },
        Share { tag: "data".into(), dir: data.to_path_buf() },
    ];
    let t = Instant::now();
    let mut vm = QemuVm::boot(dir, kernel, initrd, &shares, opts.cpus, 1024, "thin-test").await?;
    eprintln!("agent ready under QEMU after {:?}", t.elapsed());
    let agent = vm.agent();
    let mut failures = Vec::new();
    run_checks(&agent, dir, data, opts, &mut failures).await;
    stop_main(&agent, &mut failures).await;
    let mut diagnostics = String::new();
    match vm.wait(Duration::from_secs(120)).await {
        Ok(Some(st)) if st.success() => eprintln!("ok   the VM powered off by itself ({st})"),
        other => {
            diagnostics = vm.diagnostics();
            failures.push(format!("the VM did not power off by itself: {other:?}"));
        }
    }
    if !failures.is_empty() && diagnostics.is_empty() {
        diagnostics = vm.diagnostics();
    }
    Ok(RoundResult { failures, diagnostics })
}

/// Ends the round's main process: it exits with 7.
async fn stop_main(agent: &AgentClient, f: &mut Vec<String>) {
    let req = ExecRequest { argv: vec!["touch".into(), "/tmp/stop-main".into()], ..Default::default() };
    if let Err(e) = agent.exec_output(req, None).await {
        f.push(format!("touch /tmp/stop-main: {e}"));
    }
}

/// The checks of a round, with the main process alive from first to last.
async fn run_checks(agent: &AgentClient, dir: &Path, data: &Path, opts: &RoundOptions, f: &mut Vec<String>) {
    match agent.ping().await {
        Ok(w) if w.pid1 => {}
        other => f.push(format!("ping: the agent is not PID 1: {other:?}")),
    }
    // The main process lives through every check and the burst; it exits
    // with 7 when /tmp/stop-main appears.
    let main = MainProcess {
        args: vec!["sh".into(), "-c".into(), "while [ ! -e /tmp/stop-main ]; do sleep 0.2; done; exit 7".into()],
        env: vec![],
        cwd: "/".into(),
        user: Default::default(),
        terminal: false,
        hostname: None,
        stop_signal: libc::SIGTERM,
        stop_timeout_secs: 10,
        restart: Default::default(),
    };
    match agent.start_main(main).await {
        Ok(pid) => eprintln!("main process pid {pid}"),
        Err(e) => f.push(format!("start_main: {e}")),
    }
    let a = || agent.clone();
    check(f, "root is the virtio-fs share, hostname set", {
        let a = a();
        async move {
            let mounts = stdout_of(&a, "cat /proc/mounts").await;
            assert!(mounts.lines().any(|l| l.starts_with("rootfs / virtiofs")), "{mounts}");
            assert_eq!(stdout_of(&a, "hostname").await.trim(), "thin-test");
        }
    })
    .await;
    let b = a();
    check(f, "exec uname -a", async move { conformance::exec_uname(&b).await }).await;
    let b = a();
    check(f, "exit codes 0, 3, signals, 127", async move { conformance::exit_codes_and_signals(&b).await }).await;
    let b = a();
    check(f, "env, cwd, stdout/stderr", async move { conformance::env_cwd_and_streams(&b).await }).await;
    let b = a();
    check(f, "uid/gid/groups", async move { conformance::identity(&b).await }).await;
    let b = a();
    check(f, "stdin round trip", async move { conformance::stdin_round_trip(&b).await }).await;
    let b = a();
    check(f, "32 MiB stdin sha256, rate within 2x of stdout", async move { conformance::large_stdin(&b).await }).await;
    if opts.gib_stdin {
        let b = a();
        check(f, "1 GiB stdin sha256", async move { conformance::large_stdin_of(&b, 1 << 30).await }).await;
    }
    let b = a();
    check(f, "a slow stdin reader holds the writer back", async move {
        let waited = conformance::stdin_back_pressure(&b).await;
        eprintln!("     writer held back {waited:.1?}");
    })
    .await;
    let b = a();
    check(f, "a signal reaches an exec whose stdin is full", async move {
        conformance::signal_with_stdin_pending(&b).await
    })
    .await;
    let b = a();
    check(f, "tty stty size after resize", async move { conformance::tty_resize(&b).await }).await;
    let b = a();
    check(f, "32 concurrent execs", async move { conformance::concurrent_execs(&b).await }).await;

    // A long-lived exec open across the burst: it must still answer after.
    let echo = agent.exec(ExecRequest { argv: vec!["cat".into()], stdin: true, ..Default::default() }).await;
    let (n, len) = (opts.burst_execs, opts.burst_bytes);
    let b = a();
    check(f, &format!("burst: {n} execs at once, {} MiB stdout each, sha256 + exit codes", len >> 20), async move {
        exec_burst(&b, n, len).await
    })
    .await;
    check(f, "an exec opened before the burst still answers", async move {
        let s = echo.expect("exec cat");
        s.control().write_stdin(b"still here\n").await.expect("stdin");
        s.control().close_stdin().await.expect("close stdin");
        let out = s.output().await.expect("cat output");
        assert_eq!(out.status.code(), 0);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "still here\n");
    })
    .await;
    {
        // The two bulk transfers at once: each on its own connection.
        let (a1, a2) = (a(), a());
        let local = dir.join("local");
        let _ = std::fs::remove_dir_all(&local);
        let _ = std::fs::create_dir_all(&local);
        check(f, "100 MiB stdout sha256 + push/pull 50 MiB, mode, tree", async move {
            let big = tokio::spawn(async move { conformance::big_stdout(&a1).await });
            conformance::push_pull(&a2, &local, "/tmp/pushed").await;
            big.await.expect("100 MiB stdout");
        })
        .await;
    }
    let (b, data2) = (a(), PathBuf::from(data));
    check(f, "second virtio-fs tag mounted at run time", async move {
        let req = MountRequest {
            source: "data".into(),
            target: "/mnt/data".into(),
            fstype: "virtiofs".into(),
            options: vec![],
        };
        b.mount(req).await.expect("mount data");
        assert_eq!(stdout_of(&b, "cat /mnt/data/hello.txt").await, "from the host\n");
        stdout_of(&b, "echo from the guest > /mnt/data/back.txt").await;
        assert_eq!(std::fs::read_to_string(data2.join("back.txt")).unwrap(), "from the guest\n");
    })
    .await;
    let b = a();
    check(f, "unknown request → error, agent keeps serving", async move { conformance::unknown_request(&b).await })
        .await;
}
