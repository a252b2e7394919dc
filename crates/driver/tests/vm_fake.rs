//! The VM driver end to end without a VM: real monitors (the skiff-run
//! binary) over skiff-run's fake skiff-vmm (`crates/run/tests/fake_vmm.py`, a
//! fake agent behind the hybrid vsock), a fake virtiofsd and a real storage
//! pool: create, start, status, agent, events, adoption by a new driver (a
//! daemon restart), the guest powering off by itself, stop, a start that
//! fails (nothing left, volume unmounted), restore refused while running,
//! delete.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use skiff_driver::vm::{VmDriver, VmDriverConfig};
use skiff_driver::{Driver, DriverEvent, InstanceSpec, RunStatus};
use tokio::sync::broadcast;

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// The skiff-run binary of this build (target/debug/skiff-run).
fn skiff_run() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().and_then(Path::parent).unwrap().join("skiff-run");
    assert!(p.is_file(), "{} is missing: build it first (cargo build -p skiff-run)", p.display());
    p
}

fn driver(d: &Path) -> VmDriver {
    let fake = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../run/tests/fake_vmm.py")).unwrap();
    script(d, "fake_vmm.py", &fake);
    let vmm = script(d, "vmm", &format!("#!/bin/sh\nexec python3 {}/fake_vmm.py \"$@\"\n", d.display()));
    let virtiofsd = script(
        d,
        "virtiofsd",
        "#!/bin/sh\nfor a in \"$@\"; do case $a in --socket-path=*) touch \"${a#--socket-path=}\";; esac; done\n\
         exec sleep 600\n",
    );
    std::fs::write(d.join("vmlinux"), b"\x7fELF fake, Linux version 6.1.0-test (fake)").unwrap();
    std::fs::write(d.join("initramfs"), b"").unwrap();
    VmDriver::new(VmDriverConfig {
        storage_root: d.join("storage"),
        runtime_root: d.join("run"),
        kernel: Some(d.join("vmlinux")),
        initramfs: Some(d.join("initramfs")),
        agent: None,
        vmm: Some(vmm),
        virtiofsd: Some(virtiofsd),
        monitor_program: Some(skiff_run()),
        firmware: None,
    })
    .unwrap()
}

fn instance(d: &Path, config: &[(&str, &str)]) -> InstanceSpec {
    let image = d.join("image");
    std::fs::create_dir_all(image.join("etc")).unwrap();
    std::fs::write(image.join("etc/hostname"), "image\n").unwrap();
    InstanceSpec {
        name: "web".into(),
        id: "0123abcd-4567-89ef-0123-456789abcdef".into(),
        config: config.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
        image_rootfs: image,
        image_config: serde_json::json!({"process": {"args": ["nginx"], "cwd": "/"}}),
        image_kind: Default::default(),
        nic: None,
        devices: BTreeMap::new(),
        dir: d.join("instances/web"),
    }
}

fn vmm_pid(d: &Path) -> i32 {
    let dir = std::fs::read_dir(d.join("run/vm")).unwrap().find_map(|e| Some(e.ok()?.path())).expect("a runtime dir");
    skiff_run::runtime::read_state(&dir).unwrap().vmm_pid as i32
}

fn runtime_dirs(d: &Path) -> usize {
    std::fs::read_dir(d.join("run/vm")).map(|r| r.count()).unwrap_or(0)
}

fn mounted(d: &Path) -> bool {
    let rootfs = d.join("storage/volumes/web/rootfs");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(rootfs.to_str().unwrap()))
}

async fn event(rx: &mut broadcast::Receiver<DriverEvent>) -> DriverEvent {
    tokio::time::timeout(Duration::from_secs(20), rx.recv()).await.expect("an event in time").unwrap()
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: signalling the fake VMM this test started.
    unsafe { libc::kill(pid, sig) };
}

#[tokio::test]
async fn lifecycle_with_adoption_and_cleanup() {
    let tmp = tempfile::Builder::new().prefix("skd").tempdir_in("/tmp").unwrap();
    let d = tmp.path();
    let drv = driver(d);
    let inst = instance(d, &[("limits.memory", "256MiB"), ("boot.autorestart", "true")]);
    drv.validate_config(&inst.config).unwrap();
    drv.create(&inst).await.unwrap();
    assert!(matches!(drv.agent(&inst), Err(skiff_driver::DriverError::NotRunning(_))));

    drv.start(&inst).await.unwrap();
    assert!(mounted(d), "the volume is mounted while running");
    let RunStatus::Running { main_pid, restarts, .. } = drv.status(&inst).await.unwrap() else { panic!("not running") };
    assert_eq!((main_pid, restarts), (Some(42), 0));
    drv.agent(&inst).unwrap().ping().await.unwrap();
    assert!(std::fs::read_to_string(drv.console_log(&inst)).unwrap().contains("fake kernel"));
    let mut rx = drv.events();
    signal(vmm_pid(d), libc::SIGUSR1);
    let e = event(&mut rx).await;
    assert!(matches!(&e, DriverEvent::MainExited { name, restarting: true, .. } if name == "web"), "{e:?}");
    let restore = drv.snapshot_restore(&inst, "s1").await;
    assert!(matches!(restore, Err(skiff_driver::DriverError::Running(_))), "{restore:?}");

    // The daemon restarts: a new driver adopts the running VM.
    drop(drv);
    let drv = driver(d);
    let mut rx = drv.events();
    let RunStatus::Running { restarts, .. } = drv.adopt(&inst).await.unwrap() else { panic!("not adopted") };
    assert_eq!(restarts, 1);
    // The main process exits for good: the guest powers off by itself.
    signal(vmm_pid(d), libc::SIGUSR2);
    assert!(matches!(event(&mut rx).await, DriverEvent::MainExited { restarting: false, .. }));
    let e = event(&mut rx).await;
    assert!(matches!(&e, DriverEvent::Stopped { clean: true, .. }), "{e:?}");
    let RunStatus::Stopped { last } = drv.status(&inst).await.unwrap() else { panic!("still running") };
    assert!(last.as_deref().unwrap_or("").contains("powered off"), "{last:?}");
    assert!(!mounted(d), "unmounted when the VM ended by itself");
    assert_eq!(runtime_dirs(d), 0);

    // Start and stop cleanly.
    drv.start(&inst).await.unwrap();
    drv.stop(&inst, Duration::from_secs(2), false).await.unwrap();
    assert!(matches!(drv.status(&inst).await.unwrap(), RunStatus::Stopped { .. }));
    assert!(!mounted(d));
    assert_eq!(runtime_dirs(d), 0);

    // A start that fails leaves nothing.
    let bad = instance(d, &[("oci.entrypoint", "/nonexistent --flag")]);
    let err = drv.start(&bad).await.expect_err("must fail");
    let msg = format!("{err}: {:?}", std::error::Error::source(&err).map(|s| s.to_string()));
    assert!(msg.contains("nonexistent"), "{msg}");
    assert!(!mounted(d));
    assert_eq!(runtime_dirs(d), 0);

    // Snapshots and delete of the stopped instance.
    drv.snapshot_create(&inst, "s1").await.unwrap();
    drv.snapshot_restore(&inst, "s1").await.unwrap();
    drv.delete(&inst).await.unwrap();
    assert!(!d.join("storage/volumes/web").exists());
}

#[tokio::test]
async fn stateful_snapshot_restore_and_copy() {
    let tmp = tempfile::Builder::new().prefix("skd").tempdir_in("/tmp").unwrap();
    let d = tmp.path();
    let drv = driver(d);
    let inst = instance(d, &[]);
    drv.create(&inst).await.unwrap();
    // Only a running VM has memory to save.
    let e = drv.snapshot_create_stateful(&inst, "warm", false).await.unwrap_err();
    assert!(matches!(e, skiff_driver::DriverError::NotRunning(_)), "{e:?}");
    drv.start(&inst).await.unwrap();
    let root = d.join("storage/volumes/web/rootfs");
    std::fs::write(root.join("etc/hostname"), "warm\n").unwrap();
    drv.snapshot_create_stateful(&inst, "warm", false).await.unwrap();
    assert!(drv.snapshot_is_stateful(&inst, "warm"));
    assert!(inst.dir.join("snapshots/warm/memory").is_file());
    drv.snapshot_create(&inst, "cold").await.unwrap();
    assert!(!drv.snapshot_is_stateful(&inst, "cold"));
    drv.agent(&inst).unwrap().ping().await.expect("resumed after the snapshot");
    std::fs::write(root.join("etc/hostname"), "later\n").unwrap();

    // Restore needs the VM stopped (the daemon stops it); then it runs again from the snapshot.
    let e = drv.snapshot_restore_stateful(&inst, "warm").await.unwrap_err();
    assert!(matches!(e, skiff_driver::DriverError::Running(_)), "{e:?}");
    drv.stop(&inst, Duration::ZERO, true).await.unwrap();
    let e = drv.snapshot_restore_stateful(&inst, "cold").await.unwrap_err();
    assert!(matches!(e, skiff_driver::DriverError::Unsupported(_)), "{e:?}");
    drv.snapshot_restore_stateful(&inst, "warm").await.unwrap();
    assert_eq!(std::fs::read_to_string(root.join("etc/hostname")).unwrap(), "warm\n", "the snapshot's disk");
    let console = std::fs::read_to_string(drv.console_log(&inst)).unwrap();
    assert!(console.contains("restored from"), "{console}");
    let RunStatus::Running { main_pid, .. } = drv.status(&inst).await.unwrap() else { panic!("not running") };
    assert_eq!(main_pid, Some(42), "the saved main process");
    std::fs::write(root.join("etc/hostname"), "after\n").unwrap();
    drv.stop(&inst, Duration::ZERO, true).await.unwrap();

    // A damaged snapshot: refused, and the instance is as it was (disk, nothing running or mounted).
    let state = inst.dir.join("snapshots/warm/state");
    let good = std::fs::read(&state).unwrap();
    std::fs::write(&state, b"damaged").unwrap();
    let e = drv.snapshot_restore_stateful(&inst, "warm").await.unwrap_err();
    let msg = format!("{e}: {:?}", std::error::Error::source(&e).map(|s| s.to_string()));
    assert!(msg.contains("bad magic"), "{msg}");
    assert!(!mounted(d) && runtime_dirs(d) == 0);
    let v = d.join("storage/volumes/web/state/etc/hostname");
    assert_eq!(std::fs::read_to_string(v).unwrap(), "after\n", "the disk is as before the failed restore");
    std::fs::write(&state, good).unwrap();

    // A copy from the stateful snapshot: its first start restores the saved VM.
    let mut copy = instance(d, &[]);
    copy.name = "copy".into();
    copy.id = "89abcdef-4567-89ef-0123-456789abcdef".into();
    copy.dir = d.join("instances/copy");
    let e = drv.copy_from_snapshot(&inst, "cold", &copy, true).await.unwrap_err();
    assert!(matches!(e, skiff_driver::DriverError::Unsupported(_)), "{e:?}");
    assert!(!d.join("storage/volumes/copy").exists(), "nothing half-made");
    drv.copy_from_snapshot(&inst, "warm", &copy, true).await.unwrap();
    assert!(drv.has_saved_state(&copy));
    drv.start(&inst).await.unwrap();
    drv.start(&copy).await.unwrap();
    assert!(!drv.has_saved_state(&copy), "used up by the start");
    let copy_root = d.join("storage/volumes/copy/rootfs");
    assert_eq!(std::fs::read_to_string(copy_root.join("etc/hostname")).unwrap(), "warm\n");
    let console = std::fs::read_to_string(drv.console_log(&copy)).unwrap();
    assert!(console.contains("restored from"), "{console}");
    drv.agent(&copy).unwrap().ping().await.unwrap();
    drv.stop(&copy, Duration::ZERO, true).await.unwrap();
    drv.stop(&inst, Duration::ZERO, true).await.unwrap();

    // Rename and delete carry the memory state.
    drv.snapshot_rename(&inst, "warm", "warm2").await.unwrap();
    assert!(drv.snapshot_is_stateful(&inst, "warm2") && !drv.snapshot_is_stateful(&inst, "warm"));
    drv.snapshot_delete(&inst, "warm2").await.unwrap();
    assert!(!inst.dir.join("snapshots/warm2").exists());
    drv.delete(&copy).await.unwrap();
    drv.delete(&inst).await.unwrap();
    assert_eq!(runtime_dirs(d), 0);
}
