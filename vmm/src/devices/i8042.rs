//! The i8042 keyboard controller, as far as rebooting goes: a guest write
//! of the CPU-reset command (0xfe) to port 0x64 resets the VM.

use std::sync::Arc;

use vm_device::BusDevice;
use vm_superio::{I8042Device, Trigger};

use crate::exit::{ExitReason, ExitState};

/// Raises [`ExitReason::Reset`] when the controller pulses the reset line.
pub struct ResetLine(Arc<ExitState>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(ExitReason::Reset);
        Ok(())
    }
}

/// The controller at ports 0x60–0x64.
pub struct I8042 {
    inner: I8042Device<ResetLine>,
    /// Reads return 0xff, as from ports nothing decodes.
    absent: bool,
}

impl I8042 {
    pub fn new(exit: Arc<ExitState>) -> Self {
        Self { inner: I8042Device::new(ResetLine(exit)), absent: false }
    }

    /// A controller firmware takes for absent (its status reads 0xff, so
    /// OVMF's PS/2 driver gives up at once instead of waiting out its
    /// command timeouts, about half a minute in the KVM box); the CPU
    /// reset command still resets.
    pub fn absent(exit: Arc<ExitState>) -> Self {
        Self { absent: true, ..Self::new(exit) }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if self.absent {
            data.fill(0xff);
        } else if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.inner.read(off);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let (Some(&v), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // The trigger cannot fail.
            let _ = self.inner.write(off, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_reset_command_resets() {
        let exit = Arc::new(ExitState::new().unwrap());
        let mut dev = I8042::new(exit.clone());
        dev.write(0x60, 4, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn an_absent_controller_reads_all_ones_and_still_resets() {
        let exit = Arc::new(ExitState::new().unwrap());
        let mut dev = I8042::absent(exit.clone());
        let mut status = [0u8];
        dev.read(0x60, 4, &mut status);
        assert_eq!(status, [0xff]);
        dev.write(0x60, 4, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }
}
