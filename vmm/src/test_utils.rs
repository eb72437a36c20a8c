//! Test doubles for code that drives the VMM's interfaces, exported behind
//! the `test-utils` cargo feature (and always built for this crate's own
//! tests), as `devices` exports its `test_utils`.
//!
//! - [`FakeVm`]: a [`VmOps`](crate::qmp::VmOps) that checks the calling rules
//!   the trait documents and records what it was asked to do. Users: the QMP
//!   unit tests (`qmp/commands.rs`, `qmp/server.rs`, `qmp/fuzz_api.rs`), the
//!   QMP server integration test (`tests/qmp_server.rs`) and the `qmp` fuzz
//!   target.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test doubles: failing loudly is the point.

mod fake_vm;

pub use fake_vm::FakeVm;
