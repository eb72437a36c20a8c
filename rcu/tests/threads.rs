//! Reader registration over thread lifetimes, and misuse that must fail
//! loudly instead of deadlocking.

#![cfg(not(loom))] // The public API is not built under loom; see src/loom_models.rs.
#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

// Each test runs alone (`common::exclusive`): tests here compare the global
// reader count (a test thread registers as a reader and unregisters when it
// exits).
mod common;

use rcu::RcuCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

/// The threads a test started have unregistered. The count may also drop
/// below `before`: the previous test's harness thread can still be exiting
/// when the next test takes its baseline.
fn assert_registry_back_to(before: usize) {
    let now = rcu::registered_readers();
    assert!(now <= before, "{now} readers registered, {before} before");
}

#[test]
fn exiting_thread_unregisters() {
    let _x = common::exclusive();
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

/// Runs this test binary again with only the test `name`, with
/// `CHILD_ENV` set so that the test runs its scenario instead of this
/// driver. Returns the child's output.
fn run_child(name: &str) -> std::process::Output {
    let exe = std::env::current_exe().unwrap();
    std::process::Command::new(exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
        .output()
        .unwrap()
}

/// Set in a child process started by `run_child`.
const CHILD_ENV: &str = "RCU_THREADS_TEST_CHILD";

fn is_child(name: &str) -> bool {
    std::env::var(CHILD_ENV).is_ok_and(|v| v == name)
}

/// Set when a `Flagged` value is dropped (freed).
static FREED: AtomicBool = AtomicBool::new(false);

/// A value whose drop is observable through `FREED`, so a test can see that
/// it was freed without touching it afterwards.
struct Flagged(#[allow(dead_code)] u64);

impl Drop for Flagged {
    fn drop(&mut self) {
        FREED.store(true, Ordering::SeqCst);
    }
}

/// In a child: replaces the value `r` was read from, drains, and reports
/// (on stdout, exit code 3) whether the value was freed while `r` still
/// referred to it. Returns only if it was not.
fn replace_and_report_free(cell: &RcuCell<Flagged>, r: &Flagged) {
    cell.replace(Flagged(2));
    rcu::drain_call_rcu();
    if FREED.load(Ordering::SeqCst) {
        println!("FREED WHILE REFERENCED");
        std::process::exit(3);
    }
    // `r` is still referenced (never dereferenced after a free).
    std::hint::black_box(r);
}

fn assert_aborted_with(out: &std::process::Output, message: &[&str]) {
    use std::os::unix::process::ExitStatusExt;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stdout.contains("FREED WHILE REFERENCED"),
        "use after free: {stdout}\n{stderr}"
    );
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "child did not abort: {:?}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    for m in message {
        assert!(stderr.contains(m), "stderr lacks {m:?}: {stderr}");
    }
}

/// A thread that exits inside a section it leaked must not end the section
/// (a `&'static` reference read in it may live on in another thread): the
/// process aborts, naming the thread, before the value can be freed.
#[test]
fn thread_exiting_inside_a_leaked_section_aborts_naming_it() {
    const NAME: &str = "thread_exiting_inside_a_leaked_section_aborts_naming_it";
    if is_child(NAME) {
        let cell: &'static RcuCell<Flagged> = Box::leak(Box::new(RcuCell::new(Flagged(1))));
        let (tx, rx) = std::sync::mpsc::channel::<&'static Flagged>();
        thread::Builder::new()
            .name("leaky-reader".into())
            .spawn(move || {
                let g: &'static rcu::ReadGuard = Box::leak(Box::new(rcu::read_lock()));
                tx.send(cell.read(g)).unwrap();
            })
            .unwrap()
            .join()
            .unwrap();
        let r = rx.recv().unwrap();
        replace_and_report_free(cell, r);
        println!("NOT FREED");
        return;
    }
    let _x = common::exclusive();
    let out = run_child(NAME);
    assert_aborted_with(
        &out,
        &[
            "rcu: thread 'leaky-reader (tid ",
            "exited inside an RCU read-side critical section",
        ],
    );
}

/// A callback that leaks a guard would leave the call_rcu thread inside a
/// section, which the grace periods that thread runs do not wait for: the
/// thread aborts the process instead.
#[test]
fn callback_leaking_a_section_aborts() {
    const NAME: &str = "callback_leaking_a_section_aborts";
    if is_child(NAME) {
        static STASH: std::sync::OnceLock<&'static Flagged> = std::sync::OnceLock::new();
        let cell: &'static RcuCell<Flagged> = Box::leak(Box::new(RcuCell::new(Flagged(1))));
        rcu::call_rcu(move || {
            let g: &'static rcu::ReadGuard = Box::leak(Box::new(rcu::read_lock()));
            let _ = STASH.set(cell.read(g));
        });
        rcu::drain_call_rcu();
        let r = *STASH.get().unwrap();
        replace_and_report_free(cell, r);
        println!("NOT FREED");
        return;
    }
    let _x = common::exclusive();
    let out = run_child(NAME);
    assert_aborted_with(
        &out,
        &["rcu: an RCU callback returned inside a read-side critical section"],
    );
}

/// `RcuCell::replace_with` builds its value in place, which the compiler
/// does only for a call that cannot unwind: a panicking closure aborts the
/// process, saying so, instead of publishing or returning.
#[test]
fn replace_with_whose_closure_panics_aborts() {
    const NAME: &str = "replace_with_whose_closure_panics_aborts";
    if is_child(NAME) {
        let cell = RcuCell::new([1u64; 512]);
        cell.replace_with(|| -> [u64; 512] { panic!("no page today") });
        println!("RETURNED with {}", cell.with(|v| v[0]));
        return;
    }
    let _x = common::exclusive();
    let out = run_child(NAME);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("RETURNED"),
        "replace_with returned after its closure panicked"
    );
    assert_aborted_with(
        &out,
        &[
            "no page today",
            "rcu: the closure given to RcuCell::replace_with panicked",
        ],
    );
}

/// A grace period waiting for a thread stuck in its section keeps waiting:
/// only the guard's drop ends the section.
#[test]
fn grace_period_waits_until_the_guard_drops() {
    let _x = common::exclusive();
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (leave_tx, leave_rx) = std::sync::mpsc::channel::<()>();
    let reader = thread::spawn(move || {
        let g = rcu::read_lock();
        entered_tx.send(()).unwrap();
        leave_rx.recv().unwrap();
        drop(g);
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
    leave_tx.send(()).unwrap();
    reader.join().unwrap();
    syncer.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
}

/// A callback's panic payload whose own `Drop` panics is contained too: the
/// call_rcu thread survives and `drain_call_rcu` returns.
#[test]
fn panic_payload_with_panicking_drop_is_contained() {
    struct PanicsOnDrop;
    impl Drop for PanicsOnDrop {
        fn drop(&mut self) {
            panic!("deliberate panic while dropping a panic payload (test)");
        }
    }
    let _x = common::exclusive();
    let before = rcu::stats();
    rcu::call_rcu(|| std::panic::panic_any(PanicsOnDrop));
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        rcu::drain_call_rcu();
        let _ = tx.send(());
    });
    // A liveness deadline only: a dead call_rcu thread never answers.
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .expect("drain_call_rcu did not return: the call_rcu thread died");
    assert_eq!(rcu::stats().callback_panics - before.callback_panics, 1);
}

#[test]
fn ten_thousand_short_lived_threads_do_not_grow_the_registry() {
    let _x = common::exclusive();
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
    let _x = common::exclusive();
    let before = rcu::registered_readers();
    thread::spawn(|| LATE.with(|_| ())).join().unwrap();
    assert_registry_back_to(before);
}

#[test]
#[should_panic(expected = "synchronize_rcu() called inside an RCU read-side critical section")]
fn synchronize_inside_read_section_panics() {
    let _x = common::exclusive();
    let _g = rcu::read_lock();
    rcu::synchronize_rcu();
}

#[test]
#[should_panic(expected = "drain_call_rcu() called inside an RCU read-side critical section")]
fn drain_inside_read_section_panics() {
    let _x = common::exclusive();
    let _g = rcu::read_lock();
    rcu::drain_call_rcu();
}

#[test]
fn drain_from_a_callback_panics_and_is_contained() {
    let _x = common::exclusive();
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
    let _x = common::exclusive();
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
    let _x = common::exclusive();
    let _g = rcu::read_lock();
    rcu::set_reader_mode(rcu::ReaderMode::Fenced);
}

#[test]
fn grace_periods_skip_membarrier_when_all_other_readers_fence() {
    let _x = common::exclusive();
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

/// A reader that keeps a grace period waiting for over a second is named in
/// `stats()` (and on stderr, once).
#[test]
fn stalling_reader_is_named_in_stats() {
    let _x = common::exclusive();
    let before = rcu::stats().stalls;
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (leave_tx, leave_rx) = std::sync::mpsc::channel::<()>();
    let reader = thread::Builder::new()
        .name("stalling-reader".into())
        .spawn(move || {
            let g = rcu::read_lock();
            entered_tx.send(()).unwrap();
            leave_rx.recv().unwrap();
            drop(g);
        })
        .unwrap();
    entered_rx.recv().unwrap();
    let syncer = thread::spawn(rcu::synchronize_rcu);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while rcu::stats().stalls == before && std::time::Instant::now() < deadline {
        thread::sleep(std::time::Duration::from_millis(10));
    }
    let s = rcu::stats();
    leave_tx.send(()).unwrap();
    reader.join().unwrap();
    syncer.join().unwrap();
    assert_eq!(s.stalls, before + 1, "{s:#?}");
    assert!(
        s.stalled_readers
            .iter()
            .any(|n| n.starts_with("stalling-reader (tid ")),
        "{:?}",
        s.stalled_readers
    );
}

/// A grace period with an idle membarrier-mode reader issues one
/// `membarrier`, not two (none before the phase advance, none on re-scans).
#[test]
fn idle_reader_grace_period_issues_one_membarrier() {
    let _x = common::exclusive();
    drop(rcu::read_lock()); // initialises (probes membarrier)
    if !rcu::stats().membarrier {
        eprintln!("membarrier unavailable or disabled: nothing to count");
        return;
    }
    rcu::drain_call_rcu();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let idle = thread::spawn(move || {
        rcu::set_reader_mode(rcu::ReaderMode::Membarrier);
        drop(rcu::read_lock());
        ready_tx.send(()).unwrap();
        rx.recv().unwrap();
    });
    ready_rx.recv().unwrap();
    let before = rcu::stats();
    for _ in 0..10 {
        rcu::synchronize_rcu();
    }
    let after = rcu::stats();
    tx.send(()).unwrap();
    idle.join().unwrap();
    let gps = after.grace_periods - before.grace_periods;
    assert!(gps >= 10, "{after:#?}");
    assert_eq!(after.membarriers - before.membarriers, gps, "{after:#?}");
}
