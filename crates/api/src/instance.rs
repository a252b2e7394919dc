//! Instances: `/1.0/instances`, their state and snapshots.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Config keys and values (`limits.cpu`, `environment.X`, `volatile.*`).
pub type Config = BTreeMap<String, String>;
/// Devices by name; each a map of keys (`type`, `network`, `path`, ...).
pub type Devices = BTreeMap<String, BTreeMap<String, String>>;

/// The API's status codes (instances and operations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusCode {
    /// 100
    OperationCreated,
    /// 101
    Started,
    /// 102
    Stopped,
    /// 103
    Running,
    /// 104
    Cancelling,
    /// 105
    Pending,
    /// 106
    Starting,
    /// 107
    Stopping,
    /// 108
    Aborting,
    /// 109
    Freezing,
    /// 110
    Frozen,
    /// 111
    Thawed,
    /// 112
    Error,
    /// 113
    Ready,
    /// 200
    Success,
    /// 400
    Failure,
    /// 401
    Cancelled,
    /// Any other code.
    Other(u16),
}

const CODES: &[(StatusCode, u16, &str)] = &[
    (StatusCode::OperationCreated, 100, "Operation created"),
    (StatusCode::Started, 101, "Started"),
    (StatusCode::Stopped, 102, "Stopped"),
    (StatusCode::Running, 103, "Running"),
    (StatusCode::Cancelling, 104, "Cancelling"),
    (StatusCode::Pending, 105, "Pending"),
    (StatusCode::Starting, 106, "Starting"),
    (StatusCode::Stopping, 107, "Stopping"),
    (StatusCode::Aborting, 108, "Aborting"),
    (StatusCode::Freezing, 109, "Freezing"),
    (StatusCode::Frozen, 110, "Frozen"),
    (StatusCode::Thawed, 111, "Thawed"),
    (StatusCode::Error, 112, "Error"),
    (StatusCode::Ready, 113, "Ready"),
    (StatusCode::Success, 200, "Success"),
    (StatusCode::Failure, 400, "Failure"),
    (StatusCode::Cancelled, 401, "Cancelled"),
];

impl StatusCode {
    /// The numeric code.
    pub fn code(self) -> u16 {
        match self {
            StatusCode::Other(c) => c,
            s => CODES.iter().find(|(k, _, _)| *k == s).map(|e| e.1).unwrap_or(0),
        }
    }

    /// The code's name ("Running").
    pub fn name(self) -> &'static str {
        CODES.iter().find(|(k, _, _)| *k == self).map(|e| e.2).unwrap_or("Unknown")
    }

    /// The status of a numeric code.
    pub fn from_code(code: u16) -> StatusCode {
        CODES.iter().find(|e| e.1 == code).map(|e| e.0).unwrap_or(StatusCode::Other(code))
    }
}

/// `container` or `virtual-machine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceType {
    /// A native container (LXC).
    Container,
    /// A VM (a thin VM for OCI images, or a full OS VM).
    #[default]
    VirtualMachine,
}

impl InstanceType {
    /// The API's name of the type.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceType::Container => "container",
            InstanceType::VirtualMachine => "virtual-machine",
        }
    }
}

/// An instance type, where an empty string means none.
fn empty_is_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<InstanceType>, D::Error> {
    match Option::<String>::deserialize(d)?.as_deref() {
        None | Some("") => Ok(None),
        Some(s) => InstanceType::deserialize(serde::de::value::StrDeserializer::<D::Error>::new(s)).map(Some),
    }
}

/// An instance (`GET /1.0/instances/{name}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// x86_64.
    pub architecture: String,
    /// The instance's own config.
    #[serde(default)]
    pub config: Config,
    /// The instance's own devices.
    #[serde(default)]
    pub devices: Devices,
    /// Deleted when stopped.
    #[serde(default)]
    pub ephemeral: bool,
    /// Profiles (always `["default"]`).
    #[serde(default)]
    pub profiles: Vec<String>,
    /// Whether a stateful snapshot exists.
    #[serde(default)]
    pub stateful: bool,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// RFC 3339.
    pub created_at: String,
    /// Config with the profiles applied.
    #[serde(default)]
    pub expanded_config: Config,
    /// Devices with the profiles applied.
    #[serde(default)]
    pub expanded_devices: Devices,
    /// Its name.
    pub name: String,
    /// "Running", "Stopped", "Error", ...
    pub status: String,
    /// The status's code.
    pub status_code: u16,
    /// RFC 3339.
    #[serde(default)]
    pub last_used_at: String,
    /// "none".
    #[serde(default)]
    pub location: String,
    /// `container` or `virtual-machine`.
    #[serde(rename = "type")]
    pub kind: InstanceType,
    /// "default".
    #[serde(default)]
    pub project: String,
}

/// `recursion=2`: an instance with its state and snapshots.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceFull {
    /// The instance.
    #[serde(flatten)]
    pub instance: Instance,
    /// Its state.
    pub state: Option<InstanceState>,
    /// Its snapshots.
    #[serde(default)]
    pub snapshots: Option<Vec<InstanceSnapshot>>,
    /// Backups (none).
    #[serde(default)]
    pub backups: Option<Vec<serde_json::Value>>,
}

/// Where a new instance comes from.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct InstanceSource {
    /// `image`, or `copy` (from a snapshot: [`InstanceSource::source`]).
    #[serde(rename = "type")]
    pub kind: String,
    /// With `copy`: the snapshot copied, `NAME/SNAP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// An image alias (`busybox`) or, with `protocol: oci`, an OCI reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// An image fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// The image server (`http://127.0.0.1:5000`, `https://docker.io`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// `oci` (or `simplestreams`, `incus`, `lxd`: not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Credentials for the server, `user:password` base64 (Skiff's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Selects the image by properties (unused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<BTreeMap<String, String>>,
}

/// `POST /1.0/instances`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct InstancesPost {
    /// The new instance's name (generated when empty).
    #[serde(default)]
    pub name: String,
    /// `container` or `virtual-machine` (Skiff's default); `""` (what the
    /// `lxc` client sends for a copy) is none.
    #[serde(default, rename = "type", deserialize_with = "empty_is_none")]
    pub kind: Option<InstanceType>,
    /// The source.
    pub source: InstanceSource,
    /// Config.
    #[serde(default)]
    pub config: Config,
    /// Devices.
    #[serde(default)]
    pub devices: Devices,
    /// Profiles (only `default`).
    #[serde(default)]
    pub profiles: Option<Vec<String>>,
    /// Deleted when stopped.
    #[serde(default)]
    pub ephemeral: bool,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Start it once created (`lxc launch`).
    #[serde(default)]
    pub start: bool,
    /// Architecture (only x86_64).
    #[serde(default)]
    pub architecture: String,
    /// Instance type shorthand (unused).
    #[serde(default)]
    pub instance_type: String,
    /// With a `copy` source: take the snapshot's memory state too, so the
    /// copy's first start restores the saved VM instead of booting.
    #[serde(default)]
    pub stateful: bool,
}

/// `PUT /1.0/instances/{name}` (all fields) and `PATCH` (those given).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct InstancePut {
    /// Config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Config>,
    /// Devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Devices>,
    /// Ephemeral.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral: Option<bool>,
    /// Profiles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profiles: Option<Vec<String>>,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Restores this snapshot (PUT only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<String>,
    /// With `restore`: the snapshot's memory state too (the VM runs on
    /// from where it was saved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stateful: Option<bool>,
    /// Architecture (ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
}

/// `PUT /1.0/instances/{name}/state`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceStatePut {
    /// What to do.
    pub action: StateAction,
    /// Seconds a clean stop may take (-1 or 0: the default).
    #[serde(default)]
    pub timeout: i64,
    /// Kill rather than stop cleanly.
    #[serde(default)]
    pub force: bool,
    /// Stateful stop/start (not supported yet).
    #[serde(default)]
    pub stateful: bool,
}

/// A state change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateAction {
    /// Start.
    Start,
    /// Stop.
    Stop,
    /// Stop then start.
    Restart,
    /// Pause the vCPUs.
    Freeze,
    /// Resume the vCPUs.
    Unfreeze,
}

/// `GET /1.0/instances/{name}/state`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct InstanceState {
    /// "Running", ...
    pub status: String,
    /// Its code.
    pub status_code: u16,
    /// Disks by name (empty).
    #[serde(default)]
    pub disk: BTreeMap<String, serde_json::Value>,
    /// Memory use.
    #[serde(default)]
    pub memory: MemoryState,
    /// Interfaces by name.
    #[serde(default)]
    pub network: Option<BTreeMap<String, NetworkState>>,
    /// The main process's pid (in the guest for VMs; 0 when stopped).
    #[serde(default)]
    pub pid: i64,
    /// Processes (-1: unknown).
    #[serde(default)]
    pub processes: i64,
    /// CPU use.
    #[serde(default)]
    pub cpu: CpuState,
}

/// Memory use in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MemoryState {
    /// In use.
    #[serde(default)]
    pub usage: u64,
    /// Peak.
    #[serde(default)]
    pub usage_peak: u64,
    /// Total (VMs: the guest's RAM).
    #[serde(default)]
    pub total: u64,
    /// Swap in use.
    #[serde(default)]
    pub swap_usage: u64,
    /// Swap peak.
    #[serde(default)]
    pub swap_usage_peak: u64,
}

/// CPU time in nanoseconds.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CpuState {
    /// Used.
    #[serde(default)]
    pub usage: u64,
}

/// One interface's state.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct NetworkState {
    /// Addresses.
    #[serde(default)]
    pub addresses: Vec<NetworkAddress>,
    /// Counters.
    #[serde(default)]
    pub counters: BTreeMap<String, u64>,
    /// MAC.
    #[serde(default)]
    pub hwaddr: String,
    /// The host side (tap).
    #[serde(default)]
    pub host_name: String,
    /// MTU.
    #[serde(default)]
    pub mtu: u32,
    /// "up" or "down".
    #[serde(default)]
    pub state: String,
    /// "broadcast".
    #[serde(rename = "type", default)]
    pub kind: String,
}

/// One address of an interface.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetworkAddress {
    /// "inet" or "inet6".
    pub family: String,
    /// The address.
    pub address: String,
    /// Prefix length.
    pub netmask: String,
    /// "global", "link", "local".
    pub scope: String,
}

/// A snapshot (`GET /1.0/instances/{name}/snapshots/{snap}`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct InstanceSnapshot {
    /// Its name (without the instance's).
    pub name: String,
    /// RFC 3339.
    pub created_at: String,
    /// Expiry (zero time: never).
    #[serde(default)]
    pub expires_at: String,
    /// Whether it holds memory state.
    #[serde(default)]
    pub stateful: bool,
    /// The instance's config when taken.
    #[serde(default)]
    pub config: Config,
    /// The instance's devices when taken.
    #[serde(default)]
    pub devices: Devices,
    /// Expanded config.
    #[serde(default)]
    pub expanded_config: Config,
    /// Expanded devices.
    #[serde(default)]
    pub expanded_devices: Devices,
    /// x86_64.
    #[serde(default)]
    pub architecture: String,
    /// Ephemeral flag when taken.
    #[serde(default)]
    pub ephemeral: bool,
    /// Profiles.
    #[serde(default)]
    pub profiles: Vec<String>,
    /// RFC 3339.
    #[serde(default)]
    pub last_used_at: String,
    /// Size in bytes (-1 unknown).
    #[serde(default)]
    pub size: i64,
}

/// `POST /1.0/instances/{name}/snapshots`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct InstanceSnapshotsPost {
    /// The snapshot's name (generated `snapN` when empty).
    #[serde(default)]
    pub name: String,
    /// With the VM's memory and device state (VMs only).
    #[serde(default)]
    pub stateful: bool,
}

/// `POST /1.0/instances/{name}/snapshots/{snap}`: rename.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct InstanceSnapshotPost {
    /// The new name.
    pub name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lxd_captures() {
        let create: InstancesPost = serde_json::from_str(
            r#"{"name":"c2","type":"container","source":{"type":"image","alias":"test"},
                "profiles":["default"],"config":{},"devices":{}}"#,
        )
        .unwrap();
        assert_eq!(create.kind, Some(InstanceType::Container));
        assert_eq!(create.source.alias.as_deref(), Some("test"));
        let stop: InstanceStatePut = serde_json::from_str(r#"{"action":"stop","force":true,"timeout":30}"#).unwrap();
        assert_eq!((stop.action, stop.force, stop.timeout), (StateAction::Stop, true, 30));
        assert_eq!(StatusCode::from_code(103), StatusCode::Running);
        assert_eq!(StatusCode::Running.name(), "Running");
        assert_eq!(StatusCode::Cancelled.code(), 401);
        assert_eq!(StatusCode::from_code(999).code(), 999);
    }

    #[test]
    fn parses_the_lxc_clients_stateful_requests() {
        // `lxc copy web/warm clone` (lxd-client 5.0.2) of a stateful snapshot.
        let copy: InstancesPost = serde_json::from_str(
            r#"{"architecture":"x86_64","config":{"image.oci.reference":"x"},"devices":{},"ephemeral":false,
                "profiles":["default"],"stateful":true,"description":"","name":"clone",
                "source":{"type":"copy","certificate":"","base-image":"","source":"web/warm","live":true,
                "instance_only":false,"refresh":false,"project":"","allow_inconsistent":false},
                "instance_type":"","type":""}"#,
        )
        .unwrap();
        assert_eq!((copy.kind, copy.stateful), (None, true));
        assert_eq!((copy.source.kind.as_str(), copy.source.source.as_deref()), ("copy", Some("web/warm")));
        assert!(serde_json::from_str::<InstancesPost>(r#"{"type":"vm","source":{"type":"image"}}"#).is_err());
        // `lxc restore web warm --stateful` and `lxc snapshot web warm --stateful`.
        let put: InstancePut = serde_json::from_str(r#"{"restore":"web/warm","stateful":true}"#).unwrap();
        assert_eq!((put.restore.as_deref(), put.stateful), (Some("web/warm"), Some(true)));
        let snap: InstanceSnapshotsPost = serde_json::from_str(r#"{"name":"warm","stateful":true}"#).unwrap();
        assert!(snap.stateful);
    }
}
