//! Tests against images made and checked by the real `qemu-img`/`qemu-io`
//! (Debian's qemu-utils, listed in scripts/packages/devices.apt).

use super::*;
use std::process::Command;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} (install qemu-utils): {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img create -q -f qcow2 ARGS...`
fn create_qcow2(args: &[&str]) {
    let mut all = vec!["create", "-q", "-f", "qcow2"];
    all.extend_from_slice(args);
    run("qemu-img", &all);
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn write_file(path: &Path, data: &[u8], offset: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, data, offset).unwrap();
}

#[test]
fn raw_reads_writes_and_checks_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    std::fs::write(&path, pattern(8192, 1)).unwrap();
    let disk = open(&path, None, false).unwrap();
    assert_eq!((disk.size(), disk.format()), (8192, Format::Raw));
    let mut buf = [0u8; 16];
    disk.read_at(&mut buf, 100).unwrap();
    assert_eq!(buf[..], pattern(8192, 1)[100..116]);
    disk.write_at(&[7; 512], 512).unwrap();
    disk.flush().unwrap();
    assert!(matches!(
        disk.read_at(&mut buf, 8190),
        Err(DiskError::OutOfRange { .. })
    ));
    assert!(matches!(
        disk.write_at(&buf, u64::MAX),
        Err(DiskError::OutOfRange { .. })
    ));
    // A second writer is refused while this one holds the lock.
    assert!(matches!(open(&path, None, true), Err(DiskError::Locked(_))));
    drop(disk);
    let ro = open(&path, Some(Format::Raw), true).unwrap();
    assert!(matches!(ro.write_at(&buf, 0), Err(DiskError::ReadOnly)));
    assert_eq!(std::fs::read(&path).unwrap()[512..1024], [7; 512]);
}

#[test]
fn unnamed_format_never_probes_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    create_qcow2(&[p(&path), "1M"]);
    assert!(matches!(
        open(&path, None, false),
        Err(DiskError::Ambiguous(_))
    ));
    // Said raw: served as the bytes of the file.
    let raw = open(&path, Some(Format::Raw), true).unwrap();
    let mut magic = [0u8; 4];
    raw.read_at(&mut magic, 0).unwrap();
    assert_eq!(magic, QCOW2_MAGIC);
    // A raw file said to be qcow2 is refused.
    let rawfile = dir.path().join("plain.raw");
    std::fs::write(&rawfile, vec![0u8; 4096]).unwrap();
    let err = open(&rawfile, Some(Format::Qcow2), true).err().unwrap();
    assert!(
        matches!(
            &err,
            DiskError::Qcow2 {
                source: HeaderError::NoMagic,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!("qcow2".parse::<Format>().unwrap(), Format::Qcow2);
    assert!("vmdk".parse::<Format>().is_err());
}

use crate::qcow2::HeaderError;

/// Reads written by qemu-io, for each cluster size and version.
#[test]
fn reads_what_qemu_wrote() {
    let dir = tempfile::tempdir().unwrap();
    for (compat, cluster) in [
        ("1.1", "65536"),
        ("0.10", "65536"),
        ("1.1", "4096"),
        ("1.1", "2M"),
        ("0.10", "512"),
    ] {
        let path = dir.path().join(format!("q-{compat}-{cluster}.qcow2"));
        let opts = format!("compat={compat},cluster_size={cluster}");
        create_qcow2(&["-o", &opts, p(&path), "16M"]);
        run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 0xab 4096 70000",
                "-c",
                "write -z 1M 64k",
                p(&path),
            ],
        );
        let disk = open(&path, Some(Format::Qcow2), true).unwrap();
        assert_eq!(disk.size(), 16 << 20);
        let mut buf = vec![0u8; 80000];
        disk.read_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|b| *b == 0), "{opts}: head");
        assert!(buf[4096..74096].iter().all(|b| *b == 0xab), "{opts}: data");
        assert!(buf[74096..].iter().all(|b| *b == 0), "{opts}: tail");
        disk.read_at(&mut buf, 1 << 20).unwrap();
        assert!(buf.iter().all(|b| *b == 0), "{opts}: zero cluster");
    }
}

/// A base shared by two overlays: each one's writes stay its own, the base
/// is untouched, and qemu-img agrees on every byte.
#[test]
fn overlays_copy_on_write_from_a_shared_base() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let rawbase = dir.path().join("base.raw");
    create_qcow2(&[p(&base), "8M"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 0 3M", p(&base)],
    );
    std::fs::write(&rawbase, pattern(8 << 20, 5)).unwrap();
    let base_sum = run(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "qcow2", p(&base), p(&base)],
    );
    assert!(!base_sum.is_empty());
    for (backing, bfmt) in [(&base, "qcow2"), (&rawbase, "raw")] {
        let a = dir.path().join(format!("a-{bfmt}.qcow2"));
        let b = dir.path().join(format!("b-{bfmt}.qcow2"));
        for o in [&a, &b] {
            // Relative name: resolved against the overlay's directory.
            let name = backing.file_name().unwrap().to_str().unwrap();
            create_qcow2(&["-b", name, "-F", bfmt, p(o)]);
        }
        let da = open(&a, Some(Format::Qcow2), false).unwrap();
        let db = open(&b, Some(Format::Qcow2), false).unwrap();
        assert_eq!(da.size(), 8 << 20);
        // Partial-cluster writes: the rest of the cluster comes from the base.
        da.write_at(&pattern(1000, 9), 70_000).unwrap();
        da.write_at(&[0xcd; 65536], 5 << 20).unwrap();
        db.write_at(&[0xee; 4096], 1 << 20).unwrap();
        let mut got = vec![0u8; 200_000];
        da.read_at(&mut got, 0).unwrap();
        let mut want = vec![0u8; 200_000];
        let bb = open(
            backing,
            Some(if bfmt == "raw" {
                Format::Raw
            } else {
                Format::Qcow2
            }),
            true,
        );
        // The base is locked shared by the overlays: a reader may join.
        bb.unwrap().read_at(&mut want, 0).unwrap();
        want[70_000..71_000].copy_from_slice(&pattern(1000, 9));
        assert!(
            got == want,
            "{bfmt}: overlay a reads its write over the base"
        );
        da.flush().unwrap();
        drop((da, db));
        for o in [&a, &b] {
            run("qemu-img", &["check", "-q", p(o)]);
        }
        let read = |img: &Path, off: &str, len: &str, pat: &str| {
            run(
                "qemu-io",
                &[
                    "-r",
                    "-f",
                    "qcow2",
                    "-c",
                    &format!("read -P {pat} {off} {len}"),
                    p(img),
                ],
            )
        };
        read(&a, "5M", "64k", "0xcd");
        read(&b, "1M", "4k", "0xee");
        if bfmt == "qcow2" {
            read(&b, "5M", "64k", "0x00");
            read(&a, "1M", "4k", "0x11");
        }
        // Overlay b differs from a only where each wrote.
        let out = Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "qcow2", p(&a), p(&b)])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "a and b differ");
    }
    // The shared base was never written.
    run("qemu-img", &["check", "-q", p(&base)]);
    run(
        "qemu-io",
        &["-r", "-f", "qcow2", "-c", "read -P 0x11 0 3M", p(&base)],
    );
    assert!(std::fs::read(&rawbase).unwrap() == pattern(8 << 20, 5));
}

#[test]
fn fresh_writes_pass_qemu_img_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    for cluster in ["512", "65536", "2M"] {
        let q = dir.path().join(format!("w-{cluster}.qcow2"));
        let r = dir.path().join(format!("w-{cluster}.raw"));
        create_qcow2(&["-o", &format!("cluster_size={cluster}"), p(&q), "32M"]);
        std::fs::write(&r, vec![0u8; 32 << 20]).unwrap();
        let disk = open(&q, Some(Format::Qcow2), false).unwrap();
        for (i, off) in [0u64, 4095, 1 << 20, (3 << 20) + 17, (32 << 20) - 3000]
            .iter()
            .enumerate()
        {
            let data = pattern(3000, i as u8);
            disk.write_at(&data, *off).unwrap();
            write_file(&r, &data, *off);
        }
        drop(disk);
        run("qemu-img", &["check", "-q", p(&q)]);
        run(
            "qemu-img",
            &["compare", "-q", "-f", "qcow2", "-F", "raw", p(&q), p(&r)],
        );
    }
}

#[test]
fn backing_chains_are_capped_and_need_a_format() {
    let dir = tempfile::tempdir().unwrap();
    let mut prev = dir.path().join("c0.qcow2");
    create_qcow2(&[p(&prev), "1M"]);
    for i in 1..=qcow2::MAX_CHAIN {
        let next = dir.path().join(format!("c{i}.qcow2"));
        create_qcow2(&["-b", p(&prev), "-F", "qcow2", p(&next)]);
        if i == qcow2::MAX_CHAIN - 1 {
            open(&next, Some(Format::Qcow2), true).unwrap();
        }
        prev = next;
    }
    let err = open(&prev, Some(Format::Qcow2), true).err().unwrap();
    assert!(format!("{:?}", err).contains("deeper than"), "{err:?}");
    // No recorded backing format: refused, not probed.
    let nofmt = dir.path().join("nofmt.qcow2");
    create_qcow2(&[
        "-b",
        p(&dir.path().join("c0.qcow2")),
        "-F",
        "qcow2",
        p(&nofmt),
    ]);
    // Turn the backing format extension into an unknown (ignored) one.
    let mut img = std::fs::read(&nofmt).unwrap();
    let at = img[..4096]
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .unwrap();
    img[at..at + 4].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    std::fs::write(&nofmt, img).unwrap();
    let err = open(&nofmt, Some(Format::Qcow2), true).err().unwrap();
    assert!(
        format!("{err}: {:?}", err).contains("no recorded format"),
        "{err:?}"
    );
}

/// A small qcow2 image with data in two L2 ranges, and its bytes.
fn sample(dir: &Path, name: &str) -> (PathBuf, Vec<u8>) {
    let path = dir.join(name);
    create_qcow2(&["-o", "cluster_size=4096", p(&path), "4M"]);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 0 8k",
            "-c",
            "write -P 0x33 3M 4k",
            "-c",
            "write -z 2M 4k",
            p(&path),
        ],
    );
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

fn be64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

#[test]
fn corrupt_images_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (path, good) = sample(dir.path(), "good.qcow2");
    let l1 = be64_at(&good, 40) as usize;
    let l2 = (be64_at(&good, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let far = (1u64 << 40).to_be_bytes();
    type Patch = (&'static str, usize, Vec<u8>);
    let cases: Vec<Patch> = vec![
        ("not a qcow2 image", 0, b"QFI\0".to_vec()),
        ("version 4", 4, 4u32.to_be_bytes().to_vec()),
        ("cluster_bits = 30", 20, 30u32.to_be_bytes().to_vec()),
        ("encrypted", 32, 1u32.to_be_bytes().to_vec()),
        ("l1_size", 36, u32::MAX.to_be_bytes().to_vec()),
        ("L1 table at", 40, far.to_vec()),
        ("l1_table_offset", 40, 4097u64.to_be_bytes().to_vec()),
        ("refcount table at", 48, far.to_vec()),
        (
            "refcount_table_clusters",
            56,
            1_000_000u32.to_be_bytes().to_vec(),
        ),
        ("bit 0 is set: dirty", 72 + 7, vec![1]),
        ("bit 1 is set: corrupt", 72 + 7, vec![2]),
        ("bit 2 is set: external data file", 72 + 7, vec![4]),
        ("bit 9 is set: unknown", 72 + 6, vec![2]),
        ("refcount_order", 96, 7u32.to_be_bytes().to_vec()),
        ("header_length", 100, 9000u32.to_be_bytes().to_vec()),
        (
            "backing_file_size",
            8,
            [
                104u64.to_be_bytes().to_vec(),
                5000u32.to_be_bytes().to_vec(),
            ]
            .concat(),
        ),
        (
            "backing_file_offset",
            8,
            [
                4090u64.to_be_bytes().to_vec(),
                100u32.to_be_bytes().to_vec(),
            ]
            .concat(),
        ),
        ("L2 table at 0x10000000000", l1, far.to_vec()),
        ("L1 entry 0", l1 + 7, vec![1]),
        ("data cluster at 0x10000000000", l2, far.to_vec()),
        (
            "L2 entry 0",
            l2,
            ((1u64 << 63) | (4096 + 512)).to_be_bytes().to_vec(),
        ),
        ("too short", usize::MAX, vec![]),
    ];
    for (want, at, bytes) in cases {
        let mut img = good.clone();
        if at == usize::MAX {
            img.truncate(50);
        } else {
            img[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        std::fs::write(&path, &img).unwrap();
        for readonly in [true, false] {
            let err = open(&path, Some(Format::Qcow2), readonly).err();
            let msg = err.map(|e| {
                let mut s = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(c) = src {
                    s += &format!(": {c}");
                    src = c.source();
                }
                s
            });
            assert!(
                msg.as_deref().is_some_and(|m| m.contains(want)),
                "{want}: got {msg:?}"
            );
        }
    }
    // Internal snapshots: read-only only.
    std::fs::write(&path, &good).unwrap();
    run("qemu-img", &["snapshot", "-c", "s1", p(&path)]);
    open(&path, Some(Format::Qcow2), true).unwrap();
    let err = open(&path, Some(Format::Qcow2), false).err().unwrap();
    assert!(err
        .source()
        .unwrap()
        .to_string()
        .contains("internal snapshots"));
}

use std::error::Error as _;
use std::path::PathBuf;

/// A deterministic mutator: thousands of damaged variants of a real image
/// are opened, read whole, written and flushed. Errors are fine; a panic,
/// a hang or a huge allocation fails the test.
#[test]
fn mutated_images_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (path, good) = sample(dir.path(), "m.qcow2");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut opened, mut refused) = (0, 0);
    for _ in 0..1500 {
        let img = mutate(&good, &mut rng);
        std::fs::write(&path, &img).unwrap();
        let readonly = rng.next().is_multiple_of(2);
        let disk = match open(&path, Some(Format::Qcow2), readonly) {
            Ok(d) => d,
            Err(_) => {
                refused += 1;
                continue;
            }
        };
        opened += 1;
        crate::fuzzing::exercise(disk.as_ref(), 8 << 20, rng.next());
    }
    assert!(
        opened > 100 && refused > 100,
        "opened {opened}, refused {refused}"
    );
}

/// xorshift64: the mutators' deterministic randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// 1 to 4 damaged bytes or words, mostly in the header cluster and tables.
fn mutate(good: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut img = good.to_vec();
    for _ in 0..1 + rng.next() % 4 {
        let r = rng.next();
        let at = if r & 3 == 0 {
            (r >> 8) as usize % img.len()
        } else {
            (r >> 8) as usize % 4096.min(img.len())
        };
        match (r >> 4) % 4 {
            0 => img[at] ^= 1 << ((r >> 40) % 8),
            1 => img[at] = (r >> 32) as u8,
            2 => {
                let end = (at + 8).min(img.len());
                let word = (r.rotate_left(17) >> (r % 40)).to_be_bytes();
                img[at..end].copy_from_slice(&word[..end - at]);
            }
            _ => img[at] = 0xff,
        }
    }
    img
}

/// The cargo-fuzz entry point on damaged variants of a real image, and on
/// truncated ones.
#[test]
fn fuzz_entry_on_mutations() {
    let dir = tempfile::tempdir().unwrap();
    let (_, good) = sample(dir.path(), "f.qcow2");
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for i in 0..600 {
        let mut img = mutate(&good, &mut rng);
        if i % 10 == 0 {
            img.truncate(rng.next() as usize % img.len());
        }
        crate::fuzzing::qcow2(&img);
    }
    crate::fuzzing::qcow2(&good);
    crate::fuzzing::qcow2(&[]);
}

/// Overlays we write: `qemu-img check` and `info` agree with them, they
/// read the base until written, and writes stay in the overlay.
#[test]
fn created_overlays_work_with_qemu_and_us() {
    let dir = tempfile::tempdir().unwrap();
    let qbase = dir.path().join("base.qcow2");
    let rbase = dir.path().join("base.raw");
    create_qcow2(&[p(&qbase), "1G"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x22 1M 2M", p(&qbase)],
    );
    std::fs::write(&rbase, pattern(3 << 20, 7)).unwrap();
    for (base, fmt, size) in [
        (&qbase, Format::Qcow2, 1u64 << 30),
        (&rbase, Format::Raw, 3 << 20),
    ] {
        let o = dir.path().join(format!("over-{fmt}.qcow2"));
        create_overlay(&o, base, fmt).unwrap();
        run("qemu-img", &["check", "-q", p(&o)]);
        let info = run("qemu-img", &["info", "--output=json", p(&o)]);
        assert!(
            info.contains(&format!("\"backing-filename-format\": \"{fmt}\"")),
            "{info}"
        );
        let got = inspect(&o, None).unwrap();
        assert_eq!(got.format, Format::Qcow2);
        assert_eq!(got.virtual_size, size);
        assert_eq!(
            got.backing.as_deref(),
            Some(std::fs::canonicalize(base).unwrap().to_str().unwrap())
        );
        let d = open(&o, Some(Format::Qcow2), false).unwrap();
        assert_eq!(d.size(), size);
        let mut buf = vec![0u8; 4096];
        d.read_at(&mut buf, 1 << 20).unwrap();
        let want = if fmt == Format::Qcow2 {
            vec![0x22; 4096]
        } else {
            pattern(3 << 20, 7)[1 << 20..(1 << 20) + 4096].to_vec()
        };
        assert!(buf == want, "{fmt}: the overlay reads its base");
        d.write_at(&[0x5a; 8192], 2 << 20).unwrap();
        d.flush().unwrap();
        drop(d);
        run("qemu-img", &["check", "-q", p(&o)]);
        run(
            "qemu-io",
            &["-r", "-f", "qcow2", "-c", "read -P 0x5a 2M 8k", p(&o)],
        );
        // An existing file is never overwritten.
        let before = std::fs::read(&o).unwrap();
        assert!(matches!(
            create_overlay(&o, base, fmt),
            Err(DiskError::Create { .. })
        ));
        assert!(std::fs::read(&o).unwrap() == before);
    }
    // The bases were never written.
    run(
        "qemu-io",
        &["-r", "-f", "qcow2", "-c", "read -P 0x22 1M 2M", p(&qbase)],
    );
    assert!(std::fs::read(&rbase).unwrap() == pattern(3 << 20, 7));
    // A base that fails the check gets no overlay.
    let bad = dir.path().join("bad.qcow2");
    std::fs::write(&bad, b"QFI\xfb\0\0\0\x09").unwrap();
    let o = dir.path().join("over-bad.qcow2");
    assert!(create_overlay(&o, &bad, Format::Qcow2).is_err());
    assert!(!o.exists());
}

/// `inspect` tells formats by the magic alone, reports a backing reference
/// without opening it, and refuses what `open` would.
#[test]
fn inspect_reports_without_opening_backing_files() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("r.img");
    std::fs::write(&raw, pattern(65536, 1)).unwrap();
    let i = inspect(&raw, None).unwrap();
    assert_eq!(
        (i.format, i.virtual_size, i.backing),
        (Format::Raw, 65536, None)
    );
    let q = dir.path().join("q.qcow2");
    create_qcow2(&["-u", "-b", "/nonexistent/secret", "-F", "raw", p(&q), "64M"]);
    let i = inspect(&q, None).unwrap();
    assert_eq!(i.format, Format::Qcow2);
    assert_eq!(i.virtual_size, 64 << 20);
    assert_eq!(i.backing.as_deref(), Some("/nonexistent/secret"));
    assert_eq!(i.backing_format.as_deref(), Some("raw"));
    // The qcow2 file told to be raw is just bytes.
    assert_eq!(inspect(&q, Some(Format::Raw)).unwrap().format, Format::Raw);
    // Not a regular file.
    assert!(inspect(dir.path(), None).is_err());
    // A truncated header.
    let t = dir.path().join("t.qcow2");
    std::fs::write(&t, &std::fs::read(&q).unwrap()[..50]).unwrap();
    assert!(matches!(inspect(&t, None), Err(DiskError::Qcow2 { .. })));
}
