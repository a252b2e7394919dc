//! The bridge's nftables table (`table inet skiff_<bridge>`): masquerade, forward and input accepts.
//!
//! The table is replaced whole in one `nft -f -` transaction (create-if-missing, delete, define), so
//! the host never sees a half-written ruleset and an old copy never lingers.

use crate::cmd;
use crate::{Ipv4Net, NetError};

/// The ruleset of a bridge's table.
pub(crate) fn ruleset(table: &str, bridge: &str, subnet: &Ipv4Net, nat: bool) -> String {
    let net = format!("{}/{}", subnet.network(), subnet.prefix);
    let mut s = format!("table inet {table} {{\n");
    if nat {
        s.push_str(&format!(
            "\tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr {net} oifname != \"{bridge}\" masquerade\n\t}}\n"
        ));
    }
    s.push_str(&format!(
        "\tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{bridge}\" accept\n\t\toifname \"{bridge}\" accept\n\t}}\n"
    ));
    s.push_str(&format!(
        "\tchain input {{\n\t\ttype filter hook input priority filter; policy accept;\n\
         \t\tiifname \"{bridge}\" udp dport {{ 53, 67 }} accept\n\
         \t\tiifname \"{bridge}\" tcp dport 53 accept\n\t}}\n"
    ));
    s.push_str("}\n");
    s
}

/// The script that replaces the table atomically: declaring an empty table first makes the
/// `delete` valid whether or not an old copy exists.
pub(crate) fn replace_script(table: &str, bridge: &str, subnet: &Ipv4Net, nat: bool) -> String {
    format!("table inet {table}\ndelete table inet {table}\n{}", ruleset(table, bridge, subnet, nat))
}

/// Checks that `nft` is installed and the kernel has nf_tables.
pub(crate) fn check_available() -> Result<(), NetError> {
    match cmd::run("nft", &["list", "tables"]) {
        Ok(_) => Ok(()),
        Err(NetError::Command { stderr, .. }) => Err(NetError::KernelSupport { what: "nf_tables", detail: stderr }),
        Err(e) => Err(e),
    }
}

/// True when the table exists.
pub(crate) fn exists(table: &str) -> Result<bool, NetError> {
    let out = cmd::run("nft", &["list", "tables", "inet"])?;
    Ok(out.lines().any(|l| l.trim() == format!("table inet {table}")))
}

/// Installs (or replaces) the table.
pub(crate) fn apply(table: &str, bridge: &str, subnet: &Ipv4Net, nat: bool) -> Result<(), NetError> {
    cmd::run_with_input("nft", &["-f", "-"], Some(&replace_script(table, bridge, subnet, nat))).map(|_| ())
}

/// Deletes the table; a missing table is not an error.
pub(crate) fn delete(table: &str) -> Result<(), NetError> {
    if !exists(table)? {
        return Ok(());
    }
    match cmd::run("nft", &["delete", "table", "inet", table]) {
        Err(e) if cmd::is_not_found(&e) => Ok(()),
        r => r.map(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_with_nat() {
        let net: Ipv4Net = "10.118.3.1/24".parse().unwrap();
        let r = replace_script("skiff_skiffbr0", "skiffbr0", &net, true);
        let expected = "table inet skiff_skiffbr0\n\
                        delete table inet skiff_skiffbr0\n\
                        table inet skiff_skiffbr0 {\n\
                        \tchain postrouting {\n\
                        \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
                        \t\tip saddr 10.118.3.0/24 oifname != \"skiffbr0\" masquerade\n\
                        \t}\n\
                        \tchain forward {\n\
                        \t\ttype filter hook forward priority filter; policy accept;\n\
                        \t\tiifname \"skiffbr0\" accept\n\
                        \t\toifname \"skiffbr0\" accept\n\
                        \t}\n\
                        \tchain input {\n\
                        \t\ttype filter hook input priority filter; policy accept;\n\
                        \t\tiifname \"skiffbr0\" udp dport { 53, 67 } accept\n\
                        \t\tiifname \"skiffbr0\" tcp dport 53 accept\n\
                        \t}\n\
                        }\n";
        assert_eq!(r, expected);
    }

    #[test]
    fn ruleset_without_nat_has_no_masquerade() {
        let net: Ipv4Net = "192.168.50.1/24".parse().unwrap();
        let r = ruleset("t", "br", &net, false);
        assert!(!r.contains("masquerade"));
        assert!(!r.contains("postrouting"));
        assert!(r.contains("iifname \"br\" accept"));
    }
}
