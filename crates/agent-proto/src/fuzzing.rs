//! Entry points for the cargo-fuzz targets in `fuzz/` (feature `fuzzing`);
//! `cargo test` runs them on the seed corpus and a few hundred mutations
//! of it (`tests` below).
//!
//! - [`frames`]: arbitrary bytes through the frame decoder, both message
//!   directions and the blocking reader; every frame decoded must respect
//!   the caps and re-encode to the same bytes.
//! - [`tree`]: arbitrary bytes as a hostile guest's pull stream (entries,
//!   file chunks, ends, the final `ok`) applied into a scratch directory;
//!   afterwards nothing outside the target exists or changed, and no
//!   set-id or sticky bit exists below it.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::frame::{decode, encode_data, read_frame, HEADER_LEN, MAX_DATA_CHUNK};
use crate::message::{AgentMessage, ClientMessage, EntryKind, FileEntry};
use crate::tree::{TreeReceiver, WriteOptions};

/// Decodes `data` as a stream of frames until it ends or fails.
pub fn frames(data: &[u8]) {
    let mut rest = data;
    while let Ok(Some((frame, used))) = decode::<AgentMessage>(rest) {
        assert!(used > HEADER_LEN && used <= rest.len(), "used {used}");
        if let crate::Frame::Data(d) = &frame {
            assert!(d.bytes.len() <= MAX_DATA_CHUNK);
            let again = encode_data(d.id, d.channel, &d.bytes).expect("re-encode");
            assert_eq!(again, rest[..used], "data frame re-encodes");
        }
        rest = &rest[used..];
    }
    let _ = decode::<ClientMessage>(data);
    let mut r = io::Cursor::new(data);
    while let Ok(Some(_)) = read_frame::<ClientMessage, _>(&mut r) {}
}

/// Entry paths a hostile stream picks from: good ones, repeated ones, and
/// every kind of escape attempt.
const PATHS: &[&str] = &[
    "",
    "",
    "a",
    "b",
    "a/b",
    "a/b/c",
    "b/a",
    "s",
    "s/x",
    "s/s",
    "..",
    "../x",
    "../outside/x",
    "/etc/x",
    "a//b",
    "./a",
    "a/.",
    "a/../b",
];

/// The bytes of a fuzz input, read as small numbers.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn pick<'b, T>(&mut self, from: &'b [T]) -> Option<&'b T> {
        Some(&from[usize::from(self.byte()?) % from.len()])
    }
}

static RUNS: AtomicU64 = AtomicU64::new(0);

/// Applies `data` as a pull stream into a scratch directory and checks
/// the result (see the module doc).
pub fn tree(data: &[u8]) {
    let base = scratch();
    let outside = base.join("outside");
    let secret = base.join("secret");
    fs::create_dir_all(&outside).expect("scratch");
    fs::write(&secret, b"s").expect("scratch");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).expect("scratch");
    let targets = [
        "a".to_string(),
        "..".into(),
        "../outside".into(),
        "../secret".into(),
        "/".into(),
        outside.display().to_string(),
        secret.display().to_string(),
        "s/..".into(),
    ];
    let opts = WriteOptions {
        parents: true,
        max_entries: 64,
        max_bytes: 1 << 20,
        ..Default::default()
    };
    let mut receiver = TreeReceiver::new(&base.join("dst"), opts);
    let mut input = Input(data);
    if apply(&mut receiver, &mut input, &targets) == Some(true) {
        let _ = receiver.finish();
    } else {
        drop(receiver);
    }
    check(&base, &outside, &secret);
    make_removable(&base);
    let _ = fs::remove_dir_all(&base);
}

/// Feeds ops from `input` until it ends or an op fails (`None`), or the
/// stream says the tree is complete (`Some(true)`).
fn apply(r: &mut TreeReceiver, input: &mut Input<'_>, targets: &[String]) -> Option<bool> {
    loop {
        match input.byte()? % 6 {
            0..=2 => {
                let path = input.pick(PATHS)?.to_string();
                let kind = match input.byte()? % 3 {
                    0 => EntryKind::Dir,
                    1 => EntryKind::File {
                        size: u64::from(input.byte()?) * 7,
                    },
                    _ => EntryKind::Symlink {
                        target: input.pick(targets)?.clone(),
                    },
                };
                let mode = u32::from(u16::from_be_bytes([input.byte()?, input.byte()?]));
                let entry = FileEntry {
                    path,
                    kind,
                    mode: mode & 0o7777,
                    uid: None,
                    gid: None,
                };
                r.entry(entry).ok()?;
            }
            3 => {
                let n = usize::from(input.byte()?) * 3;
                r.data(&vec![0x5a; n]).ok()?;
            }
            4 => r.data(&[]).ok()?,
            _ => return Some(true),
        }
    }
}

fn scratch() -> PathBuf {
    let n = RUNS.fetch_add(1, Ordering::Relaxed);
    let base = std::env::temp_dir().join(format!("skiff-fuzz-tree-{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&base);
    base
}

/// Nothing but `dst` was created in `base`, `outside` is empty, `secret`
/// is as it was, and no set-id or sticky bit exists below `dst`.
fn check(base: &Path, outside: &Path, secret: &Path) {
    for e in fs::read_dir(base).expect("read scratch") {
        let name = e.expect("entry").file_name();
        assert!(
            ["dst", "outside", "secret"].iter().any(|n| name == *n),
            "created outside the target: {name:?}"
        );
    }
    let inside: Vec<_> = fs::read_dir(outside).expect("read outside").collect();
    assert!(inside.is_empty(), "written outside the target: {inside:?}");
    let md = fs::symlink_metadata(secret).expect("secret");
    assert_eq!(md.mode() & 0o7777, 0o600, "secret's mode changed");
    assert_eq!(md.len(), 1, "secret's size changed");
    no_special_bits(&base.join("dst"));
}

fn no_special_bits(path: &Path) {
    let Ok(md) = fs::symlink_metadata(path) else {
        return;
    };
    if md.file_type().is_symlink() {
        return;
    }
    assert_eq!(
        md.mode() & 0o7000,
        0,
        "{} has mode {:o}",
        path.display(),
        md.mode()
    );
    if md.is_dir() {
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o700));
        for e in fs::read_dir(path).expect("read tree").flatten() {
            no_special_bits(&e.path());
        }
    }
}

/// Makes every directory below `path` writable (not following symlinks),
/// so the scratch directory can be removed.
fn make_removable(path: &Path) {
    let Ok(md) = fs::symlink_metadata(path) else {
        return;
    };
    if md.is_dir() {
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o700));
        if let Ok(rd) = fs::read_dir(path) {
            for e in rd.flatten() {
                make_removable(&e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! A poor man's fuzzer run by `cargo test`: the seed corpus of each
    //! target, then mutations of it.
    use super::*;

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    fn corpus(target: &str) -> Vec<Vec<u8>> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target);
        let mut out: Vec<Vec<u8>> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| fs::read(e.unwrap().path()).unwrap())
            .collect();
        out.sort();
        assert!(!out.is_empty(), "empty corpus {}", dir.display());
        out
    }

    /// Flips, inserts, cuts and splices bytes of a seed.
    fn mutate(r: &mut XorShift, seed: &[u8], seeds: &[Vec<u8>]) -> Vec<u8> {
        let mut m = seed.to_vec();
        for _ in 0..1 + r.below(4) {
            match r.below(5) {
                0 if !m.is_empty() => {
                    let i = r.below(m.len());
                    m[i] ^= 1 << r.below(8);
                }
                1 => {
                    let i = r.below(m.len() + 1);
                    m.insert(i, r.next() as u8);
                }
                2 if !m.is_empty() => m.truncate(r.below(m.len())),
                3 => {
                    let other = &seeds[r.below(seeds.len())];
                    let from = r.below(other.len() + 1);
                    m.extend_from_slice(&other[from..]);
                }
                _ => {
                    let i = r.below(m.len() + 1);
                    m.splice(i..i, (0..r.below(16)).map(|_| r.next() as u8));
                }
            }
        }
        m
    }

    fn run(target: &str, f: fn(&[u8]), mutations: usize) {
        let seeds = corpus(target);
        let mut r = XorShift(0x5eed_0000_0000_0001 ^ target.len() as u64);
        for s in &seeds {
            f(s);
        }
        for i in 0..mutations {
            let m = mutate(&mut r, &seeds[i % seeds.len()], &seeds);
            f(&m);
        }
    }

    #[test]
    fn frames_corpus_and_mutations() {
        run("frames", frames, 2000);
    }

    #[test]
    fn tree_corpus_and_mutations() {
        run("tree", tree, 400);
    }
}
