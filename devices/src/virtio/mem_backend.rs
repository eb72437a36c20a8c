//! The host side of virtio-mem: making guest-physical ranges accessible or not.
//!
//! The device model ([`VirtioMem`](super::VirtioMem)) decides which blocks the guest may
//! use; a [`MemoryBackend`], implemented by the VMM, does the memory work: mapping host
//! memory and adding KVM memory slots on plug, removing them or discarding pages on
//! unplug, and publishing the new guest memory map.

use std::error::Error;

use thiserror::Error;

/// A backend failure, wrapping the VMM's own error.
#[derive(Debug, Error)]
#[error("memory backend failed")]
pub struct MemoryBackendError(
    /// The VMM's error.
    #[source]
    pub Box<dyn Error + Send + Sync>,
);

impl MemoryBackendError {
    /// Wraps `err`.
    pub fn new(err: impl Into<Box<dyn Error + Send + Sync>>) -> MemoryBackendError {
        MemoryBackendError(err.into())
    }
}

/// Makes guest-physical ranges of a virtio-mem region accessible to the guest or not.
///
/// Contract the device relies on:
/// - Calls come from the thread that processes the device's queue or calls
///   [`VirtioMem::system_reset`](super::VirtioMem::system_reset) (the VMM's control
///   thread), one at a time, while the device holds its own lock: an implementation must
///   not call back into the device, and must not wait for an RCU grace period (vCPU
///   threads may be waiting for the device's lock inside read sections).
/// - `gpa` and `len` are multiples of the device's block size, `len > 0`, and the range
///   lies inside the device region. The device never plugs a range that has a plugged
///   block, nor unplugs one that has an unplugged block.
/// - Each call is all or nothing: on `Ok` the whole range changed state; on `Err` none
///   of it did (the device answers the guest BUSY and keeps its bitmap).
/// - When [`plug`](MemoryBackend::plug) returns `Ok`, the range is guest-accessible
///   (the device writes the response only afterwards). After
///   [`unplug`](MemoryBackend::unplug) returns `Ok`, the guest may no longer use the
///   range; the host may reclaim it whenever it likes.
pub trait MemoryBackend: Send + Sync {
    /// Backs `[gpa, gpa + len)` with memory and makes it guest-accessible.
    fn plug(&self, gpa: u64, len: u64) -> Result<(), MemoryBackendError>;

    /// Takes `[gpa, gpa + len)` away from the guest and releases its memory.
    fn unplug(&self, gpa: u64, len: u64) -> Result<(), MemoryBackendError>;

    /// Whether the device may write `[gpa, gpa + len)` through the guest memory map it
    /// was given for the current batch of requests. A backend that makes unplugged
    /// memory read-only answers `false` for ranges that touch it, and the device then
    /// breaks instead of writing (a write would fault). Ranges outside the region are
    /// not the backend's business: it answers `true`. Called on the same thread and
    /// under the same lock as [`plug`](MemoryBackend::plug); the default answers `true`.
    fn writable(&self, gpa: u64, len: u64) -> bool {
        let _ = (gpa, len);
        true
    }
}
