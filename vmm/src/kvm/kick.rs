//! Getting a vCPU thread out of `KVM_RUN`.
//!
//! A kick is a real-time signal sent to the vCPU thread. Its handler sets
//! `kvm_run.immediate_exit` through a thread-local pointer, so a kick that
//! lands after the thread last checked for requests but before it entered
//! `KVM_RUN` is not lost: `KVM_RUN` then returns `EINTR` at once. (Firecracker
//! and, since 2025, Cloud Hypervisor do the same; a kick without it can hang a
//! pause forever.)

use std::cell::Cell;
use std::sync::Once;
use thiserror::Error;
use vmm_sys_util::signal::{Killable, register_signal_handler};

/// Errors installing the kick handler.
#[derive(Debug, Error)]
pub enum KickError {
    /// `sigaction` failed.
    #[error("cannot install the vCPU kick signal handler")]
    Install(#[source] vmm_sys_util::errno::Error),
}

thread_local! {
    /// The calling vCPU thread's `kvm_run.immediate_exit` byte, or null.
    /// `const` and without drop glue: safe to touch from a signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used for kicks.
pub(crate) fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = IMMEDIATE_EXIT.with(Cell::get);
    if !p.is_null() {
        // SAFETY: the pointer was set by this thread to its own vCPU's
        // kvm_run mapping, which lives until `clear_thread_vcpu`; a single
        // byte store is async-signal-safe.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

/// Installs the process-wide kick handler (idempotent).
pub(crate) fn install_handler() -> Result<(), KickError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick).map_err(KickError::Install);
    });
    result
}

/// Registers the calling thread's `kvm_run.immediate_exit` byte for kicks.
///
/// # Safety
/// `immediate_exit` must point into the calling thread's vCPU `kvm_run`
/// mapping and stay valid until [`clear_thread_vcpu`] is called on this
/// thread.
pub(crate) unsafe fn set_thread_vcpu(immediate_exit: *mut u8) {
    IMMEDIATE_EXIT.with(|c| c.set(immediate_exit));
}

/// Whether the calling thread is a vCPU thread that was kicked (a pause,
/// reset or stop was asked of it) since it last came out of `KVM_RUN`: its
/// `immediate_exit` is set. For test devices that must hold a guest access
/// until the vCPU running it has been asked to stop running the guest.
#[cfg(any(test, feature = "test-utils"))]
pub fn this_vcpu_was_kicked() -> bool {
    let p = IMMEDIATE_EXIT.with(Cell::get);
    // SAFETY: a non-null pointer was set by this thread to its own vCPU's
    // kvm_run mapping, which lives until `clear_thread_vcpu`; a one-byte
    // volatile read races at worst with this thread's own signal handler.
    !p.is_null() && unsafe { std::ptr::read_volatile(p) } != 0
}

/// Forgets the calling thread's vCPU (before the vCPU is dropped).
pub(crate) fn clear_thread_vcpu() {
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
}

/// Sends a kick to `thread`. Harmless if the thread is not in `KVM_RUN`.
pub(crate) fn kick<T>(thread: &std::thread::JoinHandle<T>) {
    // The thread may already have exited: then there is nothing to kick.
    let _ = thread.kill(kick_signal());
}
