//! A thin VM's wall clock follows the host's: every client's hello carries
//! the host's time ([`skiff_agent_proto::Hello::time_ns`]), and when the
//! guest's clock is more than [`CLOCK_SLACK_MS`] away the agent sets it.
//! This is what brings the clock of a VM restored from a snapshot to the
//! present (kvmclock goes on from the saved value, so the guest's time lags
//! by as long as it was saved); a running VM's clock only drifts by
//! milliseconds and is left alone. Only a VM's init does this (see
//! [`crate::server::Agent::host_clock`]): a container's agent shares the
//! host's clock.

use std::time::{SystemTime, UNIX_EPOCH};

use skiff_agent_proto::CLOCK_SLACK_MS;

use crate::sys::Syscall;

/// Sets the clock to `host_ns` if it is more than the slack away from it;
/// returns how far it was (host minus guest, in nanoseconds), if set.
pub fn follow(sys: &dyn Syscall, host_ns: u64) -> Option<i128> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    let behind = i128::from(host_ns) - now;
    if behind.unsigned_abs() <= u128::from(CLOCK_SLACK_MS) * 1_000_000 {
        return None;
    }
    match sys.set_realtime(host_ns) {
        Ok(()) => {
            eprintln!(
                "skiff-agent: clock set to the host's: it was {:.3} s {}",
                behind.unsigned_abs() as f64 / 1e9,
                if behind > 0 { "behind" } else { "ahead" }
            );
            Some(behind)
        }
        Err(e) => {
            eprintln!("skiff-agent: cannot set the clock: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::fake::{Call, Recording};

    #[test]
    fn the_clock_is_set_only_when_it_is_off() {
        let rec = Recording::default();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        assert_eq!(follow(&rec, now), None);
        let later = now + 7_000_000_000;
        let behind = follow(&rec, later).expect("7 s behind");
        assert!(
            behind > 6_000_000_000 && behind <= 7_000_000_000,
            "{behind}"
        );
        assert!(follow(&rec, now - 5_000_000_000).expect("5 s ahead") < 0);
        let calls = rec.calls.lock().unwrap();
        assert_eq!(calls.len(), 2);
        assert!(matches!(calls[0], Call::SetTime(t) if t == later));
    }
}
