//! The i440FX/PIIX chipset as firmware (OVMF) expects to find it: the
//! host bridge 8086:1237 at 00:00.0, the PIIX3 ISA bridge 8086:7000 at
//! 00:01.0 (OVMF enumerates COM1 and the PS/2 keyboard below it), and the
//! PIIX4 power-management function 8086:7113 at 00:01.3, whose PMBA
//! register places the ACPI PM I/O block (PM1 event and control
//! registers, the 3.58 MHz PM timer) that OVMF's timer library reads.
//!
//! Only what firmware programs is emulated: configuration registers read
//! back what was written (within their writable masks), the PM block
//! follows PMBA/PMREGMISC, PM1 control powers off on S5 (`SLP_TYP` 0 with
//! `SLP_EN`, as on QEMU's PIIX4). Direct-boot VMs use none of this.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use virtio_devices::pci::BarReprogram;
use virtio_devices::PciDevice;
use vm_device::{Bus, BusDevice};

use crate::exit::{ExitReason, ExitState};

/// The ISA bridge's and the PM function's slot.
pub const PIIX_SLOT: u8 = 1;
/// The PM function's number.
pub const PM_FUNCTION: u8 = 3;
/// Length of the PM I/O block.
pub const PM_IO_LEN: u64 = 0x40;

const PMBA: usize = 0x40;
const PMREGMISC: usize = 0x80;
const PMIOSE: u8 = 1;

/// PM timer frequency (Hz).
const PM_TIMER_HZ: u128 = 3_579_545;

/// A configuration space of 256 bytes with a writable mask per byte.
pub struct ChipsetFunction {
    regs: [u8; 256],
    writable: [u8; 256],
}

impl ChipsetFunction {
    fn new(vendor: u16, device: u16, class: [u8; 3], multi_function: bool) -> Self {
        let mut regs = [0u8; 256];
        let mut writable = [0u8; 256];
        regs[0..2].copy_from_slice(&vendor.to_le_bytes());
        regs[2..4].copy_from_slice(&device.to_le_bytes());
        // Revision 0, then prog-if, subclass, class.
        regs[9] = class[2];
        regs[10] = class[1];
        regs[11] = class[0];
        regs[0x0e] = if multi_function { 0x80 } else { 0 };
        // Command: I/O, memory, bus master.
        writable[4] = 0x07;
        // Device-specific registers are scratch unless a function says
        // otherwise.
        writable[0x40..].fill(0xff);
        Self { regs, writable }
    }

    /// The i440FX host bridge.
    pub fn i440fx_host_bridge() -> Self {
        let mut f = Self::new(0x8086, 0x1237, [0x06, 0x00, 0x00], false);
        f.regs[4] = 0x06;
        f
    }

    /// The PIIX3 PCI-to-ISA bridge (function 0 of a multi-function slot).
    pub fn piix3_isa_bridge() -> Self {
        let mut f = Self::new(0x8086, 0x7000, [0x06, 0x01, 0x00], true);
        f.regs[4] = 0x07;
        f
    }

    fn read_reg(&self, reg: usize) -> u32 {
        let at = reg.saturating_mul(4);
        match self.regs.get(at..at + 4) {
            Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            None => 0xffff_ffff,
        }
    }

    /// Writes within the mask; returns false if the access was outside.
    fn write_reg(&mut self, reg: usize, offset: u64, data: &[u8]) -> bool {
        let Some(start) = reg.checked_mul(4).and_then(|r| r.checked_add(offset as usize)) else {
            return false;
        };
        if start.saturating_add(data.len()) > 256 || offset >= 4 {
            return false;
        }
        for (i, b) in data.iter().enumerate() {
            let m = self.writable[start + i];
            self.regs[start + i] = (self.regs[start + i] & !m) | (b & m);
        }
        true
    }
}

impl PciDevice for ChipsetFunction {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.read_reg(reg)
    }
    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) -> Vec<BarReprogram> {
        self.write_reg(reg, offset, data);
        Vec::new()
    }
    virtio_devices::pci_no_bars!();
}

/// The ACPI PM I/O block: PM1 status (0), enable (2), control (4), timer (8).
pub struct PmIo {
    exit: Arc<ExitState>,
    start: Instant,
    status: u16,
    enable: u16,
    control: u16,
}

const PM1_CNT_SLP_EN: u16 = 1 << 13;

impl PmIo {
    fn timer(&self) -> u32 {
        // The 24-bit counter (FADT TMR_VAL_EXT clear).
        let ticks = self.start.elapsed().as_nanos() * PM_TIMER_HZ / 1_000_000_000;
        (ticks & 0xff_ffff) as u32
    }
}

impl BusDevice for PmIo {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let (reg, value) = match offset {
            0..=1 => (0, u32::from(self.status)),
            2..=3 => (2, u32::from(self.enable)),
            4..=5 => (4, u32::from(self.control)),
            8..=11 => (8, self.timer()),
            _ => (offset, 0),
        };
        let bytes = value.to_le_bytes();
        let skip = (offset - reg) as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(skip + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let mut v = [0u8; 2];
        for (i, b) in data.iter().take(2).enumerate() {
            v[i] = *b;
        }
        let value = u16::from_le_bytes(v);
        match (offset, data.len()) {
            (0, 2) => self.status &= !value, // write 1 to clear
            (2, 2) => self.enable = value,
            (4, 2) => {
                self.control = value & !PM1_CNT_SLP_EN;
                // PIIX4's S5 is SLP_TYP 0 (QEMU's \_S5 package).
                if value & PM1_CNT_SLP_EN != 0 && (value >> 10) & 7 == 0 {
                    self.exit.request(ExitReason::PowerOff);
                }
            }
            _ => {}
        }
    }
}

/// The PIIX4 PM function: its configuration space places [`PmIo`] on the
/// port bus.
pub struct PiixPm {
    config: ChipsetFunction,
    io: Arc<Bus>,
    block: Arc<Mutex<PmIo>>,
    mapped: Option<u64>,
}

impl PiixPm {
    /// The function, its PM block unmapped until the guest enables it.
    pub fn new(io: Arc<Bus>, exit: Arc<ExitState>) -> Self {
        let mut config = ChipsetFunction::new(0x8086, 0x7113, [0x06, 0x80, 0x00], true);
        config.regs[8] = 3; // revision
        config.writable[0x40..].fill(0);
        // PMBA: bits 15:6 of the I/O base; bit 0 reads 1 (I/O space).
        config.regs[PMBA] = 1;
        config.writable[PMBA] = 0xc0;
        config.writable[PMBA + 1] = 0xff;
        config.writable[PMREGMISC] = PMIOSE;
        let block = PmIo { exit, start: Instant::now(), status: 0, enable: 0, control: 0 };
        Self { config, io, block: Arc::new(Mutex::new(block)), mapped: None }
    }

    /// Maps the PM block where PMBA says while PMREGMISC enables it.
    fn remap(&mut self) {
        let base = u64::from(u16::from_le_bytes([self.config.regs[PMBA], self.config.regs[PMBA + 1]]) & 0xffc0);
        let want = (self.config.regs[PMREGMISC] & PMIOSE != 0 && base != 0).then_some(base);
        if want == self.mapped {
            return;
        }
        if let Some(old) = self.mapped.take() {
            let _ = self.io.remove(old);
        }
        if let Some(base) = want {
            let dev: Arc<Mutex<dyn BusDevice>> = self.block.clone();
            match self.io.insert(dev, base, PM_IO_LEN) {
                Ok(()) => {
                    log::debug!("chipset: ACPI PM block at port {base:#x}");
                    self.mapped = Some(base);
                }
                Err(e) => log::warn!("chipset: cannot place the ACPI PM block at port {base:#x}: {e}"),
            }
        }
    }
}

impl PciDevice for PiixPm {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        self.config.read_reg(reg)
    }
    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) -> Vec<BarReprogram> {
        if self.config.write_reg(reg, offset, data) {
            self.remap();
        }
        Vec::new()
    }
    virtio_devices::pci_no_bars!();
}

/// Firmware's debug console (QEMU's `isa-debugcon`, port 0x402): bytes
/// become VMM log lines, at most [`DEBUGCON_MAX_LINES`] of them and
/// [`DEBUGCON_LINE_MAX`] bytes each, so a guest cannot flood the log.
pub struct DebugCon {
    line: Vec<u8>,
    lines: u64,
}

/// The debug console's port.
pub const DEBUGCON_PORT: u16 = 0x402;
/// Lines logged at most.
pub const DEBUGCON_MAX_LINES: u64 = 100_000;
/// Longest line kept.
pub const DEBUGCON_LINE_MAX: usize = 512;

impl DebugCon {
    pub fn new() -> Self {
        Self { line: Vec::new(), lines: 0 }
    }

    fn flush(&mut self) {
        if self.lines < DEBUGCON_MAX_LINES {
            let text = String::from_utf8_lossy(&self.line);
            log::info!("firmware: {}", text.trim_end());
        } else if self.lines == DEBUGCON_MAX_LINES {
            log::warn!("firmware: debug console limit reached; further output dropped");
        }
        self.lines = self.lines.saturating_add(1);
        self.line.clear();
    }
}

impl Default for DebugCon {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for DebugCon {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        // QEMU's debugcon reads 0xe9 (its "present" value).
        data.fill(0xe9);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        for &b in data {
            match b {
                b'\n' => self.flush(),
                b'\r' => {}
                _ if self.line.len() < DEBUGCON_LINE_MAX => self.line.push(b),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_bridge_ids_and_scratch_registers() {
        let mut hb = ChipsetFunction::i440fx_host_bridge();
        assert_eq!(hb.read_config_register(0), 0x1237_8086);
        hb.write_config_register(0, 0, &[0, 0, 0, 0]); // ids are read-only
        assert_eq!(hb.read_config_register(0), 0x1237_8086);
        hb.write_config_register(0x59 / 4, 1, &[0x30]);
        assert_eq!(hb.read_config_register(0x58 / 4) >> 8 & 0xff, 0x30);
        // Out-of-range accesses never panic.
        assert_eq!(hb.read_config_register(64), 0xffff_ffff);
        hb.write_config_register(63, 3, &[1, 2]);
        hb.write_config_register(usize::MAX, 0, &[1]);
        let isa = ChipsetFunction::piix3_isa_bridge();
        assert_eq!(isa.read_reg(2) >> 8, 0x06_0100);
        assert_eq!(isa.regs[0x0e], 0x80);
    }

    #[test]
    fn pmba_places_the_pm_block_and_s5_powers_off() {
        let io = Arc::new(Bus::new());
        let exit = Arc::new(ExitState::new().unwrap());
        let mut pm = PiixPm::new(io.clone(), exit.clone());
        pm.write_config_register(PMBA / 4, 0, &[0x00, 0xb0, 0, 0]);
        assert!(io.resolve(0xb008).is_none(), "not mapped before PMIOSE");
        pm.write_config_register(PMREGMISC / 4, 0, &[PMIOSE]);
        assert_eq!(pm.read_config_register(PMBA / 4), 0xb001);
        let mut t1 = [0u8; 4];
        assert!(io.read(0xb008, &mut t1));
        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut t2 = [0u8; 4];
        io.read(0xb008, &mut t2);
        assert!(u32::from_le_bytes(t2) != u32::from_le_bytes(t1));
        // Moving the block.
        pm.write_config_register(PMBA / 4, 0, &[0x00, 0xc0, 0, 0]);
        assert!(io.resolve(0xb008).is_none());
        assert!(io.resolve(0xc008).is_some());
        // S3 (SLP_TYP 1) is ignored, S5 powers off.
        io.write(0xc004, &((1 << 10) | PM1_CNT_SLP_EN).to_le_bytes());
        assert_eq!(exit.reason(), None);
        io.write(0xc004, &PM1_CNT_SLP_EN.to_le_bytes());
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn debugcon_caps_lines() {
        let mut d = DebugCon::new();
        d.write(0x402, 0, &vec![b'x'; 10_000]);
        assert_eq!(d.line.len(), DEBUGCON_LINE_MAX);
        d.write(0x402, 0, b"\r\n");
        assert!(d.line.is_empty());
        assert_eq!(d.lines, 1);
    }
}
