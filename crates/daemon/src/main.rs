//! skiffd: Skiff's daemon. Serves the REST API (Incus/LXD's `/1.0` shapes)
//! on `$SKIFF_DIR/unix.socket`, keeps state in `$SKIFF_DIR/state.db`, and
//! drives instances: thin VMs through the VM driver, on the managed bridge
//! `skiffbr0`. VMs, virtiofsd and dnsmasq outlive the daemon; at start it
//! reconciles its database with what really runs.

mod api;
mod daemon;
mod db;
mod events;
mod images;
mod instances;
mod ops;
mod snapshots;
mod sysimages;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;

use crate::daemon::{Daemon, Settings};

/// Skiff's daemon: the instance API on a Unix socket.
///
/// Runs in the foreground (a systemd unit, or `skiffd &`). The `skiff` CLI,
/// Debian's `lxc` client (LXD_DIR=$SKIFF_DIR) and pylxd talk to it. Stop it
/// with SIGTERM; running instances keep running and are adopted by the next
/// skiffd.
#[derive(Debug, Parser)]
#[command(name = "skiffd", version)]
struct Args {
    /// State directory (database, images, instances, the socket).
    #[arg(long, env = "SKIFF_DIR", default_value = "/var/lib/skiff")]
    dir: PathBuf,
    /// Directory for the runtime sockets of running VMs.
    #[arg(long, env = "SKIFF_RUN_DIR", default_value = "/run/skiff")]
    run_dir: PathBuf,
    /// The API socket (default: DIR/unix.socket).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Do not manage the bridge: instances get no network.
    #[arg(long)]
    no_network: bool,
    /// The bridge's IPv4 address and prefix (default: a free 10.x.y.1/24).
    #[arg(long, value_name = "CIDR")]
    subnet: Option<String>,
    /// Guest kernel for thin VMs (default: the project's, else the host's).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("skiffd: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("skiffd: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("skiffd must run as root (it creates taps, bridges, mounts and VMs)");
    }
    let socket = args.socket.clone().unwrap_or_else(|| args.dir.join("unix.socket"));
    let settings = Settings {
        dir: args.dir.clone(),
        run_dir: args.run_dir.clone(),
        network: !args.no_network,
        subnet: args.subnet.clone(),
        kernel: args.kernel.clone(),
    };
    let d = tokio::task::spawn_blocking(move || Daemon::open(settings)).await.context("opening")??;
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        bail!("another skiffd already serves {}", socket.display());
    }
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod {}", socket.display()))?;
    d.reconcile().await;
    d.spawn_tasks();
    log::info!("skiffd {} serving {}", env!("CARGO_PKG_VERSION"), socket.display());
    let app = api::router(d.clone());
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {},
        }
        log::info!("skiffd stopping (instances keep running)");
    };
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await.context("serving the API")?;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
