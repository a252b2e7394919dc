//! The JSON bodies of skiff-vmm's control API. Both sides use these types:
//! skiff-vmm deserializes requests and serializes replies with them, the
//! client the other way round. Unknown fields in a request are refused, so
//! a typo is an error rather than a silent default.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `GET /api/v1/vmm.ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    /// skiff-vmm's version.
    pub version: String,
    /// skiff-vmm's process id.
    pub pid: u32,
}

/// Whether the guest's vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// The vCPUs run.
    Running,
    /// Every vCPU and device worker is parked (`vm.pause`).
    Paused,
}

/// `GET /api/v1/vm.info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// skiff-vmm's version.
    pub version: String,
    /// Running or paused.
    pub state: VmState,
    /// Milliseconds since skiff-vmm started.
    pub uptime_ms: u64,
    /// vCPUs.
    pub cpus: CpuInfo,
    /// Guest memory.
    pub memory: MemoryInfo,
    /// Every device, boot-time and hot-plugged, in slot order.
    pub devices: Vec<DeviceInfo>,
}

/// The vCPUs of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuInfo {
    /// vCPUs at boot.
    pub boot: u8,
    /// Most vCPUs the VM can have (`--cpus max=`).
    pub max: u8,
    /// vCPUs present now (the guest may still have some offline).
    pub present: u8,
}

/// The memory of a VM, in MiB.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// Memory at boot.
    pub boot_mib: u64,
    /// Size of the hot-plug region (`--memory hotplug=`); 0 without one.
    pub hotplug_mib: u64,
    /// What the VM was last asked to have (`vm.resize`).
    pub requested_mib: u64,
    /// What the guest has plugged of the hot-plug region so far, plus boot
    /// memory.
    pub plugged_mib: u64,
}

/// The kinds of device skiff-vmm emulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// virtio-blk.
    Disk,
    /// virtio-net on a tap.
    Net,
    /// virtio-fs through a vhost-user backend (virtiofsd).
    Fs,
    /// virtio-vsock.
    Vsock,
    /// virtio-rng.
    Rng,
    /// virtio-console.
    Console,
    /// virtio-mem (memory hot-plug).
    Mem,
}

/// One device of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// The device's id: given (`id=`) or generated (`disk0`, `net1`, ...).
    pub id: String,
    /// What it is.
    pub kind: DeviceKind,
    /// Its PCI slot on bus 0.
    pub slot: u8,
    /// Its backend in words (image path, tap name, tag and socket, ...).
    pub backend: String,
    /// Whether it was hot-plugged.
    pub hotplugged: bool,
}

/// `PUT /api/v1/vm.add-disk`: a virtio-blk disk backed by a raw image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Device id; generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The image file or block device.
    pub path: PathBuf,
    /// Refuse guest writes.
    #[serde(default)]
    pub readonly: bool,
    /// The serial the guest reads (at most 20 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// The image format, `raw` or `qcow2`. Absent: raw, but a file that
    /// starts with the qcow2 magic is refused (never guessed from contents;
    /// a caller that knows its disk is raw says so, so that a guest writing
    /// the magic into its own disk cannot make the next attach fail).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

/// `PUT /api/v1/vm.add-net`: a virtio-net NIC on a tap device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSpec {
    /// Device id; generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The tap device (created if missing).
    pub tap: String,
    /// The guest's MAC, `xx:xx:xx:xx:xx:xx`; random when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// `PUT /api/v1/vm.add-fs`: a virtio-fs share served by a running
/// vhost-user backend (virtiofsd).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsSpec {
    /// Device id; generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The tag the guest mounts (`mount -t virtiofs TAG DIR`).
    pub tag: String,
    /// The backend's vhost-user socket.
    pub socket: PathBuf,
}

/// `PUT /api/v1/vm.add-vsock`: a virtio-vsock device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockSpec {
    /// Device id; generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The guest's context id (3 or more).
    pub cid: u32,
    /// The host side's Unix socket (Firecracker's hybrid model).
    pub socket: PathBuf,
}

/// The reply to an `add-*` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceAdded {
    /// The device's id (given or generated).
    pub id: String,
    /// The PCI slot it got.
    pub slot: u8,
}

/// `PUT /api/v1/vm.remove-device`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveDevice {
    /// The device's id.
    pub id: String,
}

/// `PUT /api/v1/vm.resize`: either or both.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resize {
    /// vCPUs wanted (between 1 and `max`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u8>,
    /// Memory wanted in MiB (between the boot size and boot + hot-plug).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
}

/// `PUT /api/v1/vm.snapshot`: where a paused VM is saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// A directory (created if missing) that gets the files `state` and
    /// `memory`; existing ones are replaced.
    pub destination: std::path::PathBuf,
}

/// The answer to `vm.snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSaved {
    /// Bytes of the state file.
    pub state_bytes: u64,
    /// Bytes of guest memory saved (the memory file's size).
    pub memory_bytes: u64,
    /// How long saving took, in milliseconds.
    pub elapsed_ms: u64,
}

/// `GET /api/v1/vm.counters`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// VM exits handled by skiff-vmm, by kind (`io_in`, `io_out`,
    /// `mmio_read`, `mmio_write`, `other`), all vCPUs together.
    pub vm_exits: BTreeMap<String, u64>,
    /// Per device id: its counters (bytes, requests, notifications,
    /// interrupts; the names depend on the device).
    pub devices: BTreeMap<String, BTreeMap<String, u64>>,
}

/// The body of every error reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong and why.
    pub error: String,
}
