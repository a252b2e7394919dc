//! The daemon's shared state and its life: opening the state database,
//! the image store, the managed bridge and the driver; reconciling what
//! the database says with what really runs (after a restart or a crash);
//! turning driver events into state changes and API events; and keeping
//! dnsmasq alive.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use skiff_api::InstanceType;
use skiff_driver::Driver;
use skiff_net::{Bridge, BridgeConfig};

use crate::db::{Db, DbError, Status};
use crate::events::Events;
use crate::images::{chain, ImageError, Images};
use crate::ops::Operations;

/// The managed bridge's name.
pub const BRIDGE: &str = "skiffbr0";
/// How often dnsmasq is checked.
const SUPERVISE_EVERY: Duration = Duration::from_secs(5);

/// Errors of starting the daemon.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A directory could not be made.
    #[error("creating {path}: {source}")]
    Dir {
        /// Which.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The database.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The image store.
    #[error(transparent)]
    Images(#[from] ImageError),
    /// The network.
    #[error("network {BRIDGE}: {0}")]
    Net(String),
    /// The driver.
    #[error("VM driver: {0}")]
    Driver(String),
}

/// Settings from the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `$SKIFF_DIR`.
    pub dir: PathBuf,
    /// Runtime directory for sockets of running VMs.
    pub run_dir: PathBuf,
    /// Whether to manage the bridge (off: instances get no NIC).
    pub network: bool,
    /// A fixed subnet for the bridge (`10.0.5.1/24`).
    pub subnet: Option<String>,
    /// Guest kernel override.
    pub kernel: Option<PathBuf>,
}

/// Everything the API handlers share.
pub struct Daemon {
    /// Settings.
    pub settings: Settings,
    /// State.
    pub db: Mutex<Db>,
    /// Operations.
    pub ops: Operations,
    /// Events.
    pub events: Events,
    /// Images.
    pub images: Images,
    /// The VM driver.
    pub vms: Arc<dyn Driver>,
    /// The LXC driver, or why this host has none.
    pub containers: Result<Arc<dyn Driver>, String>,
    /// The managed bridge, when networking is on.
    pub net: Option<Bridge>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Kernel modules the bridge, taps, NAT and vhost need. Kernels do not
/// always load them on demand (nftables' NAT chain type is one), so the
/// daemon asks for them; what is built in or missing is left to the steps
/// that need it to report.
const MODULES: &[&str] = &["bridge", "tun", "nf_tables", "nft_chain_nat", "nft_masq", "nf_nat"];

fn load_modules() {
    for m in MODULES {
        if !Path::new("/sys/module").join(m).exists() {
            let _ = std::process::Command::new("modprobe")
                .args(["-q", m])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

fn mkdir(p: &Path) -> Result<(), InitError> {
    std::fs::create_dir_all(p).map_err(|source| InitError::Dir { path: p.to_path_buf(), source })
}

impl Daemon {
    /// Opens everything under `settings.dir`.
    pub fn open(settings: Settings) -> Result<Arc<Daemon>, InitError> {
        let dir = settings.dir.clone();
        for d in [dir.clone(), dir.join("instances"), dir.join("oci"), dir.join("storage"), dir.join("tmp")] {
            mkdir(&d)?;
        }
        mkdir(&settings.run_dir)?;
        let db = Db::open(&dir.join("state.db"))?;
        let images = Images::open(dir.join("oci"))?;
        let net = if settings.network {
            load_modules();
            let ipv4 = match &settings.subnet {
                Some(s) => Some(s.parse().map_err(|e| InitError::Net(format!("--subnet {s}: {e}")))?),
                None => None,
            };
            let cfg = BridgeConfig {
                name: BRIDGE.into(),
                ipv4,
                nat: true,
                domain: "skiff".into(),
                state_dir: dir.join("networks").join(BRIDGE),
            };
            Some(Bridge::ensure(&cfg).map_err(|e| InitError::Net(chain(&e)))?)
        } else {
            None
        };
        let vms = crate::instances::vm_driver(&settings).map_err(|e| InitError::Driver(chain(&e)))?;
        let containers = crate::instances::lxc_driver(&settings, net.is_some()).map_err(|e| chain(&e));
        if let Err(why) = &containers {
            log::warn!("containers are off: {why}");
        }
        let events = Events::default();
        Ok(Arc::new(Daemon {
            settings,
            db: Mutex::new(db),
            ops: Operations::new(events.clone()),
            events,
            images,
            vms,
            containers,
            net,
            locks: Mutex::default(),
        }))
    }

    /// The driver of instances of `kind` (`virtual-machine` or `container`).
    pub fn driver_for(&self, kind: InstanceType) -> Result<&Arc<dyn Driver>, String> {
        match kind {
            InstanceType::VirtualMachine => Ok(&self.vms),
            InstanceType::Container => self
                .containers
                .as_ref()
                .map_err(|why| format!("containers are not available on this host ({why}); launch it as a VM (--vm)")),
        }
    }

    /// `$SKIFF_DIR`.
    pub fn dir(&self) -> &Path {
        &self.settings.dir
    }

    /// The database, locked (held only for short, synchronous work).
    pub fn db(&self) -> std::sync::MutexGuard<'_, Db> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lock that serialises state changes of one instance.
    pub fn lock_of(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.lock().unwrap_or_else(|e| e.into_inner()).entry(name.to_string()).or_default().clone()
    }

    /// Starts the background tasks: driver events and dnsmasq supervision.
    pub fn spawn_tasks(self: &Arc<Self>) {
        let drivers = std::iter::once(self.vms.clone()).chain(self.containers.as_ref().ok().cloned());
        for driver in drivers {
            let me = self.clone();
            let mut rx = driver.events();
            tokio::spawn(async move {
                loop {
                    match rx.recv().await {
                        Ok(ev) => crate::instances::on_driver_event(&me, ev).await,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            me.events.log("warning", "driver events lost", json!({"count": n}));
                            crate::instances::resync(&me).await;
                        }
                        Err(_) => break,
                    }
                }
            });
        }
        if let Some(net) = self.net.clone() {
            let events = self.events.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(SUPERVISE_EVERY).await;
                    let n = net.clone();
                    match tokio::task::spawn_blocking(move || n.supervise()).await {
                        Ok(Ok(true)) => events.log("warning", "dnsmasq had died; restarted it", json!({})),
                        Ok(Ok(false)) => {}
                        Ok(Err(e)) => events.log("error", &format!("dnsmasq: {}", chain(&e)), json!({})),
                        Err(_) => {}
                    }
                }
            });
        }
    }

    /// Reconciles the database with what runs: half-made instances are
    /// removed, running ones adopted, stopped ones cleaned, taps without an
    /// instance deleted, and `boot.autostart` instances started.
    pub async fn reconcile(self: &Arc<Self>) {
        let rows = match self.db().instances() {
            Ok(r) => r,
            Err(e) => {
                log::error!("reconcile: {e}");
                return;
            }
        };
        let mut keep_taps = Vec::new();
        let mut autostart = Vec::new();
        for row in rows {
            if row.status == Status::Creating {
                log::warn!("reconcile: removing {} (its creation was interrupted)", row.name);
                crate::instances::discard(self, &row).await;
                continue;
            }
            let running = crate::instances::adopt(self, &row).await;
            if running {
                if let Some(tap) = row.config.get("volatile.eth0.host_name") {
                    keep_taps.push(tap.clone());
                }
            } else {
                let power = row.config.get("volatile.last_state.power").map(String::as_str);
                let auto = row.config.get("boot.autostart").map(String::as_str);
                if auto == Some("true") || (auto.is_none() && power == Some("RUNNING")) {
                    autostart.push(row.name.clone());
                }
            }
        }
        if let Some(net) = &self.net {
            if let Ok(taps) = net.taps() {
                for t in taps.into_iter().filter(|t| !keep_taps.contains(t)) {
                    log::info!("reconcile: deleting tap {t} (no running instance owns it)");
                    let _ = net.delete_tap(&t);
                }
            }
        }
        for name in autostart {
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = crate::instances::start(&me, &name).await {
                    me.events.log("error", &format!("autostart of {name} failed: {e}"), json!({"instance": name}));
                }
            });
        }
    }

    /// Instance config with the daemon-level defaults (there are no
    /// profiles: the expanded config is the instance's own).
    pub fn expanded(config: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        config.clone()
    }
}
