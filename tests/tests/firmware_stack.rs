//! Issue 15 through the stack: full OS VMs from a disk image through
//! skiffd and the `skiff` CLI. The Debian 12 disk of
//! `tests/images/build-debian-disk` (`SKIFF_DEBIAN_DISK`) converted to
//! qcow2 is imported (`skiff image import`), launched twice with
//! `--vm` (each a qcow2 overlay over the one base; the second with
//! cloud-init user data), driven through the agent inside (exec, files)
//! and its serial console, stopped through the ACPI power button,
//! rebooted from inside (booted again through the firmware), snapshotted
//! and restored, skiffd killed in the middle of a launch, and deleted
//! without a trace; bad imports are refused and leave nothing. Each Debian
//! boot costs 30–75 s in the box: three boots, many checks each.
//!
//! Each check runs even when an earlier one failed; the test fails at the
//! end listing them, with skiffd's log.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use skiff_tests::daemon_env::{bin_dir, run, Env};
use skiff_tests::scratch;
use skiff_tests::watchdog::Watchdog;

/// How long a step may take before the watchdog reports and ends it.
const STEP: Duration = Duration::from_secs(300);
/// How long a launch may take: past skiffd's own limit for a full OS VM
/// (its boot timeout plus the launch margin), so that its error is seen.
const LAUNCH: Duration = Duration::from_secs(540);

fn sha256(path: &Path) -> Result<String> {
    Ok(run(Command::new("sha256sum").arg(path))?.split_whitespace().next().unwrap_or("").to_string())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("path is not UTF-8")
}

fn instance(env: &Env, name: &str) -> Result<Value> {
    let v: Value = serde_json::from_str(&env.ok(&["list", "--format", "json"])?)?;
    v.as_array().into_iter().flatten().find(|i| i["name"] == name).cloned().context("not listed")
}

/// Bad imports: a clear error each, nothing stored, nothing left.
fn refuses_bad_imports(env: &Env, dir: &Path) -> Result<()> {
    let backing = dir.join("backing.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", "/etc/hostname"])
        .arg(&backing)
        .arg("64M"))?;
    let err = env.fails(&["image", "import", path_str(&backing)?, "--alias", "bad"])?;
    ensure!(err.contains("backing file") && err.contains("/etc/hostname"), "a qcow2 with a backing file: {err}");

    let corrupt = dir.join("corrupt.qcow2");
    let mut bytes = b"QFI\xfb".to_vec();
    bytes.extend([0xffu8; 4092]);
    std::fs::write(&corrupt, &bytes)?;
    let err = env.fails(&["image", "import", path_str(&corrupt)?, "--alias", "bad"])?;
    ensure!(err.contains("not a valid qcow2 disk image"), "a corrupt qcow2 header: {err}");

    let raw = dir.join("plain.img");
    std::fs::write(&raw, vec![0u8; 1 << 20])?;
    let err = env.fails(&["image", "import", path_str(&raw)?, "--alias", "bad"])?;
    ensure!(err.contains("--format raw"), "a raw disk without --format: {err}");

    // Not an alias: a registry reference to pull (whose pull fails here,
    // with or without a network).
    let err = env.fails(&["launch", "--vm", "no-such-image", "bad1"])?;
    ensure!(err.contains("no-such-image"), "an unknown alias: {err}");
    ensure!(!env.ok(&["list", "--format", "csv"])?.contains("bad1"), "bad1 was left");
    ensure!(env.images()?.is_empty(), "a refused import left an image: {:?}", env.images()?);
    env.store_tmp_empty()
}

/// `nproc` and `MemTotal` as asked.
fn size_is(env: &Env, name: &str, cpus: usize, memory_mib: u64) -> Result<()> {
    let (_, n) = env.sh(name, "nproc")?;
    ensure!(n.trim() == cpus.to_string(), "{name}: nproc {n:?}, asked for {cpus}");
    let (_, m) = env.sh(name, "grep MemTotal /proc/meminfo")?;
    let kib: u64 = m.split_whitespace().nth(1).context("MemTotal")?.parse()?;
    let asked = memory_mib * 1024;
    ensure!(kib <= asked && kib > asked * 80 / 100, "{name}: MemTotal {kib} kB for {asked} kB asked");
    Ok(())
}

/// The guest booted through UEFI with Skiff's ACPI tables.
fn firmware_booted(env: &Env, name: &str) -> Result<()> {
    let (code, _) = env.sh(name, "test -d /sys/firmware/efi && test -e /sys/firmware/acpi/tables/MCFG")?;
    ensure!(code == 0, "{name}: no /sys/firmware/efi or no MCFG table");
    let (_, host) = env.sh(name, "timeout 120 systemctl is-system-running --wait 2>/dev/null; true")?;
    eprintln!("{name}: systemd is {:?}", host.trim());
    Ok(())
}

/// Waits until exec answers in a new boot (`/run/this-boot` gone).
fn wait_new_boot(env: &Env, name: &str, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        // Quietly: the agent is away while the guest reboots.
        if let Ok((0, out, _)) = env.skiff(&["exec", name, "--", "sh", "-c", "test -e /run/this-boot || echo new-boot"])
        {
            if out.trim() == "new-boot" {
                return Ok(());
            }
        }
        ensure!(Instant::now() < deadline, "{name}: no new boot answered within {limit:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `skiff console NAME` (on a pseudo-terminal, through `script`) is the
/// guest's serial line: its getty answers a newline with a login prompt
/// and a user name with a password prompt; Ctrl+a q detaches.
fn serial_console(env: &Env, name: &str) -> Result<()> {
    let mut child = env.skiff_on_pty(&format!("console {name}"), 120)?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let text = || String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    let wait_for =
        |stdin: &mut std::process::ChildStdin, wants: &[&str], nudge: &[u8], limit: Duration| -> Result<()> {
            let t = Instant::now();
            while !wants.iter().any(|w| text().contains(w)) {
                ensure!(t.elapsed() < limit, "no {wants:?} within {limit:?}; the console showed {:?}", text());
                stdin.write_all(nudge).context("skiff console ended")?;
                std::thread::sleep(Duration::from_secs(2));
            }
            Ok(())
        };
    let talked = (|| {
        wait_for(&mut stdin, &["login:"], b"\r", Duration::from_secs(60))?;
        seen.lock().unwrap().clear();
        wait_for(&mut stdin, &["Password:", "# "], b"root\r", Duration::from_secs(30))?;
        stdin.write_all(b"\x01q").context("skiff console ended before Ctrl+a q")
    })();
    drop(stdin);
    let out = child.wait_with_output()?;
    let _ = reader.join();
    let stderr = String::from_utf8_lossy(&out.stderr);
    talked.with_context(|| format!("skiff console ({}) said on stderr: {stderr}", out.status))?;
    ensure!(out.status.success(), "skiff console exited {} after Ctrl+a q: {stderr}", out.status);
    eprintln!("{name}: the serial console answered with a login and a password prompt");
    Ok(())
}

fn console(env: &Env, name: &str) -> String {
    std::fs::read_to_string(env.dir.join("instances").join(name).join("console.log")).unwrap_or_default()
}

/// The base of an imported disk image in the store.
fn base_path(env: &Env, fingerprint: &str) -> Result<PathBuf> {
    let p = env.dir.join("oci/system").join(fingerprint).join("disk");
    ensure!(p.is_file(), "no base at {}", p.display());
    Ok(p)
}

fn skiff_vmm_processes() -> usize {
    skiff_tests::daemon_env::processes("skiff-vmm")
}

/// skiffd SIGKILLed two seconds into `launch --vm` of vm3 (while it makes
/// the overlay or boots it) and started again: vm1 is adopted and answers,
/// vm3 is either gone without a trace or a consistent instance that
/// `delete --force` removes whole.
fn killed_mid_launch(env: &mut Env) -> Result<()> {
    let mut launch = Command::new(env.bin.join("skiff"))
        .args(["launch", "--vm", "deb12vm", "vm3"])
        .env("SKIFF_DIR", &env.dir)
        .env("HOME", &env.home)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(2));
    env.kill_daemon();
    let _ = launch.wait();
    env.start_daemon()?;
    let list = env.ok(&["list", "--format", "csv"])?;
    eprintln!("after skiffd was killed mid-launch: {}", list.lines().collect::<Vec<_>>().join(" | "));
    ensure!(list.lines().any(|l| l.starts_with("vm1,RUNNING")), "vm1 was not adopted: {list}");
    ensure!(env.sh("vm1", "cat /root/only-vm1")?.1.trim() == "mine", "vm1 does not answer after the restart");
    if list.lines().any(|l| l.starts_with("vm3,")) {
        env.ok(&["delete", "--force", "vm3"])?;
    }
    ensure!(!env.dir.join("instances/vm3").exists(), "vm3's directory is left");
    ensure!(skiff_vmm_processes() == 1, "{} skiff-vmm processes for vm1 alone", skiff_vmm_processes());
    Ok(())
}

#[test]
#[ignore = "boots Debian disks through firmware under skiffd: needs hardware KVM (or the box); run through tests/run"]
fn full_os_vms_through_skiffd() -> Result<()> {
    let disk = std::env::var_os("SKIFF_DEBIAN_DISK")
        .map(PathBuf::from)
        .context("SKIFF_DEBIAN_DISK is not set (tests/run builds it with tests/images/build-debian-disk)")?;
    let tmp = scratch()?;
    let qcow2 = tmp.path().join("debian12.qcow2");
    let t = Instant::now();
    run(Command::new("qemu-img").args(["convert", "-O", "qcow2"]).arg(&disk).arg(&qcow2))?;
    eprintln!("qemu-img convert took {:.1} s", t.elapsed().as_secs_f64());
    let mut env = Env::in_scratch(tmp.path(), bin_dir()?)?;
    env.start_daemon()?;
    // A step past its limit gets the state of everything printed, and
    // the test's processes killed so that it fails rather than hangs.
    let dog = Watchdog::new(&env.dir, &env.run, &env.log);
    let mut failures: Vec<String> = Vec::new();
    let mut check = |name: &str, r: Result<()>| {
        dog.done();
        match &r {
            Ok(()) => eprintln!("ok: {name}"),
            Err(e) => eprintln!("FAILED: {name}: {e:#}"),
        }
        if let Err(e) = r {
            failures.push(format!("{name}: {e:#}"));
        }
    };
    dog.step("bad imports", STEP);
    check("bad imports are refused", refuses_bad_imports(&env, tmp.path()));

    let fingerprint = sha256(&qcow2)?;
    dog.step("import", STEP);
    let imported = env.ok(&["image", "import", path_str(&qcow2)?, "--alias", "deb12vm"]);
    check(
        "import",
        (|| {
            let out = imported?;
            ensure!(out.contains(&fingerprint), "no fingerprint {fingerprint} in {out:?}");
            let list = env.images()?;
            let img = list.iter().find(|i| i["fingerprint"] == fingerprint.as_str()).context("not listed")?;
            ensure!(img["type"] == "virtual-machine", "type {}", img["type"]);
            ensure!(img["properties"]["format"] == "qcow2", "properties {}", img["properties"]);
            ensure!(sha256(&base_path(&env, &fingerprint)?)? == fingerprint, "the stored base differs");
            let again = env.fails(&["image", "import", path_str(&qcow2)?])?;
            ensure!(again.contains("already exists"), "a second import: {again}");
            let err = env.fails(&["launch", "deb12vm", "ct1"])?;
            ensure!(err.contains("--vm"), "a container of a disk image: {err}");
            env.store_tmp_empty()
        })(),
    );

    let t = Instant::now();
    dog.step("launch vm1", LAUNCH);
    let launched = env.ok(&["launch", "--vm", "deb12vm", "vm1", "-c", "limits.cpu=2", "-c", "limits.memory=1GiB"]);
    eprintln!("launch vm1 took {:.1} s", t.elapsed().as_secs_f64());
    if let Err(e) = launched {
        failures.push(format!("launch vm1: {e:#}"));
        bail!("{}\n--- skiffd log ---\n{}", failures.join("\n"), env.daemon_log());
    }
    dog.step("vm1 booted", STEP);
    check("vm1 booted through the firmware", firmware_booted(&env, "vm1"));
    dog.step("vm1 limits", STEP);
    check("vm1 has its limits", size_is(&env, "vm1", 2, 1024));
    dog.step("vm1 serial console", STEP);
    check("vm1's serial console is interactive", serial_console(&env, "vm1"));
    dog.step("vm1 files", STEP);
    check(
        "vm1: files and an address",
        (|| {
            ensure!(env.sh("vm1", "echo mine > /root/only-vm1 && sync")?.0 == 0, "writing in vm1");
            let src = tmp.path().join("hello.txt");
            std::fs::write(&src, "hello from the host\n")?;
            env.ok(&["file", "push", path_str(&src)?, "vm1/root/hello.txt"])?;
            let back = tmp.path().join("back.txt");
            env.ok(&["file", "pull", "vm1/root/hello.txt", path_str(&back)?])?;
            ensure!(std::fs::read_to_string(&back)? == "hello from the host\n", "pulled back something else");
            let (_, host) = env.sh("vm1", "hostname")?;
            eprintln!("vm1: hostname {:?}", host.trim());
            let ip = env.ipv4("vm1")?;
            eprintln!("vm1 has {ip} (the guest's own DHCP client)");
            Ok(())
        })(),
    );

    let t = Instant::now();
    // vm2 gets Incus's cloud-init.user-data: a NoCloud seed disk.
    dog.step("launch vm2", LAUNCH);
    let user_data = "#cloud-config\nwrite_files:\n  - path: /root/from-cloud-init\n    content: seeded by skiff\n";
    let launched2 = env.ok(&[
        "launch",
        "--vm",
        "deb12vm",
        "vm2",
        "-c",
        "limits.memory=768MiB",
        "-c",
        &format!("cloud-init.user-data={user_data}"),
    ]);
    eprintln!("launch vm2 took {:.1} s", t.elapsed().as_secs_f64());
    dog.step("vm2 checks", STEP);
    check(
        "vm2: its own disk over the same base",
        (|| {
            launched2?;
            size_is(&env, "vm2", 1, 768)?;
            let (_, out) = env.sh("vm2", "cat /root/only-vm1 2>&1 || echo absent")?;
            ensure!(out.contains("absent"), "vm1's file is in vm2: {out:?}");
            let (_, seeded) =
                env.sh("vm2", "timeout 120 cloud-init status --wait >/dev/null; cat /root/from-cloud-init; hostname")?;
            ensure!(seeded.contains("seeded by skiff"), "cloud-init did not apply the user data: {seeded:?}");
            ensure!(seeded.trim_end().ends_with("vm2"), "cloud-init did not set the hostname: {seeded:?}");
            ensure!(sha256(&base_path(&env, &fingerprint)?)? == fingerprint, "the base changed");
            let err = env.fails(&["image", "delete", "deb12vm"])?;
            ensure!(err.contains("used by"), "deleting the image in use: {err}");
            env.ok(&["delete", "--force", "vm2"])?;
            ensure!(!env.dir.join("instances/vm2").exists(), "vm2's directory is left");
            Ok(())
        })(),
    );

    dog.step("skiffd killed mid-launch", STEP);
    check("skiffd killed mid-launch leaves nothing half-made", killed_mid_launch(&mut env));
    dog.step("reboot", LAUNCH);
    check(
        "a reboot from inside boots again through the firmware",
        (|| {
            ensure!(env.sh("vm1", "touch /run/this-boot")?.0 == 0, "marking this boot");
            let t = Instant::now();
            let _ = env.skiff(&["exec", "vm1", "--", "systemctl", "reboot"])?;
            // As long as the monitor gives a boot (the driver's boot timeout).
            wait_new_boot(&env, "vm1", Duration::from_secs(300))?;
            eprintln!("vm1: the new boot answered after {:.1} s", t.elapsed().as_secs_f64());
            let (_, f) = env.sh("vm1", "cat /root/only-vm1")?;
            ensure!(f.trim() == "mine", "the file is gone after the reboot: {f:?}");
            let list = env.ok(&["list", "--format", "csv"])?;
            ensure!(list.lines().any(|l| l.starts_with("vm1,RUNNING")), "after the reboot: {list}");
            // The SMBIOS system UUID is the instance's, in every boot.
            let want = instance(&env, "vm1")?["config"]["volatile.uuid"].as_str().unwrap_or_default().to_string();
            let (_, got) = env.sh("vm1", "cat /sys/class/dmi/id/product_uuid")?;
            ensure!(!want.is_empty() && got.trim() == want, "product_uuid {:?}, volatile.uuid {want:?}", got.trim());
            ensure!(console(&env, "vm1").matches("skiff-disk: GRUB loading").count() >= 2, "GRUB ran once only");
            Ok(())
        })(),
    );

    let tap = instance(&env, "vm1")?["config"]["volatile.eth0.host_name"].as_str().unwrap_or("").to_string();
    dog.step("stop", STEP);
    check(
        "stop through the ACPI power button",
        (|| {
            let t = Instant::now();
            env.ok(&["stop", "vm1", "--timeout", "90"])?;
            let took = t.elapsed();
            eprintln!("stop took {:.1} s", took.as_secs_f64());
            ensure!(took < Duration::from_secs(85), "stop took {took:?}: not a clean shutdown");
            let c = console(&env, "vm1");
            ensure!(
                c.contains("reboot: Power down"),
                "the guest did not power down: {}",
                c.lines().rev().take(8).collect::<Vec<_>>().join(" | ")
            );
            ensure!(skiff_vmm_processes() == 0, "skiff-vmm still runs");
            Ok(())
        })(),
    );

    dog.step("snapshot", STEP);
    check(
        "a disk snapshot and its restore",
        (|| {
            let overlay = env.dir.join("instances/vm1/os/root.qcow2");
            let before = sha256(&overlay)?;
            env.ok(&["snapshot", "create", "vm1", "snap0"])?;
            // Wreck the stopped VM's disk: its partition table.
            run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0xab 0 64k"]).arg(&overlay))?;
            ensure!(sha256(&overlay)? != before, "the overlay did not change");
            env.ok(&["snapshot", "restore", "vm1", "snap0"])?;
            // (Booting it again would cost another 40-70 s in the box: the
            // restored overlay is the snapshot's, byte for byte, and sound.)
            ensure!(sha256(&overlay)? == before, "the restored overlay differs from the snapshot's");
            run(Command::new("qemu-img").args(["check", "-q", "-f", "qcow2"]).arg(&overlay))?;
            ensure!(env.dir.join("instances/vm1/os/vars.fd").is_file(), "the variable store is gone");
            Ok(())
        })(),
    );

    dog.step("delete", STEP);
    check(
        "delete leaves nothing",
        (|| {
            env.ok(&["delete", "--force", "vm1"])?;
            ensure!(!env.dir.join("instances/vm1").exists(), "vm1's directory is left");
            ensure!(skiff_vmm_processes() == 0, "skiff-vmm still runs");
            ensure!(tap.is_empty() || !Path::new("/sys/class/net").join(&tap).exists(), "tap {tap} is left");
            let runtime: Vec<_> =
                std::fs::read_dir(env.run.join("vm")).into_iter().flatten().flatten().map(|e| e.file_name()).collect();
            ensure!(runtime.is_empty(), "runtime directories left: {runtime:?}");
            env.ok(&["image", "delete", "deb12vm"])?;
            ensure!(env.images()?.is_empty(), "the image is still listed");
            ensure!(!env.dir.join("oci/system").join(&fingerprint).exists(), "the base is left");
            Ok(())
        })(),
    );

    drop(dog);
    if !failures.is_empty() {
        let _ = env.skiff(&["delete", "--force", "vm1"]);
        let _ = env.skiff(&["delete", "--force", "vm2"]);
        bail!("{}\n--- skiffd log ---\n{}", failures.join("\n"), env.daemon_log());
    }
    Ok(())
}
