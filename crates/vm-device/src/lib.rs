//! Device-side abstractions shared by `skiff-vmm` and its device models.
//!
//! * [`bus`]: the port-I/O and MMIO buses. A vCPU exit for an address is
//!   dispatched to the [`BusDevice`] that owns the range holding it.
//! * [`interrupt`]: how a device raises an interrupt without knowing whether
//!   an irqfd on a GSI, MSI-X through KVM routing, or a test double is behind
//!   it.
//!
//! Nothing here depends on KVM, so device models built on these traits are
//! unit-tested without a VM.

pub mod bus;
pub mod interrupt;

pub use bus::{Bus, BusDevice, BusError, BusRange};
