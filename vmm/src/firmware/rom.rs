//! The firmware's code as a read-only memory slot at the top of 4 GiB.

use std::path::Path;
use std::ptr::NonNull;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use vm_device::BusDevice;

use super::FirmwareError;
use crate::vstate::vm::Vm;

/// The KVM memory slot of the firmware code: far above the RAM slots
/// (one per RAM region, numbered from 0).
const FIRMWARE_SLOT: u32 = 64;

/// The firmware image in an anonymous mapping the guest sees read-only.
/// Guest writes reach [`BusDevice::write`] (a read-only slot makes them
/// MMIO exits) and are dropped; the mapping lives as long as the device,
/// which the MMIO bus keeps for the VM's lifetime.
pub struct FirmwareRom {
    ptr: NonNull<u8>,
    len: usize,
    base: u64,
    log: virtio_devices::ratelimit::LogLimiter,
}

// SAFETY: the mapping is owned by this value alone; the guest cannot write
// it (read-only slot) and the VMM only reads it.
unsafe impl Send for FirmwareRom {}

impl FirmwareRom {
    /// Reads `path` into a fresh mapping, for the guest address `base`.
    pub fn load(path: &Path, base: u64) -> Result<Self, FirmwareError> {
        let data = std::fs::read(path).map_err(|source| FirmwareError::Read { path: path.to_path_buf(), source })?;
        let len = data.len();
        // SAFETY: an anonymous private mapping: no file or existing memory
        // is involved; the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(FirmwareError::Map(std::io::Error::last_os_error()));
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| FirmwareError::Map(std::io::Error::other("null mapping")))?;
        // SAFETY: the mapping is `len` bytes, writable, and does not
        // overlap `data`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.as_ptr(), len) };
        Ok(Self { ptr, len, base, log: virtio_devices::ratelimit::LogLimiter::new("firmware") })
    }

    /// Registers the mapping as a read-only memory slot of `vm`.
    pub fn register(&self, vm: &Vm) -> Result<(), FirmwareError> {
        let region = kvm_userspace_memory_region {
            slot: FIRMWARE_SLOT,
            flags: KVM_MEM_READONLY,
            guest_phys_addr: self.base,
            memory_size: self.len as u64,
            userspace_addr: self.ptr.as_ptr() as u64,
        };
        // SAFETY: the mapping is live for `len` bytes and outlives the VM
        // (the MMIO bus holds this value until the VMM exits); the slot
        // does not overlap RAM, which ends below the 32-bit hole.
        unsafe { vm.fd().set_user_memory_region(region) }.map_err(FirmwareError::Kvm)
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for FirmwareRom {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `load` with this length and is
        // not used after this.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl BusDevice for FirmwareRom {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let start = offset as usize;
        match self.bytes().get(start..start.saturating_add(data.len())) {
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
