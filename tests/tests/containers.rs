//! Issue 13's test of native OCI application containers: skiffd with the
//! LXC driver on this host (LXC needs no KVM, so tests/run runs this file
//! on the host, not in the KVM box), the demo image launched without
//! `--vm`, the managed bridge with dnsmasq, and real clients. One daemon,
//! few containers, many checks; each check runs even when an earlier one
//! failed, and the test fails at the end listing them with skiffd's log.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use skiff_tests::daemon_env::{http_get, run, Env};
use skiff_tests::{scratch, vmm_binary};

const IMAGE: &str = "localhost/skiff-demo";

/// `lxc-cgroup` of a running container of this daemon.
fn cgroup(run_dir: &Path, name: &str, key: &str) -> Result<String> {
    let lxcpath = run_dir.join("lxc");
    Ok(run(Command::new("lxc-cgroup").arg("-P").arg(&lxcpath).args(["-n", name, key]))?.trim().to_string())
}

/// The host-side veth of a container (`volatile.eth0.host_name`).
fn veth(env: &Env, name: &str) -> Result<String> {
    Ok(env.ok(&["config", "get", name, "volatile.eth0.host_name"])?.trim().to_string())
}

fn state(env: &Env, name: &str) -> Result<String> {
    let out = env.ok(&["list", "--format", "csv", "-c", "ns"])?;
    Ok(out.lines().find_map(|l| l.strip_prefix(&format!("{name},"))).unwrap_or("").to_string())
}

fn wait_state(env: &Env, name: &str, want: &str, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let s = state(env, name)?;
        if s == want {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{name} is {s:?}, not {want} after {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What a deleted container could leave behind.
fn leftovers(env: &Env, name: &str, host_veth: &str) -> Vec<String> {
    let mut left = Vec::new();
    if env.run.join("lxc").join(name).exists() {
        left.push("its LXC directory".to_string());
    }
    if env.dir.join("storage/volumes").join(name).exists() {
        left.push("its volume".into());
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if mounts.lines().any(|l| l.contains(&format!("/volumes/{name}/"))) {
        left.push("a mount of its volume".into());
    }
    for cg in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
        if cg.path().join(format!("lxc.payload.{name}")).exists() {
            left.push(format!("cgroup {}", cg.path().join(format!("lxc.payload.{name}")).display()));
        }
    }
    if Path::new("/sys/class/net").join(host_veth).exists() {
        left.push(format!("veth {host_veth}"));
    }
    left
}

#[test]
#[ignore = "runs LXC containers as root: run through tests/run"]
fn oci_containers_end_to_end() -> Result<()> {
    let tmp = scratch()?;
    let bin = vmm_binary()?.parent().context("binary dir")?.to_path_buf();
    let mut env = Env::in_scratch(tmp.path(), bin)?;
    let dir = env.dir.clone();
    env.demo_image()?;
    env.start_daemon()?;
    let mut failures: Vec<String> = Vec::new();
    let mut check = |name: &str, r: Result<()>| {
        eprintln!("{} {name}", if r.is_ok() { "ok" } else { "FAIL" });
        if let Err(e) = r {
            failures.push(format!("{name}: {e:#}"));
        }
    };

    // The demo image natively: its web server reached over the bridge.
    let launched = Instant::now();
    let web = env.ok(&["launch", IMAGE, "web", "-c", "environment.FOO=bar"]);
    eprintln!("launch web: {:?}", launched.elapsed());
    check("launch without --vm makes a running container", web.map(drop));
    check(
        "list shows a container with an address, and its page is served over the bridge",
        (|| {
            let out = env.ok(&["list", "--format", "csv", "-c", "nst"])?;
            ensure!(out.lines().any(|l| l == "web,RUNNING,CONTAINER"), "{out}");
            let ip = env.ipv4("web")?;
            let page = http_get(&ip, 80)?;
            ensure!(page.contains("Hello from web"), "{page}");
            Ok(())
        })(),
    );
    check(
        "exec: exit codes, env, stdin, unprivileged root",
        (|| {
            let (c, out, _) = env.skiff(&["exec", "web", "--", "sh", "-c", "echo $FOO; exit 3"])?;
            ensure!(c == 3 && out.trim() == "bar", "{c} {out:?}");
            let (c, out, _) = env.skiff_in(&["exec", "web", "--", "cat"], Some(b"through stdin"))?;
            ensure!(c == 0 && out == "through stdin", "{c} {out:?}");
            let map = env.ok(&["exec", "web", "--", "cat", "/proc/self/uid_map"])?;
            ensure!(map.split_whitespace().collect::<Vec<_>>() == ["0", "1000000", "65536"], "uid_map: {map}");
            let (c, _, e) = env.skiff(&["exec", "web", "--", "/no/such/program"])?;
            ensure!(c == 127 || e.contains("No such file"), "{c} {e}");
            Ok(())
        })(),
    );
    check(
        "files pushed in get the mapped owners on the host",
        (|| {
            let f = tmp.path().join("pushed");
            std::fs::write(&f, b"pushed in\n")?;
            env.ok(&["file", "push", f.to_str().unwrap(), "web/root/pushed"])?;
            let inside = env.ok(&["exec", "web", "--", "stat", "-c", "%u %s", "/root/pushed"])?;
            ensure!(inside.trim() == "0 10", "inside: {inside}");
            let host = dir.join("storage/volumes/web/state/root/pushed");
            let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&host)?);
            ensure!(uid == 1_000_000, "host owner of {}: {uid}", host.display());
            let back = tmp.path().join("pulled");
            env.ok(&["file", "pull", "web/root/pushed", back.to_str().unwrap()])?;
            ensure!(std::fs::read(&back)? == b"pushed in\n", "pulled content differs");
            Ok(())
        })(),
    );
    check(
        "limits change live in the container's cgroup",
        (|| {
            env.ok(&["config", "set", "web", "limits.memory=300MiB", "limits.processes=64", "limits.cpu=1"])?;
            let v1 = Path::new("/sys/fs/cgroup/memory").is_dir();
            let (mem_key, want) = if v1 { ("memory.limit_in_bytes", "314572800") } else { ("memory.max", "314572800") };
            ensure!(cgroup(&env.run, "web", mem_key)? == want, "memory");
            ensure!(cgroup(&env.run, "web", "pids.max")? == "64", "pids");
            Ok(())
        })(),
    );
    check(
        "a host directory added as a disk appears live, and goes when removed",
        (|| {
            let share = tmp.path().join("share");
            std::fs::create_dir_all(&share)?;
            std::fs::write(share.join("f"), b"from the host")?;
            let src = format!("source={}", share.display());
            env.ok(&["config", "device", "add", "web", "data", "disk", &src, "path=/mnt/data"])?;
            let got = env.ok(&["exec", "web", "--", "cat", "/mnt/data/f"])?;
            ensure!(got == "from the host", "{got:?}");
            env.ok(&["config", "device", "remove", "web", "data"])?;
            let (c, _, _) = env.skiff(&["exec", "web", "--", "test", "-e", "/mnt/data/f"])?;
            ensure!(c != 0, "still there after removal");
            Ok(())
        })(),
    );
    check(
        "bad input: a name in use, a missing disk source, more memory than the host has",
        (|| {
            let (c, _, e) = env.skiff(&["launch", IMAGE, "web"])?;
            ensure!(c != 0 && e.contains("already exists"), "name in use: {c} {e}");
            let (c, _, e) =
                env.skiff(&["config", "device", "add", "web", "gone", "disk", "source=/no/such/dir", "path=/gone"])?;
            ensure!(c != 0 && e.contains("/no/such/dir"), "missing source: {c} {e}");
            let (c, _, e) = env.skiff(&["launch", IMAGE, "huge", "-c", "limits.memory=64TiB"])?;
            ensure!(c != 0 && e.contains("limits.memory"), "huge memory: {c} {e}");
            let out = env.ok(&["list", "--format", "csv", "-c", "n"])?;
            ensure!(out.trim() == "web", "refused launches left instances: {out}");
            Ok(())
        })(),
    );
    check(
        "snapshot and restore",
        (|| {
            env.ok(&["exec", "web", "--", "sh", "-c", "echo before > /root/state"])?;
            env.ok(&["snapshot", "create", "web", "s1"])?;
            env.ok(&["exec", "web", "--", "sh", "-c", "echo after > /root/state"])?;
            env.ok(&["stop", "web"])?;
            env.ok(&["snapshot", "restore", "web", "s1"])?;
            env.ok(&["start", "web"])?;
            let got = env.ok(&["exec", "web", "--", "cat", "/root/state"])?;
            ensure!(got.trim() == "before", "{got:?}");
            Ok(())
        })(),
    );
    check(
        "stop --timeout 2 ends an entrypoint that ignores SIGTERM; boot.autorestart brings a killed one back",
        (|| {
            let ep = "oci.entrypoint=sh -c 'trap \"\" TERM; echo started; while :; do sleep 1; done'";
            env.ok(&["launch", IMAGE, "stubborn", "-c", ep, "-c", "boot.autorestart=true"])?;
            let ps = env.ok(&["exec", "stubborn", "--", "ps", "-o", "pid,args"])?;
            let pid = ps
                .lines()
                .find(|l| l.contains("trap") && !l.contains("ps -o"))
                .and_then(|l| l.split_whitespace().next())
                .context(format!("no entrypoint in {ps}"))?
                .to_string();
            env.ok(&["exec", "stubborn", "--", "kill", "-9", &pid])?;
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let ps = env.skiff(&["exec", "stubborn", "--", "ps", "-o", "pid,args"])?.1;
                let again = ps.lines().any(|l| l.contains("trap") && !l.starts_with(&format!("{pid} ")));
                if again {
                    break;
                }
                ensure!(Instant::now() < deadline, "not restarted: {ps}");
                std::thread::sleep(Duration::from_millis(300));
            }
            ensure!(state(&env, "stubborn")? == "RUNNING", "not running after the restart");
            let t = Instant::now();
            env.ok(&["stop", "stubborn", "--timeout", "2"])?;
            let took = t.elapsed();
            ensure!(state(&env, "stubborn")? == "STOPPED", "not stopped");
            ensure!(took < Duration::from_secs(12), "stop took {took:?}");
            let veth_name = veth(&env, "stubborn")?;
            env.ok(&["delete", "stubborn"])?;
            let left = leftovers(&env, "stubborn", &veth_name);
            ensure!(left.is_empty(), "delete left: {left:?}");
            Ok(())
        })(),
    );
    check(
        "an entrypoint that ends stops its container, with its exit code on record",
        (|| {
            env.ok(&["launch", IMAGE, "oneshot", "-c", "oci.entrypoint=sh -c 'sleep 1; exit 4'"])?;
            wait_state(&env, "oneshot", "STOPPED", Duration::from_secs(30))?;
            env.ok(&["delete", "oneshot"])?;
            Ok(())
        })(),
    );
    check(
        "skiffd killed and restarted: the container keeps running and is adopted",
        (|| {
            env.kill_daemon();
            env.start_daemon()?;
            ensure!(state(&env, "web")? == "RUNNING", "after restart: {}", state(&env, "web")?);
            let out = env.ok(&["exec", "web", "--", "echo", "adopted"])?;
            ensure!(out.trim() == "adopted", "{out}");
            http_get(&env.ipv4("web")?, 80)?;
            Ok(())
        })(),
    );

    // Real clients nobody here wrote: Debian's lxc and pylxd.
    check(
        "lxc client drives the container",
        env.ok(&["launch", IMAGE, "other"]).and_then(|_| skiff_tests::daemon_env::lxc_client(&dir, "web", "other")),
    );
    check("pylxd drives the container", skiff_tests::daemon_env::pylxd(&dir, "web"));
    check(
        "delete leaves no cgroup, mount, veth, LXC directory or volume",
        (|| {
            let veth_name = veth(&env, "web")?;
            env.ok(&["delete", "--force", "web"])?;
            let left = leftovers(&env, "web", &veth_name);
            ensure!(left.is_empty(), "delete left: {left:?}");
            let socks: Vec<PathBuf> = std::fs::read_dir(env.run.join("ct"))?.flatten().map(|e| e.path()).collect();
            ensure!(socks.is_empty(), "agent socket directories left: {socks:?}");
            Ok(())
        })(),
    );

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
