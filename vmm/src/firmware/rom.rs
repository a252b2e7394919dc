//! The firmware's code as a read-only memory slot at the top of 4 GiB, and
//! the variable store's array as another while it is in read-array mode.

use std::path::Path;
use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use vm_device::BusDevice;

use super::FirmwareError;
use crate::devices::host_mapping::HostMapping;
use crate::devices::pflash::RomdMapper;

/// The KVM memory slots of the firmware code and of the flash array: far
/// above the RAM slots (one per RAM region, numbered from 0).
const FIRMWARE_SLOT: u32 = 64;
const FLASH_SLOT: u32 = 65;

/// Registers (or with `len` 0 removes) a read-only slot.
fn set_readonly_slot(vm: &VmFd, slot: u32, gpa: u64, host: u64, len: u64) -> Result<(), kvm_ioctls::Error> {
    let region = kvm_userspace_memory_region {
        slot,
        flags: KVM_MEM_READONLY,
        guest_phys_addr: gpa,
        memory_size: len,
        userspace_addr: host,
    };
    // SAFETY: callers pass a live mapping of `len` bytes that outlives the
    // slot (the firmware code and the flash array live until the VMM
    // exits, or the slot is removed first), placed above guest RAM, so
    // slots do not overlap; a zero length removes the slot.
    unsafe { vm.set_user_memory_region(region) }
}

/// The firmware image the guest sees read-only. Guest writes reach
/// [`BusDevice::write`] (a read-only slot makes them MMIO exits) and are
/// dropped; the mapping lives as long as the device, which the MMIO bus
/// keeps for the VM's lifetime.
pub struct FirmwareRom {
    image: HostMapping,
    base: u64,
    log: virtio_devices::ratelimit::LogLimiter,
}

impl FirmwareRom {
    /// Reads `path` into a fresh mapping, for the guest address `base`.
    pub fn load(path: &Path, base: u64) -> Result<Self, FirmwareError> {
        let data = std::fs::read(path).map_err(|source| FirmwareError::Read { path: path.to_path_buf(), source })?;
        let image = HostMapping::from_bytes(&data).map_err(FirmwareError::Map)?;
        Ok(Self { image, base, log: virtio_devices::ratelimit::LogLimiter::new("firmware") })
    }

    /// Registers the image as a read-only memory slot of `vm`.
    pub fn register(&self, vm: &VmFd) -> Result<(), FirmwareError> {
        set_readonly_slot(vm, FIRMWARE_SLOT, self.base, self.image.host_addr(), self.image.len() as u64)
            .map_err(FirmwareError::Kvm)
    }
}

impl BusDevice for FirmwareRom {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let start = offset as usize;
        match self.image.as_slice().get(start..start.saturating_add(data.len())) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        virtio_devices::guest_log!(
            &self.log,
            log::Level::Debug,
            "firmware: write of {} bytes to its read-only code at {:#x} dropped",
            data.len(),
            self.base + offset
        );
    }
}

/// Maps the variable store's flash array at `base` as a read-only slot.
pub struct FlashSlot {
    pub vm: Arc<VmFd>,
    pub base: u64,
}

impl RomdMapper for FlashSlot {
    fn map(&mut self, host: u64, len: u64) -> std::io::Result<()> {
        set_readonly_slot(&self.vm, FLASH_SLOT, self.base, host, len).map_err(std::io::Error::from)
    }

    fn unmap(&mut self) -> std::io::Result<()> {
        set_readonly_slot(&self.vm, FLASH_SLOT, self.base, 0, 0).map_err(std::io::Error::from)
    }
}
