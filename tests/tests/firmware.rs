//! skiff-vmm booting UEFI firmware: Debian's OVMF (`OVMF_CODE_4M.fd`, the
//! `ovmf` package) to its UEFI shell with an empty virtio-blk disk (one
//! boot, many checks), and bad firmware files refused before any vCPU
//! runs.
//!
//! In the KVM box this needs the box QEMU with the fix of
//! `tests/box/build-qemu` (Debian's QEMU aborts when a nested guest runs
//! firmware); `tests/run` runs this file in a box on it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use skiff_tests::{scratch, vmm_binary, RunningVm};

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// Firmware in the box is slow (about a minute to the shell, measured).
const SHELL_TIMEOUT: Duration = Duration::from_secs(420);

/// Runs skiff-vmm with `args` (a VM that must not start); returns its exit
/// code and stderr.
fn refused(args: &[&str]) -> Result<(i32, String)> {
    let out = Command::new(vmm_binary()?)
        .args(args)
        .args(["--serial", "off"])
        .stdin(Stdio::null())
        .output()
        .context("cannot run skiff-vmm")?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(!stderr.contains("booting firmware"), "a bad firmware got as far as booting: {stderr}");
    Ok((out.status.code().unwrap_or(-1), stderr))
}

fn expect_refused(args: &[&str], message: &str) -> Result<()> {
    let (code, stderr) = refused(args)?;
    ensure!(code == 2, "{args:?}: exit status {code}, expected 2; stderr: {stderr}");
    ensure!(stderr.contains(message), "{args:?}: stderr lacks {message:?}: {stderr}");
    println!("refused as expected: {}", stderr.trim());
    Ok(())
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn bad_input(dir: &Path) -> Result<()> {
    let vars = dir.join("bad-vars.fd");
    expect_refused(
        &["--firmware", "/nonexistent/OVMF_CODE.fd", "--firmware-vars", s(&vars)],
        "cannot read the firmware /nonexistent/OVMF_CODE.fd",
    )?;
    // Garbage of a plausible size, named like OVMF's code.
    let garbage = dir.join("OVMF_CODE_garbage.fd");
    std::fs::write(
        &garbage,
        (0..0x37c000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect::<Vec<_>>(),
    )?;
    expect_refused(&["--firmware", s(&garbage), "--firmware-vars", s(&vars)], "is not a UEFI firmware volume")?;
    // A truncated image.
    let short = dir.join("short.fd");
    std::fs::write(&short, &std::fs::read(OVMF_CODE)?[..1000])?;
    expect_refused(&["--firmware", s(&short), "--firmware-vars", s(&vars)], "must be a non-zero multiple of 4096")?;
    // No template for a missing variable store: nothing is created.
    let code_copy = dir.join("firmware.fd");
    std::fs::copy(OVMF_CODE, &code_copy)?;
    expect_refused(&["--firmware", s(&code_copy), "--firmware-vars", s(&vars)], "no template")?;
    ensure!(!vars.exists(), "a refused start left a variable store behind");
    // A variable store of the 2 MiB build with the 4 MiB code.
    let small_vars = dir.join("small-vars.fd");
    std::fs::copy("/usr/share/OVMF/OVMF_VARS.fd", &small_vars)?;
    expect_refused(&["--firmware", OVMF_CODE, "--firmware-vars", s(&small_vars)], "does not fit the firmware")?;
    // Garbage as the variable store.
    let bad_store = dir.join("garbage-vars.fd");
    std::fs::write(&bad_store, vec![0x42u8; 0x84000])?;
    expect_refused(&["--firmware", OVMF_CODE, "--firmware-vars", s(&bad_store)], "is not a UEFI firmware volume")?;
    // --firmware with a kernel is a usage error.
    let (code, stderr) = refused(&["--firmware", "--firmware-vars", s(&vars), "--kernel", "/vmlinuz"])?;
    ensure!(code == 2 && stderr.contains("cannot be used with"), "--firmware with --kernel: {code} {stderr}");
    Ok(())
}

/// The time from start until the serial output contains `needle`.
fn milestone(vm: &mut RunningVm, needle: &str, start: Instant) -> Result<Duration> {
    vm.wait_for_serial(needle, SHELL_TIMEOUT.saturating_sub(start.elapsed()))?;
    let t = start.elapsed();
    println!("{:>7.1} s  {needle}", t.as_secs_f64());
    Ok(t)
}

#[test]
#[ignore = "boots firmware: needs hardware KVM (or the box); run through tests/run"]
fn ovmf_boots_to_the_uefi_shell_and_bad_firmware_is_refused() -> Result<()> {
    let dir = scratch()?;
    bad_input(dir.path())?;

    let vars: PathBuf = dir.path().join("vm-vars.fd");
    let disk = dir.path().join("empty.img");
    std::fs::File::create(&disk)?.set_len(64 << 20)?;
    let disk_arg = format!("path={}", s(&disk));
    let args: Vec<String> =
        ["--firmware", "--firmware-vars", s(&vars), "--cpus", "2", "--memory", "256", "--disk", &disk_arg]
            .map(String::from)
            .to_vec();
    let start = Instant::now();
    let mut vm = RunningVm::start_firmware(&args)?;
    // The console comes up (BDS connected COM1 below the PIIX3 ISA
    // bridge); the boot manager tries the disk (OVMF's virtio-blk driver
    // on Skiff's device in slot 2, its BARs where the firmware put them;
    // an empty disk has nothing to boot) and starts the built-in shell,
    // which lists the disk as a block device and prompts.
    milestone(&mut vm, "BdsDxe: failed to load Boot0001 \"UEFI Misc Device\" from PciRoot(0x0)/Pci(0x2,0x0)", start)?;
    milestone(&mut vm, "BdsDxe: starting Boot0002 \"EFI Internal Shell\"", start)?;
    milestone(&mut vm, "UEFI Interactive Shell", start)?;
    // (The device names come with colour escapes around them.)
    milestone(&mut vm, "BLK0", start)?;
    milestone(&mut vm, "Shell> ", start)?;
    let log = vm.stderr();
    ensure!(log.contains("booting firmware /usr/share/OVMF/OVMF_CODE_4M.fd"), "no firmware line in the log: {log}");
    ensure!(log.contains("created from /usr/share/OVMF/OVMF_VARS_4M.fd"), "the store was not made from the template");
    ensure!(!log.contains("ERROR") && !log.contains("panicked"), "errors in the VMM log: {log}");
    ensure!(!log.contains("not moved"), "the VMM refused a BAR the firmware placed: {log}");
    // The firmware wrote variables (boot options) through to the VM's own
    // copy; the template is untouched.
    let store = std::fs::read(&vars)?;
    let template = std::fs::read(OVMF_VARS)?;
    ensure!(store.len() == template.len(), "the variable store changed size");
    ensure!(store != template, "the firmware wrote no variable into the store");
    // The VMM stops cleanly on SIGTERM with the firmware running.
    vm.signal(libc::SIGTERM)?;
    let out = vm.wait(Duration::from_secs(30))?;
    ensure!(out.status.code() == Some(0), "SIGTERM should end the VMM with 0, got {}", out.status);
    Ok(())
}
