//! Images for instances: resolving an instance source (a local alias, a
//! fingerprint, or an OCI reference on a registry), pulling what is
//! missing with progress, and the unpacked rootfs and run spec the
//! drivers start from. Blobs and unpacked trees live in the OCI store
//! (`$SKIFF_DIR/images`), imported system images beside them
//! ([`crate::sysimages`]); aliases of both live in the state database.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use skiff_api::InstanceSource;
use skiff_driver::ImageKind;
use skiff_oci::auth::Credentials;
use skiff_oci::pull::{Progress, PullOptions};
use skiff_oci::unpack::UnpackOptions;
use skiff_oci::{Digest, ImageRecord, Reference, Store};

use crate::sysimages::{SystemImage, SystemImages};

/// Errors of images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The source cannot name an image.
    #[error("bad image source: {0}")]
    BadSource(String),
    /// No image with that alias or fingerprint.
    #[error("image {0:?} not found (pull it by its full reference, e.g. docker.io/library/busybox)")]
    NotFound(String),
    /// A reference that does not parse.
    #[error("bad image reference {reference:?}: {why}")]
    BadReference {
        /// What was given.
        reference: String,
        /// Why it is bad.
        why: String,
    },
    /// The pull failed (network, auth, missing image, bad digest).
    #[error("pulling {reference}: {why}")]
    Pull {
        /// The reference.
        reference: String,
        /// The chain of causes.
        why: String,
    },
    /// The store failed.
    #[error("image store: {0}")]
    Store(String),
    /// The image is used by instances.
    #[error("image {fingerprint} is used by {users}")]
    InUse {
        /// The image.
        fingerprint: String,
        /// Its instances.
        users: String,
    },
}

/// What an instance needs of its image.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// An OCI image (its run spec starts it) or a system image (it boots its own init).
    pub kind: ImageKind,
    /// The OCI reference it was stored under, or the system image's file name.
    pub name: String,
    /// Its fingerprint (the manifest digest's hex, or the tarball's SHA-256).
    pub fingerprint: String,
    /// The unpacked, read-only rootfs.
    pub rootfs: PathBuf,
    /// The OCI runtime config of its run spec; a system image's record.
    pub config: Value,
    /// A system image's properties (`os`, `release`, ...), for `image.*` keys.
    pub properties: std::collections::BTreeMap<String, String>,
}

/// The full text of an error and its causes.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// The image store and its operations.
#[derive(Clone)]
pub struct Images {
    store: Store,
    system: SystemImages,
}

/// The key an image's users are recorded under (OCI images: the manifest
/// digest; system images: the tarball's), from a fingerprint.
fn use_key(fingerprint: &str) -> Option<Digest> {
    Digest::parse(&format!("sha256:{fingerprint}")).ok()
}

/// What a source resolves to before any pull.
enum Target {
    /// An image already in the store.
    Local(ImageRecord),
    /// A registry reference, pulled if missing.
    Remote { reference: Reference, insecure: bool, credentials: Option<Credentials> },
}

impl Images {
    /// Opens the store at `root`.
    pub fn open(root: PathBuf) -> Result<Images, ImageError> {
        let store = Store::open(root).map_err(|e| ImageError::Store(chain(&e)))?;
        Ok(Images { system: SystemImages::new(store.clone()), store })
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The system images.
    pub fn system(&self) -> &SystemImages {
        &self.system
    }

    /// Records that an instance uses the image with this fingerprint.
    pub fn add_use(&self, fingerprint: &str, instance: &str) {
        if let Some(k) = use_key(fingerprint) {
            let _ = self.store.add_use(&k, instance);
        }
    }

    /// Removes an instance's use of the image with this fingerprint.
    pub fn remove_use(&self, fingerprint: &str, instance: &str) {
        if let Some(k) = use_key(fingerprint) {
            let _ = self.store.remove_use(&k, instance);
        }
    }

    /// The fingerprint of a system image or OCI image named by
    /// fingerprint (prefix) or stored name.
    pub fn fingerprint_of(&self, key: &str) -> Result<String, ImageError> {
        if let Some(img) = self.system.find(key) {
            return Ok(img.fingerprint);
        }
        Ok(self.find(key)?.manifest.hex().to_string())
    }

    /// The system image a source names: a fingerprint, or an alias (with
    /// no server) whose target is one.
    fn system_target(&self, src: &InstanceSource, alias_target: Option<&str>) -> Option<SystemImage> {
        if src.kind != "image" || src.server.as_deref().is_some_and(|s| !s.is_empty()) {
            return None;
        }
        let fp = src.fingerprint.as_deref().filter(|f| !f.is_empty());
        fp.and_then(|f| self.system.find(f))
            .or_else(|| alias_target.and_then(|t| self.system.find(t)))
            // `skiff launch 3f2a1b0c9d8e sys1`: a fingerprint prefix given as the name.
            .or_else(|| src.alias.as_deref().and_then(|a| self.system.find(a)))
    }

    /// Whether a source names a system image (for checks before a create).
    pub fn is_system(&self, src: &InstanceSource, alias_target: Option<&str>) -> bool {
        self.system_target(src, alias_target).is_some_and(|i| i.disk_format.is_none())
    }

    /// Every image in the store.
    pub fn list(&self) -> Result<Vec<ImageRecord>, ImageError> {
        self.store.list().map_err(|e| ImageError::Store(chain(&e)))
    }

    /// The image whose fingerprint starts with `prefix` (at least 12 hex
    /// digits, or the whole fingerprint).
    pub fn by_fingerprint(&self, prefix: &str) -> Result<ImageRecord, ImageError> {
        let matches: Vec<_> =
            self.list()?.into_iter().filter(|r| !prefix.is_empty() && r.manifest.hex().starts_with(prefix)).collect();
        match matches.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(ImageError::NotFound(prefix.into())),
            many if many.iter().all(|r| r.manifest == many[0].manifest) => Ok(many[0].clone()),
            _ => Err(ImageError::BadSource(format!("fingerprint prefix {prefix:?} is ambiguous"))),
        }
    }

    /// An image by fingerprint (prefix) or by the name it was stored
    /// under (`localhost/skiff-demo`, `docker.io/library/nginx:1.27`).
    pub fn find(&self, key: &str) -> Result<ImageRecord, ImageError> {
        if !key.is_empty() && key.chars().all(|c| c.is_ascii_hexdigit()) {
            if let Ok(r) = self.by_fingerprint(key) {
                return Ok(r);
            }
        }
        let name = Reference::parse(key).map(|r| r.to_string()).unwrap_or_else(|_| key.to_string());
        self.store.inspect(&name).map_err(|_| ImageError::NotFound(key.into()))
    }

    fn target(&self, src: &InstanceSource, alias_target: Option<String>) -> Result<Target, ImageError> {
        if src.kind != "image" {
            return Err(ImageError::BadSource(format!(
                "source type {:?}: Skiff creates instances from images (type \"image\")",
                src.kind
            )));
        }
        let credentials = match &src.secret {
            Some(s) => Some(decode_secret(s)?),
            None => None,
        };
        let fingerprint = src.fingerprint.as_deref().filter(|f| !f.is_empty());
        if let Some(fp) = fingerprint.filter(|f| f.chars().all(|c| c.is_ascii_hexdigit())) {
            return Ok(Target::Local(self.by_fingerprint(fp)?));
        }
        // Clients that could not resolve a name as an alias send it as a
        // fingerprint (LXD's client does): treat it as a name.
        let alias = src.alias.as_deref().filter(|a| !a.is_empty()).or(fingerprint).ok_or_else(|| {
            ImageError::BadSource("the source names no image (give an alias or a fingerprint)".into())
        })?;
        if let Some(proto) = src.protocol.as_deref().filter(|p| !p.is_empty() && *p != "oci") {
            return Err(ImageError::BadSource(format!(
                "image protocol {proto:?} is not supported (Skiff pulls OCI images: protocol \"oci\")"
            )));
        }
        let server = src.server.as_deref().filter(|s| !s.is_empty());
        if server.is_none() {
            if let Some(fp) = alias_target {
                return Ok(Target::Local(self.by_fingerprint(&fp)?));
            }
        }
        let (text, insecure) = match server {
            Some(url) => {
                let (host, insecure) = if let Some(h) = url.strip_prefix("http://") {
                    (h, true)
                } else {
                    (url.strip_prefix("https://").unwrap_or(url), false)
                };
                let host = host.trim_end_matches('/');
                let host = if host == "docker.io" || host == "registry-1.docker.io" { "docker.io" } else { host };
                (format!("{host}/{alias}"), insecure)
            }
            None => (alias.to_string(), false),
        };
        let reference = Reference::parse(&text)
            .map_err(|e| ImageError::BadReference { reference: text.clone(), why: chain(&e) })?;
        Ok(Target::Remote { reference, insecure, credentials })
    }

    /// Resolves `src` (an alias from `aliases` wins for bare names), pulls
    /// what is missing (reporting progress through `progress`) and unpacks.
    pub async fn resolve(
        &self,
        src: &InstanceSource,
        alias_target: Option<String>,
        progress: Arc<dyn Fn(Value) + Send + Sync>,
    ) -> Result<Resolved, ImageError> {
        if let Some(img) = self.system_target(src, alias_target.as_deref()) {
            if let Some(format) = img.disk() {
                let disk = self.system.disk_path(&img.fingerprint);
                if !disk.is_file() {
                    return Err(ImageError::Store(format!("disk image {}: no disk", img.fingerprint)));
                }
                return Ok(Resolved {
                    kind: ImageKind::Disk(format),
                    name: img.filename.clone(),
                    fingerprint: img.fingerprint.clone(),
                    rootfs: disk,
                    config: serde_json::to_value(&img).unwrap_or(Value::Null),
                    properties: img.properties,
                });
            }
            let rootfs = self.system.rootfs(&img.fingerprint);
            if !rootfs.is_dir() {
                return Err(ImageError::Store(format!("system image {}: no rootfs", img.fingerprint)));
            }
            return Ok(Resolved {
                kind: ImageKind::System,
                name: img.filename.clone(),
                fingerprint: img.fingerprint.clone(),
                rootfs,
                config: serde_json::to_value(&img).unwrap_or(Value::Null),
                properties: img.properties,
            });
        }
        let record = match self.target(src, alias_target)? {
            Target::Local(r) => r,
            Target::Remote { reference, insecure, credentials } => {
                let name = reference.to_string();
                match self.store.inspect(&name) {
                    Ok(r) if reference.digest().is_some() || credentials.is_none() => r,
                    _ => self.pull(&reference, insecure, credentials, progress).await?,
                }
            }
        };
        let store = self.store.clone();
        let rec = record.clone();
        tokio::task::spawn_blocking(move || {
            let rootfs = skiff_oci::bundle::cached_rootfs(&store, &rec, &UnpackOptions::default())
                .map_err(|e| ImageError::Store(format!("unpacking {}: {}", rec.name, chain(&e))))?;
            let config = skiff_oci::bundle::image_config(&store, &rec)
                .map_err(|e| ImageError::Store(format!("{}: {}", rec.name, chain(&e))))?;
            let spec = skiff_oci::spec::run_spec(&config, &rootfs, &Default::default())
                .map_err(|e| ImageError::Store(format!("{}: run spec: {}", rec.name, chain(&e))))?;
            let runtime = spec
                .to_runtime_spec(&rec.name)
                .map_err(|e| ImageError::Store(format!("{}: runtime spec: {e}", rec.name)))?;
            let config = serde_json::to_value(runtime).map_err(|e| ImageError::Store(e.to_string()))?;
            Ok(Resolved {
                kind: ImageKind::Oci,
                name: rec.name.clone(),
                fingerprint: rec.manifest.hex().to_string(),
                rootfs,
                config,
                properties: Default::default(),
            })
        })
        .await
        .map_err(|e| ImageError::Store(format!("unpack task: {e}")))?
    }

    async fn pull(
        &self,
        reference: &Reference,
        insecure: bool,
        credentials: Option<Credentials>,
        progress: Arc<dyn Fn(Value) + Send + Sync>,
    ) -> Result<ImageRecord, ImageError> {
        let tracker = Arc::new(Mutex::new(PullProgress::default()));
        let t = tracker.clone();
        let opts = PullOptions {
            insecure,
            credentials,
            progress: Some(Arc::new(move |p: &Progress| {
                let mut st = t.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(meta) = st.feed(p) {
                    progress(meta);
                }
            })),
            ..PullOptions::default()
        };
        // The pull's future is not Send (a higher-ranked closure inside
        // oci-client), so it runs on a blocking thread of its own.
        let (store, r) = (self.store.clone(), reference.clone());
        let handle = tokio::runtime::Handle::current();
        let report = tokio::task::spawn_blocking(move || handle.block_on(skiff_oci::pull::pull(&store, &r, &opts)))
            .await
            .map_err(|e| ImageError::Store(format!("pull task: {e}")))?
            .map_err(|e| ImageError::Pull { reference: reference.to_string(), why: chain(&e) })?;
        Ok(report.record)
    }

    /// Deletes an image unless instances use it.
    pub fn delete(&self, rec: &ImageRecord) -> Result<(), ImageError> {
        let users = self.store.users(&rec.manifest);
        if !users.is_empty() {
            return Err(ImageError::InUse { fingerprint: rec.manifest.hex().into(), users: users.join(", ") });
        }
        for r in self.list()?.into_iter().filter(|r| r.manifest == rec.manifest) {
            self.store.delete(&r.name).map_err(|e| ImageError::Store(chain(&e)))?;
        }
        Ok(())
    }
}

/// `base64(user:password)` → credentials.
fn decode_secret(s: &str) -> Result<Credentials, ImageError> {
    let bad = || ImageError::BadSource("source.secret must be base64 of user:password".into());
    let raw = base64::engine::general_purpose::STANDARD.decode(s.trim()).map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let (u, p) = text.split_once(':').ok_or_else(bad)?;
    Ok(Credentials::Basic(u.into(), p.into()))
}

/// Turns pull progress into operation metadata, at most every 200 ms.
#[derive(Default)]
struct PullProgress {
    total: u64,
    done: u64,
    layers: Vec<(String, u64)>,
    last: Option<Instant>,
    started: Option<Instant>,
}

impl PullProgress {
    fn feed(&mut self, p: &Progress) -> Option<Value> {
        let now = Instant::now();
        let started = *self.started.get_or_insert(now);
        let force = match p {
            Progress::Start { total, present, .. } => {
                self.total = *total;
                self.done = *present;
                true
            }
            Progress::Bytes { digest, n } => {
                self.done += n;
                let d = digest.to_string();
                match self.layers.iter_mut().find(|(k, _)| *k == d) {
                    Some(l) => l.1 += n,
                    None => self.layers.push((d, *n)),
                }
                false
            }
            Progress::LayerDone { .. } => true,
        };
        if !force && self.last.is_some_and(|l| now.duration_since(l) < Duration::from_millis(200)) {
            return None;
        }
        self.last = Some(now);
        let secs = now.duration_since(started).as_secs_f64().max(0.001);
        let percent = (self.done * 100).checked_div(self.total).unwrap_or(0).min(100);
        let speed = (self.done as f64 / secs) as u64;
        Some(json!({
            "progress": {"stage": "pull", "percent": percent.to_string(), "speed": speed.to_string()},
            "create_instance_from_image_unpack_progress": format!("Pull: {percent}% ({} MB/s)", speed / 1_000_000),
            "pull": {
                "total": self.total,
                "done": self.done,
                "layers": self.layers.iter().map(|(d, n)| json!({"digest": d, "done": n})).collect::<Vec<_>>(),
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets() {
        let s = base64::engine::general_purpose::STANDARD.encode("alice:pw:x");
        assert!(matches!(decode_secret(&s), Ok(Credentials::Basic(u, p)) if u == "alice" && p == "pw:x"));
        assert!(decode_secret("!!").is_err());
    }

    #[test]
    fn sources() {
        let dir = tempfile::tempdir().unwrap();
        let images = Images::open(dir.path().to_path_buf()).unwrap();
        let src = |alias: &str, server: Option<&str>| InstanceSource {
            kind: "image".into(),
            alias: Some(alias.into()),
            server: server.map(Into::into),
            protocol: Some("oci".into()),
            ..Default::default()
        };
        match images.target(&src("test/web:1", Some("http://127.0.0.1:5000")), None).unwrap() {
            Target::Remote { reference, insecure, .. } => {
                assert_eq!(reference.registry(), "127.0.0.1:5000");
                assert!(insecure);
            }
            Target::Local(_) => panic!("expected a remote"),
        }
        match images.target(&src("nginx", None), None).unwrap() {
            Target::Remote { reference, insecure, .. } => {
                assert_eq!(reference.to_string(), "docker.io/library/nginx:latest");
                assert!(!insecure);
            }
            Target::Local(_) => panic!("expected a remote"),
        }
        let none = InstanceSource { kind: "none".into(), ..Default::default() };
        assert!(matches!(images.target(&none, None), Err(ImageError::BadSource(_))));
        let bad = InstanceSource { protocol: Some("simplestreams".into()), ..src("x", None) };
        assert!(matches!(images.target(&bad, None), Err(ImageError::BadSource(_))));
        assert!(matches!(images.target(&src("UPPER/Case", None), None), Err(ImageError::BadReference { .. })));
        assert!(matches!(images.by_fingerprint("abc"), Err(ImageError::NotFound(_))));
    }
}
