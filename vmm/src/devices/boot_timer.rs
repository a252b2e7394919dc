//! Firecracker-style boot-complete port: the guest writes
//! [`BOOT_COMPLETE_MAGIC`] to [`crate::arch::layout::BOOT_DEBUG_PORT`] when
//! it considers itself booted, and the VMM logs the time since it started.

use std::sync::Arc;
use std::time::Instant;

use vm_device::BusDevice;

use crate::arch::layout::BOOT_COMPLETE_MAGIC;
use crate::vstate::vcpu::ExitCounters;

/// The boot-complete lines logged at most: the guest decides when it
/// writes the port, so it must not be able to flood the log.
const MAX_LINES: u32 = 8;

/// Logs the boot time on a magic write (the first [`MAX_LINES`] of them).
pub struct BootTimer {
    start: Instant,
    counters: Arc<ExitCounters>,
    lines: u32,
}

impl BootTimer {
    /// `start` is when the VMM process started.
    pub fn new(start: Instant, counters: Arc<ExitCounters>) -> Self {
        Self { start, counters, lines: 0 }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&BOOT_COMPLETE_MAGIC) && self.lines < MAX_LINES {
            self.lines += 1;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_cannot_flood_the_log() {
        let mut t = BootTimer::new(Instant::now(), Arc::default());
        for _ in 0..1000 {
            t.write(0, 0, &[BOOT_COMPLETE_MAGIC]);
        }
        t.write(0, 0, &[0]);
        assert_eq!(t.lines, MAX_LINES);
    }
}
