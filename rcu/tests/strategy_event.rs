//! The call_rcu behaviours, with the `event` wake-up strategy (this test binary
//! selects it before anything starts the call_rcu thread). The tests are
//! those of `common::wakeup_strategy_tests!`, the same in both binaries.

#![cfg(not(loom))] // The public API is not built under loom; see src/loom_models.rs.
#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

mod common;

common::wakeup_strategy_tests!(rcu::WakeupStrategy::Event);
