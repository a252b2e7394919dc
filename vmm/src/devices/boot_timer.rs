//! Firecracker-style boot-complete port: the guest writes
//! [`BOOT_COMPLETE_MAGIC`] to [`crate::arch::layout::BOOT_DEBUG_PORT`] when
//! it considers itself booted, and the VMM logs the time since it started.

use std::sync::Arc;
use std::time::Instant;

use vm_device::BusDevice;

use crate::arch::layout::BOOT_COMPLETE_MAGIC;
use crate::vstate::vcpu::ExitCounters;

/// Logs the boot time once per magic write.
pub struct BootTimer {
    start: Instant,
    counters: Arc<ExitCounters>,
}

impl BootTimer {
    /// `start` is when the VMM process started.
    pub fn new(start: Instant, counters: Arc<ExitCounters>) -> Self {
        Self { start, counters }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&BOOT_COMPLETE_MAGIC) {
            let us = self.start.elapsed().as_micros();
            log::info!(
                "guest boot complete: {}.{:03} ms after VMM start, {} VM exits to the VMM",
                us / 1000,
                us % 1000,
                self.counters.total()
            );
        }
    }
}
