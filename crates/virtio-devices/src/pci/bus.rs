//! The root bus: slots, configuration access mechanisms (0xCF8/0xCFC and
//! ECAM), BAR mapping and hot-plug.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use vm_device::{Bus, BusDevice};

use super::config::{
    BarReprogram, PciBar, PciBarRange, PciBarRegionType, PciConfiguration, PciHeader,
};
use super::{BarAllocator, IoEventRegistrar, PciDevice, PciError};
use crate::ratelimit::LogLimiter;
use vmm_sys_util::eventfd::EventFd;

/// Number of device slots on the bus.
pub const NUM_SLOTS: u8 = 32;
/// Size of one bus's ECAM window (32 devices × 8 functions × 4 KiB).
pub const ECAM_BUS_SIZE: u64 = 1 << 20;
/// Port of the configuration address register (data follows at +4).
pub const PCI_CONFIG_IO_PORT: u64 = 0xcf8;
/// Size of the 0xCF8 port range.
pub const PCI_CONFIG_IO_SIZE: u64 = 8;

/// A shared PCI function.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The host bridge at slot 0.
pub struct PciRoot {
    config: PciConfiguration,
}

impl PciRoot {
    /// A host bridge (class 06/00).
    pub fn new() -> Self {
        PciRoot {
            config: PciConfiguration::new(&PciHeader {
                vendor_id: 0x8086,
                device_id: 0x0d57,
                class: 0x06,
                subclass: 0x00,
                prog_if: 0,
                revision: 0,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            }),
        }
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for PciRoot {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }
    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) -> Vec<BarReprogram> {
        self.config.write_reg(reg, offset, data)
    }
    crate::pci_no_bars!();
}

/// Puts a PCI device's BAR on a [`Bus`]: accesses are forwarded to
/// [`PciDevice::read_bar`]/[`PciDevice::write_bar`].
pub struct BarBusAdapter(pub SharedPciDevice);

impl BusDevice for BarBusAdapter {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        lock(&self.0).read_bar(base, offset, data);
    }
    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        lock(&self.0).write_bar(base, offset, data);
    }
}

/// Where the guest may place BARs: `(start, size)` windows (a zero size
/// disables one), as in the host bridge's `_CRS`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BarWindows {
    /// 32-bit memory window (below 4 GiB).
    pub mmio32: (u64, u64),
    /// 64-bit memory window.
    pub mmio64: (u64, u64),
    /// I/O port window.
    pub io: (u64, u64),
}

impl BarWindows {
    /// Whether `[addr, addr + size)` lies in a window a BAR of type `t` may use.
    pub fn allows(&self, t: PciBarRegionType, addr: u64, size: u64) -> bool {
        let inside = |(start, len): (u64, u64)| {
            let (Some(end), Some(wend)) = (addr.checked_add(size), start.checked_add(len)) else {
                return false;
            };
            len > 0 && addr >= start && end <= wend
        };
        match t {
            PciBarRegionType::Io => inside(self.io),
            PciBarRegionType::Memory32 => inside(self.mmio32),
            PciBarRegionType::Memory64 => inside(self.mmio64) || inside(self.mmio32),
        }
    }
}

/// A first-fit allocator over a 32-bit MMIO window, a 64-bit MMIO window
/// and an I/O port window.
pub struct RangeAllocator {
    windows: [(u64, u64); 3],
    used: BTreeMap<u64, u64>,
}

impl RangeAllocator {
    /// Windows are `(start, size)`; a zero size disables one.
    pub fn new(mmio32: (u64, u64), mmio64: (u64, u64), io: (u64, u64)) -> Self {
        RangeAllocator {
            windows: [mmio32, mmio64, io],
            used: BTreeMap::new(),
        }
    }

    /// The windows it allocates from (for [`PciBus::set_bar_windows`]).
    pub fn windows(&self) -> BarWindows {
        BarWindows {
            mmio32: self.windows[0],
            mmio64: self.windows[1],
            io: self.windows[2],
        }
    }

    /// Takes `[addr, addr + size)` for a BAR of type `t` placed by someone
    /// else (a restored device at its saved address); `false` if the range
    /// is outside the windows or taken.
    pub fn reserve(&mut self, t: PciBarRegionType, addr: u64, size: u64) -> bool {
        if size == 0 || !self.windows().allows(t, addr, size) || !self.fits(addr, size) {
            return false;
        }
        self.used.insert(addr, size);
        true
    }

    fn fits(&self, start: u64, size: u64) -> bool {
        let end = start + size;
        let before = self.used.range(..end).next_back();
        before.is_none_or(|(&s, &len)| s + len <= start)
    }
}

impl BarAllocator for RangeAllocator {
    fn allocate(&mut self, bar: &PciBar) -> Option<u64> {
        let order: &[usize] = match bar.region_type {
            PciBarRegionType::Io => &[2],
            PciBarRegionType::Memory32 => &[0],
            PciBarRegionType::Memory64 => &[1, 0],
        };
        for &w in order {
            let (start, size) = self.windows[w];
            let end = start.checked_add(size)?;
            let mut addr = start.checked_add(bar.size - 1)? & !(bar.size - 1);
            while addr.checked_add(bar.size).is_some_and(|e| e <= end) {
                if self.fits(addr, bar.size) {
                    self.used.insert(addr, bar.size);
                    return Some(addr);
                }
                addr += bar.size;
            }
        }
        None
    }
    fn free(&mut self, range: &PciBarRange) {
        self.used.remove(&range.addr);
    }
}

/// A BAR as the bus mapped it: the record guest moves and hot-unplug go
/// by (never the device's own idea of where it is).
struct MappedBar {
    /// Where it is mapped now.
    range: PciBarRange,
    /// What the allocator handed out (freed on detach).
    allocated: PciBarRange,
    /// The bus device at `range` (removed only if it is still this one).
    adapter: Arc<Mutex<dyn BusDevice>>,
}

/// The root bus: up to 32 single-function devices, slot 0 the host bridge.
pub struct PciBus {
    devices: BTreeMap<u8, SharedPciDevice>,
    mapped: BTreeMap<u8, Vec<MappedBar>>,
    mmio_bus: Arc<Bus>,
    pio_bus: Arc<Bus>,
    ioevents: Arc<dyn IoEventRegistrar>,
    windows: Option<BarWindows>,
    log: LogLimiter,
    /// Chipset functions other than function 0 (`(slot, function)`).
    functions: BTreeMap<(u8, u8), SharedPciDevice>,
}

/// Removes the mapping at `base` from `bus` only if it is `adapter`'s.
fn remove_own(bus: &Bus, base: u64, adapter: &Arc<Mutex<dyn BusDevice>>) {
    let ours = bus.resolve(base).is_some_and(|(r, d)| {
        r.base == base && std::ptr::addr_eq(Arc::as_ptr(&d), Arc::as_ptr(adapter))
    });
    if ours {
        let _ = bus.remove(base);
    } else {
        log::warn!("pci: mapping at {base:#x} is not the BAR's, left alone");
    }
}

impl PciBus {
    /// A bus with the host bridge in slot 0. BARs are mapped on `mmio_bus`
    /// and `pio_bus`, notifications wired with `ioevents`.
    pub fn new(mmio_bus: Arc<Bus>, pio_bus: Arc<Bus>, ioevents: Arc<dyn IoEventRegistrar>) -> Self {
        let mut devices: BTreeMap<u8, SharedPciDevice> = BTreeMap::new();
        devices.insert(0, Arc::new(Mutex::new(PciRoot::new())));
        PciBus {
            devices,
            mapped: BTreeMap::new(),
            mmio_bus,
            pio_bus,
            ioevents,
            windows: None,
            log: LogLimiter::new("pci"),
            functions: BTreeMap::new(),
        }
    }

    /// Puts a chipset function without BARs (a host bridge, an ISA bridge,
    /// a power-management function) at `slot`.`function`, for firmware
    /// that looks for a known chipset. Slot 0 function 0 replaces the host
    /// bridge; any other function 0 takes its slot, which is then never
    /// handed to a device.
    pub fn set_chipset_function(
        &mut self,
        slot: u8,
        function: u8,
        device: SharedPciDevice,
    ) -> Result<(), PciError> {
        if slot >= NUM_SLOTS || function > 7 {
            return Err(PciError::SlotUnavailable(slot));
        }
        if function == 0 {
            if slot != 0 && self.devices.contains_key(&slot) {
                return Err(PciError::SlotUnavailable(slot));
            }
            self.devices.insert(slot, device);
        } else {
            self.functions.insert((slot, function), device);
        }
        Ok(())
    }

    /// Confines guest BAR moves to `windows` (normally
    /// [`RangeAllocator::windows`]); without it any free range is accepted.
    pub fn set_bar_windows(&mut self, windows: BarWindows) {
        self.windows = Some(windows);
    }

    /// The lowest free slot.
    pub fn next_free_slot(&self) -> Option<u8> {
        (1..NUM_SLOTS).find(|s| !self.devices.contains_key(s))
    }

    /// The occupied slots (for ACPI hot-plug status registers).
    pub fn slots(&self) -> Vec<u8> {
        self.devices.keys().copied().collect()
    }

    /// The device in `slot`.
    pub fn device(&self, slot: u8) -> Option<SharedPciDevice> {
        self.devices.get(&slot).cloned()
    }

    fn bus_for(&self, t: PciBarRegionType) -> &Bus {
        if t == PciBarRegionType::Io {
            &self.pio_bus
        } else {
            &self.mmio_bus
        }
    }

    /// Plugs `device` into `slot` (or the lowest free one): allocates and
    /// maps its BARs, registers its ioeventfds. Returns the slot.
    pub fn attach(
        &mut self,
        slot: Option<u8>,
        device: SharedPciDevice,
        allocator: &mut dyn BarAllocator,
    ) -> Result<u8, PciError> {
        let slot = match slot {
            Some(s) if s == 0 || s >= NUM_SLOTS || self.devices.contains_key(&s) => {
                return Err(PciError::SlotUnavailable(s))
            }
            Some(s) => s,
            None => self.next_free_slot().ok_or(PciError::NoFreeSlot)?,
        };
        let mut dev = lock(&device);
        let ranges = dev.allocate_bars(allocator)?;
        let mut mapped: Vec<MappedBar> = Vec::new();
        for r in &ranges {
            let adapter: Arc<Mutex<dyn BusDevice>> =
                Arc::new(Mutex::new(BarBusAdapter(device.clone())));
            if let Err(e) =
                self.bus_for(r.bar.region_type)
                    .insert(adapter.clone(), r.addr, r.bar.size)
            {
                for m in &mapped {
                    remove_own(
                        self.bus_for(m.range.bar.region_type),
                        m.range.addr,
                        &m.adapter,
                    );
                }
                for r in &ranges {
                    allocator.free(r);
                }
                return Err(PciError::Bus(e));
            }
            mapped.push(MappedBar {
                range: *r,
                allocated: *r,
                adapter,
            });
        }
        let mut registered = Vec::new();
        for (addr, fd) in dev.ioeventfds() {
            if let Err(e) = self.ioevents.register_ioevent(fd, addr) {
                // Undo everything so a failed hot-plug leaves no trace.
                for (a, f) in registered {
                    let _ = self.ioevents.unregister_ioevent(f, a);
                }
                for m in &mapped {
                    remove_own(
                        self.bus_for(m.range.bar.region_type),
                        m.range.addr,
                        &m.adapter,
                    );
                    allocator.free(&m.allocated);
                }
                return Err(PciError::IoEvent(e));
            }
            registered.push((addr, fd));
        }
        drop(registered);
        drop(dev);
        self.devices.insert(slot, device);
        self.mapped.insert(slot, mapped);
        Ok(slot)
    }

    /// Unplugs the device in `slot`: unmaps its BARs, unregisters its
    /// ioeventfds, frees its ranges. Returns the device.
    pub fn detach(
        &mut self,
        slot: u8,
        allocator: &mut dyn BarAllocator,
    ) -> Result<SharedPciDevice, PciError> {
        if slot == 0 {
            return Err(PciError::SlotUnavailable(0));
        }
        let device = self
            .devices
            .remove(&slot)
            .ok_or(PciError::EmptySlot(slot))?;
        let mut dev = lock(&device);
        for (addr, fd) in dev.ioeventfds() {
            if let Err(e) = self.ioevents.unregister_ioevent(fd, addr) {
                log::warn!("pci slot {slot}: unregister ioeventfd at {addr:#x}: {e}");
            }
        }
        for m in self.mapped.remove(&slot).unwrap_or_default() {
            remove_own(
                self.bus_for(m.range.bar.region_type),
                m.range.addr,
                &m.adapter,
            );
            allocator.free(&m.allocated);
        }
        dev.unplugged();
        drop(dev);
        Ok(device)
    }

    /// Reads register `reg` of `(bus, slot, function)`; absent functions
    /// read all ones.
    pub fn read_config(&self, bus: u8, slot: u8, function: u8, reg: usize) -> u32 {
        if bus == 0 && function != 0 {
            return self
                .functions
                .get(&(slot, function))
                .map_or(0xffff_ffff, |d| lock(d).read_config_register(reg));
        }
        if bus != 0 {
            return 0xffff_ffff;
        }
        match self.devices.get(&slot) {
            Some(d) => lock(d).read_config_register(reg),
            None => 0xffff_ffff,
        }
    }

    /// Writes register `reg` of `(bus, slot, function)` and re-maps any BAR
    /// the guest moved. A move the bus cannot make (overlap with any other
    /// mapping, outside the windows, wrapping around) changes nothing: the
    /// BAR reads back where it is.
    pub fn write_config(
        &mut self,
        bus: u8,
        slot: u8,
        function: u8,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) {
        if bus == 0 && function != 0 {
            if let Some(d) = self.functions.get(&(slot, function)) {
                // Chipset functions have no BARs to move.
                let _ = lock(d).write_config_register(reg, offset, data);
            }
            return;
        }
        if bus != 0 {
            return;
        }
        let Some(device) = self.devices.get(&slot).cloned() else {
            return;
        };
        let mut dev = lock(&device);
        for mv in dev.write_config_register(reg, offset, data) {
            if let Err(e) = self.move_bar(slot, &mut *dev, &mv) {
                dev.refuse_bar_move(&mv);
                crate::guest_log!(
                    &self.log,
                    log::Level::Warn,
                    "pci slot {slot}: BAR {} not moved to {:#x}: {e}",
                    mv.bar.index,
                    mv.new_addr
                );
            }
        }
    }

    /// Moves a mapped BAR: validates the new range, maps it (the bus
    /// refuses overlaps), moves the ioeventfds inside it, unmaps the old
    /// range and only then records the move, in the bus and the device.
    fn move_bar(
        &mut self,
        slot: u8,
        dev: &mut dyn PciDevice,
        mv: &BarReprogram,
    ) -> Result<(), PciError> {
        let t = mv.bar.region_type;
        let index = mv.bar.index;
        let (old, size, adapter) = self
            .mapped
            .get(&slot)
            .and_then(|bars| bars.iter().find(|m| m.range.bar.index == index))
            .map(|m| (m.range.addr, m.range.bar.size, m.adapter.clone()))
            .ok_or(PciError::BarNotMapped(index))?;
        let new = mv.new_addr;
        let out_of_range = PciError::BarOutOfRange { addr: new, size };
        if new.checked_add(size).is_none() {
            return Err(out_of_range);
        }
        if self.windows.is_some_and(|w| !w.allows(t, new, size)) {
            return Err(out_of_range);
        }
        let bus = self.bus_for(t);
        bus.insert(adapter.clone(), new, size)
            .map_err(PciError::Bus)?;
        {
            let inside = |addr: u64| addr.checked_sub(old).filter(|off| *off < size);
            let fds: Vec<(u64, &EventFd)> = dev
                .ioeventfds()
                .into_iter()
                .filter(|(addr, _)| inside(*addr).is_some())
                .collect();
            let mut registered = Vec::new();
            for (addr, fd) in &fds {
                let at = new + (addr - old);
                if let Err(e) = self.ioevents.register_ioevent(fd, at) {
                    for (a, f) in registered {
                        let _ = self.ioevents.unregister_ioevent(f, a);
                    }
                    remove_own(bus, new, &adapter);
                    return Err(PciError::IoEvent(e));
                }
                registered.push((at, *fd));
            }
            for (addr, fd) in fds {
                if let Err(e) = self.ioevents.unregister_ioevent(fd, addr) {
                    log::warn!("pci slot {slot}: unregister ioeventfd at {addr:#x}: {e}");
                }
            }
        }
        remove_own(bus, old, &adapter);
        if let Some(m) = self
            .mapped
            .get_mut(&slot)
            .and_then(|bars| bars.iter_mut().find(|m| m.range.bar.index == index))
        {
            m.range.addr = new;
        }
        dev.move_bar(&BarReprogram {
            bar: mv.bar,
            old_addr: old,
            new_addr: new,
        });
        Ok(())
    }
}

/// Splits a config access at byte `offset` of the space into a register
/// index and the offset within it, rejecting accesses that cross a dword.
fn split_access(offset: u64, len: usize) -> Option<(usize, u64)> {
    let within = offset & 3;
    (len > 0 && within + len as u64 <= 4).then_some(((offset >> 2) as usize, within))
}

fn read_part(value: u32, within: u64, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    let w = within as usize;
    data.copy_from_slice(&bytes[w..w + data.len()]);
}

/// The 0xCF8 (address) / 0xCFC (data) configuration mechanism, a
/// [`BusDevice`] for the PIO bus at [`PCI_CONFIG_IO_PORT`] with size
/// [`PCI_CONFIG_IO_SIZE`].
pub struct PciConfigIo {
    bus: Arc<Mutex<PciBus>>,
    address: u32,
    reset: Option<Box<dyn Fn() + Send>>,
}

/// The reset control register (0xCF9) bit that resets the machine.
const RESET_CONTROL_RESET: u8 = 1 << 2;

impl PciConfigIo {
    /// Config access to `bus` through ports.
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        PciConfigIo {
            bus,
            address: 0,
            reset: None,
        }
    }

    /// Also answers the chipset's reset control register at 0xCF9 (a byte
    /// write with bit 2 set calls `reset`), as PIIX3 and ICH9 do.
    pub fn with_reset_control(mut self, reset: Box<dyn Fn() + Send>) -> Self {
        self.reset = Some(reset);
        self
    }

    fn target(&self) -> Option<(u8, u8, u8, usize)> {
        if self.address & 0x8000_0000 == 0 {
            return None;
        }
        let a = self.address;
        Some((
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 0x7) as u8,
            ((a >> 2) & 0x3f) as usize,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if offset < 4 {
            if let Some((reg, within)) = split_access(offset, data.len()) {
                debug_assert_eq!(reg, 0);
                read_part(self.address, within, data);
            }
            return;
        }
        let (Some((bus, slot, func, reg)), Some((_, within))) =
            (self.target(), split_access(offset - 4, data.len()))
        else {
            return;
        };
        let v = lock(&self.bus).read_config(bus, slot, func, reg);
        read_part(v, within, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset == 1 && data.len() == 1 && data[0] & RESET_CONTROL_RESET != 0 {
            if let Some(reset) = &self.reset {
                reset();
            }
            return;
        }
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                self.address = u32::from_le_bytes(b);
            }
            return;
        }
        let (Some((bus, slot, func, reg)), Some((_, within))) =
            (self.target(), split_access(offset - 4, data.len()))
        else {
            return;
        };
        lock(&self.bus).write_config(bus, slot, func, reg, within, data);
    }
}

/// ECAM (PCIe enhanced configuration access), a [`BusDevice`] for the
/// MMIO bus at the address the MCFG table gives, [`ECAM_BUS_SIZE`] per bus.
pub struct PciConfigMmio {
    bus: Arc<Mutex<PciBus>>,
}

impl PciConfigMmio {
    /// ECAM access to `bus`.
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        PciConfigMmio { bus }
    }

    fn decode(offset: u64) -> (u8, u8, u8, u64) {
        (
            ((offset >> 20) & 0xff) as u8,
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 0x7) as u8,
            offset & 0xfff,
        )
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let (bus, slot, func, reg_off) = Self::decode(offset);
        let Some((reg, within)) = split_access(reg_off, data.len()) else {
            return;
        };
        let v = lock(&self.bus).read_config(bus, slot, func, reg);
        read_part(v, within, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let (bus, slot, func, reg_off) = Self::decode(offset);
        let Some((reg, within)) = split_access(reg_off, data.len()) else {
            return;
        };
        lock(&self.bus).write_config(bus, slot, func, reg, within, data);
    }
}

#[cfg(test)]
#[path = "bus_tests.rs"]
mod tests;
