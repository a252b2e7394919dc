//! Network requests: an IPv4 address and default route set with the
//! classic interface ioctls (no netlink library in the static agent), or
//! a lease from the agent's own DHCP client (`dhcp`); hostname, /etc/hosts
//! and /etc/resolv.conf.
//!
//! DHCP: the interface is brought up, the lease is taken over a UDP socket
//! on port 68 bound to the interface (the server's replies are broadcast,
//! as the client has no address yet), then the address, netmask, default
//! route, MTU (unless the request sets one) and resolv.conf (unless the
//! request names servers) are set from it. One thread per interface then
//! renews at T1 (unicast), rebinds at T2 (broadcast) and, when the lease
//! is lost, asks again until it gets one; a later request for the
//! interface stops it. Every lease is logged on the console:
//! `skiff-agent: eth0: DHCP lease 10.0.0.5/24 from 10.0.0.1 for 3600 s`.

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use skiff_agent_proto::{Addressing, ErrorCode, HostEntry, NetworkConfig};

use crate::dhcp::{self, Client, DhcpError, Identity, Lease, Transport};
use crate::sys::{SysError, Syscall};

/// How long a Network request waits for a lease.
const DHCP_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest a socket read blocks before looking at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(250);
/// The pause after a DHCP attempt that failed at once.
const RETRY_PAUSE: Duration = Duration::from_secs(5);

/// The renewal thread of each interface.
static RENEWERS: Mutex<BTreeMap<String, Renewer>> = Mutex::new(BTreeMap::new());
/// One DHCP or static request at a time (they replace renewers).
static DHCP_REQUESTS: Mutex<()> = Mutex::new(());

/// Errors of network requests.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Not an `a.b.c.d/len` or `a.b.c.d` address.
    #[error("bad address {0:?}")]
    BadAddress(String),
    /// An interface name longer than the kernel allows.
    #[error("bad interface name {0:?}")]
    BadInterface(String),
    /// Not a MAC address `xx:xx:xx:xx:xx:xx` of a single host.
    #[error("bad MAC address {0:?}")]
    BadMac(String),
    /// An ioctl on the interface failed.
    #[error("{what} on {iface}")]
    Ioctl {
        /// Which step.
        what: &'static str,
        /// The interface.
        iface: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// No lease (timeout, socket error, bad ACK).
    #[error("DHCP on {iface}")]
    Dhcp {
        /// The interface.
        iface: String,
        /// The cause.
        #[source]
        source: DhcpError,
    },
    /// Setting the hostname or writing a file failed.
    #[error("configuring names")]
    Sys(#[source] SysError),
}

impl NetError {
    /// The protocol's error code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            NetError::BadAddress(_) | NetError::BadInterface(_) | NetError::BadMac(_) => {
                ErrorCode::BadRequest
            }
            NetError::Ioctl { source, .. } if source.raw_os_error() == Some(libc::ENODEV) => {
                ErrorCode::NotFound
            }
            _ => ErrorCode::Io,
        }
    }
}

/// Parses `a.b.c.d/len` (or a bare address, /32) into address and netmask.
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, Ipv4Addr), NetError> {
    let bad = || NetError::BadAddress(s.to_string());
    let (addr, len) = s.split_once('/').unwrap_or((s, "32"));
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let len: u32 = len.parse().map_err(|_| bad())?;
    if len > 32 {
        return Err(bad());
    }
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Ok((addr, Ipv4Addr::from(mask)))
}

/// The contents of /etc/resolv.conf.
pub fn render_resolv(dns: &[String], search: &[String]) -> String {
    let mut s = String::from("# written by skiff-agent\n");
    if !search.is_empty() {
        s.push_str(&format!("search {}\n", search.join(" ")));
    }
    for ns in dns {
        s.push_str(&format!("nameserver {ns}\n"));
    }
    s
}

/// The contents of /etc/hosts.
pub fn render_hosts(hostname: Option<&str>, extra: &[HostEntry]) -> String {
    let mut s = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    if let Some(h) = hostname {
        s.push_str(&format!("127.0.1.1\t{h}\n"));
    }
    for e in extra {
        s.push_str(&format!("{}\t{}\n", e.address, e.names.join(" ")));
    }
    s
}

/// Serves a network request: the interface with its own ioctls and DHCP
/// client, names through `sys`; files go under `etc`.
pub fn apply(sys: &Arc<dyn Syscall>, cfg: &NetworkConfig, etc: &Path) -> Result<(), NetError> {
    let iface = cfg.interface.clone().unwrap_or_else(|| "eth0".into());
    match &cfg.addressing {
        Addressing::Unchanged => {}
        Addressing::Static { address, gateway } => {
            let _no_dhcp_meanwhile = DHCP_REQUESTS.lock().unwrap_or_else(PoisonError::into_inner);
            stop_renewal(&iface);
            let (addr, mask) = parse_cidr(address)?;
            let gw = gateway.as_deref().map(|g| {
                g.parse::<Ipv4Addr>()
                    .map_err(|_| NetError::BadAddress(g.into()))
            });
            let gw = gw.transpose()?;
            let sock = Ifaces::open(&iface)?;
            let _ = Ifaces::open("lo").and_then(|lo| lo.up());
            if let Some(mtu) = cfg.mtu {
                sock.set_mtu(mtu)?;
            }
            sock.set_addr(libc::SIOCSIFADDR, "set address", addr)?;
            sock.set_addr(libc::SIOCSIFNETMASK, "set netmask", mask)?;
            sock.up()?;
            if let Some(gw) = gw {
                sock.add_default_route(gw)?;
            }
        }
        Addressing::Dhcp => dhcp(sys, cfg, &iface, etc)?,
    }
    if let Some(h) = &cfg.hostname {
        sys.sethostname(h).map_err(NetError::Sys)?;
        sys.write_file(&etc.join("hostname"), format!("{h}\n").as_bytes())
            .map_err(NetError::Sys)?;
    }
    if cfg.hostname.is_some() || !cfg.hosts.is_empty() {
        let hosts = render_hosts(cfg.hostname.as_deref(), &cfg.hosts);
        sys.write_file(&etc.join("hosts"), hosts.as_bytes())
            .map_err(NetError::Sys)?;
    }
    if !cfg.dns.is_empty() {
        let resolv = render_resolv(&cfg.dns, &cfg.search);
        sys.write_file(&etc.join("resolv.conf"), resolv.as_bytes())
            .map_err(NetError::Sys)?;
    }
    Ok(())
}

/// Takes a lease on `iface`, configures it and starts its renewal.
fn dhcp(
    sys: &Arc<dyn Syscall>,
    cfg: &NetworkConfig,
    iface: &str,
    etc: &Path,
) -> Result<(), NetError> {
    let _one_at_a_time = DHCP_REQUESTS.lock().unwrap_or_else(PoisonError::into_inner);
    stop_renewal(iface);
    let _ = Ifaces::open("lo").and_then(|lo| lo.up());
    let sock = Ifaces::open(iface)?;
    if let Some(mtu) = cfg.mtu {
        sock.set_mtu(mtu)?;
    }
    sock.up()?;
    let client = Client {
        identity: Identity {
            mac: sock.hwaddr()?,
            hostname: cfg.hostname.clone().or_else(current_hostname),
        },
    };
    let setup = LeaseSetup {
        iface: iface.into(),
        etc: etc.into(),
        sys: sys.clone(),
        mtu: cfg.mtu.is_none(),
        resolv: cfg.dns.is_empty(),
        search: cfg.search.clone(),
    };
    let failed = |source| NetError::Dhcp {
        iface: iface.into(),
        source,
    };
    let lease = Udp::open(iface, None)
        .map_err(DhcpError::Io)
        .and_then(|mut t| client.acquire(&mut t, DHCP_TIMEOUT, None))
        .map_err(failed)?;
    setup.apply(None, &lease)?;
    start_renewal(setup, client, lease);
    Ok(())
}

/// The hostname to announce when the request names none.
fn current_hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for writes of its length.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return None;
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name = String::from_utf8(buf[..end].to_vec()).ok()?;
    (!name.is_empty() && name != "(none)" && name != "localhost").then_some(name)
}

/// How a lease is put onto the interface (from the request).
struct LeaseSetup {
    iface: String,
    etc: PathBuf,
    sys: Arc<dyn Syscall>,
    /// Set the lease's MTU (the request gave none).
    mtu: bool,
    /// Write resolv.conf from the lease (the request named no servers).
    resolv: bool,
    search: Vec<String>,
}

impl LeaseSetup {
    /// Configures `new`, replacing `old` (the address only if it changed:
    /// setting it again would drop the routes through it).
    fn apply(&self, old: Option<&Lease>, new: &Lease) -> Result<(), NetError> {
        let sock = Ifaces::open(&self.iface)?;
        if old.map(|o| (o.address, o.netmask)) != Some((new.address, new.netmask)) {
            sock.set_addr(libc::SIOCSIFADDR, "set address", new.address)?;
            sock.set_addr(libc::SIOCSIFNETMASK, "set netmask", new.netmask)?;
        }
        if let (true, Some(mtu)) = (self.mtu, new.mtu) {
            sock.set_mtu(mtu.into())?;
        }
        if let Some(gw) = new.router {
            sock.add_default_route(gw)?;
        }
        let names = |l: &Lease| (l.dns.clone(), l.domain.clone());
        if self.resolv && !new.dns.is_empty() && old.map(names) != Some(names(new)) {
            let dns: Vec<String> = new.dns.iter().map(Ipv4Addr::to_string).collect();
            let search = match (&new.domain, self.search.is_empty()) {
                (Some(d), true) => vec![d.clone()],
                _ => self.search.clone(),
            };
            let resolv = render_resolv(&dns, &search);
            self.sys
                .write_file(&self.etc.join("resolv.conf"), resolv.as_bytes())
                .map_err(NetError::Sys)?;
        }
        eprintln!(
            "skiff-agent: {}: DHCP lease {}/{} from {} for {} s",
            self.iface,
            new.address,
            new.prefix_len(),
            new.server,
            new.secs
        );
        Ok(())
    }
}

/// A renewal thread and the flag that stops it.
struct Renewer {
    stop: Arc<Stop>,
    thread: JoinHandle<()>,
}

/// A stop flag that sleepers wake up for.
#[derive(Default)]
struct Stop {
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl Stop {
    fn set(&self) {
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.wake.notify_all();
    }

    fn is_set(&self) -> bool {
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sleeps `d` or until stopped; whether stopped.
    fn sleep(&self, d: Duration) -> bool {
        let guard = self.stopped.lock().unwrap_or_else(PoisonError::into_inner);
        let (guard, _) = self
            .wake
            .wait_timeout_while(guard, d, |stopped| !*stopped)
            .unwrap_or_else(PoisonError::into_inner);
        *guard
    }
}

fn start_renewal(setup: LeaseSetup, client: Client, lease: Lease) {
    if lease.infinite() {
        return;
    }
    let stop = Arc::new(Stop::default());
    let iface = setup.iface.clone();
    let flag = stop.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("dhcp-{iface}"))
        .spawn(move || renew_loop(&setup, &client, lease, &flag));
    match spawned {
        Ok(thread) => {
            let mut renewers = RENEWERS.lock().unwrap_or_else(PoisonError::into_inner);
            renewers.insert(iface, Renewer { stop, thread });
        }
        Err(e) => eprintln!("skiff-agent: {iface}: no DHCP renewal thread: {e}"),
    }
}

/// Stops `iface`'s renewal thread, if any, and waits for it.
/// Stops the lease renewal on `iface` (its MAC is about to change).
pub(crate) fn forget_lease(iface: &str) {
    let _no_dhcp_meanwhile = DHCP_REQUESTS.lock().unwrap_or_else(PoisonError::into_inner);
    stop_renewal(iface);
}

fn stop_renewal(iface: &str) {
    let renewer = RENEWERS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(iface);
    if let Some(r) = renewer {
        r.stop.set();
        let _ = r.thread.join();
    }
}

/// Keeps a lease on the interface until stopped.
fn renew_loop(setup: &LeaseSetup, client: &Client, mut lease: Lease, stop: &Stop) {
    while !lease.infinite() {
        let Some(new) = next_lease(setup, client, &lease, stop) else {
            return;
        };
        if let Err(e) = setup.apply(Some(&lease), &new) {
            let e = crate::files::error_chain(&e);
            eprintln!("skiff-agent: {}: DHCP: {e}", setup.iface);
        }
        lease = new;
    }
}

/// Renews `lease` from T1, rebinds from T2 and asks for a new one once
/// it has expired, until it gets one; `None` when stopped.
fn next_lease(setup: &LeaseSetup, client: &Client, lease: &Lease, stop: &Stop) -> Option<Lease> {
    let iface = setup.iface.as_str();
    let (t2, end) = (lease.at(lease.t2), lease.at(lease.secs));
    if stop.sleep(lease.at(lease.t1).saturating_duration_since(Instant::now())) {
        return None;
    }
    loop {
        let now = Instant::now();
        let (to, until) = match now {
            _ if now < t2 => (lease.server, t2),
            _ if now < end => (Ipv4Addr::BROADCAST, end),
            _ => break,
        };
        // RFC 2131 4.4.5: try again after half the time left, or 10 s.
        let left = until - now;
        let window = (left / 2).max(Duration::from_secs(10)).min(left);
        let renewed = Udp::open(iface, Some(stop))
            .map_err(DhcpError::Io)
            .and_then(|mut t| client.renew(&mut t, lease, to, window));
        match renewed {
            Ok(new) => return Some(new),
            Err(DhcpError::Stopped) => return None,
            Err(DhcpError::Nak) => break,
            Err(DhcpError::Timeout) => {}
            Err(e) => {
                let e = crate::files::error_chain(&e);
                eprintln!("skiff-agent: {iface}: DHCP renewal: {e}");
                if stop.sleep(RETRY_PAUSE) {
                    return None;
                }
            }
        }
    }
    eprintln!(
        "skiff-agent: {iface}: DHCP lease on {} lost; asking again",
        lease.address
    );
    loop {
        let acquired = Udp::open(iface, Some(stop))
            .map_err(DhcpError::Io)
            .and_then(|mut t| client.acquire(&mut t, DHCP_TIMEOUT, Some(lease.address)));
        match acquired {
            Ok(new) => return Some(new),
            Err(DhcpError::Stopped) => return None,
            Err(_) if stop.sleep(RETRY_PAUSE) => return None,
            Err(_) => {}
        }
    }
}

/// The client's UDP socket: port 68 on one interface, broadcast allowed.
struct Udp<'a> {
    sock: UdpSocket,
    stop: Option<&'a Stop>,
}

impl<'a> Udp<'a> {
    fn open(iface: &str, stop: Option<&'a Stop>) -> io::Result<Self> {
        // SAFETY: plain syscall; the fd is owned right below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh socket nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let one = 1 as libc::c_int;
        setsockopt(&fd, libc::SO_REUSEADDR, &one.to_ne_bytes())?;
        setsockopt(&fd, libc::SO_BROADCAST, &one.to_ne_bytes())?;
        setsockopt(&fd, libc::SO_BINDTODEVICE, iface.as_bytes())?;
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: dhcp::CLIENT_PORT.to_be(),
            sin_addr: libc::in_addr { s_addr: 0 },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: `sin` is a valid sockaddr_in of `len` bytes.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sin as *const libc::sockaddr_in).cast(),
                len,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Udp {
            sock: UdpSocket::from(fd),
            stop,
        })
    }
}

fn setsockopt(fd: &OwnedFd, name: libc::c_int, value: &[u8]) -> io::Result<()> {
    // SAFETY: `value` is valid for reads of its length during the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Transport for Udp<'_> {
    fn send(&mut self, packet: &[u8], to: Ipv4Addr) -> io::Result<()> {
        let to = SocketAddrV4::new(to, dhcp::SERVER_PORT);
        self.sock.send_to(packet, to).map(|_| ())
    }

    fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        let until = Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || self.stopped() {
                return Ok(None);
            }
            self.sock.set_read_timeout(Some(left.min(STOP_POLL)))?;
            match self.sock.recv_from(buf) {
                Ok((n, SocketAddr::V4(from))) if from.port() == dhcp::SERVER_PORT => {
                    return Ok(Some(n))
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn stopped(&self) -> bool {
        self.stop.is_some_and(Stop::is_set)
    }
}

/// A datagram socket for interface ioctls, bound to one interface name.
pub(crate) struct Ifaces {
    sock: OwnedFd,
    name: [libc::c_char; libc::IFNAMSIZ],
    iface: String,
}

impl Ifaces {
    pub(crate) fn open(iface: &str) -> Result<Self, NetError> {
        if iface.is_empty() || iface.len() >= libc::IFNAMSIZ {
            return Err(NetError::BadInterface(iface.into()));
        }
        let mut name = [0 as libc::c_char; libc::IFNAMSIZ];
        for (d, s) in name.iter_mut().zip(iface.bytes()) {
            *d = s as libc::c_char;
        }
        // SAFETY: plain syscall; the fd is owned right below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(NetError::Ioctl {
                what: "socket",
                iface: iface.into(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` is a fresh socket nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Ifaces {
            sock,
            name,
            iface: iface.into(),
        })
    }

    pub(crate) fn req(&self) -> libc::ifreq {
        // SAFETY: ifreq is plain data; all-zero is valid.
        let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
        r.ifr_name = self.name;
        r
    }

    pub(crate) fn ioctl<T>(
        &self,
        what: &'static str,
        op: libc::c_ulong,
        arg: &mut T,
    ) -> Result<(), NetError> {
        // SAFETY: `arg` is the structure `op` expects (ifreq or rtentry)
        // and is valid for reads and writes during the call.
        let r = unsafe { libc::ioctl(self.sock.as_raw_fd(), op as _, arg as *mut T) };
        if r < 0 {
            return Err(NetError::Ioctl {
                what,
                iface: self.iface.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    pub(crate) fn up(&self) -> Result<(), NetError> {
        let mut r = self.req();
        self.ioctl("get flags", libc::SIOCGIFFLAGS, &mut r)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe { r.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
        self.ioctl("set flags", libc::SIOCSIFFLAGS, &mut r)
    }

    fn hwaddr(&self) -> Result<[u8; 6], NetError> {
        let mut r = self.req();
        self.ioctl("get hardware address", libc::SIOCGIFHWADDR, &mut r)?;
        // SAFETY: SIOCGIFHWADDR filled the hwaddr member of the union.
        let sa = unsafe { r.ifr_ifru.ifru_hwaddr };
        let mut mac = [0u8; 6];
        for (m, b) in mac.iter_mut().zip(sa.sa_data) {
            *m = b as u8;
        }
        Ok(mac)
    }

    fn set_mtu(&self, mtu: u32) -> Result<(), NetError> {
        let mut r = self.req();
        r.ifr_ifru.ifru_mtu = mtu as libc::c_int;
        self.ioctl("set mtu", libc::SIOCSIFMTU, &mut r)
    }

    fn set_addr(
        &self,
        op: libc::c_ulong,
        what: &'static str,
        addr: Ipv4Addr,
    ) -> Result<(), NetError> {
        let mut r = self.req();
        r.ifr_ifru.ifru_addr = sockaddr(addr);
        self.ioctl(what, op, &mut r)
    }

    fn add_default_route(&self, gw: Ipv4Addr) -> Result<(), NetError> {
        // SAFETY: rtentry is plain data; all-zero is valid.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr(gw);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        match self.ioctl("add default route", libc::SIOCADDRT, &mut rt) {
            Err(NetError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
                Ok(())
            }
            other => other,
        }
    }
}

fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size, and every bit
    // pattern is a valid sockaddr.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing() {
        assert_eq!(
            parse_cidr("10.0.0.2/24").unwrap(),
            (
                "10.0.0.2".parse().unwrap(),
                "255.255.255.0".parse().unwrap()
            )
        );
        assert_eq!(parse_cidr("10.0.0.2").unwrap().1, Ipv4Addr::BROADCAST);
        assert_eq!(parse_cidr("0.0.0.0/0").unwrap().1, Ipv4Addr::UNSPECIFIED);
        for bad in ["10.0.0/24", "10.0.0.2/33", "x/1", "10.0.0.2/"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn renders_resolv_and_hosts() {
        let r = render_resolv(
            &["10.0.0.1".into(), "1.1.1.1".into()],
            &["skiff.local".into()],
        );
        assert_eq!(r, "# written by skiff-agent\nsearch skiff.local\nnameserver 10.0.0.1\nnameserver 1.1.1.1\n");
        let h = render_hosts(
            Some("web"),
            &[HostEntry {
                address: "10.0.0.9".into(),
                names: vec!["db".into(), "db.local".into()],
            }],
        );
        assert!(h.starts_with("127.0.0.1\tlocalhost\n"));
        assert!(h.contains("127.0.1.1\tweb\n"));
        assert!(h.ends_with("10.0.0.9\tdb db.local\n"));
    }

    use crate::sys::fake::{Call, Recording};

    fn recording() -> (Arc<Recording>, Arc<dyn Syscall>) {
        let rec = Arc::new(Recording::new());
        let sys: Arc<dyn Syscall> = rec.clone();
        (rec, sys)
    }

    #[test]
    fn names_are_set_through_the_syscalls() {
        let (rec, sys) = recording();
        let cfg = NetworkConfig {
            hostname: Some("web".into()),
            dns: vec!["10.0.0.1".into()],
            search: vec!["skiff".into()],
            hosts: vec![HostEntry {
                address: "10.0.0.9".into(),
                names: vec!["db".into()],
            }],
            ..Default::default()
        };
        apply(&sys, &cfg, Path::new("/x/etc")).unwrap();
        let hosts = render_hosts(Some("web"), &cfg.hosts);
        let resolv = render_resolv(&cfg.dns, &cfg.search);
        assert_eq!(
            rec.calls(),
            [
                Call::Hostname("web".into()),
                Call::Write("/x/etc/hostname".into(), "web\n".into()),
                Call::Write("/x/etc/hosts".into(), hosts),
                Call::Write("/x/etc/resolv.conf".into(), resolv),
            ]
        );
        // Nothing asked, nothing done.
        let (rec, sys) = recording();
        apply(&sys, &NetworkConfig::default(), Path::new("/etc")).unwrap();
        assert!(rec.calls().is_empty());
    }

    #[test]
    fn a_bad_static_address_is_refused_before_anything_changes() {
        let (rec, sys) = recording();
        let cfg = NetworkConfig {
            interface: Some("skiff-test0".into()),
            addressing: Addressing::Static {
                address: "10.0.0.300/24".into(),
                gateway: None,
            },
            hostname: Some("web".into()),
            ..Default::default()
        };
        let e = apply(&sys, &cfg, Path::new("/etc")).unwrap_err();
        assert!(matches!(e, NetError::BadAddress(_)), "{e}");
        assert_eq!(e.code(), ErrorCode::BadRequest);
        assert!(rec.calls().is_empty(), "{:?}", rec.calls());
    }

    #[test]
    fn a_failed_sethostname_stops_the_request() {
        let (rec, sys) = recording();
        rec.fail
            .lock()
            .unwrap()
            .insert("sethostname".into(), libc::EPERM);
        let cfg = NetworkConfig {
            hostname: Some("web".into()),
            dns: vec!["10.0.0.1".into()],
            ..Default::default()
        };
        let e = apply(&sys, &cfg, Path::new("/etc")).unwrap_err();
        assert!(matches!(e, NetError::Sys(_)), "{e}");
        assert_eq!(e.code(), ErrorCode::Io);
        assert_eq!(rec.calls(), [Call::Hostname("web".into())]);
    }

    #[test]
    fn sockaddr_is_network_order() {
        let sa = sockaddr("10.1.2.3".parse().unwrap());
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        assert_eq!(&sa.sa_data[2..6], &[10, 1, 2, 3]);
    }
}
