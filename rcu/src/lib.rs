//! Userspace read-copy-update for a virtual machine monitor.
//!
//! Readers enter a read-side critical section with [`read_lock`], read values
//! published in [`RcuCell`]s through the returned [`ReadGuard`], and leave when
//! the guard drops. Writers publish new values and free old ones after a
//! *grace period*: [`synchronize_rcu`] waits for one, [`call_rcu`] defers a
//! callback until one has passed, [`force_rcu`] makes pending callbacks run
//! promptly, and [`drain_call_rcu`] waits for everything queued so far.
//! [`stats`] reports what all of it cost.
//!
//! The semantics follow QEMU's `util/rcu.c` (itself liburcu's
//! memory-barrier flavour), including QEMU 10.2's lazy, batching call_rcu
//! thread and `force_rcu()`; under sustained load the thread also keeps a
//! gap between batches, as liburcu's does, so it wakes a bounded number of
//! times a second: [`BATCH_GAP`], growing to [`MAX_BATCH_GAP`] while the
//! load lasts, and never holding back more than [`GAP_CAP`] callbacks. The
//! call_rcu thread's wake-up is a [`WakeupStrategy`]: QEMU's boolean event,
//! or the counting semaphore that was proposed instead; choose with
//! [`set_wakeup_strategy`] before first use.
//!
//! # The read side
//!
//! A registered thread owns a slot: one word holding its nesting count, its
//! reader mode and, while inside a section, the grace-period phase it saw
//! when it entered (liburcu's layout). Entering the outermost section stores
//! the global counter `gp_ctr` (a phase with a nesting count of 1) into the
//! word; nested sections add and subtract 1; leaving the outermost section
//! brings the count back to 0. The slot is a thread-local, so no pointer is
//! loaded to find it. No lock, no read-modify-write atomic and no allocation
//! is involved after the thread's first section (which registers it), and
//! the read side is async-signal-safe: a signal handler's section that
//! interrupts the thread's own `read_lock` or guard drop leaves the word as
//! it found it.
//!
//! A grace period advances the phase of `gp_ctr` and waits until every slot
//! that is registered reads a nesting count of 0 (outside) or the new phase
//! (a section that started after the advance). Every such reader has left
//! the section it was in when the grace period started. Concurrent
//! [`synchronize_rcu`] callers share grace periods: each returns once a grace
//! period that started after its call has ended, whoever ran it.
//!
//! # Why readers are safe: the ordering pairs
//!
//! Each barrier is named in the code (`domain.rs`) with what it pairs with.
//!
//! * **Publication.** `RcuCell::replace` swaps the pointer with release
//!   ordering; `RcuCell::read` loads it with acquire ordering. A reader that
//!   sees the new value sees its contents.
//! * **(R1) with (W): a reader either is seen, or sees the new value.**
//!   The reader stores its word, then fences (R1), then loads pointers. The
//!   writer stores the new pointer and advances `gp_ctr`, then fences (W),
//!   then loads the readers' words. This is the store-buffering pattern:
//!   with a full fence on each side, at least one side observes the other's
//!   store. Either the grace period sees the reader's section with the old
//!   phase and waits for it, or the reader's loads return the new pointer,
//!   so it cannot hold the old one. A reader that loaded the *new* phase is
//!   not waited for; the advance is a release store and the reader's load of
//!   `gp_ctr` an acquire load, so such a reader sees the new pointer. One
//!   barrier per grace period suffices for readers that are idle; re-scans
//!   of readers still inside a section need none (next point), so a grace
//!   period first spins, re-scanning, for a few µs before it does anything
//!   else.
//! * **(R2) with (W): no lost wake-up of the writer.** Leaving a section, the
//!   reader stores its word, fences (R2), then loads its `waiting` flag. A
//!   grace period that stops polling (or spinning) and sleeps stores
//!   `waiting = true` in the words of the readers it still waits for (never
//!   in an idle reader's), fences (W), then loads their words. Again store buffering: either the
//!   writer sees the section ended, or the reader sees `waiting` and sets
//!   the grace-period event.
//! * **The section happens before the free.** The stores that enter and
//!   leave the outermost section are release stores and the grace period
//!   loads the words with acquire ordering,
//!   so every access of the finished section happens before whatever the
//!   writer does after `synchronize_rcu` returns (such as freeing).
//! * **The fenced reader's barrier.** In [`ReaderMode::Fenced`] the store
//!   and the full fence of (R1) and of (R2) are, on x86-64, one locked
//!   exchange of the word: every locked instruction is a full barrier there
//!   (x86-TSO), so the later loads are not performed before the store is
//!   visible, and a compiler fence keeps the compiler from moving them
//!   above it. The language's memory model alone does not promise that for
//!   a SeqCst read-modify-write followed by weaker loads, so other
//!   architectures and the loom models use the store and `fence(SeqCst)`.
//! * **Events.** The grace-period event and the call_rcu event pair a full
//!   fence in `set` with one in `reset` (store buffering again), so a `set`
//!   either precedes the waiter's `reset` and re-check, or wakes it.
//!
//! # Paying for the fences: membarrier
//!
//! (R1) and (R2) as real barriers cost a few ns each (a locked
//! instruction). By default a reader
//! executes only compiler fences there, and grace periods execute
//! `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)` in place of (W):
//! the kernel runs a full barrier on every CPU that is running a thread of
//! this process at that moment (a thread that is not running passes a full
//! barrier when it is next scheduled). The effect is as if each reader had
//! executed a real fence at the point where it was interrupted, which is all
//! the pairs above need. Where the kernel lacks the command, or
//! `RCU_NO_MEMBARRIER` is set, every reader uses real fences and writers use a
//! local fence.
//!
//! membarrier interrupts *every* CPU running a thread of the process,
//! including vCPU threads inside `KVM_RUN`, forcing a VM exit on each. A
//! thread can opt out with [`set_reader_mode`]`(`[`ReaderMode::Fenced`]`)`: its
//! sections use real fences, and a grace period issues `membarrier` only if
//! some *other* registered thread is in [`ReaderMode::Membarrier`]. A VMM whose
//! threads all read in `Fenced` mode therefore never interrupts its guests for
//! a grace period.
//!
//! # No blocking inside a read section
//!
//! A read section must end in bounded time: every grace period, and so
//! every [`synchronize_rcu`] caller and every [`call_rcu`] callback (the
//! memory they free), waits for the longest section in progress. Inside a
//! section, do no I/O that can block (a `write` to stdout, a pipe, a
//! terminal or a socket; logging to stderr), wait on nothing another thread
//! may never provide (a condition variable, a channel, a lock held across
//! such a wait), and never call [`synchronize_rcu`] or [`drain_call_rcu`]
//! (they wait for the section itself). Copy what must be written into a
//! buffer and write it after the section, or from another thread. Short
//! mutexes held only for memory updates are fine.
//!
//! # Threads
//!
//! Registration happens on a thread's first [`read_lock`] and is undone when
//! the thread exits. Only dropping a [`ReadGuard`] ends a section: a thread
//! that exits inside a section (it leaked a guard, for example with
//! `Box::leak`, and may have handed a `&'static` reference read in it to
//! another thread) aborts the process with a message naming the thread, and
//! so does the call_rcu thread when a callback returns inside a section.
//! Ending such a section instead could free memory still referenced; keeping
//! it registered would stall every grace period for good.
//!
//! # Stalls
//!
//! A reader that keeps a grace period waiting for over a second is named
//! (thread name and id) once per grace period on stderr and in
//! [`Stats::stalled_readers`].
//!
//! # What is checked, and how
//!
//! Unit and integration tests (including a torture test in the style of the
//! kernel's rcutorture), `loom` models of the grace-period and call_rcu
//! protocols (build with `RUSTFLAGS="--cfg loom"`; the models use fenced
//! readers, since loom cannot model `membarrier`), and benchmarks (`rcu-bench`)
//! against liburcu, crossbeam-epoch, arc-swap and reader-writer locks.
//!
//! The loom models run the production code, including the futex-based
//! wake-up primitives (only the futex system call is replaced by a model of
//! it). Loom's search is bounded: it explores every interleaving with at
//! most `LOOM_MAX_PREEMPTIONS` preemptions (3 for most models, 2 for the two
//! no-lost-wake-up models, in CI as locally), and none that needs more; a
//! green run says nothing about those (`loom_models.rs` says why the bounds
//! are what they are and what else the models leave out).

#![deny(missing_docs)]
// Under loom only the models (test builds) drive the internals.
#![cfg_attr(loom, allow(dead_code, unused_imports))]
// Under loom the grace period does not spin (SPIN_SCANS is 0).
#![cfg_attr(loom, allow(clippy::absurd_extreme_comparisons))]

mod call_rcu;
#[cfg(not(loom))]
mod cell;
mod clock;
mod domain;
mod fatal;
#[cfg(not(loom))]
mod global;
#[cfg(all(test, loom))]
mod loom_models;
#[cfg(not(loom))]
mod membarrier;
mod primitive;
mod queue;
#[cfg(not(loom))]
mod reader;
mod stats;
mod wait;

pub use call_rcu::{BATCH_GAP, GAP_CAP, MAX_BATCH_GAP, MIN_BATCH, POLL_INTERVAL, WakeupStrategy};
#[cfg(not(loom))]
pub use cell::RcuCell;
pub use domain::LAZY_POLLS;
#[cfg(not(loom))]
pub use global::{
    AlreadyStarted, call_rcu, call_rcu_labeled, drain_call_rcu, force_rcu, pending_callbacks,
    registered_readers, set_wakeup_strategy, stats, synchronize_rcu, wakeup_strategy,
};
#[cfg(not(loom))]
pub use membarrier::DISABLE_ENV as NO_MEMBARRIER_ENV;
#[cfg(not(loom))]
pub use reader::{ReadGuard, ReaderMode, in_read_section, read_lock, reader_mode, set_reader_mode};
pub use stats::{Bucket, Latency, SiteStats, Stats};
