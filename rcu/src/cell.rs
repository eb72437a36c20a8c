//! `RcuCell<T>`: a value published to lock-free readers and replaced
//! copy-on-write, the old value freed after a grace period.

use crate::queue::Node;
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
/// * [`replace_with`](Self::replace_with) publishes what a closure returns,
///   built where it will live (no copy of a large value; the closure must
///   not panic).
/// * [`replace_sync`](Self::replace_sync) publishes the same way, waits for
///   a grace period and drops the old value on the calling thread.
/// * [`update`](Self::update) is read-copy-update: clone, modify, publish,
///   retrying if another writer published in between, so concurrent updates
///   are never lost.
///
/// Every `replace`/`update` counts one `call_rcu` under the caller's source
/// location and, if the cell has one, its label. Each value is one
/// allocation, made when it is published; retiring it allocates nothing
/// more (the callback's queue header was allocated with the value).
pub struct RcuCell<T: Send + Sync + 'static> {
    /// The published value, in a node that will carry it to the call_rcu
    /// thread when it is replaced.
    ptr: AtomicPtr<Node<T>>,
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

impl<T: Send + Sync + 'static> RcuCell<T> {
    /// A cell holding `value`.
    pub fn new(value: T) -> Self {
        Self::with_label(value, "")
    }

    /// A cell holding `value`, whose replacements are counted under `label`
    /// in [`stats`](crate::stats) (for example "memory map replace").
    pub fn with_label(value: T, label: &'static str) -> Self {
        Self {
            ptr: AtomicPtr::new(Node::boxed(value)),
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
        // SAFETY: `p` is always a live node. A replaced value is freed only
        // after a grace period, and this thread is inside a read section (it
        // holds `guard`) that began before it loaded `p`, so the grace
        // period cannot end while the returned reference lives.
        unsafe { &*Node::value(p) }
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
        self.publish(Node::boxed(value));
    }

    /// Publishes what `make` returns, as [`replace`](Self::replace) does,
    /// building it where it will live. Never blocks.
    ///
    /// The new value's allocation is made first and `make` returns straight
    /// into it. `replace(value)` receives a value already built (on the
    /// caller's stack) and copies it into its allocation; for a 4 KiB value
    /// that copy is a measurable part of a swap. For small values the two
    /// cost the same.
    ///
    /// # Aborts
    /// If `make` panics, the process aborts after the panic's message and a
    /// line from this crate saying why: the compiler builds the value in
    /// place only for a call that cannot unwind. Use
    /// [`replace`](Self::replace) where the value's construction may fail.
    #[track_caller]
    pub fn replace_with(&self, make: impl FnOnce() -> T) {
        self.publish(Node::boxed_with(make));
    }

    /// Swaps `new` in and retires the value it replaces.
    #[track_caller]
    #[inline]
    fn publish(&self, new: *mut Node<T>) {
        // Read before the swap: after it, readers keep pulling the pointer's
        // cache line (which the label shares) away from this thread.
        let label = self.retire_label();
        let old = self.ptr.swap(new, Ordering::AcqRel);
        self.retire(old, label);
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
        let new = Node::boxed(value);
        let old = self.ptr.swap(new, Ordering::AcqRel);
        crate::synchronize_rcu();
        // SAFETY: `old` was unlinked by the swap above (so this thread owns
        // it) and the grace period has passed: no reader holds it.
        unsafe { Node::free(old) };
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
        let label = self.retire_label();
        loop {
            let cur = self.ptr.load(Ordering::Acquire);
            // SAFETY: as in `read`: `cur` was loaded inside the section held
            // by `guard`, so it cannot be freed before `guard` drops.
            let mut copy = unsafe { &*Node::value(cur) }.clone();
            let r = f(&mut copy);
            let new = Node::boxed(copy);
            match self
                .ptr
                .compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    drop(guard);
                    self.retire(cur, label);
                    return r;
                }
                Err(_) => {
                    // SAFETY: `new` was never published; we still own it.
                    unsafe { Node::free(new) };
                }
            }
        }
    }

    /// Mutable access: `&mut self` proves there are no readers.
    pub fn get_mut(&mut self) -> &mut T {
        // SAFETY: exclusive access to the cell; the pointer is a live node.
        unsafe { &mut *Node::value(self.ptr.load(Ordering::Relaxed)) }
    }

    /// The label replacements are counted under.
    pub fn label(&self) -> &'static str {
        self.label
    }

    /// The label `retire` counts a retired value under.
    fn retire_label(&self) -> &'static str {
        if self.label.is_empty() {
            "RcuCell::replace"
        } else {
            self.label
        }
    }

    #[track_caller]
    fn retire(&self, old: *mut Node<T>, label: &'static str) {
        // SAFETY: `old` was unlinked from the cell by exactly one swap or
        // compare-exchange, so this thread owns it; readers that still hold
        // it only read the value, and it is dropped after a grace period.
        unsafe { crate::global::retire_node(label, old) };
    }
}

impl<T: Send + Sync + 'static> Drop for RcuCell<T> {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: no reader holds a reference (they borrow the
        // cell), and the current value was never retired.
        unsafe { Node::free(*self.ptr.get_mut()) };
    }
}

impl<T: Send + Sync + Default + 'static> Default for RcuCell<T> {
    fn default() -> Self {
        Self::new(T::default())
    }
}
