//! Pointing this process's standard error (descriptor 2) somewhere a test
//! can read, so that it can look at what the VMM's real logger printed.
//!
//! Descriptor 2 is process-wide: a test binary that redirects it should hold
//! one test only (or run its tests one at a time), and install the VMM's
//! logger (`vmm::logger::init`) only after redirecting, as `main` does.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Descriptor 2 redirected; the original comes back when this is dropped.
#[derive(Debug)]
pub struct StderrRedirect {
    saved: OwnedFd,
}

impl StderrRedirect {
    /// Makes descriptor 2 a duplicate of `target` (which the caller keeps).
    pub fn to(target: &impl AsRawFd) -> Self {
        // SAFETY: dup(2) of descriptor 2, which is open in every test
        // process; the new descriptor is owned by `saved` alone.
        let saved = unsafe { libc::dup(2) };
        assert!(saved >= 0, "dup(2): {}", std::io::Error::last_os_error());
        // SAFETY: `saved` is a descriptor this function just created and
        // nothing else owns.
        let saved = unsafe { OwnedFd::from_raw_fd(saved) };
        // SAFETY: dup2 onto descriptor 2 only replaces what stderr points
        // to; `target` is open (borrowed for the call).
        let rc = unsafe { libc::dup2(target.as_raw_fd(), 2) };
        assert!(rc == 2, "dup2: {}", std::io::Error::last_os_error());
        Self { saved }
    }
}

impl Drop for StderrRedirect {
    fn drop(&mut self) {
        // SAFETY: puts the saved stderr back on descriptor 2; `saved` stays
        // open until after the call.
        unsafe { libc::dup2(self.saved.as_raw_fd(), 2) };
    }
}

/// Removes `VMM_LOG` from the environment, so that the VMM's logger runs at
/// its default level (a user's `VMM_LOG=debug` would change what a test
/// sees). Call it first thing in a test binary's only test.
pub fn default_log_level() {
    // SAFETY: called by a test binary's only test before it starts any
    // thread of its own; libtest's threads do not read the environment.
    unsafe { std::env::remove_var("VMM_LOG") };
}
