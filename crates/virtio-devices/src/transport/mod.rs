//! The virtio-pci modern transport (virtio 1.x, non-transitional).
//!
//! One 64-bit memory BAR (BAR0, [`BAR_SIZE`] bytes) holds every structure:
//!
//! | offset   | structure                                         |
//! |----------|---------------------------------------------------|
//! | `0x0000` | common configuration                              |
//! | `0x1000` | ISR status                                        |
//! | `0x2000` | device-specific configuration                     |
//! | `0x3000` | notifications: queue `n` at `+4n`                 |
//! | `0x4000` | MSI-X table: queues + 1 vectors, mapped by the driver |
//! | `0x6000` | MSI-X pending bit array                           |
//!
//! Queue notifications are meant to be KVM ioeventfds on
//! [`PciDevice::ioeventfds`]; without them a write to the notify area is
//! forwarded to the queue's eventfd by [`PciDevice::write_bar`].

pub mod common_config;
mod state;

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use log::Level;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_device::interrupt::{InterruptError, InterruptManager};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{ActiveQueue, VirtioDevice, VirtioInterrupt, VirtioInterruptType};
use crate::pci::config::{
    BarReprogram, PciBar, PciBarRange, PciBarRegionType, PciConfiguration, PciHeader,
};
use crate::pci::msix::{msix_capability, MsixConfig};
use crate::pci::{allocate_config_bars, config_bar_ranges, BarAllocator, PciDevice, PciError};
use crate::ratelimit::LogLimiter;
use crate::{guest_log, GuestMemoryMmap};
use common_config::{status, CommonConfig, QueueSlot, StatusAction, NO_VECTOR};

/// PCI vendor id of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device ids are `0x1040 + device type`.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Size of BAR0.
pub const BAR_SIZE: u64 = 0x8000;
/// Offset of the common configuration in BAR0.
pub const COMMON_CONFIG_OFFSET: u64 = 0x0000;
/// Offset of the ISR status byte.
pub const ISR_OFFSET: u64 = 0x1000;
/// Offset of the device configuration.
pub const DEVICE_CONFIG_OFFSET: u64 = 0x2000;
/// Offset of the notification area.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Offset of the MSI-X table.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// Offset of the MSI-X PBA.
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
const REGION_SIZE: u64 = 0x1000;
/// Most queues a device may have (notify area / multiplier, and vectors).
pub const MAX_QUEUES: usize = 511;

const VIRTIO_PCI_CAP_ID: u8 = 0x09;
const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const CAP_DEVICE_CFG: u8 = 4;
const CAP_PCI_CFG: u8 = 5;

/// Errors creating a virtio-pci device.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The device wants more queues than the transport supports.
    #[error("device has {0} queues, at most {MAX_QUEUES} are supported")]
    TooManyQueues(usize),
    /// The MSI-X vectors could not be allocated.
    #[error("allocate MSI-X vectors")]
    Interrupts(#[source] InterruptError),
    /// A queue eventfd could not be created.
    #[error("create queue eventfd")]
    EventFd(#[source] std::io::Error),
    /// Building the configuration space failed.
    #[error("PCI configuration space")]
    Config(#[source] crate::pci::config::ConfigError),
}

/// The interrupt side shared between the transport and device workers.
struct PciInterrupt {
    msix: Arc<Mutex<MsixConfig>>,
    isr: AtomicU8,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    /// Set by a device worker that cannot go on (read into the status).
    needs_reset: AtomicBool,
}

impl PciInterrupt {
    fn vector(&self, t: VirtioInterruptType) -> u16 {
        match t {
            VirtioInterruptType::Config => self.config_vector.load(Ordering::Acquire),
            VirtioInterruptType::Queue(i) => self
                .queue_vectors
                .get(usize::from(i))
                .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire)),
        }
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn trigger(&self, t: VirtioInterruptType) -> std::io::Result<()> {
        let bit = if t == VirtioInterruptType::Config {
            2
        } else {
            1
        };
        self.isr.fetch_or(bit, Ordering::AcqRel);
        let vector = self.vector(t);
        self.msix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .trigger(vector);
        Ok(())
    }

    fn device_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::AcqRel) {
            let _ = self.trigger(VirtioInterruptType::Config);
        }
    }

    fn notifier(&self, t: VirtioInterruptType) -> Option<EventFd> {
        let vector = self.vector(t);
        let msix = self.msix.lock().unwrap_or_else(|e| e.into_inner());
        msix.group()
            .notifier(usize::from(vector))
            .and_then(|fd| fd.try_clone().ok())
    }
}

fn pci_class(device_type: u32) -> (u8, u8) {
    use virtio_bindings::virtio_ids::*;
    match device_type {
        VIRTIO_ID_NET => (0x02, 0x00),
        VIRTIO_ID_BLOCK => (0x01, 0x00),
        VIRTIO_ID_CONSOLE => (0x07, 0x80),
        _ => (0xff, 0x00),
    }
}

fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let mut c = vec![
        VIRTIO_PCI_CAP_ID,
        0,
        (16 + extra.len()) as u8,
        cfg_type,
        0,
        0,
        0,
        0,
    ];
    c.extend_from_slice(&(offset as u32).to_le_bytes());
    c.extend_from_slice(&(length as u32).to_le_bytes());
    c.extend_from_slice(extra);
    c
}

/// A [`VirtioDevice`] on the PCI bus.
pub struct VirtioPciDevice {
    config: PciConfiguration,
    device: Arc<Mutex<dyn VirtioDevice>>,
    common: CommonConfig,
    queues: Vec<QueueSlot>,
    queue_evts: Vec<EventFd>,
    interrupt: Arc<PciInterrupt>,
    msix_reg: usize,
    pci_cfg_offset: usize,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    bar_addr: u64,
    active: bool,
    offered_features: u64,
    log: Arc<LogLimiter>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VirtioPciDevice {
    /// Wraps `device`; allocates one MSI-X vector per queue plus one for
    /// configuration changes from `interrupts`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        interrupts: &dyn InterruptManager,
    ) -> Result<Self, TransportError> {
        let dev = lock(&device);
        let sizes = dev.queue_max_sizes().to_vec();
        let device_type = dev.device_type();
        let offered_features = dev.features() | 1 << VIRTIO_F_VERSION_1;
        drop(dev);
        if sizes.len() > MAX_QUEUES {
            return Err(TransportError::TooManyQueues(sizes.len()));
        }
        let vectors = sizes.len() + 1;
        let group = interrupts
            .create_msi_group(vectors)
            .map_err(TransportError::Interrupts)?;
        let msix = MsixConfig::new(vectors as u16, group);
        let log = Arc::new(LogLimiter::new(format!(
            "virtio-pci (device type {device_type})"
        )));
        let (class, subclass) = pci_class(device_type);
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE + device_type as u16,
            class,
            subclass,
            prog_if: 0,
            revision: 1,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: 0x40,
        });
        config
            .add_bar(PciBar {
                index: 0,
                size: BAR_SIZE,
                region_type: PciBarRegionType::Memory64,
                prefetchable: false,
            })
            .map_err(TransportError::Config)?;
        let caps = [
            virtio_cap(CAP_COMMON_CFG, COMMON_CONFIG_OFFSET, 0x38, &[]),
            virtio_cap(
                CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                REGION_SIZE,
                &NOTIFY_OFF_MULTIPLIER.to_le_bytes(),
            ),
            virtio_cap(CAP_ISR_CFG, ISR_OFFSET, 1, &[]),
            virtio_cap(CAP_DEVICE_CFG, DEVICE_CONFIG_OFFSET, REGION_SIZE, &[]),
        ];
        for cap in &caps {
            config
                .add_capability(cap, &[])
                .map_err(TransportError::Config)?;
        }
        // VIRTIO_PCI_CAP_PCI_CFG: bar, offset, length and data are writable.
        let pci_cfg = virtio_cap(CAP_PCI_CFG, 0, 0, &[0; 4]);
        let mut writable = vec![0u8; 20];
        writable[4] = 0xff;
        writable[8..16].fill(0xff);
        let pci_cfg_offset = config
            .add_capability(&pci_cfg, &writable)
            .map_err(TransportError::Config)?;
        // The group may hold fewer vectors than asked; advertise what exists.
        let (body, writable) = msix_capability(
            msix.len() as u16,
            0,
            MSIX_TABLE_OFFSET as u32,
            MSIX_PBA_OFFSET as u32,
        );
        let msix_offset = config
            .add_capability(&body, &writable)
            .map_err(TransportError::Config)?;
        let queue_evts = sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(TransportError::EventFd)?;
        let queues = sizes
            .iter()
            .map(|&s| QueueSlot {
                queue: Queue::new(s.max(1)).unwrap_or_default(),
                vector: NO_VECTOR,
            })
            .collect();
        let interrupt = Arc::new(PciInterrupt {
            msix: Arc::new(Mutex::new(msix)),
            isr: AtomicU8::new(0),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: sizes.iter().map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            needs_reset: AtomicBool::new(false),
        });
        Ok(VirtioPciDevice {
            config,
            device,
            common: CommonConfig::new(log.clone()),
            queues,
            queue_evts,
            interrupt,
            msix_reg: msix_offset / 4,
            pci_cfg_offset,
            mem,
            bar_addr: 0,
            active: false,
            offered_features,
            log,
        })
    }

    /// The wrapped device.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// Whether the driver has started the device.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Tells the driver the device configuration changed.
    pub fn config_changed(&mut self) {
        self.common.generation = self.common.generation.wrapping_add(1);
        let _ = self.interrupt.trigger(VirtioInterruptType::Config);
    }

    fn sync_vectors(&self) {
        self.interrupt
            .config_vector
            .store(self.common.config_vector, Ordering::Release);
        for (slot, v) in self.queues.iter().zip(&self.interrupt.queue_vectors) {
            v.store(slot.vector, Ordering::Release);
        }
    }

    fn reset(&mut self) {
        if !lock(&self.device).reset() {
            log::error!("virtio-pci: device refused reset");
        }
        for slot in &mut self.queues {
            slot.queue.reset();
            slot.vector = NO_VECTOR;
        }
        self.common = CommonConfig::new(self.log.clone());
        self.interrupt.isr.store(0, Ordering::Release);
        self.interrupt.needs_reset.store(false, Ordering::Release);
        self.sync_vectors();
        self.active = false;
    }

    fn features_ok(&mut self) {
        if self.active {
            return;
        }
        let f = self.common.driver_features;
        if f & !self.offered_features != 0 || f & (1 << VIRTIO_F_VERSION_1) == 0 {
            guest_log!(
                self.log,
                Level::Warn,
                "virtio-pci: driver features {f:#x} refused (offered {:#x})",
                self.offered_features
            );
            self.common.status &= !status::FEATURES_OK;
            return;
        }
        lock(&self.device).ack_features(f);
    }

    fn needs_reset(&mut self) {
        self.common.status |= status::DEVICE_NEEDS_RESET;
        let _ = self.interrupt.trigger(VirtioInterruptType::Config);
    }

    fn activate(&mut self) {
        self.activate_with(&[]);
    }

    /// Activates the device with each queue's device side at `progress`
    /// (a restore; empty at a driver's `DRIVER_OK`).
    fn activate_with(&mut self, progress: &[crate::state::QueueProgress]) {
        if self.active {
            return;
        }
        let mem = self.mem.memory();
        let event_idx = self.common.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut active = Vec::new();
        for (index, slot) in self.queues.iter().enumerate() {
            if !slot.queue.ready() {
                continue;
            }
            if !slot.queue.is_valid(&*mem) {
                guest_log!(
                    self.log,
                    Level::Warn,
                    "virtio-pci: queue {index} has invalid rings"
                );
                self.needs_reset();
                return;
            }
            let event = match self.queue_evts[index].try_clone() {
                Ok(e) => e,
                Err(e) => {
                    log::error!("virtio-pci: clone queue eventfd: {e}");
                    self.needs_reset();
                    return;
                }
            };
            let mut queue = clone_queue(&slot.queue);
            queue.set_event_idx(event_idx);
            if let Some(p) = progress.iter().find(|p| p.index == index) {
                queue.set_next_avail(p.next_avail);
                queue.set_next_used(p.next_used);
            }
            active.push(ActiveQueue {
                index,
                queue,
                event,
            });
        }
        self.sync_vectors();
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        let result = lock(&self.device).activate(self.mem.clone(), interrupt, active);
        match result {
            Ok(()) => self.active = true,
            Err(e) => {
                guest_log!(self.log, Level::Error, "virtio-pci: activation failed: {e}");
                self.needs_reset();
            }
        }
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let vectors = lock(&self.interrupt.msix).len();
        let action = self
            .common
            .write(offset, data, vectors, self.active, &mut self.queues);
        match action {
            StatusAction::None => {}
            StatusAction::Reset => self.reset(),
            StatusAction::FeaturesOk => {
                self.features_ok();
                // Both bits in one write: start only if the features held.
                let ready = status::FEATURES_OK | status::DRIVER_OK;
                if self.common.status & ready == ready {
                    self.activate();
                }
            }
            StatusAction::DriverOk => self.activate(),
        }
        self.sync_vectors();
    }

    fn read_bar_region(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if o < COMMON_CONFIG_OFFSET + REGION_SIZE => {
                if self.interrupt.needs_reset.load(Ordering::Acquire) {
                    self.common.status |= status::DEVICE_NEEDS_RESET;
                }
                self.common
                    .read(o, data, self.offered_features, &self.queues)
            }
            o if o == ISR_OFFSET && !data.is_empty() => {
                // Reading the ISR acknowledges it.
                data[0] = self.interrupt.isr.swap(0, Ordering::AcqRel);
            }
            o if (DEVICE_CONFIG_OFFSET..DEVICE_CONFIG_OFFSET + REGION_SIZE).contains(&o) => {
                lock(&self.device).read_config(o - DEVICE_CONFIG_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                lock(&self.interrupt.msix).read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..BAR_SIZE).contains(&o) => {
                lock(&self.interrupt.msix).read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => {}
        }
    }

    fn write_bar_region(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_CONFIG_OFFSET + REGION_SIZE => self.write_common(o, data),
            o if (DEVICE_CONFIG_OFFSET..DEVICE_CONFIG_OFFSET + REGION_SIZE).contains(&o) => {
                if !lock(&self.device).write_config(o - DEVICE_CONFIG_OFFSET, data) {
                    guest_log!(
                        self.log,
                        Level::Warn,
                        "virtio-pci: ignored device config write at {:#x} ({} bytes)",
                        o - DEVICE_CONFIG_OFFSET,
                        data.len()
                    );
                }
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + REGION_SIZE).contains(&o) => {
                let index = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER)) as usize;
                if let Some(evt) = self.queue_evts.get(index) {
                    if let Err(e) = evt.write(1) {
                        log::warn!("virtio-pci: notify queue {index}: {e}");
                    }
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                lock(&self.interrupt.msix).write_table(o - MSIX_TABLE_OFFSET, data)
            }
            _ => guest_log!(
                self.log,
                Level::Debug,
                "virtio-pci: ignored BAR write at {offset:#x}"
            ),
        }
    }

    /// The `VIRTIO_PCI_CAP_PCI_CFG` window: `(offset, length)` if the
    /// driver pointed it at BAR0 with a valid length.
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let base = self.pci_cfg_offset / 4;
        let bar = self.config.read_reg(base + 1) & 0xff;
        let offset = u64::from(self.config.read_reg(base + 2));
        let len = self.config.read_reg(base + 3) as usize;
        (bar == 0 && matches!(len, 1 | 2 | 4) && offset < BAR_SIZE).then_some((offset, len))
    }
}

/// A copy of the driver-programmed state of `q`.
fn clone_queue(q: &Queue) -> Queue {
    let mut c = Queue::new(q.max_size()).unwrap_or_default();
    c.set_size(q.size());
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(q.desc_table());
    c.set_desc_table_address(lo, hi);
    let (lo, hi) = split(q.avail_ring());
    c.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(q.used_ring());
    c.set_used_ring_address(lo, hi);
    c.set_ready(q.ready());
    c
}

impl PciDevice for VirtioPciDevice {
    fn read_config_register(&mut self, reg: usize) -> u32 {
        if reg == self.pci_cfg_offset / 4 + 4 {
            let Some((offset, len)) = self.pci_cfg_window() else {
                return 0;
            };
            let mut data = [0u8; 4];
            self.read_bar_region(offset, &mut data[..len]);
            return u32::from_le_bytes(data);
        }
        let mut v = self.config.read_reg(reg);
        if reg == self.msix_reg {
            let bits = u32::from(lock(&self.interrupt.msix).message_control_bits()) << 16;
            v = (v & !0xc000_0000) | bits;
        }
        v
    }

    fn write_config_register(&mut self, reg: usize, offset: u64, data: &[u8]) -> Vec<BarReprogram> {
        if reg == self.pci_cfg_offset / 4 + 4 {
            if let Some((bar_offset, len)) = self.pci_cfg_window() {
                if data.len() >= len {
                    self.write_bar_region(bar_offset, &data[..len]);
                }
            }
            return Vec::new();
        }
        let moves = self.config.write_reg(reg, offset, data);
        if reg == self.msix_reg {
            let ctl = (self.config.read_reg(reg) >> 16) as u16;
            lock(&self.interrupt.msix).set_message_control(ctl);
        }
        moves
    }

    fn allocate_bars(
        &mut self,
        allocator: &mut dyn BarAllocator,
    ) -> Result<Vec<PciBarRange>, PciError> {
        let ranges = allocate_config_bars(&mut self.config, allocator)?;
        if let Some(r) = ranges.first() {
            self.bar_addr = r.addr;
        }
        Ok(ranges)
    }

    fn bar_ranges(&self) -> Vec<PciBarRange> {
        config_bar_ranges(&self.config)
            .into_iter()
            .map(|mut r| {
                r.addr = self.bar_addr;
                r
            })
            .collect()
    }

    fn move_bar(&mut self, mv: &BarReprogram) {
        self.config.bar_moved(mv.bar.index, mv.new_addr);
        if mv.bar.index == 0 {
            self.bar_addr = mv.new_addr;
        }
    }

    fn refuse_bar_move(&mut self, mv: &BarReprogram) {
        self.config.restore_bar(mv.bar.index);
    }

    fn read_bar(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.read_bar_region(offset, data);
    }

    fn write_bar(&mut self, _base: u64, offset: u64, data: &[u8]) {
        self.write_bar_region(offset, data);
    }

    fn unplugged(&mut self) {
        // Stops the device's worker even if someone still holds the device.
        self.reset();
    }

    fn ioeventfds(&self) -> Vec<(u64, &EventFd)> {
        self.queue_evts
            .iter()
            .enumerate()
            .map(|(i, e)| {
                (
                    self.bar_addr + NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
                    e,
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
