//! The image store on disk:
//!
//! ```text
//! STORE/blobs/<alg>/<hex>         verified blobs (manifests, configs, layers)
//! STORE/ingest/<alg>-<hex>        partial downloads, kept to resume
//! STORE/images/<sha256(name)>.json one record per image name
//! STORE/rootfs/<manifest hex>/    unpacked rootfs cache, keyed by manifest
//! STORE/uses/<manifest hex>/<id>  instances using an image (blocks delete)
//! STORE/tmp/                      work dirs, renamed into place when done
//! ```
//!
//! A blob lands in `blobs/` only after its size and digest are verified, by
//! rename; a rootfs lands in `rootfs/` only once fully unpacked, by rename;
//! an image record is written (by rename) only after all its blobs are in.
//! So nothing that looks complete is ever half-made.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::digest::{Digest, Hasher};
use crate::manifest::{Descriptor, Platform};

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A blob's content does not match its digest.
    #[error("blob {expected}: digest mismatch (got {actual})")]
    DigestMismatch {
        /// The digest announced.
        expected: Digest,
        /// The digest of what arrived.
        actual: Digest,
    },
    /// A blob's length does not match its descriptor.
    #[error("blob {digest}: size mismatch (expected {expected} bytes, got {actual})")]
    SizeMismatch {
        /// The blob.
        digest: Digest,
        /// The size announced.
        expected: u64,
        /// The bytes that arrived (so far).
        actual: u64,
    },
    /// The blob is not in the store.
    #[error("blob {0} is not in the store")]
    MissingBlob(Digest),
    /// No image of that name.
    #[error("image {0} is not in the store")]
    NoImage(String),
    /// An instance still uses the image.
    #[error("image {name} is in use by {users}")]
    InUse {
        /// The image.
        name: String,
        /// The instances using it.
        users: String,
    },
    /// Another process is downloading the same blob.
    #[error("blob {0} is being fetched by another process")]
    Busy(Digest),
    /// A record on disk is unreadable.
    #[error("corrupt image record {path}")]
    Record {
        /// The record.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What the store knows about one image name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageRecord {
    /// The name it was pulled or imported as (`docker.io/library/nginx:latest`).
    pub name: String,
    /// Digest of the platform manifest (the rootfs cache key).
    pub manifest: Digest,
    /// Digest of the index it was chosen from, for multi-arch images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<Digest>,
    /// The config blob.
    pub config: Descriptor,
    /// The layer blobs, base first.
    pub layers: Vec<Descriptor>,
    /// The platform.
    pub platform: Platform,
    /// Unix time the record was written.
    pub stored_at: u64,
}

impl ImageRecord {
    /// Total size of the layer blobs.
    pub fn size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }

    /// Every blob the image needs (manifest size unknown here, so only
    /// digests).
    pub fn blobs(&self) -> Vec<Digest> {
        let mut v = vec![self.manifest.clone(), self.config.digest.clone()];
        v.extend(self.index.iter().cloned());
        v.extend(self.layers.iter().map(|l| l.digest.clone()));
        v
    }
}

/// What `prune` removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PruneReport {
    /// Blobs deleted.
    pub blobs: usize,
    /// Bytes freed by blobs.
    pub bytes: u64,
    /// Rootfs caches deleted.
    pub rootfs: usize,
    /// Stale partial downloads and work dirs deleted.
    pub stale: usize,
}

/// An image store rooted at a directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// Opens (creating if needed) a store at `root`. The store and its
    /// top directories are made mode 0700 (owned by whoever runs this,
    /// root for the daemon): the rootfs caches and work dirs below hold the
    /// images' setuid files and device nodes, which no other host user may
    /// reach.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        use std::os::unix::fs::PermissionsExt;
        let root = root.into();
        for d in [
            "blobs/sha256",
            "blobs/sha512",
            "ingest",
            "images",
            "rootfs",
            "uses",
            "tmp",
        ] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_err("create", &p))?;
        }
        for d in ["", "blobs", "ingest", "images", "rootfs", "uses", "tmp"] {
            let p = root.join(d);
            fs::set_permissions(&p, fs::Permissions::from_mode(0o700))
                .map_err(io_err("make private (mode 0700)", &p))?;
        }
        Ok(Self { root })
    }

    /// `$SKIFF_OCI_STORE`, else `/var/lib/skiff/oci` for root, else
    /// `$XDG_DATA_HOME/skiff/oci` (or `~/.local/share/skiff/oci`).
    pub fn default_root() -> PathBuf {
        if let Some(p) = std::env::var_os("SKIFF_OCI_STORE") {
            return p.into();
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return "/var/lib/skiff/oci".into();
        }
        let base = std::env::var_os("XDG_DATA_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
            .unwrap_or_else(|| PathBuf::from("/tmp"));
        base.join("skiff/oci")
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a verified blob lives.
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(d.algorithm().name())
            .join(d.hex())
    }

    /// Whether a verified blob of that size is present.
    pub fn has_blob(&self, d: &Digest, size: u64) -> bool {
        fs::metadata(self.blob_path(d)).is_ok_and(|m| m.is_file() && m.len() == size)
    }

    /// Reads a whole (small) blob.
    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>, StoreError> {
        let p = self.blob_path(d);
        fs::read(&p).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::MissingBlob(d.clone()),
            _ => StoreError::Io {
                op: "read",
                path: p,
                source: e,
            },
        })
    }

    /// Opens a blob for streaming.
    pub fn open_blob(&self, d: &Digest) -> Result<File, StoreError> {
        let p = self.blob_path(d);
        File::open(&p).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::MissingBlob(d.clone()),
            _ => StoreError::Io {
                op: "open",
                path: p,
                source: e,
            },
        })
    }

    /// Verifies `data` against `d` (and `size` if given) and stores it.
    pub fn put_blob(&self, d: &Digest, size: Option<u64>, data: &[u8]) -> Result<(), StoreError> {
        let mut w = self.ingest(d, size.unwrap_or(data.len() as u64))?;
        if w.offset() != 0 {
            w.restart()?;
        }
        w.write(data)?;
        w.commit()
    }

    /// Copies a blob from `r`, verifying it, unless already present.
    pub fn put_blob_from(&self, desc: &Descriptor, r: &mut dyn Read) -> Result<(), StoreError> {
        if self.has_blob(&desc.digest, desc.size) {
            return Ok(());
        }
        let mut w = self.ingest(&desc.digest, desc.size)?;
        w.restart()?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = r
                .read(&mut buf)
                .map_err(io_err("read source of", &w.path))?;
            if n == 0 {
                break;
            }
            w.write(&buf[..n])?;
        }
        w.commit()
    }

    /// Stores a blob of unknown digest from `r` (hashing as it copies);
    /// returns its SHA-256 digest and size.
    pub fn put_blob_unverified(&self, r: &mut dyn Read) -> Result<(Digest, u64), StoreError> {
        let n = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join("tmp")
            .join(format!("blob-{}-{n}", std::process::id()));
        let res = (|| {
            let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
            let mut h = Hasher::new(crate::digest::Algorithm::Sha256);
            let mut size = 0u64;
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let k = r.read(&mut buf).map_err(io_err("read source of", &tmp))?;
                if k == 0 {
                    break;
                }
                h.update(&buf[..k]);
                f.write_all(&buf[..k]).map_err(io_err("write", &tmp))?;
                size += k as u64;
            }
            f.sync_data().map_err(io_err("sync", &tmp))?;
            let d = h.finish();
            let dest = self.blob_path(&d);
            fs::rename(&tmp, &dest).map_err(io_err("rename", &dest))?;
            Ok((d, size))
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    /// Starts or resumes the download of a blob. The partial file is locked
    /// for the writer's lifetime; what it already holds is rehashed.
    pub fn ingest(&self, d: &Digest, size: u64) -> Result<BlobWriter, StoreError> {
        let path = self
            .root
            .join("ingest")
            .join(format!("{}-{}", d.algorithm().name(), d.hex()));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err("open", &path))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(StoreError::Busy(d.clone()));
        }
        let mut hasher = d.hasher();
        let mut offset = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = file.read(&mut buf).map_err(io_err("read", &path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            offset += n as u64;
        }
        let mut w = BlobWriter {
            store: self.clone(),
            digest: d.clone(),
            size,
            path,
            file,
            hasher,
            offset,
        };
        if offset > size {
            w.restart()?;
        }
        Ok(w)
    }

    /// A fresh, unique work directory under `tmp/`.
    pub fn temp_dir(&self, tag: &str) -> Result<PathBuf, StoreError> {
        let n = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let p = self
            .root
            .join("tmp")
            .join(format!("{tag}-{}-{n}", std::process::id()));
        fs::create_dir(&p).map_err(io_err("create", &p))?;
        Ok(p)
    }

    fn record_path(&self, name: &str) -> PathBuf {
        let h = Digest::sha256_of(name.as_bytes());
        self.root.join("images").join(format!("{}.json", h.hex()))
    }

    /// Writes (atomically) the record of an image whose blobs are all in.
    pub fn save_image(&self, rec: &ImageRecord) -> Result<(), StoreError> {
        for d in [&rec.manifest, &rec.config.digest]
            .into_iter()
            .chain(rec.layers.iter().map(|l| &l.digest))
        {
            if !self.blob_path(d).is_file() {
                return Err(StoreError::MissingBlob(d.clone()));
            }
        }
        let path = self.record_path(&rec.name);
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let json = serde_json::to_vec_pretty(rec).expect("records always serialise");
        fs::write(&tmp, json).map_err(io_err("write", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("rename", &path))
    }

    /// Every image, sorted by name.
    pub fn list(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let dir = self.root.join("images");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let p = e.map_err(io_err("list", &dir))?.path();
            if p.extension().is_some_and(|x| x == "json") {
                out.push(read_record(&p)?);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The record of one image.
    pub fn inspect(&self, name: &str) -> Result<ImageRecord, StoreError> {
        let p = self.record_path(name);
        if !p.exists() {
            return Err(StoreError::NoImage(name.to_string()));
        }
        read_record(&p)
    }

    /// Marks an image (by manifest) as used by an instance.
    pub fn add_use(&self, manifest: &Digest, instance: &str) -> Result<(), StoreError> {
        let d = self.root.join("uses").join(manifest.hex());
        fs::create_dir_all(&d).map_err(io_err("create", &d))?;
        let p = d.join(sanitize(instance));
        fs::write(&p, b"").map_err(io_err("write", &p))
    }

    /// Removes an instance's mark.
    pub fn remove_use(&self, manifest: &Digest, instance: &str) -> Result<(), StoreError> {
        let d = self.root.join("uses").join(manifest.hex());
        let p = d.join(sanitize(instance));
        match fs::remove_file(&p) {
            Ok(()) => {
                let _ = fs::remove_dir(&d);
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::Io {
                op: "remove",
                path: p,
                source: e,
            }),
        }
    }

    /// The instances using a manifest.
    pub fn users(&self, manifest: &Digest) -> Vec<String> {
        let d = self.root.join("uses").join(manifest.hex());
        let mut v: Vec<String> = fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Deletes an image record, refusing while an instance uses it (and no
    /// other name points at the same manifest). The rootfs cache goes with
    /// the last name; blobs go at the next `prune`.
    pub fn delete(&self, name: &str) -> Result<(), StoreError> {
        let rec = self.inspect(name)?;
        let others = self
            .list()?
            .into_iter()
            .any(|r| r.name != rec.name && r.manifest == rec.manifest);
        if !others {
            let users = self.users(&rec.manifest);
            if !users.is_empty() {
                return Err(StoreError::InUse {
                    name: name.to_string(),
                    users: users.join(", "),
                });
            }
        }
        let p = self.record_path(name);
        fs::remove_file(&p).map_err(io_err("remove", &p))?;
        if !others {
            self.remove_tree(&self.rootfs_path(&rec.manifest))?;
        }
        Ok(())
    }

    /// Where the rootfs of a manifest is cached.
    pub fn rootfs_path(&self, manifest: &Digest) -> PathBuf {
        self.root.join("rootfs").join(manifest.hex())
    }

    /// Removes a tree by renaming it into `tmp/` first, so a crash midway
    /// leaves only a work dir, never a partial tree in place.
    pub fn remove_tree(&self, p: &Path) -> Result<(), StoreError> {
        if fs::symlink_metadata(p).is_err() {
            return Ok(());
        }
        let n = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let dead = self
            .root
            .join("tmp")
            .join(format!("dead-{}-{n}", std::process::id()));
        fs::rename(p, &dead).map_err(io_err("rename", p))?;
        fs::remove_dir_all(&dead).map_err(io_err("remove", &dead))
    }

    /// Deletes blobs and rootfs caches no image refers to, and stale work
    /// files (partial downloads are kept only while `keep_partial`).
    pub fn prune(&self, keep_partial: bool) -> Result<PruneReport, StoreError> {
        let records = self.list()?;
        let mut live = std::collections::HashSet::new();
        let mut live_roots = std::collections::HashSet::new();
        for r in &records {
            live_roots.insert(r.manifest.hex().to_string());
            for d in r.blobs() {
                live.insert(d.to_string());
            }
        }
        let mut rep = PruneReport::default();
        for alg in ["sha256", "sha512"] {
            let dir = self.root.join("blobs").join(alg);
            for e in fs::read_dir(&dir).map_err(io_err("list", &dir))?.flatten() {
                let name = format!("{alg}:{}", e.file_name().to_string_lossy());
                if !live.contains(&name) {
                    rep.bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
                    fs::remove_file(e.path()).map_err(io_err("remove", &e.path()))?;
                    rep.blobs += 1;
                }
            }
        }
        let dir = self.root.join("rootfs");
        for e in fs::read_dir(&dir).map_err(io_err("list", &dir))?.flatten() {
            if !live_roots.contains(&*e.file_name().to_string_lossy()) {
                self.remove_tree(&e.path())?;
                rep.rootfs += 1;
            }
        }
        let mut stale_dirs = vec![self.root.join("tmp")];
        if !keep_partial {
            stale_dirs.push(self.root.join("ingest"));
        }
        for dir in stale_dirs {
            for e in fs::read_dir(&dir).map_err(io_err("list", &dir))?.flatten() {
                let p = e.path();
                let r = if p.is_dir() && !p.is_symlink() {
                    fs::remove_dir_all(&p)
                } else {
                    fs::remove_file(&p)
                };
                r.map_err(io_err("remove", &p))?;
                rep.stale += 1;
            }
        }
        Ok(rep)
    }
}

fn read_record(p: &Path) -> Result<ImageRecord, StoreError> {
    let b = fs::read(p).map_err(io_err("read", p))?;
    serde_json::from_slice(&b).map_err(|source| StoreError::Record {
        path: p.to_path_buf(),
        source,
    })
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A blob being written into `ingest/`, hashed as it goes. Dropping it
/// without `commit` keeps the partial file for a later resume.
pub struct BlobWriter {
    store: Store,
    digest: Digest,
    size: u64,
    path: PathBuf,
    file: File,
    hasher: Hasher,
    offset: u64,
}

impl BlobWriter {
    /// Bytes already present (where a resumed download starts).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Throws away what is there and starts at 0.
    pub fn restart(&mut self) -> Result<(), StoreError> {
        self.file
            .set_len(0)
            .map_err(io_err("truncate", &self.path))?;
        self.file
            .seek(SeekFrom::Start(0))
            .map_err(io_err("seek", &self.path))?;
        self.hasher = self.digest.hasher();
        self.offset = 0;
        Ok(())
    }

    /// Appends bytes; refuses to grow past the announced size.
    pub fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        if self.offset + data.len() as u64 > self.size {
            let actual = self.offset + data.len() as u64;
            self.discard();
            return Err(StoreError::SizeMismatch {
                digest: self.digest.clone(),
                expected: self.size,
                actual,
            });
        }
        self.file
            .write_all(data)
            .map_err(io_err("write", &self.path))?;
        self.hasher.update(data);
        self.offset += data.len() as u64;
        Ok(())
    }

    /// Checks size and digest, then moves the blob into `blobs/`. On a
    /// mismatch the partial file is deleted.
    pub fn commit(mut self) -> Result<(), StoreError> {
        if self.offset != self.size {
            return Err(StoreError::SizeMismatch {
                digest: self.digest.clone(),
                expected: self.size,
                actual: self.offset,
            });
        }
        let actual = self.hasher.clone().finish();
        if actual != self.digest {
            self.discard();
            return Err(StoreError::DigestMismatch {
                expected: self.digest.clone(),
                actual,
            });
        }
        self.file.sync_data().map_err(io_err("sync", &self.path))?;
        let dest = self.store.blob_path(&self.digest);
        fs::rename(&self.path, &dest).map_err(io_err("rename", &dest))
    }

    /// Deletes the partial file (the blob arrived by another way).
    pub fn abandon(mut self) {
        self.discard();
    }

    fn discard(&mut self) {
        let _ = fs::remove_file(&self.path);
        self.offset = 0;
        self.hasher = self.digest.hasher();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(data: &[u8]) -> Descriptor {
        Descriptor {
            media_type: String::new(),
            digest: Digest::sha256_of(data),
            size: data.len() as u64,
            platform: None,
            annotations: Default::default(),
        }
    }

    #[test]
    fn blobs_verify_and_resume() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let data = b"hello world".repeat(1000);
        let d = desc(&data);
        // Interrupted after 5000 bytes.
        {
            let mut w = s.ingest(&d.digest, d.size).unwrap();
            w.write(&data[..5000]).unwrap();
        }
        assert!(!s.has_blob(&d.digest, d.size));
        let mut w = s.ingest(&d.digest, d.size).unwrap();
        assert_eq!(w.offset(), 5000);
        // A second writer is refused while the first holds the lock.
        assert!(matches!(
            s.ingest(&d.digest, d.size),
            Err(StoreError::Busy(_))
        ));
        w.write(&data[5000..]).unwrap();
        w.commit().unwrap();
        assert!(s.has_blob(&d.digest, d.size));
        assert_eq!(s.read_blob(&d.digest).unwrap(), data);

        // Wrong content: digest error, nothing kept.
        let bad = desc(b"expected");
        let e = s.put_blob(&bad.digest, Some(8), b"tampered").unwrap_err();
        assert!(matches!(e, StoreError::DigestMismatch { .. }), "{e}");
        assert!(!s.blob_path(&bad.digest).exists());
        assert_eq!(fs::read_dir(dir.path().join("ingest")).unwrap().count(), 0);
        // Too long: size error.
        let e = s.put_blob(&bad.digest, Some(3), b"expected").unwrap_err();
        assert!(matches!(e, StoreError::SizeMismatch { .. }), "{e}");
    }

    #[test]
    fn records_delete_prune() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let (m, c, l) = (b"manifest".to_vec(), b"config".to_vec(), b"layer".to_vec());
        for b in [&m, &c, &l] {
            s.put_blob_from(&desc(b), &mut &b[..]).unwrap();
        }
        s.put_blob_from(&desc(b"orphan"), &mut &b"orphan"[..])
            .unwrap();
        let rec = ImageRecord {
            name: "example.com/a:1".into(),
            manifest: desc(&m).digest,
            index: None,
            config: desc(&c),
            layers: vec![desc(&l)],
            platform: Platform::host(),
            stored_at: 1,
        };
        s.save_image(&rec).unwrap();
        assert_eq!(s.list().unwrap(), vec![rec.clone()]);
        assert_eq!(s.inspect("example.com/a:1").unwrap(), rec);
        assert!(matches!(s.inspect("nope"), Err(StoreError::NoImage(_))));
        let rep = s.prune(false).unwrap();
        assert_eq!((rep.blobs, rep.bytes), (1, 6));
        assert!(s.has_blob(&rec.config.digest, 6));

        s.add_use(&rec.manifest, "vm/web").unwrap();
        let e = s.delete("example.com/a:1").unwrap_err();
        assert!(e.to_string().contains("vm_web"), "{e}");
        s.remove_use(&rec.manifest, "vm/web").unwrap();
        fs::create_dir_all(s.rootfs_path(&rec.manifest).join("etc")).unwrap();
        s.delete("example.com/a:1").unwrap();
        assert!(!s.rootfs_path(&rec.manifest).exists());
        assert_eq!(s.prune(false).unwrap().blobs, 3);
        assert!(s.list().unwrap().is_empty());
    }

    #[test]
    fn store_directories_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        // An existing, world-traversable store is tightened on open.
        fs::create_dir_all(root.join("rootfs")).unwrap();
        for p in [&root, &root.join("rootfs")] {
            fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let s = Store::open(&root).unwrap();
        for p in ["", "rootfs", "tmp", "blobs", "ingest"] {
            let m = fs::metadata(s.root().join(p)).unwrap();
            assert_eq!(m.permissions().mode() & 0o777, 0o700, "{p:?}");
        }
    }
}
