//! The outcome of a virtio-mem resize: has the guest reached the requested size, and if
//! it has stopped getting closer, why.
//!
//! QEMU only reports plugged-size changes; a client that asked for a size cannot tell a
//! resize in progress from one that will never finish. A [`ResizeTracker`] follows each
//! request (a [`request`](ResizeTracker::request) call, made on every `requested-size`
//! write) and the plugged size, and answers:
//! - *done*: the plugged size equals the requested size;
//! - *stalled*: it does not, and the distance to the requested size has not shrunk for
//!   the stall timeout (default [`DEFAULT_STALL_TIMEOUT`]) since the request or the last
//!   progress, with the reason the device knows ([`StallReason`]);
//! - *in progress* otherwise, and *idle* before the first request.
//!
//! Progress is the distance `|requested - plugged|` reaching a new minimum since the
//! request (or reaching zero): a guest that plugs and unplugs the same blocks in a loop
//! does not make progress. [`poll`](ResizeTracker::poll) turns the state into events,
//! each at most once: one [`ResizeEvent::Done`] per request, one
//! [`ResizeEvent::Stalled`] per stall (a stall ends with progress, reaching the
//! requested size, or a new request). A guest that alternates between a little progress
//! and a stall thus causes at most one stall event per stall timeout.
//!
//! The tracker is plain data with the clock passed in; the device keeps it under its lock
//! ([`VirtioMem`](super::VirtioMem)), and the VMM polls it when the device's state
//! changes and at [`next_deadline`](ResizeTracker::next_deadline), so a stall is noticed
//! even when the guest sends nothing.

use std::time::{Duration, Instant, SystemTime};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_NEEDS_RESET,
};

/// The stall timeout until a client sets another one: ten seconds without getting
/// closer to the requested size. Linux's driver plugs a 128 MiB memory block in one or
/// a few requests; between blocks it adds and onlines memory, which takes well under a
/// second on hardware and a few seconds under emulation.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The shortest stall timeout accepted.
pub const MIN_STALL_TIMEOUT: Duration = Duration::from_millis(100);
/// The longest stall timeout accepted (one day).
pub const MAX_STALL_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// A moment, on the monotonic clock (for deadlines) and the wall clock (for clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// For deadlines.
    pub mono: Instant,
    /// For reports.
    pub wall: SystemTime,
}

impl Stamp {
    /// Now.
    pub fn now() -> Stamp {
        Stamp {
            mono: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    /// The same moment shifted by `d` on both clocks (saturating on the wall clock).
    pub fn plus(self, d: Duration) -> Stamp {
        Stamp {
            mono: self.mono + d,
            wall: self.wall.checked_add(d).unwrap_or(self.wall),
        }
    }
}

/// What the transport knows about the driver, for the stall reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DriverView {
    /// The driver set `DRIVER_OK` (and has not reset the device since).
    pub driver_ok: bool,
    /// The device is in its error state (`DEVICE_NEEDS_RESET`).
    pub needs_reset: bool,
}

impl DriverView {
    /// The view of a virtio device status register (as
    /// [`VirtioMmio::status`](super::VirtioMmio::status) reads it): `DRIVER_OK` set and
    /// `FAILED` clear means a driver; `DEVICE_NEEDS_RESET` means the error state.
    pub fn from_status(status: u8) -> DriverView {
        let bit = |b: u32| u32::from(status) & b != 0;
        DriverView {
            driver_ok: bit(VIRTIO_CONFIG_S_DRIVER_OK) && !bit(VIRTIO_CONFIG_S_FAILED),
            needs_reset: bit(VIRTIO_CONFIG_S_NEEDS_RESET),
        }
    }
}

/// Why a resize makes no progress, most decisive first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StallReason {
    /// The device needs a reset (the driver broke the protocol); nothing is processed
    /// until the driver resets it.
    NeedsReset,
    /// No driver has the device: the guest has not set `DRIVER_OK`.
    NoDriver {
        /// A driver had set `DRIVER_OK` before and then reset the device.
        ever_active: bool,
    },
    /// The host refused requests (the memory backend failed; the guest was answered
    /// BUSY) since the last progress.
    HostBusy {
        /// Failed backend calls since the last progress.
        failures: u64,
        /// The last failure, as the backend described it.
        detail: String,
    },
    /// The driver is active and the host refused nothing, but the guest does not get
    /// closer: it cannot offline the memory it would unplug, cannot add the memory it
    /// would plug, or does not try.
    GuestNoProgress {
        /// The guest should unplug (the plugged size is above the requested size).
        unplugging: bool,
    },
}

impl StallReason {
    /// The name clients see (`reason` of `X_MEMORY_DEVICE_RESIZE_STALLED`).
    pub fn name(&self) -> &'static str {
        match self {
            StallReason::NeedsReset => "device-needs-reset",
            StallReason::NoDriver { .. } => "no-driver",
            StallReason::HostBusy { .. } => "host-busy",
            StallReason::GuestNoProgress { .. } => "guest-no-progress",
        }
    }

    /// A one-line explanation for people.
    pub fn message(&self) -> String {
        match self {
            StallReason::NeedsReset => {
                "the device needs a reset: the guest driver broke the virtio protocol".into()
            }
            StallReason::NoDriver { ever_active: false } => {
                "no guest driver: the guest never set DRIVER_OK".into()
            }
            StallReason::NoDriver { ever_active: true } => {
                "no guest driver: the driver reset the device and has not set DRIVER_OK again"
                    .into()
            }
            StallReason::HostBusy { failures, detail } => {
                format!("the host refused {failures} request(s) (answered BUSY): {detail}")
            }
            StallReason::GuestNoProgress { unplugging: true } => {
                "the guest does not unplug (memory it cannot offline, or it does not try)".into()
            }
            StallReason::GuestNoProgress { unplugging: false } => {
                "the guest does not plug (it cannot add the memory, or it does not try)".into()
            }
        }
    }
}

/// Where a resize stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeState {
    /// Nothing was requested yet.
    Idle,
    /// The plugged size is not the requested size, and the guest got closer within the
    /// stall timeout.
    InProgress,
    /// The plugged size is the requested size.
    Done,
    /// The plugged size is not the requested size, and the guest has not got closer for
    /// the stall timeout.
    Stalled,
}

impl ResizeState {
    /// The name clients see (`state` in `x-query-hotplug`).
    pub fn name(self) -> &'static str {
        match self {
            ResizeState::Idle => "idle",
            ResizeState::InProgress => "in-progress",
            ResizeState::Done => "done",
            ResizeState::Stalled => "stalled",
        }
    }
}

/// What [`ResizeTracker::poll`] reports, each at most once per request or stall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResizeEvent {
    /// The plugged size reached the requested size after a request.
    Done,
    /// The resize stopped getting closer for the stall timeout.
    Stalled(StallReason),
}

/// The resize state machine (see the module documentation).
#[derive(Debug, Clone)]
pub struct ResizeTracker {
    timeout: Duration,
    last_request: Option<Stamp>,
    last_progress: Option<Stamp>,
    /// The smallest distance to the requested size since the request.
    best_distance: u64,
    done_owed: bool,
    stall_reported: bool,
    backend_failures: u64,
    last_backend_error: Option<String>,
    ever_active: bool,
}

impl Default for ResizeTracker {
    fn default() -> Self {
        ResizeTracker::new()
    }
}

fn distance(requested: u64, plugged: u64) -> u64 {
    requested.abs_diff(plugged)
}

impl ResizeTracker {
    /// A tracker with [`DEFAULT_STALL_TIMEOUT`] and nothing requested.
    pub fn new() -> ResizeTracker {
        ResizeTracker {
            timeout: DEFAULT_STALL_TIMEOUT,
            last_request: None,
            last_progress: None,
            best_distance: 0,
            done_owed: false,
            stall_reported: false,
            backend_failures: 0,
            last_backend_error: None,
            ever_active: false,
        }
    }

    /// The stall timeout.
    pub fn stall_timeout(&self) -> Duration {
        self.timeout
    }

    /// Sets the stall timeout, clamped to
    /// [`MIN_STALL_TIMEOUT`]..=[`MAX_STALL_TIMEOUT`]; applies to the running stall
    /// deadline too. Returns the timeout set.
    pub fn set_stall_timeout(&mut self, timeout: Duration) -> Duration {
        self.timeout = timeout.clamp(MIN_STALL_TIMEOUT, MAX_STALL_TIMEOUT);
        self.timeout
    }

    /// A new requested size was set at `now` (also when it equals the old one): a
    /// done event is owed once the plugged size matches, and the stall clock restarts.
    pub fn request(&mut self, now: Stamp, requested: u64, plugged: u64) {
        self.last_request = Some(now);
        self.best_distance = distance(requested, plugged);
        self.done_owed = true;
        self.stall_reported = false;
        self.clear_backend_failures();
    }

    /// The plugged size changed at `now`; progress if it got closer than ever since the
    /// request, or reached the requested size.
    pub fn size_changed(&mut self, now: Stamp, requested: u64, plugged: u64) {
        let d = distance(requested, plugged);
        if d < self.best_distance || d == 0 {
            self.best_distance = d;
            self.last_progress = Some(now);
            self.stall_reported = false;
            self.clear_backend_failures();
        }
    }

    /// The memory backend refused a request (the guest was answered BUSY).
    pub fn backend_failed(&mut self, detail: String) {
        self.backend_failures = self.backend_failures.saturating_add(1);
        self.last_backend_error = Some(detail);
    }

    /// A driver set `DRIVER_OK`.
    pub fn driver_activated(&mut self) {
        self.ever_active = true;
    }

    /// When the last request was made.
    pub fn last_request(&self) -> Option<Stamp> {
        self.last_request
    }

    /// When the guest last got closer to the requested size (`None` before it ever did).
    pub fn last_progress(&self) -> Option<Stamp> {
        self.last_progress
    }

    fn clear_backend_failures(&mut self) {
        self.backend_failures = 0;
        self.last_backend_error = None;
    }

    /// The later of the last request and the last progress: the stall clock's start.
    fn anchor(&self) -> Option<Stamp> {
        match (self.last_request, self.last_progress) {
            (Some(r), Some(p)) if p.mono > r.mono => Some(p),
            (Some(r), _) => Some(r),
            (None, _) => None,
        }
    }

    /// When the current resize counts as stalled, if it is not done (and something was
    /// requested).
    pub fn stalls_at(&self, requested: u64, plugged: u64) -> Option<Stamp> {
        if distance(requested, plugged) == 0 {
            return None;
        }
        self.anchor().map(|a| a.plus(self.timeout))
    }

    /// The state at `now`.
    pub fn state(&self, now: Instant, requested: u64, plugged: u64) -> ResizeState {
        if self.last_request.is_none() {
            return ResizeState::Idle;
        }
        match self.stalls_at(requested, plugged) {
            None => ResizeState::Done,
            Some(at) if now >= at.mono => ResizeState::Stalled,
            Some(_) => ResizeState::InProgress,
        }
    }

    /// Why the resize does not progress, given what the transport says about the driver.
    pub fn reason(&self, view: DriverView, requested: u64, plugged: u64) -> StallReason {
        if view.needs_reset {
            StallReason::NeedsReset
        } else if !view.driver_ok {
            StallReason::NoDriver {
                ever_active: self.ever_active,
            }
        } else if let Some(detail) = &self.last_backend_error {
            StallReason::HostBusy {
                failures: self.backend_failures,
                detail: detail.clone(),
            }
        } else {
            StallReason::GuestNoProgress {
                unplugging: plugged > requested,
            }
        }
    }

    /// The event due at `now`, if any; each is returned once (see the module
    /// documentation).
    pub fn poll(
        &mut self,
        now: Instant,
        view: DriverView,
        requested: u64,
        plugged: u64,
    ) -> Option<ResizeEvent> {
        self.last_request?;
        match self.stalls_at(requested, plugged) {
            None => std::mem::take(&mut self.done_owed).then_some(ResizeEvent::Done),
            Some(at) if now >= at.mono && !self.stall_reported => {
                self.stall_reported = true;
                Some(ResizeEvent::Stalled(self.reason(view, requested, plugged)))
            }
            Some(_) => None,
        }
    }

    /// When [`poll`](Self::poll) must be called next even if nothing changes: the stall
    /// deadline, while a stall is possible and not yet reported.
    pub fn next_deadline(&self, requested: u64, plugged: u64) -> Option<Instant> {
        if self.stall_reported {
            return None;
        }
        self.stalls_at(requested, plugged).map(|s| s.mono)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    struct Clock {
        t0: Instant,
    }

    impl Clock {
        fn at(&self, ms: u64) -> Stamp {
            Stamp {
                mono: self.t0 + Duration::from_millis(ms),
                wall: SystemTime::UNIX_EPOCH + Duration::from_millis(ms),
            }
        }
        fn mono(&self, ms: u64) -> Instant {
            self.at(ms).mono
        }
    }

    fn clock() -> Clock {
        Clock { t0: Instant::now() }
    }

    const LIVE: DriverView = DriverView {
        driver_ok: true,
        needs_reset: false,
    };

    fn tracker(timeout_ms: u64) -> ResizeTracker {
        let mut t = ResizeTracker::new();
        t.set_stall_timeout(Duration::from_millis(timeout_ms));
        t
    }

    #[test]
    fn idle_until_the_first_request_and_never_stalls() {
        let c = clock();
        let mut t = tracker(1000);
        assert_eq!(t.state(c.mono(50_000), 0, 0), ResizeState::Idle);
        assert_eq!(t.poll(c.mono(50_000), LIVE, 0, 0), None);
        assert_eq!(t.next_deadline(0, 0), None);
        assert_eq!(t.last_request(), None);
    }

    #[test]
    fn a_plug_that_completes_is_done_once() {
        let c = clock();
        let mut t = tracker(1000);
        t.request(c.at(0), 256 * MIB, 0);
        assert_eq!(t.last_request(), Some(c.at(0)));
        assert_eq!(t.state(c.mono(10), 256 * MIB, 0), ResizeState::InProgress);
        assert_eq!(t.next_deadline(256 * MIB, 0), Some(c.mono(1000)));
        assert_eq!(t.poll(c.mono(10), LIVE, 256 * MIB, 0), None);
        t.size_changed(c.at(500), 256 * MIB, 128 * MIB);
        assert_eq!(t.last_progress(), Some(c.at(500)));
        // Progress moved the stall deadline.
        assert_eq!(t.next_deadline(256 * MIB, 128 * MIB), Some(c.mono(1500)));
        assert_eq!(
            t.state(c.mono(1200), 256 * MIB, 128 * MIB),
            ResizeState::InProgress
        );
        t.size_changed(c.at(900), 256 * MIB, 256 * MIB);
        assert_eq!(
            t.state(c.mono(900), 256 * MIB, 256 * MIB),
            ResizeState::Done
        );
        assert_eq!(t.next_deadline(256 * MIB, 256 * MIB), None);
        assert_eq!(
            t.poll(c.mono(900), LIVE, 256 * MIB, 256 * MIB),
            Some(ResizeEvent::Done)
        );
        assert_eq!(t.poll(c.mono(901), LIVE, 256 * MIB, 256 * MIB), None);
        assert_eq!(t.poll(c.mono(99_999), LIVE, 256 * MIB, 256 * MIB), None);
    }

    #[test]
    fn a_request_for_the_current_size_is_done_at_once() {
        let c = clock();
        let mut t = tracker(1000);
        t.request(c.at(0), 0, 0);
        assert_eq!(t.poll(c.mono(0), LIVE, 0, 0), Some(ResizeEvent::Done));
        // A second request owes a second done.
        t.request(c.at(5), 0, 0);
        assert_eq!(t.poll(c.mono(5), LIVE, 0, 0), Some(ResizeEvent::Done));
    }

    #[test]
    fn no_progress_stalls_once_with_the_driver_reason() {
        let c = clock();
        let mut t = tracker(1000);
        t.request(c.at(0), 128 * MIB, 0);
        let off = DriverView::default();
        assert_eq!(t.poll(c.mono(999), off, 128 * MIB, 0), None);
        assert_eq!(t.state(c.mono(1000), 128 * MIB, 0), ResizeState::Stalled);
        assert_eq!(
            t.poll(c.mono(1000), off, 128 * MIB, 0),
            Some(ResizeEvent::Stalled(StallReason::NoDriver {
                ever_active: false
            }))
        );
        // One event per stall, however long it lasts.
        assert_eq!(t.poll(c.mono(5000), off, 128 * MIB, 0), None);
        assert_eq!(t.next_deadline(128 * MIB, 0), None);
        // The driver comes, plugs: done is still owed.
        t.driver_activated();
        t.size_changed(c.at(6000), 128 * MIB, 128 * MIB);
        assert_eq!(
            t.poll(c.mono(6000), LIVE, 128 * MIB, 128 * MIB),
            Some(ResizeEvent::Done)
        );
    }

    #[test]
    fn reasons_in_order_of_precedence() {
        let c = clock();
        let mut t = tracker(1000);
        t.request(c.at(0), 0, 64 * MIB);
        let broken = DriverView {
            driver_ok: true,
            needs_reset: true,
        };
        assert_eq!(t.reason(broken, 0, 64 * MIB), StallReason::NeedsReset);
        assert_eq!(
            t.reason(DriverView::default(), 0, 64 * MIB),
            StallReason::NoDriver { ever_active: false }
        );
        t.driver_activated();
        assert_eq!(
            t.reason(DriverView::default(), 0, 64 * MIB),
            StallReason::NoDriver { ever_active: true }
        );
        assert_eq!(
            t.reason(LIVE, 0, 64 * MIB),
            StallReason::GuestNoProgress { unplugging: true }
        );
        assert_eq!(
            t.reason(LIVE, 128 * MIB, 64 * MIB),
            StallReason::GuestNoProgress { unplugging: false }
        );
        t.backend_failed("first".into());
        t.backend_failed("too many retired slots".into());
        let busy = t.reason(LIVE, 0, 64 * MIB);
        assert_eq!(
            busy,
            StallReason::HostBusy {
                failures: 2,
                detail: "too many retired slots".into()
            }
        );
        assert!(busy.message().contains("too many retired slots"));
        // Progress forgets the host's refusals.
        t.size_changed(c.at(10), 0, 32 * MIB);
        assert_eq!(
            t.reason(LIVE, 0, 32 * MIB),
            StallReason::GuestNoProgress { unplugging: true }
        );
        // So does a new request.
        t.backend_failed("again".into());
        t.request(c.at(20), 0, 32 * MIB);
        assert_eq!(t.reason(LIVE, 0, 32 * MIB).name(), "guest-no-progress");
    }

    #[test]
    fn flapping_is_not_progress() {
        let c = clock();
        let mut t = tracker(1000);
        t.request(c.at(0), 256 * MIB, 0);
        t.size_changed(c.at(100), 256 * MIB, 2 * MIB);
        // The guest unplugs and plugs the same block again and again.
        for i in 0..50 {
            t.size_changed(c.at(200 + 40 * i), 256 * MIB, 0);
            t.size_changed(c.at(220 + 40 * i), 256 * MIB, 2 * MIB);
        }
        assert_eq!(t.last_progress(), Some(c.at(100)));
        assert_eq!(
            t.poll(c.mono(1100), LIVE, 256 * MIB, 2 * MIB),
            Some(ResizeEvent::Stalled(StallReason::GuestNoProgress {
                unplugging: false
            }))
        );
    }

    #[test]
    fn progress_ends_a_stall_and_a_later_stall_is_reported_again() {
        let c = clock();
        let mut t = tracker(1000);
        t.request(c.at(0), 0, 6 * MIB);
        assert!(matches!(
            t.poll(c.mono(1000), LIVE, 0, 6 * MIB),
            Some(ResizeEvent::Stalled(_))
        ));
        t.size_changed(c.at(1500), 0, 4 * MIB);
        assert_eq!(t.state(c.mono(1500), 0, 4 * MIB), ResizeState::InProgress);
        assert_eq!(t.poll(c.mono(2499), LIVE, 0, 4 * MIB), None);
        assert!(matches!(
            t.poll(c.mono(2500), LIVE, 0, 4 * MIB),
            Some(ResizeEvent::Stalled(_))
        ));
    }

    #[test]
    fn leaving_the_requested_size_after_done_can_stall_but_is_not_done_again() {
        let c = clock();
        let mut t = tracker(1000);
        t.request(c.at(0), 4 * MIB, 0);
        t.size_changed(c.at(10), 4 * MIB, 4 * MIB);
        assert_eq!(
            t.poll(c.mono(10), LIVE, 4 * MIB, 4 * MIB),
            Some(ResizeEvent::Done)
        );
        // The guest unplugs on its own.
        t.size_changed(c.at(20), 4 * MIB, 2 * MIB);
        assert_eq!(
            t.state(c.mono(20), 4 * MIB, 2 * MIB),
            ResizeState::InProgress
        );
        assert!(matches!(
            t.poll(c.mono(1010), LIVE, 4 * MIB, 2 * MIB),
            Some(ResizeEvent::Stalled(_))
        ));
        t.size_changed(c.at(1100), 4 * MIB, 4 * MIB);
        assert_eq!(t.poll(c.mono(1100), LIVE, 4 * MIB, 4 * MIB), None);
    }

    #[test]
    fn a_new_request_restarts_the_stall_clock_and_timeouts_are_clamped() {
        let c = clock();
        let mut t = tracker(1000);
        t.request(c.at(0), 8 * MIB, 0);
        assert!(t.poll(c.mono(1000), LIVE, 8 * MIB, 0).is_some());
        t.request(c.at(3000), 16 * MIB, 0);
        assert_eq!(t.next_deadline(16 * MIB, 0), Some(c.mono(4000)));
        assert_eq!(t.state(c.mono(3500), 16 * MIB, 0), ResizeState::InProgress);
        assert_eq!(t.set_stall_timeout(Duration::ZERO), MIN_STALL_TIMEOUT);
        assert_eq!(t.next_deadline(16 * MIB, 0), Some(c.mono(3100)));
        assert_eq!(
            t.set_stall_timeout(Duration::from_secs(u64::MAX)),
            MAX_STALL_TIMEOUT
        );
        assert_eq!(t.stall_timeout(), MAX_STALL_TIMEOUT);
    }

    #[test]
    fn driver_view_from_the_status_register() {
        let v = |s: u32| DriverView::from_status(s as u8);
        assert_eq!(v(0), DriverView::default());
        assert!(v(VIRTIO_CONFIG_S_DRIVER_OK).driver_ok);
        assert!(!v(VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED).driver_ok);
        let broken = v(VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_NEEDS_RESET);
        assert!(broken.driver_ok && broken.needs_reset);
    }

    #[test]
    fn every_reason_has_a_distinct_name_and_a_message() {
        let all = [
            StallReason::NeedsReset,
            StallReason::NoDriver { ever_active: false },
            StallReason::HostBusy {
                failures: 1,
                detail: "x".into(),
            },
            StallReason::GuestNoProgress { unplugging: true },
        ];
        let names: std::collections::BTreeSet<&str> = all.iter().map(StallReason::name).collect();
        assert_eq!(names.len(), all.len());
        assert!(all.iter().all(|r| !r.message().is_empty()));
        let states = [
            ResizeState::Idle,
            ResizeState::InProgress,
            ResizeState::Done,
            ResizeState::Stalled,
        ];
        let names: std::collections::BTreeSet<&str> = states.iter().map(|s| s.name()).collect();
        assert_eq!(names.len(), states.len());
    }
}
