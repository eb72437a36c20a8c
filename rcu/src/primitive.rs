//! The synchronisation primitives the algorithm is written against.
//!
//! In normal builds these are `std`'s. Under `--cfg loom` they are `loom`'s, so
//! the same grace-period and call_rcu code is model-checked by `loom` (see
//! `loom_models.rs`). Statistics counters are deliberately *not* routed through
//! here: they do not take part in the protocol, and keeping them out of the
//! model keeps loom's state space small.

#[cfg(loom)]
pub(crate) use loom::{
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, fence},
    },
    thread,
};

#[cfg(not(loom))]
pub(crate) use std::sync::{
    Condvar, Mutex, MutexGuard,
    atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, fence},
};

/// Locks `m`, ignoring poisoning.
///
/// Every critical section in this crate leaves the protected data consistent
/// at each step (no user code runs under these locks), so a poisoned lock
/// carries no broken invariant and recovering its data is sound.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    #[cfg(not(loom))]
    {
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    #[cfg(loom)]
    {
        // loom's Mutex cannot be poisoned by the models (they do not panic
        // while holding it); a poisoned lock there is a model bug.
        match m.lock() {
            Ok(g) => g,
            Err(e) => e.into_inner(),
        }
    }
}

/// Gives the processor (and under loom, the model scheduler) to another
/// thread; used only in the short wait for a producer that is half-way
/// through linking a callback into the queue.
pub(crate) fn spin_yield() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::thread::yield_now();
}

/// Gives its content cache lines of its own (two 64-byte lines, as the
/// adjacent-line prefetcher of x86 pulls pairs), so that a word one thread
/// writes never shares a line with a word another thread writes.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct CachePadded<T>(pub(crate) T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}
