//! virtio device models and the virtio-pci transport (docs filled below).

pub mod block;
pub mod console;
pub mod device;
pub mod fs;
pub mod net;
pub mod pci;
pub mod worker;

#[cfg(test)]
pub(crate) mod test_utils;

pub use device::{ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt, VirtioInterruptType};

/// The guest memory type the devices work on.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
pub mod rng;
pub mod transport;
pub mod vsock;
