//! The callback queue: wait-free for producers, single consumer (the call_rcu
//! thread). The algorithm is liburcu's `wfqueue` as used by QEMU: producers
//! swap themselves into `tail` and then link the previous tail to themselves;
//! the consumer keeps a stub node so the queue is never empty of nodes.
//!
//! A node is `Node<F>`: a type-erased header followed by the closure, one
//! allocation per callback. A value an `RcuCell` publishes lives in a node
//! from the start ([`Node::boxed`]), so retiring it queues that node and
//! allocates nothing ([`Queue::push_drop`]): one allocation per replaced
//! value, as with liburcu's `rcu_head` embedded in the object.

use crate::primitive::{AtomicPtr, CachePadded, spin_yield};
use std::panic::Location;
use std::sync::atomic::Ordering;

/// The type-erased part of every queued callback.
#[repr(C)]
pub(crate) struct Header {
    next: AtomicPtr<Header>,
    /// Consumes the node: runs the closure (`run == true`) or only drops it.
    consume: unsafe fn(*mut Header, run: bool),
    /// Where `call_rcu` was called.
    pub(crate) site: &'static Location<'static>,
    /// A human label for the site, or "".
    pub(crate) label: &'static str,
    /// When `call_rcu` was called ([`crate::clock`] stamp).
    pub(crate) queued_at: u64,
}

/// A header and what it carries: a closure, or a value to drop.
#[repr(C)]
pub(crate) struct Node<F> {
    header: Header,
    f: F,
}

impl<T> Node<T> {
    /// A new node holding `value`, in no queue; free it with
    /// [`Node::free`] or hand it to [`Queue::push_drop`].
    pub(crate) fn boxed(value: T) -> *mut Node<T> {
        Box::into_raw(Box::new(Node {
            header: Self::header(),
            f: value,
        }))
    }

    /// A new node holding what `make` returns, as [`Node::boxed`]. The node
    /// is allocated first and `make` returns straight into it, so a large
    /// value is not built on the stack and then copied. If `make` panics,
    /// the process aborts (see [`build`]).
    #[inline]
    pub(crate) fn boxed_with(make: impl FnOnce() -> T) -> *mut Node<T> {
        let mut node = Box::<Node<T>>::new_uninit();
        let p = node.as_mut_ptr();
        // SAFETY: only computes the field's address in the allocation
        // `node` owns, which is laid out for a `Node<T>`.
        let header = unsafe { &raw mut (*p).header };
        // SAFETY: the header of the uninitialised node is written once,
        // through a raw pointer (no reference to uninitialised memory).
        unsafe { header.write(Self::header()) };
        // SAFETY: the same for the value. `build` never unwinds, so no one
        // sees a half-written node.
        unsafe { Self::value(p).write(build(make)) };
        // SAFETY: both fields were written just above.
        Box::into_raw(unsafe { node.assume_init() })
    }

    /// The header of a node in no queue.
    fn header() -> Header {
        Header {
            next: AtomicPtr::new(std::ptr::null_mut()),
            consume: drop_value::<T>,
            site: Location::caller(),
            label: "",
            queued_at: 0,
        }
    }

    /// The value inside `node`. The pointer is valid as long as the node.
    pub(crate) fn value(node: *mut Node<T>) -> *mut T {
        // SAFETY: only computes the field's address (no reference to the
        // node is made, so readers of the value are not aliased), and
        // `node` points at a live node by the caller's use of it.
        unsafe { &raw mut (*node).f }
    }

    /// Drops the value and frees the node.
    ///
    /// # Safety
    /// `node` comes from [`Node::boxed`] or [`Node::boxed_with`], is owned
    /// by the caller, is in no queue, and is not used afterwards.
    pub(crate) unsafe fn free(node: *mut Node<T>) {
        // SAFETY: per the contract, a Box pointer owned by the caller.
        drop(unsafe { Box::from_raw(node) });
    }
}

/// Calls `make` in a function that cannot unwind: a panic in `make` aborts
/// the process, with a message saying why.
///
/// This is what lets a large value be built in its heap node. A function
/// returning a large value writes it through a pointer its caller passes;
/// LLVM passes the node's address there only if the call cannot unwind
/// (otherwise a half-written node could be seen after the unwind), and
/// builds the value on the stack and copies it otherwise. Seen with rustc
/// 1.95 for `[u64; 512]`: one 4 KiB copy per replace without this.
#[inline(never)]
#[allow(improper_ctypes_definitions)] // Called from Rust only.
extern "C" fn build<T, F: FnOnce() -> T>(make: F) -> T {
    /// Dropped only while `make` unwinds: says why and aborts (the unwind
    /// would otherwise end in Rust's own abort at this function's edge,
    /// which does not say).
    struct Unwinding;
    impl Drop for Unwinding {
        fn drop(&mut self) {
            crate::fatal::abort_with(&[
                b"rcu: the closure given to RcuCell::replace_with panicked; \
                  a value built in place cannot be abandoned half-built: aborting\n",
            ]);
        }
    }
    let armed = Unwinding;
    let value = make();
    std::mem::forget(armed);
    value
}

/// A callback taken off the queue, owned by the consumer.
pub(crate) struct Callback {
    node: *mut Header,
}

// SAFETY: a Callback owns its node exclusively, and the closure inside is
// `Send` (enforced by `Queue::push`).
unsafe impl Send for Callback {}

impl Callback {
    pub(crate) fn header(&self) -> &Header {
        // SAFETY: the node is live and owned by this Callback until consumed.
        unsafe { &*self.node }
    }

    /// Runs the closure, consuming the callback. A panic in the closure
    /// propagates to the caller after the node is freed.
    pub(crate) fn run(self) {
        let node = self.node;
        std::mem::forget(self);
        // SAFETY: `node` is owned (forgotten above, so consumed once) and its
        // `consume` function was set for its real type by `push`.
        unsafe { consume_node(node, true) };
    }
}

impl Drop for Callback {
    fn drop(&mut self) {
        // SAFETY: as in `run`; dropping without running frees the node and
        // drops the closure.
        unsafe { consume_node(self.node, false) };
    }
}

/// Runs or drops the node's closure and frees the node.
///
/// # Safety
/// `node` must be a live node from `Queue::push`, owned by the caller, and
/// not used afterwards.
unsafe fn consume_node(node: *mut Header, run: bool) {
    // SAFETY: the caller guarantees `node` is live.
    let consume = unsafe { (*node).consume };
    // SAFETY: `consume` was monomorphised for this node's closure type, and
    // the caller hands over ownership.
    unsafe { consume(node, run) };
}

unsafe fn consume<F: FnOnce()>(p: *mut Header, run: bool) {
    // SAFETY: `p` was produced by `Box::into_raw(Box<Node<F>>)` in `push`
    // for this very `F` (the function pointer is monomorphised with it), and
    // Header is the first field of the repr(C) Node.
    let node = unsafe { Box::from_raw(p.cast::<Node<F>>()) };
    let f = node.f;
    if run {
        f();
    }
}

/// `consume` of a node from [`Node::boxed`] or [`Node::boxed_with`]: drops
/// the value, run or not.
unsafe fn drop_value<T>(p: *mut Header, _run: bool) {
    // SAFETY: `p` was produced by `Node::<T>::boxed` or `boxed_with` for
    // this very `T` (the function pointer is monomorphised with it), and
    // Header is the first field of the repr(C) Node.
    drop(unsafe { Box::from_raw(p.cast::<Node<T>>()) });
}

unsafe fn consume_stub(_p: *mut Header, _run: bool) {}

/// Multi-producer, single-consumer queue of callbacks.
pub(crate) struct Queue {
    /// Only the consumer reads and writes `head`; an atomic keeps the type
    /// `Sync` without unsafe code. Producers write `tail`: separate lines.
    head: CachePadded<AtomicPtr<Header>>,
    tail: CachePadded<AtomicPtr<Header>>,
    stub: *mut Header,
}

// SAFETY: all shared mutation goes through atomics; `stub` is an owned
// allocation freed only in Drop.
unsafe impl Send for Queue {}
// SAFETY: as above; the consumer-only operations are documented as such.
unsafe impl Sync for Queue {}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue").finish_non_exhaustive()
    }
}

impl Queue {
    pub(crate) fn new() -> Self {
        let stub = Box::into_raw(Box::new(Header {
            next: AtomicPtr::new(std::ptr::null_mut()),
            consume: consume_stub,
            site: Location::caller(),
            label: "",
            queued_at: crate::clock::now(),
        }));
        Self {
            head: CachePadded(AtomicPtr::new(stub)),
            tail: CachePadded(AtomicPtr::new(stub)),
            stub,
        }
    }

    /// Appends a callback. Wait-free: one swap and one store. Callable from
    /// any thread, including from a callback.
    pub(crate) fn push<F: FnOnce() + Send + 'static>(
        &self,
        f: F,
        site: &'static Location<'static>,
        label: &'static str,
    ) {
        let node = Box::into_raw(Box::new(Node {
            header: Header {
                next: AtomicPtr::new(std::ptr::null_mut()),
                consume: consume::<F>,
                site,
                label,
                queued_at: crate::clock::now(),
            },
            f,
        }));
        self.link(node.cast::<Header>());
    }

    /// Appends `node`, whose value is dropped when the callback runs (or is
    /// dropped). Wait-free, and allocates nothing.
    ///
    /// # Safety
    /// `node` comes from [`Node::boxed`] or [`Node::boxed_with`], is owned
    /// by the caller (no other thread writes it; readers may still read its
    /// value) and is in no queue; the queue owns it afterwards.
    pub(crate) unsafe fn push_drop<T: Send>(
        &self,
        node: *mut Node<T>,
        site: &'static Location<'static>,
        label: &'static str,
    ) {
        // SAFETY: only computes the field's address of a live node (no
        // reference is made, so readers of the value beside it are not
        // aliased).
        let header = unsafe { &raw mut (*node).header };
        // SAFETY: the header is the caller's to write (per the contract).
        unsafe {
            header.write(Header {
                next: AtomicPtr::new(std::ptr::null_mut()),
                consume: drop_value::<T>,
                site,
                label,
                queued_at: crate::clock::now(),
            });
        }
        self.link(node.cast::<Header>());
    }

    fn link(&self, node: *mut Header) {
        // Make the node the tail; until the previous tail points at it, the
        // consumer finds a null `next` there and waits (`pop_wait`).
        let prev = self.tail.swap(node, Ordering::AcqRel);
        // SAFETY: `prev` is a node in the queue (or the stub): the consumer
        // frees a node only after following its non-null `next`, and `prev`'s
        // `next` is still null, so it is live.
        unsafe { (*prev).next.store(node, Ordering::Release) };
    }

    /// Takes the oldest callback, if one is fully linked. Consumer only.
    fn try_pop(&self) -> Option<Callback> {
        loop {
            let node = self.head.load(Ordering::Relaxed);
            // SAFETY: `head` is always a live node (consumer-owned position).
            let next = unsafe { (*node).next.load(Ordering::Acquire) };
            if next.is_null() {
                return None;
            }
            self.head.store(next, Ordering::Relaxed);
            if node == self.stub {
                // Put the stub back at the end so the last real node can be
                // taken, then try again.
                // SAFETY: the stub is no longer reachable from `head`, so its
                // `next` may be reset before it is re-linked.
                unsafe { (*node).next.store(std::ptr::null_mut(), Ordering::Relaxed) };
                self.link(node);
                continue;
            }
            return Some(Callback { node });
        }
    }

    /// Takes the oldest callback, waiting for it if a producer has counted
    /// it but not yet linked it (a window of a few instructions). Consumer
    /// only; call it only when a callback is known to be queued.
    pub(crate) fn pop_wait(&self) -> Callback {
        let mut spins = 0u32;
        loop {
            if let Some(cb) = self.try_pop() {
                return cb;
            }
            spins = spins.saturating_add(1);
            if cfg!(not(loom)) && spins < 64 {
                std::hint::spin_loop();
            } else {
                spin_yield();
            }
        }
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        while let Some(cb) = self.try_pop() {
            drop(cb);
        }
        // SAFETY: the stub was allocated in `new` and, the queue being
        // dropped, nothing else references it.
        drop(unsafe { Box::from_raw(self.stub) });
    }
}
