//! virtio device models, the virtio-pci (modern, MSI-X) transport and a
//! PCI root bus, independent of KVM.
//!
//! # Layers
//!
//! ```text
//!  vCPU exit ─► vm_device::Bus (PIO / MMIO)
//!                 ├─ 0xCF8..0xD00 ─► pci::PciConfigIo  ─┐
//!                 ├─ ECAM window  ─► pci::PciConfigMmio ─┴─► pci::PciBus ─► slot ─► dyn PciDevice
//!                 └─ BAR ranges   ─► pci::bus::BarBusAdapter ───────────────────────┘
//!                                                         transport::VirtioPciDevice
//!                                                           │ common cfg, notify, ISR, MSI-X
//!                                                           ▼
//!                                                   dyn VirtioDevice (rng, block, net, vsock,
//!                                                   console, fs, mem) ─► worker thread (epoll)
//! ```
//!
//! Device models see guest memory ([`GuestMemoryMmap`] behind a
//! [`vm_memory::GuestMemoryAtomic`]), [`virtio_queue::Queue`]s with their
//! notification eventfds, and a [`VirtioInterrupt`]; nothing here issues a
//! KVM ioctl. To write a new device, copy [`rng`].
//!
//! # Wiring it into the VMM
//!
//! 1. **Buses.** Keep the MMIO and PIO [`vm_device::Bus`]es in `Arc`s and
//!    build one [`pci::PciBus`] over them (it puts the host bridge in slot
//!    0). Share it as `Arc<Mutex<PciBus>>` and insert
//!    [`pci::PciConfigIo`] on the PIO bus at
//!    [`pci::bus::PCI_CONFIG_IO_PORT`] (length
//!    [`pci::bus::PCI_CONFIG_IO_SIZE`]) and [`pci::PciConfigMmio`] on the
//!    MMIO bus at the ECAM base you put in MCFG (length
//!    [`pci::bus::ECAM_BUS_SIZE`] for bus 0, the only bus).
//! 2. **ioeventfds.** Implement [`pci::IoEventRegistrar`] with
//!    `KVM_IOEVENTFD` (MMIO, any length, no datamatch) and pass it to
//!    `PciBus::new`. [`pci::NoIoEvents`] works too: notifications then come
//!    through BAR writes.
//! 3. **Interrupts.** Implement [`vm_device::interrupt::InterruptManager`]:
//!    `create_msi_group(n)` returns `n` vectors; the transport calls
//!    `InterruptGroup::update(index, msg, masked)` whenever the guest
//!    programs or masks an MSI-X entry (set the KVM GSI route; a masked
//!    vector must not fire) and `trigger(index)` to raise one (write the
//!    irqfd). Masking, the function mask and pending bits are handled here.
//!    A virtio-pci device with `q` queues asks for `q + 1` vectors.
//! 4. **BAR placement.** Implement [`pci::BarAllocator`] (or use
//!    [`pci::bus::RangeAllocator`]) over your 32-bit and 64-bit MMIO
//!    windows (the DSDT's host bridge `_CRS`). [`pci::PciBus::attach`]
//!    allocates, maps the BARs on the buses, registers the ioeventfds and
//!    fills a slot; [`pci::PciBus::detach`] undoes it and resets the
//!    device (hot-unplug; the ACPI side of hot-plug is the VMM's). If the
//!    guest moves a BAR, the bus re-maps it and its ioeventfds itself.
//! 5. **Devices.** For each device: build the model from its
//!    configuration (e.g. [`block::Block::new`] with a
//!    [`block::BlockConfig`]; parsing command-line options is the VMM's
//!    job), wrap it as `Arc<Mutex<dyn VirtioDevice>>` in
//!    [`transport::VirtioPciDevice::new`] with the guest memory and the
//!    interrupt manager, then `attach` it as `Arc<Mutex<dyn PciDevice>>`.
//!    Device activation, reset and feature negotiation are driven by the
//!    guest through the transport; worker threads start on `DRIVER_OK`
//!    and stop on reset or drop ([`lifecycle`]). Pause the devices
//!    ([`VirtioDevice::pause`]) after the vCPUs and resume them before;
//!    a paused VM's functions save and restore their state through
//!    [`VirtioPciDevice::save_state`] and [`VirtioPciDevice::restore_state`]
//!    ([`state`]);
//!    [`VirtioDevice::counters`] reports each device's I/O counters.
//! 6. **Memory for virtio-fs.** Guest RAM regions must be created from a
//!    file (memfd) with a `FileOffset`, or [`fs::Fs`] activation fails with
//!    [`ActivateError::MemoryNotShareable`]. If `InterruptGroup::notifier`
//!    returns the vector's irqfd, virtiofsd signals it directly; a vector
//!    masked then is up to the VMM (with notifiers absent, calls are
//!    forwarded through [`VirtioInterrupt::trigger`] and MSI-X pending
//!    bits apply).
//! 7. **Memory hot-plug.** [`mem::VirtioMem`] manages a region of guest
//!    physical memory the VMM maps (lazily backed) and registers but keeps
//!    out of the e820 map; implement [`mem::MemoryBackend`] to free what
//!    the guest unplugs (punch a hole in the memfd). Change the target
//!    with [`mem::MemHandle::set_requested_size`], then call the
//!    transport's `config_changed`; the guest plugs and onlines memory
//!    itself.
//!
//! # Guest input
//!
//! Nothing the guest writes may panic or hang the host: bad accesses are
//! ignored (reads return zeros or all ones), bad descriptor chains are
//! completed with length 0, a corrupt ring stops that queue only, and
//! every buffer sized by the guest is capped. `fuzz/` holds cargo-fuzz
//! targets for the queue parsers, the vsock packet path and the PCI
//! register files.

pub mod block;
pub mod console;
pub mod device;
pub mod fs;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod lifecycle;
pub mod mem;
pub mod net;
pub mod pci;
pub mod ratelimit;
pub mod rng;
pub mod rotating_log;
pub mod socket;
pub mod state;
pub mod transport;
pub mod vsock;
pub mod worker;

#[cfg(test)]
pub(crate) mod test_utils;

pub use device::{ActivateError, ActiveQueue, VirtioDevice, VirtioInterrupt, VirtioInterruptType};
pub use pci::{BarAllocator, IoEventRegistrar, PciBus, PciDevice};
pub use transport::VirtioPciDevice;

/// The guest memory type the devices work on.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
