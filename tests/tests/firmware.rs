//! skiff-vmm booting UEFI firmware: Debian's OVMF (`OVMF_CODE_4M.fd`, the
//! `ovmf` package) to its UEFI shell with an empty virtio-blk disk (one
//! boot, many checks), and bad firmware files refused before any vCPU
//! runs; then a real OS: the Debian 12 disk of
//! `tests/images/build-debian-disk` through OVMF, GRUB and Linux to
//! systemd and skiff-agent as a service, with a cloud-init NoCloud seed,
//! Skiff's SMBIOS tables and a boot entry made with efibootmgr; then a
//! second boot of the same disk and variables without the seed (two
//! boots, many checks each).
//!
//! In the KVM box this needs the box QEMU with the fix of
//! `tests/box/build-qemu` (Debian's QEMU aborts when a nested guest runs
//! firmware); `tests/run` runs this file in a box on it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use skiff_agent_client::{AgentClient, EventListener, Timeouts, Transport};
use skiff_agent_proto::{Event, ExecRequest, PowerAction, AGENT_VSOCK_PORT};
use skiff_tests::fixture::sha256;
use skiff_tests::{scratch, vmm_binary};

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// The vendor GUID of the variable the test writes.
const VAR_GUID: &str = "5d4a8f2e-8b3c-4b5e-9a6f-1c2d3e4f5a6b";
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

/// A firmware VM whose console is the VMM's stdin and stdout (so the test
/// can type into the firmware's shell), stdout and stderr in files.
struct FirmwareVm {
    child: Child,
    serial: PathBuf,
    stderr: PathBuf,
}

impl FirmwareVm {
    fn start(dir: &Path, args: &[String]) -> Result<Self> {
        let (serial, stderr) = (dir.join("serial.log"), dir.join("stderr.log"));
        let child = Command::new(vmm_binary()?)
            .args(args)
            .args(["--serial", "stdout"])
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&serial)?)
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()
            .context("cannot start skiff-vmm")?;
        Ok(Self { child, serial, stderr })
    }

    fn serial(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until the console shows `needle` (counting from byte `from`)
    /// and prints when.
    fn milestone(&mut self, needle: &str, from: usize, start: Instant) -> Result<usize> {
        loop {
            let out = self.serial();
            if let Some(at) = out.get(from..).and_then(|rest| rest.find(needle)) {
                println!("{:>7.1} s  {needle}", start.elapsed().as_secs_f64());
                return Ok(from + at + needle.len());
            }
            if let Some(st) = self.child.try_wait()? {
                bail!("skiff-vmm exited ({st}) before {needle:?}\n{out}\n{}", self.stderr());
            }
            if start.elapsed() > SHELL_TIMEOUT {
                bail!("no {needle:?} within {SHELL_TIMEOUT:?}\n{out}\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for each of `needles` in turn, from byte `from`; returns where
    /// the last ended.
    fn milestones(&mut self, needles: &[&str], from: usize, start: Instant) -> Result<usize> {
        needles.iter().try_fold(from, |at, needle| self.milestone(needle, at, start))
    }

    /// Types `line` and Enter, in pieces the UART's 64-byte FIFO takes
    /// (the VMM drops what does not fit), with time for the firmware to
    /// read each.
    fn type_line(&mut self, line: &str) -> Result<()> {
        let stdin = self.child.stdin.as_mut().context("no stdin")?;
        for piece in format!("{line}\r").as_bytes().chunks(24) {
            stdin.write_all(piece)?;
            stdin.flush()?;
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(())
    }

    /// Types `reset -s` at the prompt found after byte `at` and waits for
    /// the VMM to end, which must be with 0 and the power-off message.
    fn power_off(&mut self, at: usize, start: Instant) -> Result<()> {
        self.milestone("Shell> ", at, start)?;
        self.type_line("reset -s")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(st) = self.child.try_wait()? {
                break st;
            }
            ensure!(Instant::now() < deadline, "the VM did not power off after reset -s\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(100));
        };
        ensure!(status.code() == Some(0), "power-off should end the VMM with 0, got {status}\n{}", self.stderr());
        ensure!(self.stderr().contains("guest powered off"), "no power-off message: {}", self.stderr());
        Ok(())
    }
}

impl Drop for FirmwareVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    let mut vm = FirmwareVm::start(dir.path(), &args)?;
    // The console comes up (BDS connected COM1 below the PIIX3 ISA
    // bridge); the boot manager tries the disk (OVMF's virtio-blk driver
    // on Skiff's device in slot 2, its BARs where the firmware put them;
    // an empty disk has nothing to boot) and starts the built-in shell,
    // which lists the disk as a block device and prompts.
    // (The device names come with colour escapes around them: BLK0 alone.)
    let at = vm.milestones(
        &[
            "BdsDxe: failed to load Boot0001 \"UEFI Misc Device\" from PciRoot(0x0)/Pci(0x2,0x0)",
            "BdsDxe: starting Boot0002 \"EFI Internal Shell\"",
            "UEFI Interactive Shell",
            "BLK0",
            "Shell> ",
        ],
        0,
        start,
    )?;
    // The console takes input: a command the shell does not know.
    vm.type_line("skiffprobe")?;
    // (The shell colours the command's name.)
    let at = vm.milestone("skiffprobe", at, start)?;
    let at = vm.milestone("' is not recognized as an internal or external command", at, start)?;
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
    // The guest writes a non-volatile variable of its own...
    let at = vm.milestone("Shell> ", at, start)?;
    vm.type_line(&format!("setvar SkiffVar -guid {VAR_GUID} -nv -bs =Sskiffvar"))?;
    // ...and powers off with the shell's `reset -s`, through the PIIX4 PM
    // block (S5); the VMM ends with 0.
    vm.power_off(at + 1, start)?;
    drop(vm);

    // A new VMM on the same store: the variable is there.
    let dir2 = scratch()?;
    let start = Instant::now();
    let mut vm = FirmwareVm::start(dir2.path(), &args)?;
    let at = vm.milestone("Shell> ", 0, start)?;
    ensure!(!vm.stderr().contains("created from"), "the second boot made a new store");
    vm.type_line(&format!("dmpstore SkiffVar -guid {VAR_GUID}"))?;
    let at = vm.milestone("skiffvar", at, start)?;
    vm.power_off(at, start)?;
    Ok(())
}

/// Runs `sh -c script` through the agent; its stdout when it exits 0.
async fn sh(agent: &AgentClient, script: &str) -> Result<String> {
    let req = ExecRequest { argv: vec!["sh".into(), "-c".into(), script.into()], ..Default::default() };
    let out = agent.exec_output(req, None).await.with_context(|| format!("exec {script:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.code() == 0,
        "{script:?} exited {:?}: {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// What the test asks of the Debian VM.
const OS_CPUS: usize = 2;
const OS_MEMORY_MIB: u64 = 1024;
/// The VM's UUID (`--uuid`), the guest's SMBIOS system UUID.
const OS_UUID: &str = "5c1ff0a1-7e57-4d1a-8b2c-3d4e5f6a7b8c";
/// The NoCloud seed's hostname and instance.
const SEED_HOSTNAME: &str = "skiff-cloud";
const SEED_INSTANCE: &str = "skiff-test-1";
/// The boot entry the guest makes with efibootmgr.
const BOOT_ENTRY: &str = "Skiff test entry";

/// A NoCloud seed as cloud-init's docs describe it: a FAT file system
/// labelled `cidata` with `meta-data` (instance and hostname) and
/// `user-data` (a file written, a command run). Made with mkfs.fat and
/// mtools (scripts/packages/firmware.apt), no mounts.
fn nocloud_seed(dir: &Path) -> Result<PathBuf> {
    let meta = dir.join("meta-data");
    std::fs::write(&meta, format!("instance-id: {SEED_INSTANCE}\nlocal-hostname: {SEED_HOSTNAME}\n"))?;
    let user = dir.join("user-data");
    std::fs::write(
        &user,
        "#cloud-config\n\
         write_files:\n\
         \x20 - path: /etc/skiff-seed\n\
         \x20   content: \"written by cloud-init\\n\"\n\
         runcmd:\n\
         \x20 - [sh, -c, \"echo ran-by-runcmd > /root/skiff-runcmd\"]\n",
    )?;
    let seed = dir.join("seed.img");
    let run = |cmd: &mut Command| -> Result<()> {
        let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
        ensure!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    run(Command::new("mkfs.fat").args(["-n", "CIDATA", "-C"]).arg(&seed).arg("2048"))?;
    run(Command::new("mcopy").arg("-i").arg(&seed).arg(&meta).arg(&user).arg("::"))?;
    Ok(seed)
}

/// The checks on the running Debian guest, through the agent.
async fn check_debian_guest(agent: &AgentClient) -> Result<()> {
    // The agent's exec works; systemd is PID 1 (the agent is a service)
    // and brings the system up with no unit failed.
    ensure!(sh(agent, "cat /proc/1/comm").await?.trim() == "systemd", "PID 1 is not systemd");
    let system = sh(agent, "systemctl is-system-running --wait || systemctl --failed --no-legend").await?;
    ensure!(system.trim() == "running", "systemd: {system}");
    let state = sh(agent, "systemctl is-active skiff-agent.service").await?;
    ensure!(state.trim() == "active", "skiff-agent.service is {state}");
    // Booted through UEFI (the kernel's EFI stub from GRUB), from the disk.
    sh(agent, "test -d /sys/firmware/efi/efivars").await.context("the kernel did not boot through UEFI")?;
    let cmdline = sh(agent, "cat /proc/cmdline").await?;
    ensure!(cmdline.contains("console=ttyS0") && cmdline.contains("root=UUID="), "kernel command line: {cmdline}");
    let root = sh(agent, "findmnt -n -o SOURCE,OPTIONS /").await?;
    ensure!(root.starts_with("/dev/vda2 ") && root.contains("rw"), "the root file system: {root}");
    // The ESP (FAT) with GRUB as the removable-media fallback.
    let esp = sh(agent, "findmnt -n -o FSTYPE /boot/efi && ls /boot/efi/EFI/BOOT").await?;
    ensure!(esp.contains("vfat") && esp.contains("BOOTX64.EFI"), "the ESP: {esp}");
    // The resources asked for.
    let nproc: usize = sh(agent, "nproc").await?.trim().parse()?;
    ensure!(nproc == OS_CPUS, "nproc {nproc}, asked for {OS_CPUS}");
    let meminfo = sh(agent, "cat /proc/meminfo").await?;
    let total_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no MemTotal")?;
    // The firmware and the kernel's own reservations take some of it.
    let asked = OS_MEMORY_MIB * 1024;
    ensure!(total_kib <= asked && total_kib > asked * 85 / 100, "MemTotal {total_kib} kB for {asked} kB asked");
    // Skiff's own ACPI tables (through the firmware's table loader), as a
    // direct-boot guest sees them: the DSDT with Skiff's OEM id, the MADT,
    // the MCFG; the devices they define: the GED, its power button, the
    // PCIe host bridge (ECAM).
    let tables = sh(agent, "ls /sys/firmware/acpi/tables").await?;
    for t in ["DSDT", "APIC", "FACP", "MCFG"] {
        ensure!(tables.split_whitespace().any(|x| x == t), "no ACPI table {t}: {tables}");
    }
    let oem = sh(agent, "head -c 16 /sys/firmware/acpi/tables/DSDT | tail -c 6").await?;
    ensure!(oem == "SKIFF ", "the DSDT is not Skiff's (OEM id {oem:?})");
    let acpi = sh(agent, "ls /sys/bus/acpi/devices").await?;
    for dev in ["ACPI0013:00", "PNP0C0C:00", "PNP0A08:00"] {
        ensure!(acpi.contains(dev), "the guest has no ACPI device {dev}: {acpi}");
    }
    // Files go in and come back (stdin to a file, read back).
    let req = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), "cat > /root/skiff-probe && sha256sum /root/skiff-probe".into()],
        ..Default::default()
    };
    let data = b"written through the agent\n";
    let out = agent.exec_output(req, Some(data.to_vec())).await?;
    let sum = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.code() == 0 && sum.starts_with(&sha256(data)), "writing a file: {:?} {sum}", out.status);
    ensure!(sh(agent, "cat /root/skiff-probe").await? == "written through the agent\n", "the file read back differs");
    Ok(())
}

/// An EFI variable the Debian guest writes through efivarfs (non-volatile,
/// boot and runtime access), and its value.
const OS_VAR: &str = "SkiffOsVar-5d4a8f2e-8b3c-4b5e-9a6f-1c2d3e4f5a6b";
const OS_VAR_VALUE: &str = "written-by-linux";

/// One boot of the Debian disk (`disk`, variable store `vars`), logs and
/// the vsock socket in `logs`, up to the agent's ready event.
struct DebianBoot {
    vm: FirmwareVm,
    agent: AgentClient,
    start: Instant,
    /// Where on the console the boot got to.
    at: usize,
}

impl DebianBoot {
    /// `seed`: a second disk (the NoCloud seed); `boot_line`: how the
    /// firmware's boot manager announces what it starts.
    fn start(
        rt: &tokio::runtime::Runtime,
        disk: &Path,
        vars: &Path,
        logs: &Path,
        seed: Option<&Path>,
        boot_line: &str,
    ) -> Result<Self> {
        let vsock = logs.join("vsock.sock");
        // Listening before the VM starts: the agent announces itself once.
        let events = rt.block_on(async { EventListener::bind_for_vsock(&vsock) })?;
        let (disk_arg, vsock_arg) = (format!("path={}", s(disk)), format!("cid=3,socket={}", s(&vsock)));
        let (cpus, memory) = (OS_CPUS.to_string(), OS_MEMORY_MIB.to_string());
        let seed_arg = seed.map(|p| format!("path={},readonly=on", s(p)));
        let seed_args = seed_arg.as_deref().map(|a| vec!["--disk", a]).unwrap_or_default();
        let args: Vec<String> = [
            ["--firmware", "--firmware-vars", s(vars), "--uuid", OS_UUID].as_slice(),
            &["--cpus", &cpus, "--memory", &memory, "--disk", &disk_arg, "--vsock", &vsock_arg],
            &seed_args,
        ]
        .concat()
        .into_iter()
        .map(String::from)
        .collect();
        let start = Instant::now();
        let mut vm = FirmwareVm::start(logs, &args)?;
        // OVMF boots the disk's removable-media path (\EFI\BOOT\BOOTX64.EFI);
        // GRUB reads the root's grub.cfg and loads the kernel and initramfs;
        // the initramfs finds the root on virtio-blk.
        // (The echo is the disk's grub.cfg's; systemd's welcome has the
        // distribution's name in colour escapes.)
        let at = vm.milestones(
            &[
                boot_line,
                "Welcome to GRUB!",
                "skiff-disk: GRUB loading vmlinuz-",
                "Linux version 6.1",
                "EXT4-fs (vda2): mounted filesystem",
                "Debian GNU/Linux 12 (bookworm)",
            ],
            0,
            start,
        )?;
        let ready = rt.block_on(async {
            let mut stream = events.accept(Duration::from_secs(120)).await?;
            stream.next(Duration::from_secs(60)).await
        });
        match ready {
            Ok(Some(Event::Ready(w))) => {
                ensure!(!w.pid1, "the agent says it is PID 1 in a systemd guest");
                println!("{:>7.1} s  agent {} ready (protocol {})", start.elapsed().as_secs_f64(), w.agent, w.version);
            }
            other => bail!("no ready event from the agent: {other:?}\n{}\n{}", vm.serial(), vm.stderr()),
        }
        let agent =
            AgentClient::new(Transport::HybridVsock { path: vsock, port: AGENT_VSOCK_PORT }).with_timeouts(Timeouts {
                connect: Duration::from_secs(60),
                request: Duration::from_secs(120),
                exec: None,
            });
        Ok(Self { vm, agent, start, at })
    }

    /// Runs the guest checks `f`, with the console and the VMM's log on
    /// failure.
    fn check<F: std::future::Future<Output = Result<()>>>(&self, rt: &tokio::runtime::Runtime, f: F) -> Result<()> {
        if let Err(e) = rt.block_on(f) {
            bail!("{e:#}\n--- console ---\n{}\n--- VMM ---\n{}", self.vm.serial(), self.vm.stderr());
        }
        println!("{:>7.1} s  guest checks passed", self.start.elapsed().as_secs_f64());
        Ok(())
    }

    /// Powers off through the agent (a service: it asks systemd, which
    /// shuts down and powers off through the FADT's sleep register); the
    /// VMM must end with 0.
    fn power_off(mut self, rt: &tokio::runtime::Runtime) -> Result<()> {
        rt.block_on(self.agent.power(PowerAction::Poweroff))?;
        self.vm.milestone("reboot: Power down", self.at, self.start)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(st) = self.vm.child.try_wait()? {
                break st;
            }
            ensure!(Instant::now() < deadline, "the VMM did not end after the guest powered off\n{}", self.vm.stderr());
            std::thread::sleep(Duration::from_millis(100));
        };
        println!("{:>7.1} s  powered off ({status})", self.start.elapsed().as_secs_f64());
        let log = self.vm.stderr();
        ensure!(status.code() == Some(0), "power-off should end the VMM with 0, got {status}\n{log}");
        ensure!(log.contains("guest powered off"), "no power-off message: {log}");
        ensure!(!log.contains("ERROR") && !log.contains("panicked"), "errors in the VMM log: {log}");
        Ok(())
    }
}

/// The checks of the first boot, with the NoCloud seed: cloud-init
/// applied it; the SMBIOS tables are Skiff's; the guest makes a boot
/// entry with efibootmgr and asks the firmware to boot it next.
async fn check_first_boot(agent: &AgentClient) -> Result<()> {
    // cloud-init ran from the seed (systemd is up, so its stages ended).
    let status = sh(agent, "cloud-init status --long || true").await?;
    ensure!(status.contains("status: done"), "cloud-init: {status}");
    ensure!(status.contains("DataSourceNoCloud"), "cloud-init's data source: {status}");
    let instance = sh(agent, "cat /var/lib/cloud/data/instance-id").await?;
    ensure!(instance.trim() == SEED_INSTANCE, "cloud-init instance {instance:?}");
    let host = sh(agent, "hostname").await?;
    ensure!(host.trim() == SEED_HOSTNAME, "hostname {host:?}, meta-data says {SEED_HOSTNAME}");
    ensure!(sh(agent, "cat /etc/skiff-seed").await? == "written by cloud-init\n", "write_files did not write");
    ensure!(sh(agent, "cat /root/skiff-runcmd").await? == "ran-by-runcmd\n", "runcmd did not run");
    // The SMBIOS tables from fw_cfg, through OVMF: Linux's DMI ids and
    // dmidecode read Skiff's system, processor and memory.
    let dmi = sh(agent, "cd /sys/class/dmi/id && cat sys_vendor product_name product_uuid chassis_vendor").await?;
    let want = format!("Skiff\nSkiff VM\n{OS_UUID}\nSkiff\n");
    ensure!(dmi == want, "DMI ids {dmi:?}, expected {want:?}");
    let cpu = sh(agent, "dmidecode -t processor").await?;
    let cores = format!("Core Count: {OS_CPUS}");
    ensure!(cpu.contains(&cores) && cpu.contains("Status: Populated, Enabled"), "dmidecode -t processor: {cpu}");
    let mem = sh(agent, "dmidecode -t memory").await?;
    ensure!(mem.contains("Size: 1 GB") && mem.contains("Maximum Capacity: 1 GB"), "dmidecode -t memory: {mem}");
    let all = sh(agent, "dmidecode 2>&1").await?;
    ensure!(all.contains("SMBIOS 3.0") && all.contains("BIOS Information"), "dmidecode: {all}");
    for bad in ["Invalid", "invalid", "Wrong", "wrong", "truncated"] {
        ensure!(!all.contains(bad), "dmidecode complains ({bad}): {all}");
    }
    // A boot entry for the disk's GRUB, made by the guest and set as
    // BootNext: the firmware must boot it on the next start.
    let made = sh(
        agent,
        &format!("efibootmgr -q -c -d /dev/vda -p 1 -L '{BOOT_ENTRY}' -l '\\EFI\\BOOT\\BOOTX64.EFI' && efibootmgr"),
    )
    .await?;
    let num = made
        .lines()
        .find(|l| l.contains(BOOT_ENTRY))
        .and_then(|l| l.strip_prefix("Boot")?.get(..4).map(str::to_string))
        .with_context(|| format!("efibootmgr lists no {BOOT_ENTRY:?}: {made}"))?;
    let next = sh(agent, &format!("efibootmgr -n {num}")).await?;
    ensure!(next.contains(&format!("BootNext: {num}")), "efibootmgr -n {num}: {next}");
    sh(agent, &format!("echo {num} > /root/skiff-boot-entry")).await?;
    Ok(())
}

/// The checks of the second boot, without the seed: cloud-init stays off
/// (ds-identify found no data source) and kept what it did; the firmware
/// booted the guest's entry (BootNext), which is still there.
async fn check_second_boot(agent: &AgentClient) -> Result<()> {
    let status = sh(agent, "cloud-init status || true").await?;
    ensure!(status.contains("status: disabled"), "cloud-init without a seed: {status}");
    let units = sh(agent, "systemctl is-active cloud-init.service cloud-final.service || true").await?;
    ensure!(units.lines().all(|l| l == "inactive"), "cloud-init ran without a seed: {units}");
    let host = sh(agent, "hostname").await?;
    ensure!(host.trim() == SEED_HOSTNAME, "hostname after a boot without the seed: {host:?}");
    let num = sh(agent, "cat /root/skiff-boot-entry").await?;
    let num = num.trim();
    let ls = sh(agent, "efibootmgr").await?;
    ensure!(ls.contains(&format!("BootCurrent: {num}")), "the firmware did not boot Boot{num} (BootNext): {ls}");
    ensure!(!ls.contains("BootNext:"), "BootNext survived its boot: {ls}");
    ensure!(ls.contains(&format!("Boot{num}* {BOOT_ENTRY}")), "the guest's boot entry is gone: {ls}");
    let uuid = sh(agent, "cat /sys/class/dmi/id/product_uuid").await?;
    ensure!(uuid.trim() == OS_UUID, "the VM's UUID changed across boots: {uuid}");
    Ok(())
}

#[test]
#[ignore = "boots a Debian disk through firmware: needs hardware KVM (or the box); run through tests/run"]
fn firmware_boots_a_debian_disk_through_grub_to_systemd_and_the_agent() -> Result<()> {
    let image = std::env::var_os("SKIFF_DEBIAN_DISK")
        .map(PathBuf::from)
        .context("SKIFF_DEBIAN_DISK is not set (tests/run builds it with tests/images/build-debian-disk)")?;
    let dir = scratch()?;
    // The VM writes to its disk: a sparse copy of the cached image.
    let disk = dir.path().join("debian12.img");
    let copied = Command::new("cp").arg("--sparse=always").arg(&image).arg(&disk).status()?;
    ensure!(copied.success(), "cannot copy {}", image.display());
    let vars = dir.path().join("vars.fd");
    let seed = nocloud_seed(dir.path())?;
    let rt = tokio::runtime::Runtime::new()?;

    let (logs1, logs2) = (scratch()?, scratch()?);
    let first = "BdsDxe: starting Boot0001 \"UEFI Misc Device\" from PciRoot(0x0)/Pci(0x2,0x0)";
    let boot = DebianBoot::start(&rt, &disk, &vars, logs1.path(), Some(&seed), first)?;
    boot.check(&rt, async {
        check_debian_guest(&boot.agent).await?;
        check_first_boot(&boot.agent).await?;
        // Linux writes a non-volatile EFI variable (efivarfs: 4 bytes of
        // attributes, then the data) through the firmware's runtime
        // services into the VMM's flash.
        let path = format!("/sys/firmware/efi/efivars/{OS_VAR}");
        sh(&boot.agent, &format!("printf '\\007\\000\\000\\000{OS_VAR_VALUE}' > {path}")).await?;
        Ok(())
    })?;
    boot.power_off(&rt)?;

    // A second VMM on the same disk and store, without the seed: the
    // firmware boots the guest's entry, the guest's variable and its
    // file are still there.
    let boot = DebianBoot::start(&rt, &disk, &vars, logs2.path(), None, "BdsDxe: starting Boot")?;
    ensure!(!boot.vm.stderr().contains("created from"), "the second boot made a new variable store");
    ensure!(
        boot.vm.serial().contains(&format!("\"{BOOT_ENTRY}\" from HD(1,GPT,")),
        "the firmware did not announce the guest's entry"
    );
    boot.check(&rt, async {
        // (efivarfs files cannot seek: tail reads a pipe.)
        let var = sh(&boot.agent, &format!("cat /sys/firmware/efi/efivars/{OS_VAR} | tail -c +5")).await?;
        ensure!(var == OS_VAR_VALUE, "the guest's EFI variable after a new boot: {var:?}");
        let file = sh(&boot.agent, "cat /root/skiff-probe").await?;
        ensure!(file == "written through the agent\n", "the guest's file after a new boot: {file:?}");
        check_second_boot(&boot.agent).await
    })?;
    boot.power_off(&rt)
}
