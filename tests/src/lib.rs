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

impl RunningVm {
    /// Starts `skiff-vmm` with the serial console in a file.
    pub fn start(spec: &VmSpec) -> Result<Self> {
        let dir = scratch()?;
        let serial = dir.path().join("serial.log");
        let stderr = dir.path().join("stderr.log");
        let mut cmd = Command::new(vmm_binary()?);
        cmd.arg("--kernel")
            .arg(&spec.kernel)
            .arg("--cmdline")
            .arg(&spec.cmdline)
            .arg("--cpus")
            .arg(spec.cpus.to_string())
            .arg("--memory")
            .arg(spec.memory_mib.to_string())
            .arg("--serial")
            .arg(format!("file={}", serial.display()));
        if let Some(i) = &spec.initramfs {
            cmd.arg("--initramfs").arg(i);
        }
        if let Some(a) = &spec.api_socket {
            cmd.arg("--api-socket").arg(a);
        }
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

    fn report(&self) -> String {
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

/// Sends one request line to a VMM control socket and returns the reply.
pub fn api_request(socket: &Path, request: &str) -> Result<serde_json::Value> {
    let mut s = UnixStream::connect(socket).with_context(|| format!("connect {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    writeln!(s, "{request}")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).with_context(|| format!("bad API reply {line:?}"))
}
