//! Bad command lines and files: each gets a clear error and exit status 2
//! before any VM is created (so these run on any host, KVM or not).

use std::io::Write;
use std::process::{Command, Output};

fn vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_skiff-vmm")).args(args).output().unwrap()
}

fn expect_usage_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
}

#[test]
fn help_documents_every_option() {
    let out = vmm(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--kernel",
        "--initramfs",
        "--cmdline",
        "--cpus",
        "--memory",
        "--serial",
        "--api-socket",
        "--firmware",
        "--firmware-vars",
        "--reset-exit-code",
        "Exit status",
    ] {
        assert!(text.contains(opt), "--help lacks {opt}");
    }
}

#[test]
fn a_reset_exit_code_must_be_a_status() {
    expect_usage_error(
        &vmm(&["--firmware", "--firmware-vars", "/v.fd", "--reset-exit-code", "256"]),
        "reset-exit-code",
    );
    expect_usage_error(&vmm(&["--firmware", "--firmware-vars", "/v.fd", "--reset-exit-code", "x"]), "reset-exit-code");
}

#[test]
fn missing_and_bogus_kernels() {
    expect_usage_error(&vmm(&["--kernel", "/nonexistent/vmlinux"]), "cannot open /nonexistent/vmlinux");
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(b"#!/bin/sh\nexit 0\n").unwrap();
    expect_usage_error(&vmm(&["--kernel", f.path().to_str().unwrap()]), "is not a Linux kernel");
}

#[test]
fn truncated_kernels() {
    let dir = tempfile::tempdir().unwrap();
    for candidate in std::fs::read_dir("/boot").into_iter().flatten().flatten() {
        let name = candidate.file_name().to_string_lossy().to_string();
        if !name.starts_with("vmlinuz-") {
            continue;
        }
        let data = std::fs::read(candidate.path()).unwrap_or_default();
        if data.len() < 0x10000 {
            continue;
        }
        let cut = dir.path().join("cut");
        std::fs::write(&cut, &data[..data.len() / 2]).unwrap();
        expect_usage_error(&vmm(&["--kernel", cut.to_str().unwrap()]), "is truncated");
        return;
    }
    // Without a kernel in /boot, craft the header of one.
    let mut img = vec![0u8; 0x2000];
    img[0x1f1] = 4;
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x24c..0x250].copy_from_slice(&0x10_0000u32.to_le_bytes());
    let cut = dir.path().join("cut");
    std::fs::write(&cut, img).unwrap();
    expect_usage_error(&vmm(&["--kernel", cut.to_str().unwrap()]), "is truncated");
}

#[test]
fn impossible_sizes() {
    let k = "/nonexistent";
    expect_usage_error(&vmm(&["--kernel", k, "--cpus", "0"]), "--cpus must be between 1 and 254");
    expect_usage_error(&vmm(&["--kernel", k, "--cpus", "255"]), "--cpus must be between 1 and 254");
    expect_usage_error(&vmm(&["--kernel", k, "--cpus", "100000"]), "--cpus");
    expect_usage_error(&vmm(&["--kernel", k, "--memory", "4"]), "at least 32 MiB");
    expect_usage_error(&vmm(&["--kernel", k, "--memory", "999999999"]), "more than this host's");
    expect_usage_error(&vmm(&["--kernel", k, "--serial", "tcp:1"]), "invalid serial");
}

#[test]
fn empty_initramfs() {
    let kernel = std::fs::read_dir("/boot")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")));
    let Some(kernel) = kernel else { return };
    let empty = tempfile::NamedTempFile::new().unwrap();
    expect_usage_error(
        &vmm(&["--kernel", kernel.to_str().unwrap(), "--initramfs", empty.path().to_str().unwrap()]),
        "is empty",
    );
}

#[test]
fn bad_firmware_is_refused_before_any_vm() {
    let dir = tempfile::tempdir().unwrap();
    let vars = dir.path().join("vars.fd");
    let v = vars.to_str().unwrap();
    expect_usage_error(
        &vmm(&["--firmware", "/nonexistent/OVMF_CODE.fd", "--firmware-vars", v]),
        "cannot read the firmware",
    );
    let garbage = dir.path().join("OVMF_CODE_x.fd");
    std::fs::write(&garbage, vec![0x5au8; 0x10000]).unwrap();
    expect_usage_error(
        &vmm(&["--firmware", garbage.to_str().unwrap(), "--firmware-vars", v]),
        "is not a UEFI firmware volume",
    );
    std::fs::write(&garbage, vec![0x5au8; 1000]).unwrap();
    expect_usage_error(&vmm(&["--firmware", garbage.to_str().unwrap(), "--firmware-vars", v]), "multiple of 4096");
    // No template beside it (OVMF_VARS_x.fd): nothing is created.
    let mut fv = vec![0u8; 0x10000];
    fv[40..44].copy_from_slice(b"_FVH");
    std::fs::write(&garbage, &fv).unwrap();
    expect_usage_error(&vmm(&["--firmware", garbage.to_str().unwrap(), "--firmware-vars", v]), "no template");
    assert!(!vars.exists());
    // Firmware and variable store that do not make a power of two.
    std::fs::write(&vars, &fv[..0x3000]).unwrap();
    expect_usage_error(&vmm(&["--firmware", garbage.to_str().unwrap(), "--firmware-vars", v]), "does not fit");
    // Usage: --firmware needs --firmware-vars and excludes --kernel.
    expect_usage_error(&vmm(&["--firmware"]), "--firmware-vars");
    expect_usage_error(&vmm(&["--firmware", "--firmware-vars", v, "--kernel", "/k"]), "cannot be used with");
}
