//! Host-side tests of skiff-run without a guest: a VMM whose agent never
//! answers gives a timeout error (not a hang) and leaves nothing behind;
//! a VMM that dies early is reported; the CLI's errors are clear.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use skiff_run::kernel::{Kernel, KernelOrigin};
use skiff_run::{Share, ThinVm, VmError, VmOptions};

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// A fake virtiofsd: creates its socket file, records its pid, waits.
fn fake_virtiofsd(dir: &Path) -> PathBuf {
    let body = format!(
        "for a in \"$@\"; do case $a in --socket-path=*) touch \"${{a#--socket-path=}}\";; esac; done\n\
         echo $$ >> {}/pids\nexec sleep 600",
        dir.display()
    );
    script(dir, "virtiofsd", &body)
}

fn options(dir: &Path, vmm: PathBuf, timeout: Duration) -> VmOptions {
    std::fs::create_dir_all(dir.join("rootfs")).unwrap();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    VmOptions {
        name: "silent".into(),
        runtime_root: dir.join("run"),
        rootfs: dir.join("rootfs"),
        shares: vec![Share { tag: "data".into(), dir: dir.join("data") }],
        kernel: Kernel {
            path: dir.join("vmlinux"),
            version: None,
            needs_modules: false,
            origin: KernelOrigin::Explicit,
        },
        initramfs: dir.join("initramfs"),
        cpus: 1,
        memory_mib: 128,
        hostname: None,
        vmm,
        virtiofsd: fake_virtiofsd(dir),
        boot_timeout: timeout,
        bundle: "test".into(),
    }
}

fn pids(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn gone(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence (a reaped child is gone).
    unsafe { libc::kill(pid, 0) != 0 }
}

#[tokio::test]
async fn silent_agent_times_out_and_everything_is_cleaned_up() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let vmm = script(d, "vmm", &format!("echo $$ >> {}/pids\necho 'fake vmm up' >&2\nexec sleep 600", d.display()));
    let opts = options(d, vmm, Duration::from_secs(2));
    let t = Instant::now();
    let err = ThinVm::boot(&opts).await.err().expect("boot must fail");
    assert!(t.elapsed() < Duration::from_secs(15), "took {:?}", t.elapsed());
    assert!(matches!(err, VmError::AgentTimeout { secs: 2, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("did not answer within 2 s") && msg.contains("fake vmm up"), "{msg}");
    let p = pids(d);
    assert_eq!(p.len(), 3, "two virtiofsd and the vmm started: {p:?}");
    assert!(p.iter().all(|&pid| gone(pid)), "left running: {p:?}");
    assert!(!d.join("run/silent").exists(), "runtime dir left behind");
}

#[tokio::test]
async fn vmm_dying_early_is_reported_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let vmm = script(d, "vmm", "echo 'skiff-vmm: bad kernel' >&2; exit 2");
    let opts = options(d, vmm, Duration::from_secs(60));
    let t = Instant::now();
    let err = ThinVm::boot(&opts).await.err().expect("boot must fail");
    assert!(t.elapsed() < Duration::from_secs(15));
    match &err {
        VmError::VmmExited { status, report } => {
            assert_eq!(status.code(), Some(2));
            assert!(report.contains("bad kernel"), "{report}");
        }
        other => panic!("{other:?}"),
    }
    assert!(pids(d).iter().all(|&pid| gone(pid)));
    assert!(!d.join("run/silent").exists());
}

fn skiff_run(args: &[&str], root: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_skiff-run")).args(args).env("SKIFF_RUN_ROOT", root).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn cli_errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("run");
    let (code, err) = skiff_run(&["/nonexistent/bundle"], &root);
    assert_eq!(code, 125);
    assert!(err.contains("bundle /nonexistent/bundle does not exist"), "{err}");
    let (code, err) = skiff_run(&["exec", "nosuch", "--", "true"], &root);
    assert_eq!(code, 125);
    assert!(err.contains("no VM named nosuch is running"), "{err}");
    let (code, err) = skiff_run(&["kill", "nosuch", "BOGUS"], &root);
    assert_eq!(code, 125);
    assert!(err.contains("unknown signal"), "{err}");
    let (code, err) = skiff_run(&["--name", "a/b", tmp.path().to_str().unwrap()], &root);
    assert_eq!(code, 125, "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_skiff-run")).arg("list").env("SKIFF_RUN_ROOT", &root).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("NAME"));
    let help = Command::new(env!("CARGO_BIN_EXE_skiff-run")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for word in ["exec", "list", "kill", "--kernel", "--cpus", "--memory", "--name", "BUNDLE"] {
        assert!(help.contains(word), "--help lacks {word}: {help}");
    }
}
