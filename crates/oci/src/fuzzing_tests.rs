//! A poor man's fuzzer run by `cargo test`: the seed corpus of
//! `fuzz/seeds/unpack` (kept in sync with [`seeds`] here) and a few hundred
//! mutations of it through [`unpack_layer`].

use super::*;
use crate::unpack::tests::layer::{gzip, zstd, Layer};

const SEED_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/seeds/unpack");

/// The seeds, by file name: hostile shapes the unpacker must refuse or
/// contain, each a few KB.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let tar_with = |f: &dyn Fn(&mut tar::Builder<Vec<u8>>)| {
        let mut b = tar::Builder::new(Vec::new());
        f(&mut b);
        b.into_inner().expect("tar in memory")
    };
    let header = |size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_mtime(1);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(size);
        h
    };
    // GNU long name and long link (tar writes `L` and `K` past 100 bytes).
    let long = tar_with(&|b| {
        let name = format!("{}/file", "n".repeat(150));
        b.append_data(&mut header(2), &name, &b"ok"[..])
            .expect("long name");
        let mut h = header(0);
        h.set_entry_type(tar::EntryType::Symlink);
        b.append_link(&mut h, "link", "t".repeat(200))
            .expect("long link");
    });
    // PAX: path, xattrs in several namespaces.
    let pax = tar_with(&|b| {
        b.append_pax_extensions([
            ("path", &b"pax/very/long/path"[..]),
            ("SCHILY.xattr.user.a", &b"1"[..]),
            ("SCHILY.xattr.trusted.overlay.opaque", &b"y"[..]),
            ("SCHILY.xattr.security.capability", &[1, 0, 0, 2][..]),
        ])
        .expect("pax");
        b.append_data(&mut header(1), "short", &b"x"[..])
            .expect("pax file");
    });
    let many = {
        let mut l = Layer::new();
        for i in 0..300 {
            l.file(&format!("d{}/f{i}", i % 7), 0o644, b"");
        }
        gzip(&l.finish())
    };
    vec![
        ("long-name.tar", long),
        ("pax.tar", pax),
        (
            "sparse.tar",
            Layer::new().sparse("s", 4 << 20).sparse("t", 4096).finish(),
        ),
        ("many-entries.tar.gz", many),
        (
            "long-name-too-large.tar.zst",
            zstd(
                &Layer::new()
                    .extension(tar::EntryType::GNULongName, 1 << 20, &vec![b'a'; 1 << 20])
                    .file("x", 0o644, b"x")
                    .finish(),
            ),
        ),
        (
            "escapes.tar",
            Layer::new()
                .symlink("up", "../../..")
                .file("up/x", 0o644, b"x")
                .symlink("abs", "/")
                .hardlink("h", "abs/etc/passwd")
                .file("../x", 0o644, b"x")
                .finish(),
        ),
        (
            "whiteouts.tar",
            Layer::new()
                .dir("a", 0o755)
                .file("a/b", 0o644, b"b")
                .opaque("a")
                .whiteout("", "a")
                .whiteout("a", "..")
                .chardev("null", 0o666, 1, 3)
                .chardev("mem", 0o666, 1, 1)
                .dir("./", 0o777)
                .finish(),
        ),
    ]
}

/// The seed files match [`seeds`]; `SKIFF_OCI_WRITE_SEEDS=1` rewrites them.
#[test]
fn seed_corpus_is_current() {
    let write = std::env::var_os("SKIFF_OCI_WRITE_SEEDS").is_some();
    for (name, data) in seeds() {
        assert!(data.len() < 16 << 10, "{name}: {} bytes", data.len());
        let p = PathBuf::from(SEED_DIR).join(name);
        if write {
            std::fs::create_dir_all(SEED_DIR).expect("seed dir");
            std::fs::write(&p, &data).expect("write seed");
        }
        let on_disk = std::fs::read(&p).unwrap_or_default();
        assert!(
            on_disk == data,
            "{}: stale; run `SKIFF_OCI_WRITE_SEEDS=1 cargo test -p skiff-oci seed_corpus`",
            p.display()
        );
    }
}

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

/// Flips, overwrites, truncates, duplicates or splices 512-byte blocks
/// (so header fields move: sizes, types, checksums).
fn mutate(r: &mut XorShift, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + r.below(4) {
        if v.is_empty() {
            break;
        }
        match r.below(6) {
            0 => {
                let i = r.below(v.len());
                v[i] ^= 1 << r.below(8);
            }
            1 => {
                let i = r.below(v.len());
                v[i] = [0, 0xff, b'0', b'7', b'L', b'x', b'S', b'1'][r.below(8)];
            }
            2 => v.truncate(r.below(v.len())),
            3 => {
                let b = r.below(v.len() / 512 + 1) * 512;
                let block: Vec<u8> = v.iter().skip(b).take(512).copied().collect();
                let at = (r.below(v.len() / 512 + 1) * 512).min(v.len());
                v.splice(at..at, block);
            }
            4 => {
                let b = r.below(other.len() / 512 + 1) * 512;
                let block: Vec<u8> = other.iter().skip(b).take(512).copied().collect();
                let at = (r.below(v.len() / 512 + 1) * 512).min(v.len());
                v.splice(at..at, block);
            }
            _ => {
                // A size field (ustar offset 124, 12 octal bytes) of a block.
                let b = r.below(v.len() / 512 + 1) * 512 + 124;
                let size = format!("{:011o}", r.next() % (1 << 33));
                for (k, c) in size.bytes().enumerate() {
                    if let Some(x) = v.get_mut(b + k) {
                        *x = c;
                    }
                }
            }
        }
    }
    v
}

#[test]
fn seeds_and_mutations_unpack_safely() {
    // Uncompressed forms mutate into interesting tars; compressed seeds
    // are run as they are.
    let seeds = seeds();
    let plain: Vec<Vec<u8>> = seeds
        .iter()
        .map(|(name, d)| {
            if name.ends_with(".gz") {
                let mut out = Vec::new();
                std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&d[..]), &mut out)
                    .expect("gunzip seed");
                out
            } else if name.ends_with(".zst") {
                zstd::decode_all(&d[..]).expect("unzstd seed")
            } else {
                d.clone()
            }
        })
        .collect();
    for (_, d) in &seeds {
        unpack_layer(d);
    }
    let mut r = XorShift(0x5eed_0c1f_a11e_d00d);
    for i in 0..400 {
        let s = &plain[r.below(plain.len())];
        let o = &plain[r.below(plain.len())];
        let m = mutate(&mut r, s, o);
        // Some through the decompressors as well.
        let input = match i % 5 {
            0 => gzip(&m),
            1 => zstd(&m),
            _ => m,
        };
        unpack_layer(&input);
    }
}
