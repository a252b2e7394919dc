//! The naming rule for volumes and snapshots (Incus's): 1–63 characters of `[A-Za-z0-9-]`, not starting with `-`.
//!
//! A valid name is a single, ordinary path component (no `/`, `.`, `..`, NUL or leading dot), so names never carry
//! path tricks to the filesystem, and never collide with this crate's own dot-free temporary names.

use crate::StorageError;

/// Longest accepted name.
pub const MAX_NAME_LEN: usize = 63;

/// Checks `name` against the naming rule; `kind` ("volume", "snapshot") goes into the error.
pub fn validate_name(kind: &'static str, name: &str) -> Result<(), StorageError> {
    let bad = |reason| Err(StorageError::InvalidName { kind, name: name.to_string(), reason });
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("it is longer than 63 characters");
    }
    if name.starts_with('-') {
        return bad("it starts with '-'");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return bad("only letters, digits and '-' are allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_incus_names() {
        for name in ["a", "web-1", "A9", "x".repeat(63).as_str(), "0abc", "a-"] {
            validate_name("volume", name).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn rejects_path_tricks_and_bad_names() {
        let long = "x".repeat(64);
        for name in ["", "-a", ".", "..", "a/b", "../etc", "a b", "a_b", "a.b", "é", "a\0b", "/", long.as_str()] {
            let err = validate_name("snapshot", name).expect_err(name);
            assert!(err.to_string().starts_with("invalid snapshot name"), "{err}");
        }
    }
}
