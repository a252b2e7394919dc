//! Helpers for Skiff's integration tests: locating build outputs and test
//! artifacts, and running `skiff-vmm` with a deadline so a guest that hangs
//! fails the test instead of stalling it.
//!
//! The tests that boot guests are `#[ignore]`d in plain `cargo test` (this
//! host's KVM may not boot stock kernels); `tests/run` prepares the
//! artifacts and runs them with `--ignored` inside the KVM box
//! (`tests/box/kvm-box`), or directly on a host with hardware KVM.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub mod daemon_env;
pub mod fixture;
pub mod qemu;
pub mod thin;
pub mod watchdog;

/// Where `tests/run` put the guest kernels and initramfs images.
pub fn artifacts_dir() -> Result<PathBuf> {
    let dir = std::env::var_os("SKIFF_TEST_ARTIFACTS")
        .map(PathBuf::from)
        .context("SKIFF_TEST_ARTIFACTS is not set: run the integration tests through tests/run")?;
    if !dir.is_dir() {
        bail!("SKIFF_TEST_ARTIFACTS={} is not a directory", dir.display());
    }
    Ok(dir)
}

/// An artifact prepared by `tests/run`.
pub fn artifact(name: &str) -> Result<PathBuf> {
    let p = artifacts_dir()?.join(name);
    if !p.exists() {
        bail!("test artifact {} is missing: run the integration tests through tests/run", p.display());
    }
    Ok(p)
}

/// The `skiff-vmm` binary under test (`SKIFF_VMM`, or next to the test
/// binary's target directory).
pub fn vmm_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SKIFF_VMM") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> → target/<profile>/skiff-vmm
    let candidate = exe.parent().and_then(Path::parent).map(|d| d.join("skiff-vmm"));
    match candidate {
        Some(p) if p.exists() => Ok(p),
        _ => bail!("cannot find skiff-vmm next to {}; set SKIFF_VMM", exe.display()),
    }
}

/// A scratch directory for one test (under `$TMPDIR`, removed on drop).
pub fn scratch() -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new().prefix("skiff-test-").tempdir()?)
}

/// How to start a VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u8,
    pub memory_mib: u64,
    pub api_socket: Option<PathBuf>,
}

/// `[flag, value]`, or nothing when `extra` has `flag` already.
fn unless_given(extra: &[String], flag: &str, value: String) -> Vec<String> {
    if extra.iter().any(|a| a == flag) {
        vec![]
    } else {
        vec![flag.to_string(), value]
    }
}

/// A `skiff-vmm` process; killed when dropped.
pub struct RunningVm {
    child: Child,
    serial: PathBuf,
    stderr: PathBuf,
    started: Instant,
    _dir: tempfile::TempDir,
}

/// How a VM ended.
#[derive(Debug)]
pub struct Outcome {
    pub status: ExitStatus,
    pub serial: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Outcome {
    /// The value of the guest's `SKIFF-<key>=` line.
    pub fn value(&self, key: &str) -> Option<String> {
        guest_value(&self.serial, key)
    }
}

/// The value of a `SKIFF-<key>=` line in serial output.
pub fn guest_value(serial: &str, key: &str) -> Option<String> {
    let prefix = format!("SKIFF-{key}=");
    serial.lines().find_map(|l| l.trim_end_matches('\r').split_once(&prefix).map(|(_, v)| v.trim().to_string()))
}

/// The values of every `SKIFF-<key>=` line in serial output, in order.
pub fn guest_values(serial: &str, key: &str) -> Vec<String> {
    let prefix = format!("SKIFF-{key}=");
    serial
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').split_once(&prefix).map(|(_, v)| v.trim().to_string()))
        .collect()
}

impl RunningVm {
    /// Starts `skiff-vmm` with the serial console in a file.
    pub fn start(spec: &VmSpec) -> Result<Self> {
        Self::start_with(spec, &[])
    }

    /// Starts `skiff-vmm` like [`RunningVm::start`], with `extra` arguments
    /// (devices: `--disk`, `--net`, `--vsock`, ...) after the others.
    pub fn start_with(spec: &VmSpec, extra: &[String]) -> Result<Self> {
        Self::launch(|cmd| {
            cmd.arg("--kernel")
                .arg(&spec.kernel)
                .arg("--cmdline")
                .arg(&spec.cmdline)
                // The spec's sizes, unless `extra` gives them (`boot=2,max=6`,
                // `size=512,hotplug=2048`).
                .args(unless_given(extra, "--cpus", spec.cpus.to_string()))
                .args(unless_given(extra, "--memory", spec.memory_mib.to_string()));
            if let Some(i) = &spec.initramfs {
                cmd.arg("--initramfs").arg(i);
            }
            if let Some(a) = &spec.api_socket {
                cmd.arg("--api-socket").arg(a);
            }
            cmd.args(extra);
        })
    }

    /// Starts `skiff-vmm --restore DIR` with the serial console in a file
    /// and `extra` arguments (`--api-socket`, devices given anew).
    pub fn restore(snapshot: &Path, extra: &[String]) -> Result<Self> {
        Self::launch(|cmd| {
            cmd.arg("--restore").arg(snapshot).args(extra);
        })
    }

    /// Runs skiff-vmm with the arguments `args` adds, serial output and
    /// stderr going to files of the VM's own scratch directory.
    fn launch(args: impl FnOnce(&mut Command)) -> Result<Self> {
        let dir = scratch()?;
        let serial = dir.path().join("serial.log");
        let stderr = dir.path().join("stderr.log");
        let mut cmd = Command::new(vmm_binary()?);
        args(&mut cmd);
        cmd.arg("--serial").arg(format!("file={}", serial.display()));
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(fs::File::create(&stderr)?);
        let child = cmd.spawn().context("cannot start skiff-vmm")?;
        Ok(Self { child, serial, stderr, started: Instant::now(), _dir: dir })
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The serial output so far.
    pub fn serial(&self) -> String {
        fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Waits until the serial output contains `needle`.
    pub fn wait_for_serial(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.serial().contains(needle) {
                return Ok(());
            }
            if let Some(st) = self.child.try_wait()? {
                bail!("skiff-vmm exited ({st}) before the guest printed {needle:?}\n{}", self.report());
            }
            if Instant::now() > deadline {
                bail!("the guest did not print {needle:?} within {timeout:?}\n{}", self.report());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends `sig` to the VMM.
    pub fn signal(&self, sig: i32) -> Result<()> {
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        if unsafe { libc::kill(self.child.id() as i32, sig) } != 0 {
            bail!("kill: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits for the VMM to exit; kills it and fails after `timeout`.
    pub fn wait(mut self, timeout: Duration) -> Result<Outcome> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Outcome {
                    status,
                    serial: self.serial(),
                    stderr: fs::read_to_string(&self.stderr).unwrap_or_default(),
                    elapsed: self.started.elapsed(),
                });
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("skiff-vmm did not exit within {timeout:?} (guest hung?)\n{}", self.report());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The serial output and the VMM's stderr so far, for failure messages.
    pub fn report(&self) -> String {
        let stderr = fs::read_to_string(&self.stderr).unwrap_or_default();
        format!("--- serial ---\n{}\n--- skiff-vmm stderr ---\n{stderr}", self.serial())
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects to guest vsock `port` through skiff-vmm's hybrid vsock socket
/// (`CONNECT <port>\n`, answered with `OK <host port>\n`).
pub fn vsock_connect(socket: &Path, port: u32) -> Result<BufReader<UnixStream>> {
    let mut s = UnixStream::connect(socket).with_context(|| format!("connect {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    writeln!(s, "CONNECT {port}")?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    if !line.starts_with("OK ") || !line.ends_with('\n') {
        bail!("CONNECT {port} through {} answered {line:?}", socket.display());
    }
    Ok(r)
}

/// What a guest command printed (stdout and stderr) and its exit code.
#[derive(Debug)]
pub struct GuestOutput {
    pub code: i32,
    pub output: String,
}

/// Runs `command` with `/bin/sh -c` in a guest that serves
/// `skiff-guest-tools serve` on vsock `port` (tests/guest/devices-init.sh).
pub fn guest_exec(socket: &Path, port: u32, command: &str) -> Result<GuestOutput> {
    use std::io::Read;
    let mut r = vsock_connect(socket, port)?;
    writeln!(r.get_mut(), "EXEC {command}")?;
    let mut header = String::new();
    r.read_line(&mut header)?;
    let parts: Vec<&str> = header.split_whitespace().collect();
    let (code, len) = match parts.as_slice() {
        ["EXIT", code, len] => (code.parse()?, len.parse::<usize>()?),
        _ => bail!("guest_exec {command:?}: bad reply {header:?}"),
    };
    let mut out = vec![0u8; len];
    r.read_exact(&mut out).with_context(|| format!("guest_exec {command:?}: output cut short"))?;
    Ok(GuestOutput { code, output: String::from_utf8_lossy(&out).into_owned() })
}

/// A minimal x86-64 ELF "kernel" with a PVH entry note: `code` is loaded at
/// 1 MiB and entered there in 32-bit protected mode. For tests of what the
/// VMM does with a guest that misbehaves at once (e.g. a triple fault).
pub fn tiny_pvh_kernel(code: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x10_0000;
    const CODE_OFF: u64 = 0x1000;
    let note_off: u64 = 64 + 2 * 56;
    let mut f = Vec::new();
    // ELF header.
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&LOAD.to_le_bytes()); // e_entry
    f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for v in [64u16, 56, 2, 64, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes()); // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
    }
    let phdr = |f: &mut Vec<u8>, kind: u32, flags: u32, off: u64, addr: u64, size: u64, align: u64| {
        f.extend_from_slice(&kind.to_le_bytes());
        f.extend_from_slice(&flags.to_le_bytes());
        for v in [off, addr, addr, size, size, align] {
            f.extend_from_slice(&v.to_le_bytes());
        }
    };
    phdr(&mut f, 1, 5, CODE_OFF, LOAD, code.len() as u64, 0x1000); // PT_LOAD, R+X
    phdr(&mut f, 4, 4, note_off, 0, 20, 4); // PT_NOTE

    // XEN_ELFNOTE_PHYS32_ENTRY: namesz 4, descsz 4, type 18, "Xen\0", entry.
    for v in [4u32, 4, 18] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(b"Xen\0");
    f.extend_from_slice(&(LOAD as u32).to_le_bytes());
    f.resize(CODE_OFF as usize, 0);
    f.extend_from_slice(code);
    f
}
