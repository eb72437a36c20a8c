//! The process-wide RCU domain and call_rcu thread behind the free functions
//! of the crate.

use crate::call_rcu::{CallRcu, WakeupStrategy};
use crate::domain::Domain;
use crate::queue::Node;
use crate::reader::{current_slot_forever, in_read_section, with_current_slot};
use crate::stats::Stats;
use crate::wait::Event;
use std::cell::Cell;
use std::panic::Location;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock, PoisonError};

/// The one domain all readers of the process register in.
pub(crate) static DOMAIN: Domain = Domain::new();

static INIT: Once = Once::new();

/// One-time set-up: probe and register `membarrier`. Runs before the first
/// reader registers and before the first grace period.
pub(crate) fn init() {
    INIT.call_once(|| {
        if crate::membarrier::init() {
            DOMAIN.enable_membarrier();
        }
    });
}

const STRATEGY_UNSET: u8 = 0;
static STRATEGY: AtomicU8 = AtomicU8::new(STRATEGY_UNSET);
static CALL_RCU: OnceLock<CallRcu> = OnceLock::new();
static SYNCHRONIZE_CALLS: AtomicU64 = AtomicU64::new(0);
static DRAIN_CALLS: AtomicU64 = AtomicU64::new(0);
/// pthread id of the call_rcu thread, for its CPU clock; 0 until started.
static WORKER_PTHREAD: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static IS_WORKER: Cell<bool> = const { Cell::new(false) };
}

fn encode(s: WakeupStrategy) -> u8 {
    match s {
        WakeupStrategy::Event => 1,
        WakeupStrategy::Semaphore => 2,
    }
}

/// Error of [`set_wakeup_strategy`] once the call_rcu thread runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlreadyStarted {
    /// The strategy the running thread uses.
    pub current: WakeupStrategy,
}

impl std::fmt::Display for AlreadyStarted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the call_rcu thread already runs with the {} wake-up strategy",
            self.current
        )
    }
}

impl std::error::Error for AlreadyStarted {}

/// Chooses the call_rcu thread's wake-up strategy. Only possible before the
/// thread starts (at the first `call_rcu`, `force_rcu` or `drain_call_rcu`);
/// afterwards it fails unless `strategy` is the one in use.
///
/// Safe to call concurrently with the first use: it returns `Ok` exactly
/// when the thread runs (or will start) with `strategy`.
pub fn set_wakeup_strategy(strategy: WakeupStrategy) -> Result<(), AlreadyStarted> {
    // The start of the machinery reads the strategy under the same lock, so
    // this store either precedes that read or sees the machinery started.
    let _start = lock_startup();
    match CALL_RCU.get() {
        Some(c) if c.strategy() != strategy => Err(AlreadyStarted {
            current: c.strategy(),
        }),
        Some(_) => Ok(()),
        None => {
            STRATEGY.store(encode(strategy), Ordering::SeqCst);
            Ok(())
        }
    }
}

/// Serialises the choice of the strategy with the start of the machinery.
static STARTUP: Mutex<()> = Mutex::new(());

fn lock_startup() -> std::sync::MutexGuard<'static, ()> {
    // Nothing that can panic runs under this lock; poisoning carries no
    // broken invariant.
    STARTUP.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The wake-up strategy in use (or that will be used when the thread starts).
pub fn wakeup_strategy() -> WakeupStrategy {
    CALL_RCU
        .get()
        .map_or_else(configured_strategy, CallRcu::strategy)
}

fn configured_strategy() -> WakeupStrategy {
    match STRATEGY.load(Ordering::SeqCst) {
        2 => WakeupStrategy::Semaphore,
        _ => WakeupStrategy::Event,
    }
}

/// The call_rcu machinery, started on first use.
#[inline]
fn worker() -> &'static CallRcu {
    match CALL_RCU.get() {
        Some(c) => c,
        None => start_worker(),
    }
}

#[cold]
fn start_worker() -> &'static CallRcu {
    static SPAWN: Once = Once::new();
    init();
    let c: &'static CallRcu = {
        let _start = lock_startup();
        CALL_RCU.get_or_init(|| CallRcu::new(configured_strategy().into()))
    };
    SPAWN.call_once(|| {
        // Callbacks queued before the thread runs are found by its first
        // look at the pending count.
        let spawn = std::thread::Builder::new()
            .name("call_rcu".into())
            .spawn(move || {
                IS_WORKER.with(|w| w.set(true));
                // SAFETY: pthread_self has no preconditions.
                let me = unsafe { libc::pthread_self() };
                WORKER_PTHREAD.store(me as u64, Ordering::Release);
                // SAFETY: the call_rcu thread never exits (`run` returns only
                // when stopped, which only models and unit tests do), and the
                // reference stays on it.
                c.run(&DOMAIN, &|| unsafe { current_slot_forever() });
            });
        if let Err(e) = spawn {
            // Without the thread no callback would ever run and memory would
            // pile up silently.
            eprintln!("rcu: cannot start the call_rcu thread: {e}; aborting");
            std::process::abort();
        }
    });
    c
}

/// Frees or finalises something after a grace period: `f` runs on the
/// call_rcu thread once every read-side critical section that was running
/// when `call_rcu` was called has ended.
///
/// Never blocks (one allocation and a wait-free enqueue). Callbacks run in
/// the order they were queued, one at a time; a callback may itself call
/// `call_rcu`, `force_rcu` or `synchronize_rcu`. A panicking callback is
/// caught and counted, and later callbacks still run. The call is counted
/// under the caller's source location in [`stats`].
#[track_caller]
pub fn call_rcu<F: FnOnce() + Send + 'static>(f: F) {
    worker().call(f, Location::caller(), "");
}

/// [`call_rcu`] with a human label for the call site, shown in [`stats`]
/// (for example "memory map replace").
#[track_caller]
pub fn call_rcu_labeled<F: FnOnce() + Send + 'static>(label: &'static str, f: F) {
    worker().call(f, Location::caller(), label);
}

/// Drops the value in `node` on the call_rcu thread after a grace period,
/// counted as a `call_rcu` under `label` and the caller's location.
///
/// # Safety
/// `node` comes from `Node::boxed` or `Node::boxed_with`, is owned by the
/// caller (unlinked from wherever readers found it) and is in no queue.
#[track_caller]
pub(crate) unsafe fn retire_node<T: Send + 'static>(label: &'static str, node: *mut Node<T>) {
    // SAFETY: the caller's contract is call_drop's.
    unsafe { worker().call_drop(node, Location::caller(), label) };
}

/// Asks the call_rcu thread to stop batching now: the callbacks queued
/// before this call run after one grace period, with no batching sleep.
/// Never blocks.
pub fn force_rcu() {
    worker().force();
}

/// Waits until every callback queued (by any thread) before this call has
/// run.
///
/// It queues one marker callback and forces a grace period; the marker is
/// counted like any callback (in `call_rcu` and `callbacks_run`, under the
/// caller's location with the label `drain_call_rcu`), and it is counted as
/// run before this function returns. So when no other thread queues
/// callbacks, `stats().callbacks_run == stats().call_rcu` on return.
///
/// # Panics
/// Inside a read-side critical section or inside an RCU callback: both
/// would wait for themselves forever.
#[track_caller]
pub fn drain_call_rcu() {
    assert!(
        !in_read_section(),
        "rcu::drain_call_rcu() called inside an RCU read-side critical section: \
         it would wait for itself forever"
    );
    assert!(
        !IS_WORKER.with(Cell::get),
        "rcu::drain_call_rcu() called from an RCU callback: \
         the call_rcu thread would wait for itself forever"
    );
    DRAIN_CALLS.fetch_add(1, Ordering::Relaxed);
    let done = Arc::new(Event::new(false));
    let done2 = Arc::clone(&done);
    let w = worker();
    w.call(move || done2.set(), Location::caller(), "drain_call_rcu");
    w.force();
    done.wait();
}

/// Waits for a grace period: returns once every read-side critical section
/// that was running when it was called has ended. Concurrent callers share
/// grace periods (one runs it, the others wait for it); a call with no
/// other registered reader in a section returns after one barrier (a
/// `membarrier` only if some other registered reader is in
/// [`ReaderMode::Membarrier`](crate::ReaderMode::Membarrier)). A reader that
/// keeps it waiting for over a second is reported once on stderr and in
/// [`stats`].
///
/// # Panics
/// Inside a read-side critical section (it would wait for itself forever;
/// QEMU asserts the same).
pub fn synchronize_rcu() {
    assert!(
        !in_read_section(),
        "rcu::synchronize_rcu() called inside an RCU read-side critical section: \
         it would wait for itself forever"
    );
    init();
    SYNCHRONIZE_CALLS.fetch_add(1, Ordering::Relaxed);
    with_current_slot(|me| DOMAIN.synchronize(me, None));
}

/// Number of threads currently registered as readers.
pub fn registered_readers() -> usize {
    DOMAIN.registered()
}

fn worker_cpu_ns() -> u64 {
    let tid = WORKER_PTHREAD.load(Ordering::Acquire);
    if tid == 0 {
        return 0;
    }
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `tid` is the pthread_t of the call_rcu thread, which never
    // exits, and `clock` is a valid out-pointer.
    if unsafe { libc::pthread_getcpuclockid(tid as libc::pthread_t, &mut clock) } != 0 {
        return 0;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; `clock` came from the kernel.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// A snapshot of the statistics. Cheap (no lock on any hot path; it reads
/// counters and the per-site table). See [`Stats`] for what each field means.
pub fn stats() -> Stats {
    let gp = &DOMAIN.stats;
    let mut s = Stats {
        wakeup: wakeup_strategy(),
        membarrier: DOMAIN.membarrier_enabled(),
        readers: registered_readers() as u64,
        grace_periods: gp.grace_periods.load(Ordering::Relaxed),
        synchronize_rcu: SYNCHRONIZE_CALLS.load(Ordering::Relaxed),
        drain_call_rcu: DRAIN_CALLS.load(Ordering::Relaxed),
        reader_waits: gp.reader_waits.load(Ordering::Relaxed),
        membarriers: gp.membarriers.load(Ordering::Relaxed),
        membarriers_skipped: gp.membarriers_skipped.load(Ordering::Relaxed),
        shared_grace_periods: gp.shared_grace_periods.load(Ordering::Relaxed),
        wake_requests: gp.wake_requests.load(Ordering::Relaxed),
        gp_sleeps: gp.gp_sleeps.load(Ordering::Relaxed),
        stalls: gp.stalls.load(Ordering::Relaxed),
        stalled_readers: gp
            .stalled_readers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone(),
        ..Stats::default()
    };
    if let Some(c) = CALL_RCU.get() {
        let w = &c.stats;
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        s.call_rcu = w.sites.total_calls();
        s.callbacks_run = r(&w.callbacks_run);
        s.callback_panics = r(&w.callback_panics);
        s.force_rcu = r(&w.force_rcu);
        s.wakeups = r(&w.wakeups);
        s.empty_wakeups = r(&w.empty_wakeups);
        s.loops = r(&w.loops);
        s.batches = r(&w.batches);
        s.forced_batches = r(&w.forced_batches);
        s.max_batch = r(&w.max_batch);
        s.lazy_polls = r(&w.lazy_polls);
        s.paced_batches = r(&w.paced_batches);
        s.capped_gaps = r(&w.capped_gaps);
        s.latency = w.latency.snapshot();
        s.by_site = w.sites.snapshot();
        s.thread_cpu_ns = worker_cpu_ns();
    }
    s
}

/// Callbacks queued and not yet taken into a batch by the call_rcu thread.
pub fn pending_callbacks() -> usize {
    CALL_RCU.get().map_or(0, CallRcu::pending)
}
