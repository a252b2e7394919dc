//! Legacy devices on the port-I/O bus: COM1, the i8042 reset line, the
//! boot-complete debug port and the ACPI power registers.
//!
//! Each is a [`vm_device::BusDevice`]. None of them blocks: what they must
//! tell the rest of the VMM (the guest powered off, asked for a reset,
//! panicked) goes through [`crate::exit::ExitState`].

pub mod acpi_pm;
pub mod boot_timer;
pub mod i8042;
pub mod serial;
