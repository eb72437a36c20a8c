//! `set_wakeup_strategy` racing the start of the call_rcu thread: it must
//! return `Ok` only if the thread runs with the strategy asked for. Each
//! attempt needs a process whose call_rcu thread has not started yet, so the
//! test re-runs this binary as children, and steers the setter's timing onto
//! the moment the thread starts.

#![cfg(not(loom))] // The public API is not built under loom; see src/loom_models.rs.
#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use rcu::WakeupStrategy;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

const CHILD_ENV: &str = "RCU_STRATEGY_RACE_DELAY";
const NAME: &str = "set_wakeup_strategy_never_lies_about_a_concurrent_start";

/// The child's verdicts (exit codes).
const EARLY: i32 = 0;
const LATE: i32 = 4;
const LIE: i32 = 3;

/// One race: the main thread starts the call_rcu thread (default strategy
/// `Event`) while a setter keeps asking for
/// `Semaphore`; a positive `delay` makes the setter spin that long before
/// its first call, a negative one the main thread. Once the start read the strategy, every later call must
/// answer `Err`; an `Ok` followed by an `Err` means that `Ok` was a lie (the
/// start had already taken `Event`). Exits EARLY if the setter's first call
/// came before the start read the strategy, LATE if it came after the start,
/// LIE on an `Ok` then `Err`.
fn child(delay: i64) -> ! {
    rcu::synchronize_rcu(); // one-time initialisation done: a tighter race
    let go = Arc::new(AtomicBool::new(false));
    let setter = {
        let go = Arc::clone(&go);
        thread::spawn(move || {
            while !go.load(Ordering::Acquire) {
                std::hint::spin_loop();
            }
            spin(delay);
            let mut answers = Vec::new();
            loop {
                let ok = rcu::set_wakeup_strategy(WakeupStrategy::Semaphore).is_ok();
                answers.push(ok);
                if !ok || rcu::pending_callbacks() > 0 {
                    return answers;
                }
            }
        })
    };
    // The section keeps the callback pending (its grace period waits).
    let g = rcu::read_lock();
    go.store(true, Ordering::Release);
    spin(-delay);
    rcu::call_rcu(|| {});
    let answers = setter.join().unwrap();
    drop(g);
    let code = match (answers.first(), answers.last()) {
        (Some(true), Some(false)) => LIE,
        (Some(false), _) => LATE,
        _ => EARLY,
    };
    if code == LIE {
        println!(
            "set_wakeup_strategy(Semaphore) answered Ok, then Err: the thread uses {:?}",
            rcu::wakeup_strategy()
        );
    }
    std::process::exit(code);
}

fn spin(n: i64) {
    for _ in 0..n.max(0) {
        std::hint::spin_loop();
    }
}

#[test]
fn set_wakeup_strategy_never_lies_about_a_concurrent_start() {
    if let Some(delay) = std::env::var(CHILD_ENV).ok().and_then(|s| s.parse().ok()) {
        child(delay);
    }
    let exe = std::env::current_exe().unwrap();
    let attempts: u32 = std::env::var("RCU_STRATEGY_RACE_ATTEMPTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let (mut delay, mut early, mut late) = (0i64, 0, 0);
    for i in 0..attempts {
        let out = std::process::Command::new(&exe)
            .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, delay.to_string())
            .output()
            .unwrap();
        match out.status.code() {
            // Steer the setter's first call towards the start.
            Some(EARLY) => {
                early += 1;
                delay += 8 + delay.abs() / 16;
            }
            Some(LATE) => {
                late += 1;
                delay -= 8 + delay.abs() / 16;
            }
            _ => panic!(
                "attempt {i} (delay {delay}): {:?}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
    println!("{early} attempts early, {late} late, final delay {delay} spins");
}
