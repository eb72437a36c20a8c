//! A boolean event with `set`, `reset` and `wait` (QEMU's `QemuEvent`).
//!
//! `set` is idempotent: many `set`s before a `wait` wake it once. A waiter that
//! wants to learn of changes made after some point calls `reset` first, then
//! re-checks its condition, then waits; `set` after the re-check is never lost.

use super::Signal;
use std::time::Duration;

use super::futex;
use crate::primitive::{AtomicU32, fence};
use std::sync::atomic::Ordering;

/// The event is set: `wait` returns at once.
const SET: u32 = 0;
/// The event is clear and nobody sleeps on it.
const FREE: u32 = 1;
/// The event is clear and a waiter may sleep on the futex: `set` must wake.
const BUSY: u32 = u32::MAX;

#[derive(Debug)]
pub(crate) struct Event {
    state: AtomicU32,
}

impl Event {
    /// A new event, set or clear.
    #[cfg(not(loom))]
    pub(crate) const fn new(set: bool) -> Self {
        Self {
            state: AtomicU32::new(if set { SET } else { FREE }),
        }
    }

    /// A new event, set or clear (loom's atomics are not `const`).
    #[cfg(loom)]
    pub(crate) fn new(set: bool) -> Self {
        Self {
            state: AtomicU32::new(if set { SET } else { FREE }),
        }
    }

    /// Sets the event. Everything the caller wrote before is visible to a
    /// thread whose `wait` returns because of this `set`.
    pub(crate) fn set(&self) {
        // Orders the caller's earlier writes (for example a pending-count
        // increment) before the check of the state below; pairs with the
        // fence in `reset`, so either this thread sees the reset or the
        // waiter sees the caller's writes. (A waiter that set BUSY is seen
        // by the swap below, a read-modify-write, in any case.)
        fence(Ordering::SeqCst);
        if self.state.load(Ordering::Relaxed) != SET
            && self.state.swap(SET, Ordering::SeqCst) == BUSY
        {
            futex::wake(&self.state, i32::MAX);
        }
    }

    /// Clears the event if it is set. A `set` that follows is seen by the
    /// next `wait`.
    pub(crate) fn reset(&self) {
        // SET -> FREE; FREE and BUSY unchanged.
        self.state.fetch_or(FREE, Ordering::SeqCst);
        // Orders the reset before the caller's reads of the condition it
        // waits for; pairs with the fence in `set` (store buffering: either
        // `set` sees the reset and wakes, or the caller sees its writes).
        // The SeqCst read-modify-write above already orders them in C++'s
        // model, but loom checks SeqCst accesses only as AcqRel and fences
        // fully, so the pairing is written as fence against fence; on x86
        // it costs one `mfence`, off every reader's path.
        fence(Ordering::SeqCst);
    }

    /// Whether the event is set, without waiting.
    pub(crate) fn is_set(&self) -> bool {
        self.state.load(Ordering::Acquire) == SET
    }

    /// Blocks until the event is set. Returns at once if it already is.
    pub(crate) fn wait(&self) {
        self.wait_until(None);
    }

    /// Blocks until the event is set or `timeout` passes; returns whether
    /// it is set.
    pub(crate) fn wait_timeout(&self, timeout: Duration) -> bool {
        self.wait_until(Some(futex::Deadline::after(timeout)))
    }

    fn wait_until(&self, deadline: Option<futex::Deadline>) -> bool {
        loop {
            let v = self.state.load(Ordering::Acquire);
            if v == SET {
                return true;
            }
            if v == FREE
                && let Err(SET) =
                    self.state
                        .compare_exchange(FREE, BUSY, Ordering::SeqCst, Ordering::Acquire)
            {
                return true;
            }
            let Ok(remaining) = super::time_left(deadline) else {
                return self.is_set();
            };
            if !futex::wait(&self.state, BUSY, remaining) {
                // Timed out: the deadline has passed.
                return self.is_set();
            }
        }
    }
}

impl Signal for Event {
    fn notify(&self) {
        self.set();
    }
    fn wait(&self) {
        Event::wait(self);
    }
    fn wait_timeout(&self, timeout: Duration) -> bool {
        Event::wait_timeout(self, timeout)
    }
}
