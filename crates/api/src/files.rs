//! `/1.0/instances/{name}/files?path=...`: the headers that carry a
//! file's owner, mode and type. Both the LXD and the Incus names are
//! accepted; answers carry both.

/// uid header names, LXD's first.
pub const UID: [&str; 2] = ["X-LXD-uid", "X-Incus-uid"];
/// gid header names.
pub const GID: [&str; 2] = ["X-LXD-gid", "X-Incus-gid"];
/// Mode header names (octal, e.g. `0644`).
pub const MODE: [&str; 2] = ["X-LXD-mode", "X-Incus-mode"];
/// Type header names: `file`, `directory` or `symlink`.
pub const TYPE: [&str; 2] = ["X-LXD-type", "X-Incus-type"];
/// Write mode header names: `overwrite` (default) or `append`.
pub const WRITE: [&str; 2] = ["X-LXD-write", "X-Incus-write"];

/// Parses an octal mode header (`0644`, `644`, `100644`) into permission bits.
pub fn parse_mode(s: &str) -> Option<u32> {
    u32::from_str_radix(s.trim(), 8).ok().map(|m| m & 0o7777)
}

#[cfg(test)]
mod tests {
    #[test]
    fn modes() {
        assert_eq!(super::parse_mode("0644"), Some(0o644));
        assert_eq!(super::parse_mode("100755"), Some(0o755));
        assert_eq!(super::parse_mode("x"), None);
    }
}
