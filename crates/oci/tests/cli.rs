//! The command line: every command documents itself; bad usage fails.

use std::process::Command;

fn skiff_oci() -> Command {
    Command::new(env!("CARGO_BIN_EXE_skiff-oci"))
}

#[test]
fn every_command_has_help() {
    let top = skiff_oci().arg("--help").output().unwrap();
    assert!(top.status.success());
    let text = String::from_utf8_lossy(&top.stdout);
    assert!(
        text.contains("without a daemon") && text.contains("Examples:"),
        "{text}"
    );
    for (cmd, words) in [
        (
            "pull",
            &["REF", "DEST", "--insecure", "--store", "--platform"][..],
        ),
        ("import", &["PATH", "DEST", "docker-archive"]),
        ("inspect", &["REF"]),
        ("list", &["List"]),
        ("delete", &["uses it"]),
        ("prune", &["--all"]),
        ("fetch", &["REF"]),
    ] {
        let out = skiff_oci().args([cmd, "--help"]).output().unwrap();
        assert!(out.status.success(), "{cmd}");
        let text = String::from_utf8_lossy(&out.stdout);
        for w in words {
            assert!(text.contains(w), "{cmd} --help lacks {w}: {text}");
        }
    }
}

#[test]
fn usage_errors_exit_nonzero() {
    let dir = tempfile::tempdir().unwrap();
    let out = skiff_oci().arg("pull").output().unwrap();
    assert!(!out.status.success());
    let out = skiff_oci()
        .arg("--store")
        .arg(dir.path())
        .args(["import", "/nonexistent/layout", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("importing /nonexistent/layout") && err.contains("not found"),
        "{err}"
    );
    let out = skiff_oci()
        .arg("--store")
        .arg(dir.path())
        .args(["delete", "nothing:here"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in the store"));
}
