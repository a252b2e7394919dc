//! `GET /1.0`: the server and what it can do.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// API extensions Skiff implements (clients look for some of these before
/// using a feature: `instances` for `/1.0/instances`, `container_exec_recording`
/// for `record-output`, `virtual-machines` for the VM type, ...).
pub const EXTENSIONS: &[&str] = &[
    "etag",
    "patch",
    "network",
    "container_exec_recording",
    "container_exec_signal_handling",
    "file_delete",
    "file_append",
    "directory_manipulation",
    "file_symlinks",
    "file_get_symlink",
    "console",
    "operation_description",
    "event_lifecycle",
    "network_leases",
    "container_exec_user_group_cwd",
    "instances",
    "image_types",
    "virtual-machines",
    "instance_get_full",
    "api_filtering",
    "api_os",
    "event_location",
    "event_project",
    "projects",
    "container_snapshot_stateful_migration",
];

/// `GET /1.0`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Server {
    /// Server config.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// [`EXTENSIONS`].
    pub api_extensions: Vec<String>,
    /// `stable`.
    pub api_status: String,
    /// `1.0`.
    pub api_version: String,
    /// `trusted` (local Unix socket).
    pub auth: String,
    /// false.
    #[serde(default)]
    pub public: bool,
    /// `["unix"]`.
    #[serde(default)]
    pub auth_methods: Vec<String>,
    /// The host.
    pub environment: ServerEnvironment,
}

/// The host and the daemon.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ServerEnvironment {
    /// Listen addresses (none: Unix socket only).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// `["x86_64"]`.
    pub architectures: Vec<String>,
    /// No TLS certificate (Unix socket only).
    #[serde(default)]
    pub certificate: String,
    /// Its fingerprint.
    #[serde(default)]
    pub certificate_fingerprint: String,
    /// `skiff-vmm` (and later `lxc`).
    pub driver: String,
    /// Versions of the drivers.
    pub driver_version: String,
    /// `nftables`.
    #[serde(default)]
    pub firewall: String,
    /// `Linux`.
    pub kernel: String,
    /// `x86_64`.
    pub kernel_architecture: String,
    /// Kernel features.
    #[serde(default)]
    pub kernel_features: BTreeMap<String, String>,
    /// The host kernel's release.
    pub kernel_version: String,
    /// LXC features (none).
    #[serde(default)]
    pub lxc_features: BTreeMap<String, String>,
    /// `Debian GNU/Linux`.
    #[serde(default)]
    pub os_name: String,
    /// `12`.
    #[serde(default)]
    pub os_version: String,
    /// `default`.
    pub project: String,
    /// `skiff`.
    pub server: String,
    /// false.
    #[serde(default)]
    pub server_clustered: bool,
    /// `full-mesh`.
    #[serde(default)]
    pub server_event_mode: String,
    /// The host name.
    pub server_name: String,
    /// skiffd's pid.
    pub server_pid: u32,
    /// Skiff's version.
    pub server_version: String,
    /// The storage backend (`overlay`, `reflink`, `copy`).
    pub storage: String,
    /// Its version.
    #[serde(default)]
    pub storage_version: String,
    /// Supported storage drivers.
    #[serde(default)]
    pub storage_supported_drivers: Vec<serde_json::Value>,
}
