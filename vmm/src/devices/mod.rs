//! Platform devices: on the port-I/O bus COM1 (with its console socket),
//! the i8042 reset line, the boot-complete debug port and the ACPI power
//! registers; on the MMIO bus
//! the ACPI Generic Event Device and the hot-plug controllers; and the VM
//! generation ID, a GUID in guest memory described in the DSDT.
//!
//! Each is a [`vm_device::BusDevice`]. None of them blocks: what they must
//! tell the rest of the VMM (the guest powered off, asked for a reset,
//! panicked) goes through [`crate::exit::ExitState`].

pub mod acpi_pm;
pub mod boot_timer;
pub mod chipset;
pub mod cmos;
pub mod cpu_hotplug;
pub mod fw_cfg;
pub mod ged;
pub mod host_mapping;
pub mod i8042;
pub mod pci_hotplug;
pub mod pflash;
pub mod serial;
pub mod serial_socket;
pub mod vmgenid;
