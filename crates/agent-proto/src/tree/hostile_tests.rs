//! A hostile sender's message sequences against [`TreeReceiver`]: each test
//! is what a guest could send for `file pull -r`, and checks that nothing
//! outside the target was touched.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::*;

/// One message of a received tree: an entry, a chunk of the current
/// file, or the empty chunk that ends it.
enum Msg {
    E(FileEntry),
    D(Vec<u8>),
    End,
}

fn entry(path: &str, kind: EntryKind, mode: u32) -> FileEntry {
    FileEntry {
        path: path.into(),
        kind,
        mode,
        uid: None,
        gid: None,
    }
}

fn dir(path: &str, mode: u32) -> Msg {
    Msg::E(entry(path, EntryKind::Dir, mode))
}

fn file(path: &str, size: u64, mode: u32) -> Msg {
    Msg::E(entry(path, EntryKind::File { size }, mode))
}

fn link(path: &str, target: &Path) -> Msg {
    let target = target.to_str().unwrap().to_string();
    Msg::E(entry(path, EntryKind::Symlink { target }, 0o777))
}

/// Feeds `msgs` to a receiver for `root`, then finishes it. The error
/// comes with the index of the message that caused it (`msgs.len()`:
/// finishing).
fn run(root: &Path, opts: WriteOptions, msgs: Vec<Msg>) -> Result<(), (usize, TreeError)> {
    let n = msgs.len();
    let mut r = TreeReceiver::new(root, opts);
    for (i, m) in msgs.into_iter().enumerate() {
        let res = match m {
            Msg::E(e) => r.entry(e),
            Msg::D(b) => r.data(&b),
            Msg::End => r.data(&[]),
        };
        res.map_err(|e| (i, e))?;
    }
    r.finish().map_err(|e| (n, e))
}

fn opts() -> WriteOptions {
    WriteOptions {
        parents: true,
        ..Default::default()
    }
}

/// A scratch directory with `dst` (the target, not created) and an
/// `outside` directory next to it that must stay empty.
struct Scene {
    _t: tempfile::TempDir,
    dst: std::path::PathBuf,
    outside: std::path::PathBuf,
}

impl Scene {
    fn new() -> Self {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        fs::create_dir(&outside).unwrap();
        Scene {
            dst: t.path().join("dst"),
            outside,
            _t: t,
        }
    }

    fn outside_untouched(&self) {
        let names: Vec<_> = fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(names.is_empty(), "written outside the target: {names:?}");
    }
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

#[test]
fn a_root_symlink_cannot_carry_entries_out_of_the_target() {
    let s = Scene::new();
    let msgs = vec![
        link("", &s.outside),
        file("pwned", 1, 0o644),
        Msg::D(b"x".to_vec()),
        Msg::End,
    ];
    let r = run(&s.dst, opts(), msgs);
    assert!(matches!(r, Err((1, _))), "{r:?}");
    s.outside_untouched();
    // The root symlink itself is created as what it is.
    assert_eq!(fs::read_link(&s.dst).unwrap(), s.outside);
}

#[test]
fn the_root_comes_once() {
    let s = Scene::new();
    let msgs = vec![
        dir("", 0o755),
        file("keep", 1, 0o644),
        Msg::D(b"k".to_vec()),
        Msg::End,
        link("", &s.outside),
        file("pwned", 1, 0o644),
        Msg::D(b"x".to_vec()),
        Msg::End,
    ];
    let r = run(&s.dst, opts(), msgs);
    assert!(matches!(r, Err((4, _))), "{r:?}");
    s.outside_untouched();
    assert_eq!(fs::read(s.dst.join("keep")).unwrap(), b"k");
}

#[test]
fn a_root_symlink_does_not_remove_an_existing_directory() {
    let s = Scene::new();
    fs::create_dir(&s.dst).unwrap();
    fs::write(s.dst.join("mine.txt"), b"mine").unwrap();
    let r = run(&s.dst, opts(), vec![link("", &s.outside)]);
    assert!(matches!(r, Err((0, _))), "{r:?}");
    assert_eq!(fs::read(s.dst.join("mine.txt")).unwrap(), b"mine");
    // A root symlink over a file (or nothing) is fine.
    let f = s.outside.join("../plain");
    fs::write(&f, b"old").unwrap();
    run(&f, opts(), vec![link("", Path::new("elsewhere"))]).unwrap();
    assert_eq!(fs::read_link(&f).unwrap(), Path::new("elsewhere"));
}

#[test]
fn finish_never_changes_modes_through_a_symlink_that_replaced_a_directory() {
    let s = Scene::new();
    let secret = s.outside.join("../secret");
    fs::write(&secret, b"s").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let msgs = vec![dir("", 0o755), dir("d", 0o4777), link("d", &secret)];
    let r = run(&s.dst, opts(), msgs);
    assert_eq!(mode(&secret), 0o600, "chmod through the symlink");
    assert!(r.is_err(), "a symlink replaced a directory of the tree");
    // And a second directory entry for the same path stays a directory.
    let s = Scene::new();
    let msgs = vec![dir("", 0o755), dir("d", 0o700), dir("d", 0o750)];
    run(&s.dst, opts(), msgs).unwrap();
    assert_eq!(mode(&s.dst.join("d")), 0o750);
}

#[test]
fn setuid_setgid_and_sticky_bits_from_the_guest_are_cleared() {
    let s = Scene::new();
    let msgs = vec![
        dir("", 0o1777),
        dir("g", 0o2755),
        file("g/s", 1, 0o6755),
        Msg::D(b"x".to_vec()),
        Msg::End,
    ];
    run(&s.dst, opts(), msgs).unwrap();
    assert_eq!(mode(&s.dst), 0o777);
    assert_eq!(mode(&s.dst.join("g")), 0o755);
    assert_eq!(mode(&s.dst.join("g/s")), 0o755);
    // A trusted sender (the agent writing a host push) keeps them.
    let s = Scene::new();
    let keep = WriteOptions {
        special_bits: true,
        ..opts()
    };
    let msgs = vec![file("", 0, 0o4755), Msg::End];
    run(&s.dst, keep, msgs).unwrap();
    assert_eq!(mode(&s.dst), 0o4755);
}

#[test]
fn a_file_size_is_enforced_as_bytes_arrive() {
    let s = Scene::new();
    let msgs = vec![
        file("", 4, 0o644),
        Msg::D(vec![1; 3]),
        Msg::D(vec![2; 1 << 20]),
        Msg::End,
    ];
    let r = run(&s.dst, opts(), msgs);
    assert!(matches!(r, Err((2, _))), "{r:?}");
    assert_eq!(fs::metadata(&s.dst).unwrap().len(), 3);
    // One byte over in a single chunk: nothing of it is written.
    let s = Scene::new();
    let r = run(&s.dst, opts(), vec![file("", 4, 0o644), Msg::D(vec![1; 5])]);
    assert!(matches!(r, Err((1, _))), "{r:?}");
    assert_eq!(fs::metadata(&s.dst).unwrap().len(), 0);
    // Short is refused at its end.
    let s = Scene::new();
    let r = run(
        &s.dst,
        opts(),
        vec![file("", 4, 0o644), Msg::D(vec![1; 3]), Msg::End],
    );
    assert!(matches!(r, Err((2, _))), "{r:?}");
}

#[test]
fn entries_and_total_bytes_are_capped() {
    let s = Scene::new();
    let capped = WriteOptions {
        max_entries: 10,
        ..opts()
    };
    let mut msgs = vec![dir("", 0o755)];
    msgs.extend((0..10).map(|i| dir(&format!("d{i}"), 0o755)));
    let r = run(&s.dst, capped, msgs);
    assert!(matches!(r, Err((10, _))), "{r:?}");
    assert!(s.dst.join("d8").is_dir() && !s.dst.join("d9").exists());

    let s = Scene::new();
    let capped = WriteOptions {
        max_bytes: 10,
        ..opts()
    };
    let msgs = vec![
        dir("", 0o755),
        file("a", 8, 0o644),
        Msg::D(vec![0; 8]),
        Msg::End,
        file("b", 8, 0o644),
        Msg::D(vec![0; 8]),
        Msg::End,
    ];
    let r = run(&s.dst, capped, msgs);
    assert!(matches!(r, Err((4, _))), "{r:?}");
    assert!(!s.dst.join("b").exists());
}

#[test]
fn entries_out_of_place_are_refused() {
    let cases: Vec<(&str, Vec<Msg>, usize)> = vec![
        (
            "data outside a file",
            vec![dir("", 0o755), Msg::D(vec![1])],
            1,
        ),
        ("entry before the root", vec![dir("a", 0o755)], 0),
        (
            "entry inside a file",
            vec![file("", 1, 0o644), dir("a", 0o755)],
            1,
        ),
        (
            "directory never announced",
            vec![dir("", 0o755), file("a/b", 0, 0o644)],
            1,
        ),
        (
            "entry below a file",
            vec![
                dir("", 0o755),
                file("f", 0, 0o644),
                Msg::End,
                dir("f/x", 0o755),
            ],
            3,
        ),
        ("ends inside a file", vec![file("", 1, 0o644)], 1),
    ];
    for (what, msgs, at) in cases {
        let s = Scene::new();
        let r = run(&s.dst, opts(), msgs);
        assert!(matches!(r, Err((i, _)) if i == at), "{what}: {r:?}");
        s.outside_untouched();
    }
}

#[test]
fn an_entry_never_goes_through_a_symlink_of_the_tree() {
    let s = Scene::new();
    let msgs = vec![
        dir("", 0o755),
        link("evil", &s.outside),
        file("evil/pwned", 1, 0o644),
        Msg::D(b"x".to_vec()),
        Msg::End,
    ];
    let r = run(&s.dst, opts(), msgs);
    assert!(matches!(r, Err((2, _))), "{r:?}");
    s.outside_untouched();
}

#[test]
fn a_directory_swapped_for_a_symlink_on_disk_is_never_followed() {
    // Not something a guest can do through the stream, but the walk must
    // hold even then: entries below it and finish() refuse it.
    let s = Scene::new();
    let secret = s.outside.join("../secret");
    fs::write(&secret, b"s").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let mut r = TreeReceiver::new(&s.dst, opts());
    r.entry(entry("", EntryKind::Dir, 0o755)).unwrap();
    r.entry(entry("d", EntryKind::Dir, 0o777)).unwrap();
    fs::remove_dir(s.dst.join("d")).unwrap();
    std::os::unix::fs::symlink(&s.outside, s.dst.join("d")).unwrap();
    let e = r
        .entry(entry("d/x", EntryKind::File { size: 0 }, 0o644))
        .unwrap_err();
    assert!(matches!(e, TreeError::ThroughSymlink(_)), "{e}");
    s.outside_untouched();
    let mut r = TreeReceiver::new(&s.outside.join("../dst2"), opts());
    r.entry(entry("", EntryKind::Dir, 0o755)).unwrap();
    r.entry(entry("d", EntryKind::Dir, 0o777)).unwrap();
    let d = s.outside.join("../dst2/d");
    fs::remove_dir(&d).unwrap();
    std::os::unix::fs::symlink(&secret, &d).unwrap();
    // The fd kept for "d" is the directory created, not the link.
    r.finish().unwrap();
    assert_eq!(mode(&secret), 0o600);
}

#[test]
fn many_directories_get_their_modes_without_running_out_of_fds() {
    let s = Scene::new();
    let mut msgs = vec![dir("", 0o755)];
    for i in 0..300 {
        msgs.push(dir(&format!("d{i:03}"), 0o750));
        msgs.push(dir(&format!("d{i:03}/e"), 0o500));
    }
    run(&s.dst, opts(), msgs).unwrap();
    assert_eq!(mode(&s.dst.join("d000")), 0o750);
    assert_eq!(mode(&s.dst.join("d299")), 0o750);
    assert_eq!(mode(&s.dst.join("d299/e")), 0o500);
    for i in 0..300 {
        let e = s.dst.join(format!("d{i:03}/e"));
        fs::set_permissions(e, fs::Permissions::from_mode(0o700)).unwrap();
    }
    // A directory finish() opens again (beyond the fds it keeps) that
    // became a symlink is refused, not followed.
    let s = Scene::new();
    let secret = s.outside.join("../secret");
    fs::write(&secret, b"s").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let mut r = TreeReceiver::new(&s.dst, opts());
    r.entry(entry("", EntryKind::Dir, 0o755)).unwrap();
    for i in 0..300 {
        r.entry(entry(&format!("d{i:03}"), EntryKind::Dir, 0o777))
            .unwrap();
    }
    let last = s.dst.join("d299");
    fs::remove_dir(&last).unwrap();
    std::os::unix::fs::symlink(&secret, &last).unwrap();
    let e = r.finish().unwrap_err();
    assert!(
        matches!(e, TreeError::ThroughSymlink(_) | TreeError::Changed(_)),
        "{e}"
    );
    assert_eq!(mode(&secret), 0o600);
}

#[test]
fn too_deep_and_unsafe_paths_are_refused() {
    let s = Scene::new();
    let deep = vec!["a"; MAX_DEPTH + 1].join("/");
    for bad in ["../x", "/abs", "a//b", "./a", "a/.", "nul\0"] {
        let r = run(&s.dst, opts(), vec![dir("", 0o755), dir(bad, 0o755)]);
        assert!(
            matches!(r, Err((1, TreeError::UnsafePath(_)))),
            "{bad:?}: {r:?}"
        );
    }
    let r = run(&s.dst, opts(), vec![dir("", 0o755), dir(&deep, 0o755)]);
    assert!(matches!(r, Err((1, TreeError::TooDeep(_)))), "{r:?}");
}
