//! Unpack tests on crafted (and hostile) layers.

use super::*;
use std::ffi::{CString, OsString};
use std::os::unix::fs::FileTypeExt;

#[path = "../tests/common/layer.rs"]
pub(crate) mod layer;
use layer::{gzip, zstd, Layer};

struct Fixture {
    _dir: tempfile::TempDir,
    outside: PathBuf,
    root: PathBuf,
}

/// A rootfs inside a directory that also holds a sentinel "outside" area,
/// so escapes can be detected.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside");
    let root = dir.path().join("a/b/rootfs");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("passwd"), b"host").unwrap();
    fs::create_dir_all(&root).unwrap();
    for (p, mode) in [(outside.join("passwd"), 0o644), (outside.clone(), 0o755)] {
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        set_times(&p, 1_234_567).unwrap();
    }
    Fixture {
        _dir: dir,
        outside,
        root,
    }
}

fn unpack(root: &Path, layers: &[Vec<u8>]) -> Result<(), UnpackError> {
    unpack_with(root, layers, UnpackOptions::default())
}

fn unpack_with(root: &Path, layers: &[Vec<u8>], opts: UnpackOptions) -> Result<(), UnpackError> {
    let mut u = Unpacker::new(root, opts);
    for l in layers {
        u.apply(&l[..])?;
    }
    u.finish()
}

fn assert_outside_untouched(f: &Fixture) {
    let names: Vec<_> = fs::read_dir(&f.outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![OsString::from("passwd")],
        "something was written outside"
    );
    assert_eq!(fs::read(f.outside.join("passwd")).unwrap(), b"host");
    for p in [f.outside.clone(), f.outside.join("passwd")] {
        let m = fs::metadata(&p).unwrap();
        assert_eq!(
            (m.mtime(), m.mode() & 0o7777),
            (1_234_567, if m.is_dir() { 0o755 } else { 0o644 }),
            "{p:?} changed"
        );
    }
    let top: Vec<_> = fs::read_dir(f.root.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        top,
        vec![OsString::from("rootfs")],
        "something was written beside the rootfs"
    );
}

#[test]
fn kinds_modes_times_xattrs() {
    let f = fixture();
    let l = Layer::new()
        .dir("./", 0o755)
        .dir("bin", 0o755)
        .file("bin/tool", 0o4755, b"#!/bin/sh\n")
        .hardlink("bin/tool2", "bin/tool")
        .symlink("bin/sh", "tool")
        .mtime(1_700_000_000)
        .dir("etc", 0o700)
        .file_xattrs("etc/x", 0o640, b"data", &[("user.skiff", b"yes")])
        .fifo("etc/fifo", 0o600)
        .chardev("etc/null", 0o666, 1, 3)
        .finish();
    unpack(&f.root, &[gzip(&l)]).unwrap();
    let r = &f.root;
    let tool = fs::metadata(r.join("bin/tool")).unwrap();
    assert_eq!(tool.mode() & 0o7777, 0o4755);
    assert_eq!(tool.mtime(), 1_600_000_000);
    assert_eq!(tool.nlink(), 2);
    assert_eq!(fs::metadata(r.join("bin/tool2")).unwrap().ino(), tool.ino());
    assert_eq!(fs::read_link(r.join("bin/sh")).unwrap(), Path::new("tool"));
    let etc = fs::metadata(r.join("etc")).unwrap();
    assert_eq!((etc.mode() & 0o7777, etc.mtime()), (0o700, 1_700_000_000));
    assert_eq!(fs::metadata(r.join("bin")).unwrap().mtime(), 1_600_000_000);
    let x = fs::metadata(r.join("etc/x")).unwrap();
    assert_eq!(x.mode() & 0o777, 0o640);
    let mut buf = [0u8; 16];
    let c = cstr(&r.join("etc/x")).unwrap();
    // SAFETY: valid NUL-terminated strings and a buffer of buf.len() bytes.
    let n = unsafe {
        libc::lgetxattr(
            c.as_ptr(),
            c"user.skiff".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert_eq!(&buf[..n.max(0) as usize], b"yes");
    assert!(fs::symlink_metadata(r.join("etc/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    let null = fs::symlink_metadata(r.join("etc/null"));
    if UnpackOptions::default().create_devices {
        let m = null.unwrap();
        assert!(m.file_type().is_char_device());
        assert_eq!(m.rdev(), libc::makedev(1, 3));
    } else {
        assert!(null.is_err());
    }
}

#[test]
fn whiteouts_and_opaque_dirs() {
    let f = fixture();
    let l1 = Layer::new()
        .dir("a", 0o755)
        .file("a/gone", 0o644, b"1")
        .file("a/kept", 0o644, b"1")
        .dir("o", 0o755)
        .file("o/old", 0o644, b"1")
        .dir("o/sub", 0o755)
        .file("o/sub/old", 0o644, b"1")
        .dir("p", 0o755)
        .file("p/old", 0o644, b"1")
        .dir("d", 0o755)
        .file("d/inside", 0o644, b"1")
        .finish();
    let l2 = Layer::new()
        .whiteout("a", "gone")
        .whiteout("", "d")
        // Opaque marker before this layer's entries...
        .opaque("o")
        .file("o/sub/new", 0o644, b"2")
        // ...and after.
        .file("p/new", 0o644, b"2")
        .opaque("p")
        .finish();
    unpack(&f.root, &[l1, zstd(&l2)]).unwrap();
    let r = &f.root;
    assert!(!r.join("a/gone").exists());
    assert!(r.join("a/kept").exists());
    assert!(!r.join("d").exists());
    assert!(!r.join("o/old").exists());
    assert!(
        !r.join("o/sub/old").exists(),
        "lower content under an opaque dir is hidden"
    );
    assert_eq!(fs::read(r.join("o/sub/new")).unwrap(), b"2");
    assert!(!r.join("p/old").exists());
    assert_eq!(fs::read(r.join("p/new")).unwrap(), b"2");
    for bad in [".wh..", ".wh."] {
        let e = unpack(&f.root, &[Layer::new().file(bad, 0o644, b"").finish()]).unwrap_err();
        assert!(matches!(e, UnpackError::Whiteout(_)), "{e}");
    }
}

#[test]
fn replacing_kinds() {
    let f = fixture();
    let l1 = Layer::new()
        .dir("x", 0o755)
        .file("x/f", 0o644, b"1")
        .file("y", 0o644, b"1")
        .finish();
    let l2 = Layer::new()
        .file("x", 0o644, b"now a file")
        .dir("y", 0o755)
        .file("y/z", 0o644, b"z")
        .finish();
    unpack(&f.root, &[l1, l2]).unwrap();
    assert_eq!(fs::read(f.root.join("x")).unwrap(), b"now a file");
    assert_eq!(fs::read(f.root.join("y/z")).unwrap(), b"z");
}

#[test]
fn path_traversal_is_refused() {
    for name in ["../evil", "a/../../evil", "./../../outside/passwd"] {
        let f = fixture();
        let e = unpack(
            &f.root,
            &[Layer::new().file(name, 0o644, b"pwned").finish()],
        )
        .unwrap_err();
        assert!(
            matches!(e, UnpackError::Escape { what: "path", .. }),
            "{name}: {e}"
        );
        assert!(e.to_string().contains("escapes the rootfs"), "{e}");
        assert_outside_untouched(&f);
    }
}

#[test]
fn absolute_paths_are_contained() {
    let f = fixture();
    let l = Layer::new()
        .file("/abs/file", 0o644, b"in")
        .file("a/../b", 0o644, b"b")
        .finish();
    unpack(&f.root, &[l]).unwrap();
    assert_eq!(fs::read(f.root.join("abs/file")).unwrap(), b"in");
    assert_eq!(fs::read(f.root.join("b")).unwrap(), b"b");
    assert_outside_untouched(&f);
}

#[test]
fn symlink_escapes_are_contained() {
    let f = fixture();
    let out = f.outside.to_str().unwrap().to_string();
    // Symlinks to the host's directories, absolute and relative, then
    // writes through them, in the same layer and in a later one.
    let l1 = Layer::new()
        .symlink("abs", &out)
        .symlink("rel", "../../../outside")
        .symlink("deep", "x/../../../../../..")
        .file("abs/passwd", 0o644, b"pwned")
        .finish();
    let l2 = Layer::new()
        .file("rel/passwd", 0o644, b"pwned")
        .file("deep/outside/passwd", 0o644, b"pwned")
        .symlink("loop", "loop")
        .finish();
    unpack(&f.root, &[l1, l2]).unwrap();
    assert_outside_untouched(&f);
    // The writes landed inside, where the links point when the rootfs is /.
    assert_eq!(
        fs::read(f.root.join(out.trim_start_matches('/')).join("passwd")).unwrap(),
        b"pwned"
    );
    assert_eq!(fs::read(f.root.join("outside/passwd")).unwrap(), b"pwned");
    // The links themselves are kept as written.
    assert_eq!(fs::read_link(f.root.join("abs")).unwrap(), Path::new(&out));
    let e = unpack(&f.root, &[Layer::new().file("loop/x", 0o644, b"").finish()]).unwrap_err();
    assert!(matches!(e, UnpackError::Loop(_)), "{e}");
}

#[test]
fn symlink_replaced_by_directory_mid_stream() {
    let f = fixture();
    let out = f.outside.to_str().unwrap().to_string();
    let l = Layer::new()
        .symlink("d", &out)
        .dir("d", 0o755)
        .file("d/passwd", 0o644, b"pwned")
        .symlink("d2", &out)
        .finish();
    let l2 = Layer::new()
        .dir("d2", 0o755)
        .file("d2/passwd", 0o644, b"pwned")
        .finish();
    unpack(&f.root, &[l, l2]).unwrap();
    assert_outside_untouched(&f);
    assert!(fs::symlink_metadata(f.root.join("d")).unwrap().is_dir());
    assert_eq!(fs::read(f.root.join("d/passwd")).unwrap(), b"pwned");
    assert_eq!(fs::read(f.root.join("d2/passwd")).unwrap(), b"pwned");
}

#[test]
fn hardlink_escapes_are_refused() {
    let f = fixture();
    let out = f.outside.to_str().unwrap().to_string();
    let e = unpack(
        &f.root,
        &[Layer::new()
            .hardlink("h", "../../../outside/passwd")
            .finish()],
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            UnpackError::Escape {
                what: "link target",
                ..
            }
        ),
        "{e}"
    );
    // Absolute target: resolved in the rootfs, where it does not exist.
    let e = unpack(
        &f.root,
        &[Layer::new()
            .hardlink("h", &format!("{out}/passwd"))
            .finish()],
    )
    .unwrap_err();
    assert!(matches!(e, UnpackError::HardLink { .. }), "{e}");
    // Through a symlink pointing outside.
    let l = Layer::new()
        .symlink("s", &out)
        .hardlink("h", "s/passwd")
        .finish();
    let e = unpack(&f.root, &[l]).unwrap_err();
    assert!(
        e.to_string().contains("does not exist in the rootfs"),
        "{e}"
    );
    // To a directory.
    let e = unpack(
        &f.root,
        &[Layer::new().dir("dd", 0o755).hardlink("h", "dd").finish()],
    )
    .unwrap_err();
    assert!(e.to_string().contains("is a directory"), "{e}");
    assert_outside_untouched(&f);
    // A link to a symlink links the symlink itself, not what it points to.
    let l = Layer::new()
        .symlink("s2", &format!("{out}/passwd"))
        .hardlink("h2", "s2")
        .finish();
    unpack(&f.root, &[l]).unwrap();
    assert!(fs::symlink_metadata(f.root.join("h2"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::metadata(f.outside.join("passwd")).unwrap().nlink(), 1);
}

#[test]
fn absurd_and_truncated_layers() {
    let f = fixture();
    // Declares 2^50 bytes, carries 4.
    let e = unpack(
        &f.root,
        &[Layer::new()
            .raw("big", tar::EntryType::Regular, 0o644, "", 1 << 50, b"tiny")
            .finish()],
    )
    .unwrap_err();
    assert!(
        matches!(e, UnpackError::EntryTooLarge { size, .. } if size == 1 << 50),
        "{e}"
    );
    // Declares 1000 bytes, the stream ends after 512.
    let mut t = Layer::new()
        .raw(
            "trunc",
            tar::EntryType::Regular,
            0o644,
            "",
            1000,
            &[7u8; 1000],
        )
        .finish();
    t.truncate(1024);
    let e = unpack(&f.root, &[t]).unwrap_err();
    assert!(matches!(e, UnpackError::Archive(_)), "{e}");
    // A layer expanding past the limit (a compression bomb in spirit).
    let big = gzip(
        &Layer::new()
            .file("zeros", 0o644, &vec![0u8; 1 << 20])
            .finish(),
    );
    let opts = UnpackOptions {
        max_layer_size: 64 << 10,
        ..UnpackOptions::default()
    };
    let e = unpack_with(&f.root, &[big], opts).unwrap_err();
    assert!(matches!(e, UnpackError::LayerTooLarge { .. }), "{e}");
    // Garbage.
    let e = unpack(&f.root, &[gzip(b"not a tar at all")]).unwrap_err();
    assert!(matches!(e, UnpackError::Archive(_)), "{e}");
    assert_outside_untouched(&f);
}

#[test]
fn clean_paths() {
    assert_eq!(clean(Path::new("./a/b/../c")).unwrap(), Path::new("a/c"));
    assert_eq!(
        clean(Path::new("/etc/passwd")).unwrap(),
        Path::new("etc/passwd")
    );
    assert!(clean(Path::new("a/../..")).is_none());
    assert_eq!(clean(Path::new("./")).unwrap(), Path::new(""));
}

#[test]
fn opaque_dir_swapped_for_symlink_in_the_same_layer() {
    let f = fixture();
    let out = f.outside.to_str().unwrap().to_string();
    let l1 = Layer::new()
        .dir("a", 0o755)
        .file("a/x", 0o644, b"x")
        .finish();
    // The marker for a/ comes first; then a/ becomes a symlink to the host.
    let l2 = Layer::new().opaque("a").symlink("a", &out).finish();
    unpack(&f.root, &[l1, l2]).unwrap();
    assert_outside_untouched(&f);
    assert_eq!(fs::read_link(f.root.join("a")).unwrap(), Path::new(&out));
}

/// Random layers from a small alphabet of nasty names and link targets:
/// whatever happens (error or not), nothing outside the rootfs changes.
#[test]
fn random_hostile_layers_stay_inside() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let names = [
        "a",
        "b",
        "a/b",
        "a/b/c",
        "b/a",
        "c",
        "../x",
        "/a/b",
        "c/../a",
        "a/../../x",
        "b/c/d",
    ];
    for _ in 0..300 {
        let f = fixture();
        let out = f.outside.to_str().unwrap().to_string();
        let targets = [
            "/",
            "..",
            "../..",
            "a",
            "../../../outside",
            out.as_str(),
            "b/../..",
            "a/b",
            "/a",
        ];
        let mut layers = Vec::new();
        for _ in 0..1 + next(3) {
            let mut l = Layer::new();
            for _ in 0..1 + next(12) {
                let name = names[next(names.len())];
                match next(8) {
                    0 => l.dir(name, 0o755),
                    1 | 2 => l.file(name, 0o644, b"pwned"),
                    3 | 4 => l.symlink(name, targets[next(targets.len())]),
                    5 => l.hardlink(name, names[next(names.len())]),
                    6 => {
                        let (d, n) = name.rsplit_once('/').unwrap_or(("", name));
                        l.whiteout(d, n)
                    }
                    _ => l.opaque(name),
                };
            }
            layers.push(l.finish());
        }
        let _ = unpack(&f.root, &layers);
        assert_outside_untouched(&f);
        let top: Vec<_> = fs::read_dir(f._dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(top.len(), 2, "{top:?}");
    }
}

#[test]
fn layer_without_end_of_archive_blocks() {
    let f = fixture();
    // Two entries, the last one's data not padded, no end blocks: as umoci
    // 0.4 writes them.
    let mut t = Layer::new()
        .file("a", 0o644, b"first")
        .file("b", 0o644, b"0123456789")
        .finish();
    t.truncate(512 + 512 + 512 + 10);
    unpack(&f.root, &[gzip(&t)]).unwrap();
    assert_eq!(fs::read(f.root.join("b")).unwrap(), b"0123456789");
    // Cut inside the data instead: an error, not a short file.
    let mut t = Layer::new()
        .file("a", 0o644, b"first")
        .file("b", 0o644, b"0123456789")
        .finish();
    t.truncate(512 + 512 + 512 + 5);
    let e = unpack(&f.root, &[gzip(&t)]).unwrap_err();
    assert!(matches!(e, UnpackError::Archive(_)), "{e}");
}

#[test]
fn deferred_dir_times_do_not_follow_a_swapped_parent() {
    let f = fixture();
    let out = f.outside.to_str().unwrap().to_string();
    fs::create_dir(f.outside.join("b")).unwrap();
    let before = fs::metadata(f.outside.join("b")).unwrap().mtime();
    let l1 = Layer::new()
        .mtime(1000)
        .dir("a", 0o755)
        .dir("a/b", 0o755)
        .finish();
    let l2 = Layer::new().symlink("a", &out).finish();
    unpack(&f.root, &[l1, l2]).unwrap();
    assert_eq!(fs::metadata(f.outside.join("b")).unwrap().mtime(), before);
    assert_ne!(before, 1000);
}

/// An xattr of `p` (not following a symlink), if set.
fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let c = cstr(p).unwrap();
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid NUL-terminated strings and a buffer of buf.len() bytes.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| buf[..r as usize].to_vec())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn oversized_extension_headers_are_refused_before_they_are_read() {
    use tar::EntryType as T;
    let f = fixture();
    for (kind, what) in [
        (T::GNULongName, "GNU long name"),
        (T::GNULongLink, "GNU long link"),
        (T::XHeader, "PAX extended header"),
    ] {
        // 8 MiB present (a few KB compressed), then a 1 TiB declaration
        // with nothing behind it: both stop at the header.
        let present = zstd(
            &Layer::new()
                .extension(kind, 8 << 20, &vec![b'a'; 8 << 20])
                .file("x", 0o644, b"x")
                .finish(),
        );
        assert!(present.len() < 64 << 10);
        let declared = Layer::new()
            .extension(kind, 1 << 40, b"")
            .file("x", 0o644, b"x")
            .finish();
        for l in [present, declared] {
            let mut u = Unpacker::new(&f.root, UnpackOptions::default());
            let e = u.apply(&l[..]).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(what) && msg.contains("limit"), "{msg}");
            assert!(matches!(e, UnpackError::HeaderTooLarge { .. }), "{e:?}");
        }
    }
    assert_outside_untouched(&f);
    // Long names within the limits still work (tar writes them as `L`).
    let mut b = tar::Builder::new(Vec::new());
    let long = format!("{}/file", "d".repeat(200));
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1);
    h.set_size(2);
    b.append_data(&mut h, &long, &b"ok"[..]).unwrap();
    unpack(&f.root, &[b.into_inner().unwrap()]).unwrap();
    assert_eq!(fs::read(f.root.join(&long)).unwrap(), b"ok");
}

#[test]
fn sparse_files_count_at_their_apparent_size() {
    let f = fixture();
    // Five 32 MiB sparse files in a layer of a few KB: 160 MiB to write.
    let mut l = Layer::new();
    for i in 0..5 {
        l.sparse(&format!("s{i}"), 32 << 20);
    }
    let l = gzip(&l.finish());
    assert!(l.len() < 16 << 10);
    let opts = UnpackOptions {
        max_entry_size: 64 << 20,
        max_layer_size: 64 << 20,
        ..UnpackOptions::default()
    };
    let e = unpack_with(&f.root, &[l], opts).unwrap_err();
    assert!(e.to_string().contains("expands to more than"), "{e}");
    // One of them is fine, and reads back at its full size.
    let one = Layer::new().sparse("s", 32 << 20).finish();
    let opts = UnpackOptions {
        max_entry_size: 64 << 20,
        max_layer_size: 64 << 20,
        ..UnpackOptions::default()
    };
    unpack_with(&f.root, &[one], opts).unwrap();
    assert_eq!(fs::metadata(f.root.join("s")).unwrap().len(), 32 << 20);
}

#[test]
fn entry_count_is_capped() {
    let opts = UnpackOptions {
        max_entries: 10,
        ..UnpackOptions::default()
    };
    let f = fixture();
    let mut l = Layer::new();
    for i in 0..11 {
        l.file(&format!("f{i}"), 0o644, b"");
    }
    let e = unpack_with(&f.root, &[l.finish()], opts.clone()).unwrap_err();
    assert!(
        matches!(e, UnpackError::TooManyEntries { limit: 10 }),
        "{e}"
    );
    // Directories made for an entry's path count too.
    let f = fixture();
    let deep = format!("{}f", "d/".repeat(20));
    let e = unpack_with(
        &f.root,
        &[Layer::new().file(&deep, 0o644, b"").finish()],
        opts.clone(),
    )
    .unwrap_err();
    assert!(matches!(e, UnpackError::TooManyEntries { .. }), "{e}");
    // Ten are fine.
    let f = fixture();
    let mut l = Layer::new();
    for i in 0..10 {
        l.file(&format!("f{i}"), 0o644, b"");
    }
    unpack_with(&f.root, &[l.finish()], opts).unwrap();
}

#[test]
fn dot_entry_leaves_the_rootfs_directory_alone() {
    let f = fixture();
    fs::set_permissions(&f.root, fs::Permissions::from_mode(0o755)).unwrap();
    set_times(&f.root, 1_234_567).unwrap();
    let before = fs::metadata(&f.root).unwrap();
    let l = Layer::new()
        .owner(1234, 1234)
        .mtime(42)
        .dir("./", 0o7777)
        .dir("/", 0o777)
        .file("x", 0o644, b"x")
        .finish();
    unpack(&f.root, &[l]).unwrap();
    let after = fs::metadata(&f.root).unwrap();
    assert_eq!(
        (after.mode(), after.uid(), after.gid()),
        (before.mode(), before.uid(), before.gid())
    );
    // Adding x moved the time on; the entry's time is not applied either.
    assert_ne!(after.mtime(), 42);
}

#[test]
fn only_harmless_device_nodes_are_created() {
    if !is_root() {
        eprintln!("skipped: creating device nodes needs root");
        return;
    }
    let f = fixture();
    let l = Layer::new()
        .dir("dev", 0o755)
        .chardev("dev/null", 0o666, 1, 3)
        .chardev("dev/urandom", 0o666, 1, 9)
        .chardev("dev/tty", 0o666, 5, 0)
        .chardev("dev/mem", 0o666, 1, 1)
        .chardev("dev/kmsg", 0o666, 1, 11)
        .chardev("etc/null-looking", 0o666, 1, 2)
        .blockdev("dev/sda", 0o666, 8, 0)
        .finish();
    let mut u = Unpacker::new(&f.root, UnpackOptions::default());
    let stats = u.apply(&l[..]).unwrap();
    u.finish().unwrap();
    for (p, dev) in [
        ("dev/null", (1, 3)),
        ("dev/urandom", (1, 9)),
        ("dev/tty", (5, 0)),
    ] {
        let m = fs::symlink_metadata(f.root.join(p)).unwrap();
        assert!(m.file_type().is_char_device(), "{p}");
        assert_eq!(m.rdev(), libc::makedev(dev.0, dev.1), "{p}");
    }
    for p in ["dev/mem", "dev/kmsg", "etc/null-looking", "dev/sda"] {
        assert!(fs::symlink_metadata(f.root.join(p)).is_err(), "{p} made");
    }
    assert_eq!(stats.skipped, 4);
}

#[test]
fn host_xattr_namespaces_are_dropped() {
    let f = fixture();
    // VFS_CAP_REVISION_2, effective; permitted CAP_NET_RAW.
    let cap: &[u8] = &[
        1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let l = Layer::new()
        .file_xattrs(
            "x",
            0o755,
            b"x",
            &[
                ("user.kept", b"1"),
                ("trusted.overlay.opaque", b"y"),
                ("trusted.other", b"z"),
                ("security.selinux", b"system_u:object_r:shadow_t:s0"),
                ("security.capability", cap),
            ],
        )
        .finish();
    unpack(&f.root, &[l]).unwrap();
    let x = f.root.join("x");
    assert_eq!(xattr(&x, "user.kept").as_deref(), Some(&b"1"[..]));
    for gone in [
        "trusted.overlay.opaque",
        "trusted.other",
        "security.selinux",
    ] {
        assert_eq!(xattr(&x, gone), None, "{gone} was set");
    }
    if is_root() {
        assert_eq!(xattr(&x, "security.capability").as_deref(), Some(cap));
    }
}
