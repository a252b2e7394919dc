//! PCI: configuration space, MSI-X, the [`PciDevice`] trait and a root bus
//! reachable through both the 0xCF8/0xCFC mechanism and ECAM.
//!
//! The VMM owns the address allocation (a [`BarAllocator`]) and the buses;
//! [`PciBus::attach`] places a device's BARs, maps them on the MMIO/PIO
//! [`vm_device::Bus`], registers its ioeventfds and puts it in a slot, and
//! [`PciBus::detach`] undoes all of it: the same two calls serve boot-time
//! set-up and hot-plug.

/// The [`PciDevice`](crate::PciDevice) methods of a function without BARs
/// (a host bridge, a chipset function): nothing to allocate or move, BAR
/// reads all ones, writes dropped. Used inside an `impl PciDevice` block.
#[macro_export]
macro_rules! pci_no_bars {
    () => {
        fn allocate_bars(
            &mut self,
            _allocator: &mut dyn $crate::pci::BarAllocator,
        ) -> Result<Vec<$crate::pci::PciBarRange>, $crate::pci::PciError> {
            Ok(Vec::new())
        }
        fn bar_ranges(&self) -> Vec<$crate::pci::PciBarRange> {
            Vec::new()
        }
        fn move_bar(&mut self, _mv: &$crate::pci::BarReprogram) {}
        fn refuse_bar_move(&mut self, _mv: &$crate::pci::BarReprogram) {}
        fn read_bar(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
            data.fill(0xff);
        }
        fn write_bar(&mut self, _base: u64, _offset: u64, _data: &[u8]) {}
    };
}

pub mod bus;
pub mod config;
pub mod msix;

use std::io;

use vmm_sys_util::eventfd::EventFd;

pub use bus::{BarWindows, PciBus, PciConfigIo, PciConfigMmio, PciRoot};
pub use config::{
    BarReprogram, PciBar, PciBarRange, PciBarRegionType, PciConfiguration, PciHeader,
};
pub use msix::MsixConfig;

/// Errors of PCI set-up.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// No address space left for a BAR.
    #[error("no address space for BAR {index} ({size:#x} bytes)")]
    BarAllocation {
        /// BAR index.
        index: usize,
        /// BAR size.
        size: u64,
    },
    /// The configuration space rejected a BAR.
    #[error("configuration space")]
    Config(#[source] config::ConfigError),
    /// The slot is taken or beyond 31.
    #[error("PCI slot {0} unavailable")]
    SlotUnavailable(u8),
    /// Every slot is taken.
    #[error("no free PCI slot")]
    NoFreeSlot,
    /// No device in that slot.
    #[error("no device in PCI slot {0}")]
    EmptySlot(u8),
    /// A BAR could not be put on (or removed from) a bus.
    #[error("bus mapping")]
    Bus(#[source] vm_device::BusError),
    /// An ioeventfd could not be (un)registered.
    #[error("ioeventfd registration")]
    IoEvent(#[source] io::Error),
    /// The bus has no mapping for that BAR.
    #[error("BAR {0} is not mapped")]
    BarNotMapped(usize),
    /// The range wraps around or lies outside the BAR windows.
    #[error("BAR range {addr:#x}+{size:#x} is outside the BAR windows")]
    BarOutOfRange {
        /// Requested address.
        addr: u64,
        /// BAR size.
        size: u64,
    },
}

/// Places BARs in the guest address space. The VMM implements it over its
/// address allocator; [`bus::RangeAllocator`] is a simple one.
pub trait BarAllocator: Send {
    /// An address for `bar`, aligned to its size, in the window its type
    /// needs (below 4 GiB for 32-bit and I/O BARs); `None` if full.
    fn allocate(&mut self, bar: &PciBar) -> Option<u64>;
    /// Returns a BAR's range to the allocator (hot-unplug).
    fn free(&mut self, range: &PciBarRange);
}

/// Registers KVM ioeventfds: a guest write of any size to `addr` (MMIO)
/// signals `fd` without a VM exit to userspace.
pub trait IoEventRegistrar: Send + Sync {
    /// Starts signalling `fd` on writes to `addr`.
    fn register_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()>;
    /// Stops it.
    fn unregister_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()>;
}

/// An [`IoEventRegistrar`] that registers nothing: notifications then reach
/// devices through the BAR write handler, with a VM exit each.
pub struct NoIoEvents;

impl IoEventRegistrar for NoIoEvents {
    fn register_ioevent(&self, _fd: &EventFd, _addr: u64) -> io::Result<()> {
        Ok(())
    }
    fn unregister_ioevent(&self, _fd: &EventFd, _addr: u64) -> io::Result<()> {
        Ok(())
    }
}

/// A PCI function on the root bus.
///
/// Configuration accesses arrive as 32-bit register indices (0-63, or up
/// to 1023 through ECAM); BAR accesses arrive from the MMIO/PIO bus with
/// the BAR's base address. Nothing here may panic on guest input.
pub trait PciDevice: Send {
    /// Reads configuration register `reg`.
    fn read_config_register(&mut self, reg: usize) -> u32;
    /// Writes `data` at byte `offset` (0-3) of register `reg`; returns the
    /// BARs the guest moved.
    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) -> Vec<BarReprogram>;
    /// Places every BAR with `allocator` and returns the ranges.
    fn allocate_bars(
        &mut self,
        allocator: &mut dyn BarAllocator,
    ) -> Result<Vec<PciBarRange>, PciError>;
    /// The BARs as currently placed.
    fn bar_ranges(&self) -> Vec<PciBarRange>;
    /// The bus moved `mv.bar` to `mv.new_addr` (mapping and ioeventfds):
    /// record it.
    fn move_bar(&mut self, mv: &BarReprogram);
    /// The bus refused to move `mv.bar` (overlap, outside the window,
    /// overflow): the BAR must read back where it is still mapped.
    fn refuse_bar_move(&mut self, mv: &BarReprogram);
    /// A read at `offset` in the BAR based at `base`.
    fn read_bar(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// A write at `offset` in the BAR based at `base`.
    fn write_bar(&mut self, base: u64, offset: u64, data: &[u8]);
    /// MMIO addresses to wire as ioeventfds, with their eventfds.
    fn ioeventfds(&self) -> Vec<(u64, &EventFd)> {
        Vec::new()
    }
    /// The device left the bus (hot-unplug): stop its work. Called by
    /// [`PciBus::detach`] after its BARs and ioeventfds are gone.
    fn unplugged(&mut self) {}
}

/// Places every BAR of `config` with `allocator` (helper for devices).
pub fn allocate_config_bars(
    config: &mut PciConfiguration,
    allocator: &mut dyn BarAllocator,
) -> Result<Vec<PciBarRange>, PciError> {
    let bars: Vec<PciBar> = config.bars().collect();
    let mut ranges = Vec::new();
    for bar in bars {
        let Some(addr) = allocator.allocate(&bar) else {
            for r in &ranges {
                allocator.free(r);
            }
            return Err(PciError::BarAllocation {
                index: bar.index,
                size: bar.size,
            });
        };
        config
            .set_bar_addr(bar.index, addr)
            .map_err(PciError::Config)?;
        ranges.push(PciBarRange { bar, addr });
    }
    Ok(ranges)
}

/// The placed BARs of `config`.
pub fn config_bar_ranges(config: &PciConfiguration) -> Vec<PciBarRange> {
    config
        .bars()
        .map(|bar| PciBarRange {
            bar,
            addr: config.bar_addr(bar.index),
        })
        .collect()
}
