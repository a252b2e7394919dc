//! QEMU's firmware configuration interface (fw_cfg), the way firmware such
//! as OVMF finds the machine it runs on: the memory map, the CPU count, the
//! ACPI tables (through a table loader) and the boot order.
//!
//! Ports (x86): `0x510` selector (16-bit write), `0x511` data (byte reads
//! advance through the selected item), `0x514`/`0x518` the DMA address
//! (big-endian, high then low half; the write of the low half runs the
//! request). Items are read-only: guest writes are ignored. The device
//! never panics on guest input: an unknown selector reads as zeros, reads
//! past an item's end read zeros, a DMA request whose structure or buffer
//! lies outside guest memory ends with the error bit set.

use std::collections::BTreeMap;

use vm_device::BusDevice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// The I/O port of the selector.
pub const FW_CFG_PORT: u16 = 0x510;
/// Ports the device takes: selector, data, and the 8-byte DMA address at +4.
pub const FW_CFG_PORT_LEN: u64 = 12;

/// Item selectors (QEMU's `FW_CFG_*`).
pub mod item {
    pub const SIGNATURE: u16 = 0x00;
    pub const ID: u16 = 0x01;
    pub const RAM_SIZE: u16 = 0x03;
    pub const NOGRAPHIC: u16 = 0x04;
    pub const NB_CPUS: u16 = 0x05;
    pub const MAX_CPUS: u16 = 0x0f;
    pub const FILE_DIR: u16 = 0x19;
    /// The first file's selector.
    pub const FILE_FIRST: u16 = 0x20;
}

/// `FW_CFG_ID` feature bits: the traditional interface and DMA.
const FEATURE_TRADITIONAL: u32 = 1;
const FEATURE_DMA: u32 = 2;
/// What a DMA address register read returns ("QEMU CFG", big-endian).
const DMA_SIGNATURE: u64 = 0x5145_4d55_2043_4647;

/// DMA control bits.
const DMA_ERROR: u32 = 1;
const DMA_READ: u32 = 2;
const DMA_SKIP: u32 = 4;
const DMA_SELECT: u32 = 8;
const DMA_WRITE: u32 = 0x10;

/// Longest file name, with its NUL.
pub const FILE_NAME_LEN: usize = 56;
/// Most files the directory holds (selectors up to 0x3fff).
const MAX_FILES: usize = 0x3fff - item::FILE_FIRST as usize;
/// Largest DMA transfer served in one request: a guest cannot make the
/// VMM copy without end (a request's length is 32 bits).
const MAX_DMA_LEN: u32 = 64 << 20;

/// Why an item cannot be added.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FwCfgError {
    #[error("fw_cfg file name '{0}' is empty or longer than 55 bytes")]
    FileName(String),
    #[error("fw_cfg file '{0}' exists already")]
    DuplicateFile(String),
    #[error("fw_cfg has no room for more files")]
    TooManyFiles,
    #[error("fw_cfg item {0} is larger than 4 GiB")]
    TooLarge(String),
}

/// The fw_cfg device: its items, the selected item and the read position.
pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    /// File names in the order they were added (the directory's order).
    files: Vec<(String, u16)>,
    mem: GuestMemoryMmap,
    selected: u16,
    offset: usize,
    dma_high: u32,
}

impl FwCfg {
    /// A device with the signature, the feature bits and the CPU counts;
    /// `mem` is what DMA requests may touch.
    pub fn new(mem: GuestMemoryMmap, cpus: u8, max_cpus: u8, ram_size: u64) -> Self {
        let mut items = BTreeMap::new();
        items.insert(item::SIGNATURE, b"QEMU".to_vec());
        items.insert(item::ID, (FEATURE_TRADITIONAL | FEATURE_DMA).to_le_bytes().to_vec());
        items.insert(item::RAM_SIZE, ram_size.to_le_bytes().to_vec());
        items.insert(item::NOGRAPHIC, 1u16.to_le_bytes().to_vec());
        items.insert(item::NB_CPUS, u16::from(cpus).to_le_bytes().to_vec());
        items.insert(item::MAX_CPUS, u16::from(max_cpus.max(cpus)).to_le_bytes().to_vec());
        let mut dev = Self { items, files: Vec::new(), mem, selected: 0, offset: 0, dma_high: 0 };
        dev.update_dir();
        dev
    }

    /// Adds the file `name` with `data`; returns its selector.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<u16, FwCfgError> {
        if name.is_empty() || name.len() >= FILE_NAME_LEN || name.contains('\0') {
            return Err(FwCfgError::FileName(name.to_string()));
        }
        if self.files.iter().any(|(n, _)| n == name) {
            return Err(FwCfgError::DuplicateFile(name.to_string()));
        }
        if u32::try_from(data.len()).is_err() {
            return Err(FwCfgError::TooLarge(name.to_string()));
        }
        if self.files.len() >= MAX_FILES {
            return Err(FwCfgError::TooManyFiles);
        }
        let selector = item::FILE_FIRST + self.files.len() as u16;
        self.items.insert(selector, data);
        self.files.push((name.to_string(), selector));
        self.update_dir();
        Ok(selector)
    }

    /// The directory item: a big-endian count, then per file its size,
    /// selector, a reserved half-word and the NUL-padded name, sorted by
    /// name as QEMU sorts it.
    fn update_dir(&mut self) {
        let mut files = self.files.clone();
        files.sort();
        let mut dir = (files.len() as u32).to_be_bytes().to_vec();
        for (name, selector) in &files {
            let size = self.items.get(selector).map_or(0, Vec::len) as u32;
            dir.extend_from_slice(&size.to_be_bytes());
            dir.extend_from_slice(&selector.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut n = [0u8; FILE_NAME_LEN];
            n[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&n);
        }
        self.items.insert(item::FILE_DIR, dir);
    }

    fn select(&mut self, selector: u16) {
        self.selected = selector;
        self.offset = 0;
    }

    /// The selected item's bytes from the read position (empty when
    /// unknown or read to its end).
    fn remaining(&self) -> &[u8] {
        self.items.get(&self.selected).and_then(|d| d.get(self.offset..)).unwrap_or(&[])
    }

    /// Copies from the selected item into `out` (zeros past its end) and
    /// advances.
    fn read_data(&mut self, out: &mut [u8]) {
        let src = self.remaining();
        let n = src.len().min(out.len());
        out[..n].copy_from_slice(&src[..n]);
        out[n..].fill(0);
        self.offset = self.offset.saturating_add(out.len());
    }

    /// Runs the DMA request whose control structure is at `addr`: big-endian
    /// `control` (u32), `length` (u32), `address` (u64). On completion the
    /// control word is zero, or has the error bit set.
    fn dma(&mut self, addr: u64) {
        let mut access = [0u8; 16];
        if self.mem.read_slice(&mut access, GuestAddress(addr)).is_err() {
            log::warn!("fw_cfg: DMA request structure at {addr:#x} is outside guest memory");
            return;
        }
        let control = u32::from_be_bytes([access[0], access[1], access[2], access[3]]);
        let length = u32::from_be_bytes([access[4], access[5], access[6], access[7]]);
        let buffer = u64::from_be_bytes(access[8..16].try_into().unwrap_or([0; 8]));
        if control & DMA_SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        let ok = if control & DMA_READ != 0 {
            self.dma_read(buffer, length)
        } else if control & DMA_WRITE != 0 {
            // Items are read-only; QEMU reports writes to them as errors.
            false
        } else if control & DMA_SKIP != 0 {
            self.offset = self.offset.saturating_add(length as usize);
            true
        } else {
            true
        };
        let result: u32 = if ok { 0 } else { DMA_ERROR };
        if self.mem.write_slice(&result.to_be_bytes(), GuestAddress(addr)).is_err() {
            log::warn!("fw_cfg: cannot complete the DMA request at {addr:#x}");
        }
    }

    fn dma_read(&mut self, buffer: u64, length: u32) -> bool {
        if length > MAX_DMA_LEN {
            return false;
        }
        let mut data = vec![0u8; length as usize];
        self.read_data(&mut data);
        let ok = self.mem.write_slice(&data, GuestAddress(buffer)).is_ok();
        if !ok {
            log::warn!("fw_cfg: DMA buffer {buffer:#x}+{length:#x} is outside guest memory");
        }
        ok
    }
}

impl BusDevice for FwCfg {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match offset {
            // Reading the selector port reads data, as on QEMU.
            0 | 1 => self.read_data(data),
            4..=11 => {
                let sig = DMA_SIGNATURE.to_be_bytes();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = sig.get(offset as usize - 4 + i).copied().unwrap_or(0);
                }
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (0, 2) => self.select(u16::from_le_bytes([data[0], data[1]])),
            (4, 4) => self.dma_high = u32::from_be_bytes([data[0], data[1], data[2], data[3]]),
            (8, 4) => {
                let low = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                let addr = (u64::from(self.dma_high) << 32) | u64::from(low);
                self.dma_high = 0;
                self.dma(addr);
            }
            (4, 8) => {
                let addr = u64::from_be_bytes(data.try_into().unwrap_or([0; 8]));
                self.dma(addr);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> FwCfg {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        FwCfg::new(mem, 2, 4, 256 << 20)
    }

    fn read_item(d: &mut FwCfg, sel: u16, len: usize) -> Vec<u8> {
        d.write(0x510, 0, &sel.to_le_bytes());
        let mut out = vec![0u8; len];
        d.read(0x510, 1, &mut out);
        out
    }

    #[test]
    fn signature_cpus_and_directory() {
        let mut d = dev();
        assert_eq!(read_item(&mut d, item::SIGNATURE, 4), b"QEMU");
        assert_eq!(read_item(&mut d, item::NB_CPUS, 2), [2, 0]);
        assert_eq!(read_item(&mut d, item::MAX_CPUS, 2), [4, 0]);
        let sel = d.add_file("etc/e820", vec![1, 2, 3]).unwrap();
        d.add_file("bootorder", vec![]).unwrap();
        let dir = read_item(&mut d, item::FILE_DIR, 4 + 2 * 64);
        assert_eq!(u32::from_be_bytes(dir[..4].try_into().unwrap()), 2);
        // Sorted by name: bootorder first.
        assert_eq!(&dir[12..21], b"bootorder");
        assert_eq!(u32::from_be_bytes(dir[68..72].try_into().unwrap()), 3);
        assert_eq!(u16::from_be_bytes(dir[72..74].try_into().unwrap()), sel);
        assert_eq!(&dir[76..84], b"etc/e820");
        // Reads past the end and of unknown selectors are zeros.
        assert_eq!(read_item(&mut d, sel, 5), [1, 2, 3, 0, 0]);
        assert_eq!(read_item(&mut d, 0x3333, 3), [0, 0, 0]);
        assert_eq!(d.add_file("etc/e820", vec![]), Err(FwCfgError::DuplicateFile("etc/e820".into())));
        assert!(d.add_file(&"x".repeat(56), vec![]).is_err());
    }

    fn dma(d: &mut FwCfg, at: u64) {
        d.write(0x510, 4, &((at >> 32) as u32).to_be_bytes());
        d.write(0x510, 8, &(at as u32).to_be_bytes());
    }

    fn put_request(d: &FwCfg, at: u64, control: u32, len: u32, buf: u64) {
        let mut req = control.to_be_bytes().to_vec();
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(&buf.to_be_bytes());
        d.mem.write_slice(&req, GuestAddress(at)).unwrap();
    }

    fn control(d: &FwCfg, at: u64) -> u32 {
        let mut c = [0u8; 4];
        d.mem.read_slice(&mut c, GuestAddress(at)).unwrap();
        u32::from_be_bytes(c)
    }

    #[test]
    fn dma_select_and_read() {
        let mut d = dev();
        let sel = d.add_file("etc/acpi/rsdp", b"RSD PTR ".to_vec()).unwrap();
        put_request(&d, 0x1000, (u32::from(sel) << 16) | DMA_SELECT | DMA_READ, 8, 0x2000);
        dma(&mut d, 0x1000);
        assert_eq!(control(&d, 0x1000), 0);
        let mut got = [0u8; 8];
        d.mem.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
        assert_eq!(&got, b"RSD PTR ");
        let mut sig = [0u8; 8];
        d.read(0x510, 4, &mut sig);
        assert_eq!(&sig, b"QEMU CFG");
    }

    #[test]
    fn bad_dma_requests_set_the_error_bit_and_never_panic() {
        let mut d = dev();
        // A buffer outside guest memory.
        put_request(&d, 0x1000, (u32::from(item::SIGNATURE) << 16) | DMA_SELECT | DMA_READ, 4, 1 << 40);
        dma(&mut d, 0x1000);
        assert_eq!(control(&d, 0x1000), DMA_ERROR);
        // A huge length.
        put_request(&d, 0x1000, DMA_READ, u32::MAX, 0x2000);
        dma(&mut d, 0x1000);
        assert_eq!(control(&d, 0x1000), DMA_ERROR);
        // A buffer crossing the end of memory.
        put_request(&d, 0x1000, DMA_READ, 0x100, 0xfff0);
        dma(&mut d, 0x1000);
        assert_eq!(control(&d, 0x1000), DMA_ERROR);
        // Writes are refused.
        put_request(&d, 0x1000, DMA_WRITE, 4, 0x2000);
        dma(&mut d, 0x1000);
        assert_eq!(control(&d, 0x1000), DMA_ERROR);
        // The request structure itself outside memory: nothing happens.
        dma(&mut d, u64::MAX - 4);
        dma(&mut d, 1 << 40);
        // Odd port accesses.
        d.write(0x510, 0, &[1]);
        d.write(0x510, 11, &[1, 2, 3, 4]);
        let mut b = [0u8; 3];
        d.read(0x510, 9, &mut b);
        d.read(0x510, 40, &mut b);
    }
}
