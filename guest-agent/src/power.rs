//! Power-off and reboot.
//!
//! As PID 1 the agent brings the guest down itself: SIGTERM to every
//! process, a grace period, SIGKILL, sync, reboot(2). As a service it asks
//! systemd instead.

use std::io;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use skiff_agent_proto::PowerAction;

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

/// Serves a power request: acts shortly after the reply went out. As PID 1
/// (`pid1`) the agent brings the guest down itself through `sys`
/// ([`shutdown`] with `grace`); otherwise it runs `systemctl` through
/// `spawn` (the agent passes its reaper's).
pub fn request(
    sys: &Arc<dyn Syscall>,
    pid1: bool,
    action: PowerAction,
    grace: Duration,
    spawn: impl FnOnce(&mut Command) -> io::Result<()>,
) -> Result<(), PowerError> {
    if pid1 {
        let sys = sys.clone();
        thread::Builder::new()
            .name("power".into())
            .spawn(move || {
                thread::sleep(REPLY_DELAY);
                shutdown(sys.as_ref(), action, grace);
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
        spawn(&mut cmd).map_err(PowerError::Systemctl)
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

    #[test]
    fn as_pid1_a_request_answers_first_then_brings_the_guest_down() {
        let rec = Arc::new(Recording::new());
        let sys: Arc<dyn Syscall> = rec.clone();
        let spawn = |_: &mut Command| -> io::Result<()> { panic!("PID 1 runs no systemctl") };
        request(&sys, true, PowerAction::Reboot, Duration::ZERO, spawn).unwrap();
        // The request returned before anything happened (the reply goes
        // out first).
        assert!(rec.calls().is_empty(), "{:?}", rec.calls());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while rec.calls().len() < 4 && std::time::Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            rec.calls(),
            [
                Call::Kill(-1, libc::SIGTERM),
                Call::Kill(-1, libc::SIGKILL),
                Call::Sync,
                Call::Reboot(libc::RB_AUTOBOOT)
            ]
        );
    }

    #[test]
    fn as_a_service_a_request_asks_systemd() {
        let rec = Arc::new(Recording::new());
        let sys: Arc<dyn Syscall> = rec.clone();
        let mut ran = Vec::new();
        let spawn = |cmd: &mut Command| {
            ran.push(format!("{cmd:?}"));
            Ok(())
        };
        request(&sys, false, PowerAction::Poweroff, Duration::ZERO, spawn).unwrap();
        assert_eq!(ran, [r#""systemctl" "poweroff""#]);
        let failing = |_: &mut Command| Err(io::ErrorKind::NotFound.into());
        let e = request(&sys, false, PowerAction::Reboot, Duration::ZERO, failing).unwrap_err();
        assert!(matches!(e, PowerError::Systemctl(_)), "{e}");
        thread::sleep(Duration::from_millis(300));
        assert!(rec.calls().is_empty(), "{:?}", rec.calls());
    }
}
