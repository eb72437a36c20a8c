//! Thin, safe wrappers around the Linux futex system call on an `AtomicU32`.
//!
//! Under `--cfg loom`, `futex_model.rs` stands in with the same interface.

use std::sync::atomic::AtomicU32;
use std::time::{Duration, Instant};

/// Blocks while `*word == expected`, until woken, interrupted or `timeout`
/// passes. Returns `false` only when the timeout expired. Spurious returns are
/// possible; callers re-check their condition.
pub(super) fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> bool {
    let ts = timeout.map(|d| libc::timespec {
        tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(d.subsec_nanos()),
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: FUTEX_WAIT only reads the 4 bytes of `word`, which is a live,
    // aligned AtomicU32 for the duration of the call, and `ts_ptr` is null or
    // points at a timespec that lives until the call returns.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            ts_ptr,
        )
    };
    !(r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ETIMEDOUT))
}

/// Wakes up to `n` threads blocked in [`wait`] on `word`.
pub(super) fn wake(word: &AtomicU32, n: i32) {
    // SAFETY: FUTEX_WAKE does not access memory through the pointer; it only
    // uses the address as a key. `word` is live for the call.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            n,
        );
    }
}

/// When a timed wait ends, on the monotonic clock.
#[derive(Debug, Clone, Copy)]
pub(super) struct Deadline(Instant);

impl Deadline {
    /// The deadline `timeout` from now.
    pub(super) fn after(timeout: Duration) -> Self {
        Self(Instant::now() + timeout)
    }

    /// The time left, or `None` once the deadline has passed.
    pub(super) fn remaining(&self) -> Option<Duration> {
        match self.0.checked_duration_since(Instant::now()) {
            Some(r) if !r.is_zero() => Some(r),
            _ => None,
        }
    }
}
