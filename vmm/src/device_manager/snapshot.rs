//! The PCI devices in a snapshot: what each one was made from (its host
//! side: disk path, tap, vsock socket, virtiofsd socket) and its
//! virtio-pci state (with virtiofsd's own state for a share); on
//! restore, each is made again (from the command line's options when
//! given, else from the saved ones) in its old slot with its BAR at its old
//! address, and takes its state before any vCPU runs.

use std::collections::HashSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use skiff_vmm_client::types::{DeviceInfo, DeviceKind};
use virtio_devices::block::BlockConfig;
use virtio_devices::fs::FsConfig;
use virtio_devices::pci::bus::RangeAllocator;
use virtio_devices::pci::{BarAllocator, PciBar, PciBarRange};
use virtio_devices::state::{StateError, VirtioPciState};
use virtio_devices::VirtioPciDevice;

use super::{build_model, kind_name, DeviceConfig, DeviceError, Entry, NewDevice, PciDevices};
use crate::options::{DiskOption, FsOption, NetBackend, NetOption, VsockOption};

/// Why devices cannot be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    #[error("device '{id}' ({kind}) cannot be snapshotted yet (supported: disk, net, vsock, rng, fs)")]
    Unsupported { id: String, kind: &'static str },
    #[error("device '{0}' is being removed")]
    Removing(String),
    #[error("device '{id}'")]
    State {
        id: String,
        #[source]
        source: StateError,
    },
    #[error("cannot make device '{id}' again")]
    Device {
        id: String,
        #[source]
        source: DeviceError,
    },
    #[error("device '{0}' is given on the command line but is not in the snapshot")]
    NotInSnapshot(String),
    #[error("device '{0}' is given twice")]
    Twice(String),
    #[error("device '{id}' is a {given} on the command line but a {saved} in the snapshot")]
    KindDiffers { id: String, given: &'static str, saved: &'static str },
    #[error("disk '{id}': unknown disk format {format:?} in the snapshot")]
    BadFormat { id: String, format: String },
    #[error("NIC '{0}' used an inherited tap fd: give it again with --net fd=N,id={0} or tap=NAME,id={0}")]
    NeedsTap(String),
}

/// What a device was made from: enough to make it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceSpec {
    Disk {
        path: PathBuf,
        /// `None` in snapshots made before disks had formats.
        #[serde(default)]
        format: Option<String>,
        readonly: bool,
        serial: Option<String>,
    },
    /// `tap` is `None` for an inherited fd (it must be given again).
    Net {
        tap: Option<String>,
        mac: [u8; 6],
    },
    Vsock {
        cid: u64,
        socket: PathBuf,
    },
    /// A share: on restore a fresh virtiofsd must serve the same
    /// directory on `socket` (or the one `--fs` gives).
    Fs {
        tag: String,
        socket: PathBuf,
        num_request_queues: u16,
        queue_size: u16,
    },
    Rng,
}

/// One device of a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedDevice {
    pub id: String,
    pub slot: u8,
    pub hotplugged: bool,
    pub spec: DeviceSpec,
    pub state: VirtioPciState,
}

impl SavedDevice {
    fn kind(&self) -> DeviceKind {
        match self.spec {
            DeviceSpec::Disk { .. } => DeviceKind::Disk,
            DeviceSpec::Net { .. } => DeviceKind::Net,
            DeviceSpec::Vsock { .. } => DeviceKind::Vsock,
            DeviceSpec::Fs { .. } => DeviceKind::Fs,
            DeviceSpec::Rng => DeviceKind::Rng,
        }
    }

    /// The device made from the saved spec.
    fn new_device(&self) -> Result<NewDevice, DeviceStateError> {
        let id = Some(self.id.clone());
        Ok(match &self.spec {
            DeviceSpec::Disk { path, format, readonly, serial } => NewDevice::Disk(DiskOption {
                id,
                config: BlockConfig {
                    path: path.clone(),
                    format: format.as_deref().map(str::parse).transpose().map_err(|_| DeviceStateError::BadFormat {
                        id: self.id.clone(),
                        format: format.clone().unwrap_or_default(),
                    })?,
                    readonly: *readonly,
                    serial: serial.clone(),
                },
            }),
            DeviceSpec::Net { tap: Some(tap), mac } => {
                NewDevice::Net(NetOption { id, backend: NetBackend::Tap(tap.clone()), mac: Some(*mac) })
            }
            DeviceSpec::Net { tap: None, .. } => return Err(DeviceStateError::NeedsTap(self.id.clone())),
            DeviceSpec::Vsock { cid, socket } => {
                NewDevice::Vsock(VsockOption { id, cid: *cid, socket: socket.clone() })
            }
            DeviceSpec::Fs { tag, socket, num_request_queues, queue_size } => {
                let mut config = FsConfig::new(tag, socket.clone());
                config.num_request_queues = *num_request_queues;
                config.queue_size = *queue_size;
                NewDevice::Fs(FsOption { id, config })
            }
            DeviceSpec::Rng => NewDevice::Rng,
        })
    }
}

/// A [`BarAllocator`] that places BAR0 at a saved address (taking it from
/// the VMM's allocator, so later hot-plugs go elsewhere).
pub(super) struct FixedBar<'a> {
    pub inner: &'a mut RangeAllocator,
    pub addr: u64,
}

impl BarAllocator for FixedBar<'_> {
    fn allocate(&mut self, bar: &PciBar) -> Option<u64> {
        (bar.index == 0 && self.inner.reserve(bar.region_type, self.addr, bar.size)).then_some(self.addr)
    }
    fn free(&mut self, range: &PciBarRange) {
        self.inner.free(range);
    }
}

fn spec_of(e: &Entry, state: &VirtioPciState) -> Result<DeviceSpec, DeviceStateError> {
    let unsupported = || DeviceStateError::Unsupported { id: e.info.id.clone(), kind: kind_name(e.info.kind) };
    Ok(match e.new.as_ref().ok_or_else(unsupported)? {
        NewDevice::Disk(d) => DeviceSpec::Disk {
            path: d.config.path.clone(),
            format: d.config.format.map(|f| f.to_string()),
            readonly: d.config.readonly,
            serial: d.config.serial.clone(),
        },
        NewDevice::Net(n) => {
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&state.device_config[..6]);
            let tap = match &n.backend {
                NetBackend::Tap(t) => Some(t.clone()),
                NetBackend::Fd(_) => None,
            };
            DeviceSpec::Net { tap, mac }
        }
        NewDevice::Vsock(v) => DeviceSpec::Vsock { cid: v.cid, socket: v.socket.clone() },
        NewDevice::Fs(f) => DeviceSpec::Fs {
            tag: f.config.tag.clone(),
            socket: f.config.socket.clone(),
            num_request_queues: f.config.num_request_queues,
            queue_size: f.config.queue_size,
        },
        NewDevice::Rng => DeviceSpec::Rng,
        NewDevice::Console(_) => return Err(unsupported()),
    })
}

/// The id `new` gets among `taken`, as [`PciDevices::add`] gives it.
fn id_for(new: &NewDevice, taken: &HashSet<String>) -> String {
    match new.id() {
        Some(id) => id.to_string(),
        None => {
            (0..).map(|n| format!("{}{n}", kind_name(new.kind()))).find(|id| !taken.contains(id)).unwrap_or_default()
        }
    }
}

/// Pairs each saved device with what makes it again: the command line's
/// device with the same id (ids given with `id=`, or made as at boot:
/// `disk0`, `net0`, ...) or else its saved spec. A NIC given without a
/// MAC keeps the saved one. Devices given that the snapshot lacks are an
/// error.
pub fn devices_for_restore(
    saved: &[SavedDevice],
    given: &DeviceConfig,
) -> Result<Vec<(NewDevice, SavedDevice)>, DeviceStateError> {
    let mut taken = HashSet::new();
    let mut by_id = std::collections::HashMap::new();
    for new in given.all() {
        let id = id_for(&new, &taken);
        if !taken.insert(id.clone()) {
            return Err(DeviceStateError::Twice(id));
        }
        by_id.insert(id, new);
    }
    let mut out = Vec::with_capacity(saved.len());
    for s in saved {
        let new = match by_id.remove(&s.id) {
            Some(new) if new.kind() != s.kind() => {
                let (given, saved) = (kind_name(new.kind()), kind_name(s.kind()));
                return Err(DeviceStateError::KindDiffers { id: s.id.clone(), given, saved });
            }
            Some(NewDevice::Net(mut n)) => {
                if let DeviceSpec::Net { mac, .. } = &s.spec {
                    n.mac = n.mac.or(Some(*mac));
                }
                n.id = Some(s.id.clone());
                NewDevice::Net(n)
            }
            Some(new) => new,
            None => s.new_device()?,
        };
        out.push((new, s.clone()));
    }
    if let Some(id) = by_id.into_keys().next() {
        return Err(DeviceStateError::NotInSnapshot(id));
    }
    Ok(out)
}

impl PciDevices {
    /// Every device's spec and state, for a snapshot (devices paused).
    pub fn save_devices(&self) -> Result<Vec<SavedDevice>, DeviceStateError> {
        let mut out = Vec::with_capacity(self.entries.len());
        for e in &self.entries {
            let id = e.info.id.clone();
            if e.removing {
                return Err(DeviceStateError::Removing(id));
            }
            let state = e
                .transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .save_state()
                .map_err(|source| DeviceStateError::State { id: id.clone(), source })?;
            let spec = spec_of(e, &state)?;
            out.push(SavedDevice { id, slot: e.info.slot, hotplugged: e.info.hotplugged, spec, state });
        }
        Ok(out)
    }

    /// Makes `new` again in the saved device's slot, with its BAR where it
    /// was, and restores its state (activating it if the guest had). The
    /// device stays paused until [`PciDevices::resume_all`].
    pub fn restore_device(&mut self, new: NewDevice, saved: &SavedDevice) -> Result<(), DeviceStateError> {
        let id = saved.id.clone();
        let err = |source| DeviceStateError::Device { id: id.clone(), source };
        let kind = new.kind();
        let model = build_model(&new).map_err(err)?;
        // Paused: its worker must not touch the queues or raise interrupts
        // before the vCPUs' LAPICs are restored (an MSI then would be lost,
        // and the driver, with event index, never notified again); the
        // restore resumes every device last.
        model.device.lock().unwrap_or_else(|e| e.into_inner()).pause();
        let name = format!("{} '{id}' ({})", kind_name(kind), model.backend);
        let (slot, transport) = self
            .attach_virtio_at(&name, model.device.clone(), Some(saved.slot), Some(saved.state.bar_addr))
            .map_err(err)?;
        let restored = lock_transport(&transport).restore_state(&saved.state);
        restored.map_err(|source| DeviceStateError::State { id: id.clone(), source })?;
        log::info!("PCI slot {slot}: {name} restored{}", if saved.state.active { ", active" } else { "" });
        let info = DeviceInfo { id, kind, slot, backend: model.backend, hotplugged: saved.hotplugged };
        let (tag, device) = (model.tag, model.device);
        self.entries.push(Entry { info, tag, removing: false, device, new: Some(new), transport });
        self.entries.sort_by_key(|e| e.info.slot);
        Ok(())
    }
}

fn lock_transport(t: &std::sync::Mutex<VirtioPciDevice>) -> std::sync::MutexGuard<'_, VirtioPciDevice> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}
