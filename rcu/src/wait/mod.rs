//! Blocking primitives for the grace-period and call_rcu protocols.
//!
//! Both types are futex-based (no allocation, `const` constructible in normal
//! builds, no syscall on the uncontended paths). Under `--cfg loom` the same
//! state machines run on loom's atomics, and the futex system call is
//! replaced by a model of it (`futex_model.rs`), so the loom models check the
//! production wake-up protocols, not stand-ins.
//!
//! The interface both share is [`Signal`]: the call_rcu thread's wake-up
//! strategy is a choice between the two implementations.

mod event;
#[cfg(not(loom))]
mod futex;
#[cfg(loom)]
#[path = "futex_model.rs"]
mod futex;
mod semaphore;

pub(crate) use event::Event;
#[cfg(all(loom, test))]
pub(crate) use futex::allow_spurious_wakeups;
pub(crate) use semaphore::Semaphore;

use std::time::Duration;

/// A wake-up signal between threads, as the call_rcu thread uses one.
///
/// `notify` never blocks and may be called from any thread; `wait` and
/// `wait_timeout` are called by the thread being woken.
pub(crate) trait Signal: Send + Sync {
    /// Makes a current or future `wait` return.
    fn notify(&self);
    /// Blocks until notified.
    fn wait(&self);
    /// Blocks until notified or until `timeout` passes; returns whether it was
    /// notified. Under loom the timer is modelled as expiring at once: the call
    /// returns `true` only if a notification is already pending.
    fn wait_timeout(&self, timeout: Duration) -> bool;
}

/// A wait's deadline has passed.
struct Expired;

/// How long a wait may still sleep: without limit when it has no deadline,
/// the time left before its deadline, or `Expired` once that has passed.
fn time_left(deadline: Option<futex::Deadline>) -> Result<Option<Duration>, Expired> {
    deadline.map(|d| d.remaining().ok_or(Expired)).transpose()
}
