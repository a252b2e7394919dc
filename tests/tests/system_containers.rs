//! Issue 13's system containers, on the host through LXC: the Debian 12
//! image that `tests/images/build-debian-system` debootstraps (cached per
//! machine) is imported with `skiff image import`, launched without
//! `--vm`, boots systemd, and is driven through the agent beside it:
//! exec, files, DHCP; stopped through SIGRTMIN+3, started again, deleted
//! without a trace. Broken tarballs are refused and leave nothing.
//!
//! Each check runs even when an earlier one failed; the test fails at the
//! end listing them, with skiffd's log.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use skiff_tests::daemon_env::{bin_dir, run, Env};
use skiff_tests::scratch;

/// How long systemd may take to finish booting.
const BOOT_LIMIT_SECS: u32 = 120;

/// The cached Debian 12 system image (built on first use).
fn debian_image() -> Result<PathBuf> {
    let t = Instant::now();
    let out = run(&mut Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/images/build-debian-system")))?;
    eprintln!("system image ready in {:.1} s", t.elapsed().as_secs_f64());
    Ok(PathBuf::from(out.trim()))
}

/// `systemctl is-system-running --wait` (time-limited): running or degraded.
fn systemd_up(env: &Env, name: &str) -> Result<()> {
    let t = Instant::now();
    // Right after a start: the driver waited for systemd's bus.
    let script = format!("timeout {BOOT_LIMIT_SECS} systemctl is-system-running --wait 2>&1; true");
    let (_, state) = env.sh(name, &script)?;
    let state = state.trim();
    eprintln!("{name}: systemctl is-system-running answered {state:?} after {:.1} s", t.elapsed().as_secs_f64());
    if state == "degraded" {
        let (_, failed) = env.sh(name, "systemctl --failed --no-legend --no-pager")?;
        eprintln!("{name}: failed units:\n{failed}");
    }
    ensure!(state == "running" || state == "degraded", "systemd is {state:?}");
    Ok(())
}

/// Broken tarballs: a clear error, nothing stored, nothing left.
fn refuses_broken_tarballs(env: &Env, dir: &Path) -> Result<()> {
    let garbage = dir.join("garbage.tar.xz");
    std::fs::write(&garbage, b"this is not a tarball\n".repeat(50))?;
    let err = env.fails(&["image", "import", garbage.to_str().context("path")?, "--alias", "bad"])?;
    ensure!(err.contains("not an image tarball"), "garbage: {err}");

    let half = dir.join("half");
    std::fs::create_dir_all(&half)?;
    std::fs::write(half.join("metadata.yaml"), "architecture: x86_64\ncreation_date: 1\n")?;
    let no_rootfs = dir.join("no-rootfs.tar.xz");
    run(Command::new("tar").arg("-C").arg(&half).arg("-cJf").arg(&no_rootfs).arg("metadata.yaml"))?;
    let err = env.fails(&["image", "import", no_rootfs.to_str().context("path")?])?;
    ensure!(err.contains("no rootfs/"), "no rootfs: {err}");

    let escape = dir.join("escape.tar");
    run(Command::new("tar").arg("-C").arg(&half).args(["-cf"]).arg(&escape).args([
        "--transform",
        "s,^metadata.yaml,../../escaped,",
        "-P",
        "metadata.yaml",
    ]))?;
    let err = env.fails(&["image", "import", escape.to_str().context("path")?])?;
    ensure!(err.contains("escapes the rootfs"), "escaping path: {err}");

    ensure!(env.images()?.is_empty(), "a broken tarball left an image");
    ensure!(env.fails(&["image", "info", "bad"]).is_ok(), "the alias of a refused image exists");
    env.store_tmp_empty()
}

/// skiffd killed and started again: the running system container is
/// adopted (its agent is still there), and a reboot is still followed.
fn adopted(env: &mut Env) -> Result<()> {
    env.kill_daemon();
    env.start_daemon()?;
    let list = env.ok(&["list", "--format", "csv"])?;
    ensure!(list.lines().any(|l| l.starts_with("sys1,RUNNING")), "after the restart: {list}");
    let (code, host) = env.sh("sys1", "hostname")?;
    ensure!(code == 0 && host.trim() == "sys1", "exec after the restart: {code} {host:?}");
    Ok(())
}

/// `systemctl reboot` in the container: LXC boots it again on the same
/// volume, the driver starts the agent in the new boot; it stays running.
fn reboot(env: &Env) -> Result<()> {
    ensure!(env.sh("sys1", "touch /run/this-boot")?.0 == 0, "marking this boot");
    let t = Instant::now();
    // The exec may end with the boot it runs in.
    let _ = env.skiff(&["exec", "sys1", "--", "systemctl", "reboot"])?;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok((0, out)) = env.sh("sys1", "test -e /run/this-boot || echo new-boot") {
            if out.trim() == "new-boot" {
                break;
            }
        }
        ensure!(Instant::now() < deadline, "no new boot answered within 90 s");
        std::thread::sleep(Duration::from_millis(300));
    }
    eprintln!("reboot: the new boot's agent answered after {:.1} s", t.elapsed().as_secs_f64());
    systemd_up(env, "sys1")?;
    let (_, f) = env.sh("sys1", "cat /root/hello.txt")?;
    ensure!(f == "hello from the host\n", "the pushed file is gone after the reboot: {f:?}");
    let list = env.ok(&["list", "--format", "csv"])?;
    ensure!(list.lines().any(|l| l.starts_with("sys1,RUNNING")), "after the reboot: {list}");
    env.ipv4("sys1").map(|a| eprintln!("sys1 has {a} after the reboot"))
}

/// A system image without `/sbin/init` imports, but is refused at launch
/// with a clear error, leaving no instance.
fn refuses_an_image_without_init(env: &Env, dir: &Path) -> Result<()> {
    let img = dir.join("noinit");
    std::fs::create_dir_all(img.join("rootfs/etc"))?;
    std::fs::write(img.join("rootfs/etc/os-release"), "ID=none\n")?;
    std::fs::write(img.join("metadata.yaml"), "architecture: x86_64\ncreation_date: 1\n")?;
    let tarball = dir.join("noinit.tar.gz");
    run(Command::new("tar").arg("-C").arg(&img).arg("-czf").arg(&tarball).args(["metadata.yaml", "rootfs"]))?;
    env.ok(&["image", "import", tarball.to_str().context("path")?, "--alias", "noinit"])?;
    let err = env.fails(&["launch", "noinit", "bad1"])?;
    ensure!(err.contains("no executable /sbin/init"), "{err}");
    ensure!(!env.ok(&["list", "--format", "csv"])?.contains("bad1"), "bad1 was left");
    ensure!(!env.run.join("lxc/bad1").exists(), "an LXC directory was left");
    env.ok(&["image", "delete", "noinit"])?;
    Ok(())
}

/// What a container leaves on the host while (or after) it runs.
fn traces(env: &Env, name: &str, veth: &str) -> Vec<String> {
    let mut left = Vec::new();
    if env.run.join("lxc").join(name).exists() {
        left.push(format!("LXC directory {}", env.run.join("lxc").join(name).display()));
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let scratch = env.dir.parent().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    left.extend(mounts.lines().filter(|l| l.contains(&scratch)).map(|l| format!("mount {l}")));
    for c in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
        for n in [format!("lxc.payload.{name}"), format!("lxc.monitor.{name}")] {
            if c.path().join(&n).exists() {
                left.push(format!("cgroup {}", c.path().join(n).display()));
            }
        }
    }
    if !veth.is_empty() && Path::new("/sys/class/net").join(veth).exists() {
        left.push(format!("veth {veth}"));
    }
    left
}

#[test]
#[ignore = "needs root, LXC and debootstrap: tests/run runs it on the host"]
fn debian_system_container() -> Result<()> {
    let image = debian_image()?;
    let tmp = scratch()?;
    // The container's root (an unprivileged id) walks to its rootfs.
    std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let mut env = Env::in_scratch(tmp.path(), bin_dir()?)?;
    let dir = env.dir.clone();
    env.start_daemon()?;
    let mut failures: Vec<String> = Vec::new();
    let mut check = |name: &str, r: Result<()>| {
        match &r {
            Ok(()) => eprintln!("ok: {name}"),
            Err(e) => eprintln!("FAILED: {name}: {e:#}"),
        }
        if let Err(e) = r {
            failures.push(format!("{name}: {e:#}"));
        }
    };
    check("broken tarballs are refused", refuses_broken_tarballs(&env, tmp.path()));
    check("an image without /sbin/init is refused at launch", refuses_an_image_without_init(&env, tmp.path()));

    let t = Instant::now();
    let imported = env.ok(&["image", "import", image.to_str().context("path")?, "--alias", "deb12"]);
    eprintln!("import took {:.1} s", t.elapsed().as_secs_f64());
    let fingerprint = run(Command::new("sha256sum").arg(&image))?.split_whitespace().next().unwrap_or("").to_string();
    check(
        "import",
        (|| {
            let out = imported?;
            ensure!(out.contains(&fingerprint), "no fingerprint {fingerprint} in {out:?}");
            let list = env.images()?;
            let img = list.iter().find(|i| i["fingerprint"] == fingerprint.as_str()).context("not listed")?;
            ensure!(img["type"] == "container", "type {}", img["type"]);
            ensure!(img["properties"]["os"] == "debian", "properties {}", img["properties"]);
            ensure!(img["aliases"][0]["name"] == "deb12", "aliases {}", img["aliases"]);
            let again = env.fails(&["image", "import", image.to_str().context("path")?])?;
            ensure!(again.contains("already exists"), "a second import: {again}");
            env.store_tmp_empty()
        })(),
    );
    check(
        "--vm of a system image is refused",
        (|| {
            let err = env.fails(&["launch", "--vm", "deb12", "vm1"])?;
            ensure!(err.contains("system container image"), "{err}");
            ensure!(!env.ok(&["list", "--format", "csv"])?.contains("vm1"), "vm1 was made");
            Ok(())
        })(),
    );

    let t = Instant::now();
    let launched = env.ok(&["launch", "deb12", "sys1"]);
    eprintln!("launch took {:.1} s", t.elapsed().as_secs_f64());
    if let Err(e) = launched {
        failures.push(format!("launch: {e:#}"));
        bail!("{}\n--- skiffd log ---\n{}", failures.join("\n"), env.daemon_log());
    }
    let info: Value = serde_json::from_str(&env.ok(&["list", "--format", "json"])?)?;
    let me = info.as_array().into_iter().flatten().find(|i| i["name"] == "sys1").cloned().unwrap_or_default();
    let veth = me["config"]["volatile.eth0.host_name"].as_str().unwrap_or("").to_string();
    check("systemd boots", systemd_up(&env, "sys1"));
    check(
        "it is a system container",
        (|| {
            ensure!(me["type"] == "container", "type {}", me["type"]);
            ensure!(me["config"]["image.os"] == "debian", "config {}", me["config"]);
            let (_, comm) = env.sh("sys1", "cat /proc/1/comm")?;
            ensure!(comm.trim() == "systemd", "PID 1 is {comm:?}");
            let (_, host) = env.sh("sys1", "hostname")?;
            ensure!(host.trim() == "sys1", "hostname {host:?}");
            let (_, uid_map) = env.sh("sys1", "cat /proc/self/uid_map")?;
            ensure!(uid_map.split_whitespace().nth(1) == Some("1000000"), "not id-mapped: {uid_map:?}");
            Ok(())
        })(),
    );
    check(
        "exec exit codes",
        (|| {
            ensure!(env.sh("sys1", "exit 7")?.0 == 7, "exit 7");
            ensure!(env.sh("sys1", "true")?.0 == 0, "true");
            let (code, _, _) = env.skiff(&["exec", "sys1", "--", "/no/such/program"])?;
            ensure!(code != 0, "a missing program exited 0");
            Ok(())
        })(),
    );
    check(
        "file push and pull",
        (|| {
            let src = tmp.path().join("hello.txt");
            std::fs::write(&src, "hello from the host\n")?;
            env.ok(&["file", "push", src.to_str().context("path")?, "sys1/root/hello.txt"])?;
            let (_, owner) = env.sh("sys1", "stat -c %u:%g /root/hello.txt")?;
            ensure!(owner.trim() == "0:0", "owner {owner:?}");
            let back = tmp.path().join("back.txt");
            env.ok(&["file", "pull", "sys1/root/hello.txt", back.to_str().context("path")?])?;
            ensure!(std::fs::read_to_string(&back)? == "hello from the host\n", "pulled back something else");
            Ok(())
        })(),
    );
    check("an IPv4 address from DHCP", env.ipv4("sys1").map(|a| eprintln!("sys1 has {a}")));

    let stop_clean = |env: &Env| -> Result<()> {
        let t = Instant::now();
        env.ok(&["stop", "sys1", "--timeout", "30"])?;
        let took = t.elapsed();
        eprintln!("stop took {:.1} s", took.as_secs_f64());
        ensure!(took < Duration::from_secs(25), "stop took {took:?}: not a clean shutdown");
        let console = std::fs::read_to_string(env.dir.join("instances/sys1/console.log")).unwrap_or_default();
        ensure!(
            console.contains("Halting system") || console.contains("systemd-halt"),
            "systemd did not halt (SIGRTMIN+3): {}",
            console.lines().rev().take(8).collect::<Vec<_>>().join(" | ")
        );
        let left = traces(env, "sys1", &veth);
        ensure!(left.iter().all(|l| l.starts_with("LXC directory")), "a stopped container left {left:?}");
        Ok(())
    };
    check("stop through SIGRTMIN+3", stop_clean(&env));
    check(
        "start again",
        (|| {
            let t = Instant::now();
            env.ok(&["start", "sys1"])?;
            eprintln!("start took {:.1} s", t.elapsed().as_secs_f64());
            systemd_up(&env, "sys1")?;
            let (_, f) = env.sh("sys1", "cat /root/hello.txt")?;
            ensure!(f == "hello from the host\n", "the pushed file is gone after a restart: {f:?}");
            Ok(())
        })(),
    );
    check("skiffd restarted: the container is adopted", adopted(&mut env));
    check("reboot from inside", reboot(&env));
    check(
        "delete leaves nothing",
        (|| {
            env.ok(&["delete", "--force", "sys1"])?;
            let left = traces(&env, "sys1", &veth);
            ensure!(left.is_empty(), "left behind: {left:?}");
            env.ok(&["image", "delete", "deb12"])?;
            ensure!(env.images()?.is_empty(), "the image is still listed");
            let sys = dir.join("oci/system");
            let n = std::fs::read_dir(&sys).map(|d| d.count()).unwrap_or(0);
            ensure!(n == 0, "{} still holds {n} entries", sys.display());
            Ok(())
        })(),
    );
    if !failures.is_empty() {
        bail!("{} check(s) failed:\n{}\n--- skiffd log ---\n{}", failures.len(), failures.join("\n"), env.daemon_log());
    }
    Ok(())
}
