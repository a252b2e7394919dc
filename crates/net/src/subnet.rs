//! IPv4 subnets: the `Ipv4Net` type, what the host already uses, and the choice of a free /24.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde_json::Value;

use crate::NetError;

/// An IPv4 address with a prefix length, e.g. `10.118.3.1/24` (an interface address) or `10.118.3.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Net {
    /// The address (host bits may be set: it is then the gateway).
    pub addr: Ipv4Addr,
    /// The prefix length, 0..=32.
    pub prefix: u8,
}

impl Ipv4Net {
    /// Builds a net; `prefix` must be at most 32.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, NetError> {
        if prefix > 32 {
            return Err(NetError::InvalidConfig(format!("prefix /{prefix} is longer than 32")));
        }
        Ok(Ipv4Net { addr, prefix })
    }

    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    /// The broadcast address (host bits set).
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }

    /// True when `ip` is inside this net.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }

    /// True when the two nets share at least one address.
    pub fn overlaps(&self, other: &Ipv4Net) -> bool {
        let shorter = if self.prefix <= other.prefix { self } else { other };
        let longer = if self.prefix <= other.prefix { other } else { self };
        shorter.contains(longer.network())
    }

    /// The gateway address for a bridge on this net: `addr` itself when it is a host address, else the first host.
    pub fn gateway(&self) -> Ipv4Addr {
        if self.prefix < 31 && (self.addr == self.network() || self.addr == self.broadcast()) {
            Ipv4Addr::from(u32::from(self.network()) + 1)
        } else {
            self.addr
        }
    }

    /// Checks the net can serve as a bridge subnet with DHCP (prefix 8..=30).
    pub fn validate_for_bridge(&self) -> Result<(), NetError> {
        if !(8..=30).contains(&self.prefix) {
            return Err(NetError::InvalidConfig(format!("bridge subnet {self} must have a prefix between /8 and /30")));
        }
        Ok(())
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = NetError;

    /// Parses `a.b.c.d/len`; a bare address is a /32.
    fn from_str(s: &str) -> Result<Self, NetError> {
        let bad = || NetError::InvalidConfig(format!("`{s}` is not an IPv4 address/prefix"));
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, p.parse::<u8>().map_err(|_| bad())?),
            None => (s.trim(), 32),
        };
        Ipv4Net::new(addr.parse().map_err(|_| bad())?, prefix).map_err(|_| bad())
    }
}

/// Networks in `ip -4 -j route show table all` output, except default routes and routes on `exclude_dev`.
pub(crate) fn nets_from_routes(routes: &Value, exclude_dev: &str) -> Vec<Ipv4Net> {
    let mut out = Vec::new();
    for r in routes.as_array().into_iter().flatten() {
        if r.get("dev").and_then(Value::as_str) == Some(exclude_dev) {
            continue;
        }
        let Some(dst) = r.get("dst").and_then(Value::as_str) else { continue };
        if dst == "default" {
            continue;
        }
        if let Ok(net) = dst.parse::<Ipv4Net>() {
            // 0.0.0.0/0 written out is a default route too.
            if net.prefix > 0 {
                out.push(net);
            }
        }
    }
    out
}

/// Networks of the IPv4 addresses in `ip -j addr` output, except those on `exclude_dev`.
pub(crate) fn nets_from_addrs(links: &Value, exclude_dev: &str) -> Vec<Ipv4Net> {
    let mut out = Vec::new();
    for link in links.as_array().into_iter().flatten() {
        if link.get("ifname").and_then(Value::as_str) == Some(exclude_dev) {
            continue;
        }
        for a in link.get("addr_info").and_then(Value::as_array).into_iter().flatten() {
            if a.get("family").and_then(Value::as_str) != Some("inet") {
                continue;
            }
            let Some(local) = a.get("local").and_then(Value::as_str).and_then(|s| s.parse().ok()) else { continue };
            let prefix = a.get("prefixlen").and_then(Value::as_u64).unwrap_or(32).min(32) as u8;
            // The loopback's 127.0.0.0/8 is host-internal; every other address counts.
            out.push(Ipv4Net { addr: local, prefix });
        }
    }
    out
}

/// The candidate /24s in the order they are tried: `10.118.N.0/24` .. `10.127.N.0/24`, N starting at `start`.
pub(crate) fn candidates(start: u8) -> impl Iterator<Item = Ipv4Net> {
    (118u8..=127).flat_map(move |b| {
        (0u16..256)
            .map(move |i| Ipv4Net { addr: Ipv4Addr::new(10, b, ((u16::from(start) + i) % 256) as u8, 0), prefix: 24 })
    })
}

/// The first candidate that overlaps none of `used`.
pub(crate) fn choose_free(used: &[Ipv4Net], start: u8) -> Option<Ipv4Net> {
    candidates(start).find(|c| !used.iter().any(|u| u.overlaps(c)))
}

/// True when `net` overlaps any of `used`.
pub(crate) fn clashes(net: &Ipv4Net, used: &[Ipv4Net]) -> Option<Ipv4Net> {
    used.iter().copied().find(|u| u.overlaps(net))
}

/// The IPv4 networks in use, as seen by `ip`.
#[derive(Debug, Default)]
pub(crate) struct HostNets {
    /// Routes and addresses of this namespace, except those on the excluded device.
    pub here: Vec<Ipv4Net>,
    /// Routes and addresses of the named namespaces (`ip netns`). Instances attached to our
    /// bridge may live there with addresses in our subnet, so these only steer a fresh choice.
    pub other_namespaces: Vec<Ipv4Net>,
}

/// Reads [`HostNets`], leaving out `exclude_dev` of this namespace (our own bridge when we adopt it).
pub(crate) fn host_nets(exclude_dev: &str) -> Result<HostNets, NetError> {
    let mut nets = HostNets {
        here: nets_from_routes(&crate::cmd::ip_json(&["-4", "route", "show", "table", "all"])?, exclude_dev),
        other_namespaces: Vec::new(),
    };
    nets.here.extend(nets_from_addrs(&crate::cmd::ip_json(&["-4", "addr"])?, exclude_dev));
    // Other named namespaces: best effort (a namespace may vanish while we look).
    let namespaces = crate::cmd::ip_json(&["netns", "list"]).unwrap_or(Value::Null);
    for ns in namespaces.as_array().into_iter().flatten() {
        let Some(name) = ns.get("name").and_then(Value::as_str) else { continue };
        if let Ok(routes) = crate::cmd::ip_json(&["-n", name, "-4", "route", "show", "table", "all"]) {
            nets.other_namespaces.extend(nets_from_routes(&routes, ""));
        }
        if let Ok(addrs) = crate::cmd::ip_json(&["-n", name, "-4", "addr"]) {
            nets.other_namespaces.extend(nets_from_addrs(&addrs, ""));
        }
    }
    // Loopback nets never leave the host; 127/8 is not a candidate anyway.
    nets.here.retain(|n| !n.network().is_loopback());
    nets.other_namespaces.retain(|n| !n.network().is_loopback());
    Ok(nets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn parse_and_math() {
        let n = net("10.118.3.7/24");
        assert_eq!(n.network(), Ipv4Addr::new(10, 118, 3, 0));
        assert_eq!(n.broadcast(), Ipv4Addr::new(10, 118, 3, 255));
        assert_eq!(n.gateway(), Ipv4Addr::new(10, 118, 3, 7));
        assert_eq!(net("10.118.3.0/24").gateway(), Ipv4Addr::new(10, 118, 3, 1));
        assert_eq!(net("10.1.2.3").prefix, 32);
        assert!("10.1.2.3/33".parse::<Ipv4Net>().is_err());
        assert!("10.1.2/24".parse::<Ipv4Net>().is_err());
        assert!(net("10.0.0.0/8").overlaps(&net("10.118.0.0/24")));
        assert!(net("10.118.0.0/24").overlaps(&net("10.0.0.0/8")));
        assert!(!net("10.118.0.0/24").overlaps(&net("10.118.1.0/24")));
        assert!(net("10.118.1.5").overlaps(&net("10.118.1.0/24")));
        assert_eq!(net("0.0.0.0/0").network(), Ipv4Addr::UNSPECIFIED);
        assert!(net("10.1.0.0/16").validate_for_bridge().is_ok());
        assert!(net("10.1.0.0/31").validate_for_bridge().is_err());
    }

    #[test]
    fn routes_and_addrs_are_read_from_ip_json() {
        let routes: Value = serde_json::from_str(
            r#"[{"dst":"default","gateway":"192.0.2.1","dev":"eth0","flags":[]},
                {"dst":"10.118.0.0/24","dev":"skiffbr0","protocol":"kernel"},
                {"dst":"10.118.1.0/24","dev":"docker0","protocol":"kernel"},
                {"type":"local","dst":"10.118.2.9","dev":"eth1","table":"local"},
                {"type":"unreachable","dst":"10.118.5.0/24","flags":[]}]"#,
        )
        .unwrap();
        assert_eq!(
            nets_from_routes(&routes, "skiffbr0"),
            vec![net("10.118.1.0/24"), net("10.118.2.9/32"), net("10.118.5.0/24")]
        );
        let addrs: Value = serde_json::from_str(
            r#"[{"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8}]},
                {"ifname":"eth0","addr_info":[{"family":"inet","local":"10.118.3.4","prefixlen":16},
                                               {"family":"inet6","local":"fe80::1","prefixlen":64}]},
                {"ifname":"skiffbr0","addr_info":[{"family":"inet","local":"10.118.0.1","prefixlen":24}]}]"#,
        )
        .unwrap();
        assert_eq!(nets_from_addrs(&addrs, "skiffbr0"), vec![net("127.0.0.1/8"), net("10.118.3.4/16")]);
    }

    #[test]
    fn choice_avoids_every_used_net() {
        assert_eq!(choose_free(&[], 0), Some(net("10.118.0.0/24")));
        assert_eq!(choose_free(&[], 250), Some(net("10.118.250.0/24")));
        let used = [net("10.118.0.0/23"), net("10.118.2.77/32"), net("192.0.2.0/24")];
        assert_eq!(choose_free(&used, 0), Some(net("10.118.3.0/24")));
        // Wraps around within 10.118, then moves to 10.119.
        assert_eq!(choose_free(&[net("10.118.255.0/24")], 255), Some(net("10.118.0.0/24")));
        assert_eq!(choose_free(&[net("10.118.0.0/16")], 7), Some(net("10.119.7.0/24")));
        // A host on 10/8 leaves nothing.
        assert_eq!(choose_free(&[net("10.0.0.0/8")], 0), None);
        assert_eq!(clashes(&net("10.118.0.1/24"), &used), Some(net("10.118.0.0/23")));
        assert_eq!(clashes(&net("10.118.9.1/24"), &used), None);
    }
}
