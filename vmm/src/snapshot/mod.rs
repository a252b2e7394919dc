//! Snapshots: a paused VM saved to a directory (`vm.snapshot`) and brought
//! back in a fresh skiff-vmm process (`skiff-vmm --restore DIR`).
//!
//! The directory holds two files:
//! * `state`: [`VmSnapshot`] in the versioned, checksummed format of
//!   [`format`]: every vCPU's KVM state ([`vcpu`]), the irqchip, PIT and
//!   kvmclock ([`vm_state`]), COM1's registers, and each PCI device's host
//!   side and virtio-pci state ([`crate::device_manager::SavedDevice`]);
//! * `memory`: guest RAM, byte for byte, sparse ([`memory`]); a restore
//!   maps it `MAP_PRIVATE`, so one file can start many VMs (a VM with
//!   virtio-fs is copied into a memfd instead: virtiofsd maps guest
//!   memory itself and must see the guest's pages).
//!
//! Saving (the VM paused): device states first (an unsupported device
//! refuses before anything is touched), then each vCPU thread hands its
//! vCPU back, which is saved and given a new paused thread; then the
//! VM-wide state, memory, and the state file last (renamed into place, so
//! a directory with a `state` file is whole).
//!
//! Restoring ([`restore::restore_vm`]): the state file is read and checked
//! (format, vCPU count and ids, sizes) and the devices paired with the
//! command line's before KVM is opened; then memory is mapped, the VM
//! created, devices made again in their slots and given their state (their
//! workers parked), the platform devices placed, vCPUs created and given
//! their state, the irqchip, PIT and kvmclock set, and only then the
//! devices resumed (an interrupt raised before the LAPICs are restored
//! would be lost), all before any vCPU runs.
//!
//! virtio-fs: the rings are stopped, virtiofsd's own state (its inodes and
//! open files) is saved in the device's state through the vhost-user
//! device-state transfer and handed to a fresh virtiofsd on restore (see
//! `virtio_devices::fs`).
//!
//! Not yet carried: virtio-console, a memory hot-plug region (virtio-mem);
//! a VM with either refuses `vm.snapshot` with 409.

pub mod format;
pub mod memory;
pub mod restore;
pub mod vcpu;
pub mod vm_state;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::device_manager::SavedDevice;
use crate::devices::serial::SerialSnapshot;
use vcpu::VcpuState;
use vm_state::VmState;

/// The state file in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// Everything but memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// skiff-vmm's version that saved it.
    pub vmm_version: String,
    /// What the VM was booted with (for `vm.info` and people).
    pub kernel: PathBuf,
    pub cmdline: String,
    /// vCPUs at boot and at most (`--cpus boot=,max=`).
    pub boot_cpus: u8,
    pub max_cpus: u8,
    /// Guest RAM, the memory file's size.
    pub memory_mib: u64,
    /// The vCPUs present, by id 0, 1, ...
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub serial: SerialSnapshot,
    pub devices: Vec<SavedDevice>,
}
