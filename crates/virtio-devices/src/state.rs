//! Snapshot state of the PCI functions and virtio devices: plain serde
//! data, written by the VMM into its snapshot file and handed back on
//! restore. Nothing here knows about KVM or the file format (the VMM owns
//! the magic, version and checksum).
//!
//! What is saved per virtio-pci function ([`VirtioPciState`]): the whole
//! configuration space (BARs, command, capabilities), the MSI-X table and
//! pending bits, the common configuration (status, features, selects,
//! vectors), every queue as the driver programmed it and, for an active
//! device, each queue's progress (`next_avail`/`next_used`, as the
//! device's worker has them), and the device configuration bytes (MAC,
//! capacity, CID ...) so that a restore onto a different backend is
//! refused rather than confusing the guest.
//!
//! Device-specific state beyond queues: blk and net have none that
//! outlives a request, vsock connections are *reset* (the restored device
//! sends the guest `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`, see
//! [`crate::VirtioDevice::restoring`]), and a vhost-user backend's own
//! state (virtiofsd's inodes and open files) is carried as the bytes it
//! hands over ([`VirtioPciState::backend_state`], at most
//! [`MAX_BACKEND_STATE`]).

use serde::{Deserialize, Serialize};

/// Most bytes of device configuration compared on restore.
pub const DEVICE_CONFIG_BYTES: usize = 256;
/// Most bytes of a backend's own state a snapshot carries (virtiofsd
/// needs some hundred bytes per inode the guest has looked up).
pub const MAX_BACKEND_STATE: usize = 8 << 20;

/// Why a device's state cannot be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The device keeps state that snapshots do not carry yet.
    #[error("device type {0} cannot be snapshotted while active")]
    Unsupported(u32),
    /// The worker thread could not be stopped or started again.
    #[error("device worker")]
    Worker(#[source] crate::ActivateError),
    /// The state does not fit this device (another type or shape).
    #[error("saved state does not fit the device: {0}")]
    Mismatch(String),
    /// The driver-programmed queue in the state is invalid.
    #[error("queue {index}: {reason}")]
    BadQueue {
        /// Queue index.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// Activation of the restored device failed.
    #[error("activation of the restored device failed")]
    Activate,
    /// A vhost-user backend refused a step of saving or loading its state.
    #[error("the vhost-user backend cannot {what}")]
    Backend {
        /// The step.
        what: &'static str,
        /// Cause.
        #[source]
        source: vhost::Error,
    },
    /// A backend's state could not be moved (no support, too large, too
    /// slow, requests in flight).
    #[error("vhost-user backend state: {0}")]
    BackendState(String),
}

/// Where an active queue's device side is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueProgress {
    /// Queue index in the device.
    pub index: usize,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
}

impl QueueProgress {
    /// The progress of `queue` (index `index`).
    pub fn of(index: usize, queue: &virtio_queue::Queue) -> Self {
        use virtio_queue::QueueT;
        QueueProgress {
            index,
            next_avail: queue.next_avail(),
            next_used: queue.next_used(),
        }
    }
}

/// One queue as the driver programmed it through the common configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSlotState {
    /// Size the driver chose.
    pub size: u16,
    /// `queue_enable`.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// MSI-X vector.
    pub vector: u16,
}

/// The common configuration's registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommonConfigState {
    /// `device_status`.
    pub status: u8,
    /// `config_generation`.
    pub generation: u8,
    /// `device_feature_select`.
    pub device_feature_select: u32,
    /// `driver_feature_select`.
    pub driver_feature_select: u32,
    /// Features the driver wrote.
    pub driver_features: u64,
    /// `queue_select`.
    pub queue_select: u16,
    /// `config_msix_vector`.
    pub config_vector: u16,
}

/// An MSI-X table and its pending bits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    /// Each entry: address low, address high, data, vector control.
    pub table: Vec<[u32; 4]>,
    /// Pending bit array, 64 vectors a word.
    pub pba: Vec<u64>,
    /// MSI-X enable.
    pub enabled: bool,
    /// Function mask.
    pub function_masked: bool,
}

/// A virtio-pci function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    /// The 64 configuration registers.
    pub config: Vec<u32>,
    /// Where BAR0 is mapped.
    pub bar_addr: u64,
    /// MSI-X.
    pub msix: MsixState,
    /// Common configuration.
    pub common: CommonConfigState,
    /// Every queue, in index order.
    pub queues: Vec<QueueSlotState>,
    /// The device side of each active queue (empty when not active).
    pub progress: Vec<QueueProgress>,
    /// ISR status bits not yet read by the driver.
    pub isr: u8,
    /// Whether a worker flagged `DEVICE_NEEDS_RESET`.
    pub needs_reset: bool,
    /// Whether the driver had started the device (`DRIVER_OK` accepted).
    pub active: bool,
    /// The first [`DEVICE_CONFIG_BYTES`] of device configuration.
    pub device_config: Vec<u8>,
    /// The backend's own state, if it keeps one (hex in the file).
    #[serde(default, with = "hex_bytes")]
    pub backend_state: Option<Vec<u8>>,
}

/// `Option<Vec<u8>>` as a hex string (half the size of a JSON array).
mod hex_bytes {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            None => s.serialize_none(),
            Some(b) => {
                let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
                s.serialize_some(&hex)
            }
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let Some(hex) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        if hex.len() % 2 != 0 || hex.len() > 2 * super::MAX_BACKEND_STATE {
            return Err(D::Error::custom("backend state: bad hex length"));
        }
        (0..hex.len())
            .step_by(2)
            .map(|i| {
                hex.get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| D::Error::custom("backend state: not hex"))
            })
            .collect::<Result<Vec<u8>, _>>()
            .map(Some)
    }
}
