//! Issue 14 through the stack: skiffd's stateful snapshots of a thin VM
//! (memory and device state beside the disk snapshot), restored into a
//! VM whose processes go on, and clones (`skiff copy NAME/SNAP NEW`) that
//! start from the memory snapshot beside the original; the refusals (a
//! stopped instance, a container, a snapshot without memory, a damaged
//! memory file) leave nothing behind; and Debian's `lxc` client sends the
//! same requests. One boot; each check runs even when an earlier one
//! failed, and the test fails at the end listing them with skiffd's log.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use skiff_tests::daemon_env::{processes, run, Env};
use skiff_tests::{scratch, vmm_binary};

/// A counter in the guest: a shell loop (its own session, so the exec that
/// starts it can end) that writes its count to /root/counter every second
/// (renamed into place: a reader never sees it half-written).
const COUNTER: &str = "setsid sh -c 'i=0; while true; do i=$((i+1)); echo $i > /root/.c; mv /root/.c /root/counter; \
                       sleep 1; done' </dev/null >/dev/null 2>&1 & echo $!";

/// The count the guest's counter last wrote.
fn counter(env: &Env, name: &str) -> Result<u64> {
    let out = env.ok(&["exec", name, "--", "cat", "/root/counter"])?;
    out.trim().parse().with_context(|| format!("counter of {name}: {out:?}"))
}

/// Whether guest process `pid` of `name` runs the counter loop.
fn counter_runs(env: &Env, name: &str, pid: &str) -> Result<bool> {
    let (c, out, _) = env.skiff(&["exec", name, "--", "cat", &format!("/proc/{pid}/cmdline")])?;
    Ok(c == 0 && out.contains("while true"))
}

/// Waits until the counter of `name` passes `above` (it may not have
/// written its first count yet).
fn counter_passes(env: &Env, name: &str, above: u64) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = counter(env, name);
        if let Ok(&n) = n.as_ref() {
            if n > above {
                return Ok(n);
            }
        }
        ensure!(Instant::now() < deadline, "the counter of {name} stays at {n:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The STATE column of `name` in `skiff list`.
fn state(env: &Env, name: &str) -> Result<String> {
    let out = env.ok(&["list", "--format", "csv", "-c", "ns"])?;
    Ok(out.lines().find_map(|l| l.strip_prefix(&format!("{name},"))).unwrap_or("").to_string())
}

/// `lxc` (lxd-client) against the daemon in `dir`.
fn lxc(env: &Env, args: &[&str]) -> Result<String> {
    let conf = env.home.join("lxc-conf");
    std::fs::create_dir_all(&conf)?;
    run(Command::new("lxc").args(args).env("LXD_DIR", &env.dir).env("LXD_CONF", conf).env("HOME", &env.home))
}

#[test]
#[ignore = "boots guests: run through tests/run"]
fn stateful_snapshots_restores_and_clones() -> Result<()> {
    let tmp = scratch()?;
    let bin = vmm_binary()?.parent().context("binary dir")?.to_path_buf();
    let mut env = Env::in_scratch(tmp.path(), bin)?;
    let dir = env.dir.clone();
    env.demo_image()?;
    env.start_daemon()?;
    let mut failures: Vec<String> = Vec::new();
    let mut check = |name: &str, r: Result<()>| {
        if let Err(e) = r {
            failures.push(format!("{name}: {e:#}"));
        }
    };

    check(
        "refusals before any boot",
        (|| {
            env.ok(&["init", "--vm", "localhost/skiff-demo", "web"])?;
            let (c, _, e) = env.skiff(&["snapshot", "create", "web", "x", "--stateful"])?;
            ensure!(c != 0 && e.contains("is not running"), "a stopped VM: {c} {e}");
            env.ok(&["init", "localhost/skiff-demo", "ct", "-c", "security.privileged=true"])?;
            let (c, _, e) = env.skiff(&["snapshot", "create", "ct", "x", "--stateful"])?;
            ensure!(c != 0 && e.contains("CRIU"), "a container: {c} {e}");
            env.ok(&["delete", "ct"])?;
            let snaps = env.ok(&["snapshot", "list", "web", "--format", "csv"])?;
            ensure!(snaps.trim().is_empty(), "refused snapshots were made: {snaps}");
            Ok(())
        })(),
    );

    let mut pid = String::new();
    let mut at_snapshot = 0;
    check(
        "stateful snapshot of a running VM",
        (|| {
            env.ok(&["start", "web"])?;
            pid = env.ok(&["exec", "web", "--", "sh", "-c", COUNTER])?.trim().to_string();
            // At least this when the snapshot is taken (it goes on meanwhile).
            at_snapshot = counter_passes(&env, "web", 2)?;
            let t = Instant::now();
            env.ok(&["snapshot", "create", "web", "warm", "--stateful"])?;
            eprintln!("stateful: snapshot taken in {:?}, the counter at {at_snapshot} or more", t.elapsed());
            env.ok(&["snapshot", "create", "web", "cold"])?;
            let snaps = env.ok(&["snapshot", "list", "web", "--format", "csv"])?;
            ensure!(snaps.lines().any(|l| l.starts_with("warm,") && l.contains("YES")), "{snaps}");
            ensure!(snaps.lines().any(|l| l.starts_with("cold,") && l.contains("NO")), "{snaps}");
            // The VM goes on after the snapshot.
            counter_passes(&env, "web", at_snapshot + 1)?;
            ensure!(state(&env, "web")? == "RUNNING", "web after the snapshot: {}", state(&env, "web")?);
            Ok(())
        })(),
    );

    check(
        "stateful restore: the processes go on, the disk is the snapshot's",
        (|| {
            env.ok(&["exec", "web", "--", "sh", "-c", "echo later > /root/marker"])?;
            let before_stop = counter_passes(&env, "web", at_snapshot + 15)?;
            env.ok(&["stop", "--force", "web"])?;
            let (c, _, e) = env.skiff(&["snapshot", "restore", "web", "cold", "--stateful"])?;
            ensure!(c != 0 && e.contains("no memory state"), "a stateless snapshot restored stateful: {c} {e}");
            let t = Instant::now();
            env.ok(&["snapshot", "restore", "web", "warm", "--stateful"])?;
            eprintln!("stateful: restored in {:?}", t.elapsed());
            ensure!(state(&env, "web")? == "RUNNING", "web after the restore: {}", state(&env, "web")?);
            ensure!(counter_runs(&env, "web", &pid)?, "the counter process {pid} is gone");
            let n = counter(&env, "web")?;
            eprintln!("stateful: the counter at {n} after the restore ({before_stop} before the stop)");
            ensure!(n >= at_snapshot && n < before_stop, "counter {n}: saved at {at_snapshot}, {before_stop} later");
            counter_passes(&env, "web", n)?;
            let (c, _, _) = env.skiff(&["exec", "web", "--", "test", "-e", "/root/marker"])?;
            ensure!(c == 1, "a file written after the snapshot survived the restore ({c})");
            Ok(())
        })(),
    );

    check(
        "a clone from the stateful snapshot runs beside the original",
        (|| {
            env.ok(&["copy", "web/warm", "clone"])?;
            ensure!(state(&env, "clone")? == "STOPPED", "the copy: {}", state(&env, "clone")?);
            let t = Instant::now();
            env.ok(&["start", "clone"])?;
            eprintln!("stateful: the clone started in {:?}", t.elapsed());
            ensure!(counter_runs(&env, "clone", &pid)?, "the clone has no counter process {pid}");
            let n = counter_passes(&env, "clone", at_snapshot)?;
            env.ok(&["exec", "clone", "--", "true"])?;
            ensure!(state(&env, "web")? == "RUNNING", "web beside the clone: {}", state(&env, "web")?);
            counter_passes(&env, "web", 0)?;
            // Two VMs now: each its own skiff-vmm.
            ensure!(processes("skiff-vmm") == 2, "{} skiff-vmm processes", processes("skiff-vmm"));
            ensure!(n > at_snapshot, "clone counter {n}");
            Ok(())
        })(),
    );

    check(
        "the clone gets its own address",
        (|| {
            let (a, b) = (env.ipv4("web")?, env.ipv4("clone")?);
            eprintln!("stateful: web at {a}, its clone at {b}");
            ensure!(!a.is_empty() && a != b, "web {a}, clone {b}");
            let out = env.ok(&["exec", "clone", "--", "hostname"])?;
            ensure!(out.trim() == "clone", "the clone's hostname: {out:?}");
            Ok(())
        })(),
    );

    check(
        "lxc client: stateful snapshot, restore and copy",
        (|| {
            lxc(&env, &["snapshot", "web", "lxwarm", "--stateful"])?;
            let info = lxc(&env, &["info", "web"])?;
            ensure!(info.lines().any(|l| l.contains("lxwarm") && l.contains("YES")), "lxc info: {info}");
            lxc(&env, &["restore", "web", "lxwarm", "--stateful"])?;
            ensure!(counter_runs(&env, "web", &pid)?, "the counter after lxc restore");
            lxc(&env, &["copy", "web/lxwarm", "lxclone"])?;
            let list = lxc(&env, &["list", "--format", "csv", "-c", "ns"])?;
            ensure!(list.lines().any(|l| l == "lxclone,STOPPED"), "lxc list: {list}");
            env.ok(&["delete", "lxclone"])?;
            env.ok(&["delete", "--force", "clone"])?;
            Ok(())
        })(),
    );

    check(
        "a damaged memory file is refused and leaves the instance as it was",
        (|| {
            env.ok(&["snapshot", "create", "web", "broken", "--stateful"])?;
            let memory = dir.join("instances/web/snapshots/broken/memory");
            let f = std::fs::OpenOptions::new().write(true).open(&memory)?;
            f.set_len(f.metadata()?.len() / 2)?;
            drop(f);
            env.ok(&["exec", "web", "--", "sh", "-c", "echo kept > /root/kept"])?;
            let (c, _, e) = env.skiff(&["snapshot", "restore", "web", "broken", "--stateful"])?;
            ensure!(c != 0 && e.to_lowercase().contains("memory"), "a damaged memory file: {c} {e}");
            ensure!(state(&env, "web")? == "STOPPED", "web after the failed restore: {}", state(&env, "web")?);
            std::thread::sleep(Duration::from_secs(1));
            for p in ["skiff-vmm", "virtiofsd"] {
                ensure!(processes(p) == 0, "{p} left running");
            }
            let taps = run(Command::new("ip").args(["-o", "link", "show", "master", "skiffbr0"]))?;
            ensure!(taps.trim().is_empty(), "taps left: {taps}");
            let runs = std::fs::read_dir(env.run.join("vm")).map(|r| r.count()).unwrap_or(0);
            ensure!(runs == 0, "{runs} runtime directories left");
            // Booted again: its disk is as it was before the failed restore.
            env.ok(&["start", "web"])?;
            let out = env.ok(&["exec", "web", "--", "cat", "/root/kept"])?;
            ensure!(out == "kept\n", "the disk changed: {out:?}");
            Ok(())
        })(),
    );

    // Whatever a failed check left goes too: the box's next test starts clean.
    let names = env.ok(&["list", "--format", "csv", "-c", "n"]).unwrap_or_default();
    for name in names.lines().filter(|n| !n.is_empty()) {
        let _ = env.skiff(&["delete", "--force", name]);
    }
    let log = env.daemon_log();
    drop(env);
    let _ = Command::new("pkill").args(["-f", "dnsmasq.*skiffbr0"]).status();
    let _ = Command::new("nft").args(["delete", "table", "inet", "skiff_skiffbr0"]).status();
    let _ = Command::new("ip").args(["link", "del", "skiffbr0"]).status();
    if !failures.is_empty() {
        bail!("{} check(s) failed:\n{}\n--- skiffd log ---\n{log}", failures.len(), failures.join("\n"));
    }
    Ok(())
}
