//! Helpers shared by the rcu test binaries ([`exclusive`], [`wait_until`]),
//! and the checks of the per-strategy binaries (each binary is its own
//! process, so each runs the call_rcu thread with one strategy).

#![allow(dead_code)] // Each binary uses part of it.

use rcu::{RcuCell, ReadGuard};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Serialises the tests of one binary: they compare process-wide counters
/// (readers registered, grace periods, stats) or share global state, and a
/// concurrent test's readers, grace periods or `force_rcu` calls would change
/// them.
pub static EXCLUSIVE: Mutex<()> = Mutex::new(());

pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    EXCLUSIVE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Waits up to `limit` for `cond`; the limit only bounds a hang, no timing
/// is asserted.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(1));
    }
    cond()
}

/// A thread inside a read section until told to leave.
pub struct HeldReader {
    leave: mpsc::Sender<()>,
    handle: thread::JoinHandle<()>,
}

impl HeldReader {
    pub fn start() -> Self {
        let (entered_tx, entered_rx) = mpsc::channel();
        let (leave_tx, leave_rx) = mpsc::channel::<()>();
        let handle = thread::spawn(move || {
            let g: ReadGuard = rcu::read_lock();
            entered_tx.send(()).unwrap();
            leave_rx.recv().unwrap();
            drop(g);
        });
        entered_rx.recv().unwrap();
        Self {
            leave: leave_tx,
            handle,
        }
    }
    pub fn leave(self) {
        self.leave.send(()).unwrap();
        self.handle.join().unwrap();
    }
}

/// Callbacks queued after a reader entered its section do not run before
/// it leaves; they do run afterwards.
pub fn callback_waits_for_preexisting_reader() {
    let _x = exclusive();
    let reader = HeldReader::start();
    let ran = Arc::new(AtomicBool::new(false));
    let r = Arc::clone(&ran);
    rcu::call_rcu(move || r.store(true, Ordering::SeqCst));
    rcu::force_rcu();
    // Give the call_rcu thread every chance to misbehave.
    thread::sleep(Duration::from_millis(100));
    assert!(
        !ran.load(Ordering::SeqCst),
        "callback ran inside a pre-existing read section"
    );
    reader.leave();
    assert!(wait_until(Duration::from_secs(30), || ran.load(Ordering::SeqCst)));
}

/// `synchronize_rcu` does not return while a pre-existing reader is inside
/// its section.
pub fn synchronize_waits_for_preexisting_reader() {
    let _x = exclusive();
    let reader = HeldReader::start();
    let done = Arc::new(AtomicBool::new(false));
    let d = Arc::clone(&done);
    let syncer = thread::spawn(move || {
        rcu::synchronize_rcu();
        d.store(true, Ordering::SeqCst);
    });
    thread::sleep(Duration::from_millis(100));
    assert!(
        !done.load(Ordering::SeqCst),
        "synchronize_rcu returned during a reader's section"
    );
    reader.leave();
    syncer.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
}

/// After `drain_call_rcu`, every callback queued before it has run and the
/// counters agree, the drain marker included.
pub fn drain_runs_everything_and_counts_agree() {
    let _x = exclusive();
    let runs = Arc::new(AtomicUsize::new(0));
    let before = rcu::stats();
    for _ in 0..1000 {
        let r = Arc::clone(&runs);
        rcu::call_rcu(move || {
            r.fetch_add(1, Ordering::SeqCst);
        });
    }
    rcu::drain_call_rcu();
    assert_eq!(runs.load(Ordering::SeqCst), 1000);
    let after = rcu::stats();
    assert_eq!(after.callbacks_run, after.call_rcu, "{after:#?}");
    // 1000 callbacks plus the drain marker.
    assert_eq!(after.call_rcu - before.call_rcu, 1001);
    assert_eq!(after.drain_call_rcu - before.drain_call_rcu, 1);
    let marker = after
        .by_site
        .iter()
        .find(|s| s.label == "drain_call_rcu")
        .expect("drain marker site");
    assert!(marker.site.contains("common/mod.rs"), "{marker:?}");
}

/// A replacement from one call site is attributed to it, exactly.
#[track_caller]
fn replace_n(cell: &RcuCell<Vec<u64>>, n: u64) {
    for i in 0..n {
        cell.replace(vec![i; 4]);
    }
}

pub fn per_site_counts_are_exact() {
    let _x = exclusive();
    let cell = RcuCell::with_label(vec![0u64; 4], "test cell replace");
    let line = line!() + 1;
    replace_n(&cell, 37);
    rcu::drain_call_rcu();
    let s = rcu::stats();
    let site = s
        .by_site
        .iter()
        .find(|e| e.label == "test cell replace")
        .expect("site of the replacements");
    assert_eq!(site.calls, 37);
    assert_eq!(site.run, 37);
    assert!(
        site.site.ends_with(&format!("common/mod.rs:{line}:5")),
        "{site:?}"
    );
}

/// A forced callback runs after one grace period without batching sleeps,
/// even while a slow reader keeps the grace period waiting.
pub fn forced_callback_skips_batching() {
    let _x = exclusive();
    rcu::drain_call_rcu();
    let before = rcu::stats();
    let reader = HeldReader::start();
    let ran = Arc::new(AtomicBool::new(false));
    let r = Arc::clone(&ran);
    rcu::call_rcu(move || r.store(true, Ordering::SeqCst));
    rcu::force_rcu();
    thread::sleep(Duration::from_millis(60));
    reader.leave();
    assert!(wait_until(Duration::from_secs(30), || ran.load(Ordering::SeqCst)));
    let after = rcu::stats();
    assert_eq!(
        after.lazy_polls, before.lazy_polls,
        "a forced batch slept to batch: before {before:#?} after {after:#?}"
    );
}

/// Lets the call_rcu thread consume notifications left over from earlier
/// work (a `force_rcu` that arrived after its batch was taken leaves the event
/// set, or a semaphore unit pending, and that makes the next lazy grace period
/// hurry, by design). Runs one unforced callback, then waits until the
/// thread's loop counter stops moving.
pub fn settle() {
    rcu::drain_call_rcu();
    let ran = Arc::new(AtomicBool::new(false));
    let r = Arc::clone(&ran);
    rcu::call_rcu(move || r.store(true, Ordering::SeqCst));
    assert!(wait_until(Duration::from_secs(30), || ran.load(Ordering::SeqCst)));
    let mut loops = rcu::stats().loops;
    for _ in 0..100 {
        thread::sleep(Duration::from_millis(20));
        let now = rcu::stats().loops;
        if now == loops {
            return;
        }
        loops = now;
    }
}

/// Without force, a slow reader makes the call_rcu thread poll lazily.
pub fn unforced_callback_batches_lazily() {
    let _x = exclusive();
    settle();
    let before = rcu::stats();
    let reader = HeldReader::start();
    let ran = Arc::new(AtomicBool::new(false));
    let r = Arc::clone(&ran);
    rcu::call_rcu(move || r.store(true, Ordering::SeqCst));
    // Long enough for at least one 10 ms poll to end.
    thread::sleep(Duration::from_millis(100));
    assert!(!ran.load(Ordering::SeqCst));
    reader.leave();
    assert!(wait_until(Duration::from_secs(30), || ran.load(Ordering::SeqCst)));
    let after = rcu::stats();
    assert!(after.lazy_polls > before.lazy_polls, "{after:#?}");
    assert_eq!(after.forced_batches, before.forced_batches);
}

/// Callbacks queued without pause for a while: the call_rcu thread keeps a
/// gap of at least [`rcu::BATCH_GAP`] between the end of one lazy batch and
/// the start of the next unless [`rcu::GAP_CAP`] callbacks are pending, so
/// the number of lazy batches is bounded by the time the load lasted plus
/// the gaps cut short by the cap, each of which took at least `GAP_CAP`
/// callbacks, however fast the grace periods are (bounds the implementation
/// guarantees on any machine, not timings).
pub fn sustained_load_batches_are_paced() {
    let _x = exclusive();
    settle();
    let stop = Arc::new(AtomicBool::new(false));
    let queued = Arc::new(AtomicUsize::new(0));
    let producer = {
        let (stop, queued) = (Arc::clone(&stop), Arc::clone(&queued));
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                rcu::call_rcu(|| {});
                queued.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // Let the load start before the window opens.
    assert!(wait_until(Duration::from_secs(30), || {
        queued.load(Ordering::Relaxed) > 10_000
    }));
    let before = rcu::stats();
    let t0 = Instant::now();
    thread::sleep(Duration::from_millis(300));
    let after = rcu::stats();
    let window = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    producer.join().unwrap();
    rcu::drain_call_rcu();
    let queued = queued.load(Ordering::Relaxed) as u64;
    let lazy = (after.batches - after.forced_batches) - (before.batches - before.forced_batches);
    let capped = after.capped_gaps - before.capped_gaps;
    let bound = 1 + (window.as_nanos() / rcu::BATCH_GAP.as_nanos()) as u64 + capped;
    println!(
        "{queued} callbacks queued; {lazy} lazy batches in {window:?} (bound {bound}), {} held \
         for the gap, {capped} of them cut short by the cap",
        after.paced_batches - before.paced_batches
    );
    assert!(lazy >= 1, "no batch ran under load: {after:#?}");
    assert!(
        lazy <= bound,
        "{lazy} lazy batches in {window:?}: more than one per BATCH_GAP besides {capped} capped gaps"
    );
    assert!(
        capped <= queued / rcu::GAP_CAP as u64,
        "{capped} gaps cut short by the cap with only {queued} callbacks queued"
    );
    assert!(after.paced_batches > before.paced_batches, "{after:#?}");
}

/// A panicking callback is caught and counted; the thread survives.
pub fn panicking_callback_is_contained() {
    let _x = exclusive();
    let before = rcu::stats();
    rcu::call_rcu(|| panic!("deliberate panic in an RCU callback (test)"));
    let ran = Arc::new(AtomicBool::new(false));
    let r = Arc::clone(&ran);
    rcu::call_rcu(move || r.store(true, Ordering::SeqCst));
    rcu::drain_call_rcu();
    assert!(ran.load(Ordering::SeqCst));
    let after = rcu::stats();
    assert_eq!(after.callback_panics - before.callback_panics, 1);
    assert_eq!(after.callbacks_run, after.call_rcu, "{after:#?}");
}

/// Callbacks may queue callbacks, force and synchronize.
pub fn callbacks_can_call_rcu() {
    let _x = exclusive();
    let depth = Arc::new(AtomicUsize::new(0));
    fn chain(depth: Arc<AtomicUsize>, left: usize) {
        rcu::call_rcu(move || {
            depth.fetch_add(1, Ordering::SeqCst);
            if left > 0 {
                rcu::synchronize_rcu();
                chain(depth, left - 1);
                rcu::force_rcu();
            }
        });
    }
    chain(Arc::clone(&depth), 9);
    assert!(wait_until(Duration::from_secs(60), || depth
        .load(Ordering::SeqCst)
        == 10));
    rcu::drain_call_rcu();
    let s = rcu::stats();
    assert_eq!(s.callbacks_run, s.call_rcu);
}

/// Read-copy-update through `RcuCell::update` loses no update under
/// contention, and readers see only whole values.
pub fn rcu_cell_update_is_atomic() {
    let _x = exclusive();
    let cell = Arc::new(RcuCell::new(vec![0u64; 16]));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (cell, stop) = (Arc::clone(&cell), Arc::clone(&stop));
        thread::spawn(move || {
            let mut reads = 0u64;
            loop {
                let g = rcu::read_lock();
                let v = cell.read(&g);
                assert!(v.iter().all(|x| *x == v[0]), "torn value {v:?}");
                reads += 1;
                if stop.load(Ordering::Relaxed) {
                    break reads;
                }
            }
        })
    };
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let cell = Arc::clone(&cell);
            thread::spawn(move || {
                for _ in 0..500 {
                    cell.update(|v| v.iter_mut().for_each(|x| *x += 1));
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
    assert_eq!(cell.with(|v| v[0]), 2000);
}

/// Selects `strategy` for this process (once, before anything starts the
/// call_rcu thread) and checks that it is the one in force.
pub fn select_strategy(strategy: rcu::WakeupStrategy) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        rcu::set_wakeup_strategy(strategy).unwrap();
    });
    assert_eq!(rcu::wakeup_strategy(), strategy);
}

/// Once the call_rcu thread runs with `strategy`, asking for the other one
/// fails, naming the strategy in force, and the stats report it.
pub fn strategy_cannot_change_once_started(strategy: rcu::WakeupStrategy) {
    use rcu::WakeupStrategy;
    let _x = exclusive();
    rcu::drain_call_rcu();
    let other = match strategy {
        WakeupStrategy::Event => WakeupStrategy::Semaphore,
        WakeupStrategy::Semaphore => WakeupStrategy::Event,
    };
    let err = rcu::set_wakeup_strategy(other).unwrap_err();
    assert_eq!(err.current, strategy);
    assert_eq!(rcu::stats().wakeup, strategy);
}

/// Defines the per-strategy binary's tests: each check of this module, run
/// after `select_strategy($strategy)`. The strategy is process-wide and fixed
/// once the call_rcu thread starts, hence one test binary per strategy.
#[allow(unused_macros)] // Only the per-strategy binaries use it.
macro_rules! wakeup_strategy_tests {
    ($strategy:expr) => {
        common::wakeup_strategy_tests!(@each $strategy;
            callback_waits_for_preexisting_reader,
            synchronize_waits_for_preexisting_reader,
            drain_runs_everything_and_counts_agree,
            per_site_counts_are_exact,
            forced_callback_skips_batching,
            unforced_callback_batches_lazily,
            sustained_load_batches_are_paced,
            panicking_callback_is_contained,
            callbacks_can_call_rcu,
            rcu_cell_update_is_atomic,
        );

        #[test]
        fn strategy_cannot_change_once_started() {
            common::select_strategy($strategy);
            common::strategy_cannot_change_once_started($strategy);
        }
    };
    (@each $strategy:expr; $($check:ident),+ $(,)?) => {
        $(
            #[test]
            fn $check() {
                common::select_strategy($strategy);
                common::$check();
            }
        )+
    };
}
#[allow(unused_imports)] // As above.
pub(crate) use wakeup_strategy_tests;
