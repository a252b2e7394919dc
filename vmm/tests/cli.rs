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

/// Bad disk images (a truncated qcow2 header, tables outside the file, a
/// backing file with no recorded format or that is not a file, a qcow2
/// file given without a format) are refused with status 2 before any vCPU
/// runs, and nothing is created (the firmware's variable store included).
#[test]
fn bad_disk_images_are_refused_before_any_vm() {
    let dir = tempfile::tempdir().unwrap();
    let at = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let qemu_img = |args: &[&str]| {
        let ok = Command::new("qemu-img").args(args).status().expect("qemu-img (qemu-utils)");
        assert!(ok.success(), "qemu-img {args:?}");
    };
    let vars = at("vars.fd");
    let boot = |disk: &str| vmm(&["--firmware", "--firmware-vars", &vars, "--memory", "128", "--disk", disk]);
    qemu_img(&["create", "-q", "-f", "qcow2", &at("good.qcow2"), "64M"]);
    let good = std::fs::read(at("good.qcow2")).unwrap();

    std::fs::write(at("short.qcow2"), &good[..60]).unwrap();
    expect_usage_error(&boot(&format!("path={},format=qcow2", at("short.qcow2"))), "too short for a qcow2 header");

    // The L1 table moved past the end of the file.
    let mut far = good.clone();
    far[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes());
    std::fs::write(at("far.qcow2"), &far).unwrap();
    expect_usage_error(&boot(&format!("path={},format=qcow2", at("far.qcow2"))), "lies outside the file");

    // The refcount table likewise.
    let mut far = good.clone();
    far[48..56].copy_from_slice(&(1u64 << 40).to_be_bytes());
    std::fs::write(at("far-rc.qcow2"), &far).unwrap();
    expect_usage_error(&boot(&format!("path={},format=qcow2", at("far-rc.qcow2"))), "lies outside the file");

    // qemu-img no longer writes an overlay without the backing format:
    // turn the format extension into the end of the extensions.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        &at("good.qcow2"),
        "-F",
        "qcow2",
        &at("noformat.qcow2"),
        "64M",
    ]);
    let mut img = std::fs::read(at("noformat.qcow2")).unwrap();
    let ext = img.windows(4).position(|w| w == [0xe2, 0x79, 0x2a, 0xca]).expect("backing format extension");
    img[ext..ext + 8].fill(0);
    std::fs::write(at("noformat.qcow2"), &img).unwrap();
    expect_usage_error(&boot(&format!("path={},format=qcow2", at("noformat.qcow2"))), "no recorded format");

    qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", "/dev/zero", "-F", "raw", &at("dev.qcow2"), "64M"]);
    expect_usage_error(&boot(&format!("path={},format=qcow2", at("dev.qcow2"))), "not a regular file");

    expect_usage_error(&boot(&format!("path={}", at("good.qcow2"))), "no format was given");
    expect_usage_error(&boot(&format!("path={},format=vmdk", at("good.qcow2"))), "invalid value \"vmdk\" for format");
    assert!(!std::path::Path::new(&vars).exists(), "no variable store was made");
}
