//! Boots real guests with skiff-vmm: Debian's cloud kernel as bzImage and
//! as a PVH vmlinux (and the project kernel, `scripts/build-kernel`), with the
//! busybox initramfs of `tests/guest/boot-init.sh`.
//! Each boot checks several things; see the module docs of `skiff-tests`
//! for how these run (inside the KVM box unless the host has hardware KVM).

use std::time::Duration;

use anyhow::{ensure, Result};
use skiff_tests::{artifact, scratch, Outcome, RunningVm, VmSpec};
use skiff_vmm_client::{Client, ClientError};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";

fn spec(kernel: &str, cpus: u8, memory_mib: u64, end: &str) -> Result<VmSpec> {
    Ok(VmSpec {
        kernel: artifact(kernel)?,
        initramfs: Some(artifact("boot-test.cpio")?),
        cmdline: format!("{CMDLINE} skiff.end={end}"),
        cpus,
        memory_mib,
        api_socket: None,
    })
}

fn boot(spec: &VmSpec) -> Result<Outcome> {
    let out = RunningVm::start(spec)?.wait(BOOT_TIMEOUT)?;
    println!("--- serial ({:?}) ---\n{}\n--- stderr ---\n{}", out.elapsed, out.serial, out.stderr);
    Ok(out)
}

/// Checks what every boot must show: init ran, every vCPU is online with
/// its own APIC ID, the memory asked for is in the e820 map, the ACPI tables
/// are there, and the boot-complete port write was logged.
fn check_guest(out: &Outcome, cpus: u8, memory_mib: u64) -> Result<()> {
    ensure!(out.serial.contains("SKIFF-INIT-OK"), "init did not run");
    ensure!(out.value("NPROC") == Some(cpus.to_string()), "guest sees {:?} CPUs, expected {cpus}", out.value("NPROC"));
    let online = if cpus == 1 { "0".to_string() } else { format!("0-{}", cpus - 1) };
    ensure!(out.value("ONLINE") == Some(online.clone()), "online CPUs {:?}, expected {online}", out.value("ONLINE"));
    let apic_ids: Vec<String> =
        out.value("APIC-IDS").unwrap_or_default().split_whitespace().map(String::from).collect();
    let want: Vec<String> = (0..cpus).map(|i| i.to_string()).collect();
    ensure!(apic_ids == want, "APIC IDs {apic_ids:?}, expected {want:?}");
    // The kernel's "Memory: avail/total" total is the e820 RAM: all of the
    // memory asked for but the legacy hole below 1 MiB and page 0.
    let total_kb: u64 = out.value("E820-KB").and_then(|v| v.parse().ok()).unwrap_or(0);
    let want_kb = memory_mib * 1024;
    ensure!(
        total_kb <= want_kb && total_kb + 1024 >= want_kb,
        "guest RAM {total_kb} KiB, expected about {want_kb} KiB"
    );
    let memtotal: u64 = out.value("MEMTOTAL-KB").and_then(|v| v.parse().ok()).unwrap_or(0);
    ensure!(memtotal > want_kb * 3 / 4 && memtotal <= want_kb, "MemTotal {memtotal} KiB for {want_kb} KiB");
    let tables = out.value("ACPI-TABLES").unwrap_or_default();
    for t in ["APIC", "DSDT", "FACP"] {
        ensure!(tables.split_whitespace().any(|x| x == t), "ACPI table {t} missing: {tables}");
    }
    ensure!(!out.serial.contains("SKIFF-BOOTMARK-FAILED"), "the boot-complete write failed");
    ensure!(out.stderr.contains("guest boot complete:"), "the VMM did not log the boot-complete port write");
    Ok(())
}

#[test]
#[ignore = "boots a guest: needs hardware KVM; run through tests/run"]
fn bzimage_one_vcpu_powers_off_cleanly() -> Result<()> {
    let out = boot(&spec("vmlinuz", 1, 256, "poweroff")?)?;
    check_guest(&out, 1, 256)?;
    ensure!(out.status.code() == Some(0), "poweroff should end the VMM with 0, got {}", out.status);
    ensure!(out.stderr.contains("guest powered off"), "no poweroff message");
    Ok(())
}

#[test]
#[ignore = "boots a guest: needs hardware KVM; run through tests/run"]
fn bzimage_four_vcpus_above_4g_reboots_cleanly() -> Result<()> {
    // 3.5 GiB: RAM continues above the 32-bit MMIO hole.
    let out = boot(&spec("vmlinuz", 4, 3584, "reboot")?)?;
    check_guest(&out, 4, 3584)?;
    ensure!(out.status.code() == Some(0), "reboot should end the VMM with 0, got {}", out.status);
    ensure!(out.stderr.contains("guest reset"), "no reset message");
    Ok(())
}

#[test]
#[ignore = "boots a guest: needs hardware KVM; run through tests/run"]
fn pvh_vmlinux_serves_api_and_stops_on_sigterm() -> Result<()> {
    let dir = scratch()?;
    let sock = dir.path().join("api.sock");
    let mut spec = spec("vmlinux", 2, 512, "wait")?;
    spec.api_socket = Some(sock.clone());
    let mut vm = RunningVm::start(&spec)?;
    vm.wait_for_serial("SKIFF-END=wait", BOOT_TIMEOUT)?;
    let api = Client::new(&sock);
    let ping = api.ping()?;
    ensure!(ping.pid == vm.pid(), "ping: {ping:?}");
    let info = api.info()?;
    ensure!(info.cpus.boot == 2 && info.cpus.present == 2 && info.memory.boot_mib == 512, "info: {info:?}");
    let counters = api.counters()?;
    ensure!(counters.vm_exits.values().sum::<u64>() > 0, "no VM exits counted: {counters:?}");
    // A bad request gets a clear error, and the VM goes on.
    match api.resize(&skiff_vmm_client::types::Resize { vcpus: Some(9), memory_mib: None }) {
        Err(ClientError::Refused { status: 409, message, .. }) => ensure!(message.contains("1 to 2"), "{message}"),
        other => anyhow::bail!("a resize beyond max should be refused with 409: {other:?}"),
    }
    match api.resize(&skiff_vmm_client::types::Resize { vcpus: None, memory_mib: Some(1024) }) {
        Err(ClientError::Refused { status: 409, message, .. }) => {
            ensure!(message.contains("no memory hot-plug region"), "{message}")
        }
        other => anyhow::bail!("a memory resize without a region should be refused with 409: {other:?}"),
    }
    api.pause()?;
    ensure!(api.info()?.state == skiff_vmm_client::types::VmState::Paused, "not paused");
    api.resume()?;
    vm.signal(libc::SIGTERM)?;
    let out = vm.wait(Duration::from_secs(30))?;
    println!("--- serial ---\n{}\n--- stderr ---\n{}", out.serial, out.stderr);
    check_guest(&out, 2, 512)?;
    ensure!(out.status.code() == Some(0), "SIGTERM should stop the VMM with 0, got {}", out.status);
    ensure!(out.stderr.contains("received SIGTERM"), "no SIGTERM message");
    ensure!(!sock.exists(), "API socket left behind");
    Ok(())
}

#[test]
#[ignore = "boots a guest: needs hardware KVM; run through tests/run"]
fn kernel_panic_is_a_failure_not_a_hang() -> Result<()> {
    let mut spec = spec("vmlinuz", 1, 256, "poweroff")?;
    // No panic=-1: without the VMM noticing, this guest would spin forever.
    spec.cmdline = "console=ttyS0 reboot=k quiet init=/nonexistent rdinit=/nonexistent".into();
    let out = boot(&spec)?;
    ensure!(out.status.code() == Some(3), "a panic should end the VMM with 3, got {}", out.status);
    ensure!(out.stderr.contains("guest kernel panicked: Kernel panic - not syncing"), "no panic message");
    Ok(())
}

#[test]
#[ignore = "runs a guest: needs hardware KVM; run through tests/run"]
fn triple_fault_is_a_failure_with_a_clear_message() -> Result<()> {
    let dir = scratch()?;
    let kernel = dir.path().join("ud2.elf");
    // `ud2` with the VMM's empty boot IDT: #UD, then #GP, then #DF cannot be
    // delivered, which is a triple fault.
    std::fs::write(&kernel, skiff_tests::tiny_pvh_kernel(&[0x0f, 0x0b]))?;
    let spec = VmSpec { kernel, initramfs: None, cmdline: String::new(), cpus: 1, memory_mib: 64, api_socket: None };
    let out = RunningVm::start(&spec)?.wait(Duration::from_secs(60))?;
    println!("--- stderr ---\n{}", out.stderr);
    ensure!(out.status.code() == Some(1), "a triple fault should end the VMM with 1, got {}", out.status);
    ensure!(out.stderr.contains("triple fault"), "no triple-fault message");
    Ok(())
}

/// The project's guest kernel (`scripts/build-kernel`, everything built in)
/// boots as a PVH vmlinux with 2 vCPUs, and has what OCI images expect:
/// `skiff-kernel-check` (inotify, fanotify, io_uring, POSIX message queues,
/// cgroup v2, namespaces) passes inside the guest.
#[test]
#[ignore = "boots a guest: needs hardware KVM; run through tests/run"]
fn project_kernel_boots_and_has_what_images_need() -> Result<()> {
    let mut spec = spec("skiff-vmlinux", 2, 512, "poweroff")
        .map_err(|e| e.context("the project kernel is built by scripts/build-kernel (scripts/setup runs it)"))?;
    spec.cmdline.push_str(" skiff.kcheck=1");
    let out = boot(&spec)?;
    check_guest(&out, 2, 512)?;
    for check in ["INOTIFY", "FANOTIFY", "IO-URING", "MQUEUE", "CGROUP2", "NAMESPACES"] {
        let v = out.value(&format!("KCHECK-{check}")).unwrap_or_default();
        ensure!(v.starts_with("ok"), "kernel check {check}: {v:?}");
    }
    ensure!(out.value("KCHECK").as_deref() == Some("ok"), "kernel checks did not all pass");
    ensure!(out.status.code() == Some(0), "poweroff should end the VMM with 0, got {}", out.status);
    ensure!(out.stderr.contains("guest powered off"), "no poweroff message");
    Ok(())
}
