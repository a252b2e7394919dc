//! A full disk: a clear error naming the image and the cause, and nothing
//! half-made left behind (needs root to mount a small tmpfs; skipped
//! otherwise, saying so).

mod common;
mod images;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;
use skiff_oci::{bundle, import, Platform, Store};

/// A size-limited tmpfs, unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> Option<Self> {
        fs::create_dir_all(dir).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(dir.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn entries(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn full_disk_leaves_nothing_half_made() -> Result<()> {
    let work = tempfile::tempdir()?;
    let lay = images::build(&work.path().join("layout"))?;
    let Some(disk) = SmallDisk::mount(&work.path().join("small"), "1m") else {
        eprintln!("full_disk_leaves_nothing_half_made: skipped (cannot mount a tmpfs; not root?)");
        return Ok(());
    };
    let source = format!("{}:{}", lay.dir.display(), images::APP);

    // The store itself on the full disk: the import fails, no image.
    let small_store = Store::open(disk.0.join("store"))?;
    let e = import::import(&small_store, &source, Some("x/app:1"), &Platform::host()).unwrap_err();
    let msg = format!("{:#}", anyhow::Error::from(e));
    assert!(
        msg.contains(&source) && msg.contains("No space left on device"),
        "{msg}"
    );
    assert!(small_store.list()?.is_empty());
    assert!(entries(&disk.0.join("store/tmp")).is_empty());
    assert!(entries(&disk.0.join("store/images")).is_empty());

    // The store elsewhere, the bundle on the full disk: no rootfs, no
    // work dir, no config.json.
    let store = Store::open(work.path().join("store"))?;
    let rec = import::import(&store, &source, Some("x/app:1"), &Platform::host())?;
    let dest = disk.0.join("bundle");
    let e = bundle::write_bundle(
        &store,
        &rec,
        &dest,
        &Default::default(),
        &Default::default(),
        None,
    )
    .unwrap_err();
    let msg = format!("{:#}", anyhow::Error::from(e));
    assert!(
        msg.contains("x/app:1") && msg.contains("No space left on device"),
        "{msg}"
    );
    assert!(
        entries(&dest).is_empty(),
        "left behind: {:?}",
        entries(&dest)
    );
    Ok(())
}
