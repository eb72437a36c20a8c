//! Grace periods: the reader registry, the global counter and
//! `synchronize_rcu`'s wait for pre-existing readers.
//!
//! The protocol is QEMU's `util/rcu.c` (liburcu's memory-barrier flavour) with
//! a 64-bit counter, so one counter phase per grace period suffices:
//!
//! * A reader's [`Slot::ctr`] is 0 while it is outside any read-side critical
//!   section, and a snapshot of [`Domain::gp_ctr`] while inside one.
//! * `synchronize` advances `gp_ctr` and waits until every slot that was
//!   registered when it started is either 0 or equal to the new counter: each
//!   such reader has since left the section it was in.
//!
//! See the crate documentation for the ordering argument; every fence below
//! names the fence it pairs with.

use crate::primitive::{Arc, AtomicBool, AtomicU64, Mutex, fence, lock};
use crate::wait::Event;
use std::sync::atomic::Ordering;

/// Bit 0 of the grace-period counter is always set, so a reader's snapshot is
/// never 0 (0 means "not reading").
pub(crate) const GP_LOCKED: u64 = 1;
/// Increment of the grace-period counter per grace period.
pub(crate) const GP_STEP: u64 = 2;

/// One registered reader thread's shared state. The owning thread writes
/// `ctr`; grace periods read it and write `waiting`.
#[derive(Debug)]
#[repr(align(128))] // Keep each reader's hot word on its own cache lines.
pub(crate) struct Slot {
    /// 0 when outside a read section; the grace-period counter read at the
    /// start of the outermost section otherwise.
    pub(crate) ctr: AtomicU64,
    /// Set by a hurried grace period that waits for this reader; the reader
    /// clears it and sets [`Domain::gp_event`] when it leaves its section.
    pub(crate) waiting: AtomicBool,
    /// The reader executes real fences in lock/unlock, so grace periods need
    /// no process-wide barrier on its behalf. Changed only under the domain's
    /// sync lock, while the reader is outside a section.
    pub(crate) fenced: AtomicBool,
}

impl Slot {
    fn new(fenced: bool) -> Self {
        Self {
            ctr: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
            fenced: AtomicBool::new(fenced),
        }
    }
}

/// How a lazy grace period (the call_rcu thread's) paces its wait for slow
/// readers. A hurried grace period (`synchronize_rcu`) has no pacer.
pub(crate) trait Pacer {
    /// Called while some reader is still inside a pre-existing section and
    /// the grace period has not yet asked readers to report. `polls_left`
    /// counts down to 0. Returns `true` to hurry: readers are then asked to
    /// wake the grace period when they leave. Returning `false` means the
    /// pacer already slept for one poll interval (or was told to stop
    /// sleeping early and now returns `true`).
    fn hurry(&self, polls_left: u32) -> bool;
}

/// How many lazy 10 ms polls a lazy grace period does before hurrying anyway.
pub const LAZY_POLLS: u32 = 5;

/// Statistics of grace periods (not part of the protocol).
#[derive(Debug, Default)]
pub(crate) struct GpStats {
    pub(crate) grace_periods: std::sync::atomic::AtomicU64,
    pub(crate) reader_waits: std::sync::atomic::AtomicU64,
    pub(crate) membarriers: std::sync::atomic::AtomicU64,
    pub(crate) membarriers_skipped: std::sync::atomic::AtomicU64,
}

/// The registry and grace-period state shared by all readers and writers.
#[derive(Debug)]
pub(crate) struct Domain {
    gp_ctr: AtomicU64,
    /// Registered readers. Held only for short list operations, never while
    /// waiting, so thread start and exit never wait for a grace period.
    registry: Mutex<Vec<Arc<Slot>>>,
    /// Serialises grace periods (and reader mode changes).
    sync_lock: Mutex<()>,
    /// Set by a reader leaving the section a hurried grace period waits for.
    pub(crate) gp_event: Event,
    /// Whether readers not marked `fenced` rely on `membarrier` (false: every
    /// reader fences, e.g. under loom or on kernels without membarrier).
    use_membarrier: AtomicBool,
    pub(crate) stats: GpStats,
}

macro_rules! domain_init {
    () => {
        Domain {
            gp_ctr: AtomicU64::new(GP_LOCKED),
            registry: Mutex::new(Vec::new()),
            sync_lock: Mutex::new(()),
            gp_event: Event::new(true),
            use_membarrier: AtomicBool::new(false),
            stats: GpStats {
                grace_periods: std::sync::atomic::AtomicU64::new(0),
                reader_waits: std::sync::atomic::AtomicU64::new(0),
                membarriers: std::sync::atomic::AtomicU64::new(0),
                membarriers_skipped: std::sync::atomic::AtomicU64::new(0),
            },
        }
    };
}

impl Domain {
    /// A domain whose readers all use fences.
    #[cfg(not(loom))]
    pub(crate) const fn new() -> Self {
        domain_init!()
    }

    /// A domain whose readers all use fences.
    #[cfg(loom)]
    pub(crate) fn new() -> Self {
        domain_init!()
    }

    /// Lets readers that are not `fenced` skip their fences from now on,
    /// because grace periods will issue `membarrier`. Must be called before
    /// the first reader registers (the global domain does it in its one-time
    /// initialisation).
    #[cfg(not(loom))]
    pub(crate) fn enable_membarrier(&self) {
        self.use_membarrier.store(true, Ordering::Release);
    }

    /// Whether a reader registered with `fenced == false` may use compiler
    /// fences only.
    pub(crate) fn membarrier_enabled(&self) -> bool {
        self.use_membarrier.load(Ordering::Acquire)
    }

    /// The current grace-period counter, for a reader entering its outermost
    /// section.
    #[inline(always)]
    pub(crate) fn gp_ctr(&self) -> u64 {
        self.gp_ctr.load(Ordering::Relaxed)
    }

    /// Adds a reader. The slot starts outside any section.
    pub(crate) fn register(&self, fenced: bool) -> Arc<Slot> {
        let slot = Arc::new(Slot::new(fenced));
        lock(&self.registry).push(Arc::clone(&slot));
        slot
    }

    #[cfg_attr(loom, allow(dead_code))]
    /// Removes a reader whose thread will never read again (it is exiting),
    /// even if it leaked a guard: its section ends here.
    pub(crate) fn unregister(&self, slot: &Arc<Slot>) {
        {
            let mut reg = lock(&self.registry);
            if let Some(i) = reg.iter().position(|s| Arc::ptr_eq(s, slot)) {
                reg.swap_remove(i);
            }
        }
        // A grace period that took a snapshot holding this slot may be
        // waiting for it: end the section as `read_unlock` would.
        self.reader_exit(slot, true);
    }

    #[cfg_attr(loom, allow(dead_code))]
    /// Number of registered readers.
    pub(crate) fn registered(&self) -> usize {
        lock(&self.registry).len()
    }

    #[cfg_attr(loom, allow(dead_code))]
    /// Changes whether `slot` fences. The reader must be outside any section.
    /// Waits for a running grace period to finish, so every grace period sees
    /// one mode for the whole of its run.
    pub(crate) fn set_fenced(&self, slot: &Slot, fenced: bool) {
        let _sync = lock(&self.sync_lock);
        slot.fenced.store(fenced, Ordering::Relaxed);
    }

    /// Outermost `read_lock` of `slot`.
    ///
    /// `fence == false` is allowed only when `slot.fenced` is false and
    /// [`Domain::membarrier_enabled`]: grace periods then put the barrier
    /// on this thread with `membarrier`.
    #[inline(always)]
    pub(crate) fn reader_enter(&self, slot: &Slot, fence_needed: bool) {
        // Release: a grace period that reads this value (Acquire) also sees
        // everything this reader did before, including earlier sections.
        slot.ctr.store(self.gp_ctr(), Ordering::Release);
        // (R1) Order the store to ctr before the loads of RCU-protected
        // pointers in the section. Pairs with (W1)/(W2) in `synchronize`:
        // either the grace period sees this section, or this section sees
        // the pointers published before the grace period started.
        reader_fence(fence_needed);
    }

    /// Outermost `read_unlock` of `slot`.
    #[inline(always)]
    pub(crate) fn reader_exit(&self, slot: &Slot, fence_needed: bool) {
        // Release: the section's loads happen before a grace period that
        // reads this 0 (Acquire) frees what they read.
        slot.ctr.store(0, Ordering::Release);
        // (R2) Order the store to ctr before the load of `waiting`. Pairs
        // with (W2): either the grace period sees ctr == 0, or this thread
        // sees waiting == true and wakes it.
        reader_fence(fence_needed);
        if slot.waiting.load(Ordering::Relaxed) {
            self.wake_grace_period(slot);
        }
    }

    #[cold]
    fn wake_grace_period(&self, slot: &Slot) {
        slot.waiting.store(false, Ordering::Relaxed);
        self.gp_event.set();
    }

    /// Runs one grace period: returns once every reader that was inside a
    /// section when this call started has left it.
    ///
    /// `caller` is the calling thread's own slot, if it is registered: it is
    /// outside a section (the caller checks), so it needs no barrier. With a
    /// `pacer` the wait is lazy (the call_rcu thread's); without, readers are
    /// asked at once to report their exit.
    pub(crate) fn synchronize(&self, caller: Option<&Slot>, pacer: Option<&dyn Pacer>) {
        let _sync = lock(&self.sync_lock);
        self.stats.grace_periods.fetch_add(1, Ordering::Relaxed);

        let mut pending: Vec<Arc<Slot>> = lock(&self.registry).clone();
        let is_caller = |s: &Arc<Slot>| caller.is_some_and(|c| std::ptr::eq(c, &**s));
        pending.retain(|s| !is_caller(s));
        // A process-wide barrier is needed only if some other reader skips
        // its fences. Readers registering after the snapshot take the
        // registry lock after this thread released it, so they see every
        // pointer published before this call.
        let need_membarrier =
            self.membarrier_enabled() && pending.iter().any(|s| !s.fenced.load(Ordering::Relaxed));

        // (W1) Order the caller's pointer updates before the counter update
        // and the loads of readers' counters. Pairs with (R1).
        self.barrier(need_membarrier);
        if pending.is_empty() {
            return;
        }
        let new_ctr = self.gp_ctr.load(Ordering::Relaxed) + GP_STEP;
        self.gp_ctr.store(new_ctr, Ordering::Relaxed);

        let mut polls_left = if pacer.is_some() { LAZY_POLLS } else { 0 };
        let mut hurried = false;
        loop {
            // (W2) Order the stores to `waiting` (and for the first pass, the
            // counter update) before the loads of the readers' counters.
            // Pairs with (R2) for `waiting` and with (R1) for `ctr`. On the
            // last pass it also keeps the caller's frees after those loads.
            self.barrier(need_membarrier);
            pending.retain(|s| {
                let v = s.ctr.load(Ordering::Acquire);
                let ongoing = v != 0 && v != new_ctr;
                if !ongoing {
                    // No barrier needed: a stale `true` costs one spurious
                    // wake-up of a later grace period.
                    s.waiting.store(false, Ordering::Relaxed);
                }
                ongoing
            });
            if pending.is_empty() {
                break;
            }
            self.stats.reader_waits.fetch_add(1, Ordering::Relaxed);
            if hurried {
                self.gp_event.wait();
                self.gp_event.reset();
            } else if pacer.is_none_or(|p| p.hurry(polls_left)) {
                hurried = true;
                for s in &pending {
                    s.waiting.store(true, Ordering::Relaxed);
                }
            } else {
                polls_left = polls_left.saturating_sub(1);
            }
        }
    }

    fn barrier(&self, need_membarrier: bool) {
        if need_membarrier {
            self.stats.membarriers.fetch_add(1, Ordering::Relaxed);
            #[cfg(not(loom))]
            if !crate::membarrier::barrier() {
                // Readers skip their fences relying on this barrier; going on
                // could free memory they still read.
                eprintln!("rcu: membarrier failed after successful registration; aborting");
                std::process::abort();
            }
        } else {
            self.stats
                .membarriers_skipped
                .fetch_add(1, Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
    }
}

/// The reader-side barrier: a full fence, or only a compiler fence when a
/// grace period's `membarrier` stands in for it.
#[inline(always)]
fn reader_fence(fence_needed: bool) {
    if fence_needed {
        fence(Ordering::SeqCst);
    } else {
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
    }
}
