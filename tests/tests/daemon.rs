//! Issue 10's end-to-end test: skiffd and the skiff CLI, with real thin
//! VMs, a real registry (docker-registry), the managed bridge with
//! dnsmasq and nftables, and real clients. One daemon, few boots, many
//! checks; each check runs even when an earlier one failed, and the test
//! fails at the end listing them with the daemon's log.
//!
//! Boots: `web` (the demo image, by its local name) and `web2` (the same
//! image pushed to the registry, through a remote), `web` again after a
//! stop/start and a snapshot restore.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use skiff_tests::daemon_env::{http_get, processes, run, Env};
use skiff_tests::{scratch, vmm_binary};

/// docker-registry on 127.0.0.1:PORT (with htpasswd basic auth for
/// `auth`) with the demo image pushed as test/httpd:1.
fn registry(dir: &Path, layout: &Path, port: u16, auth: Option<(&str, &str)>) -> Result<Child> {
    let cfg = dir.join(format!("registry-{port}.yml"));
    let mut text = format!(
        "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
        dir.join(format!("registry-{port}")).display()
    );
    if let Some((u, p)) = auth {
        let pw = dir.join(format!("htpasswd-{port}"));
        std::fs::write(&pw, run(Command::new("htpasswd").args(["-Bbn", u, p]))?)?;
        text += &format!("auth:\n  htpasswd:\n    realm: skiff-test\n    path: {}\n", pw.display());
    }
    std::fs::write(&cfg, text)?;
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("docker-registry")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        ensure!(Instant::now() < deadline, "docker-registry did not listen");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut copy = Command::new("skopeo");
    copy.args(["copy", "--dest-tls-verify=false"]);
    if let Some((u, p)) = auth {
        copy.arg(format!("--dest-creds={u}:{p}"));
    }
    copy.args([format!("oci:{}:latest", layout.display()), format!("docker://127.0.0.1:{port}/test/httpd:1")]);
    run(&mut copy)?;
    Ok(child)
}

#[test]
#[ignore = "boots guests: run through tests/run"]
fn daemon_end_to_end() -> Result<()> {
    let tmp = scratch()?;
    let bin = vmm_binary()?.parent().context("binary dir")?.to_path_buf();
    let mut env = Env::in_scratch(tmp.path(), bin.clone())?;
    let dir = env.dir.clone();
    let layout = env.demo_image()?;
    let mut reg = registry(tmp.path(), &layout, 5000, None)?;
    let mut locked = registry(tmp.path(), &layout, 5001, Some(("alice", "s3cret")))?;
    env.start_daemon()?;
    let mut failures: Vec<String> = Vec::new();
    let mut check = |name: &str, r: Result<()>| {
        if let Err(e) = r {
            failures.push(format!("{name}: {e:#}"));
        }
    };

    // Bad input first: each a clear 4xx, nothing left behind.
    check(
        "bad input",
        (|| {
            let (c, _, e) = env.skiff(&["launch", "--vm", "localhost/skiff-demo", "Bad_Name"])?;
            ensure!(c != 0 && e.contains("invalid instance name"), "invalid name: {c} {e}");
            let (c, _, e) = env.skiff(&["launch", "--vm", "localhost/skiff-demo", "x1", "-c", "limits.bogus=1"])?;
            ensure!(c != 0 && e.contains("limits.bogus"), "unknown key: {c} {e}");
            let (c, _, e) = env.skiff(&["launch", "--vm", "127.0.0.1:5000/test/missing:1", "x2"])?;
            ensure!(c != 0 && !e.is_empty(), "missing image: {c} {e}");
            let out = env.ok(&["list", "--format", "csv"])?;
            ensure!(out.trim().is_empty(), "failed launches left instances: {out}");
            Ok(())
        })(),
    );

    // web: the demo image by its local name, with an env override.
    check(
        "launch web",
        env.ok(&["launch", "--vm", "localhost/skiff-demo", "web", "-c", "environment.FOO=bar"]).map(drop),
    );
    check(
        "web serves its page over the bridge",
        (|| {
            let ip = env.ipv4("web")?;
            let page = http_get(&ip, 80)?;
            ensure!(page.contains("Hello from web"), "page: {page}");
            Ok(())
        })(),
    );
    check(
        "exec exit code and env",
        (|| {
            let (c, _, _) = env.skiff(&["exec", "web", "--", "sh", "-c", "exit 3"])?;
            ensure!(c == 3, "exit code {c}");
            let out = env.ok(&["exec", "web", "--env", "X=1", "--", "env"])?;
            for want in ["DEMO=skiff", "FOO=bar", "X=1"] {
                ensure!(out.lines().any(|l| l == want), "{want} missing from {out}");
            }
            Ok(())
        })(),
    );
    check(
        "exec stdin",
        (|| {
            let (c, out, e) = env.skiff_in(&["exec", "web", "--", "cat"], Some(b"through stdin\n"))?;
            ensure!(c == 0 && out == "through stdin\n", "{c} {out:?} {e}");
            Ok(())
        })(),
    );
    check(
        "file push/pull keeps modes",
        (|| {
            let f = tmp.path().join("pushed.sh");
            std::fs::write(&f, b"#!/bin/sh\necho pushed\n")?;
            std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o750))?;
            env.ok(&["file", "push", f.to_str().unwrap(), "web/root/pushed.sh"])?;
            let out = env.ok(&["exec", "web", "--", "/root/pushed.sh"])?;
            ensure!(out == "pushed\n", "{out:?}");
            let back = tmp.path().join("pulled.sh");
            env.ok(&["file", "pull", "web/root/pushed.sh", back.to_str().unwrap()])?;
            ensure!(std::fs::read(&back)? == std::fs::read(&f)?, "contents differ");
            let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&back)?.permissions()) & 0o777;
            ensure!(mode == 0o750, "mode {mode:o}");
            Ok(())
        })(),
    );
    check(
        "console log shows the boot",
        (|| {
            let out = env.ok(&["console", "web", "--show-log"])?;
            ensure!(
                out.contains("DHCP lease") && out.contains("skiff-demo: serving"),
                "console log: {}",
                &out[..out.len().min(400)]
            );
            Ok(())
        })(),
    );

    // More bad input, now that web exists: its name again, and a body that
    // is not JSON, straight on the socket.
    check(
        "name in use, malformed JSON",
        (|| {
            let (c, _, e) = env.skiff(&["init", "--vm", "localhost/skiff-demo", "web"])?;
            ensure!(c != 0 && e.contains("already exists"), "name in use: {c} {e}");
            let mut sock = std::os::unix::net::UnixStream::connect(dir.join("unix.socket"))?;
            let body = "{not json";
            write!(
            sock,
            "POST /1.0/instances HTTP/1.1\r\nHost: skiff\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
            let mut reply = String::new();
            sock.read_to_string(&mut reply)?;
            ensure!(reply.starts_with("HTTP/1.1 400"), "malformed JSON: {reply}");
            ensure!(reply.contains("\"error_code\":400") && reply.contains("malformed request body"), "{reply}");
            Ok(())
        })(),
    );

    // web2 from the registry through a remote; it reaches web by name.
    check(
        "remote + launch from the registry",
        (|| {
            env.ok(&["remote", "add", "acc", "http://127.0.0.1:5000", "--protocol", "oci"])?;
            env.ok(&["launch", "--vm", "acc:test/httpd:1", "web2"])?;
            let out = env.ok(&["exec", "web2", "--", "wget", "-qO-", "http://web/"])?;
            ensure!(out.contains("Hello from web"), "web2 → web: {out}");
            Ok(())
        })(),
    );

    // The same image as a native container beside the VMs, on the same
    // bridge: each reaches the other by name. Privileged here: the box's
    // kernel (6.1) cannot id-map the tmpfs the scratch directory is on;
    // unprivileged containers are tested on the host (tests/containers.rs).
    check(
        "a container beside the VM, reached by name both ways",
        (|| {
            env.ok(&["launch", "localhost/skiff-demo", "ct", "-c", "security.privileged=true"])?;
            let out = env.ok(&["list", "--format", "csv", "-c", "nst"])?;
            ensure!(out.lines().any(|l| l == "ct,RUNNING,CONTAINER"), "{out}");
            let out = env.ok(&["exec", "ct", "--", "wget", "-qO-", "http://web/"])?;
            ensure!(out.contains("Hello from web"), "ct → web: {out}");
            let out = env.ok(&["exec", "web", "--", "wget", "-qO-", "http://ct/"])?;
            ensure!(out.contains("Hello from ct"), "web → ct: {out}");
            env.ok(&["delete", "--force", "ct"])?;
            Ok(())
        })(),
    );

    // A TTY (through a pty from util-linux's script) and the event stream.
    check(
        "exec with a TTY",
        (|| {
            // The KVM box has no devpts mounted; a pty needs one.
            if !Path::new("/dev/pts/ptmx").exists() {
                std::fs::create_dir_all("/dev/pts")?;
                run(Command::new("mount").args(["-t", "devpts", "-o", "ptmxmode=0666", "devpts", "/dev/pts"]))?;
            }
            let cmd = format!("{} exec web -- tty", bin.join("skiff").display());
            let out = run(Command::new("script")
                .args(["-qec", &cmd, "/dev/null"])
                .env("SKIFF_DIR", &dir)
                .env("HOME", &env.home))?;
            ensure!(out.contains("/dev/pts/"), "tty said: {out:?}");
            Ok(())
        })(),
    );
    check(
        "interactive console",
        (|| {
            let mut child = env.skiff_on_pty("console web", 60)?;
            let mut stdin = child.stdin.take().context("stdin")?;
            std::thread::sleep(Duration::from_secs(2));
            stdin.write_all(b"echo console-$((6*7))\n")?;
            std::thread::sleep(Duration::from_secs(1));
            stdin.write_all(b"exit\n")?;
            let out = child.wait_with_output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            ensure!(text.contains("console-42"), "console said: {text:?} {}", String::from_utf8_lossy(&out.stderr));
            Ok(())
        })(),
    );
    let monitor = Command::new(bin.join("skiff"))
        .args(["monitor", "--type", "lifecycle", "--format", "json"])
        .env("SKIFF_DIR", &dir)
        .env("HOME", &env.home)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    std::thread::sleep(Duration::from_millis(500));

    // A registry that wants credentials: refused without them (a clear
    // error, nothing left), pulled with them through a remote.
    check(
        "registry auth",
        (|| {
            let (c, _, e) = env.skiff(&["launch", "--vm", "127.0.0.1:5001/test/httpd:1", "locked"])?;
            ensure!(c != 0 && (e.contains("401") || e.to_lowercase().contains("auth")), "no credentials: {c} {e}");
            let out = env.ok(&["list", "--format", "csv"])?;
            ensure!(!out.contains("locked"), "a refused pull left an instance: {out}");
            ensure!(!dir.join("instances/locked").exists(), "a refused pull left its directory");
            let (c, _, e) = env.skiff_in(
                &[
                    "remote",
                    "add",
                    "priv",
                    "http://127.0.0.1:5001",
                    "--protocol",
                    "oci",
                    "--username",
                    "alice",
                    "--password-stdin",
                ],
                Some(b"s3cret\n"),
            )?;
            ensure!(c == 0, "remote add: {e}");
            env.ok(&["init", "--vm", "priv:test/httpd:1", "unlocked"])?;
            env.ok(&["delete", "unlocked"])?;
            Ok(())
        })(),
    );

    // Freeze and resume.
    check(
        "pause and resume",
        (|| {
            env.ok(&["pause", "web"])?;
            let out = env.ok(&["list", "--format", "csv"])?;
            ensure!(out.lines().any(|l| l.starts_with("web,") && l.contains("FROZEN")), "after pause: {out}");
            let (c, _, e) = env.skiff(&["exec", "web", "--", "true"])?;
            ensure!(c != 0 && e.contains("frozen"), "exec while frozen: {c} {e}");
            env.ok(&["start", "web"])?;
            env.ok(&["exec", "web", "--", "true"])?;
            let ip = env.ipv4("web")?;
            http_get(&ip, 80)?;
            Ok(())
        })(),
    );

    // Devices and limits changed while the VM runs (hot-plug).
    check(
        "live devices and limits",
        (|| {
            let share = env.dir.join("live-share");
            std::fs::create_dir_all(&share)?;
            std::fs::write(share.join("hello"), "from the host\n")?;
            let src = format!("source={}", share.display());
            env.ok(&["config", "device", "add", "web", "data", "disk", &src, "path=/data"])?;
            let out = env.ok(&["exec", "web", "--", "cat", "/data/hello"])?;
            ensure!(out == "from the host\n", "the hot-plugged share reads {out:?}");
            env.ok(&["exec", "web", "--", "sh", "-c", "echo from the guest > /data/back"])?;
            ensure!(
                std::fs::read_to_string(share.join("back"))? == "from the guest\n",
                "the host does not see the write"
            );
            let devices = env.ok(&["config", "device", "list", "web"])?;
            ensure!(devices.lines().any(|l| l == "data"), "device list: {devices}");
            let (c, _, e) =
                env.skiff(&["config", "device", "add", "web", "bad", "disk", "source=/nonexistent", "path=/x"])?;
            ensure!(c != 0 && e.contains("/nonexistent"), "a missing source: {c} {e}");
            env.ok(&["config", "device", "remove", "web", "data"])?;
            let (c, _, _) = env.skiff(&["exec", "web", "--", "test", "-e", "/data/hello"])?;
            ensure!(c != 0, "/data/hello is still there after the device was removed");

            let nproc = || -> Result<usize> {
                Ok(env.ok(&["exec", "web", "--", "grep", "-c", "^processor", "/proc/cpuinfo"])?.trim().parse()?)
            };
            ensure!(nproc()? == 1, "web does not start with 1 vCPU");
            env.ok(&["config", "set", "web", "limits.cpu=2"])?;
            // The agent onlines the new vCPU when the kernel adds it.
            let deadline = Instant::now() + Duration::from_secs(30);
            while nproc()? != 2 {
                ensure!(Instant::now() < deadline, "limits.cpu=2 did not reach the guest");
                std::thread::sleep(Duration::from_millis(300));
            }
            env.ok(&["config", "set", "web", "limits.cpu=1"])?;
            let deadline = Instant::now() + Duration::from_secs(30);
            while nproc()? != 1 {
                ensure!(Instant::now() < deadline, "limits.cpu=1 did not reach the guest");
                std::thread::sleep(Duration::from_millis(300));
            }
            let (c, _, e) = env.skiff(&["config", "set", "web", "limits.memory=1GiB"])?;
            ensure!(c != 0 && e.contains("hot-plug"), "a memory change without limits.memory.hotplug: {c} {e}");
            let ip = env.ipv4("web")?;
            http_get(&ip, 80)?;
            Ok(())
        })(),
    );

    // Snapshot, change, restore.
    check(
        "snapshot restore",
        (|| {
            env.ok(&["snapshot", "create", "web", "s1"])?;
            env.ok(&["exec", "web", "--", "sh", "-c", "echo changed > /root/change"])?;
            env.ok(&["snapshot", "restore", "web", "s1"])?;
            let (c, _, _) = env.skiff(&["exec", "web", "--", "test", "-e", "/root/change"])?;
            ensure!(c == 1, "the change survived the restore ({c})");
            Ok(())
        })(),
    );

    check(
        "events: lifecycle on /1.0/events",
        (|| {
            let mut m = monitor?;
            std::thread::sleep(Duration::from_millis(500));
            let _ = m.kill();
            let out = m.wait_with_output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            for want in ["instance-snapshot-created", "instance-snapshot-restored", "instance-started"] {
                ensure!(text.contains(want), "{want} missing from the event stream: {text}");
            }
            Ok(())
        })(),
    );

    // stop / start / restart.
    check(
        "stop, start, restart",
        (|| {
            env.ok(&["stop", "web2"])?;
            let out = env.ok(&["list", "--format", "csv"])?;
            ensure!(out.lines().any(|l| l.starts_with("web2,") && l.contains("STOPPED")), "after stop: {out}");
            env.ok(&["start", "web2"])?;
            env.ok(&["restart", "web2"])?;
            env.ok(&["exec", "web2", "--", "true"])?;
            Ok(())
        })(),
    );

    // The daemon killed while instances run: they keep running and are adopted.
    check(
        "skiffd SIGKILL and restart",
        (|| {
            env.kill_daemon();
            env.start_daemon()?;
            let out = env.ok(&["list", "--format", "csv"])?;
            ensure!(out.lines().filter(|l| l.contains("RUNNING")).count() == 2, "after restart: {out}");
            env.ok(&["exec", "web", "--", "true"])?;
            let ip = env.ipv4("web")?;
            http_get(&ip, 80)?;
            Ok(())
        })(),
    );

    // boot.autorestart: the entrypoint killed from inside comes back.
    check(
        "boot.autorestart",
        (|| {
            env.ok(&[
                "launch",
                "--vm",
                "localhost/skiff-demo",
                "web3",
                "-c",
                "boot.autorestart=true",
                "-c",
                "limits.memory=256MiB",
            ])?;
            let ip = env.ipv4("web3")?;
            http_get(&ip, 80)?;
            env.skiff(&["exec", "web3", "--", "killall", "httpd"])?;
            std::thread::sleep(Duration::from_secs(2));
            let page = http_get(&ip, 80)?;
            ensure!(page.contains("Hello from web3"), "after the kill: {page}");
            let n = env.ok(&["config", "get", "web3", "volatile.restarts"])?;
            ensure!(n.trim().parse::<u32>().unwrap_or(0) >= 1, "volatile.restarts = {n:?}");
            env.ok(&["delete", "--force", "web3"])?;
            Ok(())
        })(),
    );

    // An ephemeral instance whose entrypoint ends is deleted with its VM.
    check(
        "ephemeral",
        (|| {
            env.ok(&["launch", "--vm", "localhost/skiff-demo", "eph", "--ephemeral", "-c", "oci.entrypoint=sleep 3"])?;
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let out = env.ok(&["list", "--format", "csv"])?;
                if !out.lines().any(|l| l.starts_with("eph,")) {
                    break;
                }
                ensure!(Instant::now() < deadline, "eph still listed 60 s after its entrypoint ended: {out}");
                std::thread::sleep(Duration::from_millis(500));
            }
            ensure!(!dir.join("instances/eph").exists(), "eph's directory is left");
            Ok(())
        })(),
    );

    // Five launches at once.
    check(
        "five launches at once",
        (|| {
            let kids: Vec<_> = (1..=5)
                .map(|i| {
                    Command::new(bin.join("skiff"))
                        .args([
                            "launch",
                            "--vm",
                            "localhost/skiff-demo",
                            &format!("p{i}"),
                            "-c",
                            "limits.memory=128MiB",
                        ])
                        .env("SKIFF_DIR", &dir)
                        .env("HOME", &env.home)
                        .stdout(Stdio::null())
                        .stderr(Stdio::piped())
                        .spawn()
                })
                .collect::<Result<_, _>>()?;
            let mut errs = Vec::new();
            for k in kids {
                let out = k.wait_with_output()?;
                if !out.status.success() {
                    errs.push(String::from_utf8_lossy(&out.stderr).into_owned());
                }
            }
            ensure!(errs.is_empty(), "failed launches: {errs:?}");
            for i in 1..=5 {
                env.ok(&["exec", &format!("p{i}"), "--", "true"])?;
            }
            // skiff-vmm's vm.shutdown presses the ACPI power button: the
            // agent (PID 1) shuts the guest down and the instance stops.
            let uuid = env.ok(&["config", "get", "p1", "volatile.uuid"])?;
            let short: String = uuid.chars().filter(|c| c.is_ascii_hexdigit()).take(12).collect();
            let sock = env.run.join(format!("vm/i{short}/vmm.sock"));
            skiff_vmm_client::Client::new(&sock).shutdown().context("pressing p1's power button")?;
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let out = env.ok(&["list", "--format", "csv"])?;
                if out.lines().any(|l| l.starts_with("p1,") && l.contains("STOPPED")) {
                    break;
                }
                ensure!(Instant::now() < deadline, "p1 did not stop 60 s after its power button: {out}");
                std::thread::sleep(Duration::from_millis(500));
            }
            env.ok(&["delete", "--force", "p1", "p2", "p3", "p4", "p5"])?;
            Ok(())
        })(),
    );

    // Real clients nobody here wrote: Debian's lxc and pylxd.
    check("lxc client", skiff_tests::daemon_env::lxc_client(&dir, "web", "web2"));
    check("pylxd", skiff_tests::daemon_env::pylxd(&dir, "web"));

    // skiffd killed in the middle of a launch: after a restart the
    // half-made instance is gone (or, if it got far enough, whole).
    check(
        "skiffd SIGKILL mid-launch",
        (|| {
            let mut child = Command::new(bin.join("skiff"))
                .args(["launch", "--vm", "localhost/skiff-demo", "half"])
                .env("SKIFF_DIR", &dir)
                .env("HOME", &env.home)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()?;
            let mut first = [0u8; 8];
            let _ = child.stdout.as_mut().context("stdout")?.read(&mut first);
            env.kill_daemon();
            let _ = child.kill();
            let _ = child.wait();
            env.start_daemon()?;
            std::thread::sleep(Duration::from_secs(1));
            let out = env.ok(&["list", "--format", "csv"])?;
            match out.lines().find(|l| l.starts_with("half,")) {
                None => {
                    ensure!(!dir.join("storage/volumes/half").exists(), "the half-made volume is left");
                    ensure!(!dir.join("instances/half").exists(), "the half-made instance directory is left");
                }
                Some(l) if l.contains("RUNNING") => {
                    env.ok(&["exec", "half", "--", "true"])?;
                    env.ok(&["delete", "--force", "half"])?;
                }
                Some(_) => {
                    env.ok(&["delete", "--force", "half"])?;
                }
            }
            Ok(())
        })(),
    );

    // A VMM that dies is noticed at once: the instance shows ERROR.
    check(
        "a killed skiff-vmm is noticed",
        (|| {
            run(Command::new("pkill").args(["-9", "-x", "skiff-vmm"]))?;
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let out = env.ok(&["list", "--format", "csv"])?;
                if !out.contains("RUNNING") {
                    ensure!(out.contains("ERROR"), "after the kill: {out}");
                    break;
                }
                ensure!(Instant::now() < deadline, "still RUNNING 15 s after skiff-vmm was killed: {out}");
                std::thread::sleep(Duration::from_millis(200));
            }
            let info = env.ok(&["info", "web"])?;
            ensure!(info.to_lowercase().contains("error"), "info web: {info}");
            Ok(())
        })(),
    );

    // delete leaves nothing.
    check(
        "delete leaves nothing",
        (|| {
            let out = env.ok(&["list", "--format", "csv"])?;
            let names: Vec<&str> = out.lines().filter_map(|l| l.split(',').next()).filter(|n| !n.is_empty()).collect();
            let mut args = vec!["delete", "--force"];
            args.extend(names);
            if args.len() > 2 {
                env.ok(&args)?;
            }
            let out = env.ok(&["list", "--format", "csv"])?;
            ensure!(out.trim().is_empty(), "left: {out}");
            std::thread::sleep(Duration::from_secs(1));
            for p in ["skiff-vmm", "virtiofsd"] {
                ensure!(processes(p) == 0, "{p} still running");
            }
            let taps = run(Command::new("ip").args(["-o", "link", "show", "master", "skiffbr0"]))?;
            ensure!(taps.trim().is_empty(), "taps left: {taps}");
            let mounts = std::fs::read_to_string("/proc/self/mounts")?;
            ensure!(!mounts.contains(dir.to_str().unwrap()), "mounts left under {}", dir.display());
            let vols = std::fs::read_dir(dir.join("storage/volumes"))?.count();
            ensure!(vols == 0, "{vols} volumes left");
            let leases = std::fs::read_to_string(dir.join("networks/skiffbr0/dnsmasq.leases")).unwrap_or_default();
            ensure!(leases.trim().is_empty(), "dnsmasq leases left: {leases}");
            Ok(())
        })(),
    );

    let log = env.daemon_log();
    drop(env);
    for r in [&mut reg, &mut locked] {
        let _ = r.kill();
        let _ = r.wait();
    }
    // Leave the box as found: the bridge, its dnsmasq and nft table go,
    // and the memory the VMs fragmented is compacted for whatever boots next.
    let _ = Command::new("pkill").args(["-f", "dnsmasq.*skiffbr0"]).status();
    let _ = Command::new("nft").args(["delete", "table", "inet", "skiff_skiffbr0"]).status();
    let _ = Command::new("ip").args(["link", "del", "skiffbr0"]).status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    let _ = std::fs::write("/proc/sys/vm/compact_memory", "1");
    if !failures.is_empty() {
        bail!("{} check(s) failed:\n{}\n--- skiffd log ---\n{log}", failures.len(), failures.join("\n"));
    }
    Ok(())
}
