//! Network requests: an IPv4 address and default route set with the
//! classic interface ioctls (no netlink library in the static agent), or
//! DHCP through the guest's own client; hostname, /etc/hosts and
//! /etc/resolv.conf.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use skiff_agent_proto::{Addressing, ErrorCode, HostEntry, NetworkConfig};

use crate::server::Agent;
use crate::sys::SysError;

const DHCP_TIMEOUT: Duration = Duration::from_secs(30);
const DHCP_CLIENTS: &[(&str, &[&str])] = &[
    ("udhcpc", &["-f", "-q", "-n", "-t", "10", "-i"]),
    ("dhclient", &["-1", "-v"]),
    ("dhcpcd", &["-1", "-4"]),
];

/// Errors of network requests.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Not an `a.b.c.d/len` or `a.b.c.d` address.
    #[error("bad address {0:?}")]
    BadAddress(String),
    /// An interface name longer than the kernel allows.
    #[error("bad interface name {0:?}")]
    BadInterface(String),
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
    /// None of udhcpc, dhclient, dhcpcd is installed.
    #[error("no DHCP client (udhcpc, dhclient, dhcpcd) in the guest")]
    NoDhcpClient,
    /// The DHCP client failed or timed out.
    #[error("DHCP on {0} failed")]
    Dhcp(String),
    /// Setting the hostname or writing a file failed.
    #[error("configuring names")]
    Sys(#[source] SysError),
}

impl NetError {
    /// The protocol's error code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            NetError::BadAddress(_) | NetError::BadInterface(_) => ErrorCode::BadRequest,
            NetError::NoDhcpClient => ErrorCode::Unsupported,
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

/// Serves a network request; files go under `etc`.
pub fn apply(agent: &Agent, cfg: &NetworkConfig, etc: &Path) -> Result<(), NetError> {
    let iface = cfg.interface.clone().unwrap_or_else(|| "eth0".into());
    match &cfg.addressing {
        Addressing::Unchanged => {}
        Addressing::Static { address, gateway } => {
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
        Addressing::Dhcp => {
            let _ = Ifaces::open("lo").and_then(|lo| lo.up());
            Ifaces::open(&iface)?.up()?;
            dhcp(agent, &iface)?;
        }
    }
    if let Some(h) = &cfg.hostname {
        agent.sys.sethostname(h).map_err(NetError::Sys)?;
        agent
            .sys
            .write_file(&etc.join("hostname"), format!("{h}\n").as_bytes())
            .map_err(NetError::Sys)?;
    }
    if cfg.hostname.is_some() || !cfg.hosts.is_empty() {
        let hosts = render_hosts(cfg.hostname.as_deref(), &cfg.hosts);
        agent
            .sys
            .write_file(&etc.join("hosts"), hosts.as_bytes())
            .map_err(NetError::Sys)?;
    }
    if !cfg.dns.is_empty() {
        let resolv = render_resolv(&cfg.dns, &cfg.search);
        agent
            .sys
            .write_file(&etc.join("resolv.conf"), resolv.as_bytes())
            .map_err(NetError::Sys)?;
    }
    Ok(())
}

fn dhcp(agent: &Agent, iface: &str) -> Result<(), NetError> {
    for (client, args) in DHCP_CLIENTS {
        let mut cmd = Command::new(client);
        cmd.args(*args).arg(iface).stdin(Stdio::null());
        match agent.reaper.spawn(&mut cmd) {
            Ok((_child, exited)) => {
                return match exited.recv_timeout(DHCP_TIMEOUT) {
                    Ok(st) if st.code() == 0 => Ok(()),
                    _ => Err(NetError::Dhcp(iface.into())),
                };
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(_) => return Err(NetError::Dhcp(iface.into())),
        }
    }
    Err(NetError::NoDhcpClient)
}

/// A datagram socket for interface ioctls, bound to one interface name.
struct Ifaces {
    sock: OwnedFd,
    name: [libc::c_char; libc::IFNAMSIZ],
    iface: String,
}

impl Ifaces {
    fn open(iface: &str) -> Result<Self, NetError> {
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

    fn req(&self) -> libc::ifreq {
        // SAFETY: ifreq is plain data; all-zero is valid.
        let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
        r.ifr_name = self.name;
        r
    }

    fn ioctl<T>(&self, what: &'static str, op: libc::c_ulong, arg: &mut T) -> Result<(), NetError> {
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

    fn up(&self) -> Result<(), NetError> {
        let mut r = self.req();
        self.ioctl("get flags", libc::SIOCGIFFLAGS, &mut r)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe { r.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
        self.ioctl("set flags", libc::SIOCSIFFLAGS, &mut r)
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

    #[test]
    fn sockaddr_is_network_order() {
        let sa = sockaddr("10.1.2.3".parse().unwrap());
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        assert_eq!(&sa.sa_data[2..6], &[10, 1, 2, 3]);
    }
}
