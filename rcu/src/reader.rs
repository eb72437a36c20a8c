//! The read side: per-thread registration, `read_lock`/`ReadGuard`.
//!
//! Each thread that reads gets a [`Slot`] in the global domain the first time
//! it calls [`read_lock`]. The slot pointer, the nesting depth and whether this
//! thread must fence live in a `const` thread-local without a destructor, so
//! the fast path is a few plain loads and stores. Unregistration is tied to a
//! `pthread` key destructor, which glibc runs after all Rust thread-local
//! destructors: a thread-local destructor that still reads is covered, and a
//! slot is removed from the registry exactly when its thread goes away.

use crate::domain::Slot;
use crate::global::DOMAIN;
use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::{Arc, OnceLock};

/// How a thread's read sections pay for their ordering against grace periods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReaderMode {
    /// Compiler fences only; grace periods put the barrier on this thread with
    /// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which interrupts every
    /// CPU running a thread of the process. The default. Falls back to
    /// `Fenced` behaviour when the kernel lacks membarrier.
    Membarrier,
    /// A full fence on entering and on leaving the outermost section (a few
    /// ns each); grace periods never need to interrupt this thread. Meant for
    /// threads that must not be interrupted, such as vCPU threads inside
    /// `KVM_RUN`: if every other reader of the process is `Fenced` too, grace
    /// periods send no inter-processor interrupts at all.
    Fenced,
}

struct Local {
    slot: Cell<*const Slot>,
    depth: Cell<u32>,
    /// Whether lock/unlock execute real fences.
    fence: Cell<bool>,
    fenced_mode: Cell<bool>,
}

thread_local! {
    // `const` and free of drop glue: never lazily initialised, never
    // destroyed, so it is usable from any destructor until the thread's
    // storage is freed.
    static LOCAL: Local = const {
        Local {
            slot: Cell::new(std::ptr::null()),
            depth: Cell::new(0),
            fence: Cell::new(true),
            fenced_mode: Cell::new(false),
        }
    };
}

/// Proof that the current thread is inside an RCU read-side critical section.
///
/// While a `ReadGuard` lives, every object that was reachable through an
/// [`RcuCell`](crate::RcuCell) (or any pointer freed with
/// [`call_rcu`](crate::call_rcu)) when the guard was taken stays valid: grace
/// periods wait for the guard to drop. Guards nest; only the outermost pair
/// does any work. A guard cannot leave its thread (`!Send`).
///
/// Leaking a guard (with `mem::forget`) keeps the thread inside its section
/// until the thread exits, blocking grace periods until then.
#[must_use = "the read section ends when the guard is dropped"]
#[derive(Debug)]
pub struct ReadGuard {
    _not_send: PhantomData<*const ()>,
}

/// Enters an RCU read-side critical section on the calling thread.
///
/// Any thread may call it; the first call registers the thread (allocating its
/// slot once), and the registration is undone when the thread exits. After
/// that, entering and leaving a section takes no lock, performs no atomic
/// read-modify-write and allocates nothing. Sections nest.
#[inline]
pub fn read_lock() -> ReadGuard {
    LOCAL.with(|l| {
        let depth = l.depth.get();
        if depth == 0 {
            let mut slot = l.slot.get();
            if slot.is_null() {
                slot = register(l);
            }
            // SAFETY: a non-null `slot` came from `Arc::into_raw` in
            // `register` and that reference is released only by the thread
            // exit destructor, which also nulls the pointer first.
            DOMAIN.reader_enter(unsafe { &*slot }, l.fence.get());
        }
        l.depth.set(depth + 1);
    });
    ReadGuard {
        _not_send: PhantomData,
    }
}

impl Drop for ReadGuard {
    #[inline]
    fn drop(&mut self) {
        LOCAL.with(|l| {
            let depth = l.depth.get() - 1;
            l.depth.set(depth);
            if depth == 0 {
                // SAFETY: this thread is inside a section, so it registered
                // and its slot pointer is live (see `read_lock`).
                DOMAIN.reader_exit(unsafe { &*l.slot.get() }, l.fence.get());
            }
        });
    }
}

/// Whether the calling thread is inside a read-side critical section.
pub fn in_read_section() -> bool {
    LOCAL.with(|l| l.depth.get() > 0)
}

/// The calling thread's slot, if it registered (for `synchronize_rcu`).
pub(crate) fn current_slot() -> Option<&'static Slot> {
    let p = LOCAL.with(|l| l.slot.get());
    // SAFETY: see `read_lock`; the reference is used only while the thread
    // runs, before its exit destructor.
    (!p.is_null()).then(|| unsafe { &*p })
}

/// Sets how the calling thread's read sections are ordered against grace
/// periods (see [`ReaderMode`]). Registers the thread if needed. Blocks until
/// a grace period in progress has finished.
///
/// # Panics
/// If called inside a read-side critical section.
pub fn set_reader_mode(mode: ReaderMode) {
    assert!(
        !in_read_section(),
        "rcu::set_reader_mode() called inside an RCU read-side critical section"
    );
    LOCAL.with(|l| {
        let fenced = mode == ReaderMode::Fenced;
        l.fenced_mode.set(fenced);
        let slot = if l.slot.get().is_null() {
            register(l)
        } else {
            l.slot.get()
        };
        // SAFETY: see `read_lock`.
        DOMAIN.set_fenced(unsafe { &*slot }, fenced);
        l.fence.set(fenced || !DOMAIN.membarrier_enabled());
    });
}

/// The calling thread's reader mode.
pub fn reader_mode() -> ReaderMode {
    if LOCAL.with(|l| l.fenced_mode.get()) {
        ReaderMode::Fenced
    } else {
        ReaderMode::Membarrier
    }
}

#[cold]
#[inline(never)]
fn register(l: &Local) -> *const Slot {
    crate::global::init();
    let fenced = l.fenced_mode.get();
    let slot = DOMAIN.register(fenced);
    l.fence.set(fenced || !DOMAIN.membarrier_enabled());
    let raw = Arc::into_raw(slot);
    l.slot.set(raw);
    // SAFETY: the key was created by `exit_key`, and the value is a pointer
    // that the key's destructor turns back into the Arc.
    let rc = unsafe { libc::pthread_setspecific(exit_key(), raw.cast()) };
    if rc != 0 {
        // Without the destructor the slot would stay registered after the
        // thread exits; a leaked guard would then block grace periods
        // forever. This only fails on memory exhaustion.
        eprintln!("rcu: pthread_setspecific failed ({rc}); aborting");
        std::process::abort();
    }
    raw
}

/// The process-wide key whose destructor unregisters an exiting thread.
fn exit_key() -> libc::pthread_key_t {
    static KEY: OnceLock<libc::pthread_key_t> = OnceLock::new();
    *KEY.get_or_init(|| {
        let mut key: libc::pthread_key_t = 0;
        // SAFETY: `key` is a valid out-pointer and `unregister_on_exit` has
        // the destructor signature pthread expects.
        let rc = unsafe { libc::pthread_key_create(&mut key, Some(unregister_on_exit)) };
        if rc != 0 {
            eprintln!("rcu: pthread_key_create failed ({rc}); aborting");
            std::process::abort();
        }
        key
    })
}

/// Runs when a registered thread exits (after its Rust thread-locals have
/// been destroyed): removes its slot from the registry and ends any section
/// it leaked.
unsafe extern "C" fn unregister_on_exit(p: *mut libc::c_void) {
    // SAFETY: pthread passes back the value stored by `register`, which came
    // from `Arc::into_raw` and is consumed exactly once, here.
    let slot = unsafe { Arc::from_raw(p.cast_const().cast::<Slot>()) };
    LOCAL.with(|l| {
        l.slot.set(std::ptr::null());
        l.depth.set(0);
    });
    DOMAIN.unregister(&slot);
}
