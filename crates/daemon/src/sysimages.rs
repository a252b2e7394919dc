//! System images: Incus's "unified" image format, one tarball (xz, gzip,
//! zstd or plain) holding `metadata.yaml` and `rootfs/`, the whole tree of
//! a machine whose own init a system container boots.
//!
//! ```text
//! STORE/system/<fingerprint>/image.json     what GET /1.0/images shows
//! STORE/system/<fingerprint>/metadata.yaml  as imported
//! STORE/system/<fingerprint>/rootfs/        unpacked, read-only lower layer
//! STORE/uses/<fingerprint>/<instance id>    instances using it (the OCI store's)
//! STORE/tmp/                                uploads and unpacking, renamed into place
//! ```
//!
//! The fingerprint is the SHA-256 of the tarball as uploaded, as in Incus.
//! An import streams the upload to a temporary file (capped at
//! [`MAX_TARBALL`]) while hashing it, then unpacks it with the OCI
//! store's layer unpacker ([`skiff_oci::unpack::Unpacker`]: paths that
//! climb out, hostile links, device nodes, sizes, all capped at
//! [`MAX_UNPACKED`]) into a work directory that is renamed into place only
//! once `metadata.yaml` parses and `rootfs/` is a directory. Whatever
//! fails, nothing is left behind.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use skiff_oci::unpack::{UnpackOptions, Unpacker};
use skiff_oci::{Digest, Store};

/// Largest tarball accepted, as uploaded (compressed): 8 GiB.
pub const MAX_TARBALL: u64 = 8 << 30;
/// Largest unpacked image (and largest file in it): 32 GiB.
pub const MAX_UNPACKED: u64 = 32 << 30;
/// Largest `metadata.yaml`: 1 MiB.
const MAX_METADATA: u64 = 1 << 20;
/// Magic numbers of the compressions the unpacker knows.
const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0];
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
/// Where a plain tar header says `ustar`.
const USTAR_AT: usize = 257;

/// Errors of system images.
#[derive(Debug, thiserror::Error)]
pub enum SystemImageError {
    /// Nothing was uploaded.
    #[error("the image upload is empty")]
    Empty,
    /// The upload is over its limit ([`MAX_TARBALL`]).
    #[error("the image is larger than {0} bytes")]
    TooLarge(u64),
    /// Not a tarball Skiff can read.
    #[error("not an image tarball ({0}): a system image is a tar (xz, gzip or zstd) with metadata.yaml and rootfs/")]
    NotTarball(&'static str),
    /// The unpacker refused the tarball (hostile paths, sizes, corruption).
    #[error("unpacking the image")]
    Unpack(#[source] skiff_oci::unpack::UnpackError),
    /// No `metadata.yaml` file at the top.
    #[error("the image has no metadata.yaml at its top (is it a unified system image?)")]
    NoMetadata,
    /// No `rootfs/` directory at the top.
    #[error("the image has no rootfs/ directory at its top (split images and VM disk images are not taken)")]
    NoRootfs,
    /// `metadata.yaml` is not what it should be.
    #[error("metadata.yaml: {0}")]
    BadMetadata(String),
    /// The image is already in the store.
    #[error("an image with fingerprint {0} already exists")]
    Exists(String),
    /// No such image.
    #[error("system image {0:?} not found")]
    NotFound(String),
    /// Instances use it.
    #[error("image {fingerprint} is used by {users}")]
    InUse {
        /// The image.
        fingerprint: String,
        /// Its instances.
        users: String,
    },
    /// A host operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The OCI store (work directories, uses) failed.
    #[error("image store")]
    Store(#[source] skiff_oci::store::StoreError),
    /// A disk image that is not valid (its header or tables).
    #[error("not a valid {format} disk image: {why}")]
    BadDisk {
        /// The format it was read as.
        format: String,
        /// What is wrong.
        why: String,
    },
    /// A qcow2 image that names a backing file.
    #[error(
        "the qcow2 image names a backing file ({0:?}): an imported image must stand alone (an image from \
         elsewhere must not name files of this host); flatten it first: qemu-img convert -O qcow2 IN OUT"
    )]
    BackingFile(String),
    /// A disk larger than [`disk::MAX_VIRTUAL_SIZE`].
    #[error("the disk image's virtual size, {0} bytes, is over the limit of {1} bytes")]
    DiskTooLarge(u64, u64),
}

impl SystemImageError {
    /// The HTTP status: 400 for what the client sent, 404, 409, else 500.
    pub fn status(&self) -> u16 {
        use SystemImageError as E;
        match self {
            E::Empty
            | E::TooLarge(_)
            | E::NotTarball(_)
            | E::Unpack(_)
            | E::NoMetadata
            | E::NoRootfs
            | E::BadMetadata(_)
            | E::BadDisk { .. }
            | E::BackingFile(_)
            | E::DiskTooLarge(..) => 400,
            E::NotFound(_) => 404,
            E::Exists(_) | E::InUse { .. } => 409,
            E::Io { .. } | E::Store(_) => 500,
        }
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SystemImageError + 'a {
    move |source| SystemImageError::Io { op, path: path.to_path_buf(), source }
}

/// A system image in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemImage {
    /// SHA-256 of the tarball (hex).
    pub fingerprint: String,
    /// Bytes of the tarball.
    pub size: u64,
    /// `x86_64`.
    pub architecture: String,
    /// `creation_date` of its metadata (seconds since the epoch).
    pub created_at: u64,
    /// When it was imported (seconds since the epoch).
    pub uploaded_at: u64,
    /// `properties` of its metadata (`os`, `release`, `description`...),
    /// then those the client gave.
    pub properties: BTreeMap<String, String>,
    /// The file name the client gave.
    pub filename: String,
    /// A disk image's format (`raw`, `qcow2`), recorded at import and never
    /// probed again; `None` for a system container image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_format: Option<String>,
}

impl SystemImage {
    /// A disk image's format, `None` for a system container image.
    pub fn disk(&self) -> Option<disk_image::Format> {
        self.disk_format.as_deref().and_then(|f| f.parse().ok())
    }
}

/// What `metadata.yaml` says (the fields Skiff reads).
#[derive(Debug, Deserialize)]
struct Metadata {
    architecture: String,
    creation_date: i64,
    #[serde(default)]
    properties: BTreeMap<String, serde_yaml::Value>,
}

/// Parses `metadata.yaml`: `architecture` (this host's) and
/// `creation_date` are required; `properties` become strings (a list,
/// as old images give `release`, is joined with spaces).
fn parse_metadata(text: &str) -> Result<(String, u64, BTreeMap<String, String>), SystemImageError> {
    let bad = |why: String| SystemImageError::BadMetadata(why);
    let m: Metadata = serde_yaml::from_str(text).map_err(|e| bad(e.to_string()))?;
    let arch = match m.architecture.as_str() {
        "x86_64" | "amd64" => "x86_64".to_string(),
        other => return Err(bad(format!("architecture {other:?} is not this host's (x86_64)"))),
    };
    let created = u64::try_from(m.creation_date).map_err(|_| bad("creation_date is negative".into()))?;
    let scalar = |v: &serde_yaml::Value| match v {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    let mut props = BTreeMap::new();
    for (k, v) in m.properties {
        let text = match &v {
            serde_yaml::Value::Sequence(items) => items.iter().filter_map(scalar).collect::<Vec<_>>().join(" "),
            other => scalar(other).ok_or_else(|| bad(format!("property {k:?} is not a string")))?,
        };
        props.insert(k, text);
    }
    Ok((arch, created, props))
}

/// Whether a system image's rootfs has an executable `/sbin/init`
/// (resolved inside the rootfs: Debian's is a link to systemd).
pub fn has_init(rootfs: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    skiff_oci::unpack::resolve_in_root(rootfs, Path::new("sbin/init"), true)
        .and_then(|p| fs::symlink_metadata(rootfs.join(p)))
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// An upload on its way to the store: a temporary file and its hash.
#[derive(Debug)]
pub struct Upload {
    dir: PathBuf,
    path: PathBuf,
    fingerprint: String,
    size: u64,
}

impl Upload {
    /// The SHA-256 of what was uploaded (hex).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The system images of a store.
#[derive(Clone)]
pub struct SystemImages {
    store: Store,
    root: PathBuf,
    max_tarball: u64,
    max_unpacked: u64,
}

impl SystemImages {
    /// The system images of `store` (made on first use).
    pub fn new(store: Store) -> SystemImages {
        let root = store.root().join("system");
        SystemImages { store, root, max_tarball: MAX_TARBALL, max_unpacked: MAX_UNPACKED }
    }

    /// Other limits than [`MAX_TARBALL`] and [`MAX_UNPACKED`].
    #[cfg(test)]
    pub fn with_limits(mut self, max_tarball: u64, max_unpacked: u64) -> SystemImages {
        self.max_tarball = max_tarball;
        self.max_unpacked = max_unpacked;
        self
    }

    fn dir(&self, fingerprint: &str) -> PathBuf {
        self.root.join(fingerprint)
    }

    /// The unpacked rootfs of an image.
    pub fn rootfs(&self, fingerprint: &str) -> PathBuf {
        self.dir(fingerprint).join("rootfs")
    }

    /// The key its users are recorded under in the store.
    pub fn use_key(fingerprint: &str) -> Result<Digest, SystemImageError> {
        Digest::parse(&format!("sha256:{fingerprint}")).map_err(|_| SystemImageError::NotFound(fingerprint.into()))
    }

    /// Every system image.
    pub fn list(&self) -> Vec<SystemImage> {
        let mut out: Vec<SystemImage> = fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| fs::read(e.path().join("image.json")).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect();
        out.sort_by(|a, b| a.fingerprint.cmp(&b.fingerprint));
        out
    }

    /// The image whose fingerprint is `prefix` or starts with it (at least
    /// 12 hex digits, or the whole fingerprint).
    pub fn find(&self, prefix: &str) -> Option<SystemImage> {
        if prefix.len() < 12 && prefix.len() != 64 || !prefix.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        let mut found = self.list().into_iter().filter(|i| i.fingerprint.starts_with(prefix));
        match (found.next(), found.next()) {
            (Some(one), None) => Some(one),
            _ => None,
        }
    }

    /// Streams an upload to a temporary file, hashing it; refuses an empty
    /// one and one over [`MAX_TARBALL`] (as soon as it is).
    pub async fn receive<S, B, E>(&self, mut body: S) -> Result<Upload, SystemImageError>
    where
        S: Stream<Item = Result<B, E>> + Unpin,
        B: AsRef<[u8]>,
        E: std::error::Error + Send + Sync + 'static,
    {
        let dir = self.store.temp_dir("upload").map_err(SystemImageError::Store)?;
        let path = dir.join("image.tar");
        let mut up = Upload { dir, path, fingerprint: String::new(), size: 0 };
        let mut file = tokio::fs::File::create(&up.path).await.map_err(io_err("create", &up.path))?;
        let mut hash = Sha256::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| SystemImageError::Io {
                op: "receive",
                path: up.path.clone(),
                source: std::io::Error::other(e),
            })?;
            let chunk = chunk.as_ref();
            up.size += chunk.len() as u64;
            if up.size > self.max_tarball {
                return Err(SystemImageError::TooLarge(self.max_tarball));
            }
            hash.update(chunk);
            tokio::io::AsyncWriteExt::write_all(&mut file, chunk).await.map_err(io_err("write", &up.path))?;
        }
        tokio::io::AsyncWriteExt::flush(&mut file).await.map_err(io_err("write", &up.path))?;
        if up.size == 0 {
            return Err(SystemImageError::Empty);
        }
        up.fingerprint = hex::encode(hash.finalize());
        Ok(up)
    }

    /// Checks the upload's first bytes: a tarball, compressed or not.
    pub fn sniff(up: &Upload) -> Result<(), SystemImageError> {
        let mut head = [0u8; USTAR_AT + 8];
        let mut f = fs::File::open(&up.path).map_err(io_err("open", &up.path))?;
        let mut n = 0;
        while n < head.len() {
            match f.read(&mut head[n..]).map_err(io_err("read", &up.path))? {
                0 => break,
                k => n += k,
            }
        }
        let head = &head[..n];
        if [XZ_MAGIC, GZIP_MAGIC, ZSTD_MAGIC].iter().any(|m| head.starts_with(m)) {
            return Ok(());
        }
        if head.starts_with(b"BZh") {
            return Err(SystemImageError::NotTarball("bzip2 is not supported"));
        }
        if head.len() >= USTAR_AT + 5 && &head[USTAR_AT..USTAR_AT + 5] == b"ustar" {
            return Ok(());
        }
        Err(SystemImageError::NotTarball("neither a tar nor an xz, gzip or zstd stream"))
    }

    /// Unpacks an upload into the store (blocking: run it on a blocking
    /// thread). `properties` given by the client override the image's.
    pub fn import(
        &self,
        up: &Upload,
        filename: &str,
        properties: BTreeMap<String, String>,
    ) -> Result<SystemImage, SystemImageError> {
        Self::sniff(up)?;
        self.build_into_place(&up.fingerprint, "sysimage", |work| self.unpack_into(up, work, filename, properties))
    }

    /// Builds an image with `make` in a work directory of the store (into
    /// `WORK/image`, with its `image.json`) and renames it into place as
    /// image `fingerprint`; whatever fails, nothing is left.
    fn build_into_place(
        &self,
        fingerprint: &str,
        what: &str,
        make: impl FnOnce(&Path) -> Result<SystemImage, SystemImageError>,
    ) -> Result<SystemImage, SystemImageError> {
        let target = self.dir(fingerprint);
        if target.exists() {
            return Err(SystemImageError::Exists(fingerprint.to_string()));
        }
        let work = self.store.temp_dir(what).map_err(SystemImageError::Store)?;
        let result = make(&work).and_then(|img| {
            fs::create_dir_all(&self.root).map_err(io_err("create", &self.root))?;
            match fs::rename(work.join("image"), &target) {
                Ok(()) => Ok(img),
                // Another import of the same upload won the race.
                Err(_) if target.join("image.json").is_file() => Err(SystemImageError::Exists(img.fingerprint)),
                Err(e) => Err(io_err("rename into", &target)(e)),
            }
        });
        let _ = fs::remove_dir_all(&work);
        result
    }

    /// Writes an image's record, `image.json`, durably into its directory.
    fn write_record(image: &Path, img: &SystemImage) -> Result<(), SystemImageError> {
        let json = image.join("image.json");
        let mut f = fs::File::create(&json).map_err(io_err("create", &json))?;
        f.write_all(&serde_json::to_vec_pretty(img).unwrap_or_default()).map_err(io_err("write", &json))?;
        f.sync_all().map_err(io_err("sync", &json))
    }

    fn unpack_into(
        &self,
        up: &Upload,
        work: &Path,
        filename: &str,
        properties: BTreeMap<String, String>,
    ) -> Result<SystemImage, SystemImageError> {
        let image = work.join("image");
        fs::create_dir(&image).map_err(io_err("create", &image))?;
        let file = fs::File::open(&up.path).map_err(io_err("open", &up.path))?;
        let mut br = BufReader::with_capacity(256 * 1024, file);
        let is_xz = br.fill_buf().map_err(io_err("read", &up.path))?.starts_with(XZ_MAGIC);
        let reader: Box<dyn Read> =
            if is_xz { Box::new(xz2::bufread::XzDecoder::new_multi_decoder(br)) } else { Box::new(br) };
        let opts = UnpackOptions {
            max_entry_size: self.max_unpacked,
            max_layer_size: self.max_unpacked,
            ..Default::default()
        };
        Unpacker::new(&image, opts).apply(reader).map_err(SystemImageError::Unpack)?;

        let meta_path = image.join("metadata.yaml");
        let meta = fs::symlink_metadata(&meta_path).map_err(|_| SystemImageError::NoMetadata)?;
        if !meta.is_file() {
            return Err(SystemImageError::NoMetadata);
        }
        if meta.len() > MAX_METADATA {
            return Err(SystemImageError::BadMetadata(format!("{} bytes, over {MAX_METADATA}", meta.len())));
        }
        let rootfs = image.join("rootfs");
        if !fs::symlink_metadata(&rootfs).is_ok_and(|m| m.is_dir()) {
            return Err(SystemImageError::NoRootfs);
        }
        let text = fs::read_to_string(&meta_path)
            .map_err(|e| SystemImageError::BadMetadata(format!("not readable as UTF-8 text: {e}")))?;
        let (architecture, created_at, mut props) = parse_metadata(&text)?;
        props.extend(properties);
        let uploaded_at =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let img = SystemImage {
            fingerprint: up.fingerprint.clone(),
            size: up.size,
            architecture,
            created_at,
            uploaded_at,
            properties: props,
            filename: filename.to_string(),
            disk_format: None,
        };
        Self::write_record(&image, &img)?;
        Ok(img)
    }

    /// Deletes an image unless instances use it.
    pub fn delete(&self, fingerprint: &str) -> Result<(), SystemImageError> {
        let key = Self::use_key(fingerprint)?;
        let dir = self.dir(fingerprint);
        if !dir.join("image.json").is_file() {
            return Err(SystemImageError::NotFound(fingerprint.into()));
        }
        let users = self.store.users(&key);
        if !users.is_empty() {
            return Err(SystemImageError::InUse { fingerprint: fingerprint.into(), users: users.join(", ") });
        }
        self.store.remove_tree(&dir).map_err(SystemImageError::Store)
    }
}

#[path = "sysimages_disk.rs"]
pub mod disk;

#[cfg(test)]
#[path = "sysimages_tests.rs"]
mod tests;
