//! Rate limiting of guest-driven events, as QEMU's monitor does it.
//!
//! A guest decides how often `MEMORY_DEVICE_SIZE_CHANGE` happens (the Linux
//! driver plugs a 128 MiB memory block in dozens of requests; a hostile
//! guest can plug and unplug in a loop), and every negotiated client would
//! get each one. QEMU throttles such events per device: the first goes out
//! at once and opens a one-second window; events during the window replace
//! each other, and the last one is sent when the window ends, which opens
//! the next window. A window that ends with nothing held closes, and the
//! next event goes out at once again. Clients therefore always learn the
//! latest value within a second, but not every intermediate one. This
//! module is that rule, with the clock passed in.

use super::event::QmpEvent;
use super::protocol::Timestamp;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// QEMU's window for `MEMORY_DEVICE_SIZE_CHANGE` (`monitor_qapi_event_conf`).
pub(super) const THROTTLE_PERIOD: Duration = Duration::from_secs(1);

/// Windows open at once are capped: a device id is a key, and ids come from
/// the VMM, so this only bounds a bug.
const MAX_KEYS: usize = 64;

/// An event and the time it was emitted (kept when it is held back, as
/// QEMU keeps the held event's timestamp).
pub(crate) type Stamped = (QmpEvent, Timestamp);

#[derive(Debug)]
struct Window {
    ends: Instant,
    held: Option<Stamped>,
}

/// Per-key throttle windows for the events QEMU rate-limits.
#[derive(Debug)]
pub(crate) struct EventThrottle {
    period: Duration,
    windows: HashMap<String, Window>,
}

impl EventThrottle {
    /// Throttles with windows of `period`.
    pub(crate) fn new(period: Duration) -> Self {
        Self {
            period,
            windows: HashMap::new(),
        }
    }

    /// The key an event is throttled under, or `None` if it is never held.
    ///
    /// The extension `X_MEMORY_DEVICE_RESIZE_STALLED` has its own window per
    /// device: a guest that alternates a little progress with stalls decides
    /// how often it happens. `X_MEMORY_DEVICE_RESIZE_DONE` is not held: it
    /// comes at most once per `requested-size` write, which clients decide.
    fn key(event: &QmpEvent) -> Option<String> {
        match event {
            QmpEvent::MemoryDeviceSizeChange { id, .. } => Some(id.clone()),
            QmpEvent::MemoryDeviceResizeStalled { id, .. } => Some(format!("{id}/stalled")),
            _ => None,
        }
    }

    /// Offers an event emitted at `now`: returns it if it goes out now, or
    /// holds it (replacing what its window held) and returns `None`.
    pub(crate) fn offer(&mut self, now: Instant, stamped: Stamped) -> Option<Stamped> {
        let Some(key) = Self::key(&stamped.0) else {
            return Some(stamped);
        };
        match self.windows.get_mut(&key) {
            Some(w) if now < w.ends => {
                w.held = Some(stamped);
                None
            }
            _ => {
                if self.windows.len() >= MAX_KEYS && !self.windows.contains_key(&key) {
                    return Some(stamped);
                }
                self.windows.insert(
                    key,
                    Window {
                        ends: now + self.period,
                        held: None,
                    },
                );
                Some(stamped)
            }
        }
    }

    /// Ends the windows that are over at `now` and returns the events they
    /// held, to go out now (each opens a new window); windows that held
    /// nothing close.
    pub(crate) fn due(&mut self, now: Instant) -> Vec<Stamped> {
        let mut out = Vec::new();
        let period = self.period;
        self.windows.retain(|_, w| {
            if now < w.ends {
                return true;
            }
            match w.held.take() {
                Some(s) => {
                    out.push(s);
                    w.ends = now + period;
                    true
                }
                None => false,
            }
        });
        out
    }

    /// Takes every held event at once, closing all windows (the server is
    /// ending: the last values still reach the clients).
    pub(crate) fn drain_held(&mut self) -> Vec<Stamped> {
        self.windows.drain().filter_map(|(_, w)| w.held).collect()
    }

    /// When the earliest open window ends, if any is open.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.windows.values().map(|w| w.ends).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(id: &str, size: u64) -> Stamped {
        (
            QmpEvent::MemoryDeviceSizeChange {
                id: id.to_string(),
                size,
            },
            Timestamp {
                seconds: size,
                microseconds: 0,
            },
        )
    }

    fn sizes(v: &[Stamped]) -> Vec<u64> {
        v.iter()
            .map(|(e, _)| match e {
                QmpEvent::MemoryDeviceSizeChange { size, .. } => *size,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn test_first_goes_out_then_the_last_of_the_window() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut t = EventThrottle::new(THROTTLE_PERIOD);
        assert!(t.offer(ms(0), size("vmem0", 1)).is_some());
        assert!(t.offer(ms(100), size("vmem0", 2)).is_none());
        assert!(t.offer(ms(900), size("vmem0", 3)).is_none());
        assert_eq!(t.next_deadline(), Some(ms(1000)));
        assert!(t.due(ms(999)).is_empty());
        let out = t.due(ms(1000));
        assert_eq!(sizes(&out), [3]);
        // The held event keeps the time it was emitted.
        assert_eq!(out[0].1.seconds, 3);
        // Its delivery opened a new window...
        assert!(t.offer(ms(1500), size("vmem0", 4)).is_none());
        assert_eq!(sizes(&t.due(ms(2000))), [4]);
        // ...and a window that ends empty closes: the next goes out at once.
        assert!(t.due(ms(3000)).is_empty());
        assert_eq!(t.next_deadline(), None);
        assert!(t.offer(ms(3001), size("vmem0", 5)).is_some());
    }

    #[test]
    fn test_devices_have_their_own_windows_and_other_events_pass() {
        let t0 = Instant::now();
        let mut t = EventThrottle::new(THROTTLE_PERIOD);
        assert!(t.offer(t0, size("a", 1)).is_some());
        assert!(t.offer(t0, size("b", 1)).is_some());
        assert!(t.offer(t0, size("a", 2)).is_none());
        for e in [QmpEvent::Stop, QmpEvent::Resume, QmpEvent::Powerdown] {
            let at = Timestamp {
                seconds: 0,
                microseconds: 0,
            };
            assert!(t.offer(t0, (e, at)).is_some());
        }
        assert_eq!(sizes(&t.due(t0 + THROTTLE_PERIOD)), [2]);
    }

    #[test]
    fn test_stall_events_have_their_own_window_and_done_passes() {
        let t0 = Instant::now();
        let at = Timestamp {
            seconds: 0,
            microseconds: 0,
        };
        let stalled = |size| {
            (
                QmpEvent::MemoryDeviceResizeStalled {
                    id: "vmem0".into(),
                    size,
                    requested_size: 0,
                    reason: "guest-no-progress",
                    message: String::new(),
                    plugged_ranges: Vec::new(),
                    stall_timeout_ms: 100,
                },
                at,
            )
        };
        let done = (
            QmpEvent::MemoryDeviceResizeDone {
                id: "vmem0".into(),
                size: 0,
                requested_size: 0,
            },
            at,
        );
        let mut t = EventThrottle::new(THROTTLE_PERIOD);
        // A size change does not hold back the stall event, and vice versa.
        assert!(t.offer(t0, size("vmem0", 1)).is_some());
        assert!(t.offer(t0, stalled(4)).is_some());
        assert!(t.offer(t0, stalled(2)).is_none());
        assert!(t.offer(t0, done.clone()).is_some());
        assert!(t.offer(t0, done).is_some());
        let out = t.due(t0 + THROTTLE_PERIOD);
        assert_eq!(out.len(), 1);
        assert!(matches!(
            out[0].0,
            QmpEvent::MemoryDeviceResizeStalled { size: 2, .. }
        ));
    }

    #[test]
    fn test_a_flood_leaves_one_event_per_window() {
        let t0 = Instant::now();
        let mut t = EventThrottle::new(THROTTLE_PERIOD);
        let mut sent = 0;
        for i in 0..100_000u64 {
            let now = t0 + Duration::from_micros(i * 50); // 5 s of events
            sent += t.due(now).len();
            sent += usize::from(t.offer(now, size("vmem0", i)).is_some());
        }
        sent += t.due(t0 + Duration::from_secs(6)).len();
        assert!((5..=7).contains(&sent), "{sent} events for a 5 s flood");
    }
}
