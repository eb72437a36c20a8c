//! Grace periods: the reader registry, the global counter and
//! `synchronize_rcu`'s wait for pre-existing readers.
//!
//! The protocol is liburcu's memory-barrier flavour (as in QEMU's
//! `util/rcu.c`), with liburcu's one-word reader state:
//!
//! * A reader's [`Slot::ctr`] holds, in one word, its nesting count (low
//!   [`NEST_BITS`] bits), whether it executes real fences ([`FENCED`]) and,
//!   above those, the grace-period phase it snapshotted when it entered its
//!   outermost section. Nesting count 0 means "outside any section".
//! * The global counter [`Domain::gp_ctr`] holds a phase and a nesting count
//!   of 1, so entering the outermost section is one store of
//!   `gp_ctr | fenced-bit`; a nested `read_lock` adds 1, a `read_unlock`
//!   subtracts 1. Every store a thread makes to its word is a function of the
//!   value it loaded from it just before; a signal handler that runs a whole
//!   section in between leaves the word as it found it, so the read side is
//!   async-signal-safe.
//! * A grace period advances the phase and waits until every registered slot
//!   is either outside a section or inside one that began with the new phase.
//!
//! The phase has `64 - NEST_BITS - 2` bits; equal phases across a wrap need a
//! reader to sit between its load of `gp_ctr` and its store to `ctr` for
//! 2^42 grace periods.
//!
//! See the crate documentation for the ordering argument; every fence below
//! names the fence it pairs with.

use crate::primitive::{AtomicBool, AtomicU64, CachePadded, Condvar, Mutex, fence, lock};
use crate::wait::Event;
use std::sync::atomic::Ordering;

/// Bits of a reader word that count nesting.
pub(crate) const NEST_BITS: u32 = 20;
/// Mask of the nesting count in a reader word.
pub(crate) const NEST_MASK: u64 = (1 << NEST_BITS) - 1;
/// Set in a reader word when the reader executes real fences: grace periods
/// need no `membarrier` on its behalf.
pub(crate) const FENCED: u64 = 1 << NEST_BITS;
/// Set in the word of a thread-local slot that is not registered: the
/// outermost-section test of `reader_enter` fails on it, and the slow path
/// registers. Never set in a registered slot.
pub(crate) const UNREGISTERED: u64 = 1 << (NEST_BITS + 1);
/// Increment of the grace-period counter's phase per grace period.
pub(crate) const GP_STEP: u64 = 1 << (NEST_BITS + 2);
/// Mask of the phase in a reader word and in `gp_ctr`.
const PHASE_MASK: u64 = !(GP_STEP - 1);

/// One registered reader's shared state. The owning thread writes `ctr`;
/// grace periods read it, and write `waiting` only while this reader is
/// inside a section they wait for.
#[derive(Debug)]
#[repr(align(128))] // Keep each reader's hot word on its own cache lines.
pub(crate) struct Slot {
    /// Nesting count, fenced bit and phase snapshot (see the module docs).
    pub(crate) ctr: AtomicU64,
    /// Set by a hurried grace period that waits for this reader; the reader
    /// clears it and sets [`Domain::gp_event`] when it leaves its section.
    pub(crate) waiting: AtomicBool,
}

impl Slot {
    /// A thread-local slot before its thread registers it.
    #[cfg(not(loom))]
    pub(crate) const fn unregistered() -> Self {
        Self {
            ctr: AtomicU64::new(UNREGISTERED),
            waiting: AtomicBool::new(false),
        }
    }

    /// A slot outside any section; `fenced`: the reader executes real fences.
    #[cfg(loom)]
    pub(crate) fn new(fenced: bool) -> Self {
        Self {
            ctr: AtomicU64::new(if fenced { FENCED } else { 0 }),
            waiting: AtomicBool::new(false),
        }
    }

    /// Whether the owner is inside a read section. Exact when called by the
    /// owner (or after it stopped running).
    pub(crate) fn in_section(&self) -> bool {
        self.ctr.load(Ordering::Relaxed) & NEST_MASK != 0
    }

    /// Whether the owner executes real fences.
    pub(crate) fn fenced(&self) -> bool {
        self.ctr.load(Ordering::Relaxed) & FENCED != 0
    }
}

/// A registered slot, as the registry holds it.
struct Entry {
    slot: *const Slot,
    /// The owning thread's name, for stall reports.
    name: String,
}

// SAFETY: `slot` points at a `Slot`, which is `Sync`; the registry contract
// (see `Domain::register`) keeps it valid while the entry exists, and it is
// dereferenced only under the registry lock.
unsafe impl Send for Entry {}

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

/// Re-scans of a grace period that is about to hurry, a short spin apart,
/// before it asks the readers it waits for to report (a store into each
/// one's slot and a barrier) and sleeps.
#[cfg(not(loom))]
const SPIN_SCANS: u32 = 20;
#[cfg(loom)]
const SPIN_SCANS: u32 = 0;

/// A grace period blocked this long by one reader reports the reader.
#[cfg(not(loom))]
const STALL_REPORT: std::time::Duration = std::time::Duration::from_secs(1);

/// Statistics of grace periods (not part of the protocol).
#[derive(Debug, Default)]
pub(crate) struct GpStats {
    pub(crate) grace_periods: std::sync::atomic::AtomicU64,
    pub(crate) shared_grace_periods: std::sync::atomic::AtomicU64,
    pub(crate) reader_waits: std::sync::atomic::AtomicU64,
    pub(crate) membarriers: std::sync::atomic::AtomicU64,
    pub(crate) membarriers_skipped: std::sync::atomic::AtomicU64,
    /// Stores of `waiting = true` into a reader's slot (one per reader a
    /// hurried grace period still waits for after its spin).
    pub(crate) wake_requests: std::sync::atomic::AtomicU64,
    /// Sleeps of a grace period on `gp_event`.
    pub(crate) gp_sleeps: std::sync::atomic::AtomicU64,
    pub(crate) stalls: std::sync::atomic::AtomicU64,
    /// Names of readers that blocked a grace period for over a second
    /// (most recent last, at most [`STALLED_NAMES`]).
    pub(crate) stalled_readers: std::sync::Mutex<Vec<String>>,
}

/// How many stalled reader names `stats()` keeps.
pub(crate) const STALLED_NAMES: usize = 16;

/// Who runs grace periods: concurrent callers share them.
#[derive(Debug, Default)]
struct GpState {
    /// Grace periods started.
    started: u64,
    /// Grace periods completed (they complete in order).
    done: u64,
    /// A grace period is running (`started == done + 1`).
    running: bool,
    /// Threads waiting on `gp_done` (callers behind a running grace period,
    /// `set_fenced`): the runner notifies only when there are some, so an
    /// uncontended grace period makes no futex call.
    waiters: u32,
}

/// The registry and grace-period state shared by all readers and writers.
#[derive(Debug)]
pub(crate) struct Domain {
    /// Read by every outermost `read_lock`; written once per grace period.
    gp_ctr: CachePadded<AtomicU64>,
    /// Registered readers. Held for list operations and for each scan of the
    /// readers' words, never while sleeping.
    registry: Mutex<Vec<Entry>>,
    /// Which grace period runs and which are done.
    gp_state: Mutex<GpState>,
    gp_done: Condvar,
    /// A `synchronize_rcu` caller waits behind a lazy grace period: it
    /// should hurry.
    hurry_requested: AtomicBool,
    /// Set by a reader leaving the section a hurried grace period waits for.
    pub(crate) gp_event: Event,
    /// Whether readers not marked `fenced` rely on `membarrier` (false: every
    /// reader fences, e.g. under loom or on kernels without membarrier).
    use_membarrier: AtomicBool,
    pub(crate) stats: CachePadded<GpStats>,
    /// Under loom, slots made by [`Domain::register_owned`] live as long as
    /// the domain.
    #[cfg(loom)]
    owned: Mutex<Vec<crate::primitive::Arc<Slot>>>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry").field("name", &self.name).finish()
    }
}

macro_rules! domain_init {
    () => {
        Domain {
            gp_ctr: CachePadded(AtomicU64::new(GP_STEP | 1)),
            registry: Mutex::new(Vec::new()),
            gp_state: Mutex::new(GpState {
                started: 0,
                done: 0,
                running: false,
                waiters: 0,
            }),
            gp_done: Condvar::new(),
            hurry_requested: AtomicBool::new(false),
            gp_event: Event::new(true),
            use_membarrier: AtomicBool::new(false),
            stats: CachePadded(GpStats {
                grace_periods: std::sync::atomic::AtomicU64::new(0),
                shared_grace_periods: std::sync::atomic::AtomicU64::new(0),
                reader_waits: std::sync::atomic::AtomicU64::new(0),
                membarriers: std::sync::atomic::AtomicU64::new(0),
                membarriers_skipped: std::sync::atomic::AtomicU64::new(0),
                wake_requests: std::sync::atomic::AtomicU64::new(0),
                gp_sleeps: std::sync::atomic::AtomicU64::new(0),
                stalls: std::sync::atomic::AtomicU64::new(0),
                stalled_readers: std::sync::Mutex::new(Vec::new()),
            }),
            #[cfg(loom)]
            owned: Mutex::new(Vec::new()),
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

    /// Adds a reader, outside any section; `fenced`: it executes real fences
    /// (required unless [`Domain::membarrier_enabled`]).
    ///
    /// # Safety
    /// `slot` must be valid, unregistered, and stay valid until
    /// [`Domain::unregister`] for it has returned `Ok`.
    pub(crate) unsafe fn register(&self, slot: *const Slot, fenced: bool, name: String) {
        let mut reg = lock(&self.registry);
        // SAFETY: valid, per the contract.
        let s = unsafe { &*slot };
        s.waiting.store(false, Ordering::Relaxed);
        s.ctr
            .store(if fenced { FENCED } else { 0 }, Ordering::Relaxed);
        reg.push(Entry { slot, name });
    }

    /// Adds a reader whose slot the domain keeps alive (loom models).
    #[cfg(loom)]
    pub(crate) fn register_owned(&self, fenced: bool) -> crate::primitive::Arc<Slot> {
        let slot = crate::primitive::Arc::new(Slot::new(fenced));
        lock(&self.owned).push(crate::primitive::Arc::clone(&slot));
        // SAFETY: `owned` keeps the slot alive as long as the domain, and it
        // is new, so not registered.
        unsafe { self.register(&*slot, fenced, String::from("model reader")) };
        slot
    }

    /// Removes a reader whose thread will never read again (it is exiting),
    /// marking its slot [`UNREGISTERED`].
    ///
    /// Only leaving a section ends it: if the reader is inside one, it stays
    /// registered (grace periods keep waiting for it) and `Err` is returned;
    /// the slot must then stay valid for good, or the process must end.
    pub(crate) fn unregister(&self, slot: &Slot) -> Result<(), StillReading> {
        let mut reg = lock(&self.registry);
        let i = reg.iter().position(|e| std::ptr::eq(e.slot, slot));
        if slot.in_section() {
            return Err(StillReading {
                name: i.map_or_else(String::new, |i| reg[i].name.clone()),
            });
        }
        if let Some(i) = i {
            reg.swap_remove(i);
        }
        slot.ctr.store(UNREGISTERED, Ordering::Relaxed);
        Ok(())
    }

    #[cfg_attr(loom, allow(dead_code))]
    /// Number of registered readers.
    pub(crate) fn registered(&self) -> usize {
        lock(&self.registry).len()
    }

    #[cfg_attr(loom, allow(dead_code))]
    /// Changes whether `slot` fences. Only its owner may call it, outside any
    /// section. Waits for a running grace period to finish, so every grace
    /// period sees one mode per reader for the whole of its run.
    pub(crate) fn set_fenced(&self, slot: &Slot, fenced: bool) {
        let mut st = lock(&self.gp_state);
        while st.running {
            st.waiters += 1;
            st = wait(&self.gp_done, st);
            st.waiters -= 1;
        }
        let v = slot.ctr.load(Ordering::Relaxed);
        let v = if fenced { v | FENCED } else { v & !FENCED };
        slot.ctr.store(v, Ordering::Relaxed);
        drop(st);
    }

    /// `read_lock` on `slot`, by its owner (or a signal handler running on
    /// the owner's thread).
    ///
    /// A slot without [`FENCED`] is allowed only when
    /// [`Domain::membarrier_enabled`]: grace periods then put the barrier on
    /// this thread with `membarrier`.
    ///
    /// Returns `false`, changing nothing, if the slot is [`UNREGISTERED`]:
    /// the caller registers it and calls again.
    #[inline(always)]
    #[must_use]
    pub(crate) fn reader_enter(&self, slot: &Slot) -> bool {
        let tmp = slot.ctr.load(Ordering::Relaxed);
        // The outermost entry in membarrier mode is one test, inline; the
        // fenced one has its own branch (out of line), so that the value
        // stored depends on `gp_ctr` only, not on `tmp` (which the previous
        // section's exit just stored): no data dependency runs from one
        // section's word to the next one's through memory, only a predicted
        // branch.
        if tmp & (NEST_MASK | UNREGISTERED | FENCED) == 0 {
            self.enter_outermost(slot, false);
            true
        } else {
            self.reader_enter_slow(slot, tmp)
        }
    }

    /// `reader_enter` on a fenced, nested or unregistered slot: out of
    /// line, so the membarrier reader's outermost entry is one test.
    /// `#[cold]` is for code layout only (without it the fast path takes
    /// jumps): fenced readers, such as the VMM's vCPU threads, come here on
    /// every section and pay a call, about 2 ns on their 20-25 ns (the two
    /// locked exchanges).
    #[cold]
    #[inline(never)]
    fn reader_enter_slow(&self, slot: &Slot, tmp: u64) -> bool {
        if tmp & (NEST_MASK | UNREGISTERED) == 0 {
            self.enter_outermost(slot, true);
            true
        } else {
            reader_enter_nested(slot, tmp)
        }
    }

    /// The outermost `read_lock` on a registered slot in the given mode.
    #[inline(always)]
    fn enter_outermost(&self, slot: &Slot, fenced: bool) {
        // Acquire pairs with the Release advance of `gp_ctr`: a section
        // that starts with the new phase sees what was published before.
        let v = self.gp_ctr.load(Ordering::Acquire) | if fenced { FENCED } else { 0 };
        // Release: a grace period that reads this value (Acquire) also sees
        // everything this reader did before. Then (R1): order the store to
        // ctr before the loads of RCU-protected pointers in the section.
        // Pairs with (W) in `synchronize`: either the grace period sees this
        // section, or this section sees the pointers published before the
        // grace period started.
        store_then_barrier(&slot.ctr, v, fenced);
    }

    /// `read_unlock` on `slot`, by its owner.
    #[inline(always)]
    pub(crate) fn reader_exit(&self, slot: &Slot) {
        let tmp = slot.ctr.load(Ordering::Relaxed);
        debug_assert!(tmp & NEST_MASK != 0, "read_unlock outside a section");
        // One test for the common case, the outermost exit in membarrier
        // mode: nesting 1 and no FENCED, so `tmp - 1` (the value stored on
        // every path) has neither.
        let v = tmp.wrapping_sub(1);
        if v & (NEST_MASK | FENCED) == 0 {
            self.exit_outermost(slot, v, false);
        } else {
            self.reader_exit_slow(slot, tmp);
        }
    }

    /// `reader_exit` from a nested section, or in fenced mode (`#[cold]`
    /// as `reader_enter_slow`).
    #[cold]
    #[inline(never)]
    fn reader_exit_slow(&self, slot: &Slot, tmp: u64) {
        if tmp & NEST_MASK == 1 {
            self.exit_outermost(slot, tmp - 1, true);
        } else {
            slot.ctr.store(tmp - 1, Ordering::Relaxed);
        }
    }

    /// The outermost `read_unlock`: stores `v` (the word with nesting 0)
    /// and wakes a grace period waiting for this reader.
    #[inline(always)]
    fn exit_outermost(&self, slot: &Slot, v: u64, fenced: bool) {
        // Release: the section's loads happen before a grace period that
        // reads this value (Acquire) frees what they read. Then (R2): order
        // the store to ctr before the load of `waiting`. Pairs with (W)
        // after a hurried grace period sets `waiting`: either it sees this
        // store, or this thread sees `waiting` and wakes it.
        store_then_barrier(&slot.ctr, v, fenced);
        if slot.waiting.load(Ordering::Relaxed) {
            self.wake_grace_period(slot);
        }
    }

    #[cold]
    fn wake_grace_period(&self, slot: &Slot) {
        slot.waiting.store(false, Ordering::Relaxed);
        self.gp_event.set();
    }

    /// Waits for a grace period: returns once every reader that was inside
    /// a section when this call started has left it.
    ///
    /// Concurrent callers share grace periods: a caller returns as soon as a
    /// grace period that *started* after its call has completed, whoever ran
    /// it. `caller` is the calling thread's own slot, if it is registered: it
    /// is outside a section (the caller checks), so it needs no barrier. With
    /// a `pacer` the wait is lazy (the call_rcu thread's); without, readers
    /// are asked at once to report their exit.
    pub(crate) fn synchronize(&self, caller: Option<&Slot>, pacer: Option<&dyn Pacer>) {
        let mut st = lock(&self.gp_state);
        // Every caller's updates happen before this lock's release, and the
        // runner of grace period `target` takes the lock after that: the
        // runner's barrier covers them.
        let target = st.started + 1;
        loop {
            if st.done >= target {
                self.stats
                    .shared_grace_periods
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            if !st.running {
                st.running = true;
                st.started += 1;
                let me = st.started;
                drop(st);
                self.run_grace_period(caller, pacer);
                st = lock(&self.gp_state);
                st.done = me;
                st.running = false;
                self.hurry_requested.store(false, Ordering::Relaxed);
                if st.waiters > 0 {
                    self.gp_done.notify_all();
                }
                return;
            }
            if pacer.is_none() {
                self.hurry_requested.store(true, Ordering::Relaxed);
            }
            st.waiters += 1;
            st = wait(&self.gp_done, st);
            st.waiters -= 1;
        }
    }

    /// One grace period, run by the one runner.
    fn run_grace_period(&self, caller: Option<&Slot>, pacer: Option<&dyn Pacer>) {
        self.stats.grace_periods.fetch_add(1, Ordering::Relaxed);
        #[cfg(not(loom))]
        let started = std::time::Instant::now();
        #[cfg(not(loom))]
        let mut stall_reported = false;

        let is_caller = |p: *const Slot| caller.is_some_and(|c| std::ptr::eq(c, p));
        let (new_ctr, mut pending, need_membarrier) = {
            let reg = lock(&self.registry);
            // Release pairs with the Acquire load in `reader_enter`. Readers
            // registering after this lock is released see the new phase.
            let new_ctr = self.gp_ctr.load(Ordering::Relaxed).wrapping_add(GP_STEP);
            self.gp_ctr.store(new_ctr, Ordering::Release);
            // A process-wide barrier is needed only if some other reader
            // skips its fences.
            let need_membarrier = self.membarrier_enabled()
                && reg.iter().any(|e| {
                    // SAFETY: registered slots are valid under the lock.
                    !is_caller(e.slot) && !unsafe { &*e.slot }.fenced()
                });
            // (W) Order the caller's pointer updates and the phase advance
            // before the loads of the readers' words. Pairs with (R1).
            self.barrier(need_membarrier);
            let pending: Vec<*const Slot> = reg
                .iter()
                .map(|e| e.slot)
                .filter(|&p| !is_caller(p))
                // SAFETY: as above.
                .filter(|&p| ongoing(unsafe { &*p }, new_ctr))
                .collect();
            (new_ctr, pending, need_membarrier)
        };

        let mut polls_left = if pacer.is_some() { LAZY_POLLS } else { 0 };
        // `hurry`: the grace period stopped being lazy (or never was); it
        // spins, then asks readers to report (`hurried`) and sleeps.
        let mut hurry = false;
        let mut hurried = false;
        let mut spins = 0;
        while !pending.is_empty() {
            self.stats.reader_waits.fetch_add(1, Ordering::Relaxed);
            if hurried {
                self.stats.gp_sleeps.fetch_add(1, Ordering::Relaxed);
                #[cfg(not(loom))]
                {
                    let waited = started.elapsed();
                    if !stall_reported && waited >= STALL_REPORT {
                        stall_reported = true;
                        self.report_stall(&pending, waited);
                    }
                    let limit = if stall_reported {
                        std::time::Duration::from_secs(3600)
                    } else {
                        STALL_REPORT - waited
                    };
                    self.gp_event.wait_timeout(limit);
                }
                #[cfg(loom)]
                self.gp_event.wait();
                self.gp_event.reset();
            } else if hurry
                || self.hurry_requested.load(Ordering::Relaxed)
                || pacer.is_none_or(|p| p.hurry(polls_left))
            {
                hurry = true;
                if spins < SPIN_SCANS {
                    // A short spin: readers usually leave within it, and
                    // then the grace period ends with no store into their
                    // slots, no second barrier and no sleep. The re-scan
                    // needs no barrier (see the lazy re-poll below).
                    spins += 1;
                    for _ in 0..64 {
                        std::hint::spin_loop();
                    }
                } else {
                    hurried = true;
                    let reg = lock(&self.registry);
                    pending.retain(|&p| reg.iter().any(|e| std::ptr::eq(e.slot, p)));
                    for &p in &pending {
                        self.stats.wake_requests.fetch_add(1, Ordering::Relaxed);
                        // SAFETY: still registered, under the lock.
                        unsafe { &*p }.waiting.store(true, Ordering::Relaxed);
                    }
                    // (W) again: order the stores to `waiting` before the
                    // loads of the readers' words. Pairs with (R2).
                    let need = need_membarrier
                        // SAFETY: as above.
                        && pending.iter().any(|&p| !unsafe { &*p }.fenced());
                    self.barrier(need);
                    drop(reg);
                }
            } else {
                // A lazy re-poll: no barrier. A section seen ended (or
                // restarted with the new phase) was ended by a Release store
                // this Acquire load reads, which orders it before the frees.
                polls_left = polls_left.saturating_sub(1);
            }
            // Re-scan the readers still pending. Slots unregistered since
            // (their threads exited outside any section) are dropped.
            let reg = lock(&self.registry);
            pending.retain(|&p| {
                reg.iter().any(|e| std::ptr::eq(e.slot, p))
                    // SAFETY: still registered, under the lock.
                    && ongoing(unsafe { &*p }, new_ctr)
            });
        }
    }

    /// Names the readers that block a grace period, on stderr and in the
    /// statistics.
    #[cfg(not(loom))]
    #[cold]
    fn report_stall(&self, pending: &[*const Slot], waited: std::time::Duration) {
        let names: Vec<String> = {
            let reg = lock(&self.registry);
            reg.iter()
                .filter(|e| pending.iter().any(|&p| std::ptr::eq(p, e.slot)))
                .map(|e| e.name.clone())
                .collect()
        };
        if names.is_empty() {
            return;
        }
        self.stats.stalls.fetch_add(1, Ordering::Relaxed);
        {
            let mut v = self
                .stats
                .stalled_readers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for n in &names {
                v.retain(|x| x != n);
                v.push(n.clone());
            }
            let excess = v.len().saturating_sub(STALLED_NAMES);
            v.drain(..excess);
        }
        eprintln!(
            "rcu: grace period blocked for {} ms by a reader inside a read section: {}",
            waited.as_millis(),
            names.join(", ")
        );
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

/// Error of [`Domain::unregister`]: the reader is inside a section.
#[derive(Debug)]
pub(crate) struct StillReading {
    /// The name the reader registered with.
    pub(crate) name: String,
}

/// Whether a reader word shows a section that began before the phase
/// `new_ctr` (Acquire: see `reader_exit`).
fn ongoing(slot: &Slot, new_ctr: u64) -> bool {
    let v = slot.ctr.load(Ordering::Acquire);
    v & NEST_MASK != 0 && (v & PHASE_MASK) != (new_ctr & PHASE_MASK)
}

fn wait<'a, T>(
    cv: &Condvar,
    g: crate::primitive::MutexGuard<'a, T>,
) -> crate::primitive::MutexGuard<'a, T> {
    match cv.wait(g) {
        Ok(g) => g,
        Err(e) => e.into_inner(),
    }
}

/// `reader_enter` on a slot that is inside a section or unregistered.
#[inline(never)]
fn reader_enter_nested(slot: &Slot, tmp: u64) -> bool {
    if tmp & UNREGISTERED != 0 {
        return false;
    }
    if tmp & NEST_MASK == NEST_MASK {
        nesting_overflow();
    }
    slot.ctr.store(tmp + 1, Ordering::Relaxed);
    true
}

#[cold]
#[inline(never)]
fn nesting_overflow() -> ! {
    crate::fatal::abort_with(&[
        b"rcu: more than 2^20 - 1 nested read sections on one thread (leaked guards?); aborting\n",
    ]);
}

/// A reader's store to its word with Release ordering followed by the
/// reader-side barrier, (R1) or (R2): a full barrier when `fenced`, or only
/// a compiler fence when a grace period's `membarrier` stands in for it.
///
/// On x86-64 the fenced form is one locked exchange (`xchg`) instead of a
/// store and `fence(SeqCst)` (which rustc emits as a locked `or` on the
/// stack): every locked instruction is a full barrier there (x86-TSO: loads
/// and stores are not reordered with locked instructions; Intel SDM vol. 3
/// 8.2.2, AMD APM vol. 2 7.4.2), so no later load of the section (or of
/// `waiting`) is performed before the exchange's store is globally
/// visible, which is what the store-buffering pairs with (W) need. The
/// compiler fence keeps the compiler from moving those loads above it. The
/// language's memory model alone does not order a later non-SeqCst load
/// after a SeqCst read-modify-write, so other architectures, and the loom
/// models (which check the portable form), keep the store and the fence.
/// One instruction, so still async-signal-safe.
#[inline(always)]
fn store_then_barrier(word: &AtomicU64, v: u64, fenced: bool) {
    if fenced {
        #[cfg(all(target_arch = "x86_64", not(loom)))]
        {
            word.swap(v, Ordering::SeqCst);
            std::sync::atomic::compiler_fence(Ordering::SeqCst);
        }
        #[cfg(not(all(target_arch = "x86_64", not(loom))))]
        {
            word.store(v, Ordering::Release);
            fence(Ordering::SeqCst);
        }
    } else {
        word.store(v, Ordering::Release);
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
    }
}
