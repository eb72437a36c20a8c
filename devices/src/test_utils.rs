//! Test doubles for code that drives or backs the devices, exported (as
//! `virtio-queue` exports its `mock` module) behind the `test-utils` cargo
//! feature, and always built for this crate's own tests.
//!
//! - [`TestQueue`]: the driver side of a split virtqueue: writes descriptors
//!   and the available ring, reads the used ring, in whatever guest memory
//!   the caller gives it ([`QueueMemory`]): a `GuestMemoryMmap` in unit tests,
//!   the VMM's RCU-published map in integration tests.
//! - [`CheckedBackend`]: a [`MemoryBackend`](crate::virtio::MemoryBackend)
//!   that tracks which blocks it backs, checks every call against the trait's
//!   contract (counting or panicking on a violation), records the calls, and
//!   fails on request.
//!
//! Users: this crate's virtio unit tests, the fuzz targets in `fuzz/`, and
//! the hostile-guest integration test in `tests/`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test doubles: failing loudly is the point.

mod checked_backend;
mod test_queue;

pub use checked_backend::{BackendCall, CheckedBackend, OnViolation};
pub use test_queue::{QueueMemory, TestQueue};
