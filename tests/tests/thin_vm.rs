//! Issue 4's thin-VM tests: the agent as PID 1 of a guest whose root is a
//! busybox-static rootfs (made here) shared over virtio-fs by a real
//! virtiofsd, booted by skiff-run's library and reached through skiff-vmm's
//! hybrid vsock. Two boots:
//!
//! 1. `agent_in_a_thin_vm` (library): the agent-client conformance checks
//!    (uname, exit codes and signals, stdin, TTY resize, 100 MiB of stdout,
//!    32 concurrent execs, 50 MiB push/pull, unknown requests), a second
//!    virtio-fs tag mounted at run time, then a main process that exits
//!    with 7: the host gets `main_exited 7` and the VM powers off by itself.
//! 2. `skiff_run_cli` (the binary): `skiff-run BUNDLE` with stdio piped,
//!    `list`, `exec` (output, exit code, env, stdin), `kill` → the main
//!    process exits 7 → skiff-run exits 7 after a clean power-off, leaving
//!    no process, socket or directory.
//!
//! Each check of a boot runs even when an earlier one failed; the test
//! fails at the end listing the failed checks.

use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use skiff_agent_client::{conformance, AgentClient, Timeouts};
use skiff_agent_proto::{Event, ExecRequest, ExitStatus, MainProcess, MountRequest};
use skiff_run::kernel::{kernel_version, Kernel, KernelOrigin};
use skiff_run::{initramfs, vm, Share, ThinVm, VmOptions};
use skiff_tests::{artifact, scratch, vmm_binary};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// A busybox-static rootfs: /bin with every applet, the usual mount points.
fn make_rootfs(root: &Path) -> Result<()> {
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
fn cloud_kernel() -> Result<Kernel> {
    let path = artifact("vmlinux")?;
    let version = kernel_version(&path)?;
    Ok(Kernel { path, version, needs_modules: true, origin: KernelOrigin::Explicit })
}

/// Runs `check` on its own task: a panic fails only that check.
async fn check<F>(failures: &mut Vec<String>, name: &str, check: F)
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

async fn stdout_of(agent: &AgentClient, script: &str) -> String {
    let req = ExecRequest { argv: vec!["sh".into(), "-c".into(), script.into()], ..Default::default() };
    let out = agent.exec_output(req, None).await.expect("exec");
    assert_eq!(out.status.code(), 0, "{script}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn process_gone(pid: u32) -> bool {
    // A zombie still has a /proc entry: look at its state too.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "boots a guest: run through tests/run"]
async fn agent_in_a_thin_vm() -> Result<()> {
    let dir = scratch()?;
    let d = dir.path();
    let rootfs = d.join("rootfs");
    make_rootfs(&rootfs)?;
    let data = d.join("data");
    std::fs::create_dir_all(&data)?;
    std::fs::write(data.join("hello.txt"), "from the host\n")?;
    let kernel = cloud_kernel()?;
    let agent_bin = initramfs::find_agent(None)?;
    let t = Instant::now();
    let initrd = initramfs::ensure(&agent_bin, &kernel, Path::new("/"), &d.join("cache"))?;
    eprintln!("initramfs {} built in {:?}", initrd.display(), t.elapsed());
    let opts = VmOptions {
        name: "thin".into(),
        runtime_root: d.join("run"),
        rootfs: rootfs.clone(),
        shares: vec![Share { tag: "data".into(), dir: data.clone() }],
        kernel,
        initramfs: initrd,
        cpus: 2,
        memory_mib: 1024,
        hostname: Some("thin-test".into()),
        vmm: vmm_binary()?,
        virtiofsd: vm::find_virtiofsd()?,
        boot_timeout: BOOT_TIMEOUT,
        bundle: rootfs.display().to_string(),
    };
    let t = Instant::now();
    let mut thin = ThinVm::boot(&opts).await.context("booting the thin VM")?;
    eprintln!("agent ready after {:?}", t.elapsed());
    let runtime_dir = thin.runtime_dir().to_path_buf();
    let mut pids = thin.virtiofsd_pids();
    pids.extend(thin.vmm_pid());
    // The nested guest in the box is slow: 32 execs starting at once take
    // longer than the default 30 s per reply.
    let agent = thin.agent_with(Timeouts {
        connect: Duration::from_secs(60),
        request: Duration::from_secs(180),
        exec: None,
    });
    let welcome = agent.ping().await.context("ping")?;
    ensure!(welcome.pid1, "the agent is not PID 1: {welcome:?}");

    let mut failures = Vec::new();
    let f = &mut failures;
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
    {
        let a = a();
        check(f, "exec uname -a", async move { conformance::exec_uname(&a).await }).await;
    }
    {
        let a = a();
        check(f, "exit codes 0, 3, signals, 127", async move { conformance::exit_codes_and_signals(&a).await }).await;
    }
    {
        let a = a();
        check(f, "env, cwd, stdout/stderr", async move { conformance::env_cwd_and_streams(&a).await }).await;
    }
    {
        let a = a();
        check(f, "uid/gid/groups", async move { conformance::identity(&a).await }).await;
    }
    {
        let a = a();
        check(f, "stdin round trip", async move { conformance::stdin_round_trip(&a).await }).await;
    }
    {
        let a = a();
        check(f, "tty stty size after resize", async move { conformance::tty_resize(&a).await }).await;
    }
    {
        let a = a();
        check(f, "32 concurrent execs", async move { conformance::concurrent_execs(&a).await }).await;
    }
    {
        // The two bulk transfers at once: in the box they are slow, and
        // each on its own connection they overlap.
        let (a1, a2) = (a(), a());
        let local = d.join("local");
        std::fs::create_dir_all(&local)?;
        check(f, "100 MiB stdout sha256 + push/pull 50 MiB, mode, tree", async move {
            let big = tokio::spawn(async move { conformance::big_stdout(&a1).await });
            conformance::push_pull(&a2, &local, "/tmp/pushed").await;
            big.await.expect("100 MiB stdout");
        })
        .await;
    }
    {
        let a = a();
        let data = data.clone();
        check(f, "second virtio-fs tag mounted at run time", async move {
            let req = MountRequest {
                source: "data".into(),
                target: "/mnt/data".into(),
                fstype: "virtiofs".into(),
                options: vec![],
            };
            a.mount(req).await.expect("mount data");
            assert_eq!(stdout_of(&a, "cat /mnt/data/hello.txt").await, "from the host\n");
            stdout_of(&a, "echo from the guest > /mnt/data/back.txt").await;
            assert_eq!(std::fs::read_to_string(data.join("back.txt")).unwrap(), "from the guest\n");
        })
        .await;
    }
    {
        let a = a();
        check(f, "unknown request → error, agent keeps serving", async move {
            conformance::unknown_request(&a).await
        })
        .await;
    }

    // The main process exits with 7: the host hears it, the guest powers off.
    let main = MainProcess {
        args: vec!["sh".into(), "-c".into(), "sleep 0.5; exit 7".into()],
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
        Err(e) => failures.push(format!("start_main: {e}")),
    }
    match thin.next_event(Duration::from_secs(60)).await {
        Ok(Some(Event::MainExited { status: ExitStatus::Exited { code: 7 }, restarting: false })) => {
            eprintln!("ok   main process exit 7 reported")
        }
        other => failures.push(format!("main_exited 7 expected, got {other:?}")),
    }
    match thin.wait_vmm(Duration::from_secs(120)).await {
        Ok(Some(st)) if st.success() => eprintln!("ok   the VM powered off by itself ({st})"),
        other => failures.push(format!("the VM did not power off by itself: {other:?}")),
    }
    thin.shutdown(Duration::from_secs(10)).await?;
    if runtime_dir.exists() {
        failures.push(format!("runtime dir {} left behind", runtime_dir.display()));
    }
    let left: Vec<u32> = pids.into_iter().filter(|p| !process_gone(*p)).collect();
    if !left.is_empty() {
        failures.push(format!("processes left running: {left:?}"));
    }
    if !failures.is_empty() {
        let console = std::fs::read_to_string(runtime_dir.join("console.log")).unwrap_or_default();
        bail!("{} check(s) failed:\n{}\n{console}", failures.len(), failures.join("\n"));
    }
    Ok(())
}

/// skiff-run next to skiff-vmm (tests/run builds both).
fn skiff_run_binary() -> Result<PathBuf> {
    let p = vmm_binary()?.with_file_name("skiff-run");
    ensure!(p.is_file(), "{} is missing: run through tests/run", p.display());
    Ok(p)
}

fn cli(bin: &Path, root: &Path, args: &[&str], stdin: Option<&str>) -> Result<(i32, String, String)> {
    let mut child = Command::new(bin)
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut input = child.stdin.take().expect("piped");
    if let Some(s) = stdin {
        input.write_all(s.as_bytes())?;
    }
    drop(input);
    let out = child.wait_with_output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) && !process_gone(e.file_name().to_string_lossy().parse().unwrap_or(0)) {
                out.push(cmd);
            }
        }
    }
    out
}

#[test]
#[ignore = "boots a guest: run through tests/run"]
fn skiff_run_cli() -> Result<()> {
    let bin = skiff_run_binary()?;
    let dir = scratch()?;
    let d = dir.path();
    let bundle = d.join("bundle");
    make_rootfs(&bundle.join("rootfs"))?;
    let script = "echo started; read line; echo \"got $line\"; echo to-stderr >&2; \
                  trap 'echo bye; exit 7' TERM; while :; do sleep 1; done";
    let config = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"args": ["sh", "-c", script], "env": ["PATH=/bin", "GREETING=hi"], "cwd": "/tmp"},
        "hostname": "cli-test",
    });
    std::fs::write(bundle.join("config.json"), serde_json::to_vec(&config)?)?;
    let root = d.join("run");
    // No --kernel: skiff-run picks the project kernel that scripts/setup
    // built (the library test above keeps the distribution kernel's path).
    let stderr_log = d.join("skiff-run.stderr");
    let mut runner = Command::new(&bin)
        .arg("--root")
        .arg(&root)
        .args(["--name", "cli", "--cpus", "1", "--memory", "256", "--boot-timeout", "300"])
        .arg(&bundle)
        .env("SKIFF_CACHE_DIR", d.join("cache"))
        .env("SKIFF_VMM", vmm_binary()?)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr_log)?)
        .spawn()
        .context("starting skiff-run")?;
    let mut stdin = runner.stdin.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = runner.stdout.take().expect("piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let stderr_text = || std::fs::read_to_string(&stderr_log).unwrap_or_default();
    let mut failures = Vec::new();
    let next_line = |limit: Duration| rx.recv_timeout(limit).ok();
    match next_line(BOOT_TIMEOUT) {
        Some(l) if l == "started" => eprintln!("ok   main process started"),
        other => {
            let _ = runner.kill();
            let _ = runner.wait();
            bail!("no 'started' from the main process: {other:?}\n{}", stderr_text());
        }
    }
    writeln!(stdin, "hello")?;
    match next_line(Duration::from_secs(30)) {
        Some(l) if l == "got hello" => eprintln!("ok   stdin reaches the main process"),
        other => failures.push(format!("stdin: got {other:?}")),
    }

    let (code, out, err) = cli(&bin, &root, &["list"], None)?;
    if code != 0 || !out.lines().any(|l| l.starts_with("cli ")) {
        failures.push(format!("list ({code}): {out}{err}"));
    }
    let (code, out, err) = cli(&bin, &root, &["exec", "cli", "--", "uname", "-a"], None)?;
    if code != 0 || !out.starts_with("Linux cli-test ") {
        failures.push(format!("exec uname -a ({code}): {out:?} {err}"));
    }
    let (code, _, _) = cli(&bin, &root, &["exec", "cli", "--", "sh", "-c", "exit 3"], None)?;
    if code != 3 {
        failures.push(format!("exec exit 3 gave {code}"));
    }
    let (code, out, _) = cli(&bin, &root, &["exec", "cli", "-e", "FOO=bar", "--", "sh", "-c", "echo $FOO; pwd"], None)?;
    if code != 0 || out != "bar\n/\n" {
        failures.push(format!("exec env ({code}): {out:?}"));
    }
    let (code, out, _) = cli(&bin, &root, &["exec", "cli", "--", "cat"], Some("through stdin\n"))?;
    if code != 0 || out != "through stdin\n" {
        failures.push(format!("exec stdin ({code}): {out:?}"));
    }
    let (code, _, err) = cli(&bin, &root, &["exec", "cli", "--", "skiff-no-such-command"], None)?;
    if code != 127 {
        failures.push(format!("exec of a missing command gave {code}: {err}"));
    }

    let (code, out, err) = cli(&bin, &root, &["kill", "cli"], None)?;
    if code != 0 {
        failures.push(format!("kill ({code}): {out}{err}"));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(st) = runner.try_wait()? {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = runner.kill();
            let _ = runner.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut rest = Vec::new();
    while let Some(l) = next_line(Duration::from_millis(200)) {
        rest.push(l);
    }
    if !rest.iter().any(|l| l == "bye") {
        failures.push(format!("no 'bye' after kill: {rest:?}"));
    }
    match status.and_then(|s| s.code()) {
        Some(7) => eprintln!("ok   skiff-run exited with the main process's 7"),
        other => failures.push(format!("skiff-run exit {other:?}, expected 7")),
    }
    let err = stderr_text();
    if !err.contains("(project kernel ") || !err.contains("to-stderr") {
        failures.push(format!("stderr lacks the project-kernel line or the process's stderr: {err}"));
    }
    if err.contains("did not power off") || err.contains("skiff-vmm ended") {
        failures.push(format!("unclean shutdown: {err}"));
    }
    if root.join("cli").exists() {
        failures.push("runtime dir left behind".into());
    }
    let left = processes_mentioning(&root.display().to_string());
    if !left.is_empty() {
        failures.push(format!("processes left: {left:?}"));
    }
    ensure!(failures.is_empty(), "{} check(s) failed:\n{}\n--- skiff-run stderr ---\n{err}", failures.len(), failures.join("\n"));
    Ok(())
}
