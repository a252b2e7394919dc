//! Address buses (port I/O and MMIO) that route guest accesses to devices.
//!
//! A [`Bus`] holds non-overlapping [`BusRange`]s, each owned by one device.
//! Devices can be inserted and removed while vCPUs run (hot-plug): the map is
//! behind a `RwLock` and each device behind its own `Mutex`, so an access
//! only holds the map's read lock while it looks the device up.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device that answers guest reads and writes on a bus.
///
/// `base` is the start of the range the device was inserted at and `offset`
/// the distance of the access from it. A device must never panic on guest
/// input: an access it does not understand reads as zeros (or all ones, as
/// hardware would) and writes are ignored.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `base + offset`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `base + offset`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// Errors from inserting into or removing from a [`Bus`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range has length zero or wraps around the address space.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange { base: u64, len: u64 },
    /// The range overlaps one that is already taken.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    /// No device was inserted at that base.
    #[error("no device at {0:#x}")]
    NotFound(u64),
}

/// A range `[base, base + len)` on a bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusRange {
    pub base: u64,
    pub len: u64,
}

impl BusRange {
    fn end(&self) -> u64 {
        // Cannot overflow: ranges are validated on insertion.
        self.base + self.len
    }
}

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// A bus: a map from address ranges to devices.
#[derive(Default)]
pub struct Bus {
    devices: RwLock<BTreeMap<u64, (BusRange, SharedDevice)>>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Gives `[base, base + len)` to `device`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::InvalidRange { base, len });
        }
        let range = BusRange { base, len };
        let mut map = self.devices.write().unwrap_or_else(|e| e.into_inner());
        let overlaps_prev = map
            .range(..=base)
            .next_back()
            .is_some_and(|(_, (r, _))| r.end() > base);
        let overlaps_next = map
            .range(base..)
            .next()
            .is_some_and(|(start, _)| *start < range.end());
        if overlaps_prev || overlaps_next {
            return Err(BusError::Overlap { base, len });
        }
        map.insert(base, (range, device));
        Ok(())
    }

    /// Removes the device inserted at `base` and returns it.
    pub fn remove(&self, base: u64) -> Result<SharedDevice, BusError> {
        let mut map = self.devices.write().unwrap_or_else(|e| e.into_inner());
        map.remove(&base)
            .map(|(_, d)| d)
            .ok_or(BusError::NotFound(base))
    }

    /// The device whose range holds `addr`, with that range.
    pub fn resolve(&self, addr: u64) -> Option<(BusRange, SharedDevice)> {
        let map = self.devices.read().unwrap_or_else(|e| e.into_inner());
        let (_, (range, dev)) = map.range(..=addr).next_back()?;
        (addr < range.end()).then(|| (*range, dev.clone()))
    }

    /// Dispatches a guest read. Returns `false` (and leaves `data` alone) when
    /// no device owns `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((range, dev)) => {
                let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
                dev.read(range.base, addr - range.base, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a guest write. Returns `false` when no device owns `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((range, dev)) => {
                let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
                dev.write(range.base, addr - range.base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.last_write = Some((base, offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_to_owner_with_offset() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fb, &mut b));
        assert_eq!(b[0], 3);
        assert!(bus.write(0x3f8, &[0x41]));
        assert_eq!(dev.lock().unwrap().last_write, Some((0x3f8, 0, vec![0x41])));
        assert!(!bus.read(0x400, &mut b));
        assert!(!bus.read(0x3f7, &mut b));
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(dev.clone(), 0x10f, 1),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(dev.clone(), 0xf8, 0x9),
            Err(BusError::Overlap { base: 0xf8, len: 9 })
        );
        assert!(bus.insert(dev.clone(), 0x110, 1).is_ok());
        assert!(bus.insert(dev.clone(), 0xf0, 0x10).is_ok());
        assert!(matches!(
            bus.insert(dev.clone(), 5, 0),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
    }

    #[test]
    fn remove_frees_range() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x1000, 0x100).unwrap();
        bus.remove(0x1000).unwrap();
        assert!(bus.resolve(0x1000).is_none());
        assert_eq!(bus.remove(0x1000).err(), Some(BusError::NotFound(0x1000)));
        bus.insert(dev, 0x1080, 0x10).unwrap();
    }
}
