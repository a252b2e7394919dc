//! Interrupt delivery for device models.
//!
//! A device model raises interrupts through these traits and never learns
//! what is behind them: in `skiff-vmm` a legacy line is an irqfd on a GSI of
//! the in-kernel IOAPIC and an MSI/MSI-X vector is a GSI with a KVM MSI route
//! plus an irqfd; in unit tests it is a recorder.

pub use vmm_sys_util::eventfd::EventFd;

/// Errors from programming or raising interrupts.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    /// The vector index is beyond the group.
    #[error("interrupt vector {0} out of range")]
    InvalidVector(usize),
    /// No more GSIs are available.
    #[error("no free interrupt lines (GSIs)")]
    Exhausted,
    /// The hypervisor refused the operation.
    #[error("hypervisor rejected interrupt operation")]
    Hypervisor(#[source] std::io::Error),
}

/// An MSI message as a guest programs it into an MSI-X table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// A group of interrupt vectors owned by one device (its MSI-X table, or a
/// single legacy line).
pub trait InterruptGroup: Send + Sync {
    /// Number of vectors in the group.
    fn len(&self) -> usize;
    /// Whether the group has no vectors.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Raises vector `index`.
    fn trigger(&self, index: usize) -> Result<(), InterruptError>;
    /// The eventfd that raises vector `index` when written, for backends
    /// outside the VMM process (vhost-user `call` fds). `None` when the
    /// vector cannot be raised that way.
    fn notifier(&self, index: usize) -> Option<&EventFd>;
    /// Programs vector `index` with `msg`; `masked` vectors must not fire.
    /// Legacy lines ignore the message.
    fn update(&self, index: usize, msg: MsiMessage, masked: bool) -> Result<(), InterruptError>;
}

/// Allocates interrupt groups for devices.
pub trait InterruptManager: Send + Sync {
    /// A group of `count` MSI vectors, initially masked.
    fn create_msi_group(
        &self,
        count: usize,
    ) -> Result<std::sync::Arc<dyn InterruptGroup>, InterruptError>;
}
