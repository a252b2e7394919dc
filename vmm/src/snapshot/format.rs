//! The state file's format: a fixed header, then the body, a JSON
//! encoding of [`super::VmSnapshot`].
//!
//! ```text
//! offset  size  field
//!      0     8  magic "SKIFFSNP"
//!      8     4  format version, little-endian (FORMAT_VERSION)
//!     12     4  reserved, 0
//!     16     8  body length in bytes, little-endian (at most MAX_BODY)
//!     24    32  SHA-256 of the body
//!     56     …  body
//! ```
//!
//! A file of another version, a damaged or truncated one is refused with
//! an error that says which; nothing is allocated before the declared
//! length is checked against the cap and the file's real size.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// The file starts with these bytes.
pub const MAGIC: &[u8; 8] = b"SKIFFSNP";
/// The version this build writes and reads. Bump it when the body changes
/// in a way older readers would misread (2: virtio-fs devices and their
/// backend's state).
pub const FORMAT_VERSION: u32 = 2;
/// Largest body accepted (vCPU state is about 30 KiB a vCPU).
pub const MAX_BODY: u64 = 64 << 20;
const HEADER_LEN: usize = 56;

/// Why a state file cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not a skiff-vmm snapshot (bad magic)")]
    Magic(String),
    #[error("{path} is a snapshot of format version {found}; this skiff-vmm reads version {FORMAT_VERSION} only")]
    Version { path: String, found: u32 },
    #[error("{path} is truncated: {found} bytes, the header says {want}")]
    Truncated { path: String, found: u64, want: u64 },
    #[error("{path} declares a {len}-byte state, more than the {MAX_BODY} allowed")]
    TooLarge { path: String, len: u64 },
    #[error("{0} is damaged (checksum mismatch)")]
    Checksum(String),
    #[error("cannot encode the snapshot state")]
    Encode(#[source] serde_json::Error),
    #[error("cannot decode the snapshot state in {path}")]
    Decode {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FormatError + 'a {
    move |source| FormatError::Io { what, path: path.display().to_string(), source }
}

/// The header and body of `value`.
pub fn encode(value: &impl Serialize) -> Result<Vec<u8>, FormatError> {
    let body = serde_json::to_vec(value).map_err(FormatError::Encode)?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&body));
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reads a value back from `bytes` (a whole file); `path` names it in errors.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], path: &Path) -> Result<T, FormatError> {
    let name = || path.display().to_string();
    if bytes.len() < HEADER_LEN {
        if !bytes.starts_with(&MAGIC[..bytes.len().min(8)]) {
            return Err(FormatError::Magic(name()));
        }
        return Err(FormatError::Truncated { path: name(), found: bytes.len() as u64, want: HEADER_LEN as u64 });
    }
    let (header, body) = bytes.split_at(HEADER_LEN);
    if &header[..8] != MAGIC {
        return Err(FormatError::Magic(name()));
    }
    let word = |r: std::ops::Range<usize>| header[r].iter().rev().fold(0u64, |a, b| a << 8 | u64::from(*b));
    let version = word(8..12) as u32;
    if version != FORMAT_VERSION {
        return Err(FormatError::Version { path: name(), found: version });
    }
    let len = word(16..24);
    if len > MAX_BODY {
        return Err(FormatError::TooLarge { path: name(), len });
    }
    if (body.len() as u64) < len {
        return Err(FormatError::Truncated { path: name(), found: bytes.len() as u64, want: HEADER_LEN as u64 + len });
    }
    // Bytes after the body count as damage too.
    let body_len = usize::try_from(len).unwrap_or(usize::MAX);
    if body.len() != body_len || Sha256::digest(body).as_slice() != &header[24..56] {
        return Err(FormatError::Checksum(name()));
    }
    serde_json::from_slice(body).map_err(|source| FormatError::Decode { path: name(), source })
}

/// Writes `value` to `path` through a temporary file renamed into place,
/// so a reader never sees half a state.
pub fn write_file(path: &Path, value: &impl Serialize) -> Result<u64, FormatError> {
    let bytes = encode(value)?;
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io("create", &tmp))?;
    f.write_all(&bytes).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename into place", path))?;
    Ok(bytes.len() as u64)
}

/// Reads a value from `path`, refusing a file larger than the header and
/// [`MAX_BODY`] allow before reading it.
pub fn read_file<T: DeserializeOwned>(path: &Path) -> Result<T, FormatError> {
    let f = File::open(path).map_err(io("open", path))?;
    let size = f.metadata().map_err(io("read the size of", path))?.len();
    let cap = HEADER_LEN as u64 + MAX_BODY;
    if size > cap {
        return Err(FormatError::TooLarge { path: path.display().to_string(), len: size });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    f.take(cap).read_to_end(&mut bytes).map_err(io("read", path))?;
    decode(&bytes, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct S {
        a: u32,
        b: Vec<u8>,
    }

    #[test]
    fn round_trip_and_every_kind_of_damage() {
        let p = Path::new("state");
        let v = S { a: 7, b: vec![1, 2, 3] };
        let good = encode(&v).unwrap();
        assert_eq!(decode::<S>(&good, p).unwrap(), v);

        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(decode::<S>(&bad, p), Err(FormatError::Magic(_))));
        let mut bad = good.clone();
        bad[8] = 99;
        let e = decode::<S>(&bad, p).unwrap_err();
        assert!(e.to_string().contains("format version 99"), "{e}");
        let mut bad = good.clone();
        let last = bad.len() - 2;
        bad[last] ^= 0x20;
        assert!(matches!(decode::<S>(&bad, p), Err(FormatError::Checksum(_))));
        assert!(matches!(decode::<S>(&good[..good.len() - 1], p), Err(FormatError::Truncated { .. })));
        assert!(matches!(decode::<S>(&good[..20], p), Err(FormatError::Truncated { .. })));
        assert!(matches!(decode::<S>(b"", p), Err(FormatError::Truncated { .. })));
        let mut longer = good.clone();
        longer.push(b' ');
        assert!(matches!(decode::<S>(&longer, p), Err(FormatError::Checksum(_))));
        let mut huge = good.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode::<S>(&huge, p), Err(FormatError::TooLarge { .. })));
        // A well-formed file whose body is not this shape.
        let other = encode(&42u8).unwrap();
        assert!(matches!(decode::<S>(&other, p), Err(FormatError::Decode { .. })));
    }

    #[test]
    fn files_are_written_whole_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state");
        let v = S { a: 1, b: vec![9; 100] };
        let n = write_file(&p, &v).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), n);
        assert_eq!(read_file::<S>(&p).unwrap(), v);
        assert!(!p.with_extension("tmp").exists());
        assert!(matches!(read_file::<S>(&dir.path().join("none")), Err(FormatError::Io { .. })));
    }
}
