//! `RcuCell<T>`: a value published to lock-free readers and replaced
//! copy-on-write, the old value freed after a grace period.

use crate::reader::{ReadGuard, read_lock};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicPtr, Ordering};

/// A shared value that readers access without locks and writers replace
/// whole.
///
/// * [`read`](Self::read) returns `&T` valid for the lifetime of the given
///   guard: a reference obtained inside a read section stays valid until the
///   section ends, whatever writers do meanwhile.
/// * [`replace`](Self::replace) publishes a new value with release ordering
///   (a reader that sees the new value sees everything written to it before)
///   and hands the old one to [`call_rcu`](crate::call_rcu), which drops it
///   on the call_rcu thread after a grace period. It never blocks.
/// * [`replace_sync`](Self::replace_sync) publishes the same way, waits for
///   a grace period and drops the old value on the calling thread.
/// * [`update`](Self::update) is read-copy-update: clone, modify, publish,
///   retrying if another writer published in between, so concurrent updates
///   are never lost.
///
/// Every `replace`/`update` counts one `call_rcu` under the caller's source
/// location and, if the cell has one, its label.
pub struct RcuCell<T: Send + Sync + 'static> {
    ptr: AtomicPtr<T>,
    label: &'static str,
    _owns: PhantomData<Box<T>>,
}

impl<T: Send + Sync + 'static> std::fmt::Debug for RcuCell<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RcuCell")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

/// A pointer handed to the call_rcu thread for freeing.
struct Retired<T>(*mut T);

// SAFETY: the pointee is a `T: Send` that nobody else owns any more (it was
// unlinked from the cell); moving the pointer moves that ownership.
unsafe impl<T: Send> Send for Retired<T> {}

impl<T> Retired<T> {
    /// Drops the value. Consuming `self` makes the closure capture the whole
    /// wrapper (which is `Send`) rather than its raw-pointer field.
    fn free(self) {
        // SAFETY: the pointer came from `Box::into_raw`, was unlinked from
        // its cell by exactly one swap or compare-exchange, and a grace
        // period has passed, so no reader can still hold a reference.
        drop(unsafe { Box::from_raw(self.0) });
    }
}

impl<T: Send + Sync + 'static> RcuCell<T> {
    /// A cell holding `value`.
    pub fn new(value: T) -> Self {
        Self::with_label(value, "")
    }

    /// A cell holding `value`, whose replacements are counted under `label`
    /// in [`stats`](crate::stats) (for example "memory map replace").
    pub fn with_label(value: T, label: &'static str) -> Self {
        Self {
            ptr: AtomicPtr::new(Box::into_raw(Box::new(value))),
            label,
            _owns: PhantomData,
        }
    }

    /// The current value, valid as long as `guard`.
    #[inline]
    pub fn read<'g>(&'g self, _guard: &'g ReadGuard) -> &'g T {
        // Acquire pairs with the release half of the swap in `replace`: the
        // new value's contents are visible.
        let p = self.ptr.load(Ordering::Acquire);
        // SAFETY: `p` is always a live Box pointer. A replaced value is freed
        // only after a grace period, and this thread is inside a read section
        // (it holds `guard`) that began before it loaded `p`, so the grace
        // period cannot end while the returned reference lives.
        unsafe { &*p }
    }

    /// Runs `f` on the current value inside a read section of its own.
    pub fn with<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        let g = read_lock();
        f(self.read(&g))
    }

    /// Publishes `value`; the previous value is dropped on the call_rcu
    /// thread after a grace period. Never blocks.
    #[track_caller]
    pub fn replace(&self, value: T) {
        let new = Box::into_raw(Box::new(value));
        let old = self.ptr.swap(new, Ordering::AcqRel);
        self.retire(old);
    }

    /// Publishes `value`, waits for a grace period
    /// ([`synchronize_rcu`](crate::synchronize_rcu)) and drops the previous value on the calling
    /// thread, which no reader can reference any more. Blocks for the grace
    /// period; needs no call_rcu thread and counts no `call_rcu` (liburcu's
    /// `rcu_xchg_pointer` + `synchronize_rcu` + `free`).
    ///
    /// # Panics
    /// Inside a read-side critical section (the grace period would wait for
    /// the caller's own section forever).
    pub fn replace_sync(&self, value: T) {
        // Checked before publishing, so that a misuse changes nothing.
        assert!(
            !crate::in_read_section(),
            "RcuCell::replace_sync() called inside an RCU read-side critical section: \
             it would wait for itself forever"
        );
        let new = Box::into_raw(Box::new(value));
        let old = self.ptr.swap(new, Ordering::AcqRel);
        crate::synchronize_rcu();
        Retired(old).free();
    }

    /// Read-copy-update: clones the current value, lets `f` modify the copy,
    /// publishes it and returns what `f` returned. If another writer
    /// published first, starts again from that writer's value (so `f` may
    /// run more than once). The old value is freed after a grace period.
    #[track_caller]
    pub fn update<R>(&self, mut f: impl FnMut(&mut T) -> R) -> R
    where
        T: Clone,
    {
        let guard = read_lock();
        loop {
            let cur = self.ptr.load(Ordering::Acquire);
            // SAFETY: as in `read`: `cur` was loaded inside the section held
            // by `guard`, so it cannot be freed before `guard` drops.
            let mut copy = unsafe { &*cur }.clone();
            let r = f(&mut copy);
            let new = Box::into_raw(Box::new(copy));
            match self
                .ptr
                .compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    drop(guard);
                    self.retire(cur);
                    return r;
                }
                Err(_) => {
                    // SAFETY: `new` was never published; we still own it.
                    drop(unsafe { Box::from_raw(new) });
                }
            }
        }
    }

    /// Mutable access: `&mut self` proves there are no readers.
    pub fn get_mut(&mut self) -> &mut T {
        // SAFETY: exclusive access to the cell; the pointer is a live Box.
        unsafe { &mut *self.ptr.load(Ordering::Relaxed) }
    }

    /// The label replacements are counted under.
    pub fn label(&self) -> &'static str {
        self.label
    }

    #[track_caller]
    fn retire(&self, old: *mut T) {
        let retired = Retired(old);
        let label = if self.label.is_empty() {
            "RcuCell::replace"
        } else {
            self.label
        };
        crate::call_rcu_labeled(label, move || retired.free());
    }
}

impl<T: Send + Sync + 'static> Drop for RcuCell<T> {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: no reader holds a reference (they borrow the
        // cell), and the current value was never retired.
        drop(unsafe { Box::from_raw(*self.ptr.get_mut()) });
    }
}

impl<T: Send + Sync + Default + 'static> Default for RcuCell<T> {
    fn default() -> Self {
        Self::new(T::default())
    }
}
