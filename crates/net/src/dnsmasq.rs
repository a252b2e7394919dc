//! dnsmasq for a bridge: its configuration, starting it detached, finding it again after a
//! daemon restart, stopping it, and its lease file.
//!
//! dnsmasq daemonizes itself (double fork + `setsid`), so it is never a child that dies with
//! skiffd. It is found again through its pid file, checked against `/proc/PID/cmdline` (which
//! names our conf file), with a scan of `/proc` as a fallback when the pid file is gone.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::cmd;
use crate::ident::normalize_mac;
use crate::{Ipv4Net, NetError};

/// File names inside a bridge's state directory.
pub(crate) const CONF_FILE: &str = "dnsmasq.conf";
pub(crate) const PID_FILE: &str = "dnsmasq.pid";
pub(crate) const LEASE_FILE: &str = "dnsmasq.leases";

/// What dnsmasq serves.
#[derive(Debug, Clone)]
pub(crate) struct Settings<'a> {
    pub bridge: &'a str,
    pub net: Ipv4Net,
    pub domain: &'a str,
    pub state_dir: &'a Path,
}

/// The DHCP pool: every host address of the net except the network, broadcast and the gateway
/// when it is the first host (dnsmasq never leases its own address anyway).
pub(crate) fn dhcp_pool(net: &Ipv4Net) -> (Ipv4Addr, Ipv4Addr) {
    let first = u32::from(net.network()) + 1;
    let last = u32::from(net.broadcast()) - 1;
    let start = if u32::from(net.gateway()) == first { first + 1 } else { first };
    (Ipv4Addr::from(start), Ipv4Addr::from(last))
}

fn netmask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) })
}

/// The configuration file's lines (long options without their `--`).
pub(crate) fn conf_lines(s: &Settings<'_>) -> Vec<String> {
    let dir = s.state_dir;
    let gw = s.net.gateway();
    let (start, end) = dhcp_pool(&s.net);
    vec![
        format!("pid-file={}", dir.join(PID_FILE).display()),
        "strict-order".into(),
        "bind-interfaces".into(),
        format!("interface={}", s.bridge),
        "except-interface=lo".into(),
        format!("listen-address={gw}"),
        format!("dhcp-range={start},{end},{},1h", netmask(s.net.prefix)),
        format!("dhcp-leasefile={}", dir.join(LEASE_FILE).display()),
        "dhcp-authoritative".into(),
        "dhcp-no-override".into(),
        "no-ping".into(),
        format!("domain={}", s.domain),
        format!("local=/{}/", s.domain),
        "expand-hosts".into(),
        "no-negcache".into(),
        format!("interface-name=_gateway.{},{}", s.domain, s.bridge),
    ]
}

/// The configuration file's text.
pub(crate) fn conf_text(s: &Settings<'_>) -> String {
    let mut t = String::from("# Written by skiff-net; replaced whenever the bridge is ensured.\n");
    for l in conf_lines(s) {
        t.push_str(&l);
        t.push('\n');
    }
    t
}

/// dnsmasq's command line: everything else is in the conf file (so `/etc/dnsmasq.conf` is never read).
pub(crate) fn args(state_dir: &Path) -> Vec<String> {
    vec![format!("--conf-file={}", state_dir.join(CONF_FILE).display())]
}

fn cmdline_matches(pid: u32, conf_arg: &str) -> bool {
    let Ok(raw) = fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let mut parts = raw.split(|b| *b == 0).filter(|p| !p.is_empty());
    let Some(argv0) = parts.next() else { return false };
    let is_dnsmasq = Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(argv0))
        .file_name()
        .is_some_and(|n| n == "dnsmasq");
    is_dnsmasq && parts.any(|p| p == conf_arg.as_bytes()) && !is_zombie(pid)
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// The pids of the dnsmasq processes serving this state directory (normally one).
pub(crate) fn running(state_dir: &Path) -> Vec<u32> {
    let conf_arg = args(state_dir).remove(0);
    if let Some(pid) = fs::read_to_string(state_dir.join(PID_FILE)).ok().and_then(|s| s.trim().parse::<u32>().ok()) {
        if cmdline_matches(pid, &conf_arg) {
            return vec![pid];
        }
    }
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
            if cmdline_matches(pid, &conf_arg) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Writes the conf file; returns true when its content changed.
pub(crate) fn write_conf(s: &Settings<'_>) -> Result<bool, NetError> {
    let path = s.state_dir.join(CONF_FILE);
    let text = conf_text(s);
    if fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
        return Ok(false);
    }
    let tmp = path.with_extension("conf.tmp");
    fs::write(&tmp, &text).map_err(|e| NetError::io("write", &tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| NetError::io("rename", &path, e))?;
    Ok(true)
}

/// Starts dnsmasq (it daemonizes itself) and returns its pid. The conf file must exist.
pub(crate) fn start(state_dir: &Path) -> Result<u32, NetError> {
    let pid_path = state_dir.join(PID_FILE);
    let _ = fs::remove_file(&pid_path);
    let a = args(state_dir);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    // dnsmasq's parent process exits once the daemon is ready, reporting startup errors itself.
    cmd::run("dnsmasq", &a)?;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if let Some(&pid) = running(state_dir).first() {
            return Ok(pid);
        }
        if Instant::now() > deadline {
            return Err(NetError::Dnsmasq(format!("no live process behind {}", pid_path.display())));
        }
        sleep(Duration::from_millis(20));
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid)
}

fn kill(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Stops every dnsmasq of this state directory: SIGTERM, then SIGKILL after two seconds.
pub(crate) fn stop(state_dir: &Path) {
    for pid in running(state_dir) {
        kill(pid, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(2);
        while alive(pid) && Instant::now() < deadline {
            sleep(Duration::from_millis(20));
        }
        if alive(pid) {
            kill(pid, libc::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(2);
            while alive(pid) && Instant::now() < deadline {
                sleep(Duration::from_millis(20));
            }
        }
    }
    let _ = fs::remove_file(state_dir.join(PID_FILE));
}

/// One line of dnsmasq's lease file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Expiry, seconds since the epoch (0: never).
    pub expiry: u64,
    /// The client's MAC, lower case.
    pub mac: String,
    /// The leased address.
    pub ip: Ipv4Addr,
    /// The hostname the client sent, if any.
    pub hostname: Option<String>,
    /// The client identifier, if any.
    pub client_id: Option<String>,
}

/// Parses a lease file; IPv6 (`duid`) lines and malformed lines are skipped.
pub fn parse_leases(text: &str) -> Vec<Lease> {
    let none_if_star = |s: Option<&str>| s.filter(|v| *v != "*").map(str::to_string);
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let expiry = f.next()?.parse().ok()?;
            let mac = normalize_mac(f.next()?);
            let ip = f.next()?.parse().ok()?;
            let hostname = none_if_star(f.next());
            let client_id = none_if_star(f.next());
            Some(Lease { expiry, mac, ip, hostname, client_id })
        })
        .collect()
}

/// The lease file's path.
pub(crate) fn lease_path(state_dir: &Path) -> PathBuf {
    state_dir.join(LEASE_FILE)
}

/// Current leases (an absent file is no leases).
pub(crate) fn read_leases(state_dir: &Path) -> Vec<Lease> {
    fs::read_to_string(lease_path(state_dir)).map(|t| parse_leases(&t)).unwrap_or_default()
}

/// Removes the lines of `mac`/`ip` from the lease file (only while dnsmasq is stopped: it reads the
/// file once at startup).
pub(crate) fn remove_from_lease_file(state_dir: &Path, mac: &str, ip: Ipv4Addr) -> Result<(), NetError> {
    let path = lease_path(state_dir);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(NetError::io("read", &path, e)),
    };
    let mac = normalize_mac(mac);
    let kept: String = text
        .lines()
        .filter(|l| !parse_leases(l).iter().any(|lease| lease.mac == mac && lease.ip == ip))
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(&path, kept).map_err(|e| NetError::io("write", &path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conf_for_a_24() {
        let dir = Path::new("/var/lib/skiff/networks/skiffbr0");
        let s = Settings { bridge: "skiffbr0", net: "10.118.3.1/24".parse().unwrap(), domain: "skiff", state_dir: dir };
        let lines = conf_lines(&s);
        let expected = [
            "pid-file=/var/lib/skiff/networks/skiffbr0/dnsmasq.pid",
            "strict-order",
            "bind-interfaces",
            "interface=skiffbr0",
            "except-interface=lo",
            "listen-address=10.118.3.1",
            "dhcp-range=10.118.3.2,10.118.3.254,255.255.255.0,1h",
            "dhcp-leasefile=/var/lib/skiff/networks/skiffbr0/dnsmasq.leases",
            "dhcp-authoritative",
            "dhcp-no-override",
            "no-ping",
            "domain=skiff",
            "local=/skiff/",
            "expand-hosts",
            "no-negcache",
            "interface-name=_gateway.skiff,skiffbr0",
        ];
        assert_eq!(lines, expected);
        assert!(conf_text(&s).ends_with("interface-name=_gateway.skiff,skiffbr0\n"));
        assert_eq!(args(dir), ["--conf-file=/var/lib/skiff/networks/skiffbr0/dnsmasq.conf"]);
    }

    #[test]
    fn pool_skips_gateway() {
        assert_eq!(
            dhcp_pool(&"10.0.0.1/16".parse().unwrap()),
            (Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 255, 254))
        );
        assert_eq!(
            dhcp_pool(&"10.0.0.100/24".parse().unwrap()),
            (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 254))
        );
        assert_eq!(netmask(20), Ipv4Addr::new(255, 255, 240, 0));
    }

    #[test]
    fn lease_file() {
        let text = "1700000000 52:54:00:AA:bb:cc 10.118.3.57 web 01:52:54:00:aa:bb:cc\n\
                    0 52:54:00:11:22:33 10.118.3.9 * *\n\
                    duid 00:01:00:01:2c:aa:bb:cc:dd:ee:ff:00\n\
                    garbage line\n";
        let l = parse_leases(text);
        assert_eq!(l.len(), 2);
        assert_eq!(
            l[0],
            Lease {
                expiry: 1_700_000_000,
                mac: "52:54:00:aa:bb:cc".into(),
                ip: Ipv4Addr::new(10, 118, 3, 57),
                hostname: Some("web".into()),
                client_id: Some("01:52:54:00:aa:bb:cc".into()),
            }
        );
        assert_eq!(l[1].hostname, None);
        assert_eq!(l[1].client_id, None);
        assert!(parse_leases("").is_empty());
    }

    #[test]
    fn lease_lines_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            lease_path(dir.path()),
            "1 52:54:00:aa:bb:cc 10.1.1.2 a *\n2 52:54:00:aa:bb:dd 10.1.1.3 b *\nduid 00:01\n",
        )
        .unwrap();
        remove_from_lease_file(dir.path(), "52:54:00:AA:BB:CC", Ipv4Addr::new(10, 1, 1, 2)).unwrap();
        let left = read_leases(dir.path());
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].mac, "52:54:00:aa:bb:dd");
        assert!(fs::read_to_string(lease_path(dir.path())).unwrap().contains("duid 00:01"));
        // No file: nothing to do.
        remove_from_lease_file(&dir.path().join("nope"), "x", Ipv4Addr::LOCALHOST).unwrap();
    }
}
