//! Entry point for the `control_request` cargo-fuzz target in
//! `crates/agent-proto/fuzz/` (always built: small, and this crate has no
//! `fuzzing` feature); `cargo test` runs it on
//! that target's seed corpus and a few hundred mutations of it.

use std::time::Duration;

use crate::control::{self, read_request_line};
use crate::monitor;

/// Longest line [`control_request`] lets the reader take.
const MAX_LINE: usize = 64;

/// Arbitrary bytes as a client's request on the runner's and the
/// monitor's control sockets: the capped line reader, then both parsers.
pub fn control_request(data: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    let read = rt.block_on(read_request_line(data, MAX_LINE, Duration::from_secs(1)));
    match read {
        Ok(Some(line)) => {
            // Lossy UTF-8 turns each bad byte into one char.
            assert!(line.chars().count() <= MAX_LINE, "{} chars", line.chars().count());
            parse(&line);
        }
        Ok(None) => assert!(data.is_empty()),
        Err(control::ControlError::LineTooLong(n)) => assert_eq!(n, MAX_LINE),
        Err(e) => panic!("reading from memory failed: {e}"),
    }
    parse(&String::from_utf8_lossy(data));
}

fn parse(line: &str) {
    if let Some(sig) = control::parse_request(line) {
        assert!(line.trim().starts_with("signal "));
        assert_eq!(control::parse_request(&format!("signal {sig}")), Some(sig));
    }
    if let Ok(req) = monitor::parse_request(line) {
        let again = serde_json::to_string(&req).expect("serialize");
        assert_eq!(monitor::parse_request(&again), Ok(req));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn control_request_corpus_and_mutations() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent-proto/fuzz/corpus/control_request");
        let seeds: Vec<Vec<u8>> =
            std::fs::read_dir(&dir).expect("corpus").map(|e| std::fs::read(e.unwrap().path()).unwrap()).collect();
        assert!(!seeds.is_empty());
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for s in &seeds {
            control_request(s);
        }
        for i in 0..400 {
            let mut m = seeds[i % seeds.len()].clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % (m.len() + 1);
                match next() % 4 {
                    0 if at < m.len() => m[at] ^= 1 << (next() % 8),
                    1 => m.insert(at, next() as u8),
                    2 => m.truncate(at),
                    _ => m.splice(at..at, std::iter::repeat_n(next() as u8, (next() % 100) as usize)).for_each(drop),
                }
            }
            control_request(&m);
        }
    }
}
