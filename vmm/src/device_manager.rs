//! The PCI side of the VM: the root bus on 0xCF8/0xCFC and ECAM, BAR
//! windows, MSI-X through KVM routing, and the virtio devices of the
//! command line, plus what the guest needs in ACPI to find them (the host
//! bridge in the DSDT, the MCFG table).
//!
//! Every device has an id (given with `id=` or generated from its kind) and
//! is created through [`PciDevices::add`], at boot and when hot-plugged
//! alike; removal is two steps, because the guest must let go first:
//! [`PciDevices::begin_remove`] (the VMM then asks the guest to eject the
//! slot) and [`PciDevices::finish_remove`] once it has.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use acpi_tables::aml::{self, AddressSpace, AddressSpaceCacheable};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;
use kvm_ioctls::VmFd;
use skiff_vmm_client::types::{DeviceAdded, DeviceInfo, DeviceKind};
use virtio_devices::block::Block;
use virtio_devices::console::{Console, ConsoleOutput};
use virtio_devices::fs::Fs;
use virtio_devices::mem::{MemError, MemGeometry, MemHandle, VirtioMem};
use virtio_devices::net::Net;
use virtio_devices::pci::bus::{RangeAllocator, PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_SIZE};
use virtio_devices::pci::{BarWindows, PciConfigIo, PciConfigMmio, PciError};
use virtio_devices::rng::Rng;
use virtio_devices::vsock::Vsock;
use virtio_devices::{PciBus, PciDevice, VirtioDevice, VirtioPciDevice};
use vm_device::Bus;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::arch::acpi::AcpiExtras;
use crate::arch::layout::*;
use crate::devices::pci_hotplug::pci_hotplug_aml;
use crate::interrupt::{KvmIoEvents, KvmMsiManager};
use crate::memory::{GuestRam, MemfdBackend};
use crate::options::{ConsoleOption, DiskOption, FsOption, NetBackend, NetOption, VsockOption};

mod snapshot;
pub use snapshot::{devices_for_restore, DeviceSpec, DeviceStateError, SavedDevice};

/// The virtio devices of a VM, as given on the command line.
#[derive(Debug, Clone, Default)]
pub struct DeviceConfig {
    pub disks: Vec<DiskOption>,
    pub nets: Vec<NetOption>,
    pub vsock: Option<VsockOption>,
    pub fs: Vec<FsOption>,
    pub rng: bool,
    pub console: Option<ConsoleOption>,
}

impl DeviceConfig {
    /// Whether guest RAM must be shareable with another process.
    pub fn needs_shared_memory(&self) -> bool {
        !self.fs.is_empty()
    }

    /// Every device, in the order they get slots.
    pub fn all(&self) -> Vec<NewDevice> {
        let mut v: Vec<NewDevice> = self.disks.iter().cloned().map(NewDevice::Disk).collect();
        v.extend(self.nets.iter().cloned().map(NewDevice::Net));
        v.extend(self.vsock.iter().cloned().map(NewDevice::Vsock));
        v.extend(self.fs.iter().cloned().map(NewDevice::Fs));
        if self.rng {
            v.push(NewDevice::Rng);
        }
        v.extend(self.console.iter().map(|c| NewDevice::Console(c.0.clone())));
        v
    }
}

/// A device to create: from the command line at boot, or from the API.
#[derive(Debug, Clone)]
pub enum NewDevice {
    Disk(DiskOption),
    Net(NetOption),
    Vsock(VsockOption),
    Fs(FsOption),
    Rng,
    Console(ConsoleOutput),
}

impl NewDevice {
    fn kind(&self) -> DeviceKind {
        match self {
            NewDevice::Disk(_) => DeviceKind::Disk,
            NewDevice::Net(_) => DeviceKind::Net,
            NewDevice::Vsock(_) => DeviceKind::Vsock,
            NewDevice::Fs(_) => DeviceKind::Fs,
            NewDevice::Rng => DeviceKind::Rng,
            NewDevice::Console(_) => DeviceKind::Console,
        }
    }

    fn id(&self) -> Option<&str> {
        match self {
            NewDevice::Disk(d) => d.id.as_deref(),
            NewDevice::Net(n) => n.id.as_deref(),
            NewDevice::Vsock(v) => v.id.as_deref(),
            NewDevice::Fs(f) => f.id.as_deref(),
            NewDevice::Rng | NewDevice::Console(_) => None,
        }
    }
}

fn kind_name(kind: DeviceKind) -> &'static str {
    match kind {
        DeviceKind::Disk => "disk",
        DeviceKind::Net => "net",
        DeviceKind::Fs => "fs",
        DeviceKind::Vsock => "vsock",
        DeviceKind::Rng => "rng",
        DeviceKind::Console => "console",
        DeviceKind::Mem => "mem",
    }
}

/// Why a device could not be set up or removed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("disk {path}")]
    Block {
        path: String,
        #[source]
        source: virtio_devices::block::BlockError,
    },
    #[error("network device {name}")]
    Net {
        name: String,
        #[source]
        source: virtio_devices::net::NetError,
    },
    #[error("vsock device (socket {path})")]
    Vsock {
        path: String,
        #[source]
        source: virtio_devices::vsock::VsockError,
    },
    #[error("virtio-fs device '{tag}'")]
    Fs {
        tag: String,
        #[source]
        source: virtio_devices::fs::FsError,
    },
    #[error("console device")]
    Console(#[source] virtio_devices::console::ConsoleError),
    #[error("virtio-pci transport for {name}")]
    Transport {
        name: String,
        #[source]
        source: virtio_devices::transport::TransportError,
    },
    #[error("cannot plug {name} into the PCI bus")]
    Attach {
        name: String,
        #[source]
        source: PciError,
    },
    #[error("cannot place the PCI configuration space on the bus")]
    Bus(#[source] vm_device::BusError),
    #[error("a device with id '{0}' exists already")]
    DuplicateId(String),
    #[error("no device has id '{0}'")]
    UnknownId(String),
    #[error("the VM has a vsock device already ('{0}'); it can have one")]
    SecondVsock(String),
    #[error("virtio-fs tag '{tag}' is used by device '{id}' already")]
    DuplicateTag { tag: String, id: String },
    #[error("the vhost-user socket {0} does not exist (is virtiofsd running?)")]
    NoFsSocket(String),
    #[error("device '{0}' is being removed already")]
    Removing(String),
    #[error("device '{0}' cannot be removed (resize the memory to 0 instead)")]
    NotRemovable(String),
    #[error("virtio-mem device")]
    Mem(#[source] MemError),
}

impl DeviceError {
    /// Whether the request conflicts with the VM's state (rather than being
    /// malformed or failing on the host): maps to HTTP 409.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            DeviceError::DuplicateId(_)
                | DeviceError::SecondVsock(_)
                | DeviceError::DuplicateTag { .. }
                | DeviceError::Removing(_)
                | DeviceError::NotRemovable(_)
                | DeviceError::Attach { source: PciError::NoFreeSlot | PciError::SlotUnavailable(_), .. }
        )
    }
}

/// A device on the bus.
struct Entry {
    info: DeviceInfo,
    /// The fs tag, for duplicate checks.
    tag: Option<String>,
    removing: bool,
    device: Arc<Mutex<dyn VirtioDevice>>,
    /// How it was made (none for the memory device), and its transport:
    /// what a snapshot saves.
    new: Option<NewDevice>,
    transport: Arc<Mutex<VirtioPciDevice>>,
}

/// The virtio-mem device of the memory hot-plug region.
pub struct MemoryDevice {
    handle: MemHandle,
    transport: Arc<Mutex<VirtioPciDevice>>,
}

impl MemoryDevice {
    /// Size of the hot-plug region in bytes.
    pub fn region_size(&self) -> u64 {
        self.handle.geometry().region_size
    }
    /// Bytes of the region the guest was asked to plug.
    pub fn requested(&self) -> u64 {
        self.handle.requested_size()
    }
    /// Bytes of the region the guest has plugged.
    pub fn plugged(&self) -> u64 {
        self.handle.plugged_size()
    }
    /// Asks the guest to plug or unplug towards `bytes` of the region (a
    /// multiple of the block size): sets the requested size and signals a
    /// configuration change. The guest does the rest in its own time.
    pub fn request(&self, bytes: u64) -> Result<(), MemError> {
        self.handle.set_requested_size(bytes)?;
        self.transport.lock().unwrap_or_else(|e| e.into_inner()).config_changed();
        Ok(())
    }
}

/// The PCI bus and what attaching devices to it needs.
pub struct PciDevices {
    bus: Arc<Mutex<PciBus>>,
    allocator: Mutex<RangeAllocator>,
    msi: KvmMsiManager,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    mmio64: (u64, u64),
    /// The 32-bit window the host bridge's `_CRS` announces.
    mmio32: (u64, u64),
    entries: Vec<Entry>,
    memory: Option<MemoryDevice>,
}

fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    // SAFETY: the buffer is valid for 5 bytes of writes.
    let n = unsafe { libc::getrandom(mac[1..].as_mut_ptr().cast(), 5, 0) };
    if n != 5 {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        mac[1..].copy_from_slice(&t.as_nanos().to_le_bytes()[..5]);
    }
    mac[0] = 0x02; // locally administered, unicast
    mac
}

/// A built device model and how to describe it.
struct Model {
    device: Arc<Mutex<dyn VirtioDevice>>,
    backend: String,
    tag: Option<String>,
}

fn build_model(new: &NewDevice) -> Result<Model, DeviceError> {
    fn shared<D: VirtioDevice + 'static>(d: D) -> Arc<Mutex<dyn VirtioDevice>> {
        Arc::new(Mutex::new(d))
    }
    Ok(match new {
        NewDevice::Disk(d) => {
            let path = d.config.path.display().to_string();
            let dev = Block::new(&d.config).map_err(|source| DeviceError::Block { path: path.clone(), source })?;
            Model { device: shared(dev), backend: path, tag: None }
        }
        NewDevice::Net(n) => {
            let mac = n.mac.unwrap_or_else(random_mac);
            let (name, dev) = match &n.backend {
                NetBackend::Tap(tap) => (format!("tap {tap}"), Net::with_tap_name(tap, mac)),
                NetBackend::Fd(fd) => {
                    // SAFETY: the fd was handed to this process for this NIC
                    // (`--net fd=N`); nothing else in the VMM owns it.
                    let owned = unsafe { OwnedFd::from_raw_fd(*fd) };
                    (format!("fd {fd}"), Net::with_tap_fd(owned, mac))
                }
            };
            let dev = dev.map_err(|source| DeviceError::Net { name: name.clone(), source })?;
            let m = mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
            Model { device: shared(dev), backend: format!("{name} mac {m}"), tag: None }
        }
        NewDevice::Vsock(v) => {
            let path = v.socket.display().to_string();
            let dev =
                Vsock::new(v.cid, &v.socket).map_err(|source| DeviceError::Vsock { path: path.clone(), source })?;
            Model { device: shared(dev), backend: format!("cid {} socket {path}", v.cid), tag: None }
        }
        NewDevice::Fs(f) => {
            if !f.config.socket.exists() {
                return Err(DeviceError::NoFsSocket(f.config.socket.display().to_string()));
            }
            let dev = Fs::new(&f.config).map_err(|source| DeviceError::Fs { tag: f.config.tag.clone(), source })?;
            let backend = format!("tag {} socket {}", f.config.tag, f.config.socket.display());
            Model { device: shared(dev), backend, tag: Some(f.config.tag.clone()) }
        }
        NewDevice::Rng => Model { device: shared(Rng::new()), backend: "getrandom".into(), tag: None },
        NewDevice::Console(out) => {
            let dev = Console::new(out).map_err(DeviceError::Console)?;
            let backend = match out {
                ConsoleOutput::File(p) => format!("file {}", p.display()),
                ConsoleOutput::Socket(p) => format!("socket {}", p.display()),
            };
            Model { device: shared(dev), backend, tag: None }
        }
    })
}

impl PciDevices {
    /// Creates the root bus and its configuration-space windows.
    pub fn new(vm: Arc<VmFd>, io_bus: Arc<Bus>, mmio_bus: Arc<Bus>, ram: &GuestRam) -> Result<Self, DeviceError> {
        let ioevents = Arc::new(KvmIoEvents::new(vm.clone()));
        let mmio64 = pci_mmio64(ram.boot_size, ram.hotplug.map_or(0, |h| h.size));
        let allocator = RangeAllocator::new(PCI_MMIO32, mmio64, PCI_IO);
        let mut pci_bus = PciBus::new(mmio_bus.clone(), io_bus.clone(), ioevents);
        // Guest BAR moves stay inside the windows the DSDT's `_CRS` announces.
        pci_bus.set_bar_windows(allocator.windows());
        let bus = Arc::new(Mutex::new(pci_bus));
        io_bus
            .insert(Arc::new(Mutex::new(PciConfigIo::new(bus.clone()))), PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_SIZE)
            .map_err(DeviceError::Bus)?;
        mmio_bus
            .insert(Arc::new(Mutex::new(PciConfigMmio::new(bus.clone()))), PCI_ECAM_START, PCI_ECAM_SIZE)
            .map_err(DeviceError::Bus)?;
        Ok(Self {
            bus,
            allocator: Mutex::new(allocator),
            msi: KvmMsiManager::new(vm),
            mem: GuestMemoryAtomic::new(ram.mem.clone()),
            mmio64,
            mmio32: PCI_MMIO32,
            entries: Vec::new(),
            memory: None,
        })
    }

    /// Firmware VMs: the firmware places every BAR itself, in windows of
    /// its own; guest moves may go anywhere in `mmio32` and `mmio64` (the
    /// bus still refuses overlaps), and the host bridge's `_CRS` announces
    /// them. The VMM's own first placement stays inside them.
    pub fn widen_bar_windows(&mut self, mmio32: (u64, u64), mmio64: (u64, u64)) {
        let windows = BarWindows { mmio32, mmio64, io: PCI_IO };
        self.bus.lock().unwrap_or_else(|e| e.into_inner()).set_bar_windows(windows);
        self.mmio32 = mmio32;
        self.mmio64 = mmio64;
    }

    /// The root bus (for chipset functions firmware looks for).
    pub fn pci_bus(&self) -> Arc<Mutex<PciBus>> {
        self.bus.clone()
    }

    /// Answers the reset control register at 0xCF9 with `reset` (firmware
    /// VMs): the configuration ports are put back with it.
    pub fn set_reset_control(&self, io_bus: &Bus, reset: Box<dyn Fn() + Send>) -> Result<(), vm_device::BusError> {
        let io = PciConfigIo::new(self.bus.clone()).with_reset_control(reset);
        let _ = io_bus.remove(PCI_CONFIG_IO_PORT);
        io_bus.insert(Arc::new(Mutex::new(io)), PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_SIZE)
    }

    /// Wraps `device` in the virtio-pci transport and plugs it in; returns
    /// the slot and the transport.
    fn attach_virtio(
        &mut self,
        name: &str,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<(u8, Arc<Mutex<VirtioPciDevice>>), DeviceError> {
        self.attach_virtio_at(name, device, None, None)
    }

    /// [`Self::attach_virtio`] into `slot` with BAR0 at `bar` (a restore),
    /// or anywhere free.
    fn attach_virtio_at(
        &mut self,
        name: &str,
        device: Arc<Mutex<dyn VirtioDevice>>,
        slot: Option<u8>,
        bar: Option<u64>,
    ) -> Result<(u8, Arc<Mutex<VirtioPciDevice>>), DeviceError> {
        let transport = VirtioPciDevice::new(device, self.mem.clone(), &self.msi)
            .map_err(|source| DeviceError::Transport { name: name.to_string(), source })?;
        let transport = Arc::new(Mutex::new(transport));
        let pci: Arc<Mutex<dyn PciDevice>> = transport.clone();
        let mut allocator = self.allocator.lock().unwrap_or_else(|e| e.into_inner());
        let mut fixed;
        let allocator: &mut dyn virtio_devices::BarAllocator = match bar {
            Some(addr) => {
                fixed = snapshot::FixedBar { inner: &mut allocator, addr };
                &mut fixed
            }
            None => &mut *allocator,
        };
        let slot = self
            .bus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .attach(slot, pci, allocator)
            .map_err(|source| DeviceError::Attach { name: name.to_string(), source })?;
        Ok((slot, transport))
    }

    /// Creates the virtio-mem device (`mem0`) for the hot-plug region of
    /// `ram`, nothing requested yet. Boot time only: the guest must find it
    /// while it boots to use the region.
    pub fn add_memory_device(&mut self, ram: &GuestRam, backend: MemfdBackend) -> Result<(), DeviceError> {
        let Some(region) = ram.hotplug else { return Ok(()) };
        let geometry = MemGeometry { addr: region.addr, region_size: region.size, block_size: HOTPLUG_BLOCK_SIZE };
        let dev = VirtioMem::new(geometry, Arc::new(backend)).map_err(DeviceError::Mem)?;
        let handle = dev.handle();
        let id = self.generated_id(DeviceKind::Mem);
        let backend = format!("memfd, {} MiB at {:#x}", region.size >> 20, region.addr);
        let name = format!("mem '{id}' ({backend})");
        let device: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(dev));
        let (slot, transport) = self.attach_virtio(&name, device.clone())?;
        log::info!("PCI slot {slot}: {name}");
        let info = DeviceInfo { id, kind: DeviceKind::Mem, slot, backend, hotplugged: false };
        let t = transport.clone();
        self.entries.push(Entry { info, tag: None, removing: false, device, new: None, transport: t });
        self.entries.sort_by_key(|e| e.info.slot);
        self.memory = Some(MemoryDevice { handle, transport });
        Ok(())
    }

    /// The virtio-mem device, if the VM has a hot-plug region.
    pub fn memory(&self) -> Option<&MemoryDevice> {
        self.memory.as_ref()
    }

    fn find(&self, id: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.info.id == id)
    }

    fn generated_id(&self, kind: DeviceKind) -> String {
        let base = kind_name(kind);
        (0..).map(|n| format!("{base}{n}")).find(|id| self.find(id).is_none()).unwrap_or_default()
    }

    /// Creates `new` and plugs it into a free slot. Nothing is left behind
    /// if it fails.
    pub fn add(&mut self, new: NewDevice, hotplugged: bool) -> Result<DeviceAdded, DeviceError> {
        let kind = new.kind();
        let id = match new.id() {
            Some(id) if self.find(id).is_some() => return Err(DeviceError::DuplicateId(id.to_string())),
            Some(id) => id.to_string(),
            None => self.generated_id(kind),
        };
        if let Some(v) =
            self.entries.iter().find(|e| e.info.kind == DeviceKind::Vsock).filter(|_| kind == DeviceKind::Vsock)
        {
            return Err(DeviceError::SecondVsock(v.info.id.clone()));
        }
        if let NewDevice::Fs(f) = &new {
            if let Some(e) = self.entries.iter().find(|e| e.tag.as_deref() == Some(f.config.tag.as_str())) {
                return Err(DeviceError::DuplicateTag { tag: f.config.tag.clone(), id: e.info.id.clone() });
            }
        }
        let model = build_model(&new)?;
        let name = format!("{} '{id}' ({})", kind_name(kind), model.backend);
        let (slot, transport) = self.attach_virtio(&name, model.device.clone())?;
        log::info!("PCI slot {slot}: {name}{}", if hotplugged { ", hot-plugged" } else { "" });
        let info = DeviceInfo { id: id.clone(), kind, slot, backend: model.backend, hotplugged };
        let (tag, device, new) = (model.tag, model.device, Some(new));
        self.entries.push(Entry { info, tag, removing: false, device, new, transport });
        self.entries.sort_by_key(|e| e.info.slot);
        Ok(DeviceAdded { id, slot })
    }

    /// Marks device `id` as being removed; returns its slot, for the guest
    /// to be asked to eject it.
    pub fn begin_remove(&mut self, id: &str) -> Result<u8, DeviceError> {
        let e = self.entries.iter_mut().find(|e| e.info.id == id).ok_or_else(|| DeviceError::UnknownId(id.into()))?;
        if e.removing {
            return Err(DeviceError::Removing(id.into()));
        }
        if e.info.kind == DeviceKind::Mem {
            return Err(DeviceError::NotRemovable(id.into()));
        }
        e.removing = true;
        Ok(e.info.slot)
    }

    /// The guest did not eject device `id` in time: it stays.
    pub fn abort_remove(&mut self, id: &str) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.info.id == id) {
            e.removing = false;
        }
    }

    /// Unplugs whatever is in `slot` (the guest ejected it): unmaps it,
    /// stops it, closes its backend. Returns its id.
    pub fn finish_remove(&mut self, slot: u8) -> Option<String> {
        let pos = self.entries.iter().position(|e| e.info.slot == slot)?;
        let mut allocator = self.allocator.lock().unwrap_or_else(|e| e.into_inner());
        let detached = self.bus.lock().unwrap_or_else(|e| e.into_inner()).detach(slot, &mut *allocator);
        if let Err(e) = detached {
            log::warn!("PCI slot {slot}: {e}");
        }
        let entry = self.entries.remove(pos);
        log::info!("PCI slot {slot}: {} '{}' removed", kind_name(entry.info.kind), entry.info.id);
        Some(entry.info.id)
    }

    /// Every device, in slot order.
    pub fn infos(&self) -> Vec<DeviceInfo> {
        self.entries.iter().map(|e| e.info.clone()).collect()
    }

    /// Each device's I/O counters, by device id.
    pub fn counters(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        self.entries
            .iter()
            .map(|e| {
                let counters = e.device.lock().unwrap_or_else(|e| e.into_inner()).counters();
                (e.info.id.clone(), counters.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            })
            .collect()
    }

    /// Parks every device's workers (call with the vCPUs paused): they
    /// touch no guest memory until [`PciDevices::resume_all`]. virtio-fs
    /// cannot be paused (virtiofsd's threads are its own).
    pub fn pause_all(&self) {
        for e in &self.entries {
            e.device.lock().unwrap_or_else(|e| e.into_inner()).pause();
        }
    }

    /// Lets every device's workers go on (call before resuming the vCPUs).
    pub fn resume_all(&self) {
        for e in &self.entries {
            e.device.lock().unwrap_or_else(|e| e.into_inner()).resume();
        }
    }

    /// The ACPI pieces for the bus: the host bridge in `\_SB` with its
    /// windows and hot-plug slots (registers at `hotplug_base`), and MCFG.
    pub fn acpi(&self, hotplug_base: u64) -> AcpiExtras {
        AcpiExtras {
            sb_aml: pci_host_bridge(self.mmio32, self.mmio64, &pci_hotplug_aml(hotplug_base)),
            tables: vec![mcfg()],
        }
    }
}

/// `\_SB.PCI0`: a PCI Express host bridge for bus 0 with the config ports,
/// the I/O window and both memory windows in `_CRS`.
fn pci_host_bridge(mmio32: (u64, u64), mmio64: (u64, u64), hotplug: &[u8]) -> Vec<u8> {
    let (m32_start, m32_size) = mmio32;
    let bus = AddressSpace::new_bus_number(0u16, 0u16);
    let cfg_io = aml::IO::new(PCI_CONFIG_IO_PORT as u16, PCI_CONFIG_IO_PORT as u16, 1, PCI_CONFIG_IO_SIZE as u8);
    let io = AddressSpace::new_io(PCI_IO.0 as u16, (PCI_IO.0 + PCI_IO.1 - 1) as u16, None);
    let mem32 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        m32_start as u32,
        (m32_start + m32_size - 1) as u32,
        None,
    );
    let mem64 =
        AddressSpace::new_memory(AddressSpaceCacheable::NotCacheable, true, mmio64.0, mmio64.0 + mmio64.1 - 1, None);
    let crs = aml::ResourceTemplate::new(vec![&bus, &cfg_io, &io, &mem32, &mem64]);
    let (hid, cid) = (aml::EISAName::new("PNP0A08"), aml::EISAName::new("PNP0A03"));
    let zero = 0u8;
    let fields = [
        aml::Name::new("_HID".into(), &hid),
        aml::Name::new("_CID".into(), &cid),
        aml::Name::new("_ADR".into(), &zero),
        aml::Name::new("_SEG".into(), &zero),
        aml::Name::new("_UID".into(), &zero),
        aml::Name::new("_BBN".into(), &zero),
        aml::Name::new("_CRS".into(), &crs),
    ];
    let hotplug = crate::arch::acpi::RawAml(hotplug);
    let mut children: Vec<&dyn Aml> = fields.iter().map(|f| f as &dyn Aml).collect();
    children.push(&hotplug);
    let mut out = Vec::new();
    aml::Device::new("PCI0".into(), children).to_aml_bytes(&mut out);
    out
}

/// MCFG: one ECAM window for segment 0, bus 0.
fn mcfg() -> Vec<u8> {
    let mut t = Sdt::new(*b"MCFG", 44, 1, *b"SKIFF ", *b"SKIFFVMM", 1);
    let mut entry = Vec::with_capacity(16);
    entry.extend_from_slice(&PCI_ECAM_START.to_le_bytes());
    entry.extend_from_slice(&0u16.to_le_bytes()); // segment
    entry.extend_from_slice(&[0, 0]); // start and end bus
    entry.extend_from_slice(&[0; 4]);
    t.append_slice(&entry);
    t.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mcfg_points_at_ecam() {
        let t = mcfg();
        assert_eq!(&t[0..4], b"MCFG");
        assert_eq!(t.len(), 60);
        assert_eq!(u64::from_le_bytes(t[44..52].try_into().unwrap()), PCI_ECAM_START);
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    }

    #[test]
    fn host_bridge_is_pnp0a08() {
        let aml = pci_host_bridge(PCI_MMIO32, pci_mmio64(1 << 30, 0), b"HPLG");
        let has = |s: &[u8]| aml.windows(s.len()).any(|w| w == s);
        assert!(has(b"PCI0") && has(b"_CRS") && has(b"HPLG"));
        // _HID and _CID are the EISA ids of PNP0A08 and PNP0A03.
        assert!(has(&[0x41, 0xd0, 0x0a, 0x08]) && has(&[0x41, 0xd0, 0x0a, 0x03]));
    }

    #[test]
    fn macs_are_local_unicast_and_random() {
        let macs: Vec<[u8; 6]> = (0..8).map(|_| random_mac()).collect();
        assert!(macs.iter().all(|m| m[0] == 0x02));
        assert!(macs.windows(2).any(|w| w[0] != w[1]), "eight equal MACs: {macs:?}");
    }
}
