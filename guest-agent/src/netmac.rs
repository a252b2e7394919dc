//! `set_mac`: another MAC address for an interface, for a clone restored
//! from a snapshot onto another NIC (Linux reads a virtio NIC's MAC only
//! when it probes it). The DHCP lease being renewed on the interface is
//! dropped first: it belongs to the old address.

use crate::network::{forget_lease, Ifaces, NetError};

/// Parses `52:54:00:12:34:56`; a multicast (group) address is refused.
pub fn parse_mac(s: &str) -> Result<[u8; 6], NetError> {
    let bad = || NetError::BadMac(s.into());
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 {
        return Err(bad());
    }
    Ok(mac)
}

impl Ifaces {
    fn set_hwaddr(&self, mac: [u8; 6]) -> Result<(), NetError> {
        let mut r = self.req();
        // SAFETY: the hwaddr member is plain data; it is filled in whole.
        unsafe {
            r.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
            for (d, s) in r.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(mac) {
                *d = s as libc::c_char;
            }
        }
        self.ioctl("set hardware address", libc::SIOCSIFHWADDR, &mut r)
    }

    fn down(&self) -> Result<(), NetError> {
        let mut r = self.req();
        self.ioctl("get flags", libc::SIOCGIFFLAGS, &mut r)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe { r.ifr_ifru.ifru_flags &= !(libc::IFF_UP as libc::c_short) };
        self.ioctl("set flags", libc::SIOCSIFFLAGS, &mut r)
    }
}

/// Gives `iface` the MAC `mac`: while it is up if the driver allows
/// (virtio-net does), else taken down and up again around the change.
pub fn set_mac(iface: &str, mac: &str) -> Result<(), NetError> {
    let mac = parse_mac(mac)?;
    let sock = Ifaces::open(iface)?;
    forget_lease(iface);
    match sock.set_hwaddr(mac) {
        Err(NetError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EBUSY) => {
            sock.down()?;
            let set = sock.set_hwaddr(mac);
            sock.up()?;
            set
        }
        other => other,
    }?;
    eprintln!(
        "skiff-agent: {iface}: MAC set to {}",
        mac.map(|b| format!("{b:02x}")).join(":")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_parsed_strictly() {
        assert_eq!(
            parse_mac("52:54:00:AB:cd:0f").unwrap(),
            [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]
        );
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:01",
            "5:54:00:ab:cd:ef",
            "zz:54:00:ab:cd:ef",
            "01:00:5e:00:00:01",
        ] {
            assert!(matches!(parse_mac(bad), Err(NetError::BadMac(_))), "{bad}");
        }
        let e = set_mac("x".repeat(40).as_str(), "52:54:00:00:00:01").unwrap_err();
        assert!(matches!(e, NetError::BadInterface(_)), "{e}");
    }
}
