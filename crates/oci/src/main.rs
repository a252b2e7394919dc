//! `skiff-oci`: pull, import, inspect and manage OCI images without a
//! daemon, the way `umoci` or `crane` do.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use skiff_oci::auth::Credentials;
use skiff_oci::pull::{Progress, PullOptions};
use skiff_oci::spec::Overrides;
use skiff_oci::unpack::UnpackOptions;
use skiff_oci::{bundle, import, pull, Platform, Reference, Store};

/// Pull, import and unpack OCI images into runtime bundles (rootfs/ and an
/// OCI runtime config.json), without a daemon.
#[derive(Parser)]
#[command(
    name = "skiff-oci",
    version,
    after_help = "Examples:\n  skiff-oci pull docker.io/library/busybox ./bb\n  skiff-oci pull --insecure registry.lan:5000/app:1 ./app\n  skiff-oci import ./layout:latest ./bundle\n  skiff-oci inspect ghcr.io/org/app@sha256:...\n\nCredentials come from Docker's config.json ($DOCKER_CONFIG or ~/.docker):\nauths entries, credHelpers and credsStore.\nOn failure the exit status is 1 and stderr names the image and the cause."
)]
struct Cli {
    /// Image store directory (default: $SKIFF_OCI_STORE, /var/lib/skiff/oci
    /// as root, else ~/.local/share/skiff/oci).
    #[arg(long, global = true, value_name = "DIR")]
    store: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Pull REF from its registry and write DEST/rootfs and DEST/config.json.
    Pull {
        #[command(flatten)]
        reg: RegistryArgs,
        #[command(flatten)]
        run: RunArgs,
        /// Image reference: nginx, nginx:1.27, ghcr.io/org/app@sha256:…,
        /// localhost:5000/x/y:tag.
        #[arg(value_name = "REF")]
        image: String,
        /// Bundle directory to create (its rootfs/ and config.json must not exist).
        dest: PathBuf,
    },
    /// Pull REF into the store only (no bundle).
    Fetch {
        #[command(flatten)]
        reg: RegistryArgs,
        /// Image reference.
        #[arg(value_name = "REF")]
        image: String,
    },
    /// Import an OCI layout (DIR or DIR:TAG) or a docker-archive tarball and
    /// write DEST/rootfs and DEST/config.json.
    Import {
        #[command(flatten)]
        run: RunArgs,
        /// Name to store the image under (default: derived from PATH).
        #[arg(long)]
        name: Option<String>,
        /// Platform to choose from a multi-arch layout (os/arch[/variant]).
        #[arg(long, value_name = "OS/ARCH")]
        platform: Option<String>,
        /// OCI layout directory (optionally :TAG) or docker-archive file.
        path: String,
        /// Bundle directory to create.
        dest: PathBuf,
    },
    /// Show an image's manifest digest, layers, platform and run spec, as
    /// JSON. Looks in the store first, then asks the registry.
    Inspect {
        #[command(flatten)]
        reg: RegistryArgs,
        /// Image reference (or a stored image name).
        #[arg(value_name = "REF")]
        image: String,
    },
    /// List the images in the store.
    List,
    /// Delete an image from the store (refused while an instance uses it).
    Delete {
        /// Image reference or stored name.
        #[arg(value_name = "REF")]
        image: String,
    },
    /// Remove blobs and rootfs caches no image refers to, and stale work files.
    Prune {
        /// Also drop partial downloads kept for resuming.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Args)]
struct RegistryArgs {
    /// Allow plain http to this registry (always allowed for localhost/127.0.0.0/8).
    #[arg(long)]
    insecure: bool,
    /// Platform to choose from a multi-arch index (default: this host's).
    #[arg(long, value_name = "OS/ARCH")]
    platform: Option<String>,
    /// User name for basic auth (password from $SKIFF_OCI_PASSWORD or stdin);
    /// default: Docker's config.json, then anonymous.
    #[arg(long)]
    username: Option<String>,
    /// Layers fetched at once.
    #[arg(long, default_value_t = 4)]
    jobs: usize,
    /// No progress bar even on a terminal.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct RunArgs {
    /// Override the entrypoint (drops the image's cmd, as in Docker).
    #[arg(long, value_name = "ARG", num_args = 1.., allow_hyphen_values = true)]
    entrypoint: Option<Vec<String>>,
    /// Override the cmd.
    #[arg(long, value_name = "ARG", num_args = 1.., allow_hyphen_values = true)]
    cmd: Option<Vec<String>>,
    /// Extra environment, KEY=value (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Override the working directory.
    #[arg(long)]
    workdir: Option<String>,
    /// Override the user (user, uid, user:group, uid:gid).
    #[arg(long)]
    user: Option<String>,
}

impl RunArgs {
    fn overrides(self) -> Overrides {
        Overrides {
            entrypoint: self.entrypoint,
            cmd: self.cmd,
            env: self.env,
            workdir: self.workdir,
            user: self.user,
        }
    }
}

fn platform(p: Option<&str>) -> Result<Platform> {
    match p {
        None => Ok(Platform::host()),
        Some(s) => Platform::parse(s)
            .with_context(|| format!("malformed platform {s:?} (os/arch[/variant] expected)")),
    }
}

fn pull_options(reg: &RegistryArgs, bar: Option<Arc<Bar>>) -> Result<PullOptions> {
    let credentials = match &reg.username {
        None => None,
        Some(u) => {
            let pw = match std::env::var("SKIFF_OCI_PASSWORD") {
                Ok(p) => p,
                Err(_) => {
                    let mut s = String::new();
                    std::io::stdin()
                        .read_line(&mut s)
                        .context("reading the password from stdin")?;
                    s.trim_end_matches(['\r', '\n']).to_string()
                }
            };
            Some(Credentials::Basic(u.clone(), pw))
        }
    };
    Ok(PullOptions {
        insecure: reg.insecure,
        platform: platform(reg.platform.as_deref())?,
        credentials,
        docker_config: None,
        max_concurrent: reg.jobs.max(1),
        progress: bar.map(|b| Arc::new(move |p: &Progress| b.event(p)) as _),
    })
}

/// A one-line progress bar on stderr.
struct Bar {
    total: AtomicU64,
    done: AtomicU64,
    layers: AtomicUsize,
    layers_done: AtomicUsize,
    last: Mutex<Instant>,
}

impl Bar {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            total: AtomicU64::new(0),
            done: AtomicU64::new(0),
            layers: AtomicUsize::new(0),
            layers_done: AtomicUsize::new(0),
            last: Mutex::new(Instant::now() - Duration::from_secs(1)),
        })
    }

    fn event(&self, p: &Progress) {
        match p {
            Progress::Start {
                layers,
                total,
                present,
            } => {
                self.total.store(*total, Ordering::Relaxed);
                self.done.store(*present, Ordering::Relaxed);
                self.layers.store(*layers, Ordering::Relaxed);
            }
            Progress::Bytes { n, .. } => {
                self.done.fetch_add(*n, Ordering::Relaxed);
            }
            Progress::LayerDone { .. } => {
                self.layers_done.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.draw(false);
    }

    fn draw(&self, force: bool) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if !force && last.elapsed() < Duration::from_millis(100) {
            return;
        }
        *last = Instant::now();
        let (done, total) = (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        );
        let width = 30usize;
        let filled = if total == 0 {
            width
        } else {
            (done.min(total) as f64 / total as f64 * width as f64) as usize
        };
        eprint!(
            "\r[{}{}] {} / {}",
            "=".repeat(filled),
            " ".repeat(width - filled),
            human(done),
            human(total),
        );
    }

    fn end(&self) {
        self.draw(true);
        eprintln!();
    }
}

fn human(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn open_store(cli_store: Option<PathBuf>) -> Result<Store> {
    let root = cli_store.unwrap_or_else(Store::default_root);
    Store::open(&root).with_context(|| format!("opening the image store {}", root.display()))
}

/// Pulls `image`; with `bundle`, also writes that bundle (unpacking layers
/// while later ones download).
fn pull_cmd(
    store: &Store,
    reg: &RegistryArgs,
    image: &str,
    bundle: Option<(&std::path::Path, Overrides)>,
) -> Result<skiff_oci::ImageRecord> {
    let r = Reference::parse(image)?;
    let bar = (!reg.quiet && std::io::stderr().is_terminal()).then(Bar::new);
    let opts = pull_options(reg, bar.clone())?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let result = match bundle {
        None => rt
            .block_on(pull::pull(store, &r, &opts))
            .map_err(anyhow::Error::from),
        Some((dest, over)) => rt
            .block_on(bundle::pull_bundle(
                store,
                &r,
                &opts,
                dest,
                &over,
                &UnpackOptions::default(),
            ))
            .map(|(rep, _)| rep)
            .map_err(anyhow::Error::from),
    };
    if let Some(b) = bar {
        b.end();
    }
    let report = result?;
    log::info!(
        "{}: {} fetched, {} resumed, {} layers reused",
        report.record.name,
        human(report.fetched),
        human(report.resumed),
        report.reused
    );
    Ok(report.record)
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("skiff-oci: {e:#}");
        std::process::exit(1);
    }
}

/// Refuses a bundle destination before any work is done.
fn check_dest(dest: &std::path::Path) -> Result<()> {
    for p in [dest.join("rootfs"), dest.join("config.json")] {
        if std::fs::symlink_metadata(&p).is_ok() {
            anyhow::bail!("{} already exists", p.display());
        }
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let store = open_store(cli.store)?;
    let uopts = UnpackOptions::default();
    match cli.cmd {
        Cmd::Pull {
            reg,
            run,
            image,
            dest,
        } => {
            check_dest(&dest)?;
            let rec = pull_cmd(&store, &reg, &image, Some((&dest, run.overrides())))?;
            println!("{} {}", rec.name, rec.manifest);
        }
        Cmd::Fetch { reg, image } => {
            let rec = pull_cmd(&store, &reg, &image, None)?;
            println!("{} {}", rec.name, rec.manifest);
        }
        Cmd::Import {
            run,
            name,
            platform: p,
            path,
            dest,
        } => {
            check_dest(&dest)?;
            let rec = import::import(&store, &path, name.as_deref(), &platform(p.as_deref())?)?;
            bundle::write_bundle(&store, &rec, &dest, &run.overrides(), &uopts, None)?;
            println!("{} {}", rec.name, rec.manifest);
        }
        Cmd::Inspect { reg, image } => inspect(&store, &reg, &image)?,
        Cmd::List => {
            for r in store.list()? {
                println!(
                    "{}\t{}\t{}\t{}",
                    r.name,
                    r.manifest,
                    r.platform,
                    human(r.size())
                );
            }
        }
        Cmd::Delete { image } => {
            let name = stored_name(&store, &image);
            store.delete(&name)?;
        }
        Cmd::Prune { all } => {
            let r = store.prune(!all)?;
            println!(
                "removed {} blobs ({}), {} rootfs caches, {} stale work files",
                r.blobs,
                human(r.bytes),
                r.rootfs,
                r.stale
            );
        }
    }
    Ok(())
}

/// A stored name for what the user typed: as typed, else normalised.
fn stored_name(store: &Store, image: &str) -> String {
    if store.inspect(image).is_ok() {
        return image.to_string();
    }
    Reference::parse(image).map_or_else(|_| image.to_string(), |r| r.to_string())
}

fn inspect(store: &Store, reg: &RegistryArgs, image: &str) -> Result<()> {
    let name = stored_name(store, image);
    let (record, config) = match store.inspect(&name) {
        Ok(rec) => {
            let cfg = bundle::image_config(store, &rec)?;
            (serde_json::to_value(&rec)?, cfg)
        }
        Err(_) => {
            let r = Reference::parse(image)?;
            let opts = pull_options(reg, None)?;
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let (res, cfg) = rt.block_on(pull::fetch_config(&r, &opts))?;
            let v = serde_json::json!({
                "name": r.to_string(),
                "manifest": res.digest,
                "index": res.index.as_ref().map(|(d, _)| d),
                "config": res.manifest.config,
                "layers": res.manifest.layers,
                "platform": format!("{}/{}", cfg.os, cfg.architecture),
            });
            (v, cfg)
        }
    };
    let cc = config.config.clone().unwrap_or_default();
    let args = skiff_oci::spec::merge_args(
        cc.entrypoint.as_deref(),
        cc.cmd.as_deref(),
        &Overrides::default(),
    )
    .ok();
    let out = serde_json::json!({
        "image": record,
        "created": config.created,
        "args": args,
        "config": cc,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
