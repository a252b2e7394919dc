//! The [`VirtioDevice`] trait every device model implements, and the
//! [`VirtioInterrupt`] trait through which it signals the driver.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::eventfd::EventFd;

use crate::state::{QueueProgress, StateError};
use crate::GuestMemoryMmap;

/// Errors from activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver did not make ready a queue the device needs.
    #[error("queue {0} is required but was not set up by the driver")]
    MissingQueue(usize),
    /// A host resource (eventfd, epoll, thread) could not be created.
    #[error("host resource for the device worker")]
    Io(#[source] io::Error),
    /// The device is already active.
    #[error("device already activated")]
    AlreadyActive,
    /// A vhost-user backend refused the set-up.
    #[error("vhost-user backend")]
    VhostUser(#[source] vhost::Error),
    /// A queue ring address is not in guest memory.
    #[error("queue ring address {0:#x} is not in guest memory")]
    BadQueueAddress(u64),
    /// Guest memory regions are not backed by a file that can be shared.
    #[error("guest memory region at {0:#x} is not file-backed, cannot share it")]
    MemoryNotShareable(u64),
    /// The worker thread could not be set up.
    #[error("device worker")]
    Worker(#[from] crate::worker::WorkerError),
}

/// Ring features every in-process device supports through virtio-queue
/// (event index and indirect descriptors); devices include them in
/// [`VirtioDevice::features`]. A vhost-user device offers only what its
/// backend supports instead.
pub const RING_FEATURES: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX
    | 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;

/// What an interrupt signals to the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioInterruptType {
    /// The device configuration changed.
    Config,
    /// Queue `n` has new used buffers.
    Queue(u16),
}

/// How a device raises interrupts. The transport implements it (for
/// virtio-pci: ISR bits plus MSI-X vectors); tests use a recorder.
pub trait VirtioInterrupt: Send + Sync {
    /// Signals `int_type` to the driver.
    fn trigger(&self, int_type: VirtioInterruptType) -> io::Result<()>;
    /// An eventfd whose write raises the same interrupt, for backends in
    /// another process (vhost-user `call` fds); `None` if there is none.
    fn notifier(&self, int_type: VirtioInterruptType) -> Option<EventFd>;
    /// The device hit an error it cannot recover from by itself (a corrupt
    /// ring): set `DEVICE_NEEDS_RESET` and tell the driver. The default
    /// does nothing (for transports without the status bit).
    fn device_needs_reset(&self) {}
}

/// A queue the driver made ready, handed to the device on activation.
pub struct ActiveQueue {
    /// Index of the queue in the device (0 = first queue).
    pub index: usize,
    /// The queue, with the addresses and size the driver programmed.
    pub queue: Queue,
    /// Written (by a KVM ioeventfd or by the transport) when the driver
    /// notifies the queue.
    pub event: EventFd,
}

/// A virtio device model, independent of the transport.
///
/// Lifecycle, driven by the transport:
///
/// ```text
///   new ──► (features/ack_features, read/write_config)* ──► activate
///    ▲                                                         │
///    └───────────────────────── reset ◄────────────────────────┘
/// ```
///
/// `activate` starts the device (normally a worker thread, see
/// [`crate::lifecycle`]) with the ready queues; `reset` stops it and
/// forgets everything negotiated, after which the device can be activated
/// again. An active device can be paused (its worker parked, guest memory
/// untouched) and resumed, for example while the VM is paused.
pub trait VirtioDevice: Send {
    /// The virtio device type (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers, ring features included (see
    /// [`RING_FEATURES`]); the transport adds `VIRTIO_F_VERSION_1`.
    fn features(&self) -> u64;
    /// The features the driver accepted (a subset of what was offered).
    fn ack_features(&mut self, features: u64);
    /// Reads device-specific configuration at `offset`; bytes beyond the
    /// configuration read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device-specific configuration; returns whether the device
    /// took the write (the transport logs ignored ones, rate-limited). Most
    /// devices ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]) -> bool {
        let _ = (offset, data);
        false
    }
    /// Starts the device with the queues the driver made ready.
    fn activate(
        &mut self,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError>;
    /// Stops the device and forgets negotiated state. Returns `false` if the
    /// device cannot be reset (then it needs to be removed).
    fn reset(&mut self) -> bool;
    /// Parks the device's worker(s): once this returns they touch no guest
    /// memory until [`VirtioDevice::resume`]; notifications meanwhile are
    /// handled after it. A paused device can still be reset. The default
    /// does nothing (a device without workers).
    fn pause(&mut self) {}
    /// Lets paused workers go on. The default does nothing.
    fn resume(&mut self) {}
    /// The device's I/O counters (requests, bytes, notifications,
    /// interrupts, ... whatever is natural for it), by name. Cumulative
    /// over the device's life, resets included. The default is empty.
    fn counters(&self) -> BTreeMap<&'static str, u64> {
        BTreeMap::new()
    }
    /// Where the device side of each active queue is, for a snapshot
    /// (call paused). An inactive device returns nothing. The default
    /// refuses: the device keeps state a snapshot does not carry.
    fn queue_progress(&mut self) -> Result<Vec<QueueProgress>, StateError> {
        Err(StateError::Unsupported(self.device_type()))
    }
    /// Whether the device configuration a snapshot saved (`saved`, the
    /// first bytes of it) fits this device made anew (`now`). The default
    /// wants them equal.
    fn config_restorable(&self, saved: &[u8], now: &[u8]) -> bool {
        saved == now
    }
    /// The backend's own state taken by the last
    /// [`VirtioDevice::queue_progress`] (a vhost-user backend's), for a
    /// snapshot. The default has none.
    fn backend_state(&mut self) -> Option<Vec<u8>> {
        None
    }
    /// The device is about to be activated from a snapshot's state, with
    /// new host-side resources: it gives the backend its saved state and
    /// tells the driver whatever the host side lost (vsock resets its
    /// transport). The default takes no backend state.
    fn restoring(&mut self, backend_state: Option<&[u8]>) -> Result<(), StateError> {
        match backend_state {
            None => Ok(()),
            Some(_) => Err(StateError::Mismatch(format!(
                "device type {} keeps no backend state, the snapshot has one",
                self.device_type()
            ))),
        }
    }
}

/// Copies `config[offset..]` into `data`, zero-filling what lies outside.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

/// Takes the queue with `index` out of `queues`, or fails with
/// [`ActivateError::MissingQueue`].
pub fn take_queue(
    queues: &mut Vec<ActiveQueue>,
    index: usize,
) -> Result<ActiveQueue, ActivateError> {
    let pos = queues
        .iter()
        .position(|q| q.index == index)
        .ok_or(ActivateError::MissingQueue(index))?;
    Ok(queues.swap_remove(pos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_bytes_out_of_range_read_zero() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, 100, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
