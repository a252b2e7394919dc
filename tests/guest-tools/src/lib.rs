//! The transfer protocol that `skiff-guest-tools` speaks, shared with the
//! host side of Skiff's device tests (`tests/tests/devices.rs`).
//!
//! A framed transfer is `<n>\n`, n bytes, then `<sha256 of them>\n`; the
//! receiver answers `<sha256> <n>\n` of what it got. The data comes from a
//! fast generator seeded from getrandom, so a transport that repeats or drops
//! a block cannot pass.

pub mod vsock;

use std::io::{self, BufRead, Read, Write};

use anyhow::{ensure, Context, Result};
use sha2::{Digest, Sha256};

/// Read and write size.
pub const CHUNK: usize = 256 * 1024;

/// Fast pseudo-random bytes (xorshift64*), seeded from getrandom: the data
/// is random enough that a transport bug cannot pass by repeating a block.
pub struct Pattern(pub u64);

impl Pattern {
    /// A generator with a random seed.
    pub fn new() -> Self {
        let mut seed = [0u8; 8];
        // SAFETY: the buffer is valid for 8 bytes of writes.
        let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
        let mut s = if n == 8 { u64::from_le_bytes(seed) } else { 0x9e37_79b9_7f4a_7c15 };
        if s == 0 {
            s = 1;
        }
        Self(s)
    }

    /// Fills `buf` with the next bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Streams `n` bytes of `pattern` through `f`, chunk by chunk.
pub fn each_chunk(mut pattern: Pattern, n: u64, mut f: impl FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut left = n;
    while left > 0 {
        let len = left.min(CHUNK as u64) as usize;
        pattern.fill(&mut buf[..len]);
        f(&buf[..len])?;
        left -= len as u64;
    }
    Ok(())
}

/// Sends a framed transfer: `"<n>\n"`, `n` pseudo-random bytes, then
/// `"<sha256>\n"` of those bytes (hashed while sending: one pass).
pub fn send_framed(w: &mut impl Write, n: u64) -> io::Result<String> {
    writeln!(w, "{n}")?;
    let mut h = Sha256::new();
    each_chunk(Pattern::new(), n, |c| {
        h.update(c);
        w.write_all(c)
    })?;
    let sha = hex::encode(h.finalize());
    writeln!(w, "{sha}")?;
    w.flush()?;
    Ok(sha)
}

/// Reads a framed transfer; returns `(sha256 of the data, sha256 the sender
/// announced, length)`.
pub fn recv_framed(r: &mut impl BufRead) -> Result<(String, String, u64)> {
    let n: u64 = read_line(r)?.parse().context("bad length line")?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = n;
    while left > 0 {
        let len = left.min(CHUNK as u64) as usize;
        r.read_exact(&mut buf[..len]).with_context(|| format!("data ended {left} bytes early"))?;
        h.update(&buf[..len]);
        left -= len as u64;
    }
    let announced = read_line(r)?;
    Ok((hex::encode(h.finalize()), announced, n))
}

/// Reads to EOF, returning `(sha256, count)`.
pub fn hash_to_eof(r: &mut impl Read) -> io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut count = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        count += n as u64;
    }
    Ok((hex::encode(h.finalize()), count))
}

/// Reads one `\n`-terminated line (without it); fails on EOF before it.
pub fn read_line(r: &mut impl BufRead) -> Result<String> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    ensure!(line.ends_with('\n'), "connection closed before a full line (got {line:?})");
    Ok(line.trim_end().to_string())
}

impl Default for Pattern {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(n: u64) -> (Vec<u8>, String) {
        let mut out = Vec::new();
        let sha = send_framed(&mut out, n).unwrap();
        (out, sha)
    }

    #[test]
    fn framed_transfer_round_trips() {
        for n in [0, 1, 7, CHUNK as u64, 3 * CHUNK as u64 + 5] {
            let (wire, sha) = framed(n);
            assert_eq!(wire.len() as u64, n + format!("{n}\n").len() as u64 + 65);
            let (got, announced, len) = recv_framed(&mut &wire[..]).unwrap();
            assert_eq!((got.as_str(), announced.as_str(), len), (sha.as_str(), sha.as_str(), n));
        }
    }

    #[test]
    fn a_flipped_byte_is_seen() {
        let (mut wire, sha) = framed(100_000);
        wire[50_000] ^= 1;
        let (got, announced, _) = recv_framed(&mut &wire[..]).unwrap();
        assert_eq!(announced, sha);
        assert_ne!(got, sha);
    }

    #[test]
    fn short_data_is_an_error() {
        let (wire, _) = framed(100_000);
        assert!(recv_framed(&mut &wire[..50_000]).is_err());
        assert!(recv_framed(&mut &b"12"[..]).is_err());
    }

    #[test]
    fn patterns_differ_between_generators() {
        let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
        Pattern::new().fill(&mut a);
        Pattern::new().fill(&mut b);
        assert_ne!(a, b);
        let mut c = [0u8; 13];
        Pattern(1).fill(&mut c);
        assert!(c.iter().any(|&x| x != 0));
    }
}
