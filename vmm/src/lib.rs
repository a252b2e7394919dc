//! skiff-vmm: Skiff's virtual machine monitor. One process runs one VM on
//! KVM: guest memory backed by a memfd, one thread per vCPU, Linux boot
//! through PVH or the 64-bit boot protocol, ACPI tables, legacy devices.
//!
//! Where things live:
//! * [`config`]: the VM configuration and its validation; [`options`]: the
//!   command-line grammar of devices and sizes;
//! * [`builder`]: `build_vm`, which assembles everything;
//! * [`vmm`]: the running VM and its event loop, which owns the VM and
//!   handles control requests; [`exit`]: why it stops;
//! * [`vstate`]: the KVM VM, vCPUs and their threads; [`memory`]: guest RAM;
//! * [`arch`]: layout, CPUID, MSRs, registers, boot protocols, ACPI;
//! * [`devices`]: serial, i8042, boot-complete port, ACPI power, the ACPI
//!   Generic Event Device and the hot-plug controllers;
//! * [`device_manager`]: the PCI bus and virtio devices; [`interrupt`]: MSI
//!   routing and ioeventfds through KVM;
//! * [`firmware`]: booting through UEFI firmware (OVMF) instead of a kernel;
//! * [`snapshot`]: saving a paused VM to a directory and restoring it in
//!   a new process;
//! * [`api`]: the control socket (HTTP/1.1 + JSON; wire types in the
//!   `skiff-vmm-client` crate).

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod device_manager;
pub mod devices;
pub mod exit;
pub mod firmware;
pub mod interrupt;
pub mod memory;
pub mod options;
pub mod snapshot;
pub mod vmm;
pub mod vstate;

/// An error with its causes, `: `-separated, as the VMM prints and answers
/// errors.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}
