//! The PCI side of the VM: the root bus on 0xCF8/0xCFC and ECAM, BAR
//! windows, MSI-X through KVM routing, and the virtio devices of the
//! command line, plus what the guest needs in ACPI to find them (the host
//! bridge in the DSDT, the MCFG table).
//!
//! Devices are attached to slots at build time; the bus, its allocator and
//! the interrupt manager stay in [`PciDevices`] so devices can be attached
//! or detached later (hot-plug) with the same calls.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use acpi_tables::aml::{self, AddressSpace, AddressSpaceCacheable};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;
use kvm_ioctls::VmFd;
use virtio_devices::block::{Block, BlockConfig};
use virtio_devices::config::{NetBackend, NetConfig, VsockConfig};
use virtio_devices::console::{Console, ConsoleOutput};
use virtio_devices::fs::{Fs, FsConfig};
use virtio_devices::net::Net;
use virtio_devices::pci::bus::{RangeAllocator, PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_SIZE};
use virtio_devices::pci::{PciConfigIo, PciConfigMmio};
use virtio_devices::rng::Rng;
use virtio_devices::vsock::Vsock;
use virtio_devices::{PciBus, PciDevice, VirtioDevice, VirtioPciDevice};
use vm_device::Bus;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::arch::acpi::AcpiExtras;
use crate::arch::layout::*;
use crate::interrupt::{KvmIoEvents, KvmMsiManager};

/// The virtio devices of a VM, as given on the command line.
#[derive(Debug, Clone, Default)]
pub struct DeviceConfig {
    pub disks: Vec<BlockConfig>,
    pub nets: Vec<NetConfig>,
    pub vsock: Option<VsockConfig>,
    pub fs: Vec<FsConfig>,
    pub rng: bool,
    pub console: Option<ConsoleOutput>,
}

impl DeviceConfig {
    /// Whether guest RAM must be shareable with another process.
    pub fn needs_shared_memory(&self) -> bool {
        !self.fs.is_empty()
    }
}

/// Why a device could not be set up.
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
        source: virtio_devices::pci::PciError,
    },
    #[error("cannot place the PCI configuration space on the bus")]
    Bus(#[source] vm_device::BusError),
}

/// The PCI bus and what attaching devices to it needs.
pub struct PciDevices {
    bus: Arc<Mutex<PciBus>>,
    allocator: Mutex<RangeAllocator>,
    msi: KvmMsiManager,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    mmio64: (u64, u64),
    attached: Vec<(u8, String)>,
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

impl PciDevices {
    /// Creates the root bus and its configuration-space windows.
    pub fn new(
        vm: Arc<VmFd>,
        io_bus: Arc<Bus>,
        mmio_bus: Arc<Bus>,
        mem: &GuestMemoryMmap,
        mem_size: u64,
    ) -> Result<Self, DeviceError> {
        let ioevents = Arc::new(KvmIoEvents::new(vm.clone()));
        let bus = Arc::new(Mutex::new(PciBus::new(mmio_bus.clone(), io_bus.clone(), ioevents)));
        io_bus
            .insert(Arc::new(Mutex::new(PciConfigIo::new(bus.clone()))), PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_SIZE)
            .map_err(DeviceError::Bus)?;
        mmio_bus
            .insert(Arc::new(Mutex::new(PciConfigMmio::new(bus.clone()))), PCI_ECAM_START, PCI_ECAM_SIZE)
            .map_err(DeviceError::Bus)?;
        let mmio64 = pci_mmio64(mem_size);
        Ok(Self {
            bus,
            allocator: Mutex::new(RangeAllocator::new(PCI_MMIO32, mmio64, PCI_IO)),
            msi: KvmMsiManager::new(vm),
            mem: GuestMemoryAtomic::new(mem.clone()),
            mmio64,
            attached: Vec::new(),
        })
    }

    /// Wraps `device` in the virtio-pci transport and plugs it in.
    pub fn attach_virtio(&mut self, name: String, device: Arc<Mutex<dyn VirtioDevice>>) -> Result<u8, DeviceError> {
        let transport = VirtioPciDevice::new(device, self.mem.clone(), &self.msi)
            .map_err(|source| DeviceError::Transport { name: name.clone(), source })?;
        let pci: Arc<Mutex<dyn PciDevice>> = Arc::new(Mutex::new(transport));
        let mut allocator = self.allocator.lock().unwrap_or_else(|e| e.into_inner());
        let slot = self
            .bus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .attach(None, pci, &mut *allocator)
            .map_err(|source| DeviceError::Attach { name: name.clone(), source })?;
        log::debug!("PCI slot {slot}: {name}");
        self.attached.push((slot, name));
        Ok(slot)
    }

    /// Creates and attaches every device in `cfg`.
    pub fn attach_all(&mut self, cfg: &DeviceConfig) -> Result<(), DeviceError> {
        for disk in &cfg.disks {
            let path = disk.path.display().to_string();
            let dev = Block::new(disk).map_err(|source| DeviceError::Block { path: path.clone(), source })?;
            self.attach_virtio(format!("virtio-blk {path}"), Arc::new(Mutex::new(dev)))?;
        }
        for net in &cfg.nets {
            let mac = net.mac.unwrap_or_else(random_mac);
            let (name, dev) = match &net.backend {
                NetBackend::Tap(tap) => (tap.clone(), Net::with_tap_name(tap, mac)),
                NetBackend::Fd(fd) => {
                    // SAFETY: the fd was handed to this process for this NIC
                    // (`--net fd=N`); nothing else in the VMM owns it.
                    let owned = unsafe { OwnedFd::from_raw_fd(*fd) };
                    (format!("fd {fd}"), Net::with_tap_fd(owned, mac))
                }
            };
            let dev = dev.map_err(|source| DeviceError::Net { name: name.clone(), source })?;
            self.attach_virtio(format!("virtio-net {name}"), Arc::new(Mutex::new(dev)))?;
        }
        if let Some(v) = &cfg.vsock {
            let path = v.socket.display().to_string();
            let dev =
                Vsock::new(v.cid, &v.socket).map_err(|source| DeviceError::Vsock { path: path.clone(), source })?;
            self.attach_virtio(format!("virtio-vsock cid {} {path}", v.cid), Arc::new(Mutex::new(dev)))?;
        }
        for fs in &cfg.fs {
            let dev = Fs::new(fs).map_err(|source| DeviceError::Fs { tag: fs.tag.clone(), source })?;
            self.attach_virtio(format!("virtio-fs {}", fs.tag), Arc::new(Mutex::new(dev)))?;
        }
        if cfg.rng {
            self.attach_virtio("virtio-rng".into(), Arc::new(Mutex::new(Rng::new())))?;
        }
        if let Some(out) = &cfg.console {
            let dev = Console::new(out).map_err(DeviceError::Console)?;
            self.attach_virtio("virtio-console".into(), Arc::new(Mutex::new(dev)))?;
        }
        Ok(())
    }

    /// The devices attached so far, by slot.
    pub fn attached(&self) -> &[(u8, String)] {
        &self.attached
    }

    /// The ACPI pieces for the bus: the host bridge in `\_SB` with its
    /// windows, and MCFG for ECAM.
    pub fn acpi(&self) -> AcpiExtras {
        AcpiExtras { sb_aml: pci_host_bridge(self.mmio64), tables: vec![mcfg()] }
    }
}

/// `\_SB.PCI0`: a PCI Express host bridge for bus 0 with the config ports,
/// the I/O window and both memory windows in `_CRS`.
fn pci_host_bridge(mmio64: (u64, u64)) -> Vec<u8> {
    let (m32_start, m32_size) = PCI_MMIO32;
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
    let children: Vec<&dyn Aml> = fields.iter().map(|f| f as &dyn Aml).collect();
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
        let aml = pci_host_bridge(pci_mmio64(1 << 30));
        assert!(aml.windows(4).any(|w| w == b"PCI0"));
        assert!(aml.windows(4).any(|w| w == b"_CRS"));
    }

    #[test]
    fn macs_are_local_unicast() {
        let m = random_mac();
        assert_eq!(m[0], 0x02);
    }
}
