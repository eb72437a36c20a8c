//! Support for the integration tests: finding the guest kit, requiring KVM,
//! tiny assembly guests on bare VMs, and recording test devices.
//!
//! The tests themselves are in `tests/tests/` (KVM mechanics with tiny
//! guests) and `vmm/tests/` (end-to-end runs of the `vmm` binary, which only
//! that package's tests can build and locate).

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test support: failing loudly is the point.

pub mod bare_vm;
pub mod guest_code;
pub mod kit;
pub mod recorder;
pub mod vmm_process;

/// Panics (fails the test) if `/dev/kvm` cannot be opened: tests that need
/// KVM never skip silently.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs /dev/kvm, which cannot be opened: {e}");
    }
}
