//! Instance drivers behind one trait. The daemon drives every kind of
//! instance through [`Driver`]: create its storage from an image, start it
//! (returning once its entrypoint runs), stop it, ask how it is, reach its
//! agent for exec and files, snapshot its root filesystem, adopt it again
//! after a daemon restart, and hear about it ending by itself
//! ([`DriverEvent`]). [`vm::VmDriver`] runs thin VMs; LXC containers come
//! later behind the same trait. VM specifics stay out of this module.

pub mod config;
pub mod devices;
pub mod vm;
pub mod volumes;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use skiff_agent_client::AgentClient;
use skiff_agent_proto::ExitStatus;

pub use config::{parse_memory, DEFAULT_CPUS, DEFAULT_MEMORY_MIB};

/// The kinds of instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceKind {
    /// A VM (a thin VM for OCI images).
    VirtualMachine,
    /// A native container.
    Container,
}

/// Errors of drivers.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// A config key the driver does not know, or a bad value.
    #[error("config {key}: {why}")]
    Config {
        /// The key.
        key: String,
        /// What is wrong.
        why: String,
    },
    /// The instance is not running.
    #[error("instance {0} is not running")]
    NotRunning(String),
    /// The instance must be stopped for this.
    #[error("instance {0} is running: stop it first")]
    Running(String),
    /// The image's run spec is unusable.
    #[error("the image's run spec: {0}")]
    Image(String),
    /// Storage failed.
    #[error("storage")]
    Storage(#[from] skiff_storage::StorageError),
    /// The VM's monitor failed (booting, stopping, talking to it).
    #[error("VM")]
    Monitor(#[from] skiff_run::monitor::MonitorError),
    /// A device is unusable.
    #[error(transparent)]
    Device(#[from] devices::DeviceError),
    /// A change that the running instance cannot take; it applies at the next start.
    #[error("{0}")]
    NeedsRestart(String),
    /// The container runtime failed (LXC, its mounts, its agent).
    #[error("container")]
    Container(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A host operation failed.
    #[error("{0}")]
    Host(String),
    /// Something this kind of instance cannot do (the caller's request).
    #[error("{0}")]
    Unsupported(String),
}

/// Why containers have no stateful snapshots.
pub const NO_CRIU: &str = "stateful snapshots of containers need CRIU (checkpoint/restore in userspace), which \
                           Skiff does not have: take a stateless snapshot (without --stateful)";

/// The host side of an instance's network interface (made by the daemon).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// The tap device.
    pub tap: String,
    /// The guest's MAC address.
    pub mac: String,
    /// The bridge's address (gateway and DNS server).
    pub gateway: Ipv4Addr,
}

/// The agent's network request for an instance with a NIC: DHCP on eth0
/// from the managed bridge's dnsmasq, which is also its name server.
pub fn network_config(inst: &InstanceSpec) -> Option<skiff_agent_proto::NetworkConfig> {
    inst.nic.as_ref().map(|nic| skiff_agent_proto::NetworkConfig {
        interface: Some("eth0".into()),
        addressing: skiff_agent_proto::Addressing::Dhcp,
        mtu: None,
        dns: vec![nic.gateway.to_string()],
        search: vec!["skiff".into()],
        hostname: Some(inst.name.clone()),
        hosts: vec![],
    })
}

/// What an image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageKind {
    /// An OCI image: a rootfs and a run spec whose entrypoint is the main process.
    #[default]
    Oci,
    /// A system image: a whole OS whose own init boots it (containers).
    System,
    /// A disk image in this format (raw or qcow2, recorded at import): a
    /// full OS VM boots it through the firmware; `image_rootfs` is the base.
    Disk(disk_image::Format),
}

/// What a driver knows of an instance.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    /// Its name.
    pub name: String,
    /// Its stable UUID.
    pub id: String,
    /// Its expanded config.
    pub config: BTreeMap<String, String>,
    /// The image's unpacked, read-only rootfs (a disk image: its base file).
    pub image_rootfs: PathBuf,
    /// The OCI runtime config of the image's run spec.
    pub image_config: serde_json::Value,
    /// What the image holds.
    pub image_kind: ImageKind,
    /// Its network interface, if it has one.
    pub nic: Option<Nic>,
    /// Its devices (Incus's `devices:` map; see [`devices`]).
    pub devices: BTreeMap<String, BTreeMap<String, String>>,
    /// The daemon's directory for it (console log, exit record, logs).
    pub dir: PathBuf,
}

/// How an instance is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunStatus {
    /// Running.
    Running {
        /// The host process that keeps it (a VM's monitor).
        pid: u32,
        /// The main process's pid inside, when known.
        main_pid: Option<i32>,
        /// How often its entrypoint was restarted.
        restarts: u32,
        /// Seconds since the epoch when it started.
        started_at: u64,
    },
    /// Not running; how it last ended, if known.
    Stopped {
        /// A one-line account of its last end.
        last: Option<String>,
    },
}

/// Something that happened to a started or adopted instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverEvent {
    /// Its main process ended.
    MainExited {
        /// The instance.
        name: String,
        /// How.
        status: ExitStatus,
        /// Whether it is being restarted.
        restarting: bool,
    },
    /// It ended (by itself, or because it was stopped).
    Stopped {
        /// The instance.
        name: String,
        /// Whether it ended cleanly (poweroff, stop) rather than failed.
        clean: bool,
        /// A one-line account, with diagnostics when it failed.
        detail: String,
    },
}

/// An instance driver.
#[async_trait::async_trait]
pub trait Driver: Send + Sync {
    /// The kind of instance it runs.
    fn kind(&self) -> InstanceKind;
    /// Checks config keys and values (unknown keys are errors).
    fn validate_config(&self, config: &BTreeMap<String, String>) -> Result<(), DriverError>;
    /// Makes the instance's storage from its image.
    async fn create(&self, inst: &InstanceSpec) -> Result<(), DriverError>;
    /// Starts it; returns when its entrypoint runs.
    async fn start(&self, inst: &InstanceSpec) -> Result<(), DriverError>;
    /// Stops it: cleanly within `timeout`, or at once with `force`.
    async fn stop(&self, inst: &InstanceSpec, timeout: Duration, force: bool) -> Result<(), DriverError>;
    /// Pauses (`true`) or resumes (`false`) a running instance.
    async fn freeze(&self, inst: &InstanceSpec, frozen: bool) -> Result<(), DriverError>;
    /// Checks a device (see [`devices`]); `Ok` for the daemon's own.
    fn validate_device(&self, name: &str, device: &BTreeMap<String, String>) -> Result<(), DriverError>;
    /// Adds device `name` to a running instance (hot-plug).
    async fn device_add(
        &self,
        inst: &InstanceSpec,
        name: &str,
        device: &BTreeMap<String, String>,
    ) -> Result<(), DriverError>;
    /// Removes device `name` from a running instance; it must have been
    /// added by [`Driver::device_add`] or at start.
    async fn device_remove(&self, inst: &InstanceSpec, name: &str) -> Result<(), DriverError>;
    /// Applies the limits of `new` (`limits.*`) to the running instance
    /// that was started as `old`; [`DriverError::NeedsRestart`] when a
    /// change can only take effect at the next start.
    async fn update_limits(&self, old: &InstanceSpec, new: &InstanceSpec) -> Result<(), DriverError>;
    /// How it is now.
    async fn status(&self, inst: &InstanceSpec) -> Result<RunStatus, DriverError>;
    /// Its agent (exec, files); an error when it is not running.
    fn agent(&self, inst: &InstanceSpec) -> Result<AgentClient, DriverError>;
    /// Its console log (of the last boot).
    fn console_log(&self, inst: &InstanceSpec) -> PathBuf;
    /// The Unix socket of its interactive serial console, when it has one
    /// and runs (a full OS VM: a getty on its serial port). Without one,
    /// the console is a shell through the agent.
    fn serial_console(&self, _inst: &InstanceSpec) -> Option<PathBuf> {
        None
    }
    /// Removes everything of a stopped instance.
    async fn delete(&self, inst: &InstanceSpec) -> Result<(), DriverError>;
    /// Snapshots its root filesystem.
    async fn snapshot_create(&self, inst: &InstanceSpec, snap: &str) -> Result<(), DriverError>;
    /// Restores a snapshot (the instance must be stopped).
    async fn snapshot_restore(&self, inst: &InstanceSpec, snap: &str) -> Result<(), DriverError>;
    /// Deletes a snapshot.
    async fn snapshot_delete(&self, inst: &InstanceSpec, snap: &str) -> Result<(), DriverError>;
    /// Renames a snapshot.
    async fn snapshot_rename(&self, inst: &InstanceSpec, old: &str, new: &str) -> Result<(), DriverError>;
    /// Snapshots a running instance with its memory and device state
    /// beside its root filesystem; it is paused meanwhile and runs again
    /// afterwards unless `keep_paused`. On failure no snapshot is left.
    async fn snapshot_create_stateful(
        &self,
        inst: &InstanceSpec,
        snap: &str,
        keep_paused: bool,
    ) -> Result<(), DriverError> {
        let _ = (inst, snap, keep_paused);
        Err(DriverError::Unsupported(NO_CRIU.into()))
    }
    /// Whether snapshot `snap` holds memory state.
    fn snapshot_is_stateful(&self, inst: &InstanceSpec, snap: &str) -> bool {
        let _ = (inst, snap);
        false
    }
    /// Restores a stateful snapshot of the stopped instance: its root
    /// filesystem, then the instance running from the saved memory. On
    /// failure the instance is as it was (stopped, its disk unchanged).
    async fn snapshot_restore_stateful(&self, inst: &InstanceSpec, snap: &str) -> Result<(), DriverError> {
        let _ = (inst, snap);
        Err(DriverError::Unsupported(NO_CRIU.into()))
    }
    /// Makes the storage of the new instance `new` from snapshot `snap` of
    /// `source`; with `stateful` also its memory state, from which `new`'s
    /// next start restores instead of booting. On failure nothing is left.
    async fn copy_from_snapshot(
        &self,
        source: &InstanceSpec,
        snap: &str,
        new: &InstanceSpec,
        stateful: bool,
    ) -> Result<(), DriverError> {
        let _ = (source, snap, new, stateful);
        Err(DriverError::Unsupported("copying containers is not supported yet".into()))
    }
    /// Whether the instance's next start restores saved memory state.
    fn has_saved_state(&self, inst: &InstanceSpec) -> bool {
        let _ = inst;
        false
    }
    /// After a daemon restart: watches it again if it runs, else cleans
    /// what a dead run left.
    async fn adopt(&self, inst: &InstanceSpec) -> Result<RunStatus, DriverError>;
    /// Events of every started or adopted instance.
    fn events(&self) -> tokio::sync::broadcast::Receiver<DriverEvent>;
}
