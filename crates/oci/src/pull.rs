//! Pulling an image from a registry into the [`Store`] with `oci-client`.
//!
//! Manifest (and index) first, then the config, then the layers the store
//! lacks, several at a time. Each blob streams into `ingest/` and is moved
//! into `blobs/` only once its size and digest check out; a partial
//! download is kept and resumed with a range request next time. The image
//! record is written last, so a failed pull leaves no image.

use std::sync::{Arc, Once};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{StreamExt, TryStreamExt};
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::RegistryOperation;

use crate::auth::{self, AuthError, Credentials};
use crate::digest::Digest;
use crate::fetch::{self, FetchError, Fetcher};
use crate::manifest::{self, Descriptor, Document, ManifestError, Platform};
use crate::reference::Reference;
use crate::store::{ImageRecord, Store, StoreError};

/// How often a broken-off blob download is resumed within one pull.
const RETRIES: u32 = 3;

/// A pull that failed; names the image, the cause follows in the chain.
#[derive(Debug, thiserror::Error)]
#[error("pulling {image}")]
pub struct PullError {
    /// The image as given.
    pub image: String,
    /// What went wrong.
    #[source]
    pub cause: PullCause,
}

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullCause {
    /// Reading credentials failed.
    #[error("credentials")]
    Auth(#[source] AuthError),
    /// The registry refused or could not be reached.
    #[error("registry {registry}")]
    Registry {
        /// The registry.
        registry: String,
        /// The client's error.
        #[source]
        source: OciDistributionError,
    },
    /// A blob download failed.
    #[error("blob {digest}")]
    Blob {
        /// The blob.
        digest: Digest,
        /// The client's error.
        #[source]
        source: OciDistributionError,
    },
    /// A blob download broke off.
    #[error("blob {digest}: download interrupted (kept for resume)")]
    Interrupted {
        /// The blob.
        digest: Digest,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A manifest, index or config could not be read (too large, longer
    /// than declared, an error answer).
    #[error("registry {registry}")]
    Fetch {
        /// The registry.
        registry: String,
        /// Why.
        #[source]
        source: FetchError,
    },
    /// The registry announces a blob longer than its descriptor says.
    #[error("blob {digest}: the registry announces {announced} bytes, more than the {declared} its descriptor declares")]
    BlobTooLong {
        /// The blob.
        digest: Digest,
        /// The descriptor's size (less what was resumed).
        declared: u64,
        /// The `Content-Length`.
        announced: u64,
    },
    /// The manifest or config is unusable.
    #[error("manifest")]
    Manifest(#[source] ManifestError),
    /// The manifest the registry sent is not the one asked for.
    #[error("manifest digest mismatch: asked for {expected}, got {actual}")]
    ManifestDigest {
        /// Digest asked for.
        expected: Digest,
        /// Digest of what came.
        actual: Digest,
    },
    /// Storing failed (digest or size mismatch, disk full, …).
    #[error("store")]
    Store(#[source] StoreError),
}

/// A progress event. Byte counts are of compressed blobs as transferred.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The manifest is known: how much there is to fetch.
    Start {
        /// Layers in the image.
        layers: usize,
        /// Total layer bytes.
        total: u64,
        /// Layer bytes already complete in the store (resumed partial
        /// downloads are reported as `Bytes` when they resume).
        present: u64,
    },
    /// Bytes arrived for a blob.
    Bytes {
        /// The blob.
        digest: Digest,
        /// How many.
        n: u64,
    },
    /// A layer blob is complete and verified.
    LayerDone {
        /// The blob.
        digest: Digest,
    },
}

/// Where progress goes.
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// How to pull.
#[derive(Clone)]
pub struct PullOptions {
    /// Allow plain http for this registry (always allowed for loopback).
    pub insecure: bool,
    /// The platform to choose from a multi-arch index.
    pub platform: Platform,
    /// Credentials; when `None`, Docker's config.json is consulted, then
    /// anonymous access.
    pub credentials: Option<Credentials>,
    /// The Docker config to read (default location when `None`).
    pub docker_config: Option<std::path::PathBuf>,
    /// Layers fetched at once.
    pub max_concurrent: usize,
    /// Progress sink.
    pub progress: Option<ProgressFn>,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self {
            insecure: false,
            platform: Platform::host(),
            credentials: None,
            docker_config: None,
            max_concurrent: 4,
            progress: None,
        }
    }
}

/// What a pull did.
#[derive(Debug, Clone)]
pub struct PullReport {
    /// The stored image.
    pub record: ImageRecord,
    /// Layer bytes downloaded in this pull.
    pub fetched: u64,
    /// Layer bytes of partial downloads that were resumed, not refetched.
    pub resumed: u64,
    /// Layers already complete in the store.
    pub reused: usize,
}

/// A connected registry client for one image.
pub struct Registry {
    client: oci_client::Client,
    auth: RegistryAuth,
    image: Reference,
    scheme: &'static str,
    fetcher: std::sync::OnceLock<Fetcher>,
}

fn install_crypto() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Another library may have installed one already; either is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

impl Registry {
    /// A client for `image`'s registry with credentials resolved.
    pub fn new(image: &Reference, opts: &PullOptions) -> Result<Self, PullCause> {
        install_crypto();
        let plain = opts.insecure || image.is_local();
        let protocol = if plain {
            ClientProtocol::HttpsExcept(vec![image.registry().to_string()])
        } else {
            ClientProtocol::Https
        };
        let client = oci_client::Client::new(ClientConfig {
            protocol,
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(30)),
            read_timeout: Some(Duration::from_secs(120)),
            max_concurrent_download: opts.max_concurrent.max(1),
            ..Default::default()
        });
        let creds = match &opts.credentials {
            Some(c) => Some(c.clone()),
            None => auth::lookup(image.registry(), opts.docker_config.as_deref())
                .map_err(PullCause::Auth)?,
        };
        Ok(Self {
            client,
            auth: creds.map_or(RegistryAuth::Anonymous, |c| c.to_client()),
            image: image.clone(),
            scheme: if plain { "http" } else { "https" },
            fetcher: std::sync::OnceLock::new(),
        })
    }

    /// The capped reader of manifests and configs, with the credentials
    /// `oci-client` negotiates (and keeps for the layer downloads).
    async fn fetcher(&self) -> Result<&Fetcher, PullCause> {
        if let Some(f) = self.fetcher.get() {
            return Ok(f);
        }
        let r = self.image.to_client();
        let token = self
            .client
            .auth(&r, &self.auth, RegistryOperation::Pull)
            .await
            .map_err(|e| self.registry_err(e))?;
        let auth = match (token, &self.auth) {
            (Some(t), _) => fetch::Auth::Bearer(t),
            (None, RegistryAuth::Basic(u, p)) => fetch::Auth::Basic(u.clone(), p.clone()),
            _ => fetch::Auth::Anonymous,
        };
        let f = Fetcher::new(self.scheme, r.resolve_registry(), r.repository(), auth);
        Ok(self.fetcher.get_or_init(|| f))
    }

    fn fetch_err(&self, source: FetchError) -> PullCause {
        PullCause::Fetch {
            registry: self.image.registry().to_string(),
            source,
        }
    }

    fn registry_err(&self, source: OciDistributionError) -> PullCause {
        PullCause::Registry {
            registry: self.image.registry().to_string(),
            source,
        }
    }

    /// Fetches a manifest or index (at most [`fetch::MAX_MANIFEST`]);
    /// pinned to `digest` when given (and then verified against it), of at
    /// most `size` bytes when a descriptor says.
    async fn document(
        &self,
        digest: Option<&Digest>,
        size: Option<u64>,
    ) -> Result<(Document, Vec<u8>, Digest), PullCause> {
        let r = match digest {
            Some(d) => self.image.with_digest(d.clone()),
            None => self.image.clone(),
        };
        let at = match (r.digest(), r.tag()) {
            (Some(d), _) => d.to_string(),
            (None, t) => t.unwrap_or(crate::reference::DEFAULT_TAG).to_string(),
        };
        let body = self
            .fetcher()
            .await?
            .get(
                &format!("manifests/{at}"),
                manifest::ACCEPTED_MANIFESTS,
                "manifest",
                fetch::MAX_MANIFEST,
                size,
            )
            .await
            .map_err(|e| self.fetch_err(e))?;
        let bytes = body.bytes;
        let actual = Digest::sha256_of(&bytes);
        if let Some(expected) = r.digest() {
            let check = match expected.algorithm() {
                crate::digest::Algorithm::Sha256 => actual.clone(),
                _ => {
                    let mut h = expected.hasher();
                    h.update(&bytes);
                    h.finish()
                }
            };
            if &check != expected {
                return Err(PullCause::ManifestDigest {
                    expected: expected.clone(),
                    actual: check,
                });
            }
        }
        let doc = manifest::parse_document(&bytes, body.content_type.as_deref())
            .map_err(PullCause::Manifest)?;
        let digest = r.digest().cloned().unwrap_or(actual);
        Ok((doc, bytes, digest))
    }

    /// Resolves the image to one platform's manifest: `(index digest and
    /// bytes if any, manifest digest, manifest bytes, manifest)`.
    pub async fn resolve(&self, platform: &Platform) -> Result<Resolved, PullCause> {
        let (doc, bytes, digest) = self.document(self.image.digest(), None).await?;
        match doc {
            Document::Manifest(m) => Ok(Resolved {
                index: None,
                digest,
                bytes,
                manifest: m,
            }),
            Document::Index(ix) => {
                let d = manifest::select_platform(&ix, platform).map_err(PullCause::Manifest)?;
                let (doc2, bytes2, digest2) = self.document(Some(&d.digest), Some(d.size)).await?;
                let Document::Manifest(m) = doc2 else {
                    return Err(PullCause::Manifest(ManifestError::MediaType(
                        "nested index".into(),
                    )));
                };
                Ok(Resolved {
                    index: Some((digest, bytes)),
                    digest: digest2,
                    bytes: bytes2,
                    manifest: m,
                })
            }
        }
    }

    /// Downloads a config into memory: at most [`fetch::MAX_CONFIG`] and
    /// its descriptor's size. The caller checks the digest.
    pub async fn small_blob(&self, d: &Descriptor) -> Result<Vec<u8>, PullCause> {
        let body = self
            .fetcher()
            .await?
            .get(
                &format!("blobs/{}", d.digest),
                &[],
                "image config",
                fetch::MAX_CONFIG,
                Some(d.size),
            )
            .await
            .map_err(|e| self.fetch_err(e))?;
        Ok(body.bytes)
    }

    /// Downloads a blob into the store, resuming a partial download.
    /// Returns `(bytes fetched, bytes resumed)`.
    async fn blob_to_store(
        &self,
        store: &Store,
        d: &Descriptor,
        progress: Option<&ProgressFn>,
        first_attempt: bool,
    ) -> Result<(u64, u64), PullCause> {
        // Another pull (this process or another) fetching the same blob:
        // wait for it, then use its result or take over.
        let mut w = loop {
            match store.ingest(&d.digest, d.size) {
                Ok(w) => break w,
                Err(StoreError::Busy(_)) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if store.has_blob(&d.digest, d.size) {
                        return Ok((0, 0));
                    }
                }
                Err(e) => return Err(PullCause::Store(e)),
            }
        };
        if store.has_blob(&d.digest, d.size) {
            // Committed by the other pull just before we opened (and so
            // re-created) the partial file.
            w.abandon();
            return Ok((0, 0));
        }
        let cd = client_desc(d);
        let r = self.image.to_client();
        let mut resumed = w.offset();
        if let (Some(p), true) = (progress, resumed > 0 && first_attempt) {
            p(&Progress::Bytes {
                digest: d.digest.clone(),
                n: resumed,
            });
        }
        let blob_err = |source| PullCause::Blob {
            digest: d.digest.clone(),
            source,
        };
        let stream = if resumed > 0 && resumed < d.size {
            match self
                .client
                .pull_blob_stream_partial(&r, &cd, resumed, None)
                .await
                .map_err(blob_err)?
            {
                BlobResponse::Partial(s) => s,
                BlobResponse::Full(s) => {
                    resumed = 0;
                    w.restart().map_err(PullCause::Store)?;
                    s
                }
            }
        } else if resumed == d.size {
            // Complete but never committed: verify and move into place.
            w.commit().map_err(PullCause::Store)?;
            return Ok((0, resumed));
        } else {
            self.client
                .pull_blob_stream(&r, &cd)
                .await
                .map_err(blob_err)?
        };
        // More than the descriptor leaves is refused before it is read
        // (and cut off by the store's writer if no length is announced).
        if let Some(announced) = stream.content_length {
            let declared = d.size.saturating_sub(resumed);
            if announced > declared {
                return Err(PullCause::BlobTooLong {
                    digest: d.digest.clone(),
                    declared,
                    announced,
                });
            }
        }
        let mut stream = stream.into_stream();
        let mut fetched = 0u64;
        loop {
            match stream.try_next().await {
                Ok(Some(chunk)) => {
                    w.write(&chunk).map_err(PullCause::Store)?;
                    fetched += chunk.len() as u64;
                    if let Some(p) = progress {
                        p(&Progress::Bytes {
                            digest: d.digest.clone(),
                            n: chunk.len() as u64,
                        });
                    }
                }
                Ok(None) => break,
                Err(source) => {
                    // All bytes in but the client's own check failed: ours
                    // names the mismatch (and discards the partial file).
                    if w.offset() == d.size {
                        w.commit().map_err(PullCause::Store)?;
                        return Ok((fetched, resumed));
                    }
                    // The body ended (the client checks the digest at the
                    // end) short of the announced size: a truncated blob,
                    // not an interruption. Nothing worth resuming.
                    let body_ended = source
                        .get_ref()
                        .is_some_and(|e| e.is::<oci_client::errors::DigestError>());
                    if body_ended {
                        let actual = w.offset();
                        w.abandon();
                        return Err(PullCause::Store(StoreError::SizeMismatch {
                            digest: d.digest.clone(),
                            expected: d.size,
                            actual,
                        }));
                    }
                    return Err(PullCause::Interrupted {
                        digest: d.digest.clone(),
                        source,
                    });
                }
            }
        }
        w.commit().map_err(PullCause::Store)?;
        Ok((fetched, resumed))
    }
}

/// An image resolved to one platform.
pub struct Resolved {
    /// The index (digest, bytes) when the reference named one.
    pub index: Option<(Digest, Vec<u8>)>,
    /// The manifest's digest.
    pub digest: Digest,
    /// The manifest as served.
    pub bytes: Vec<u8>,
    /// The manifest.
    pub manifest: manifest::Manifest,
}

fn client_desc(d: &Descriptor) -> OciDescriptor {
    OciDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.to_string(),
        size: d.size as i64,
        ..Default::default()
    }
}

/// Pulls `image` into `store`.
pub async fn pull(
    store: &Store,
    image: &Reference,
    opts: &PullOptions,
) -> Result<PullReport, PullError> {
    pull_inner(store, image, opts, None)
        .await
        .map_err(|cause| PullError {
            image: image.to_string(),
            cause,
        })
}

/// Like [`pull`], and calls `on_plan` with the image's record (not yet
/// saved) once manifest and config are in, before the layers are fetched:
/// the caller can start unpacking layers as they land in the store
/// ([`crate::bundle::pull_bundle`] does).
pub async fn pull_planned(
    store: &Store,
    image: &Reference,
    opts: &PullOptions,
    on_plan: &(dyn Fn(&ImageRecord) + Sync),
) -> Result<PullReport, PullError> {
    pull_inner(store, image, opts, Some(on_plan))
        .await
        .map_err(|cause| PullError {
            image: image.to_string(),
            cause,
        })
}

async fn pull_inner(
    store: &Store,
    image: &Reference,
    opts: &PullOptions,
    on_plan: Option<&(dyn Fn(&ImageRecord) + Sync)>,
) -> Result<PullReport, PullCause> {
    let reg = Registry::new(image, opts)?;
    let res = reg.resolve(&opts.platform).await?;
    for l in &res.manifest.layers {
        manifest::Compression::from_media_type(&l.media_type).map_err(PullCause::Manifest)?;
    }
    // Config.
    let cfg_desc = &res.manifest.config;
    if !store.has_blob(&cfg_desc.digest, cfg_desc.size) {
        let bytes = reg.small_blob(cfg_desc).await?;
        store
            .put_blob(&cfg_desc.digest, Some(cfg_desc.size), &bytes)
            .map_err(PullCause::Store)?;
    }
    let config = manifest::parse_config(
        &store
            .read_blob(&cfg_desc.digest)
            .map_err(PullCause::Store)?,
    )
    .map_err(PullCause::Manifest)?;
    // Layers: unique, missing ones, several at once.
    let mut todo: Vec<Descriptor> = Vec::new();
    let mut reused = 0;
    let mut present = 0;
    for l in &res.manifest.layers {
        if todo.iter().any(|t| t.digest == l.digest) {
            continue;
        }
        if store.has_blob(&l.digest, l.size) {
            reused += 1;
            present += l.size;
        } else {
            todo.push(l.clone());
        }
    }
    let record = ImageRecord {
        name: image.to_string(),
        manifest: res.digest.clone(),
        index: res.index.as_ref().map(|(d, _)| d.clone()),
        config: cfg_desc.clone(),
        layers: res.manifest.layers.clone(),
        platform: Platform {
            architecture: config.architecture.clone(),
            os: config.os.clone(),
            variant: config.variant.clone(),
        },
        stored_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    if let Some(f) = on_plan {
        f(&record);
    }
    if let Some(p) = &opts.progress {
        p(&Progress::Start {
            layers: res.manifest.layers.len(),
            total: res.manifest.layers.iter().map(|l| l.size).sum(),
            present,
        });
    }
    let results: Vec<Result<(u64, u64), PullCause>> = futures::stream::iter(todo.iter())
        .map(|d| {
            let reg = &reg;
            let progress = opts.progress.as_ref();
            async move {
                // A download that breaks off is resumed (range request from
                // what arrived) a few times before the pull gives up.
                let mut attempt = 0;
                let r = loop {
                    match reg.blob_to_store(store, d, progress, attempt == 0).await {
                        Err(PullCause::Interrupted { source, .. }) if attempt < RETRIES => {
                            attempt += 1;
                            log::warn!(
                                "{}: blob {}: {source}; resuming (attempt {attempt})",
                                reg.image,
                                d.digest
                            );
                            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                        }
                        other => break other,
                    }
                };
                if let (Ok(_), Some(p)) = (&r, progress) {
                    p(&Progress::LayerDone {
                        digest: d.digest.clone(),
                    });
                }
                r
            }
        })
        .buffer_unordered(opts.max_concurrent.max(1))
        .collect()
        .await;
    let (mut fetched, mut resumed) = (0, 0);
    for r in results {
        let (f, s) = r?;
        fetched += f;
        resumed += s;
    }
    // Manifest and index last, then the record.
    if let Some((d, b)) = &res.index {
        store.put_blob(d, None, b).map_err(PullCause::Store)?;
    }
    store
        .put_blob(&res.digest, None, &res.bytes)
        .map_err(PullCause::Store)?;
    store.save_image(&record).map_err(PullCause::Store)?;
    Ok(PullReport {
        record,
        fetched,
        resumed,
        reused,
    })
}

/// Fetches manifest and config only (for `inspect` of a remote image).
pub async fn fetch_config(
    image: &Reference,
    opts: &PullOptions,
) -> Result<(Resolved, manifest::ImageConfig), PullError> {
    let wrap = |cause| PullError {
        image: image.to_string(),
        cause,
    };
    let reg = Registry::new(image, opts).map_err(wrap)?;
    let res = reg.resolve(&opts.platform).await.map_err(wrap)?;
    let bytes = reg.small_blob(&res.manifest.config).await.map_err(wrap)?;
    let d = Digest::sha256_of(&bytes);
    if d != res.manifest.config.digest {
        return Err(wrap(PullCause::Store(StoreError::DigestMismatch {
            expected: res.manifest.config.digest.clone(),
            actual: d,
        })));
    }
    let cfg = manifest::parse_config(&bytes).map_err(|e| wrap(PullCause::Manifest(e)))?;
    Ok((res, cfg))
}

#[cfg(test)]
#[path = "pull_tests.rs"]
mod tests;
