//! The call_rcu behaviours, with the `semaphore` wake-up strategy (this test binary
//! selects it before anything starts the call_rcu thread).

#![cfg(not(loom))] // The public API is not built under loom; see src/loom_models.rs.
#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

mod common;

use rcu::WakeupStrategy;
use std::sync::Once;

fn setup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        rcu::set_wakeup_strategy(WakeupStrategy::Semaphore).unwrap();
    });
    assert_eq!(rcu::wakeup_strategy(), WakeupStrategy::Semaphore);
}

#[test]
fn callback_waits_for_preexisting_reader() {
    setup();
    common::callback_waits_for_preexisting_reader();
}

#[test]
fn synchronize_waits_for_preexisting_reader() {
    setup();
    common::synchronize_waits_for_preexisting_reader();
}

#[test]
fn drain_runs_everything_and_counts_agree() {
    setup();
    common::drain_runs_everything_and_counts_agree();
}

#[test]
fn per_site_counts_are_exact() {
    setup();
    common::per_site_counts_are_exact();
}

#[test]
fn forced_callback_skips_batching() {
    setup();
    common::forced_callback_skips_batching();
}

#[test]
fn unforced_callback_batches_lazily() {
    setup();
    common::unforced_callback_batches_lazily();
}

#[test]
fn panicking_callback_is_contained() {
    setup();
    common::panicking_callback_is_contained();
}

#[test]
fn callbacks_can_call_rcu() {
    setup();
    common::callbacks_can_call_rcu();
}

#[test]
fn rcu_cell_update_is_atomic() {
    setup();
    common::rcu_cell_update_is_atomic();
}

#[test]
fn strategy_cannot_change_once_started() {
    setup();
    let _x = common::exclusive();
    rcu::drain_call_rcu();
    let other = match WakeupStrategy::Semaphore {
        WakeupStrategy::Event => WakeupStrategy::Semaphore,
        WakeupStrategy::Semaphore => WakeupStrategy::Event,
    };
    let err = rcu::set_wakeup_strategy(other).unwrap_err();
    assert_eq!(err.current, WakeupStrategy::Semaphore);
    assert_eq!(rcu::stats().wakeup, WakeupStrategy::Semaphore);
}
