//! Disk images for full OS VMs (Incus's `virtual-machine` images): a raw or
//! qcow2 file, imported whole and kept as the read-only base every
//! instance's qcow2 overlay sits on.
//!
//! ```text
//! STORE/system/<fingerprint>/image.json   with "disk_format": "raw"|"qcow2"
//! STORE/system/<fingerprint>/disk         the base, mode 0444, never written
//! ```
//!
//! The format is what the client says (`X-Skiff-Format`), else qcow2 when
//! the upload starts with the qcow2 magic; it is recorded then and never
//! probed again (a raw image is only taken when the client says raw).
//! Before it is stored, `disk_image::inspect` checks it (a qcow2 image's
//! whole header and its tables against the file, without opening any
//! backing file), and a qcow2 image that names a backing file is refused:
//! an image from elsewhere must not make the VMM open a file of this host.
//! The upload is already capped ([`super::MAX_TARBALL`]); the virtual size
//! is capped at [`MAX_VIRTUAL_SIZE`]. Whatever fails, nothing is left.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use disk_image::Format;

use super::{io_err, SystemImage, SystemImageError, SystemImages, Upload};

/// Largest virtual disk an imported image may have: 2 TiB.
pub const MAX_VIRTUAL_SIZE: u64 = 2 << 40;
/// The base's file name in the image's directory.
const DISK: &str = "disk";

/// Whether the upload starts with the qcow2 magic.
pub fn is_qcow2(up: &Upload) -> bool {
    let mut head = [0u8; 4];
    fs::File::open(&up.path)
        .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0))
        .is_ok_and(|()| head == disk_image::QCOW2_MAGIC)
}

impl SystemImages {
    /// The base file of a disk image.
    pub fn disk_path(&self, fingerprint: &str) -> PathBuf {
        self.dir(fingerprint).join(DISK)
    }

    /// Checks the uploaded disk image and moves it into the store
    /// (blocking: run it on a blocking thread).
    pub fn import_disk(
        &self,
        up: &Upload,
        format: Format,
        filename: &str,
        properties: std::collections::BTreeMap<String, String>,
    ) -> Result<SystemImage, SystemImageError> {
        let info = disk_image::inspect(&up.path, Some(format))
            .map_err(|e| SystemImageError::BadDisk { format: format.to_string(), why: crate::images::chain(&e) })?;
        if let Some(backing) = info.backing {
            return Err(SystemImageError::BackingFile(backing));
        }
        if info.virtual_size > MAX_VIRTUAL_SIZE {
            return Err(SystemImageError::DiskTooLarge(info.virtual_size, MAX_VIRTUAL_SIZE));
        }
        if info.virtual_size == 0 {
            return Err(SystemImageError::BadDisk { format: format.to_string(), why: "its size is 0".into() });
        }
        self.build_into_place(&up.fingerprint, "diskimage", |work| {
            self.store_disk(up, format, work, filename, properties)
        })
    }

    fn store_disk(
        &self,
        up: &Upload,
        format: Format,
        work: &std::path::Path,
        filename: &str,
        mut properties: std::collections::BTreeMap<String, String>,
    ) -> Result<SystemImage, SystemImageError> {
        let image = work.join("image");
        fs::create_dir(&image).map_err(io_err("create", &image))?;
        let disk = image.join(DISK);
        // The upload is in the store's tmp/: same file system.
        fs::rename(&up.path, &disk).map_err(io_err("move", &disk))?;
        fs::set_permissions(&disk, fs::Permissions::from_mode(0o444)).map_err(io_err("chmod", &disk))?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        properties.entry("description".into()).or_insert_with(|| filename.to_string());
        let img = SystemImage {
            fingerprint: up.fingerprint.clone(),
            size: up.size,
            architecture: "x86_64".into(),
            created_at: now,
            uploaded_at: now,
            properties,
            filename: filename.to_string(),
            disk_format: Some(format.to_string()),
        };
        Self::write_record(&image, &img)?;
        Ok(img)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_oci::Store;

    fn images() -> (tempfile::TempDir, SystemImages) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        (dir, SystemImages::new(store))
    }

    async fn upload(images: &SystemImages, data: Vec<u8>) -> Upload {
        images.receive(futures::stream::iter(vec![Ok::<_, std::io::Error>(data)])).await.unwrap()
    }

    fn nothing_left(images: &SystemImages) {
        assert!(images.list().is_empty(), "{:?}", images.list());
        let tmp: Vec<_> = fs::read_dir(images.store.root().join("tmp")).into_iter().flatten().flatten().collect();
        assert!(tmp.is_empty(), "{tmp:?}");
    }

    #[tokio::test]
    async fn a_raw_disk_is_stored_read_only_with_its_format() {
        let (_d, images) = images();
        let up = upload(&images, vec![7u8; 1 << 20]).await;
        assert!(!is_qcow2(&up));
        let img = images.import_disk(&up, Format::Raw, "disk.img", Default::default()).unwrap();
        drop(up);
        assert_eq!(img.disk(), Some(Format::Raw));
        let path = images.disk_path(&img.fingerprint);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o444);
        assert_eq!(fs::read(&path).unwrap(), vec![7u8; 1 << 20]);
        assert_eq!(images.find(&img.fingerprint).unwrap().disk_format.as_deref(), Some("raw"));
        let again = upload(&images, vec![7u8; 1 << 20]).await;
        assert!(matches!(
            images.import_disk(&again, Format::Raw, "x", Default::default()),
            Err(SystemImageError::Exists(_))
        ));
        drop(again);
        images.delete(&img.fingerprint).unwrap();
        nothing_left(&images);
    }

    #[tokio::test]
    async fn a_qcow2_naming_a_backing_file_and_a_corrupt_one_are_refused() {
        let (d, images) = images();
        let base = d.path().join("base.raw");
        fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let overlay = d.path().join("overlay.qcow2");
        disk_image::create_overlay(&overlay, &base, Format::Raw).unwrap();
        let up = upload(&images, fs::read(&overlay).unwrap()).await;
        assert!(is_qcow2(&up));
        let err = images.import_disk(&up, Format::Qcow2, "o.qcow2", Default::default()).unwrap_err();
        assert!(matches!(&err, SystemImageError::BackingFile(b) if b.ends_with("base.raw")), "{err}");
        assert_eq!(err.status(), 400);
        drop(up);

        let mut bad = disk_image::QCOW2_MAGIC.to_vec();
        bad.extend([0xffu8; 4092]);
        let up = upload(&images, bad).await;
        let err = images.import_disk(&up, Format::Qcow2, "bad.qcow2", Default::default()).unwrap_err();
        assert!(matches!(err, SystemImageError::BadDisk { .. }), "{err}");
        assert_eq!(err.status(), 400);
        drop(up);
        nothing_left(&images);
    }
}
