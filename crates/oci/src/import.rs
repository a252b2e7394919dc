//! Importing images without a registry: from an OCI image layout directory
//! (`PATH` or `PATH:TAG`) and from a docker-archive tarball (`docker save`,
//! `skopeo copy … docker-archive:`). Blobs are verified (layout) or hashed
//! (archive) on the way into the store; the record is written last.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use crate::digest::Digest;
use crate::fetch::{MAX_CONFIG, MAX_MANIFEST};
use crate::manifest::{self, Compression, Descriptor, Document, ManifestError, Platform};
use crate::reference::Reference;
use crate::store::{ImageRecord, Store, StoreError};
use crate::unpack::guard;

/// An import that failed; names the source, the cause follows.
#[derive(Debug, thiserror::Error)]
#[error("importing {source_path}")]
pub struct ImportError {
    /// What was being imported.
    pub source_path: String,
    /// Why it failed.
    #[source]
    pub cause: ImportCause,
}

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportCause {
    /// Reading the source failed.
    #[error("reading {0}")]
    Io(PathBuf, #[source] std::io::Error),
    /// Neither an OCI layout directory nor a tar file.
    #[error("not an OCI image layout directory (no oci-layout file) nor a docker-archive file")]
    Unknown,
    /// The layout or archive lacks something or is ambiguous.
    #[error("{0}")]
    Layout(String),
    /// A JSON document is malformed.
    #[error("parsing {0}")]
    Json(String, #[source] serde_json::Error),
    /// A document larger than its limit (the same as for a registry:
    /// [`MAX_MANIFEST`] for indexes and manifests, [`MAX_CONFIG`] for
    /// configs).
    #[error("{what}: {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        /// Which document.
        what: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A docker-archive with more symlinks than [`MAX_ARCHIVE_LINKS`].
    #[error("more than {MAX_ARCHIVE_LINKS} symlinks in the archive")]
    TooManyLinks,
    /// A manifest or config is unusable.
    #[error("manifest")]
    Manifest(#[source] ManifestError),
    /// Storing failed (digest mismatch, disk full, …).
    #[error("store")]
    Store(#[source] StoreError),
}

/// Most symlinks remembered from a docker-archive (one per layer in the
/// legacy format; an image has at most 127 layers).
pub const MAX_ARCHIVE_LINKS: usize = 10_000;

/// Reads a whole file of at most `limit` bytes.
fn read_capped(path: &Path, what: &str, limit: u64) -> Result<Vec<u8>, ImportCause> {
    let io = |e| ImportCause::Io(path.to_path_buf(), e);
    let f = File::open(path).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    let mut out = Vec::new();
    f.take(limit + 1).read_to_end(&mut out).map_err(io)?;
    let size = size.max(out.len() as u64);
    if size > limit {
        return Err(ImportCause::TooLarge {
            what: what.to_string(),
            size,
            limit,
        });
    }
    Ok(out)
}

/// Refuses a document whose declared size is over `limit`.
fn check_size(what: impl std::fmt::Display, size: u64, limit: u64) -> Result<(), ImportCause> {
    if size > limit {
        return Err(ImportCause::TooLarge {
            what: what.to_string(),
            size,
            limit,
        });
    }
    Ok(())
}

/// Imports the image at `source` (`DIR`, `DIR:TAG` or `FILE.tar`) under
/// `name` (or a name derived from the source).
pub fn import(
    store: &Store,
    source: &str,
    name: Option<&str>,
    platform: &Platform,
) -> Result<ImageRecord, ImportError> {
    let wrap = |cause| ImportError {
        source_path: source.to_string(),
        cause,
    };
    let (path, tag) = split_tag(source);
    let rec = if path.join("oci-layout").is_file() {
        import_layout(store, &path, tag.as_deref(), name, platform)
    } else if path.is_file() {
        import_archive(store, &path, name)
    } else if !path.exists() {
        Err(ImportCause::Io(
            path.clone(),
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such file or directory (not found)",
            ),
        ))
    } else {
        Err(ImportCause::Unknown)
    }
    .map_err(wrap)?;
    store
        .save_image(&rec)
        .map_err(|e| wrap(ImportCause::Store(e)))?;
    Ok(rec)
}

fn split_tag(source: &str) -> (PathBuf, Option<String>) {
    if Path::new(source).exists() {
        return (PathBuf::from(source), None);
    }
    match source.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') => (PathBuf::from(p), Some(t.to_string())),
        _ => (PathBuf::from(source), None),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn default_name(path: &Path, tag: Option<&str>) -> String {
    let base: String = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let base = base.trim_matches('-');
    let base = if base.is_empty() { "image" } else { base };
    format!("localhost/{base}:{}", tag.unwrap_or("latest"))
}

fn import_layout(
    store: &Store,
    dir: &Path,
    tag: Option<&str>,
    name: Option<&str>,
    platform: &Platform,
) -> Result<ImageRecord, ImportCause> {
    let blob = |d: &Descriptor, what: &str, limit: u64| -> Result<Vec<u8>, ImportCause> {
        check_size(format_args!("{what} {}", d.digest), d.size, limit)?;
        let p = dir
            .join("blobs")
            .join(d.digest.algorithm().name())
            .join(d.digest.hex());
        let mut f = File::open(&p).map_err(|e| ImportCause::Io(p.clone(), e))?;
        store.put_blob_from(d, &mut f).map_err(ImportCause::Store)?;
        store.read_blob(&d.digest).map_err(ImportCause::Store)
    };
    let ip = dir.join("index.json");
    let ib = read_capped(&ip, "index.json", MAX_MANIFEST)?;
    let index: manifest::Index =
        serde_json::from_slice(&ib).map_err(|e| ImportCause::Json(ip.display().to_string(), e))?;
    const REF: &str = "org.opencontainers.image.ref.name";
    let cands: Vec<&Descriptor> = index
        .manifests
        .iter()
        .filter(|d| tag.is_none() || d.annotations.get(REF).map(String::as_str) == tag)
        .collect();
    let top = match (cands.as_slice(), tag) {
        ([one], _) => *one,
        ([], Some(t)) => {
            let tags: Vec<&str> = index
                .manifests
                .iter()
                .filter_map(|d| d.annotations.get(REF).map(String::as_str))
                .collect();
            return Err(ImportCause::Layout(format!(
                "no image tagged {t:?} (tags: {})",
                tags.join(", ")
            )));
        }
        ([], None) => return Err(ImportCause::Layout("index.json lists no images".into())),
        (_, _) => {
            return Err(ImportCause::Layout(
                "several images in the layout: name one as PATH:TAG".into(),
            ));
        }
    };
    let tag_name = tag
        .map(str::to_string)
        .or_else(|| top.annotations.get(REF).cloned());
    let top_bytes = blob(top, "manifest", MAX_MANIFEST)?;
    let (index_digest, mdesc) = match manifest::parse_document(&top_bytes, Some(&top.media_type))
        .map_err(ImportCause::Manifest)?
    {
        Document::Manifest(_) => (None, top.clone()),
        Document::Index(ix) => (
            Some(top.digest.clone()),
            manifest::select_platform(&ix, platform)
                .map_err(ImportCause::Manifest)?
                .clone(),
        ),
    };
    let mbytes = blob(&mdesc, "manifest", MAX_MANIFEST)?;
    let Document::Manifest(m) = manifest::parse_document(&mbytes, Some(&mdesc.media_type))
        .map_err(ImportCause::Manifest)?
    else {
        return Err(ImportCause::Manifest(ManifestError::MediaType(
            "nested index".into(),
        )));
    };
    let cfg = manifest::parse_config(&blob(&m.config, "image config", MAX_CONFIG)?)
        .map_err(ImportCause::Manifest)?;
    for l in &m.layers {
        Compression::from_media_type(&l.media_type).map_err(ImportCause::Manifest)?;
        let p = dir
            .join("blobs")
            .join(l.digest.algorithm().name())
            .join(l.digest.hex());
        let mut f = File::open(&p).map_err(|e| ImportCause::Io(p.clone(), e))?;
        store.put_blob_from(l, &mut f).map_err(ImportCause::Store)?;
    }
    let name = match name {
        Some(n) => n.to_string(),
        None => default_name(dir, tag_name.as_deref()),
    };
    Ok(ImageRecord {
        name,
        manifest: mdesc.digest,
        index: index_digest,
        config: m.config,
        layers: m.layers,
        platform: Platform {
            architecture: cfg.architecture,
            os: cfg.os,
            variant: cfg.variant,
        },
        stored_at: now(),
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn import_archive(
    store: &Store,
    file: &Path,
    name: Option<&str>,
) -> Result<ImageRecord, ImportCause> {
    // The archive's headers are read through the unpacker's guard: a GNU
    // long name or PAX header is capped as in a layer.
    type Archive = tar::Archive<guard::Limit<File>>;
    let open = || -> Result<(Archive, guard::Handles), ImportCause> {
        let f = File::open(file).map_err(|e| ImportCause::Io(file.to_path_buf(), e))?;
        let r = guard::Limit::new(f, u64::MAX, false);
        let h = r.handles();
        Ok((tar::Archive::new(r), h))
    };
    let io = |e| ImportCause::Io(file.to_path_buf(), e);
    // Pass 1: manifest.json (docker writes it last) and symlinked layers.
    let mut manifest_json = None;
    let mut links: HashMap<String, String> = HashMap::new();
    let (mut ar, h) = open()?;
    for e in guard::Entries::new(&mut ar, h).map_err(|_| ImportCause::Unknown)? {
        let mut e = e.map_err(io)?;
        let p = entry_name(&e).map_err(io)?;
        if p == "manifest.json" {
            check_size("manifest.json", e.size(), MAX_MANIFEST)?;
            let mut s = Vec::new();
            e.read_to_end(&mut s).map_err(io)?;
            manifest_json = Some(s);
        } else if e.header().entry_type().is_symlink() {
            if let Some(t) = e.link_name().map_err(io)? {
                let base = Path::new(&p).parent().unwrap_or(Path::new(""));
                if let Some(c) = crate::unpack::clean(&base.join(t)) {
                    if links.len() >= MAX_ARCHIVE_LINKS {
                        return Err(ImportCause::TooManyLinks);
                    }
                    links.insert(p, c.to_string_lossy().into_owned());
                }
            }
        }
        // The rest of the entry, outside the guarded header search.
        std::io::copy(&mut e, &mut std::io::sink()).map_err(io)?;
    }
    let mj = manifest_json.ok_or(ImportCause::Unknown)?;
    let entries: Vec<ArchiveEntry> =
        serde_json::from_slice(&mj).map_err(|e| ImportCause::Json("manifest.json".into(), e))?;
    let entry = entries
        .into_iter()
        .next()
        .ok_or_else(|| ImportCause::Layout("manifest.json lists no images".into()))?;
    let resolve = |p: &str| links.get(p).cloned().unwrap_or_else(|| p.to_string());
    let mut wanted: HashMap<String, Option<(Digest, u64)>> = HashMap::new();
    wanted.insert(resolve(&entry.config), None);
    for l in &entry.layers {
        wanted.insert(resolve(l), None);
    }
    // Pass 2: hash the wanted files into the store.
    let config_path = resolve(&entry.config);
    let (mut ar, h) = open()?;
    for e in guard::Entries::new(&mut ar, h).map_err(io)? {
        let mut e = e.map_err(io)?;
        let p = entry_name(&e).map_err(io)?;
        if p == config_path {
            check_size(&p, e.size(), MAX_CONFIG)?;
        }
        if let Some(slot) = wanted.get_mut(&p) {
            if slot.is_none() && e.header().entry_type().is_file() {
                *slot = Some(
                    store
                        .put_blob_unverified(&mut e)
                        .map_err(ImportCause::Store)?,
                );
            }
        }
        std::io::copy(&mut e, &mut std::io::sink()).map_err(io)?;
    }
    let get = |p: &str| -> Result<(Digest, u64), ImportCause> {
        wanted.get(&resolve(p)).cloned().flatten().ok_or_else(|| {
            ImportCause::Layout(format!(
                "{p} is listed in manifest.json but missing from the archive"
            ))
        })
    };
    let (cd, cs) = get(&entry.config)?;
    let cfg = manifest::parse_config(&store.read_blob(&cd).map_err(ImportCause::Store)?)
        .map_err(ImportCause::Manifest)?;
    let mut layers = Vec::new();
    for l in &entry.layers {
        let (d, size) = get(l)?;
        let mut head = [0u8; 4];
        let n = store
            .open_blob(&d)
            .map_err(ImportCause::Store)?
            .read(&mut head)
            .unwrap_or(0);
        let media_type = match Compression::sniff(&head[..n]) {
            Compression::Gzip => manifest::OCI_LAYER_GZIP,
            Compression::Zstd => manifest::OCI_LAYER_ZSTD,
            Compression::None => manifest::OCI_LAYER_TAR,
        };
        layers.push(Descriptor {
            media_type: media_type.into(),
            digest: d,
            size,
            platform: None,
            annotations: Default::default(),
        });
    }
    let config = Descriptor {
        media_type: manifest::OCI_CONFIG.into(),
        digest: cd,
        size: cs,
        platform: None,
        annotations: Default::default(),
    };
    let m = manifest::Manifest {
        schema_version: 2,
        media_type: Some(manifest::OCI_MANIFEST.into()),
        config: config.clone(),
        layers: layers.clone(),
        annotations: Default::default(),
    };
    let mbytes = serde_json::to_vec(&m).expect("manifest serialises");
    let md = Digest::sha256_of(&mbytes);
    store
        .put_blob(&md, None, &mbytes)
        .map_err(ImportCause::Store)?;
    let name = match (name, entry.repo_tags.as_ref().and_then(|t| t.first())) {
        (Some(n), _) => n.to_string(),
        (None, Some(t)) => Reference::parse(t).map_or_else(|_| t.clone(), |r| r.to_string()),
        (None, None) => default_name(file, None),
    };
    Ok(ImageRecord {
        name,
        manifest: md,
        index: None,
        config,
        layers,
        platform: Platform {
            architecture: cfg.architecture,
            os: cfg.os,
            variant: cfg.variant,
        },
        stored_at: now(),
    })
}

fn entry_name<R: Read>(e: &tar::Entry<'_, R>) -> std::io::Result<String> {
    let p = e.path()?;
    Ok(crate::unpack::clean(&p)
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unpack::tests::layer::Layer;

    fn chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut src = e.source();
        while let Some(x) = src {
            s += &format!(": {x}");
            src = x.source();
        }
        s
    }

    fn import_err(store: &Store, path: &Path) -> String {
        let e = import(store, path.to_str().unwrap(), None, &Platform::host()).unwrap_err();
        chain(&e)
    }

    /// Valid JSON padded to `size` bytes.
    fn padded(json: &str, size: usize) -> Vec<u8> {
        let mut v = json.as_bytes().to_vec();
        v.resize(size, b' ');
        v
    }

    #[test]
    fn oversized_layout_documents_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let lay = dir.path().join("layout");
        std::fs::create_dir_all(lay.join("blobs/sha256")).unwrap();
        std::fs::write(lay.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let index = padded(r#"{"schemaVersion":2,"manifests":[]}"#, 5 << 20);
        std::fs::write(lay.join("index.json"), &index).unwrap();
        let e = import_err(&store, &lay);
        assert!(
            e.contains("index.json") && e.contains("4194304-byte limit"),
            "{e}"
        );
        // A manifest blob of 5 MiB, honestly described.
        let m = padded(
            r#"{"schemaVersion":2,"config":{"digest":"sha256:00","size":1}}"#,
            5 << 20,
        );
        let d = Digest::sha256_of(&m);
        std::fs::write(lay.join("blobs/sha256").join(d.hex()), &m).unwrap();
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{}","digest":"{d}","size":{}}}]}}"#,
            manifest::OCI_MANIFEST,
            m.len()
        );
        std::fs::write(lay.join("index.json"), index).unwrap();
        let e = import_err(&store, &lay);
        assert!(
            e.contains("manifest") && e.contains("4194304-byte limit"),
            "{e}"
        );
    }

    #[test]
    fn oversized_archive_documents_and_headers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let ar = dir.path().join("a.tar");
        let mj = padded("[]", 5 << 20);
        std::fs::write(&ar, Layer::new().file("manifest.json", 0o644, &mj).finish()).unwrap();
        let e = import_err(&store, &ar);
        assert!(
            e.contains("manifest.json") && e.contains("4194304-byte limit"),
            "{e}"
        );
        let l = Layer::new()
            .extension(tar::EntryType::GNULongName, 8 << 20, &vec![b'a'; 8 << 20])
            .file("x", 0o644, b"x")
            .finish();
        std::fs::write(&ar, l).unwrap();
        let e = import_err(&store, &ar);
        assert!(e.contains("GNU long name") && e.contains("limit"), "{e}");
    }
}
