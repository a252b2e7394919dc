//! The detached monitor against a fake skiff-vmm (`fake_vmm.py`: a fake
//! agent behind the hybrid vsock socket) and a fake virtiofsd: launch,
//! attach, status, events, stop (clean and forced), the guest powering off
//! by itself, a main process that does not start, and reattaching to dead
//! or foreign pids. Nothing may be left behind.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use skiff_agent_proto::{ExitStatus, MainProcess, RestartPolicy};
use skiff_run::monitor::{self, EndReason, ExitInfo, LaunchSpec, MonitorError, MonitorEvent, MonitorState};
use skiff_run::runtime::{self, VmState};
use skiff_run::Nic;

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    spec: LaunchSpec,
}

fn fixture(args: &[&str]) -> Fixture {
    let tmp = tempfile::Builder::new().prefix("skm").tempdir_in("/tmp").unwrap();
    let d = tmp.path().to_path_buf();
    std::fs::create_dir_all(d.join("rootfs")).unwrap();
    std::fs::write(d.join("vmlinux"), b"\x7fELF fake, Linux version 6.1.0-test (fake)").unwrap();
    std::fs::write(d.join("initramfs"), b"").unwrap();
    let fake = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fake_vmm.py")).unwrap();
    script(&d, "fake_vmm.py", &fake);
    let vmm = script(
        &d,
        "vmm",
        &format!(
            "#!/bin/sh\nFAKE_PIDS={0}/pids FAKE_LOG={0}/requests exec python3 {0}/fake_vmm.py \"$@\"\n",
            d.display()
        ),
    );
    let virtiofsd = script(
        &d,
        "virtiofsd",
        &format!(
            "#!/bin/sh\nfor a in \"$@\"; do case $a in --socket-path=*) touch \"${{a#--socket-path=}}\";; esac; done\n\
             echo $$ >> {}/pids\nexec sleep 600\n",
            d.display()
        ),
    );
    let spec = LaunchSpec {
        name: "web".into(),
        runtime_dir: d.join("run/vm1"),
        rootfs: d.join("rootfs"),
        shares: Vec::new(),
        kernel: Some(d.join("vmlinux")),
        initramfs: Some(d.join("initramfs")),
        agent: None,
        vmm: Some(vmm),
        virtiofsd: Some(virtiofsd),
        monitor_program: Some(env!("CARGO_BIN_EXE_skiff-run").into()),
        cpus: 1,
        memory_mib: 128,
        max_cpus: None,
        memory_hotplug_mib: 0,
        devices: vec![],
        hostname: Some("web".into()),
        boot_timeout_secs: 20,
        nic: Some(Nic { tap: "tap-test".into(), mac: "52:54:00:00:00:01".into() }),
        network: Some(Default::default()),
        main: MainProcess {
            args: args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            cwd: "/".into(),
            user: Default::default(),
            terminal: false,
            hostname: None,
            stop_signal: 15,
            stop_timeout_secs: 10,
            restart: RestartPolicy::Always,
        },
        console_log: d.join("inst/console.log"),
        exit_file: d.join("inst/exit.json"),
        monitor_log: d.join("inst/monitor.log"),
        label: "test".into(),
        restore: None,
        os: None,
    };
    Fixture { _tmp: tmp, dir: d, spec }
}

fn pids(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn gone(pid: i32) -> bool {
    // A zombie still answers kill(0): read its state too.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.is_empty() || stat.split(' ').nth(2) == Some("Z")
}

async fn wait_gone(pids: &[i32]) {
    let t = Instant::now();
    while !pids.iter().all(|&p| gone(p)) {
        assert!(t.elapsed() < Duration::from_secs(10), "left running: {pids:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn read_exit(f: &Fixture) -> ExitInfo {
    serde_json::from_slice(&std::fs::read(&f.spec.exit_file).unwrap()).unwrap()
}

async fn next_event(ev: &mut monitor::MonitorEvents) -> MonitorEvent {
    tokio::time::timeout(Duration::from_secs(20), ev.next()).await.expect("event in time").unwrap().expect("an event")
}

#[tokio::test]
async fn launch_status_events_and_clean_stop() {
    let f = fixture(&["nginx"]);
    let l = monitor::launch(&f.spec).await.unwrap_or_else(|e| panic!("{}", monitor::error_chain(&e)));
    assert_eq!(l.main_pid, 42);
    assert_eq!(l.vsock_socket, f.spec.runtime_dir.join("vsock.sock"));
    let console = std::fs::read_to_string(&f.spec.console_log).unwrap();
    assert!(console.contains("fake kernel") && console.contains("net tap=tap-test,mac=52:54:00:00:00:01"), "{console}");
    let requests = std::fs::read_to_string(f.dir.join("requests")).unwrap();
    let net = requests.find(r#""type": "network""#).expect("network sent");
    assert!(net < requests.find(r#""type": "start_main""#).unwrap(), "network before start_main: {requests}");

    let h = monitor::attach(&f.spec.runtime_dir).unwrap();
    assert_eq!(h.pid(), l.monitor_pid);
    h.agent().ping().await.unwrap();
    let st = h.status().await.unwrap();
    assert_eq!((st.state, st.main_pid, st.restarts, st.vmm_pid), (MonitorState::Running, Some(42), 0, l.vmm_pid));

    let mut ev = h.events().await.unwrap();
    // SAFETY: signalling the fake VMM this test started.
    unsafe { libc::kill(l.vmm_pid as i32, libc::SIGUSR1) };
    let e = next_event(&mut ev).await;
    assert_eq!(e, MonitorEvent::MainExited { status: ExitStatus::Exited { code: 1 }, restarting: true, restarts: 1 });
    let st = h.status().await.unwrap();
    assert_eq!((st.restarts, st.main_pid, st.last_main_exit), (1, None, Some(ExitStatus::Exited { code: 1 })));

    let t = Instant::now();
    let info = h.stop(Duration::from_secs(2), false).await.unwrap().expect("exit info");
    assert!(t.elapsed() < Duration::from_secs(15), "stop took {:?}", t.elapsed());
    assert_eq!(info.reason, EndReason::Stopped);
    assert_eq!(info.restarts, 1);
    assert_eq!(info.last_main_exit, Some(ExitStatus::Signaled { signal: 15 }));
    assert_eq!(info.vmm_exit_code, Some(0));
    assert!(info.diagnostics.contains("fake kernel"), "{}", info.diagnostics);
    assert_eq!(read_exit(&f), info);
    // The subscriber sees the end too.
    loop {
        if let MonitorEvent::Stopped(i) = next_event(&mut ev).await {
            assert_eq!(i, info);
            break;
        }
    }
    let mut all = pids(&f.dir);
    all.push(l.monitor_pid as i32);
    assert_eq!(all.len(), 3, "virtiofsd, vmm, monitor: {all:?}");
    wait_gone(&all).await;
    assert!(!f.spec.runtime_dir.exists(), "runtime dir left");
    assert!(matches!(monitor::attach(&f.spec.runtime_dir), Err(MonitorError::NotRunning(_))));
}

#[tokio::test]
async fn guest_poweroff_and_forced_stop_end_the_monitor() {
    // The main process exits without restart: the guest powers off.
    let f = fixture(&["app"]);
    let l = monitor::launch(&f.spec).await.unwrap_or_else(|e| panic!("{}", monitor::error_chain(&e)));
    let h = monitor::attach(&f.spec.runtime_dir).unwrap();
    let mut ev = h.events().await.unwrap();
    // SAFETY: signalling the fake VMM this test started.
    unsafe { libc::kill(l.vmm_pid as i32, libc::SIGUSR2) };
    let e = next_event(&mut ev).await;
    assert!(matches!(e, MonitorEvent::MainExited { restarting: false, .. }), "{e:?}");
    let MonitorEvent::Stopped(info) = next_event(&mut ev).await else { panic!("stopped expected") };
    assert_eq!(info.reason, EndReason::Poweroff);
    assert_eq!(info.last_main_exit, Some(ExitStatus::Exited { code: 7 }));
    wait_gone(&[l.monitor_pid as i32, l.vmm_pid as i32]).await;
    assert!(!f.spec.runtime_dir.exists());
    assert_eq!(read_exit(&f).reason, EndReason::Poweroff);

    // Relaunch in the same runtime dir (the exit file of the last run goes), then force.
    let l = monitor::launch(&f.spec).await.unwrap();
    assert!(!f.spec.exit_file.exists());
    let h = monitor::attach(&f.spec.runtime_dir).unwrap();
    let t = Instant::now();
    let info = h.stop(Duration::from_secs(30), true).await.unwrap().expect("exit info");
    assert!(t.elapsed() < Duration::from_secs(10), "forced stop took {:?}", t.elapsed());
    assert_eq!((info.reason, info.vmm_signal), (EndReason::Killed, Some(libc::SIGKILL)));
    wait_gone(&[l.monitor_pid as i32, l.vmm_pid as i32]).await;
    assert!(!f.spec.runtime_dir.exists());

    // skiff-vmm killed from outside: failed.
    let l = monitor::launch(&f.spec).await.unwrap();
    // SAFETY: killing the fake VMM this test started.
    unsafe { libc::kill(l.vmm_pid as i32, libc::SIGKILL) };
    wait_gone(&[l.monitor_pid as i32]).await;
    assert_eq!(read_exit(&f).reason, EndReason::Failed);
    assert!(!f.spec.runtime_dir.exists());
}

#[tokio::test]
async fn a_main_process_that_cannot_start_leaves_nothing() {
    let f = fixture(&["/nonexistent"]);
    let err = monitor::launch(&f.spec).await.expect_err("must fail");
    let msg = monitor::error_chain(&err);
    assert!(msg.contains("starting the main process \"/nonexistent\"") && msg.contains("No such file"), "{msg}");
    assert!(msg.contains("fake kernel"), "the console is in the report: {msg}");
    wait_gone(&pids(&f.dir)).await;
    assert!(!f.spec.runtime_dir.exists(), "runtime dir left");
    let leftovers: Vec<_> = std::fs::read_dir(f.dir.join("run")).unwrap().collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A spec that cannot work fails before a monitor starts.
    let mut bad = f.spec.clone();
    bad.runtime_dir = PathBuf::from(format!("/tmp/{}/vm", "x".repeat(100)));
    assert!(matches!(monitor::launch(&bad).await, Err(MonitorError::BadRuntimeDir(..))));
}

#[test]
fn dead_and_foreign_pids_are_not_monitors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = runtime::create(tmp.path(), "vm1").unwrap();
    let mut sleeper = std::process::Command::new("sleep").arg("600").spawn().unwrap();
    let mut state = VmState {
        name: "vm1".into(),
        runner_pid: sleeper.id(),
        vmm_pid: 0,
        bundle: String::new(),
        kernel: String::new(),
        cpus: 1,
        memory_mib: 1,
        started: 0,
    };
    runtime::write_state(&dir, &state).unwrap();
    std::fs::write(dir.join(monitor::CONTROL_SOCKET), b"").unwrap();
    assert!(!monitor::is_monitor(sleeper.id(), &dir));
    assert!(matches!(monitor::attach(&dir), Err(MonitorError::NotRunning(_))), "a live foreign pid is not ours");
    state.runner_pid = 0x3fff_fff0;
    runtime::write_state(&dir, &state).unwrap();
    assert!(matches!(monitor::attach(&dir), Err(MonitorError::NotRunning(_))), "a dead pid");
    // A process of the dead VM that names the directory is killed, the directory removed.
    let mut orphan =
        std::process::Command::new("sh").arg("-c").arg("sleep 600; : ").arg(dir.join("vsock.sock")).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(monitor::remove_leftovers(&dir));
    assert!(!dir.exists());
    let st = orphan.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(libc::SIGKILL));
    assert!(runtime::alive(sleeper.id()), "the foreign process is left alone");
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

#[test]
fn cli_detach_list_and_stop() {
    let f = fixture(&["unused"]);
    let d = &f.dir;
    let bundle = d.join("bundle");
    std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
    std::fs::write(bundle.join("config.json"), r#"{"process":{"args":["/app"],"cwd":"/"}}"#).unwrap();
    let root = d.join("r");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_skiff-run"))
            .args(args)
            .env("SKIFF_RUN_ROOT", &root)
            .env("SKIFF_VMM", f.spec.vmm.as_ref().unwrap())
            .env("SKIFF_VIRTIOFSD", f.spec.virtiofsd.as_ref().unwrap())
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
    };
    let kernel = d.join("vmlinux").display().to_string();
    let initramfs = d.join("initramfs").display().to_string();
    let args = ["-d", "--name", "bg", "--kernel", &kernel, "--initramfs", &initramfs, bundle.to_str().unwrap()];
    let (code, out, err) = run(&args);
    assert_eq!((code, out.trim()), (0, "bg"), "{err}");
    let (code, out, _) = run(&["list"]);
    assert!(code == 0 && out.lines().any(|l| l.starts_with("bg ")), "{out}");
    let (code, _, err) = run(&["kill", "bg"]);
    assert!(code == 125 && err.contains("skiff-run stop bg"), "{err}");
    // The fake agent reports SIGTERM for the stopped main process: 128 + 15.
    let (code, _, err) = run(&["stop", "bg", "-t", "2"]);
    assert_eq!(code, 143, "{err}");
    assert!(!root.join("bg").exists());
    let exit = std::fs::read_to_string(root.join(".logs/bg/exit.json")).unwrap();
    assert!(exit.contains(r#""reason": "stopped""#), "{exit}");
    let (code, _, err) = run(&["stop", "bg"]);
    assert!(code == 125 && err.contains("no VM named bg"), "{err}");
}

#[tokio::test]
async fn snapshot_then_restore_a_clone_and_a_damaged_snapshot_leaves_nothing() {
    let mut f = fixture(&["nginx"]);
    let disk = f.dir.join("scratch.img");
    std::fs::write(&disk, b"").unwrap();
    f.spec.devices = vec![monitor::DeviceSpec::Disk { name: "scratch".into(), source: disk.clone(), readonly: true }];
    monitor::launch(&f.spec).await.unwrap_or_else(|e| panic!("{}", monitor::error_chain(&e)));
    let h = monitor::attach(&f.spec.runtime_dir).unwrap();
    let snap = f.dir.join("snap");
    // skiff-vmm refuses to save a running VM; the monitor passes that on.
    h.change(monitor::ControlRequest::Pause).await.unwrap();
    h.snapshot(&snap).await.unwrap_or_else(|e| panic!("{}", monitor::error_chain(&e)));
    h.change(monitor::ControlRequest::Resume).await.unwrap();
    let saved = monitor::read_saved_run(&snap).unwrap();
    assert_eq!((saved.name.as_str(), saved.main_pid, saved.devices.len()), ("web", Some(42), 1));
    assert_eq!(saved.nic.map(|n| n.mac).as_deref(), Some("52:54:00:00:00:01"));
    let requests = std::fs::read_to_string(f.dir.join("requests")).unwrap();
    assert!(requests.contains("vm.pause") && requests.contains("vm.snapshot"), "{requests}");
    assert!(h.snapshot(std::path::Path::new("relative")).await.is_err());

    // A clone: another name, runtime directory and NIC; the network is sent again.
    let mut clone = f.spec.clone();
    clone.name = "clone".into();
    clone.runtime_dir = f.dir.join("run/vm2");
    clone.nic = Some(Nic { tap: "tap-clone".into(), mac: "52:54:00:00:00:02".into() });
    clone.console_log = f.dir.join("clone/console.log");
    clone.exit_file = f.dir.join("clone/exit.json");
    clone.monitor_log = f.dir.join("clone/monitor.log");
    clone.devices = vec![];
    clone.restore = Some(snap.clone());
    let before = std::fs::read_to_string(f.dir.join("requests")).unwrap().matches(r#""type": "network""#).count();
    let l = monitor::launch(&clone).await.unwrap_or_else(|e| panic!("{}", monitor::error_chain(&e)));
    assert_eq!(l.main_pid, 42, "the saved main process goes on");
    let console = std::fs::read_to_string(&clone.console_log).unwrap();
    assert!(console.contains(&format!("restored from {}", snap.display())), "{console}");
    assert!(console.contains("net tap=tap-clone,mac=52:54:00:00:00:02"), "{console}");
    assert!(console.contains("--fs tag=rootfs,socket=") && console.contains(",id=fs0"), "{console}");
    assert!(
        console.contains(&format!("--disk path={},format=raw,serial=scratch,id=scratch,readonly=on", disk.display()))
    );
    let after = std::fs::read_to_string(f.dir.join("requests")).unwrap().matches(r#""type": "network""#).count();
    assert_eq!(after, before + 1, "the clone's network is configured again");
    let requests = std::fs::read_to_string(f.dir.join("requests")).unwrap();
    let set_mac = requests.lines().find(|l| l.contains(r#""set_mac""#)).unwrap_or_default();
    assert!(set_mac.contains("52:54:00:00:00:02"), "{requests}");
    let h2 = monitor::attach(&clone.runtime_dir).unwrap();
    assert_eq!(h2.status().await.unwrap().main_pid, Some(42));
    h2.agent().ping().await.unwrap();
    h2.stop(Duration::from_secs(5), true).await.unwrap();
    h.stop(Duration::from_secs(5), true).await.unwrap();
    wait_gone(&pids(&f.dir)).await;

    // A damaged state file: skiff-vmm refuses it; nothing is left.
    std::fs::write(snap.join("state"), b"garbage").unwrap();
    let mut bad = clone.clone();
    bad.runtime_dir = f.dir.join("run/vm3");
    let e = monitor::error_chain(&monitor::launch(&bad).await.unwrap_err());
    assert!(e.contains("bad magic"), "{e}");
    assert!(!bad.runtime_dir.exists(), "no runtime directory left");
    wait_gone(&pids(&f.dir)).await;
    // No run.json: not a snapshot the monitor made.
    std::fs::remove_file(snap.join("run.json")).unwrap();
    let e = monitor::error_chain(&monitor::launch(&bad).await.unwrap_err());
    assert!(e.contains("run.json"), "{e}");
    assert!(!bad.runtime_dir.exists());
}

/// A full OS VM whose guest resets is booted again in place; a stop asked
/// while that boot has not come up (the fake's second boot never does) is
/// answered at once instead of after the boot timeout, and leaves nothing.
#[tokio::test]
async fn a_stop_during_a_reboot_is_answered_at_once() {
    let mut f = fixture(&["/sbin/init"]);
    f.spec.os = Some(skiff_run::vm::OsBoot {
        firmware: None,
        vars: f.dir.join("vars.fd"),
        disk: f.dir.join("root.qcow2"),
        disk_format: "qcow2".into(),
        seed: None,
        uuid: None,
    });
    f.spec.boot_timeout_secs = 60;
    let l = monitor::launch(&f.spec).await.unwrap_or_else(|e| panic!("{}", monitor::error_chain(&e)));
    let h = monitor::attach(&f.spec.runtime_dir).unwrap();
    // SAFETY: signalling the fake VMM this test started: the guest resets.
    unsafe { libc::kill(l.vmm_pid as i32, libc::SIGHUP) };
    let t = Instant::now();
    while pids(&f.dir).len() < 2 {
        assert!(t.elapsed() < Duration::from_secs(20), "the monitor did not boot the VM again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = Instant::now();
    let info = h.stop(Duration::from_secs(1), false).await.unwrap().expect("exit info");
    assert!(t.elapsed() < Duration::from_secs(15), "the stop took {:?}", t.elapsed());
    assert_eq!(info.reason, EndReason::Stopped);
    let mut all = pids(&f.dir);
    all.push(l.monitor_pid as i32);
    wait_gone(&all).await;
    assert!(!f.spec.runtime_dir.exists());
}
