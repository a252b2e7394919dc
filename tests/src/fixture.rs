//! What the device and hot-plug box tests share: host commands, virtiofsd,
//! a bridged network with dnsmasq, the guest reached through
//! `skiff-guest-tools serve` on vsock, and named checks that all run.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use sha2::{Digest, Sha256};
use skiff_guest_tools::Pattern;

use crate::{guest_exec, GuestOutput, RunningVm};

/// The devices-test guest's `skiff-guest-tools serve` port.
pub const GUEST_PORT: u32 = 1024;

pub fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    Pattern::new().fill(&mut v);
    v
}

/// Runs a host command; fails with its output unless it succeeds.
pub fn host(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("cannot run {cmd}"))?;
    ensure!(
        out.status.success(),
        "{cmd} {}: {}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A program from PATH or cargo's bin directory.
pub fn program(name: &str) -> Result<PathBuf> {
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin"));
    let dirs = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default();
    dirs.into_iter()
        .chain(home)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not found (scripts/setup installs it)"))
}

pub fn wait_for_path(p: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !p.exists() {
        ensure!(Instant::now() < deadline, "{} did not appear within {timeout:?}", p.display());
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A child process killed on drop.
pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn virtiofsd(dir: &Path, socket: &Path, log: &Path) -> Result<Daemon> {
    virtiofsd_with(dir, socket, log, &["--cache=never"])
}

/// virtiofsd serving `dir` on `socket` with the options `args`, logging to
/// `log`; returns once the socket exists.
pub fn virtiofsd_with(dir: &Path, socket: &Path, log: &Path, args: &[&str]) -> Result<Daemon> {
    let child = Command::new(program("virtiofsd")?)
        .arg(format!("--socket-path={}", socket.display()))
        .arg(format!("--shared-dir={}", dir.display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(log)?)
        .spawn()
        .context("cannot start virtiofsd")?;
    let d = Daemon(child);
    wait_for_path(socket, Duration::from_secs(20))
        .with_context(|| format!("virtiofsd: {}", fs::read_to_string(log).unwrap_or_default()))?;
    Ok(d)
}

/// Two bridges in the box: `br0` (`host0`/24, dnsmasq serving DHCP on .100
/// to .150) with the tap `tap0` created here, and `br1` (`host1`/24,
/// static) for a tap skiff-vmm creates itself (`tap1`) to join.
pub struct Network {
    pub br0: String,
    pub br1: String,
    pub tap0: String,
    pub tap1: String,
    pub leases: PathBuf,
    _dnsmasq: Option<Daemon>,
}

impl Network {
    pub fn setup(dir: &Path, host0: Ipv4Addr, host1: Ipv4Addr) -> Result<Self> {
        let id = std::process::id() % 100_000;
        let mut net = Self {
            br0: format!("skb{id}a"),
            br1: format!("skb{id}b"),
            tap0: format!("skt{id}a"),
            tap1: format!("skt{id}b"),
            leases: dir.join("dnsmasq.leases"),
            _dnsmasq: None,
        };
        for (br, ip) in [(&net.br0, host0), (&net.br1, host1)] {
            host("ip", &["link", "add", br, "type", "bridge"])?;
            host("ip", &["addr", "add", &format!("{ip}/24"), "dev", br])?;
            host("ip", &["link", "set", br, "up"])?;
        }
        host("ip", &["tuntap", "add", &net.tap0, "mode", "tap"])?;
        host("ip", &["link", "set", &net.tap0, "master", &net.br0, "up"])?;
        let log = dir.join("dnsmasq.log");
        let child = Command::new(program("dnsmasq")?)
            .args(["--keep-in-foreground", "--conf-file=/dev/null", "--port=0", "--bind-interfaces", "--user=root"])
            .arg(format!("--interface={}", net.br0))
            .arg("--except-interface=lo")
            .arg({
                let [a, b, c, _] = host0.octets();
                format!("--dhcp-range={a}.{b}.{c}.100,{a}.{b}.{c}.150,255.255.255.0,1h")
            })
            .arg(format!("--dhcp-leasefile={}", net.leases.display()))
            .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
            .arg("--log-dhcp")
            .arg(format!("--log-facility={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start dnsmasq")?;
        net._dnsmasq = Some(Daemon(child));
        Ok(net)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for l in [&self.tap0, &self.tap1, &self.br0, &self.br1] {
            let _ = Command::new("ip").args(["link", "del", l]).stderr(Stdio::null()).status();
        }
    }
}

/// The guest, reached through its vsock command server.
pub struct Guest {
    pub vm: RunningVm,
    pub vsock: PathBuf,
}

impl Guest {
    pub fn exec(&self, cmd: &str) -> Result<GuestOutput> {
        guest_exec(&self.vsock, GUEST_PORT, cmd)
    }

    /// Runs `cmd` in the guest; fails unless it exits 0. Returns its output.
    pub fn run(&self, cmd: &str) -> Result<String> {
        let out = self.exec(cmd)?;
        ensure!(out.code == 0, "guest command {cmd:?} exited {}:\n{}", out.code, out.output);
        Ok(out.output)
    }
}

/// Runs named checks, records failures, and reports them all at the end.
#[derive(Default)]
pub struct Checks {
    pub failed: Vec<String>,
}

impl Checks {
    pub fn run(&mut self, name: &str, f: impl FnOnce() -> Result<()>) {
        let t = Instant::now();
        match f() {
            Ok(()) => println!("check {name}: ok ({:.1} s)", t.elapsed().as_secs_f64()),
            Err(e) => {
                println!("check {name}: FAILED ({:.1} s): {e:#}", t.elapsed().as_secs_f64());
                self.failed.push(format!("{name}: {e:#}"));
            }
        }
    }
}

/// The guest's block device whose serial is `serial` (`vda`, `vdb`, ...).
pub fn disk_by_serial(g: &Guest, serial: &str) -> Result<String> {
    let out = g.run("for d in /sys/block/vd*; do echo \"${d##*/} $(cat $d/serial)\"; done")?;
    out.lines()
        .find_map(|l| l.split_once(' ').filter(|(_, s)| *s == serial).map(|(d, _)| d.to_string()))
        .with_context(|| format!("no disk with serial {serial:?}: {out}"))
}

/// The guest's interface with `mac`.
pub fn iface_by_mac(g: &Guest, mac: &str) -> Result<String> {
    let out = g.run("for i in /sys/class/net/*; do echo \"${i##*/} $(cat $i/address)\"; done")?;
    out.lines()
        .find_map(|l| l.split_once(' ').filter(|(_, m)| *m == mac).map(|(i, _)| i.to_string()))
        .with_context(|| format!("no interface with MAC {mac}: {out}"))
}

pub fn field(out: &str, n: usize) -> &str {
    out.split_whitespace().nth(n).unwrap_or("")
}

/// Polls `f` until it returns `Ok(Some(_))` or `timeout` passes.
pub fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        ensure!(Instant::now() < deadline, "{what}: not within {timeout:?} {last}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// CPU seconds of skiff-vmm's vCPU threads.
pub fn vcpu_seconds(pid: u32) -> Result<f64> {
    let mut total = 0u64;
    for t in fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        let t = t.path();
        // Threads come and go (API connections): skip those gone meanwhile.
        let (Ok(comm), Ok(stat)) = (fs::read_to_string(t.join("comm")), fs::read_to_string(t.join("stat"))) else {
            continue;
        };
        if !comm.starts_with("vcpu") {
            continue;
        }
        let after = stat.rsplit_once(')').context("stat")?.1;
        let f: Vec<&str> = after.split_whitespace().collect();
        total += f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    }
    // SAFETY: sysconf has no preconditions.
    Ok(total as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64)
}

/// The guest's counter (`/tmp/count`, rewritten by a shell loop the
/// test started).
pub fn counter(g: &Guest) -> Result<u64> {
    // The loop rewrites the file; read until a whole number shows.
    let out = g.run("while :; do c=$(cat /tmp/count); [ -n \"$c\" ] && break; done; echo $c")?;
    Ok(out.trim().parse()?)
}
