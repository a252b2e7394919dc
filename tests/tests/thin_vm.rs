//! Issue 4's thin-VM tests: the agent as PID 1 of a guest whose root is a
//! busybox-static rootfs (made here) shared over virtio-fs by a real
//! virtiofsd, booted by skiff-run's library and reached through skiff-vmm's
//! hybrid vsock. Two boots:
//!
//! 1. `agent_in_a_thin_vm` (library): one round of `skiff_tests::thin`
//!    (the stress run repeats it): a main process alive throughout, the
//!    agent-client conformance checks (uname, exit codes and signals,
//!    stdin, TTY resize, 100 MiB of stdout, 32 concurrent execs, 50 MiB
//!    push/pull, unknown requests), a burst of concurrent execs streaming
//!    megabytes each, a second virtio-fs tag mounted at run time, then the
//!    main process exits with 7: the host gets `main_exited 7` and the VM
//!    powers off by itself. A failure prints skiff-vmm's log and the tail
//!    of the guest console.
//! 2. `skiff_run_cli` (the binary): `skiff-run BUNDLE` with stdio piped,
//!    `list`, `exec` (output, exit code, env, stdin), `kill` → the main
//!    process exits 7 → skiff-run exits 7 after a clean power-off, leaving
//!    no process, socket or directory.
//!
//! Each check of a boot runs even when an earlier one failed; the test
//! fails at the end listing the failed checks.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use skiff_tests::thin::{agent_round, make_rootfs, process_gone, RoundOptions, BOOT_TIMEOUT};
use skiff_tests::{scratch, vmm_binary};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "boots a guest: run through tests/run"]
async fn agent_in_a_thin_vm() -> Result<()> {
    let dir = scratch()?;
    let round = agent_round(dir.path(), &RoundOptions::default()).await?;
    if !round.failures.is_empty() {
        bail!("{} check(s) failed:\n{}\n{}", round.failures.len(), round.failures.join("\n"), round.diagnostics);
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
    cli_bytes(bin, root, args, stdin.map(str::as_bytes))
}

fn cli_bytes(bin: &Path, root: &Path, args: &[&str], stdin: Option<&[u8]>) -> Result<(i32, String, String)> {
    let mut child = Command::new(bin)
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut input = child.stdin.take().expect("piped");
    // Feed stdin from a thread: a large input must not wait for the output
    // to be read (the child's stdout pipe fills meanwhile).
    let data = stdin.map(<[u8]>::to_vec);
    let feeder = std::thread::spawn(move || -> std::io::Result<()> {
        if let Some(d) = data {
            input.write_all(&d)?;
        }
        Ok(())
    });
    let out = child.wait_with_output()?;
    feeder.join().map_err(|_| anyhow::anyhow!("stdin feeder panicked"))??;
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
    // 32 MiB through the CLI's stdin (once a stall: no flow control).
    let big = vec![0u8; 32 << 20];
    let t = Instant::now();
    let (code, out, err) = cli_bytes(&bin, &root, &["exec", "cli", "--", "sh", "-c", "wc -c"], Some(&big))?;
    if code != 0 || out.trim() != (32u32 << 20).to_string() {
        failures.push(format!("exec with 32 MiB of stdin ({code}): {out:?} {err}"));
    } else {
        eprintln!("ok   32 MiB through skiff-run exec's stdin in {:.1?}", t.elapsed());
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
    ensure!(
        failures.is_empty(),
        "{} check(s) failed:\n{}\n--- skiff-run stderr ---\n{err}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}
