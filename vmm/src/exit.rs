//! Why the VM stops, and how the part that notices tells the main loop.
//!
//! Any thread (a vCPU on an exit, a device on a guest write, the signal
//! handler path) calls [`ExitState::request`]; the first reason wins and the
//! main loop, woken by the eventfd, ends the VMM with [`ExitReason::code`].

use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (i8042 or ACPI reset register).
    Reset,
    /// The host asked the VMM to stop (signal or API).
    Stopped(String),
    /// The guest kernel panicked; the panic line.
    GuestPanic(String),
    /// A vCPU cannot go on: triple fault, unhandled exit, KVM error.
    Vcpu(crate::vstate::vcpu::VcpuRunError),
}

impl From<crate::vstate::vcpu::VcpuRunError> for ExitReason {
    fn from(e: crate::vstate::vcpu::VcpuRunError) -> Self {
        ExitReason::Vcpu(e)
    }
}

impl ExitReason {
    /// The VMM's exit status for this reason.
    pub fn code(&self) -> i32 {
        match self {
            ExitReason::PowerOff | ExitReason::Reset | ExitReason::Stopped(_) => 0,
            ExitReason::Vcpu(_) => 1,
            ExitReason::GuestPanic(_) => 3,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::PowerOff => write!(f, "guest powered off"),
            ExitReason::Reset => write!(f, "guest reset"),
            ExitReason::Stopped(why) => write!(f, "stopped: {why}"),
            ExitReason::GuestPanic(line) => write!(f, "guest kernel panicked: {line}"),
            ExitReason::Vcpu(e) => write!(f, "VM failed: {e}"),
        }
    }
}

/// The shared exit slot plus the eventfd that wakes the main loop.
pub struct ExitState {
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

impl ExitState {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self { reason: Mutex::new(None), evt: EventFd::new(EFD_NONBLOCK)? })
    }

    /// Records `reason` unless one is recorded already (a panic followed by
    /// the reset it causes stays a panic), and wakes the main loop.
    pub fn request(&self, reason: ExitReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
        let _ = self.evt.write(1);
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The eventfd the main loop waits on.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = ExitState::new().unwrap();
        s.request(ExitReason::GuestPanic("x".into()));
        s.request(ExitReason::Reset);
        assert_eq!(s.reason(), Some(ExitReason::GuestPanic("x".into())));
        assert_eq!(s.reason().unwrap().code(), 3);
        assert_eq!(s.eventfd().read().unwrap(), 2);
    }
}
