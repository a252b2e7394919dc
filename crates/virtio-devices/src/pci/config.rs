//! Type-0 PCI configuration space: ids, command/status, six BARs with size
//! probing, and a capability list.

/// Number of 32-bit registers in the (conventional) configuration space.
pub const NUM_CONFIG_REGISTERS: usize = 64;
/// Number of BARs in a type-0 header.
pub const NUM_BARS: usize = 6;
/// First register holding a BAR.
const BAR0_REG: usize = 4;
const COMMAND_REG: usize = 1;
const STATUS_CAP_LIST: u32 = 1 << 20;
const CAP_POINTER_REG: usize = 13;
const INTERRUPT_REG: usize = 15;
/// Capabilities start right after the standard header.
const FIRST_CAP_OFFSET: usize = 0x40;

/// Command register: I/O space decoding.
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
/// Command register: memory space decoding.
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
/// Command register: bus mastering.
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: INTx disabled.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;

/// Errors building a configuration space.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// BAR index beyond 5, or a 64-bit BAR at index 5.
    #[error("invalid BAR index {0}")]
    InvalidBarIndex(usize),
    /// The BAR (or the upper half of a 64-bit BAR) is already in use.
    #[error("BAR {0} already in use")]
    BarInUse(usize),
    /// Size not a power of two, or too small for its type.
    #[error("invalid BAR size {0:#x}")]
    InvalidBarSize(u64),
    /// The address is not aligned to the BAR's size.
    #[error("BAR address {0:#x} not aligned to its size")]
    UnalignedBar(u64),
    /// No room left for the capability.
    #[error("no room for a capability of {0} bytes")]
    CapabilitySpace(usize),
    /// Restored registers name another function (vendor, device, class).
    #[error("saved configuration space belongs to another kind of device")]
    Identity,
    /// A restored BAR register does not point where the BAR is mapped.
    #[error("saved BAR {index} at {addr:#x} is not where the BAR is mapped")]
    BarNotMapped {
        /// BAR index.
        index: usize,
        /// Address in the saved register.
        addr: u64,
    },
}

/// What a BAR maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PciBarRegionType {
    /// 32-bit memory BAR.
    Memory32,
    /// 64-bit memory BAR (takes two BAR slots).
    Memory64,
    /// Port I/O BAR.
    Io,
}

/// A BAR as the device declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciBar {
    /// BAR index (0-5).
    pub index: usize,
    /// Size in bytes (a power of two).
    pub size: u64,
    /// Memory or I/O, 32 or 64 bits.
    pub region_type: PciBarRegionType,
    /// Prefetchable memory.
    pub prefetchable: bool,
}

/// A BAR placed at an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciBarRange {
    /// The BAR.
    pub bar: PciBar,
    /// Guest physical (or port) address.
    pub addr: u64,
}

/// A BAR the guest moved: the VMM must move the bus range (and any
/// ioeventfds) from `old_addr` to `new_addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarReprogram {
    /// The BAR that moved.
    pub bar: PciBar,
    /// Where it was mapped.
    pub old_addr: u64,
    /// Where the guest put it.
    pub new_addr: u64,
}

/// The header fields of a type-0 function.
#[derive(Debug, Clone, Copy)]
pub struct PciHeader {
    /// Vendor id.
    pub vendor_id: u16,
    /// Device id.
    pub device_id: u16,
    /// Class code (base class).
    pub class: u8,
    /// Subclass.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Revision id.
    pub revision: u8,
    /// Subsystem vendor id.
    pub subsystem_vendor_id: u16,
    /// Subsystem id.
    pub subsystem_id: u16,
}

/// A type-0 configuration space.
///
/// Writes go through a per-register mask of writable bits, so read-only
/// fields stay fixed and BAR size probing (write all ones, read back the
/// size mask) works by construction.
pub struct PciConfiguration {
    registers: [u32; NUM_CONFIG_REGISTERS],
    writable: [u32; NUM_CONFIG_REGISTERS],
    bars: [Option<PciBar>; NUM_BARS],
    /// Where each BAR is currently mapped on the VMM's buses.
    mapped: [Option<u64>; NUM_BARS],
    last_cap: Option<usize>,
    next_cap: usize,
    log: crate::ratelimit::LogLimiter,
}

impl PciConfiguration {
    /// A configuration space with `header` and no BARs or capabilities.
    pub fn new(header: &PciHeader) -> Self {
        let mut registers = [0u32; NUM_CONFIG_REGISTERS];
        let mut writable = [0u32; NUM_CONFIG_REGISTERS];
        registers[0] = u32::from(header.device_id) << 16 | u32::from(header.vendor_id);
        registers[2] = u32::from(header.class) << 24
            | u32::from(header.subclass) << 16
            | u32::from(header.prog_if) << 8
            | u32::from(header.revision);
        registers[11] =
            u32::from(header.subsystem_id) << 16 | u32::from(header.subsystem_vendor_id);
        // Command: I/O, memory, bus master, INTx disable are writable.
        writable[COMMAND_REG] = u32::from(
            COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE,
        );
        // Cache line size and latency timer.
        writable[3] = 0x0000_ffff;
        // Interrupt line is scratch for the OS; pin 0 = no INTx.
        writable[INTERRUPT_REG] = 0x0000_00ff;
        PciConfiguration {
            registers,
            writable,
            bars: [None; NUM_BARS],
            mapped: [None; NUM_BARS],
            last_cap: None,
            next_cap: FIRST_CAP_OFFSET,
            log: crate::ratelimit::LogLimiter::new("pci config"),
        }
    }

    /// Declares a BAR. It reads as address 0 until [`Self::set_bar_addr`].
    pub fn add_bar(&mut self, bar: PciBar) -> Result<(), ConfigError> {
        let wide = bar.region_type == PciBarRegionType::Memory64;
        if bar.index >= NUM_BARS || (wide && bar.index + 1 >= NUM_BARS) {
            return Err(ConfigError::InvalidBarIndex(bar.index));
        }
        let min = if bar.region_type == PciBarRegionType::Io {
            4
        } else {
            16
        };
        if !bar.size.is_power_of_two() || bar.size < min {
            return Err(ConfigError::InvalidBarSize(bar.size));
        }
        if bar.region_type != PciBarRegionType::Memory64 && bar.size > 1 << 31 {
            return Err(ConfigError::InvalidBarSize(bar.size));
        }
        let in_use = |i: usize| self.bars[i].is_some() || self.is_upper_half(i);
        if in_use(bar.index) || (wide && in_use(bar.index + 1)) {
            return Err(ConfigError::BarInUse(bar.index));
        }
        let mask = !(bar.size - 1);
        let reg = BAR0_REG + bar.index;
        self.registers[reg] = match bar.region_type {
            PciBarRegionType::Io => 1,
            PciBarRegionType::Memory32 => u32::from(bar.prefetchable) << 3,
            PciBarRegionType::Memory64 => 0b100 | u32::from(bar.prefetchable) << 3,
        };
        let low_flags = if bar.region_type == PciBarRegionType::Io {
            0x3
        } else {
            0xf
        };
        self.writable[reg] = (mask as u32) & !low_flags;
        if wide {
            self.writable[reg + 1] = (mask >> 32) as u32;
        }
        self.bars[bar.index] = Some(bar);
        Ok(())
    }

    fn is_upper_half(&self, index: usize) -> bool {
        index > 0
            && self.bars[index - 1].is_some_and(|b| b.region_type == PciBarRegionType::Memory64)
    }

    /// The declared BARs.
    pub fn bars(&self) -> impl Iterator<Item = PciBar> + '_ {
        self.bars.iter().flatten().copied()
    }

    /// The address currently programmed in BAR `index` (0 if none).
    pub fn bar_addr(&self, index: usize) -> u64 {
        let Some(bar) = self.bars.get(index).copied().flatten() else {
            return 0;
        };
        let reg = BAR0_REG + index;
        match bar.region_type {
            PciBarRegionType::Io => u64::from(self.registers[reg] & !0x3),
            PciBarRegionType::Memory32 => u64::from(self.registers[reg] & !0xf),
            PciBarRegionType::Memory64 => {
                u64::from(self.registers[reg + 1]) << 32 | u64::from(self.registers[reg] & !0xf)
            }
        }
    }

    /// Places BAR `index` at `addr` (done by the VMM's allocator). The BAR
    /// is then considered mapped there.
    pub fn set_bar_addr(&mut self, index: usize, addr: u64) -> Result<(), ConfigError> {
        let bar = self
            .bars
            .get(index)
            .copied()
            .flatten()
            .ok_or(ConfigError::InvalidBarIndex(index))?;
        if addr & (bar.size - 1) != 0 {
            return Err(ConfigError::UnalignedBar(addr));
        }
        if bar.region_type != PciBarRegionType::Memory64 && addr > u64::from(u32::MAX) {
            return Err(ConfigError::UnalignedBar(addr));
        }
        let reg = BAR0_REG + index;
        let flags = self.registers[reg]
            & if bar.region_type == PciBarRegionType::Io {
                0x3
            } else {
                0xf
            };
        self.registers[reg] = addr as u32 | flags;
        if bar.region_type == PciBarRegionType::Memory64 {
            self.registers[reg + 1] = (addr >> 32) as u32;
        }
        self.mapped[index] = Some(addr);
        Ok(())
    }

    /// Adds a capability. `body` starts with the capability id and a
    /// placeholder byte for the next pointer; `writable` (same length or
    /// shorter) gives the bits the guest may change. Returns its offset.
    pub fn add_capability(&mut self, body: &[u8], writable: &[u8]) -> Result<usize, ConfigError> {
        let len = (body.len().max(2) + 3) & !3;
        let offset = self.next_cap;
        if offset + len > NUM_CONFIG_REGISTERS * 4 {
            return Err(ConfigError::CapabilitySpace(body.len()));
        }
        for (i, &b) in body.iter().enumerate() {
            self.set_byte(offset + i, b);
        }
        self.set_byte(offset + 1, 0);
        for (i, &w) in writable.iter().enumerate().take(body.len()) {
            let (reg, shift) = ((offset + i) / 4, ((offset + i) % 4) * 8);
            self.writable[reg] |= u32::from(w) << shift;
        }
        match self.last_cap {
            Some(prev) => self.set_byte(prev + 1, offset as u8),
            None => {
                self.registers[CAP_POINTER_REG] = offset as u32;
                self.registers[COMMAND_REG] |= STATUS_CAP_LIST;
            }
        }
        self.last_cap = Some(offset);
        self.next_cap = offset + len;
        Ok(offset)
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        let (reg, shift) = (offset / 4, (offset % 4) * 8);
        self.registers[reg] = (self.registers[reg] & !(0xff << shift)) | u32::from(value) << shift;
    }

    /// Every register, for a snapshot.
    pub fn registers(&self) -> &[u32] {
        &self.registers
    }

    /// Takes a snapshot's registers. The identity (vendor, device, class)
    /// must be this function's, and each BAR must read back where it is
    /// mapped now (the VMM places BARs at the saved addresses first).
    pub fn restore_registers(&mut self, regs: &[u32]) -> Result<(), ConfigError> {
        if regs.len() != NUM_CONFIG_REGISTERS
            || regs[0] != self.registers[0]
            || regs[2] != self.registers[2]
        {
            return Err(ConfigError::Identity);
        }
        let before = self.registers;
        self.registers.copy_from_slice(regs);
        for index in 0..NUM_BARS {
            let addr = self.bar_addr(index);
            if self.mapped[index].is_some_and(|m| m != addr) {
                self.registers = before;
                return Err(ConfigError::BarNotMapped { index, addr });
            }
        }
        Ok(())
    }

    /// Reads register `reg` (an index in 32-bit words); out of range reads
    /// all ones like an absent register.
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.registers.get(reg).copied().unwrap_or(0xffff_ffff)
    }

    /// Overwrites a byte-aligned part of register `reg` ignoring the
    /// writable mask (for device-emulated fields such as MSI-X control).
    pub fn set_reg_bits(&mut self, reg: usize, value: u32, mask: u32) {
        if let Some(r) = self.registers.get_mut(reg) {
            *r = (*r & !mask) | (value & mask);
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.registers[COMMAND_REG] as u16
    }

    /// A guest write of `data` at byte `offset` (0-3) of register `reg`.
    /// Returns the BARs the guest moved (to be re-mapped by the VMM).
    pub fn write_reg(&mut self, reg: usize, offset: u64, data: &[u8]) -> Vec<BarReprogram> {
        let Some(mask) = self.writable.get(reg).copied() else {
            return Vec::new();
        };
        let offset = offset as usize;
        if offset + data.len() > 4 || data.is_empty() {
            crate::guest_log!(
                self.log,
                log::Level::Warn,
                "pci: bad config write at reg {reg} offset {offset} len {}",
                data.len()
            );
            return Vec::new();
        }
        let mut value = 0u32;
        let mut byte_mask = 0u32;
        for (i, &b) in data.iter().enumerate() {
            value |= u32::from(b) << ((offset + i) * 8);
            byte_mask |= 0xff << ((offset + i) * 8);
        }
        let m = mask & byte_mask;
        self.registers[reg] = (self.registers[reg] & !m) | (value & m);
        if (BAR0_REG..BAR0_REG + NUM_BARS).contains(&reg) || reg == COMMAND_REG {
            self.detect_bar_moves()
        } else {
            Vec::new()
        }
    }

    /// The bus mapped BAR `index` at `addr` after a guest move.
    pub fn bar_moved(&mut self, index: usize, addr: u64) {
        if let Some(m) = self.mapped.get_mut(index) {
            *m = Some(addr);
        }
    }

    /// The bus refused a guest move of BAR `index`: the register goes back
    /// to where the BAR is still mapped, as if the write never happened.
    pub fn restore_bar(&mut self, index: usize) {
        if let Some(addr) = self.mapped.get(index).copied().flatten() {
            // Cannot fail: the address was accepted when it was mapped.
            let _ = self.set_bar_addr(index, addr);
        }
    }

    /// With decoding enabled, a BAR whose programmed address differs from
    /// where it is mapped has been moved by the guest; it counts as mapped
    /// there only once the bus confirms ([`Self::bar_moved`]) and goes back
    /// if it refuses ([`Self::restore_bar`]). While decoding is off (as
    /// during size probing) nothing is reported.
    fn detect_bar_moves(&mut self) -> Vec<BarReprogram> {
        let cmd = self.command();
        let mut moves = Vec::new();
        for index in 0..NUM_BARS {
            let Some(bar) = self.bars[index] else {
                continue;
            };
            let enabled = match bar.region_type {
                PciBarRegionType::Io => cmd & COMMAND_IO_SPACE != 0,
                _ => cmd & COMMAND_MEMORY_SPACE != 0,
            };
            let new_addr = self.bar_addr(index);
            match self.mapped[index] {
                Some(old_addr) if enabled && old_addr != new_addr => {
                    moves.push(BarReprogram {
                        bar,
                        old_addr,
                        new_addr,
                    });
                }
                _ => {}
            }
        }
        moves
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1044,
            class: 0xff,
            subclass: 0,
            prog_if: 0,
            revision: 1,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        }
    }

    fn write32(c: &mut PciConfiguration, reg: usize, v: u32) -> Vec<BarReprogram> {
        c.write_reg(reg, 0, &v.to_le_bytes())
    }

    #[test]
    fn ids_are_read_only() {
        let mut c = PciConfiguration::new(&header());
        assert_eq!(c.read_reg(0), 0x1044_1af4);
        write32(&mut c, 0, 0);
        assert_eq!(c.read_reg(0), 0x1044_1af4);
        assert_eq!(c.read_reg(2) >> 24, 0xff);
        assert_eq!(c.read_reg(64), 0xffff_ffff);
    }

    #[test]
    fn bar64_size_probe() {
        let mut c = PciConfiguration::new(&header());
        let bar = PciBar {
            index: 0,
            size: 0x8000,
            region_type: PciBarRegionType::Memory64,
            prefetchable: false,
        };
        c.add_bar(bar).unwrap();
        c.set_bar_addr(0, 0x1_0000_0000).unwrap();
        assert_eq!(c.read_reg(4), 0x4);
        assert_eq!(c.read_reg(5), 1);
        write32(&mut c, 4, 0xffff_ffff);
        write32(&mut c, 5, 0xffff_ffff);
        assert_eq!(c.read_reg(4), 0xffff_8004);
        assert_eq!(c.read_reg(5), 0xffff_ffff);
        // Restore, then enable memory decoding: no move reported.
        write32(&mut c, 4, 0x4);
        write32(&mut c, 5, 1);
        assert!(c.write_reg(1, 0, &[0x06, 0]).is_empty());
        assert_eq!(c.command() & COMMAND_MEMORY_SPACE, COMMAND_MEMORY_SPACE);
        assert_eq!(c.bar_addr(0), 0x1_0000_0000);
    }

    #[test]
    fn bar_move_reported_when_decoding() {
        let mut c = PciConfiguration::new(&header());
        c.add_bar(PciBar {
            index: 1,
            size: 0x1000,
            region_type: PciBarRegionType::Memory32,
            prefetchable: false,
        })
        .unwrap();
        c.set_bar_addr(1, 0xc000_0000).unwrap();
        c.write_reg(1, 0, &[0x02]);
        let moves = write32(&mut c, 5, 0xd000_0000);
        assert_eq!(moves.len(), 1);
        assert_eq!(moves[0].old_addr, 0xc000_0000);
        assert_eq!(moves[0].new_addr, 0xd000_0000);
        // Until the bus confirms, the BAR is still where it was.
        assert_eq!(write32(&mut c, 5, 0xd000_0000).len(), 1);
        c.bar_moved(1, 0xd000_0000);
        assert!(write32(&mut c, 5, 0xd000_0000).is_empty());
        // A refused move reads back the mapped address.
        write32(&mut c, 5, 0xe000_0000);
        c.restore_bar(1);
        assert_eq!(c.bar_addr(1), 0xd000_0000);
    }

    #[test]
    fn rejects_bad_bars() {
        let mut c = PciConfiguration::new(&header());
        let mut bar = PciBar {
            index: 5,
            size: 0x1000,
            region_type: PciBarRegionType::Memory64,
            prefetchable: false,
        };
        assert_eq!(c.add_bar(bar), Err(ConfigError::InvalidBarIndex(5)));
        bar.index = 0;
        bar.size = 0x1001;
        assert_eq!(c.add_bar(bar), Err(ConfigError::InvalidBarSize(0x1001)));
        bar.size = 0x1000;
        c.add_bar(bar).unwrap();
        bar.index = 1;
        assert_eq!(c.add_bar(bar), Err(ConfigError::BarInUse(1)));
        assert_eq!(
            c.set_bar_addr(0, 0x1800),
            Err(ConfigError::UnalignedBar(0x1800))
        );
    }

    #[test]
    fn capability_chain() {
        let mut c = PciConfiguration::new(&header());
        let a = c.add_capability(&[0x09, 0, 4, 1], &[]).unwrap();
        let b = c
            .add_capability(&[0x11, 0, 0, 0, 0, 0, 0, 0], &[0, 0, 0, 0xc0])
            .unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x44);
        assert_eq!(c.read_reg(13), 0x40);
        assert_ne!(c.read_reg(1) & STATUS_CAP_LIST, 0);
        assert_eq!(c.read_reg(0x40 / 4) >> 8 & 0xff, 0x44);
        assert_eq!(c.read_reg(0x44 / 4) >> 8 & 0xff, 0);
        c.write_reg(0x44 / 4, 3, &[0xff]);
        assert_eq!(c.read_reg(0x44 / 4) >> 24, 0xc0);
    }
}
