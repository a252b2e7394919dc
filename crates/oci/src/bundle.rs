//! From a stored image to a rootfs (and an OCI bundle: `rootfs/` plus
//! `config.json`). A rootfs is unpacked into a work directory beside its
//! destination and renamed into place only when every layer applied and
//! every layer's uncompressed digest matched the config's `diff_ids`; a
//! failure removes the work directory. So a rootfs that exists is complete.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::digest::Digest;
use crate::manifest::{self, ManifestError};
use crate::spec::{self, Overrides, RunSpec, SpecError};
use crate::store::{ImageRecord, Store, StoreError};
use crate::unpack::{LayerStats, UnpackError, UnpackOptions, Unpacker};

/// A rootfs or bundle that could not be made; names the image.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A layer failed to apply.
    #[error("image {image}: layer {digest}")]
    Layer {
        /// The image.
        image: String,
        /// The layer blob.
        digest: Digest,
        /// Why.
        #[source]
        source: UnpackError,
    },
    /// A layer's uncompressed content is not what the config says.
    #[error("image {image}: layer {digest}: uncompressed digest {actual} is not the config's diff_id {expected}")]
    DiffId {
        /// The image.
        image: String,
        /// The layer blob.
        digest: Digest,
        /// The diff_id in the config.
        expected: String,
        /// What the tar hashed to.
        actual: Digest,
    },
    /// Reading from the store failed.
    #[error("image {image}")]
    Store {
        /// The image.
        image: String,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// The image config is unusable.
    #[error("image {image}: config")]
    Config {
        /// The image.
        image: String,
        /// Why.
        #[source]
        source: ManifestError,
    },
    /// The run spec could not be made.
    #[error("image {image}: run spec")]
    Spec {
        /// The image.
        image: String,
        /// Why.
        #[source]
        source: SpecError,
    },
    /// The pull feeding the unpack failed; the unpack was abandoned.
    #[error("image {image}: unpack abandoned: the pull failed")]
    Aborted {
        /// The image.
        image: String,
    },
    /// The pull failed.
    #[error(transparent)]
    Pull(#[from] crate::pull::PullError),
    /// The destination is already there.
    #[error("{0} already exists")]
    Exists(PathBuf),
    /// Creating the destination failed.
    #[error("creating {path}")]
    Io {
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Called after each layer with its index and what it did.
pub type LayerProgress<'a> = &'a (dyn Fn(usize, &LayerStats) + Sync);

/// Blocks until a layer's blob is in the store; `false` to give up.
type Wait<'a> = &'a dyn Fn(&crate::manifest::Descriptor) -> bool;

static SEQ: AtomicU64 = AtomicU64::new(0);

/// Reads and parses an image's config.
pub fn image_config(
    store: &Store,
    rec: &ImageRecord,
) -> Result<manifest::ImageConfig, BundleError> {
    let bytes = store
        .read_blob(&rec.config.digest)
        .map_err(|source| BundleError::Store {
            image: rec.name.clone(),
            source,
        })?;
    manifest::parse_config(&bytes).map_err(|source| BundleError::Config {
        image: rec.name.clone(),
        source,
    })
}

/// Applies all layers of `rec` into the existing, empty directory `dir`.
fn apply_layers(
    store: &Store,
    rec: &ImageRecord,
    dir: &Path,
    opts: &UnpackOptions,
    progress: Option<LayerProgress>,
    wait: Wait,
) -> Result<(), BundleError> {
    let config = image_config(store, rec)?;
    let diff_ids = config.rootfs.map(|r| r.diff_ids).unwrap_or_default();
    let mut u = Unpacker::new(dir, opts.clone());
    for (i, layer) in rec.layers.iter().enumerate() {
        let layer_err = |source| BundleError::Layer {
            image: rec.name.clone(),
            digest: layer.digest.clone(),
            source,
        };
        if !wait(layer) {
            return Err(BundleError::Aborted {
                image: rec.name.clone(),
            });
        }
        let f = store
            .open_blob(&layer.digest)
            .map_err(|source| BundleError::Store {
                image: rec.name.clone(),
                source,
            })?;
        let stats = u
            .apply(std::io::BufReader::with_capacity(1 << 20, f))
            .map_err(layer_err)?;
        if let (Some(expected), Some(actual)) = (diff_ids.get(i), &stats.diff_id) {
            if expected != &actual.to_string() {
                return Err(BundleError::DiffId {
                    image: rec.name.clone(),
                    digest: layer.digest.clone(),
                    expected: expected.clone(),
                    actual: actual.clone(),
                });
            }
        }
        if let Some(p) = progress {
            p(i, &stats);
        }
    }
    u.finish().map_err(|source| BundleError::Layer {
        image: rec.name.clone(),
        digest: rec.manifest.clone(),
        source,
    })
}

/// Unpacks `rec` into `dest` (which must not exist) atomically: a work
/// directory beside it, renamed into place when complete.
pub fn unpack_rootfs(
    store: &Store,
    rec: &ImageRecord,
    dest: &Path,
    opts: &UnpackOptions,
    progress: Option<LayerProgress>,
) -> Result<(), BundleError> {
    unpack_rootfs_with(store, rec, dest, opts, progress, &|_| true)
}

fn unpack_rootfs_with(
    store: &Store,
    rec: &ImageRecord,
    dest: &Path,
    opts: &UnpackOptions,
    progress: Option<LayerProgress>,
    wait: Wait,
) -> Result<(), BundleError> {
    if fs::symlink_metadata(dest).is_ok() {
        return Err(BundleError::Exists(dest.to_path_buf()));
    }
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let work = parent.join(format!(
        ".{name}.partial-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    build_then_rename(store, rec, &work, dest, opts, progress, wait)
}

fn build_then_rename(
    store: &Store,
    rec: &ImageRecord,
    work: &Path,
    dest: &Path,
    opts: &UnpackOptions,
    progress: Option<LayerProgress>,
    wait: Wait,
) -> Result<(), BundleError> {
    // The guest's `/`: 0755 whatever the umask; the image cannot change it
    // (see the policy in `unpack`).
    fs::create_dir(work)
        .and_then(|()| fs::set_permissions(work, fs::Permissions::from_mode(0o755)))
        .map_err(|source| BundleError::Io {
            path: work.to_path_buf(),
            source,
        })?;
    let r = apply_layers(store, rec, work, opts, progress, wait).and_then(|()| {
        fs::rename(work, dest).map_err(|source| match source.raw_os_error() {
            Some(libc::EEXIST) | Some(libc::ENOTEMPTY) => BundleError::Exists(dest.to_path_buf()),
            _ => BundleError::Io {
                path: dest.to_path_buf(),
                source,
            },
        })
    });
    if r.is_err() {
        let _ = fs::remove_dir_all(work);
    }
    r
}

/// The cached rootfs of `rec` in the store (keyed by manifest digest),
/// unpacked on first use. Treat it as read-only: instances get copies or
/// overlays of it.
pub fn cached_rootfs(
    store: &Store,
    rec: &ImageRecord,
    opts: &UnpackOptions,
) -> Result<PathBuf, BundleError> {
    let dest = store.rootfs_path(&rec.manifest);
    if dest.is_dir() {
        return Ok(dest);
    }
    let work = store.root().join("tmp").join(format!(
        "rootfs-{}-{}-{}",
        rec.manifest.hex(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    match build_then_rename(store, rec, &work, &dest, opts, None, &|_| true) {
        // Someone else finished first: theirs is as good.
        Err(BundleError::Exists(_)) => Ok(dest),
        Err(e) => Err(e),
        Ok(()) => Ok(dest),
    }
}

/// Writes an OCI bundle: `dest/rootfs/` and `dest/config.json` whose
/// `process` holds the resolved argv, env, cwd and user. `dest` is created
/// if needed; `dest/rootfs` and `dest/config.json` must not exist. On
/// failure neither is left behind.
pub fn write_bundle(
    store: &Store,
    rec: &ImageRecord,
    dest: &Path,
    over: &Overrides,
    opts: &UnpackOptions,
    progress: Option<LayerProgress>,
) -> Result<RunSpec, BundleError> {
    prepare_dest(dest)?;
    unpack_rootfs(store, rec, &dest.join("rootfs"), opts, progress)?;
    finish_bundle(store, rec, dest, over)
}

/// Checks that `dest/rootfs` and `dest/config.json` do not exist, and
/// creates `dest` with mode 0700 (made so if it exists): the rootfs inside
/// holds the image's setuid files, which no other host user may reach.
fn prepare_dest(dest: &Path) -> Result<(), BundleError> {
    for p in [dest.join("rootfs"), dest.join("config.json")] {
        if fs::symlink_metadata(&p).is_ok() {
            return Err(BundleError::Exists(p));
        }
    }
    fs::create_dir_all(dest)
        .and_then(|()| fs::set_permissions(dest, fs::Permissions::from_mode(0o700)))
        .map_err(|source| BundleError::Io {
            path: dest.to_path_buf(),
            source,
        })
}

/// Writes `config.json` beside an unpacked `rootfs`; on failure removes
/// both.
fn finish_bundle(
    store: &Store,
    rec: &ImageRecord,
    dest: &Path,
    over: &Overrides,
) -> Result<RunSpec, BundleError> {
    let rootfs = dest.join("rootfs");
    let cfg_path = dest.join("config.json");
    let r = (|| {
        let config = image_config(store, rec)?;
        let spec_err = |source| BundleError::Spec {
            image: rec.name.clone(),
            source,
        };
        let rs = spec::run_spec(&config, &rootfs, over).map_err(spec_err)?;
        if rs.args.is_empty() {
            log::warn!(
                "{}: the image names no command; config.json has empty process.args",
                rec.name
            );
        }
        rs.write_runtime_spec(dest, &rec.name).map_err(spec_err)?;
        Ok(rs)
    })();
    if r.is_err() {
        let _ = fs::remove_dir_all(&rootfs);
        let _ = fs::remove_file(&cfg_path);
    }
    r
}

/// Where the layers of a pipelined pull stand.
struct Gate {
    aborted: Mutex<bool>,
    cv: Condvar,
}

/// Pulls `image` and writes a bundle at `dest` like [`write_bundle`], but
/// unpacks each layer as soon as it and those below it are in the store,
/// while later layers are still downloading.
pub async fn pull_bundle(
    store: &Store,
    image: &crate::Reference,
    opts: &crate::pull::PullOptions,
    dest: &Path,
    over: &Overrides,
    uopts: &UnpackOptions,
) -> Result<(crate::pull::PullReport, RunSpec), BundleError> {
    prepare_dest(dest)?;
    let gate = Arc::new(Gate {
        aborted: Mutex::new(false),
        cv: Condvar::new(),
    });
    let mut popts = opts.clone();
    let user = opts.progress.clone();
    let g = gate.clone();
    popts.progress = Some(Arc::new(move |p: &crate::pull::Progress| {
        if let Some(u) = &user {
            u(p);
        }
        if matches!(p, crate::pull::Progress::LayerDone { .. }) {
            g.cv.notify_all();
        }
    }));
    let worker: Mutex<Option<std::thread::JoinHandle<Result<(), BundleError>>>> = Mutex::new(None);
    let on_plan = |rec: &ImageRecord| {
        let (store, rec, gate, uopts) = (store.clone(), rec.clone(), gate.clone(), uopts.clone());
        let rootfs = dest.join("rootfs");
        let h = std::thread::spawn(move || {
            let wait = |l: &crate::manifest::Descriptor| {
                let mut aborted = gate.aborted.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if store.has_blob(&l.digest, l.size) {
                        return true;
                    }
                    if *aborted {
                        return false;
                    }
                    // The timeout covers a notification sent between the
                    // check and the wait.
                    aborted = gate
                        .cv
                        .wait_timeout(aborted, Duration::from_millis(200))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            };
            unpack_rootfs_with(&store, &rec, &rootfs, &uopts, None, &wait)
        });
        *worker.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
    };
    let pulled = crate::pull::pull_planned(store, image, &popts, &on_plan).await;
    if pulled.is_err() {
        *gate.aborted.lock().unwrap_or_else(|e| e.into_inner()) = true;
        gate.cv.notify_all();
    }
    let handle = worker.lock().unwrap_or_else(|e| e.into_inner()).take();
    let unpacked = handle.map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
    let report = pulled?;
    match unpacked {
        Some(Ok(())) => {}
        Some(Err(e)) => return Err(e),
        // The plan is always made before a successful pull returns.
        None => unpack_rootfs(store, &report.record, &dest.join("rootfs"), uopts, None)?,
    }
    let rs = finish_bundle(store, &report.record, dest, over)?;
    Ok((report, rs))
}

#[cfg(test)]
#[path = "bundle_tests.rs"]
mod tests;
