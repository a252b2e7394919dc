use std::io::Write as _;

use super::*;

const META: &str = "architecture: x86_64\ncreation_date: 1700000000\nproperties:\n  os: debian\n  release: [bookworm, '12']\n  description: Debian 12\n";

/// A tar of `(path, contents)`; a path ending in `/` is a directory. Names
/// go into the header raw, so hostile ones (`../x`) can be written too.
fn tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut h = tar::Header::new_gnu();
        let name = path.as_bytes();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        if path.ends_with('/') {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
        } else {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
        }
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn xz(data: &[u8]) -> Vec<u8> {
    let mut e = xz2::write::XzEncoder::new(Vec::new(), 1);
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn good() -> Vec<u8> {
    tar(&[("metadata.yaml", META.as_bytes()), ("rootfs/", b""), ("rootfs/etc/", b""), ("rootfs/etc/hostname", b"x\n")])
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    images: SystemImages,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    let images = SystemImages::new(store.clone());
    Fixture { _dir: dir, store, images }
}

async fn upload(images: &SystemImages, data: Vec<u8>) -> Result<Upload, SystemImageError> {
    // Two chunks, as a body arrives.
    let half = data.len() / 2;
    let chunks = vec![Ok::<_, std::io::Error>(data[..half].to_vec()), Ok(data[half..].to_vec())];
    images.receive(futures::stream::iter(chunks)).await
}

async fn import(f: &Fixture, data: Vec<u8>) -> Result<SystemImage, SystemImageError> {
    let up = upload(&f.images, data).await?;
    f.images.import(&up, "test.tar.xz", [("user.note".to_string(), "hi".to_string())].into())
}

/// Nothing of a failed import is left in the store's work directory.
fn tmp_is_empty(f: &Fixture) -> bool {
    fs::read_dir(f.store.root().join("tmp")).map(|d| d.count() == 0).unwrap_or(true)
}

#[tokio::test]
async fn a_unified_xz_image_is_imported_listed_used_and_deleted() {
    let f = fixture();
    let data = xz(&good());
    let want = hex::encode(Sha256::digest(&data));
    let img = import(&f, data.clone()).await.unwrap();
    assert_eq!(img.fingerprint, want);
    assert_eq!((img.architecture.as_str(), img.created_at), ("x86_64", 1_700_000_000));
    assert_eq!(img.properties["os"], "debian");
    assert_eq!(img.properties["release"], "bookworm 12");
    assert_eq!(img.properties["user.note"], "hi");
    assert_eq!(fs::read_to_string(f.images.rootfs(&want).join("etc/hostname")).unwrap(), "x\n");
    assert_eq!(f.images.list(), vec![img.clone()]);
    assert_eq!(f.images.find(&want[..12]), Some(img.clone()));
    assert_eq!(f.images.find("abc"), None, "short prefixes are not fingerprints");
    assert!(tmp_is_empty(&f));

    let again = import(&f, data).await.unwrap_err();
    assert!(matches!(again, SystemImageError::Exists(_)), "{again}");
    assert_eq!(again.status(), 409);

    f.store.add_use(&SystemImages::use_key(&want).unwrap(), "inst-1").unwrap();
    assert!(matches!(f.images.delete(&want), Err(SystemImageError::InUse { .. })));
    f.store.remove_use(&SystemImages::use_key(&want).unwrap(), "inst-1").unwrap();
    f.images.delete(&want).unwrap();
    assert!(f.images.list().is_empty());
    assert!(matches!(f.images.delete(&want), Err(SystemImageError::NotFound(_))));
}

#[tokio::test]
async fn a_plain_tarball_is_taken_too() {
    let f = fixture();
    let plain = import(&f, good()).await.unwrap();
    assert_eq!(plain.size, good().len() as u64);
    assert!(tmp_is_empty(&f));
}

/// Whether an error is the expected one.
type Expect = fn(&SystemImageError) -> bool;

#[tokio::test]
async fn bad_tarballs_get_clear_errors_and_leave_nothing() {
    let f = fixture();
    let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
        ("text", b"hello, this is not a tarball at all".repeat(20), |e| matches!(e, SystemImageError::NotTarball(_))),
        ("bzip2", b"BZh91AY&SY".repeat(40), |e| matches!(e, SystemImageError::NotTarball(_))),
        ("truncated xz", xz(&good())[..40].to_vec(), |e| matches!(e, SystemImageError::Unpack(_))),
        ("no metadata", xz(&tar(&[("rootfs/", b""), ("rootfs/a", b"a")])), |e| {
            matches!(e, SystemImageError::NoMetadata)
        }),
        ("no rootfs", xz(&tar(&[("metadata.yaml", META.as_bytes())])), |e| matches!(e, SystemImageError::NoRootfs)),
        ("rootfs is a file", xz(&tar(&[("metadata.yaml", META.as_bytes()), ("rootfs", b"x")])), |e| {
            matches!(e, SystemImageError::NoRootfs)
        }),
        (
            "escaping path",
            xz(&tar(&[("metadata.yaml", META.as_bytes()), ("rootfs/", b""), ("../../evil", b"x")])),
            |e| matches!(e, SystemImageError::Unpack(_)),
        ),
        (
            "another architecture",
            xz(&tar(&[("metadata.yaml", b"architecture: aarch64\ncreation_date: 1\n"), ("rootfs/", b"")])),
            |e| matches!(e, SystemImageError::BadMetadata(m) if m.contains("aarch64")),
        ),
        ("no creation date", xz(&tar(&[("metadata.yaml", b"architecture: x86_64\n"), ("rootfs/", b"")])), |e| {
            matches!(e, SystemImageError::BadMetadata(_))
        }),
    ];
    for (what, data, ok) in cases {
        let e = import(&f, data).await.unwrap_err();
        assert!(ok(&e), "{what}: {e}");
        assert_eq!(e.status(), 400, "{what}: {e}");
        assert!(tmp_is_empty(&f), "{what} left work files");
        assert!(f.images.list().is_empty(), "{what} left an image");
    }
    assert!(!f.store.root().join("evil").exists() && !f.store.root().parent().unwrap().join("evil").exists());
    let e = upload(&f.images, Vec::new()).await.unwrap_err();
    assert!(matches!(e, SystemImageError::Empty));
    assert!(tmp_is_empty(&f));
}

#[tokio::test]
async fn sizes_are_capped() {
    let f = fixture();
    let small = f.images.clone().with_limits(1024, 64 << 10);
    let big = xz(&tar(&[("metadata.yaml", META.as_bytes()), ("rootfs/", b""), ("rootfs/big", &[7u8; 100_000])]));
    assert!(big.len() < 1024, "xz makes 100 kB of sevens small");
    let up = upload(&small, big).await.unwrap();
    let e = small.import(&up, "big.tar.xz", BTreeMap::new()).unwrap_err();
    assert!(matches!(e, SystemImageError::Unpack(_)), "{e}");
    assert!(format!("{:?}", e).contains("LayerTooLarge") || format!("{:?}", e).contains("EntryTooLarge"), "{e:?}");
    assert_eq!(e.status(), 400);
    drop(up);
    let e = upload(&small, vec![0u8; 4096]).await.unwrap_err();
    assert!(matches!(e, SystemImageError::TooLarge(1024)), "{e}");
    assert_eq!(e.status(), 400);
    assert!(tmp_is_empty(&f));
    assert!(f.images.list().is_empty());
}

#[test]
fn init_is_found_inside_the_rootfs() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    assert!(!has_init(root));
    fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
    fs::create_dir_all(root.join("usr/sbin")).unwrap();
    std::os::unix::fs::symlink("usr/sbin", root.join("sbin")).unwrap();
    // Absolute, as Debian's: resolved in the rootfs, not on the host.
    std::os::unix::fs::symlink("/usr/lib/systemd/systemd", root.join("usr/sbin/init")).unwrap();
    assert!(!has_init(root), "a dangling link");
    fs::write(root.join("usr/lib/systemd/systemd"), b"#!").unwrap();
    assert!(!has_init(root), "not executable");
    fs::set_permissions(root.join("usr/lib/systemd/systemd"), fs::Permissions::from_mode(0o755)).unwrap();
    assert!(has_init(root));
}

#[test]
fn metadata_fields() {
    let (arch, created, props) = parse_metadata(META).unwrap();
    assert_eq!((arch.as_str(), created), ("x86_64", 1_700_000_000));
    assert_eq!(props["description"], "Debian 12");
    assert_eq!(parse_metadata("architecture: amd64\ncreation_date: 5\n").unwrap().0, "x86_64");
    assert!(parse_metadata("architecture: x86_64\ncreation_date: -5\n").is_err());
    assert!(parse_metadata("architecture: x86_64\ncreation_date: 1\nproperties:\n  os: {a: b}\n").is_err());
    assert!(parse_metadata("[not, a, map]").is_err());
}
