//! The virtio-pci common configuration structure (virtio 1.x, 4.1.4.3):
//! feature negotiation, device status, queue set-up.

use std::sync::Arc;

use log::Level;
use virtio_queue::{Queue, QueueT};

use crate::guest_log;
use crate::ratelimit::LogLimiter;

/// `device_status` bits.
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device failed and needs a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// The driver gave up.
    pub const FAILED: u8 = 0x80;
}

/// MSI-X "no vector" value.
pub const NO_VECTOR: u16 = 0xffff;

/// Register offsets in the common configuration.
mod reg {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC_LO: u64 = 0x20;
    pub const QUEUE_DESC_HI: u64 = 0x24;
    pub const QUEUE_AVAIL_LO: u64 = 0x28;
    pub const QUEUE_AVAIL_HI: u64 = 0x2c;
    pub const QUEUE_USED_LO: u64 = 0x30;
    pub const QUEUE_USED_HI: u64 = 0x34;
}

/// What a common-config write asks the transport to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusAction {
    /// Nothing beyond storing the value.
    None,
    /// The driver wrote 0: reset the device.
    Reset,
    /// FEATURES_OK was just set: validate and acknowledge features.
    FeaturesOk,
    /// DRIVER_OK was just set: activate the device.
    DriverOk,
}

/// The per-queue state the transport keeps beside the [`Queue`].
pub struct QueueSlot {
    /// The queue as the driver programs it.
    pub queue: Queue,
    /// Its MSI-X vector.
    pub vector: u16,
}

/// The driver-visible state of the common configuration.
pub struct CommonConfig {
    /// Where odd accesses are logged (the device's limiter).
    log: Arc<LogLimiter>,
    /// `device_status`.
    pub status: u8,
    /// Bumped when device configuration changes.
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

impl Default for CommonConfig {
    fn default() -> Self {
        Self::new(Arc::new(LogLimiter::new("virtio-pci")))
    }
}

impl CommonConfig {
    /// The reset state, logging odd accesses through `log`.
    pub fn new(log: Arc<LogLimiter>) -> Self {
        CommonConfig {
            log,
            status: 0,
            generation: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            config_vector: NO_VECTOR,
        }
    }
}

fn put(data: &mut [u8], v: u64) {
    let b = v.to_le_bytes();
    let n = data.len().min(8);
    data[..n].copy_from_slice(&b[..n]);
}

fn get(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

/// The `(low, high)` arguments of virtio-queue's address setters for a
/// write of one 32-bit half.
fn half(high: bool, value: u32) -> (Option<u32>, Option<u32>) {
    if high {
        (None, Some(value))
    } else {
        (Some(value), None)
    }
}

/// A 4- or 8-byte write of `v` at `offset` in the queue address registers
/// (0x20-0x37); halves beyond them are ignored.
fn write_queue_addr(q: &mut Queue, offset: u64, v: u64, len: usize) {
    let mut words = vec![(offset, v as u32)];
    if len == 8 {
        words.push((offset + 4, (v >> 32) as u32));
    }
    for (off, value) in words.into_iter().filter(|(o, _)| *o <= reg::QUEUE_USED_HI) {
        let (lo, hi) = half(off % 8 == 4, value);
        match off & !7 {
            reg::QUEUE_DESC_LO => q.set_desc_table_address(lo, hi),
            reg::QUEUE_AVAIL_LO => q.set_avail_ring_address(lo, hi),
            _ => q.set_used_ring_address(lo, hi),
        }
    }
}

impl CommonConfig {
    /// Reads `data.len()` bytes at `offset`. `features` are all the
    /// offered features; `vectors` the MSI-X table size.
    pub fn read(&self, offset: u64, data: &mut [u8], features: u64, queues: &[QueueSlot]) {
        data.fill(0);
        let q = queues.get(usize::from(self.queue_select));
        let v: u64 = match (offset, data.len()) {
            (reg::DEVICE_FEATURE_SELECT, 4) => self.device_feature_select.into(),
            (reg::DEVICE_FEATURE, 4) => match self.device_feature_select {
                0 => features & 0xffff_ffff,
                1 => features >> 32,
                _ => 0,
            },
            (reg::DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select.into(),
            (reg::DRIVER_FEATURE, 4) => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (reg::CONFIG_MSIX_VECTOR, 2) => self.config_vector.into(),
            (reg::NUM_QUEUES, 2) => queues.len() as u64,
            (reg::DEVICE_STATUS, 1) => self.status.into(),
            (reg::CONFIG_GENERATION, 1) => self.generation.into(),
            (reg::QUEUE_SELECT, 2) => self.queue_select.into(),
            (reg::QUEUE_SIZE, 2) => q.map_or(0, |q| q.queue.size().into()),
            (reg::QUEUE_MSIX_VECTOR, 2) => q.map_or(NO_VECTOR, |q| q.vector).into(),
            (reg::QUEUE_ENABLE, 2) => q.map_or(0, |q| q.queue.ready().into()),
            (reg::QUEUE_NOTIFY_OFF, 2) => self.queue_select.into(),
            (reg::QUEUE_DESC_LO, 4) => q.map_or(0, |q| q.queue.desc_table() & 0xffff_ffff),
            (reg::QUEUE_DESC_HI, 4) => q.map_or(0, |q| q.queue.desc_table() >> 32),
            (reg::QUEUE_AVAIL_LO, 4) => q.map_or(0, |q| q.queue.avail_ring() & 0xffff_ffff),
            (reg::QUEUE_AVAIL_HI, 4) => q.map_or(0, |q| q.queue.avail_ring() >> 32),
            (reg::QUEUE_USED_LO, 4) => q.map_or(0, |q| q.queue.used_ring() & 0xffff_ffff),
            (reg::QUEUE_USED_HI, 4) => q.map_or(0, |q| q.queue.used_ring() >> 32),
            (reg::QUEUE_DESC_LO | reg::QUEUE_AVAIL_LO | reg::QUEUE_USED_LO, 8) => match offset {
                reg::QUEUE_DESC_LO => q.map_or(0, |q| q.queue.desc_table()),
                reg::QUEUE_AVAIL_LO => q.map_or(0, |q| q.queue.avail_ring()),
                _ => q.map_or(0, |q| q.queue.used_ring()),
            },
            _ => {
                guest_log!(
                    self.log,
                    Level::Debug,
                    "virtio-pci: common config read {offset:#x}/{}",
                    data.len()
                );
                0
            }
        };
        put(data, v);
    }

    /// Writes `data` at `offset`. `vectors` is the MSI-X table size;
    /// `active` whether the device runs (queue set-up is then frozen).
    pub fn write(
        &mut self,
        offset: u64,
        data: &[u8],
        vectors: usize,
        active: bool,
        queues: &mut [QueueSlot],
    ) -> StatusAction {
        let v = get(data);
        let check_vector = |v: u64| -> u16 {
            let v = v as u16;
            if usize::from(v) < vectors {
                v
            } else {
                NO_VECTOR
            }
        };
        let qsel = usize::from(self.queue_select);
        let queue_writable = !active && qsel < queues.len();
        match (offset, data.len()) {
            (reg::DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = v as u32,
            (reg::DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = v as u32,
            // Frozen once accepted (or once the driver said it is ready).
            (reg::DRIVER_FEATURE, 4)
                if self.status & (status::FEATURES_OK | status::DRIVER_OK) == 0 =>
            {
                match self.driver_feature_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | v << 32,
                    _ => {}
                }
            }
            (reg::CONFIG_MSIX_VECTOR, 2) => self.config_vector = check_vector(v),
            (reg::DEVICE_STATUS, 1) => return self.write_status(v as u8),
            (reg::QUEUE_SELECT, 2) => self.queue_select = v as u16,
            (reg::QUEUE_SIZE, 2) if queue_writable => queues[qsel].queue.set_size(v as u16),
            (reg::QUEUE_MSIX_VECTOR, 2) if qsel < queues.len() => {
                queues[qsel].vector = check_vector(v)
            }
            (reg::QUEUE_ENABLE, 2) if queue_writable && v == 1 => {
                queues[qsel].queue.set_ready(true)
            }
            (reg::QUEUE_DESC_LO..=reg::QUEUE_USED_HI, 4 | 8) if queue_writable => {
                write_queue_addr(&mut queues[qsel].queue, offset, v, data.len())
            }
            _ => guest_log!(
                self.log,
                Level::Debug,
                "virtio-pci: ignored common config write {offset:#x}/{}",
                data.len()
            ),
        }
        StatusAction::None
    }

    fn write_status(&mut self, new: u8) -> StatusAction {
        if new == 0 {
            return StatusAction::Reset;
        }
        // Only a reset clears status bits (the driver must not, 2.1.2):
        // a driver clearing FEATURES_OK to renegotiate is ignored, and
        // DEVICE_NEEDS_RESET is the device's to set.
        let old = self.status;
        let new = (old | new) & !status::DEVICE_NEEDS_RESET | old & status::DEVICE_NEEDS_RESET;
        self.status = new;
        let set = new & !old;
        if set & status::FEATURES_OK != 0 {
            StatusAction::FeaturesOk
        } else if set & status::DRIVER_OK != 0 && new & status::FEATURES_OK != 0 {
            StatusAction::DriverOk
        } else {
            StatusAction::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(n: usize) -> Vec<QueueSlot> {
        (0..n)
            .map(|_| QueueSlot {
                queue: Queue::new(256).unwrap(),
                vector: NO_VECTOR,
            })
            .collect()
    }

    fn rd(c: &CommonConfig, off: u64, len: usize, q: &[QueueSlot]) -> u64 {
        let mut d = vec![0u8; len];
        c.read(off, &mut d, 0x1_0000_0001, q);
        get(&d)
    }

    #[test]
    fn features_by_select() {
        let mut c = CommonConfig::default();
        let mut q = slots(2);
        assert_eq!(rd(&c, 0x04, 4, &q), 1);
        c.write(0x00, &1u32.to_le_bytes(), 3, false, &mut q);
        assert_eq!(rd(&c, 0x04, 4, &q), 1);
        c.write(0x08, &1u32.to_le_bytes(), 3, false, &mut q);
        c.write(0x0c, &1u32.to_le_bytes(), 3, false, &mut q);
        assert_eq!(c.driver_features, 1 << 32);
        assert_eq!(rd(&c, 0x12, 2, &q), 2);
    }

    #[test]
    fn queue_setup_and_vectors() {
        let mut c = CommonConfig::default();
        let mut q = slots(2);
        c.write(0x16, &1u16.to_le_bytes(), 3, false, &mut q);
        c.write(0x18, &64u16.to_le_bytes(), 3, false, &mut q);
        c.write(0x20, &0x1234_5000u32.to_le_bytes(), 3, false, &mut q);
        c.write(0x24, &0x1u32.to_le_bytes(), 3, false, &mut q);
        c.write(0x28, &0x9000u64.to_le_bytes(), 3, false, &mut q);
        c.write(0x1a, &2u16.to_le_bytes(), 3, false, &mut q);
        assert_eq!(rd(&c, 0x18, 2, &q), 64);
        assert_eq!(rd(&c, 0x20, 8, &q), 0x1_1234_5000);
        assert_eq!(rd(&c, 0x28, 4, &q), 0x9000);
        assert_eq!(rd(&c, 0x1a, 2, &q), 2);
        assert_eq!(rd(&c, 0x1e, 2, &q), 1);
        // An 8-byte write at the last register does not spill past it.
        c.write(0x30, &0x7000u64.to_le_bytes(), 3, false, &mut q);
        c.write(
            0x34,
            &0xffff_ffff_0000_0000u64.to_le_bytes(),
            3,
            false,
            &mut q,
        );
        assert_eq!(rd(&c, 0x30, 8, &q), 0x7000);
        // Vector beyond the table reads back NO_VECTOR.
        c.write(0x1a, &7u16.to_le_bytes(), 3, false, &mut q);
        assert_eq!(rd(&c, 0x1a, 2, &q), u64::from(NO_VECTOR));
        // Size not a power of two is refused.
        c.write(0x18, &100u16.to_le_bytes(), 3, false, &mut q);
        assert_eq!(rd(&c, 0x18, 2, &q), 64);
        // Selecting a queue that does not exist reads zeros.
        c.write(0x16, &9u16.to_le_bytes(), 3, false, &mut q);
        assert_eq!(rd(&c, 0x18, 2, &q), 0);
        c.write(0x18, &8u16.to_le_bytes(), 3, false, &mut q);
        // Frozen while active.
        c.write(0x16, &1u16.to_le_bytes(), 3, true, &mut q);
        c.write(0x18, &8u16.to_le_bytes(), 3, true, &mut q);
        assert_eq!(rd(&c, 0x18, 2, &q), 64);
    }

    #[test]
    fn status_actions() {
        let mut c = CommonConfig::default();
        let mut q = slots(1);
        let mut w = |c: &mut CommonConfig, s: u8| c.write(0x14, &[s], 1, false, &mut q);
        assert_eq!(w(&mut c, status::ACKNOWLEDGE), StatusAction::None);
        assert_eq!(w(&mut c, 3), StatusAction::None);
        assert_eq!(w(&mut c, 3 | status::FEATURES_OK), StatusAction::FeaturesOk);
        assert_eq!(w(&mut c, 0xf), StatusAction::DriverOk);
        assert_eq!(w(&mut c, 0), StatusAction::Reset);
        // DRIVER_OK without FEATURES_OK does nothing.
        let mut c = CommonConfig::default();
        assert_eq!(w(&mut c, 7), StatusAction::None);
    }
}
