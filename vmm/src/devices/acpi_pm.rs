//! The hardware-reduced ACPI sleep-control, sleep-status and reset
//! registers named by the FADT (see [`crate::arch::acpi`]).

use std::sync::Arc;

use vm_device::BusDevice;

use crate::arch::acpi::S5_SLEEP_TYPE;
use crate::exit::{ExitReason, ExitState};

const SLEEP_CONTROL: u64 = 0;
const RESET: u64 = 2;
const SLP_EN: u8 = 1 << 5;
const RESET_VALUE: u8 = 1;

/// Powers the VM off when the guest enters S5, resets it on the reset value.
pub struct AcpiPm {
    exit: Arc<ExitState>,
}

impl AcpiPm {
    pub fn new(exit: Arc<ExitState>) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        // Sleep status never reports a wake event; the others read as zero.
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            SLEEP_CONTROL if value & SLP_EN != 0 && (value >> 2) & 0x7 == S5_SLEEP_TYPE => {
                self.exit.request(ExitReason::PowerOff);
            }
            RESET if value == RESET_VALUE => self.exit.request(ExitReason::Reset),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_and_reset_resets() {
        let exit = Arc::new(ExitState::new().unwrap());
        let mut pm = AcpiPm::new(exit.clone());
        pm.write(0x600, 0, &[(3 << 2) | SLP_EN]); // S3: ignored
        assert_eq!(exit.reason(), None);
        pm.write(0x600, 0, &[(5 << 2) | SLP_EN]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));

        let exit = Arc::new(ExitState::new().unwrap());
        let mut pm = AcpiPm::new(exit.clone());
        pm.write(0x600, 2, &[1]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }
}
