//! The read side: per-thread registration, `read_lock`/`ReadGuard`.
//!
//! Each thread's [`Slot`] is a `const` thread-local without drop glue, so
//! `read_lock` reaches its word at a fixed offset from the thread pointer (no
//! load of a slot pointer) and the reader mode is a bit of that same word (no
//! load of a mode flag). The first `read_lock` of a thread finds the word
//! marked unregistered and registers it in the global domain.
//!
//! Unregistration is tied to a `pthread` key destructor, which glibc runs
//! after all Rust thread-local destructors (a thread-local destructor that
//! still reads is covered; one that reads after this destructor ran
//! registers again). The slot's memory lives until the thread's storage is
//! freed, after every destructor; grace periods touch it only under the
//! registry lock, which unregistration takes.
//!
//! A thread that exits inside a read section (it leaked a guard) aborts the
//! process with a message naming it: ending the section for it could free
//! memory that a reference it sent elsewhere still points to, and keeping it
//! registered would stall every grace period, and so every `call_rcu`
//! callback and `synchronize_rcu` caller, forever.

use crate::domain::Slot;
use crate::global::DOMAIN;
use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::OnceLock;

/// How a thread's read sections pay for their ordering against grace periods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReaderMode {
    /// Compiler fences only; grace periods put the barrier on this thread with
    /// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which interrupts every
    /// CPU running a thread of the process. The default. Falls back to
    /// `Fenced` behaviour when the kernel lacks membarrier.
    Membarrier,
    /// A full barrier on entering and on leaving the outermost section (on
    /// x86-64 a locked exchange of the reader's word, a few ns each); grace
    /// periods never need to interrupt this thread. Meant for
    /// threads that must not be interrupted, such as vCPU threads inside
    /// `KVM_RUN`: if every other reader of the process is `Fenced` too, grace
    /// periods send no inter-processor interrupts at all.
    Fenced,
}

thread_local! {
    // `const` and free of drop glue: never lazily initialised, never
    // destroyed, so it is usable from any destructor (and signal handler)
    // until the thread's storage is freed.
    static SLOT: Slot = const { Slot::unregistered() };
    /// The mode the thread asked for (kept across re-registration).
    static FENCED_MODE: Cell<bool> = const { Cell::new(false) };
}

/// Proof that the current thread is inside an RCU read-side critical section.
///
/// While a `ReadGuard` lives, every object that was reachable through an
/// [`RcuCell`](crate::RcuCell) (or any pointer freed with
/// [`call_rcu`](crate::call_rcu)) when the guard was taken stays valid: grace
/// periods wait for the guard to drop. Guards nest; only the outermost pair
/// does any work. A guard cannot leave its thread (`!Send`).
///
/// Only dropping a guard ends a section. Leaking one (`mem::forget`,
/// `Box::leak`) keeps the thread inside its section, blocking grace periods;
/// if the thread then exits, the process aborts with a message naming it.
#[must_use = "the read section ends when the guard is dropped"]
#[derive(Debug)]
pub struct ReadGuard {
    _not_send: PhantomData<*const ()>,
}

/// Enters an RCU read-side critical section on the calling thread.
///
/// Any thread may call it; the first call registers the thread (allocating
/// its registry entry once). After that, entering and leaving a section
/// takes no lock, performs no atomic read-modify-write and allocates nothing,
/// and is async-signal-safe: a signal handler may take a section, also one
/// nested in (or interrupting the start or end of) the thread's own section.
/// The registration itself is not: a thread must take its first section (or
/// call [`set_reader_mode`]) outside a signal handler. Sections nest, up to
/// 2^20 - 1 deep (deeper aborts).
#[inline]
pub fn read_lock() -> ReadGuard {
    SLOT.with(|s| {
        if !DOMAIN.reader_enter(s) {
            register_and_enter(s);
        }
    });
    ReadGuard {
        _not_send: PhantomData,
    }
}

#[cold]
#[inline(never)]
fn register_and_enter(s: &Slot) {
    register(s);
    if !DOMAIN.reader_enter(s) {
        crate::fatal::abort_with(&[b"rcu: reader slot still unregistered after registration\n"]);
    }
}

impl Drop for ReadGuard {
    #[inline]
    fn drop(&mut self) {
        SLOT.with(|s| DOMAIN.reader_exit(s));
    }
}

/// Whether the calling thread is inside a read-side critical section.
pub fn in_read_section() -> bool {
    SLOT.with(Slot::in_section)
}

/// Runs `f` with the calling thread's slot, if it registered (so that grace
/// periods it runs do not wait for, or send barriers to, itself).
pub(crate) fn with_current_slot<R>(f: impl FnOnce(Option<&Slot>) -> R) -> R {
    SLOT.with(|s| {
        let registered =
            s.ctr.load(std::sync::atomic::Ordering::Relaxed) & crate::domain::UNREGISTERED == 0;
        f(registered.then_some(s))
    })
}

/// The calling thread's slot, if it registered, as a `'static` reference.
///
/// # Safety
/// The calling thread must never exit (its slot is a thread-local), and the
/// reference must not leave it. For the call_rcu thread.
pub(crate) unsafe fn current_slot_forever() -> Option<&'static Slot> {
    with_current_slot(|s| {
        s.map(|s| {
            let p: *const Slot = s;
            // SAFETY: the thread's storage lives as long as the thread, which
            // never exits (the caller's contract).
            unsafe { &*p }
        })
    })
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
    let fenced = mode == ReaderMode::Fenced;
    FENCED_MODE.with(|m| m.set(fenced));
    SLOT.with(|s| {
        if s.ctr.load(std::sync::atomic::Ordering::Relaxed) & crate::domain::UNREGISTERED != 0 {
            register(s);
        } else {
            DOMAIN.set_fenced(s, fenced || !DOMAIN.membarrier_enabled());
        }
    });
}

/// The calling thread's reader mode.
pub fn reader_mode() -> ReaderMode {
    if FENCED_MODE.with(Cell::get) {
        ReaderMode::Fenced
    } else {
        ReaderMode::Membarrier
    }
}

/// Registers the calling thread's slot `s` in the global domain.
fn register(s: &Slot) {
    crate::global::init();
    let fenced = FENCED_MODE.with(Cell::get) || !DOMAIN.membarrier_enabled();
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("unnamed");
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    let p: *const Slot = s;
    // SAFETY: `s` is this thread's slot, unregistered (callers check), and
    // lives until the thread's storage is freed, after the key destructor
    // below has unregistered it (or aborted the process).
    unsafe { DOMAIN.register(p, fenced, format!("{name} (tid {tid})")) };
    // SAFETY: the key was created by `exit_key`; the value is only used as a
    // non-null marker that makes the destructor run, and to find the slot.
    let rc = unsafe { libc::pthread_setspecific(exit_key(), p.cast()) };
    if rc != 0 {
        // Without the destructor, the slot would stay registered after its
        // memory is freed. This only fails on memory exhaustion.
        crate::fatal::abort_with(&[b"rcu: pthread_setspecific failed; aborting\n"]);
    }
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
            crate::fatal::abort_with(&[b"rcu: pthread_key_create failed; aborting\n"]);
        }
        key
    })
}

/// Runs when a registered thread exits (after its Rust thread-locals have
/// been destroyed): removes its slot from the registry, or aborts if the
/// thread is still inside a read section.
unsafe extern "C" fn unregister_on_exit(p: *mut libc::c_void) {
    // SAFETY: pthread passes back the value stored by `register`: this
    // thread's slot, whose storage outlives every key destructor.
    let slot = unsafe { &*p.cast_const().cast::<Slot>() };
    if let Err(e) = DOMAIN.unregister(slot) {
        crate::fatal::abort_with(&[
            b"rcu: thread '",
            e.name.as_bytes(),
            b"' exited inside an RCU read-side critical section (a ReadGuard was \
              leaked); ending the section could free memory still referenced, so \
              the process aborts\n",
        ]);
    }
}
