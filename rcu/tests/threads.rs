//! Reader registration over thread lifetimes, and misuse that must fail
//! loudly instead of deadlocking.

#![cfg(not(loom))] // The public API is not built under loom; see src/loom_models.rs.
#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

/// Tests here compare the global reader count, so each runs alone (a test
/// thread registers as a reader and unregisters when it exits).
static EXCLUSIVE: Mutex<()> = Mutex::new(());

fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    EXCLUSIVE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The threads a test started have unregistered. The count may also drop
/// below `before`: the previous test's harness thread can still be exiting
/// when the next test takes its baseline.
fn assert_registry_back_to(before: usize) {
    let now = rcu::registered_readers();
    assert!(now <= before, "{now} readers registered, {before} before");
}

#[test]
fn exiting_thread_unregisters() {
    let _x = exclusive();
    let before = rcu::registered_readers();
    thread::spawn(|| {
        drop(rcu::read_lock());
        assert!(rcu::registered_readers() >= 1);
    })
    .join()
    .unwrap();
    assert_registry_back_to(before);
    rcu::synchronize_rcu();
}

#[test]
fn thread_exiting_inside_leaked_section_does_not_block_grace_periods() {
    let _x = exclusive();
    let before = rcu::registered_readers();
    thread::spawn(|| {
        std::mem::forget(rcu::read_lock());
        std::mem::forget(rcu::read_lock()); // nested, too
        assert!(rcu::in_read_section());
    })
    .join()
    .unwrap();
    assert_registry_back_to(before);
    // Would hang forever if the dead thread's section were still counted.
    rcu::synchronize_rcu();
    rcu::drain_call_rcu();
}

#[test]
fn grace_period_waiting_for_a_thread_that_exits_in_its_section_completes() {
    let _x = exclusive();
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (exit_tx, exit_rx) = std::sync::mpsc::channel::<()>();
    let reader = thread::spawn(move || {
        std::mem::forget(rcu::read_lock());
        entered_tx.send(()).unwrap();
        exit_rx.recv().unwrap();
        // Exits with the section still open.
    });
    entered_rx.recv().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let d = Arc::clone(&done);
    let syncer = thread::spawn(move || {
        rcu::synchronize_rcu();
        d.store(true, Ordering::SeqCst);
    });
    thread::sleep(std::time::Duration::from_millis(50));
    assert!(!done.load(Ordering::SeqCst));
    exit_tx.send(()).unwrap();
    reader.join().unwrap();
    syncer.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
}

#[test]
fn ten_thousand_short_lived_threads_do_not_grow_the_registry() {
    let _x = exclusive();
    let before = rcu::registered_readers();
    let mut peak = 0;
    for batch in 0..100 {
        let handles: Vec<_> = (0..100)
            .map(|_| {
                thread::spawn(|| {
                    let g = rcu::read_lock();
                    drop(g);
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        peak = peak.max(rcu::registered_readers());
        if batch % 10 == 0 {
            rcu::synchronize_rcu();
        }
    }
    assert_registry_back_to(before);
    assert!(peak <= before + 100, "peak {peak} readers");
}

#[test]
fn thread_local_destructor_may_read() {
    struct ReadsOnDrop;
    impl Drop for ReadsOnDrop {
        fn drop(&mut self) {
            let g = rcu::read_lock();
            drop(g);
        }
    }
    thread_local! {
        static LATE: ReadsOnDrop = const { ReadsOnDrop };
    }
    let _x = exclusive();
    let before = rcu::registered_readers();
    thread::spawn(|| LATE.with(|_| ())).join().unwrap();
    assert_registry_back_to(before);
}

#[test]
#[should_panic(expected = "synchronize_rcu() called inside an RCU read-side critical section")]
fn synchronize_inside_read_section_panics() {
    let _x = exclusive();
    let _g = rcu::read_lock();
    rcu::synchronize_rcu();
}

#[test]
#[should_panic(expected = "drain_call_rcu() called inside an RCU read-side critical section")]
fn drain_inside_read_section_panics() {
    let _x = exclusive();
    let _g = rcu::read_lock();
    rcu::drain_call_rcu();
}

#[test]
fn drain_from_a_callback_panics_and_is_contained() {
    let _x = exclusive();
    let before = rcu::stats();
    let ok = Arc::new(AtomicBool::new(false));
    let ok2 = Arc::clone(&ok);
    rcu::call_rcu(move || {
        let r = std::panic::catch_unwind(rcu::drain_call_rcu);
        ok2.store(r.is_err(), Ordering::SeqCst);
    });
    rcu::drain_call_rcu();
    assert!(
        ok.load(Ordering::SeqCst),
        "drain_call_rcu from a callback must panic"
    );
    assert_eq!(rcu::stats().callback_panics, before.callback_panics);
}

#[test]
fn reader_modes_can_be_mixed_and_changed_outside_sections() {
    let _x = exclusive();
    thread::spawn(|| {
        assert_eq!(rcu::reader_mode(), rcu::ReaderMode::Membarrier);
        rcu::set_reader_mode(rcu::ReaderMode::Fenced);
        assert_eq!(rcu::reader_mode(), rcu::ReaderMode::Fenced);
        let g = rcu::read_lock();
        drop(g);
        rcu::set_reader_mode(rcu::ReaderMode::Membarrier);
        let g = rcu::read_lock();
        drop(g);
    })
    .join()
    .unwrap();
    rcu::synchronize_rcu();
}

#[test]
#[should_panic(expected = "set_reader_mode() called inside an RCU read-side critical section")]
fn reader_mode_change_inside_section_panics() {
    let _x = exclusive();
    let _g = rcu::read_lock();
    rcu::set_reader_mode(rcu::ReaderMode::Fenced);
}

#[test]
fn grace_periods_skip_membarrier_when_all_other_readers_fence() {
    let _x = exclusive();
    if !rcu::stats().membarrier {
        // Still meaningful: every barrier is then a local fence.
        eprintln!("membarrier unavailable or disabled: only checking fences");
    }
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let fenced = thread::spawn(move || {
        rcu::set_reader_mode(rcu::ReaderMode::Fenced);
        drop(rcu::read_lock());
        ready_tx.send(()).unwrap();
        rx.recv().unwrap();
    });
    ready_rx.recv().unwrap();
    // This thread is the caller; make sure it is registered in fenced mode
    // too, and that no membarrier-mode reader remains registered.
    rcu::set_reader_mode(rcu::ReaderMode::Fenced);
    drop(rcu::read_lock());
    let before = rcu::stats();
    let others_in_membarrier_mode = before.readers > 2;
    for _ in 0..10 {
        rcu::synchronize_rcu();
    }
    let after = rcu::stats();
    tx.send(()).unwrap();
    fenced.join().unwrap();
    rcu::set_reader_mode(rcu::ReaderMode::Membarrier);
    if !others_in_membarrier_mode {
        assert_eq!(after.membarriers, before.membarriers, "{after:#?}");
    }
}
