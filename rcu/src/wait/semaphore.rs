//! A counting semaphore (QEMU's `QemuSemaphore`): every `post` is remembered
//! and consumed by exactly one `wait`.

use super::Signal;
use std::time::Duration;

use super::futex;
use crate::primitive::{AtomicU32, fence};
use std::sync::atomic::Ordering;

#[derive(Debug)]
pub(crate) struct Semaphore {
    count: AtomicU32,
    sleepers: AtomicU32,
}

impl Semaphore {
    /// A new semaphore holding `count` units.
    #[cfg(not(loom))]
    pub(crate) const fn new(count: u32) -> Self {
        Self {
            count: AtomicU32::new(count),
            sleepers: AtomicU32::new(0),
        }
    }

    /// A new semaphore holding `count` units (loom's atomics are not
    /// `const`).
    #[cfg(loom)]
    pub(crate) fn new(count: u32) -> Self {
        Self {
            count: AtomicU32::new(count),
            sleepers: AtomicU32::new(0),
        }
    }

    /// Adds one unit; wakes one sleeper if there is one.
    pub(crate) fn post(&self) {
        // A fence on both sides: either the sleeper's re-check sees this
        // increment, or this load sees the sleeper registered (store
        // buffering). SeqCst accesses alone would do in C++'s model, but
        // loom checks them only as AcqRel, and fences fully; on x86 the
        // fence costs one `mfence` after the locked add.
        self.count.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) != 0 {
            futex::wake(&self.count, 1);
        }
    }

    fn try_acquire(&self) -> bool {
        let mut c = self.count.load(Ordering::Acquire);
        while c > 0 {
            match self
                .count
                .compare_exchange_weak(c, c - 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(now) => c = now,
            }
        }
        false
    }

    /// Takes one unit, blocking until one is available.
    pub(crate) fn wait(&self) {
        self.wait_until(None);
    }

    /// Takes one unit if one becomes available before `timeout`; returns
    /// whether it did.
    pub(crate) fn wait_timeout(&self, timeout: Duration) -> bool {
        self.wait_until(Some(futex::Deadline::after(timeout)))
    }

    fn wait_until(&self, deadline: Option<futex::Deadline>) -> bool {
        loop {
            if self.try_acquire() {
                return true;
            }
            let Ok(remaining) = super::time_left(deadline) else {
                return self.try_acquire();
            };
            self.sleepers.fetch_add(1, Ordering::SeqCst);
            // Pairs with the fence in `post`.
            fence(Ordering::SeqCst);
            let woken =
                self.count.load(Ordering::SeqCst) != 0 || futex::wait(&self.count, 0, remaining);
            self.sleepers.fetch_sub(1, Ordering::SeqCst);
            if !woken {
                // Timed out: the deadline has passed.
                return self.try_acquire();
            }
        }
    }
}

impl Signal for Semaphore {
    fn notify(&self) {
        self.post();
    }
    fn wait(&self) {
        Semaphore::wait(self);
    }
    fn wait_timeout(&self, timeout: Duration) -> bool {
        Semaphore::wait_timeout(self, timeout)
    }
}
