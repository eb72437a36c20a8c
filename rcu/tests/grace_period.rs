//! How a grace period waits: callers share grace periods, it spins before it
//! sleeps, it writes only into the slots of readers it waits for, and
//! `RcuCell::replace_sync` frees on the caller after one.
//!
//! The statistics are process-wide, so the tests run one at a time and
//! compare differences. Nothing here uses `call_rcu`, so the only grace
//! periods are the ones the tests start. No test asserts a duration: a
//! scenario that depends on two threads being scheduled together is retried
//! until it happens, within a generous deadline.

#![cfg(not(loom))] // The public API is not built under loom; see src/loom_models.rs.
#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

// Each test runs alone (`common::exclusive`): see the module docs.
mod common;

use rcu::{RcuCell, Stats};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

/// Liveness bound for the retried scenarios (never reached when the
/// behaviour is there; see the module docs).
const DEADLINE: Duration = Duration::from_secs(30);

/// Waits until `cond(stats)` holds.
fn wait_for_stats(what: &str, cond: impl Fn(&Stats) -> bool) {
    let end = Instant::now() + DEADLINE;
    while !cond(&rcu::stats()) {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        thread::yield_now();
    }
}

#[test]
fn concurrent_synchronize_callers_share_grace_periods() {
    let _x = common::exclusive();
    const CALLERS: u64 = 4;
    let end = Instant::now() + DEADLINE;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let s0 = rcu::stats();
        let release = Arc::new(AtomicBool::new(false));
        let entered = Arc::new(Barrier::new(2));
        // A reader inside a section keeps the first grace period running
        // while the other callers arrive.
        let reader = {
            let (release, entered) = (Arc::clone(&release), Arc::clone(&entered));
            thread::spawn(move || {
                let g = rcu::read_lock();
                entered.wait();
                while !release.load(Ordering::Acquire) {
                    thread::yield_now();
                }
                drop(g);
            })
        };
        entered.wait();
        let callers: Vec<_> = (0..CALLERS)
            .map(|_| thread::spawn(rcu::synchronize_rcu))
            .collect();
        wait_for_stats("the callers to call synchronize_rcu", |s| {
            s.synchronize_rcu - s0.synchronize_rcu == CALLERS
        });
        // Give the callers a moment to reach their wait (a caller that
        // arrives after the first grace period ended runs its own).
        for _ in 0..1000 {
            thread::yield_now();
        }
        release.store(true, Ordering::Release);
        reader.join().unwrap();
        for c in callers {
            c.join().unwrap();
        }
        let s1 = rcu::stats();
        let ran = s1.grace_periods - s0.grace_periods;
        let shared = s1.shared_grace_periods - s0.shared_grace_periods;
        // Every call either ran a grace period or was satisfied by one that
        // started after it.
        assert_eq!(ran + shared, CALLERS, "ran {ran}, shared {shared}");
        if shared > 0 {
            assert!(ran < CALLERS);
            eprintln!("shared {shared} of {CALLERS} calls (attempt {attempts})");
            return;
        }
        assert!(
            Instant::now() < end,
            "{CALLERS} concurrent synchronize_rcu callers never shared a grace \
             period in {attempts} attempts"
        );
    }
}

#[test]
fn grace_period_ends_in_its_spin_when_the_reader_leaves_early() {
    let _x = common::exclusive();
    let end = Instant::now() + DEADLINE;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let s0 = rcu::stats();
        let entered = Arc::new(Barrier::new(2));
        let reader = {
            let entered = Arc::clone(&entered);
            thread::spawn(move || {
                let g = rcu::read_lock();
                entered.wait();
                // Leave once the grace period has seen this section twice:
                // on its first scan and on a re-scan. Without a spin, the
                // second look comes only after it asked this reader to
                // report (a store into its slot) and before it sleeps.
                wait_for_stats("the grace period's second look", |s| {
                    s.reader_waits - s0.reader_waits >= 2
                });
                drop(g);
            })
        };
        entered.wait();
        rcu::synchronize_rcu();
        reader.join().unwrap();
        let s1 = rcu::stats();
        assert_eq!(s1.grace_periods - s0.grace_periods, 1);
        let asked = s1.wake_requests - s0.wake_requests;
        let slept = s1.gp_sleeps - s0.gp_sleeps;
        if asked == 0 && slept == 0 {
            eprintln!("ended in the spin (attempt {attempts})");
            return;
        }
        // The reader was descheduled past the spin window; try again.
        assert!(
            Instant::now() < end,
            "a reader that left while the grace period re-scanned never let \
             it end without asking the reader to report and sleeping \
             ({attempts} attempts; last: {asked} requests, {slept} sleeps)"
        );
    }
}

#[test]
fn grace_period_never_stores_into_an_idle_readers_slot() {
    let _x = common::exclusive();
    let s0 = rcu::stats();
    let before = rcu::registered_readers();
    // An idle reader: registered, then outside any section until the end.
    let idle_done = Arc::new(AtomicBool::new(false));
    let registered = Arc::new(Barrier::new(2));
    let idle = {
        let (idle_done, registered) = (Arc::clone(&idle_done), Arc::clone(&registered));
        thread::spawn(move || {
            drop(rcu::read_lock());
            registered.wait();
            while !idle_done.load(Ordering::Acquire) {
                thread::park_timeout(Duration::from_millis(10));
            }
        })
    };
    registered.wait();
    // A busy reader: inside a section until the grace period has asked it to
    // report, so the grace period goes all the way to its request.
    let entered = Arc::new(Barrier::new(2));
    let busy = {
        let entered = Arc::clone(&entered);
        thread::spawn(move || {
            let g = rcu::read_lock();
            entered.wait();
            wait_for_stats("the grace period's request to the busy reader", |s| {
                s.wake_requests > s0.wake_requests
            });
            drop(g);
        })
    };
    entered.wait();
    assert!(rcu::registered_readers() >= before + 2);
    rcu::synchronize_rcu();
    busy.join().unwrap();
    idle_done.store(true, Ordering::Release);
    idle.thread().unpark();
    idle.join().unwrap();
    let s1 = rcu::stats();
    assert_eq!(s1.grace_periods - s0.grace_periods, 1);
    assert_eq!(
        s1.wake_requests - s0.wake_requests,
        1,
        "the grace period stored into a slot other than the busy reader's"
    );
}

/// Counts drops of [`Tracked`] values.
static DROPPED: AtomicUsize = AtomicUsize::new(0);

struct Tracked(u64);

impl Drop for Tracked {
    fn drop(&mut self) {
        DROPPED.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn replace_sync_frees_on_the_caller_after_the_readers_leave() {
    let _x = common::exclusive();
    let cell = Arc::new(RcuCell::new(Tracked(1)));
    let s0 = rcu::stats();
    let dropped0 = DROPPED.load(Ordering::SeqCst);
    let entered = Arc::new(Barrier::new(2));
    let reader = {
        let (cell, entered) = (Arc::clone(&cell), Arc::clone(&entered));
        thread::spawn(move || {
            let g = rcu::read_lock();
            let value = cell.read(&g).0;
            entered.wait();
            // Stay in the section until the grace period sleeps waiting for
            // it (or, were the old value freed early, until it is freed).
            wait_for_stats("the grace period to wait for this reader", |s| {
                s.gp_sleeps > s0.gp_sleeps || DROPPED.load(Ordering::SeqCst) != dropped0
            });
            let alive = DROPPED.load(Ordering::SeqCst) == dropped0;
            drop(g);
            (alive, value)
        })
    };
    entered.wait();
    cell.replace_sync(Tracked(2));
    // Freed before replace_sync returned, on this thread's watch.
    assert_eq!(DROPPED.load(Ordering::SeqCst), dropped0 + 1);
    let (alive, value) = reader.join().unwrap();
    assert!(alive, "the old value was freed while a reader held it");
    assert_eq!(value, 1);
    assert_eq!(cell.with(|v| v.0), 2);
    let s1 = rcu::stats();
    assert_eq!(s1.call_rcu, s0.call_rcu, "replace_sync queues no callback");
    assert_eq!(s1.grace_periods - s0.grace_periods, 1);
}

#[test]
fn replace_sync_inside_a_section_panics_before_publishing() {
    let _x = common::exclusive();
    let cell = Arc::new(RcuCell::new(Tracked(10)));
    let c = Arc::clone(&cell);
    let r = thread::spawn(move || {
        let _g = rcu::read_lock();
        c.replace_sync(Tracked(11));
    })
    .join();
    assert!(r.is_err(), "replace_sync inside a section must panic");
    assert_eq!(cell.with(|v| v.0), 10, "nothing was published");
}
