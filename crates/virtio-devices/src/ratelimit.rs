//! Rate-limited logging for what the guest can trigger.
//!
//! A guest can make a device log on every request (bad descriptors, bad
//! config writes, BAR moves): each such line goes through the device's
//! [`LogLimiter`] with [`guest_log!`], which lets [`LINES_PER_SECOND`]
//! lines through per second and then counts; the next line after the
//! window is preceded by one "suppressed K messages" line.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines a device may log per second about guest actions.
pub const LINES_PER_SECOND: u32 = 10;
const WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Window {
    start: Option<Instant>,
    lines: u32,
    suppressed: u64,
}

/// A per-device budget of guest-triggered log lines.
#[derive(Debug)]
pub struct LogLimiter {
    name: String,
    window: Mutex<Window>,
}

impl LogLimiter {
    /// A limiter for the device called `name` (used in the "suppressed" line).
    pub fn new(name: impl Into<String>) -> Self {
        LogLimiter {
            name: name.into(),
            window: Mutex::new(Window {
                start: None,
                lines: 0,
                suppressed: 0,
            }),
        }
    }

    /// Whether one more line may be logged now.
    pub fn allow(&self) -> bool {
        self.allow_at(Instant::now())
    }

    /// [`Self::allow`] at time `now`.
    pub fn allow_at(&self, now: Instant) -> bool {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let expired = w
            .start
            .is_none_or(|s| now.saturating_duration_since(s) >= WINDOW);
        if expired {
            if w.suppressed > 0 {
                log::warn!(
                    "{}: suppressed {} messages about guest actions",
                    self.name,
                    w.suppressed
                );
            }
            *w = Window {
                start: Some(now),
                lines: 0,
                suppressed: 0,
            };
        }
        if w.lines < LINES_PER_SECOND {
            w.lines += 1;
            true
        } else {
            w.suppressed += 1;
            false
        }
    }
}

/// `guest_log!(limiter, Level::Warn, "fmt", args..)`: logs through the
/// [`LogLimiter`] `limiter` (an expression of type `&LogLimiter`). A level
/// that is disabled costs nothing from the budget.
#[macro_export]
macro_rules! guest_log {
    ($limiter:expr, $lvl:expr, $($arg:tt)+) => {
        if log::log_enabled!($lvl) && $limiter.allow() {
            log::log!($lvl, $($arg)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::capture_logs;

    #[test]
    fn at_most_n_lines_per_second_then_a_summary() {
        let l = LogLimiter::new("dev");
        let t0 = Instant::now();
        let (allowed, logs) = capture_logs(|| {
            let n = (0..100)
                .filter(|i| l.allow_at(t0 + Duration::from_millis(*i)))
                .count();
            // A second later: the summary, then lines again.
            (n, l.allow_at(t0 + Duration::from_millis(1100)))
        });
        assert_eq!(allowed, (LINES_PER_SECOND as usize, true));
        assert_eq!(
            logs,
            vec![format!(
                "WARN dev: suppressed {} messages about guest actions",
                100 - LINES_PER_SECOND
            )]
        );
    }

    #[test]
    fn the_macro_goes_through_the_limiter() {
        let l = LogLimiter::new("dev");
        let ((), logs) = capture_logs(|| {
            for i in 0..50 {
                guest_log!(&l, log::Level::Warn, "bad request {i}");
            }
        });
        assert_eq!(logs.len(), LINES_PER_SECOND as usize);
        assert_eq!(logs[0], "WARN bad request 0");
    }
}
