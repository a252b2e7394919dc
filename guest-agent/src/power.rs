//! Power-off and reboot.
//!
//! As PID 1 the agent brings the guest down itself: SIGTERM to every
//! process, a grace period, SIGKILL, sync, reboot(2). As a service it asks
//! systemd instead.

use std::io;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use skiff_agent_proto::PowerAction;

use crate::server::Agent;
use crate::sys::Syscall;

/// How long processes get between SIGTERM and SIGKILL on power-off.
pub const GRACE: Duration = Duration::from_secs(2);
/// Delay before acting, so the reply (and events) reach the host first.
const REPLY_DELAY: Duration = Duration::from_millis(200);

/// Errors of power requests.
#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    /// systemctl could not be started.
    #[error("running systemctl")]
    Systemctl(#[source] io::Error),
    /// A thread could not be started.
    #[error("starting the power-off thread")]
    Thread(#[source] io::Error),
}

/// Serves a power request: acts shortly after the reply went out.
pub fn request(agent: &Agent, action: PowerAction) -> Result<(), PowerError> {
    if agent.pid1 {
        let sys = agent.sys.clone();
        thread::Builder::new()
            .name("power".into())
            .spawn(move || {
                thread::sleep(REPLY_DELAY);
                shutdown(sys.as_ref(), action, GRACE);
            })
            .map(drop)
            .map_err(PowerError::Thread)
    } else {
        let verb = match action {
            PowerAction::Poweroff => "poweroff",
            PowerAction::Reboot => "reboot",
        };
        let mut cmd = Command::new("systemctl");
        cmd.arg(verb).stdin(Stdio::null());
        agent
            .reaper
            .spawn(&mut cmd)
            .map(drop)
            .map_err(PowerError::Systemctl)
    }
}

/// Brings the guest down (PID 1). Returns only if reboot(2) failed.
pub fn shutdown(sys: &dyn Syscall, action: PowerAction, grace: Duration) {
    thread::sleep(REPLY_DELAY);
    let _ = sys.kill(-1, libc::SIGTERM);
    thread::sleep(grace);
    let _ = sys.kill(-1, libc::SIGKILL);
    sys.sync();
    let cmd = match action {
        PowerAction::Poweroff => libc::RB_POWER_OFF,
        PowerAction::Reboot => libc::RB_AUTOBOOT,
    };
    if let Err(e) = sys.reboot(cmd) {
        eprintln!("skiff-agent: reboot: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::{Call, Recording};

    #[test]
    fn shutdown_terms_kills_syncs_then_powers_off() {
        let sys = Recording::new();
        shutdown(&sys, PowerAction::Poweroff, Duration::ZERO);
        assert_eq!(
            sys.calls(),
            [
                Call::Kill(-1, libc::SIGTERM),
                Call::Kill(-1, libc::SIGKILL),
                Call::Sync,
                Call::Reboot(libc::RB_POWER_OFF)
            ]
        );
        let sys = Recording::new();
        shutdown(&sys, PowerAction::Reboot, Duration::ZERO);
        assert_eq!(sys.calls().last(), Some(&Call::Reboot(libc::RB_AUTOBOOT)));
    }
}
