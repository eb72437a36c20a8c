//! A per-call-site budget for log messages, so that a guest that makes the
//! VMM log in a loop (a broken virtqueue notified without end) cannot flood
//! stderr, fill a disk or block a thread on a full pipe.
//!
//! Each call site may print [`BURST`] messages per [`WINDOW`]; the rest of
//! the window's messages are counted, not printed, and the first message
//! printed after them says how many were suppressed.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Messages one call site may print per window.
pub const BURST: u32 = 10;
/// The length of a window.
pub(crate) const WINDOW: Duration = Duration::from_secs(1);

/// What to do with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Print it.
    Print {
        /// Messages from the same site dropped since the last one printed.
        suppressed: u64,
    },
    /// Drop it (counted).
    Suppress,
}

#[derive(Debug)]
struct Site {
    window_start: Instant,
    printed: u32,
    suppressed: u64,
}

/// Budgets for every call site seen so far. Any thread may use it; it takes
/// one short lock per message (logging is off the hot path).
#[derive(Debug, Default)]
pub(crate) struct LogLimiter {
    sites: Mutex<HashMap<(&'static str, u32), Site>>,
}

impl LogLimiter {
    /// An empty limiter.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Decides for a message from `site` (file and line) at time `now`.
    pub(crate) fn admit(&self, site: (&'static str, u32), now: Instant) -> Admit {
        let mut sites = self.sites.lock().unwrap_or_else(PoisonError::into_inner);
        let s = sites.entry(site).or_insert(Site {
            window_start: now,
            printed: 0,
            suppressed: 0,
        });
        if now.saturating_duration_since(s.window_start) >= WINDOW {
            s.window_start = now;
            s.printed = 0;
        }
        if s.printed < BURST {
            s.printed += 1;
            Admit::Print {
                suppressed: std::mem::take(&mut s.suppressed),
            }
        } else {
            s.suppressed += 1;
            Admit::Suppress
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SITE: (&str, u32) = ("devices/src/virtio/mmio.rs", 42);

    #[test]
    fn a_burst_prints_then_the_rest_of_the_window_is_counted() {
        let l = LogLimiter::new();
        let t0 = Instant::now();
        let printed = (0..10_000)
            .filter(|_| l.admit(SITE, t0) != Admit::Suppress)
            .count();
        assert_eq!(printed, BURST as usize);
        // The next window's first message reports what was dropped.
        assert_eq!(
            l.admit(SITE, t0 + WINDOW),
            Admit::Print {
                suppressed: 10_000 - u64::from(BURST)
            }
        );
        assert_eq!(l.admit(SITE, t0 + WINDOW), Admit::Print { suppressed: 0 });
    }

    #[test]
    fn sites_have_their_own_budgets() {
        let l = LogLimiter::new();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(l.admit(SITE, t0), Admit::Print { suppressed: 0 });
        }
        assert_eq!(l.admit(SITE, t0), Admit::Suppress);
        assert_eq!(
            l.admit(("vmm/src/memory/memory_manager.rs", 7), t0),
            Admit::Print { suppressed: 0 }
        );
    }

    #[test]
    fn a_flood_over_many_windows_prints_a_bounded_number_of_lines() {
        let l = LogLimiter::new();
        let t0 = Instant::now();
        // 100,000 messages over 10 s of (simulated) time: at most BURST
        // per second get through.
        let printed = (0..100_000u64)
            .filter(|i| {
                let now = t0 + Duration::from_micros(i * 100);
                l.admit(SITE, now) != Admit::Suppress
            })
            .count();
        assert!(printed <= 11 * BURST as usize, "{printed}");
        assert!(printed >= 10 * BURST as usize, "{printed}");
    }
}
