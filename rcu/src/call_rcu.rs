//! Deferred callbacks: the call_rcu thread and its two wake-up strategies.
//!
//! `call_rcu(f)` queues `f` (wait-free) and bumps a pending count. One thread
//! takes batches: it waits for work, notes how many callbacks are pending
//! (`n`), runs one grace period, then runs exactly those `n` callbacks, which
//! were all queued before the grace period began. Unless forced, the grace
//! period is lazy: while a reader is slow to leave its section, it polls every
//! [`POLL_INTERVAL`] and hurries only after [`LAZY_POLLS`] polls or once
//! [`MIN_BATCH`] callbacks are pending, so bursts share one grace period.
//! `force_rcu()` makes the thread skip that batching for everything queued
//! before it.
//!
//! Under sustained load (callbacks arriving faster than grace periods end)
//! the thread also keeps a gap between the end of one lazy batch and the
//! start of the next, as liburcu's thread sleeps after each batch. The gap
//! starts at [`BATCH_GAP`] and doubles with every batch it held back, up to
//! [`MAX_BATCH_GAP`] (liburcu's 10 ms): at a million `call_rcu` a second the
//! thread then wakes about a hundred times a second instead of once per
//! grace period, and each wake-up that would preempt a reader or a writer
//! on a busy machine takes a larger batch. A gap never holds back more than
//! [`GAP_CAP`] callbacks, which bounds the memory it keeps from being freed.
//! Callbacks queued after a quiet spell do not wait for a gap (and the gap
//! falls back to [`BATCH_GAP`]), and a `force_rcu()` ends it at once.
//!
//! How the thread is woken is a strategy ([`WakeupStrategy`]), after the
//! discussion in QEMU of `force_rcu()` (2025-11): a boolean event that the
//! thread resets and re-checks (QEMU's code), or a counting semaphore (the
//! proposed alternative), which remembers every notification and so may cost
//! extra rounds of the thread's loop.

use crate::domain::{Domain, Pacer, Slot};
use crate::primitive::{AtomicBool, AtomicUsize, CachePadded};
use crate::queue::{Callback, Node, Queue};
use crate::stats::{Histogram, SiteTable};
use crate::wait::{Event, Semaphore, Signal};
use std::panic::{AssertUnwindSafe, Location};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Pending callbacks at which a lazy grace period stops waiting politely for
/// slow readers (QEMU's `RCU_CALL_MIN_SIZE`).
pub const MIN_BATCH: usize = 30;

/// Length of one lazy poll for slow readers (QEMU: 10 ms).
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Least time between the end of one batch and the start of a lazy batch
/// after it: the gap after a batch that nothing held back (liburcu sleeps
/// 10 ms after every batch; QEMU not at all). A forced batch never waits for
/// a gap.
pub const BATCH_GAP: Duration = Duration::from_millis(1);

/// Longest gap: reached after a few batches in a row were held back, that
/// is, while callbacks keep arriving (liburcu's sleep after every batch).
pub const MAX_BATCH_GAP: Duration = Duration::from_millis(10);

/// Pending callbacks at which a batch held back for its gap stops waiting:
/// the most callbacks (and so the most memory awaiting its free) a gap keeps
/// back.
pub const GAP_CAP: usize = 16384;

/// How the call_rcu thread is woken when work arrives or is forced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WakeupStrategy {
    /// A boolean event: notifications before the thread looks are merged
    /// into one. The thread resets it before reading the pending count and,
    /// after finding work, resets it again and re-reads the count while a
    /// `force_rcu` request is pending (QEMU's current `util/rcu.c`).
    #[default]
    Event,
    /// A counting semaphore: every notification is remembered, so no reset
    /// and re-read dance is needed, at the cost of one extra round of the
    /// thread's loop per notification it had already handled.
    Semaphore,
}

impl WakeupStrategy {
    /// The strategy's name as the command line and statistics spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Event => "event",
            Self::Semaphore => "semaphore",
        }
    }
}

impl std::str::FromStr for WakeupStrategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "event" => Ok(Self::Event),
            "semaphore" => Ok(Self::Semaphore),
            other => Err(format!(
                "unknown RCU wake-up strategy '{other}' (expected 'event' or 'semaphore')"
            )),
        }
    }
}

impl std::fmt::Display for WakeupStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The loop variant the thread runs. Besides the two public strategies, loom
/// builds have a deliberately broken one to show the models catch the bug
/// discussed in the seed thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Variant {
    Event,
    Semaphore,
    /// Event strategy that samples `forced` *before* reading the count and
    /// then resets the event: a `force_rcu` landing between the two is lost
    /// (Akihiko Odaki's counter-example). Model-checking only.
    #[cfg(loom)]
    BrokenEventSwapFirst,
}

impl From<WakeupStrategy> for Variant {
    fn from(s: WakeupStrategy) -> Self {
        match s {
            WakeupStrategy::Event => Variant::Event,
            WakeupStrategy::Semaphore => Variant::Semaphore,
        }
    }
}

enum WakeSignal {
    Event(Event),
    Semaphore(Semaphore),
}

impl WakeSignal {
    fn as_signal(&self) -> &dyn Signal {
        match self {
            Self::Event(e) => e,
            Self::Semaphore(s) => s,
        }
    }
    fn event(&self) -> Option<&Event> {
        match self {
            Self::Event(e) => Some(e),
            Self::Semaphore(_) => None,
        }
    }
}

/// Counters of the call_rcu machinery (not part of the protocol).
#[derive(Debug)]
pub(crate) struct WorkerStats {
    pub(crate) callbacks_run: AtomicU64,
    pub(crate) callback_panics: AtomicU64,
    pub(crate) force_rcu: AtomicU64,
    pub(crate) wakeups: AtomicU64,
    pub(crate) empty_wakeups: AtomicU64,
    pub(crate) loops: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) forced_batches: AtomicU64,
    pub(crate) max_batch: AtomicU64,
    pub(crate) lazy_polls: AtomicU64,
    pub(crate) paced_batches: AtomicU64,
    pub(crate) capped_gaps: AtomicU64,
    pub(crate) latency: Histogram,
    pub(crate) sites: SiteTable,
}

impl WorkerStats {
    const fn new() -> Self {
        Self {
            callbacks_run: AtomicU64::new(0),
            callback_panics: AtomicU64::new(0),
            force_rcu: AtomicU64::new(0),
            wakeups: AtomicU64::new(0),
            empty_wakeups: AtomicU64::new(0),
            loops: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            forced_batches: AtomicU64::new(0),
            max_batch: AtomicU64::new(0),
            lazy_polls: AtomicU64::new(0),
            paced_batches: AtomicU64::new(0),
            capped_gaps: AtomicU64::new(0),
            latency: Histogram::new(),
            sites: SiteTable::new(),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The queue, the pending count and the wake-up signal of one call_rcu
/// thread.
pub(crate) struct CallRcu {
    queue: Queue,
    /// Callbacks queued and not yet taken into a batch (written by every
    /// producer: a line of its own).
    pending: CachePadded<AtomicUsize>,
    /// Set by `force_rcu`, consumed by the thread.
    forced: AtomicBool,
    signal: WakeSignal,
    variant: Variant,
    /// Asks the thread to return once nothing is pending (models and tests).
    stop: AtomicBool,
    /// Written by the call_rcu thread (and the per-site call counts by
    /// producers, on lines of their own).
    pub(crate) stats: CachePadded<WorkerStats>,
    /// Asked by a lazy grace period as each batching poll begins; if it
    /// answers `true` and the poll then sleeps to its end, the model fails.
    /// (Loom models timers as already expired, so a poll sleeps exactly when
    /// no notification is pending at its start.)
    #[cfg(loom)]
    pub(crate) batching_sleep_forbidden: Option<Box<dyn Fn() -> bool + Send + Sync>>,
}

impl std::fmt::Debug for CallRcu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallRcu")
            .field("variant", &self.variant)
            .finish_non_exhaustive()
    }
}

impl CallRcu {
    pub(crate) fn new(variant: Variant) -> Self {
        let signal = match variant {
            Variant::Semaphore => WakeSignal::Semaphore(Semaphore::new(0)),
            _ => WakeSignal::Event(Event::new(false)),
        };
        Self {
            queue: Queue::new(),
            pending: CachePadded(AtomicUsize::new(0)),
            forced: AtomicBool::new(false),
            signal,
            variant,
            stop: AtomicBool::new(false),
            stats: CachePadded(WorkerStats::new()),
            #[cfg(loom)]
            batching_sleep_forbidden: None,
        }
    }

    /// Queues `f`. Wait-free apart from the allocation of its node; wakes the
    /// thread only when the queue was empty.
    pub(crate) fn call<F: FnOnce() + Send + 'static>(
        &self,
        f: F,
        site: &'static Location<'static>,
        label: &'static str,
    ) {
        self.stats.sites.count_call(site, label);
        self.queue.push(f, site, label);
        self.count_queued();
    }

    /// Queues `node`, whose value is dropped after a grace period. Wait-free,
    /// and allocates nothing.
    ///
    /// # Safety
    /// As [`Queue::push_drop`]: `node` comes from `Node::boxed` or
    /// `Node::boxed_with`, is owned by the caller and is in no queue.
    #[cfg_attr(loom, allow(dead_code))]
    pub(crate) unsafe fn call_drop<T: Send>(
        &self,
        node: *mut Node<T>,
        site: &'static Location<'static>,
        label: &'static str,
    ) {
        self.stats.sites.count_call(site, label);
        // SAFETY: the caller's contract is push_drop's.
        unsafe { self.queue.push_drop(node, site, label) };
        self.count_queued();
    }

    /// Counts one queued callback and wakes the thread if the queue was
    /// empty, or if the count reaches [`GAP_CAP`] (ending a gap early).
    fn count_queued(&self) {
        // SeqCst: pairs with the thread's reset-then-read (Event) so that
        // either it sees this count or this notification follows its reset.
        let before = self.pending.fetch_add(1, Ordering::SeqCst);
        if before == 0 || before + 1 == GAP_CAP {
            self.signal.as_signal().notify();
        }
    }

    /// Asks the thread to run the callbacks queued so far after one grace
    /// period, without batching sleeps.
    pub(crate) fn force(&self) {
        bump(&self.stats.force_rcu);
        // A swap, not a store: the same `xchg` on x86-64, and loom then
        // orders it after the thread's own swaps of `forced`. loom lets a
        // read-modify-write read a value older than a plain store it runs
        // concurrently with (tokio-rs/loom#254), so with a store the models
        // report a force request lost that no real execution loses.
        self.forced.swap(true, Ordering::SeqCst);
        self.signal.as_signal().notify();
    }

    /// Makes `run` return once nothing is pending.
    #[cfg_attr(not(loom), allow(dead_code))]
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.signal.as_signal().notify();
    }

    #[cfg_attr(loom, allow(dead_code))]
    /// The public strategy this machinery implements.
    pub(crate) fn strategy(&self) -> WakeupStrategy {
        match self.variant {
            Variant::Semaphore => WakeupStrategy::Semaphore,
            _ => WakeupStrategy::Event,
        }
    }

    #[cfg_attr(loom, allow(dead_code))]
    /// Callbacks queued and not yet taken by the thread.
    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// The thread's body. `caller` returns the thread's own reader slot, if
    /// it has one (a callback may have registered it), so grace periods do
    /// not wait for or send barriers to the thread running them.
    pub(crate) fn run(&self, domain: &Domain, caller: &dyn Fn() -> Option<&'static Slot>) {
        let mut gap = Gap::default();
        while let Some((n, lazy)) = self.wait_for_work() {
            if lazy && gap.due() {
                // Held back; then take the count (and any force) afresh.
                self.keep_gap(&mut gap);
                continue;
            }
            domain.synchronize(caller(), if lazy { Some(self) } else { None });
            self.pending.fetch_sub(n, Ordering::SeqCst);
            bump(&self.stats.batches);
            if !lazy {
                bump(&self.stats.forced_batches);
            }
            self.stats.max_batch.fetch_max(n as u64, Ordering::Relaxed);
            for _ in 0..n {
                self.invoke(self.queue.pop_wait());
                if caller().is_some_and(Slot::in_section) {
                    // Grace periods run by this thread skip its own slot, so
                    // carrying on would free what the leaked section reads.
                    crate::fatal::abort_with(&[b"rcu: an RCU callback returned inside a \
                        read-side critical section (it leaked a ReadGuard) on the call_rcu \
                        thread; aborting\n"]);
                }
            }
            gap.batch_ended();
        }
    }

    /// Sleeps until the gap has passed since the last batch ended, until
    /// [`GAP_CAP`] callbacks are pending, or until `force_rcu` (or `stop`)
    /// notifies the thread. The caller then reads the count and the force
    /// request afresh.
    fn keep_gap(&self, gap: &mut Gap) {
        bump(&self.stats.paced_batches);
        gap.waited = true;
        loop {
            // Reset, re-check, sleep (the event's protocol): a force request
            // after the reset sets the event again, so it ends the sleep. The
            // reset loses nothing: the caller re-reads every condition. A
            // semaphore needs no reset; a unit left from a notification the
            // thread already handled only costs one more round.
            if let Some(ev) = self.signal.event() {
                ev.reset();
            }
            if self.forced.load(Ordering::SeqCst) || self.stop.load(Ordering::SeqCst) {
                return;
            }
            if self.pending.load(Ordering::SeqCst) >= GAP_CAP {
                bump(&self.stats.capped_gaps);
                return;
            }
            let Some(left) = gap.left() else { return };
            #[cfg(loom)]
            let forbidden = self.batching_sleep_forbidden.as_ref().is_some_and(|f| f());
            if !self.signal.as_signal().wait_timeout(left) {
                #[cfg(loom)]
                assert!(
                    !forbidden,
                    "batching sleep after force_rcu() returned, with its callback pending"
                );
                return;
            }
            bump(&self.stats.wakeups);
        }
    }

    /// Waits until callbacks are pending; returns how many to take and
    /// whether the grace period may be lazy. `None` once stopped and idle.
    fn wait_for_work(&self) -> Option<(usize, bool)> {
        match self.variant {
            Variant::Event => self.wait_event(),
            Variant::Semaphore => self.wait_semaphore(),
            #[cfg(loom)]
            Variant::BrokenEventSwapFirst => self.wait_event_swap_first(),
        }
    }

    /// Reads the pending count as one round of the wait loop.
    fn read_pending(&self, woke: bool) -> usize {
        bump(&self.stats.loops);
        let n = self.pending.load(Ordering::SeqCst);
        if woke && n == 0 {
            bump(&self.stats.empty_wakeups);
        }
        n
    }

    fn sleep(&self) {
        self.signal.as_signal().wait();
        bump(&self.stats.wakeups);
    }

    /// QEMU's protocol: reset, re-check, sleep; after finding work, reset
    /// again so a stale notification does not cut the coming grace period
    /// short, then consume every pending force request, re-reading the count
    /// after each so a request is never attributed to older callbacks only.
    fn wait_event(&self) -> Option<(usize, bool)> {
        let ev = self.signal.event()?;
        let mut woke = false;
        let mut n;
        loop {
            ev.reset();
            n = self.read_pending(woke);
            if n > 0 {
                break;
            }
            if self.stop.load(Ordering::SeqCst) {
                return None;
            }
            self.sleep();
            woke = true;
        }
        ev.reset();
        let mut lazy = true;
        while self.forced.swap(false, Ordering::SeqCst) {
            lazy = false;
            n = self.pending.load(Ordering::SeqCst);
        }
        Some((n, lazy))
    }

    /// The semaphore protocol: sample `forced`, then the count; every
    /// notification stays counted in the semaphore, so a force request that
    /// lands between the two still wakes the coming lazy wait at once.
    fn wait_semaphore(&self) -> Option<(usize, bool)> {
        let mut woke = false;
        loop {
            let lazy = !self.forced.swap(false, Ordering::SeqCst);
            let n = self.read_pending(woke);
            if n > 0 {
                return Some((n, lazy));
            }
            if self.stop.load(Ordering::SeqCst) {
                return None;
            }
            self.sleep();
            woke = true;
        }
    }

    #[cfg(loom)]
    fn wait_event_swap_first(&self) -> Option<(usize, bool)> {
        let ev = self.signal.event()?;
        let mut woke = false;
        loop {
            ev.reset();
            let lazy = !self.forced.swap(false, Ordering::SeqCst);
            let n = self.read_pending(woke);
            if n > 0 {
                ev.reset();
                return Some((n, lazy));
            }
            if self.stop.load(Ordering::SeqCst) {
                return None;
            }
            self.sleep();
            woke = true;
        }
    }

    fn invoke(&self, cb: Callback) {
        let h = cb.header();
        let (site, label) = (h.site, h.label);
        let waited = crate::clock::elapsed_ns(h.queued_at);
        // Counted before the call: a callback that ends a `drain_call_rcu`
        // wait is already counted when the drainer returns.
        bump(&self.stats.callbacks_run);
        self.stats.sites.count_run(site, label);
        self.stats.latency.record(waited);
        if let Err(payload) = std::panic::catch_unwind(AssertUnwindSafe(move || cb.run())) {
            bump(&self.stats.callback_panics);
            // The payload's own `Drop` may panic too; that must not kill
            // this thread. A payload of that second panic is leaked rather
            // than risk a third.
            if let Err(again) = std::panic::catch_unwind(AssertUnwindSafe(move || drop(payload))) {
                std::mem::forget(again);
            }
        }
    }
}

/// When the call_rcu thread last ended a batch, how long the gap after it
/// is, and whether the batch to come already waited for it. Under loom,
/// whose timers expire at once, every lazy batch after another is held back
/// once, so the models check that a `force_rcu` cuts the gap short.
struct Gap {
    #[cfg(not(loom))]
    last_end: Option<std::time::Instant>,
    #[cfg(loom)]
    had_batch: bool,
    /// [`BATCH_GAP`] after a batch nothing held back; doubled (up to
    /// [`MAX_BATCH_GAP`]) after each batch that was held back.
    len: Duration,
    waited: bool,
}

impl Default for Gap {
    fn default() -> Self {
        Self {
            #[cfg(not(loom))]
            last_end: None,
            #[cfg(loom)]
            had_batch: false,
            len: BATCH_GAP,
            waited: false,
        }
    }
}

impl Gap {
    /// Whether a lazy batch starting now must first wait.
    fn due(&self) -> bool {
        !self.waited && self.left().is_some()
    }

    /// Time left until the gap has passed, if any.
    fn left(&self) -> Option<Duration> {
        #[cfg(not(loom))]
        {
            let end = self.last_end?;
            self.len.checked_sub(end.elapsed()).filter(|d| !d.is_zero())
        }
        #[cfg(loom)]
        {
            self.had_batch.then_some(self.len)
        }
    }

    /// Notes that a batch ended now: the next gap doubles if this batch was
    /// held back (callbacks kept coming), else it is [`BATCH_GAP`] again.
    fn batch_ended(&mut self) {
        self.len = if self.waited {
            (self.len * 2).min(MAX_BATCH_GAP)
        } else {
            BATCH_GAP
        };
        self.waited = false;
        #[cfg(not(loom))]
        {
            self.last_end = Some(std::time::Instant::now());
        }
        #[cfg(loom)]
        {
            self.had_batch = true;
        }
    }
}

impl Pacer for CallRcu {
    fn hurry(&self, polls_left: u32) -> bool {
        if self.pending.load(Ordering::SeqCst) >= MIN_BATCH || polls_left == 0 {
            return true;
        }
        #[cfg(loom)]
        let forbidden = self.batching_sleep_forbidden.as_ref().is_some_and(|f| f());
        if self.signal.as_signal().wait_timeout(POLL_INTERVAL) {
            bump(&self.stats.wakeups);
            return true;
        }
        bump(&self.stats.lazy_polls);
        #[cfg(loom)]
        assert!(
            !forbidden,
            "batching sleep after force_rcu() returned, with its callback pending"
        );
        false
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::{Arc, mpsc};
    use std::time::Instant;

    #[test]
    fn gap_doubles_while_batches_are_held_back_and_falls_back_after_one_that_was_not() {
        let mut gap = Gap::default();
        assert_eq!(gap.len, BATCH_GAP);
        gap.batch_ended();
        assert_eq!(gap.len, BATCH_GAP, "a batch nothing held back");
        let mut lens = Vec::new();
        for _ in 0..6 {
            gap.waited = true;
            gap.batch_ended();
            lens.push(gap.len);
        }
        let ms = Duration::from_millis;
        assert_eq!(lens, [ms(2), ms(4), ms(8), ms(10), ms(10), ms(10)]);
        assert_eq!(MAX_BATCH_GAP, ms(10));
        gap.batch_ended();
        assert_eq!(gap.len, BATCH_GAP, "after a batch that was not held back");
    }

    /// A gap of an hour that has just begun.
    fn hour_gap() -> Gap {
        Gap {
            last_end: Some(Instant::now()),
            len: Duration::from_secs(3600),
            ..Gap::default()
        }
    }

    /// Runs `keep_gap` on its own thread with a gap of an hour that has just
    /// begun, calls `feed` on this thread, and returns once `keep_gap` has
    /// returned (failing after a minute: it then slept on).
    fn keep_an_hour_gap(variant: Variant, feed: impl FnOnce(&CallRcu)) -> Arc<CallRcu> {
        let c = Arc::new(CallRcu::new(variant));
        let (done, returned) = mpsc::channel();
        let worker = Arc::clone(&c);
        std::thread::spawn(move || {
            let mut gap = hour_gap();
            worker.keep_gap(&mut gap);
            // The gap had not passed: whatever ended it, it was not time.
            let _ = done.send(gap.left().is_some());
        });
        feed(&c);
        let early = returned
            .recv_timeout(Duration::from_secs(60))
            .expect("keep_gap slept on with GAP_CAP callbacks pending");
        assert!(early);
        c
    }

    fn queue(c: &CallRcu, n: usize) {
        for _ in 0..n {
            c.call(|| {}, Location::caller(), "test");
        }
    }

    #[test]
    fn a_gap_ends_when_gap_cap_callbacks_are_pending() {
        for variant in [Variant::Event, Variant::Semaphore] {
            // Already pending when the gap begins.
            let c = CallRcu::new(variant);
            queue(&c, GAP_CAP);
            let mut gap = hour_gap();
            c.keep_gap(&mut gap);
            assert_eq!(c.stats.capped_gaps.load(Ordering::Relaxed), 1);
            // Reaching the cap while the thread sleeps in the gap wakes it.
            let c = keep_an_hour_gap(variant, |c| {
                queue(c, GAP_CAP - 1);
                // Most likely asleep by now (the test holds either way).
                std::thread::sleep(Duration::from_millis(100));
                queue(c, 1);
            });
            assert_eq!(c.stats.capped_gaps.load(Ordering::Relaxed), 1);
            assert_eq!(c.pending(), GAP_CAP);
        }
    }
}
