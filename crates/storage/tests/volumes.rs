//! Volumes end to end, as root on the host: a fake image with every kind of file, each backend that works here,
//! mounts, changes through the mount, snapshots, restores, renames, deletes, crash leftovers and bad names.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use skiff_storage::{Backend, Pool, StorageError};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: mounting overlayfs and bind mounts needs root");
            return;
        }
    };
}

fn cpath(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let name = CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated strings and a buffer of the given length, all alive for the call.
    let ret = unsafe { libc::lsetxattr(cpath(path).as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(ret, 0, "setxattr {}: {}", path.display(), std::io::Error::last_os_error());
}

fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let name = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid NUL-terminated strings and a writable buffer of the given length, all alive for the call.
    let len = unsafe { libc::lgetxattr(cpath(path).as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    let len = usize::try_from(len).ok()?;
    buf.truncate(len);
    Some(buf)
}

/// A fake unpacked image: plain files, modes 0755/0600/04755, a symlink, a hard-link pair, a fifo, a file and a
/// directory owned by 1000:1001, an xattr `user.test`, and a directory to be replaced (opaque dir in the overlay).
fn make_image(root: &Path) {
    for dir in ["bin", "etc", "data", "run", "home/user", "olddir/sub"] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    let file = |path: &str, body: &str, mode: u32| {
        fs::write(root.join(path), body).unwrap();
        fs::set_permissions(root.join(path), fs::Permissions::from_mode(mode)).unwrap();
    };
    file("bin/tool", "#!/bin/sh\necho tool\n", 0o755);
    file("bin/su", "setuid binary", 0o4755);
    file("etc/secret", "top secret", 0o600);
    file("etc/hostname", "image\n", 0o644);
    file("data/a", "linked", 0o644);
    file("olddir/x", "old x", 0o644);
    file("olddir/sub/y", "old y", 0o644);
    file("home/user/notes", "mine", 0o640);
    fs::hard_link(root.join("data/a"), root.join("data/b")).unwrap();
    symlink("secret", root.join("etc/link")).unwrap();
    symlink("/nonexistent/abs", root.join("etc/dangling")).unwrap();
    // SAFETY: a valid NUL-terminated path alive for the call.
    assert_eq!(unsafe { libc::mkfifo(cpath(&root.join("run/fifo")).as_ptr(), 0o644) }, 0);
    std::os::unix::fs::lchown(root.join("home/user"), Some(1000), Some(1001)).unwrap();
    std::os::unix::fs::lchown(root.join("home/user/notes"), Some(1000), Some(1001)).unwrap();
    set_xattr(&root.join("etc/secret"), "user.test", b"hello");
    fs::set_permissions(root.join("bin/su"), fs::Permissions::from_mode(0o4755)).unwrap();
    // after any chown
}

/// Everything about a tree that a volume must keep, one line per entry (the root itself left out).
fn listing(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            let kind = meta.file_type();
            let mut line = format!("mode={:o} uid={} gid={}", meta.mode(), meta.uid(), meta.gid());
            if kind.is_file() {
                line += &format!(" nlink={} body={:?}", meta.nlink(), fs::read_to_string(&path).unwrap());
            } else if kind.is_symlink() {
                line += &format!(" -> {}", fs::read_link(&path).unwrap().display());
            } else if kind.is_dir() {
                stack.push(path.clone());
            }
            if let Some(value) = get_xattr(&path, "user.test") {
                line += &format!(" user.test={}", String::from_utf8_lossy(&value));
            }
            out.insert(path.strip_prefix(root).unwrap().display().to_string(), line);
        }
    }
    out
}

fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let table = fs::read_to_string("/proc/self/mountinfo").unwrap();
    table.lines().filter_map(|l| l.split(' ').nth(4)).map(PathBuf::from).filter(|m| m.starts_with(root)).collect()
}

/// A scratch directory that lazily unmounts whatever a failed test left mounted in it before it is removed.
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn new() -> Scratch {
        Scratch(tempfile::tempdir().unwrap())
    }

    fn path(&self) -> PathBuf {
        fs::canonicalize(self.0.path()).unwrap()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for mount in mounts_under(&self.path()).iter().rev() {
            let _ = std::process::Command::new("umount").arg("-l").arg(mount).status();
        }
    }
}

/// The whole life of a volume with `backend`.
fn lifecycle(backend: Backend) {
    let scratch = Scratch::new();
    let image = scratch.path().join("image");
    make_image(&image);
    let pristine = listing(&image);
    let pool = Pool::with_backend(&scratch.path().join("pool"), backend).unwrap();
    assert_eq!(pool.backend(), backend);

    let volume = pool.create("web1", &image).unwrap();
    assert_eq!(volume.backend(), backend);
    assert!(matches!(pool.create("web1", &image), Err(StorageError::VolumeExists(_))));
    assert!(!volume.is_mounted());
    let root = volume.mount().unwrap();
    assert_eq!(volume.mount().unwrap(), root, "mount is idempotent");
    assert_eq!(mounts_under(&root), vec![root.clone()], "mounted exactly once");
    assert!(volume.is_mounted());
    assert_eq!(listing(&root), pristine, "the volume shows the image as it is");

    // Change things through the mount: modify, add, delete a hard link, replace a directory, chmod, chown.
    fs::write(root.join("etc/hostname"), "web1\n").unwrap();
    fs::create_dir(root.join("new")).unwrap();
    fs::write(root.join("new/file"), "fresh").unwrap();
    fs::remove_file(root.join("data/a")).unwrap();
    fs::remove_dir_all(root.join("olddir")).unwrap();
    fs::create_dir(root.join("olddir")).unwrap();
    fs::write(root.join("olddir/z"), "new z").unwrap();
    fs::set_permissions(root.join("etc/secret"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::lchown(root.join("bin/tool"), Some(7), Some(8)).unwrap();
    assert_eq!(listing(&image), pristine, "changes through the mount never reach the image");
    let changed = listing(&root);
    assert!(!changed.contains_key("data/a") && !changed.contains_key("olddir/x") && changed.contains_key("olddir/z"));

    volume.snapshot_create("snap1").unwrap();
    assert!(matches!(volume.snapshot_create("snap1"), Err(StorageError::SnapshotExists { .. })));
    assert_eq!(listing(&root), changed, "a snapshot does not change the volume");

    // Change again, then go back.
    fs::write(root.join("etc/hostname"), "later\n").unwrap();
    fs::remove_dir_all(root.join("new")).unwrap();
    fs::write(root.join("data/b"), "rewritten").unwrap();
    fs::write(root.join("later"), "later").unwrap();
    assert_ne!(listing(&root), changed);
    assert!(matches!(volume.snapshot_restore("snap1"), Err(StorageError::Mounted(_))));
    volume.unmount().unwrap();
    assert!(!volume.is_mounted());
    volume.unmount().unwrap(); // idempotent
    assert!(matches!(volume.snapshot_restore("nope"), Err(StorageError::SnapshotNotFound { .. })));
    volume.snapshot_restore("snap1").unwrap();
    let root = volume.mount().unwrap();
    assert_eq!(listing(&root), changed, "the snapshot's view is back");
    assert_eq!(listing(&image), pristine, "the image is untouched");

    // Snapshot bookkeeping.
    let snaps = volume.snapshots().unwrap();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0].name, "snap1");
    let age = SystemTime::now().duration_since(snaps[0].created).unwrap();
    assert!(age < Duration::from_secs(120), "created {age:?} ago");
    volume.snapshot_create("snap2").unwrap();
    volume.snapshot_rename("snap1", "before").unwrap();
    assert!(matches!(volume.snapshot_rename("before", "snap2"), Err(StorageError::SnapshotExists { .. })));
    assert!(matches!(volume.snapshot_rename("gone", "x"), Err(StorageError::SnapshotNotFound { .. })));
    let names: Vec<_> = volume.snapshots().unwrap().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["before", "snap2"]);
    // A new volume from a snapshot of this one (`skiff copy NAME/SNAP NEW`), while this one is mounted.
    let copy = pool.create_from_snapshot("copy1", &volume, "before").unwrap();
    assert!(matches!(pool.create_from_snapshot("copy2", &volume, "nope"), Err(StorageError::SnapshotNotFound { .. })));
    assert!(matches!(pool.create_from_snapshot("copy1", &volume, "before"), Err(StorageError::VolumeExists(_))));
    assert!(matches!(pool.open_volume("copy2"), Err(StorageError::VolumeNotFound(_))), "nothing half-made");
    assert_eq!(listing(&copy.mount().unwrap()), changed, "the copy shows the snapshot");
    copy.delete().unwrap();
    volume.snapshot_delete("snap2").unwrap();
    assert!(matches!(volume.snapshot_delete("snap2"), Err(StorageError::SnapshotNotFound { .. })));
    assert!(volume.usage_bytes().unwrap() > 0);

    // Rename: unmounted only.
    assert_eq!(pool.volumes().unwrap(), ["web1"]);
    assert!(matches!(pool.rename("web1", "web2"), Err(StorageError::Mounted(_))));
    volume.unmount().unwrap();
    pool.create("taken", &image).unwrap();
    assert!(matches!(pool.rename("web1", "taken"), Err(StorageError::VolumeExists(_))));
    pool.rename("web1", "web2").unwrap();
    assert_eq!(pool.volumes().unwrap(), ["taken", "web2"]);
    assert!(matches!(pool.open_volume("web1"), Err(StorageError::VolumeNotFound(_))));

    // The renamed volume still works, snapshot included; delete leaves nothing behind.
    let volume = pool.open_volume("web2").unwrap();
    let root = volume.mount().unwrap();
    assert_eq!(listing(&root), changed);
    volume.snapshot_restore("before").expect_err("restore while mounted");
    volume.delete().unwrap();
    pool.open_volume("taken").unwrap().delete().unwrap();
    assert_eq!(mounts_under(pool.root()), Vec::<PathBuf>::new(), "nothing left mounted");
    assert!(pool.volumes().unwrap().is_empty());
    assert_eq!(fs::read_dir(pool.root().join("volumes")).unwrap().count(), 0, "no volume files left");
    assert_eq!(fs::read_dir(pool.root().join("tmp")).unwrap().count(), 0, "no temporary files left");
    assert_eq!(listing(&image), pristine, "the image is untouched at the end");
}

#[test]
fn overlay_volume_lifecycle() {
    require_root!();
    lifecycle(Backend::Overlay);
}

#[test]
fn copy_volume_lifecycle() {
    require_root!();
    lifecycle(Backend::Copy);
}

#[test]
fn reflink_volume_lifecycle_or_probe_falls_back() {
    require_root!();
    let scratch = Scratch::new();
    match Pool::with_backend(&scratch.path().join("probe"), Backend::Reflink) {
        Ok(_) => lifecycle(Backend::Reflink),
        Err(StorageError::Unsupported { reason, .. }) => {
            eprintln!("no reflink on this filesystem ({reason}): checking the probe picks something else");
            let pool = Pool::open(&scratch.path().join("pool")).unwrap();
            assert_ne!(pool.backend(), Backend::Reflink);
            assert_eq!(fs::read_dir(pool.root().join("tmp")).unwrap().count(), 0, "probes clean up after themselves");
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[test]
fn busy_mount_is_detached_lazily_and_reported() {
    require_root!();
    let scratch = Scratch::new();
    let image = scratch.path().join("image");
    make_image(&image);
    let pool = Pool::open(&scratch.path().join("pool")).unwrap();
    let volume = pool.create("busy", &image).unwrap();
    let root = volume.mount().unwrap();
    let held = fs::File::open(root.join("etc/hostname")).unwrap();
    let err = volume.unmount().expect_err("busy");
    assert!(matches!(err, StorageError::Busy { .. }), "{err}");
    assert!(!volume.is_mounted(), "detached");
    drop(held);
    let root = volume.mount().unwrap();
    assert_eq!(fs::read_to_string(root.join("etc/hostname")).unwrap(), "image\n");
    volume.delete().unwrap();
    assert!(mounts_under(pool.root()).is_empty());
}

#[test]
fn cleanup_partial_removes_leftovers_but_not_work_in_progress() {
    require_root!();
    let scratch = Scratch::new();
    let pool = Pool::with_backend(&scratch.path().join("pool"), Backend::Copy).unwrap();
    let tmp = pool.root().join("tmp");
    // What a daemon killed in the middle of a create and of a restore leaves.
    fs::create_dir_all(tmp.join("create-web1-0123/state/etc")).unwrap();
    fs::write(tmp.join("create-web1-0123/state/etc/hostname"), "half").unwrap();
    fs::create_dir_all(tmp.join("restore-web1-snap-4567/state")).unwrap();
    // An operation still running holds its lock.
    fs::create_dir(tmp.join("snapshot-web2-s-89ab")).unwrap();
    let running = fs::File::open(tmp.join("snapshot-web2-s-89ab")).unwrap();
    // SAFETY: an open fd alive for the call.
    assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&running), libc::LOCK_EX) }, 0);

    assert_eq!(pool.cleanup_partial().unwrap(), ["create-web1-0123", "restore-web1-snap-4567"]);
    assert!(pool.volumes().unwrap().is_empty(), "a half-made volume never shows up");
    assert!(tmp.join("snapshot-web2-s-89ab").exists());
    drop(running);
    assert_eq!(pool.cleanup_partial().unwrap(), ["snapshot-web2-s-89ab"]);
    assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0);
}

#[test]
fn bad_names_are_rejected() {
    let scratch = Scratch::new();
    let image = scratch.path().join("image");
    fs::create_dir(&image).unwrap();
    let pool = Pool::with_backend(&scratch.path().join("pool"), Backend::Copy).unwrap();
    let long = "a".repeat(64);
    for name in ["", "-a", "..", ".", "../escape", "a/b", "/abs", "a_b", "a.b", "sp ace", long.as_str()] {
        let err = pool.create(name, &image).expect_err(name);
        assert!(matches!(err, StorageError::InvalidName { kind: "volume", .. }), "{name:?}: {err}");
        assert!(matches!(pool.open_volume(name), Err(StorageError::InvalidName { .. })));
    }
    assert!(!scratch.path().join("escape").exists());
    let volume = pool.create("ok-1", &image).unwrap();
    for name in ["", "..", "-x", "x/y"] {
        let err = volume.snapshot_create(name).expect_err(name);
        assert!(matches!(err, StorageError::InvalidName { kind: "snapshot", .. }), "{name:?}: {err}");
    }
    assert!(matches!(pool.rename("ok-1", "../up"), Err(StorageError::InvalidName { .. })));
    assert!(matches!(pool.create("img", &scratch.path().join("missing")), Err(StorageError::BadImage { .. })));
    assert_eq!(pool.volumes().unwrap(), ["ok-1"]);
}

#[test]
fn overlay_paths_the_kernel_would_misparse_or_truncate_are_refused() {
    require_root!();
    let scratch = Scratch::new();
    let pool = Pool::with_backend(&scratch.path().join("pool"), Backend::Overlay).unwrap();
    let comma = scratch.path().join("im,age");
    fs::create_dir(&comma).unwrap();
    let err = pool.create("c", &comma).expect_err("comma");
    assert!(matches!(err, StorageError::UnsafeMountPath { ch: ',', .. }), "{err}");
    // An image path near PATH_MAX: with upperdir and workdir the options exceed one page.
    let mut deep = scratch.path().join("deep");
    while deep.as_os_str().len() < 3800 {
        deep.push("d".repeat(200));
    }
    deep.push("e".repeat(4050 - deep.as_os_str().len() - 1));
    fs::create_dir_all(&deep).unwrap();
    let err = pool.create("long", &deep).expect_err("too long");
    assert!(matches!(err, StorageError::OptionsTooLong { .. }), "{err}");
    assert!(err.to_string().contains("mount(2) takes at most"), "{err}");
    assert!(pool.volumes().unwrap().is_empty());
}

/// Run by `killed_create_leaves_nothing_or_a_whole_volume` in a child process, which it kills mid-way.
#[test]
#[ignore = "helper run in a child process"]
fn crash_child() {
    let Ok(spec) = std::env::var("SKIFF_STORAGE_CRASH") else { return };
    let (pool, image) = spec.split_once('|').unwrap();
    let pool = Pool::with_backend(Path::new(pool), Backend::Copy).unwrap();
    pool.create("victim", Path::new(image)).unwrap();
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn killed_create_leaves_nothing_or_a_whole_volume() {
    require_root!();
    let scratch = Scratch::new();
    let image = scratch.path().join("image");
    make_image(&image);
    for i in 0..300 {
        fs::write(image.join(format!("data/f{i}")), vec![b'x'; 64 * 1024]).unwrap();
    }
    let pristine = listing(&image);
    let pool_dir = scratch.path().join("pool");
    let pool = Pool::with_backend(&pool_dir, Backend::Copy).unwrap();
    let mut outcomes = Vec::new();
    for delay_ms in [0, 5, 20, 50, 100, 400] {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "crash_child", "--nocapture"])
            .env("SKIFF_STORAGE_CRASH", format!("{}|{}", pool_dir.display(), image.display()))
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        // The killed child's `cp` (or its fork before exec, which holds the temporary directory's lock) dies
        // through PR_SET_PDEATHSIG an instant later; until then `cleanup_partial` rightly skips the locked
        // directory, so try again for a while.
        let mut removed = pool.cleanup_partial().unwrap();
        for _ in 0..40 {
            if fs::read_dir(pool.root().join("tmp")).unwrap().count() == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
            removed.extend(pool.cleanup_partial().unwrap());
        }
        let volumes = pool.volumes().unwrap();
        outcomes.push(format!("{delay_ms} ms: removed {removed:?}, volumes {volumes:?}"));
        assert_eq!(fs::read_dir(pool.root().join("tmp")).unwrap().count(), 0, "{outcomes:?}");
        if volumes == ["victim"] {
            let volume = pool.open_volume("victim").unwrap();
            assert_eq!(listing(&volume.mount().unwrap()), pristine, "a volume that exists is whole");
            volume.delete().unwrap();
        } else {
            assert!(volumes.is_empty(), "{outcomes:?}");
        }
    }
    eprintln!("{outcomes:#?}");
}
