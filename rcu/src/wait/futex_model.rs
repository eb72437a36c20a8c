//! The futex system call, modelled for `loom` (`--cfg loom` builds only).
//!
//! Same interface as `futex.rs`, so the production [`Event`](super::Event)
//! and [`Semaphore`](super::Semaphore) state machines run unchanged in the
//! models. What the kernel guarantees, and how it is modelled:
//!
//! * **The value check is atomic with respect to wakes.** The kernel reads
//!   `*word` under the futex hash-bucket lock and queues the waiter before
//!   dropping it; a waker takes the same lock to dequeue. Here one loom
//!   `Mutex` (a per-execution `lazy_static`) stands for every bucket: `wait`
//!   reads `*word` and queues itself under it, `wake` dequeues under it.
//!   The kernel has a full barrier on each side (`smp_mb()` in
//!   `futex_q_lock()` and before the waker's check of waiters,
//!   `kernel/futex/waitwake.c`); the model uses a `SeqCst` load under the lock
//!   and a `SeqCst` fence before `wake` takes it.
//! * **Spurious wake-ups**, where a model asks for them
//!   ([`allow_spurious_wakeups`]; the `Event` and `Semaphore` models do):
//!   each thread then sleeps on a `loom::sync::Notify` of its own, which loom
//!   lets return once per execution without a notification, so the models
//!   also run the schedules where a sleeper returns early (a signal, in the
//!   kernel) and the callers must re-check their condition. (Unbounded
//!   spurious returns would make executions unbounded.) A notification that
//!   reaches a thread after it returned spuriously makes its next sleep
//!   return at once: spurious too. Otherwise a sleeper parks
//!   (`loom::thread::park`, which never returns spuriously) until `wake`
//!   dequeues and unparks it: the protocol models above `Event` and
//!   `Semaphore` cannot tell the difference (both loop until their state
//!   says they were woken) and would only pay for the extra schedules.
//! * **Wake wakes up to `n` waiters** queued on the same address, oldest
//!   first. A waiter that returned spuriously but has not yet left the queue
//!   can still take one of the `n` (the kernel counts it as woken too).
//! * **Timeouts.** A timed wait whose value check passes returns "timed out"
//!   at once, without sleeping: the model's timer has always already expired
//!   (a wake arriving during a real timed sleep is not modelled).
//!   [`Deadline`] never expires by the clock (loom has none; reading the real
//!   clock would make executions non-reproducible).

use crate::primitive::{AtomicU32, Mutex, fence, lock};
use loom::sync::Notify;
use std::cell::Cell;
// std's `Arc`, not loom's: a loom `Arc` left in a thread-local or in the
// queue when a model fails would be dropped after loom tore the execution
// down, and loom aborts the test process instead of reporting the failure.
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How a queued waiter is woken.
enum Sleeper {
    /// `loom::thread::park`: woken only by [`wake`].
    Park(loom::thread::Thread),
    /// The thread's own `Notify`, which may also return spuriously.
    Notify(Arc<Notify>),
}

struct Waiter {
    /// The address of the futex word, the kernel's key.
    key: usize,
    sleeper: Sleeper,
}

std::thread_local! {
    /// Whether sleeps may return spuriously in the models run by this OS
    /// thread (loom runs every thread of a model on the OS thread that
    /// called `check`).
    static SPURIOUS: Cell<bool> = const { Cell::new(false) };
}

/// Lets futex sleeps return spuriously (once per thread and execution) in
/// the models this OS thread runs from now on. Off by default: spurious
/// returns are absorbed inside `Event` and `Semaphore`, whose own models
/// turn them on; the protocol models above them would only pay for the
/// extra schedules.
#[cfg(test)]
pub(crate) fn allow_spurious_wakeups(allow: bool) {
    SPURIOUS.with(|s| s.set(allow));
}

loom::thread_local! {
    /// What this thread sleeps on when spurious wake-ups are allowed.
    static SLEEP: Arc<Notify> = Arc::new(Notify::new());
}

loom::lazy_static! {
    /// All sleepers, in queueing order (one hash bucket for every address).
    static ref QUEUE: Mutex<Vec<Waiter>> = Mutex::new(Vec::new());
}

fn key(word: &AtomicU32) -> usize {
    std::ptr::from_ref(word) as usize
}

/// Blocks while `*word == expected`, until woken (or spuriously, if
/// allowed). A timed wait whose check passes times out at once. Returns
/// `false` only when the timeout expired.
pub(super) fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> bool {
    let notify = {
        let mut q = lock(&QUEUE);
        if word.load(Ordering::SeqCst) != expected {
            // EAGAIN.
            return true;
        }
        if timeout.is_some() {
            // ETIMEDOUT: the model's timer has already expired.
            return false;
        }
        let notify = SPURIOUS.with(Cell::get).then(|| SLEEP.with(Arc::clone));
        let sleeper = match &notify {
            Some(n) => Sleeper::Notify(Arc::clone(n)),
            None => Sleeper::Park(loom::thread::current()),
        };
        q.push(Waiter {
            key: key(word),
            sleeper,
        });
        notify
    };
    match notify {
        // Only `wake` unparks, once per dequeue, so this returns once the
        // waiter has been dequeued and woken.
        None => loom::thread::park(),
        Some(n) => {
            // Woken by `wake`, or a spurious return that loom explores too.
            n.wait();
            // After a spurious return the waiter is still queued: leave, as
            // the kernel's unqueue does.
            lock(&QUEUE)
                .retain(|w| !matches!(&w.sleeper, Sleeper::Notify(m) if Arc::ptr_eq(m, &n)));
        }
    }
    true
}

/// Wakes up to `n` threads blocked in [`wait`] on `word`.
pub(super) fn wake(word: &AtomicU32, n: i32) {
    fence(Ordering::SeqCst);
    let k = key(word);
    let mut left = n;
    lock(&QUEUE).retain(|w| {
        if left > 0 && w.key == k {
            left -= 1;
            match &w.sleeper {
                Sleeper::Park(t) => t.unpark(),
                Sleeper::Notify(n) => n.notify(),
            }
            false
        } else {
            true
        }
    });
}

/// When a timed wait ends. In the model it never ends by the clock; the
/// timed futex wait times out instead (see the module documentation).
#[derive(Debug, Clone, Copy)]
pub(super) struct Deadline(Duration);

impl Deadline {
    /// The deadline `timeout` from now.
    pub(super) fn after(timeout: Duration) -> Self {
        Self(timeout)
    }

    /// The time left, or `None` once the deadline has passed.
    pub(super) fn remaining(&self) -> Option<Duration> {
        Some(self.0)
    }
}
