//! Notices panics on any thread of the test process, vCPU threads included.
//!
//! [`install`] puts a hook in front of the current panic hook that records
//! every panic (thread name and message) and then calls the hook it
//! replaced. The VMM replaces the process's hook with its own the first
//! time it runs a VM under seccomp filters (its hook prints no backtrace,
//! which the filters would forbid), dropping ours: call [`install`] again
//! once a VM runs. Installing more than once is harmless: a panic is
//! recorded once however many watch hooks are chained.
//!
//! The VMM also stops the VM with a fatal error when a vCPU thread panics;
//! tests check both.

use std::cell::Cell;
use std::sync::Mutex;

static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

thread_local! {
    /// Set while this thread's panic is being recorded.
    static RECORDING: Cell<bool> = const { Cell::new(false) };
}

/// Puts the recording hook in front of the current hook.
pub fn install() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let outermost = !RECORDING.with(|r| r.replace(true));
        if outermost {
            let thread = std::thread::current()
                .name()
                .unwrap_or("<unnamed>")
                .to_string();
            let text = format!("thread '{thread}': {info}");
            PANICS
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(text);
        }
        previous(info);
        if outermost {
            RECORDING.with(|r| r.set(false));
        }
    }));
}

/// Every panic recorded since the first [`install`], oldest first.
pub fn panics() -> Vec<String> {
    PANICS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}
