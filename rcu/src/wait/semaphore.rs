//! A counting semaphore (QEMU's `QemuSemaphore`): every `post` is remembered
//! and consumed by exactly one `wait`.

use super::Signal;
use std::time::Duration;

#[cfg(not(loom))]
mod imp {
    use super::super::futex;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    #[derive(Debug)]
    pub(crate) struct Semaphore {
        count: AtomicU32,
        sleepers: AtomicU32,
    }

    impl Semaphore {
        pub(crate) const fn new(count: u32) -> Self {
            Self {
                count: AtomicU32::new(count),
                sleepers: AtomicU32::new(0),
            }
        }

        /// Adds one unit; wakes one sleeper if there is one.
        pub(crate) fn post(&self) {
            // SeqCst on both sides: either the sleeper's re-check sees this
            // increment, or this load sees the sleeper registered (store
            // buffering, resolved by the single total order).
            self.count.fetch_add(1, Ordering::SeqCst);
            if self.sleepers.load(Ordering::SeqCst) != 0 {
                futex::wake(&self.count, 1);
            }
        }

        fn try_acquire(&self) -> bool {
            let mut c = self.count.load(Ordering::Acquire);
            while c > 0 {
                match self.count.compare_exchange_weak(
                    c,
                    c - 1,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
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
            self.wait_until(Some(Instant::now() + timeout))
        }

        fn wait_until(&self, deadline: Option<Instant>) -> bool {
            loop {
                if self.try_acquire() {
                    return true;
                }
                let remaining = match deadline {
                    None => None,
                    Some(d) => match d.checked_duration_since(Instant::now()) {
                        Some(r) if !r.is_zero() => Some(r),
                        _ => return self.try_acquire(),
                    },
                };
                self.sleepers.fetch_add(1, Ordering::SeqCst);
                if self.count.load(Ordering::SeqCst) == 0 {
                    futex::wait(&self.count, 0, remaining);
                }
                self.sleepers.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

#[cfg(loom)]
mod imp {
    use crate::primitive::{Condvar, Mutex, lock};
    use std::time::Duration;

    #[derive(Debug)]
    pub(crate) struct Semaphore {
        count: Mutex<u32>,
        cv: Condvar,
    }

    impl Semaphore {
        pub(crate) fn new(count: u32) -> Self {
            Self {
                count: Mutex::new(count),
                cv: Condvar::new(),
            }
        }
        pub(crate) fn post(&self) {
            *lock(&self.count) += 1;
            self.cv.notify_one();
        }
        pub(crate) fn wait(&self) {
            let mut g = lock(&self.count);
            while *g == 0 {
                g = match self.cv.wait(g) {
                    Ok(g) => g,
                    Err(e) => e.into_inner(),
                };
            }
            *g -= 1;
        }
        /// The timer is modelled as expiring at once.
        pub(crate) fn wait_timeout(&self, _timeout: Duration) -> bool {
            let mut g = lock(&self.count);
            if *g > 0 {
                *g -= 1;
                true
            } else {
                false
            }
        }
    }
}

pub(crate) use imp::Semaphore;

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
