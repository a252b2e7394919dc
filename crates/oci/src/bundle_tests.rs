//! Bundle tests: directory modes, the image's passwd and group.

use super::*;

use crate::unpack::tests::layer::Layer;

/// A store holding one image made of `layers` whose config says `user`.
pub(crate) fn image(dir: &Path, layers: &[Vec<u8>], user: &str) -> (Store, ImageRecord) {
    let store = Store::open(dir.join("store")).unwrap();
    let put = |media_type: &str, data: &[u8]| {
        let d = crate::manifest::Descriptor {
            media_type: media_type.into(),
            digest: Digest::sha256_of(data),
            size: data.len() as u64,
            platform: None,
            annotations: Default::default(),
        };
        store.put_blob(&d.digest, Some(d.size), data).unwrap();
        d
    };
    let cfg = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"User":"{user}","Cmd":["sh"]}}}}"#
    );
    let rec = ImageRecord {
        name: "localhost/test:1".into(),
        manifest: Digest::sha256_of(b"manifest"),
        index: None,
        config: put(manifest::OCI_CONFIG, cfg.as_bytes()),
        layers: layers
            .iter()
            .map(|l| put(manifest::OCI_LAYER_TAR, l))
            .collect(),
        platform: manifest::Platform::host(),
        stored_at: 1,
    };
    (store, rec)
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn bundle_directory_is_private_and_rootfs_is_the_guests() {
    let dir = tempfile::tempdir().unwrap();
    let l = Layer::new()
        .dir("./", 0o777)
        .file("bin/su", 0o4755, b"#!")
        .finish();
    let (store, rec) = image(dir.path(), &[l], "");
    let dest = dir.path().join("bundle");
    fs::create_dir(&dest).unwrap();
    fs::set_permissions(&dest, fs::Permissions::from_mode(0o755)).unwrap();
    let opts = UnpackOptions::default();
    write_bundle(&store, &rec, &dest, &Overrides::default(), &opts, None).unwrap();
    assert_eq!(mode(&dest), 0o700, "the bundle holds setuid files");
    assert_eq!(mode(&dest.join("rootfs")), 0o755, "the guest's /");
    assert_eq!(mode(&dest.join("rootfs/bin/su")), 0o4755);
    let cached = cached_rootfs(&store, &rec, &opts).unwrap();
    assert_eq!(mode(&cached), 0o755);
}

#[test]
fn a_special_or_huge_passwd_is_a_clear_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "fifo",
            Layer::new()
                .dir("etc", 0o755)
                .fifo("etc/passwd", 0o644)
                .finish(),
        ),
        (
            "huge",
            Layer::new()
                .dir("etc", 0o755)
                .sparse("etc/group", 1 << 30)
                .finish(),
        ),
    ];
    for (i, (what, l)) in cases.into_iter().enumerate() {
        let (store, rec) = image(&dir.path().join(what), &[l], "www");
        let dest = dir.path().join(format!("bundle{i}"));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let opts = UnpackOptions::default();
            let r = write_bundle(&store, &rec, &dest, &Overrides::default(), &opts, None);
            let _ = tx.send(r.map(|_| ()).map_err(|e| {
                let mut s = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(x) = src {
                    s += &format!(": {x}");
                    src = x.source();
                }
                s
            }));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{what}: bundle creation hung"));
        let e = r.unwrap_err();
        assert!(
            e.contains("etc/") && (e.contains("not a regular file") || e.contains("limit")),
            "{what}: {e}"
        );
    }
}
