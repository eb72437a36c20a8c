//! The `rcu` crate against its peers, in one run: liburcu's memb and mb
//! flavours (their whole timed loops in C, `benches/urcu_shim.c`; memb's
//! readers skip fences like our membarrier mode, mb's fence like our fenced
//! mode, the one the VMM's vCPU threads use), crossbeam-epoch, seize
//! (Hyaline), arc-swap, `std::sync::RwLock`, a QEMU-style reader (`depth++`
//! in a thread-local and a snapshot of a global counter, in Rust here), the
//! least such a reader must do (a snapshot store, in Rust) and a bare
//! thread-local increment as the floor.
//!
//! `cargo bench -p rcu-bench` runs five interleaved rounds (every row and
//! peer once per round, the peer order rotating between rounds) and prints
//! one table; `cargo bench -p rcu-bench -- quick` runs one short round, and
//! naming row groups (`idle`, `publish`, `sync`, `paced`, `grace`,
//! `callback`) runs only those.
//!
//! # How it measures
//!
//! * Every timed loop is a whole loop in its own language: the Rust loops are
//!   `#[inline(never)]` functions whose final sum goes through `black_box`
//!   once (nothing per iteration); the liburcu loops are C functions taking
//!   the iteration count (or a stop flag) and returning the sum. The C file is
//!   built with `-O2 -ftls-model=initial-exec`; before measuring, the
//!   benchmark disassembles its own executable and prints how each loop
//!   reaches thread-local storage, refusing to run if a `__tls_get_addr` call
//!   is left in either side's read loop.
//! * Read costs are thread CPU time (`CLOCK_THREAD_CPUTIME_ID`) divided by
//!   the number of sections: time the thread spent preempted by the machine's
//!   other load is not counted. Grace-period and callback rows are wall time
//!   per call, since they wait by design.
//! * Two-thread rows count a round only when both threads really ran in
//!   parallel: each thread's CPU time is at least 90 % of its wall time and
//!   the two timed windows overlap by at least 90 %. The column `par` says in
//!   how many rounds that held; a row with none says `not parallel` and has
//!   no ratio. Why a round did not count (each thread's CPU/wall and the
//!   overlap) is logged on stderr. On a machine whose other load leaves
//!   each thread a quarter of a CPU, every two-thread row says `not
//!   parallel`: run it again when the machine is quieter.
//! * The grace-period rows add `rdr CPU/wall`, the other reader thread's
//!   CPU time over its lifetime: near 1.0 for a busy reader that really ran
//!   throughout; far below it, that reader was mostly preempted and the row
//!   says little about waiting for a busy reader.
//!
//! # How to read the table
//!
//! Each line gives the median over the rounds that counted and the range
//! (min–max). `vs liburcu` is the median over rounds of this peer's figure
//! divided by liburcu's *in the same round*: below 1.0 is better for times
//! (ns, µs), above 1.0 is better for rates (M/s, k/s); liburcu there is
//! the memb flavour, and a line under the table gives the same ratio of our
//! fenced reader against liburcu-mb. The idle rows add
//! `vs TLS++`, the same ratio against a bare thread-local increment plus the
//! dereference, the floor any reader can reach. The QEMU-style reader shows
//! what `depth++` in a thread-local plus a global snapshot costs on its own,
//! so a gap between `rcu` and liburcu can be split into what the algorithm
//! costs and what the implementation adds. The snapshot-store row is the
//! floor of this family of readers: it only stores the counter's snapshot
//! into its word, dereferences and stores 0 (no nesting, no wake-up of a
//! waiting writer, so no reader anyone could use); no such reader can be
//! cheaper than it. The machine is shared: compare rows within one run,
//! never across runs, and read the range before the median (the header
//! prints the load average before and after).
//!
//! Rows:
//! * **idle read** (1 and 2 threads): `read_lock`, one dereference of a
//!   published value, unlock; no writer.
//! * **publish 4 KiB**: a reader thread reads the last word of a 4 KiB value
//!   while a writer thread replaces the value as fast as it can (each old
//!   value freed after a grace period: `call_rcu`, `defer_destroy`, `retire`,
//!   arc-swap's reference count, the lock). Each new value is filled where
//!   it will live, as C fills its `malloc`ed page (ours with
//!   `RcuCell::replace_with`; arc-swap's `Arc` alone gets a copy, see
//!   `page`). Reader M sections/s and writer k swaps/s, both per CPU second
//!   of the thread. The same runs count the wake-ups per second of the
//!   process's other threads (voluntary context switches in
//!   `/proc/self/task/*/status`, the reader, the writer and the main thread
//!   left out), which is the reclamation thread's (call_rcu's) on the sides
//!   that have one: each wake-up can take a CPU from the reader or the
//!   writer. Counted in every round, parallel or not.
//! * **publish 4 KiB, synchronous writer** (group `sync`): the same reader,
//!   while the writer swaps the pointer, waits for a grace period itself and
//!   frees the old value on its own thread (liburcu: `rcu_xchg_pointer` +
//!   `synchronize_rcu` + `free`; ours: `RcuCell::replace_sync`). No
//!   call_rcu thread runs, so on a 2-CPU machine the two threads can really
//!   run in parallel, which the deferred row's three busy threads cannot.
//!   crossbeam-epoch and seize have no synchronous form (they only defer;
//!   seize's `reclaim_all` requires that no thread is active) and are left
//!   out; arc-swap's `store` and the lock's in-place write are synchronous
//!   already and run the same loops as in the deferred row.
//! * **publish 4 KiB, paced synchronous writer** (group `paced`, rcu and
//!   liburcu only): the same, with the writer starting one swap every 50 µs
//!   (spinning in between). Each grace period costs the reader something
//!   (an IPI from `membarrier`, a cache miss on the new value), so a faster
//!   writer lowers its own side's reader figure in the row above; at one
//!   rate the reader figures compare the read sides alone. The pacing loop
//!   is the same Rust code for both sides; `RCU_BENCH_PACED_WORK=sync` makes
//!   each tick a grace period only, `=none` nothing, `=membarrier` one bare
//!   `membarrier` call, `=cross` a grace period of the *other* side (ours
//!   for liburcu's reader and liburcu's for ours), to tell a reader that
//!   suffers from grace periods from a writer whose grace periods hurt (see
//!   `paced_work`). `RCU_BENCH_PIN=R,W` pins every two-thread row's reader
//!   to CPU R and writer to CPU W, on every side alike.
//! * **synchronize_rcu**: the caller (registered once, before timing, on
//!   both sides; ours as a fenced reader, so the other reader's mode alone
//!   decides whether our grace periods issue membarrier) runs grace periods
//!   while one other registered reader thread is idle (asleep outside any
//!   section) or busy (sections of 50 `pause` instructions back to back).
//! * **call → callback**: queue one callback and spin until it has run.

use arc_swap::ArcSwap;
use rcu::{RcuCell, ReaderMode};
use rcu_bench::{NO_LIBURCU, at, find, functions, objdump, thread_cpu_time, tls_use};
use std::cell::Cell;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU64, Ordering, compiler_fence};
use std::sync::{Barrier, LazyLock, RwLock};
use std::thread;
use std::time::{Duration, Instant};

mod urcu {
    // SAFETY: the signatures match benches/urcu_shim.c. The `safe` functions
    // take no pointers and touch only liburcu's and the shim's own state;
    // liburcu requires read-side and call_rcu users to be registered threads,
    // which the benchmark ensures (a violation is a liburcu assertion, not
    // memory unsafety in Rust code).
    unsafe extern "C" {
        pub safe fn shim_register();
        pub safe fn shim_unregister();
        pub safe fn shim_barrier();
        pub safe fn shim_init_ptr(v: u64);
        pub safe fn shim_read_loop(n: u64) -> u64;
        pub safe fn shim_page_init();
        /// `stop` must stay valid until the call returns; `count` must be
        /// writable.
        pub fn shim_page_read_until(stop: *const i32, count: *mut u64) -> u64;
        /// `stop` must stay valid until the call returns.
        pub fn shim_page_write_until(stop: *const i32) -> u64;
        /// `stop` must stay valid until the call returns.
        pub fn shim_page_write_sync_until(stop: *const i32) -> u64;
        /// `stop` must stay valid until the call returns.
        pub safe fn shim_page_swap_sync(n: u64);
        pub safe fn shim_sync_loop(n: u64);
        /// `stop` must stay valid until the call returns.
        pub fn shim_busy_reader(stop: *const i32);
        pub safe fn shim_call_latency_loop(n: u64);

        // The same loops built for the mb flavour (`-DSHIM_MB`).
        pub safe fn shim_mb_register();
        pub safe fn shim_mb_unregister();
        pub safe fn shim_mb_barrier();
        pub safe fn shim_mb_init_ptr(v: u64);
        pub safe fn shim_mb_read_loop(n: u64) -> u64;
        pub safe fn shim_mb_page_init();
        /// `stop` must stay valid until the call returns; `count` must be
        /// writable.
        pub fn shim_mb_page_read_until(stop: *const i32, count: *mut u64) -> u64;
        /// `stop` must stay valid until the call returns.
        pub fn shim_mb_page_write_until(stop: *const i32) -> u64;
        /// `stop` must stay valid until the call returns.
        pub fn shim_mb_page_write_sync_until(stop: *const i32) -> u64;
        pub safe fn shim_mb_page_swap_sync(n: u64);
        pub safe fn shim_mb_sync_loop(n: u64);
        /// `stop` must stay valid until the call returns.
        pub fn shim_mb_busy_reader(stop: *const i32);
    }
}

/// Which liburcu flavour a liburcu peer runs: memb (readers without fences,
/// grace periods issue `membarrier`; the peer of our membarrier reader mode)
/// or mb (readers with fences; the peer of our fenced mode, which the VMM's
/// vCPU threads use).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Flavour {
    Memb,
    Mb,
}

/// The shim's entry points, for either flavour.
impl Flavour {
    fn register(self) {
        match self {
            Flavour::Memb => urcu::shim_register(),
            Flavour::Mb => urcu::shim_mb_register(),
        }
    }
    fn unregister(self) {
        match self {
            Flavour::Memb => urcu::shim_unregister(),
            Flavour::Mb => urcu::shim_mb_unregister(),
        }
    }
    /// Waits for the callbacks queued so far (`rcu_barrier`).
    fn barrier(self) {
        match self {
            Flavour::Memb => urcu::shim_barrier(),
            Flavour::Mb => urcu::shim_mb_barrier(),
        }
    }
    fn init(self, v: u64) {
        match self {
            Flavour::Memb => {
                urcu::shim_init_ptr(v);
                urcu::shim_page_init();
            }
            Flavour::Mb => {
                urcu::shim_mb_init_ptr(v);
                urcu::shim_mb_page_init();
            }
        }
    }
    fn read_loop(self, n: u64) -> u64 {
        match self {
            Flavour::Memb => urcu::shim_read_loop(n),
            Flavour::Mb => urcu::shim_mb_read_loop(n),
        }
    }
    fn page_read(self) -> (u64, u64) {
        let mut n = 0;
        let sum = match self {
            // SAFETY: STOP is a static; `n` outlives the call.
            Flavour::Memb => unsafe { urcu::shim_page_read_until(STOP.as_ptr(), &mut n) },
            // SAFETY: as above.
            Flavour::Mb => unsafe { urcu::shim_mb_page_read_until(STOP.as_ptr(), &mut n) },
        };
        (sum, n)
    }
    fn page_write(self) -> u64 {
        match self {
            // SAFETY: STOP is a static.
            Flavour::Memb => unsafe { urcu::shim_page_write_until(STOP.as_ptr()) },
            // SAFETY: STOP is a static.
            Flavour::Mb => unsafe { urcu::shim_mb_page_write_until(STOP.as_ptr()) },
        }
    }
    fn page_write_sync(self) -> u64 {
        match self {
            // SAFETY: STOP is a static.
            Flavour::Memb => unsafe { urcu::shim_page_write_sync_until(STOP.as_ptr()) },
            // SAFETY: STOP is a static.
            Flavour::Mb => unsafe { urcu::shim_mb_page_write_sync_until(STOP.as_ptr()) },
        }
    }
    fn page_swap_sync(self, n: u64) {
        match self {
            Flavour::Memb => urcu::shim_page_swap_sync(n),
            Flavour::Mb => urcu::shim_mb_page_swap_sync(n),
        }
    }
    fn sync_loop(self, n: u64) {
        match self {
            Flavour::Memb => urcu::shim_sync_loop(n),
            Flavour::Mb => urcu::shim_mb_sync_loop(n),
        }
    }
    fn busy_reader(self) {
        match self {
            // SAFETY: STOP is a static.
            Flavour::Memb => unsafe { urcu::shim_busy_reader(STOP.as_ptr()) },
            // SAFETY: STOP is a static.
            Flavour::Mb => unsafe { urcu::shim_mb_busy_reader(STOP.as_ptr()) },
        }
    }
}

// ---------------------------------------------------------------------------
// The measured objects.

/// A value behind each mechanism, read with one dereference.
struct Value(u64);

/// The republished value: 4 KiB.
type Page = [u64; 512];
const LAST: usize = 511;
/// Loops that run until a stop flag test it once per this many sections.
const STOP_EVERY: u64 = 1024;

static RCU_VALUE: LazyLock<RcuCell<Value>> = LazyLock::new(|| RcuCell::new(Value(7)));
static EPOCH_VALUE: LazyLock<crossbeam_epoch::Atomic<Value>> =
    LazyLock::new(|| crossbeam_epoch::Atomic::new(Value(7)));
static SEIZE: LazyLock<seize::Collector> = LazyLock::new(seize::Collector::new);
static SEIZE_VALUE: LazyLock<AtomicPtr<Value>> =
    LazyLock::new(|| AtomicPtr::new(Box::into_raw(Box::new(Value(7)))));
static ARCSWAP_VALUE: LazyLock<ArcSwap<Value>> = LazyLock::new(|| ArcSwap::from_pointee(Value(7)));
static RWLOCK_VALUE: RwLock<Value> = RwLock::new(Value(7));
/// The value the QEMU-style reader and the bare increment dereference.
static PLAIN_VALUE: Value = Value(7);
static PLAIN_PTR: AtomicPtr<Value> = AtomicPtr::new(std::ptr::null_mut());

static RCU_PAGE: LazyLock<RcuCell<Page>> = LazyLock::new(|| RcuCell::new([0; 512]));
static EPOCH_PAGE: LazyLock<crossbeam_epoch::Atomic<Page>> =
    LazyLock::new(|| crossbeam_epoch::Atomic::new([0; 512]));
static SEIZE_PAGE: LazyLock<AtomicPtr<Page>> =
    LazyLock::new(|| AtomicPtr::new(Box::into_raw(Box::new([0; 512]))));
static ARCSWAP_PAGE: LazyLock<ArcSwap<Page>> = LazyLock::new(|| ArcSwap::from_pointee([0; 512]));
/// Written in place under the lock: a lock's natural use needs no new value.
static RWLOCK_PAGE: RwLock<Page> = RwLock::new([0; 512]);

/// The page a writer publishes as its `n`th. Every writer that can builds
/// its page where the page will live, as the C writer fills its `malloc`ed
/// page: `page` cannot unwind (`extern "C"`), so a call to it that fills a
/// fresh `Box` gets the box's address to write through. Where a call might
/// unwind, rustc 1.95 builds the value on the stack and copies it (4 KiB
/// per swap). `RcuCell::replace_with` does the same inside.
#[inline(never)]
#[allow(improper_ctypes_definitions)] // Called from Rust only.
extern "C" fn page(n: u64) -> Page {
    [n; 512]
}

/// Page `n` in a `Box` (crossbeam-epoch's `Owned` and seize take one).
fn page_box(n: u64) -> Box<Page> {
    Box::write(Box::new_uninit(), page(n))
}

/// Set to end the loops that run until told (publish writers and readers,
/// busy readers); an `i32` so the C loops can read it too.
static STOP: AtomicI32 = AtomicI32::new(0);

fn stopped() -> bool {
    STOP.load(Ordering::Relaxed) != 0
}

/// Dereferences `PLAIN_PTR`.
#[inline(always)]
fn plain_value() -> u64 {
    let p = PLAIN_PTR.load(Ordering::Acquire);
    // SAFETY: `main` stores a pointer to the immutable static `PLAIN_VALUE`
    // before any reader runs, and nothing else is ever stored.
    unsafe { &*p }.0
}

// ---------------------------------------------------------------------------
// The QEMU-style reader: util/rcu.c's read side, written in Rust.

struct QemuReader {
    depth: Cell<u32>,
    ctr: AtomicU64,
    waiting: AtomicBool,
}

thread_local! {
    static QEMU_READER: QemuReader = const {
        QemuReader { depth: Cell::new(0), ctr: AtomicU64::new(0), waiting: AtomicBool::new(false) }
    };
    static BARE: AtomicU64 = const { AtomicU64::new(0) };
}
static QEMU_GP_CTR: AtomicU64 = AtomicU64::new(1);

#[inline(always)]
fn qemu_read_lock() {
    QEMU_READER.with(|r| {
        let depth = r.depth.get();
        r.depth.set(depth + 1);
        if depth == 0 {
            r.ctr
                .store(QEMU_GP_CTR.load(Ordering::Relaxed), Ordering::Relaxed);
            // smp_mb_placeholder(): membarrier's compiler barrier.
            compiler_fence(Ordering::SeqCst);
        }
    });
}

#[inline(always)]
fn qemu_read_unlock() {
    QEMU_READER.with(|r| {
        let depth = r.depth.get() - 1;
        r.depth.set(depth);
        if depth == 0 {
            compiler_fence(Ordering::SeqCst);
            r.ctr.store(0, Ordering::Release);
            compiler_fence(Ordering::SeqCst);
            if r.waiting.load(Ordering::Relaxed) {
                qemu_wake_writer();
            }
        }
    });
}

/// The least a reader can do that a grace period could see: store the
/// grace-period counter's snapshot into its own word, dereference, store 0.
/// No nesting and no wake-up of a waiting writer, so not a usable RCU: the
/// floor under every reader of this family (liburcu's, QEMU's, ours), to
/// measure how far any of them can get towards the bare increment.
#[inline(never)]
fn idle_floor(n: u64) -> u64 {
    let mut sum = 0;
    for _ in 0..n {
        QEMU_READER.with(|r| {
            r.ctr
                .store(QEMU_GP_CTR.load(Ordering::Relaxed), Ordering::Relaxed);
            compiler_fence(Ordering::SeqCst);
            sum += plain_value();
            compiler_fence(Ordering::SeqCst);
            r.ctr.store(0, Ordering::Release);
        });
    }
    sum
}

/// QEMU's `qemu_event_set(&rcu_gp_event)`; no writer runs here.
#[cold]
#[inline(never)]
fn qemu_wake_writer() {
    QEMU_READER.with(|r| r.waiting.store(false, Ordering::Relaxed));
}

// ---------------------------------------------------------------------------
// Idle read loops: n sections each, returning the sum read.

#[inline(never)]
fn idle_rcu(n: u64) -> u64 {
    let cell = &*RCU_VALUE; // the LazyLock checked once, outside the loop
    let mut sum = 0;
    for _ in 0..n {
        let g = rcu::read_lock();
        sum += cell.read(&g).0;
        drop(g);
    }
    sum
}

#[inline(never)]
fn idle_qemu(n: u64) -> u64 {
    let mut sum = 0;
    for _ in 0..n {
        qemu_read_lock();
        sum += plain_value();
        qemu_read_unlock();
    }
    sum
}

#[inline(never)]
fn idle_bare_tls(n: u64) -> u64 {
    let mut sum = 0;
    for _ in 0..n {
        BARE.with(|c| c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed));
        sum += plain_value();
    }
    sum
}

#[inline(never)]
fn idle_epoch(n: u64) -> u64 {
    let atomic = &*EPOCH_VALUE; // the LazyLock checked once, outside the loop
    let mut sum = 0;
    for _ in 0..n {
        let guard = crossbeam_epoch::pin();
        let s = atomic.load(Ordering::Acquire, &guard);
        // SAFETY: the value is never replaced, so never freed.
        sum += unsafe { s.deref() }.0;
    }
    sum
}

#[inline(never)]
fn idle_seize(n: u64) -> u64 {
    use seize::Guard;
    let (collector, ptr) = (&*SEIZE, &*SEIZE_VALUE); // LazyLocks checked once
    let mut sum = 0;
    for _ in 0..n {
        let guard = collector.enter();
        let p = guard.protect(ptr, Ordering::Acquire);
        // SAFETY: the value is never replaced, so never retired.
        sum += unsafe { &*p }.0;
    }
    sum
}

#[inline(never)]
fn idle_arcswap(n: u64) -> u64 {
    let value = &*ARCSWAP_VALUE; // the LazyLock checked once, outside the loop
    let mut sum = 0;
    for _ in 0..n {
        sum += value.load().0;
    }
    sum
}

#[inline(never)]
fn idle_rwlock(n: u64) -> u64 {
    let mut sum = 0;
    for _ in 0..n {
        sum += RWLOCK_VALUE.read().unwrap_or_else(|e| e.into_inner()).0;
    }
    sum
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Idle {
    RcuMemb,
    RcuFenced,
    Liburcu(Flavour),
    Qemu,
    Floor,
    BareTls,
    Epoch,
    Seize,
    ArcSwap,
    RwLock,
}

const IDLE: [Idle; 11] = [
    Idle::RcuMemb,
    Idle::RcuFenced,
    Idle::Liburcu(Flavour::Memb),
    Idle::Liburcu(Flavour::Mb),
    Idle::Qemu,
    Idle::Floor,
    Idle::BareTls,
    Idle::Epoch,
    Idle::Seize,
    Idle::ArcSwap,
    Idle::RwLock,
];

impl Idle {
    fn name(self) -> &'static str {
        match self {
            Idle::RcuMemb => "rcu (membarrier reader)",
            Idle::RcuFenced => "rcu (fenced reader)",
            Idle::Liburcu(Flavour::Memb) => "liburcu-memb (C loop)",
            Idle::Liburcu(Flavour::Mb) => "liburcu-mb (C loop)",
            Idle::Qemu => "QEMU-style depth++ (Rust)",
            Idle::Floor => "snapshot store only (floor)",
            Idle::BareTls => "bare TLS++ + deref",
            Idle::Epoch => "crossbeam-epoch pin",
            Idle::Seize => "seize enter+protect",
            Idle::ArcSwap => "arc-swap load",
            Idle::RwLock => "std RwLock read",
        }
    }
    /// Per-thread preparation outside the timed loop: registration, mode.
    fn setup(self) {
        match self {
            Idle::RcuMemb | Idle::RcuFenced => {
                rcu::set_reader_mode(if self == Idle::RcuFenced {
                    ReaderMode::Fenced
                } else {
                    ReaderMode::Membarrier
                });
                drop(rcu::read_lock());
            }
            Idle::Liburcu(f) => f.register(),
            _ => {}
        }
        black_box(self.run(1000));
    }
    fn teardown(self) {
        if let Idle::Liburcu(f) = self {
            f.unregister();
        }
    }
    fn run(self, n: u64) -> u64 {
        match self {
            Idle::RcuMemb | Idle::RcuFenced => idle_rcu(n),
            Idle::Liburcu(f) => f.read_loop(n),
            Idle::Qemu => idle_qemu(n),
            Idle::Floor => idle_floor(n),
            Idle::BareTls => idle_bare_tls(n),
            Idle::Epoch => idle_epoch(n),
            Idle::Seize => idle_seize(n),
            Idle::ArcSwap => idle_arcswap(n),
            Idle::RwLock => idle_rwlock(n),
        }
    }
}

// ---------------------------------------------------------------------------
// Publish loops: readers return (sum, sections); writers return swaps.

#[inline(never)]
fn pub_read_rcu() -> (u64, u64) {
    let cell = &*RCU_PAGE; // the LazyLock checked once, outside the loop
    let (mut sum, mut n) = (0, 0);
    while !stopped() {
        for _ in 0..STOP_EVERY {
            let g = rcu::read_lock();
            sum += cell.read(&g)[LAST];
            drop(g);
        }
        n += STOP_EVERY;
    }
    (sum, n)
}

#[inline(never)]
fn pub_read_epoch() -> (u64, u64) {
    let atomic = &*EPOCH_PAGE; // the LazyLock checked once, outside the loop
    let (mut sum, mut n) = (0, 0);
    while !stopped() {
        for _ in 0..STOP_EVERY {
            let guard = crossbeam_epoch::pin();
            let s = atomic.load(Ordering::Acquire, &guard);
            // SAFETY: loaded under `guard`; the writer frees old pages only
            // through `defer_destroy`, after every such guard is gone.
            sum += unsafe { s.deref() }[LAST];
        }
        n += STOP_EVERY;
    }
    (sum, n)
}

#[inline(never)]
fn pub_read_seize() -> (u64, u64) {
    use seize::Guard;
    let (collector, ptr) = (&*SEIZE, &*SEIZE_PAGE); // LazyLocks checked once
    let (mut sum, mut n) = (0, 0);
    while !stopped() {
        for _ in 0..STOP_EVERY {
            let guard = collector.enter();
            let p = guard.protect(ptr, Ordering::Acquire);
            // SAFETY: protected by `guard`; the writer frees old pages only
            // through `retire`.
            sum += unsafe { &*p }[LAST];
        }
        n += STOP_EVERY;
    }
    (sum, n)
}

#[inline(never)]
fn pub_read_arcswap() -> (u64, u64) {
    let value = &*ARCSWAP_PAGE; // the LazyLock checked once, outside the loop
    let (mut sum, mut n) = (0, 0);
    while !stopped() {
        for _ in 0..STOP_EVERY {
            sum += value.load()[LAST];
        }
        n += STOP_EVERY;
    }
    (sum, n)
}

#[inline(never)]
fn pub_read_rwlock() -> (u64, u64) {
    let (mut sum, mut n) = (0, 0);
    while !stopped() {
        for _ in 0..STOP_EVERY {
            sum += RWLOCK_PAGE.read().unwrap_or_else(|e| e.into_inner())[LAST];
        }
        n += STOP_EVERY;
    }
    (sum, n)
}

#[inline(never)]
fn pub_write_rcu() -> u64 {
    let cell = &*RCU_PAGE; // the LazyLock checked once, outside the loop
    let mut n = 0;
    while !stopped() {
        n += 1;
        cell.replace_with(|| [n; 512]);
    }
    n
}

/// The synchronous form: swap, `synchronize_rcu`, drop the old page here.
/// Logs what its grace periods cost (outside the timed loop).
fn pub_write_sync_rcu() -> u64 {
    let s0 = rcu::stats();
    let n = pub_write_sync_rcu_loop();
    let s1 = rcu::stats();
    let gps = (s1.grace_periods - s0.grace_periods).max(1) as f64;
    eprintln!(
        "  rcu synchronous writer: {n} swaps, {:.2} membarriers, {:.2} reader waits, \
         {:.3} sleeps per grace period",
        (s1.membarriers - s0.membarriers) as f64 / gps,
        (s1.reader_waits - s0.reader_waits) as f64 / gps,
        (s1.gp_sleeps - s0.gp_sleeps) as f64 / gps,
    );
    n
}

/// What the paced writer does at each tick (`RCU_BENCH_PACED_WORK`, read
/// once per row): `swap` (the default: swap, grace period, free), `sync`
/// (a grace period only) or `none` (nothing: what a spinning writer alone
/// costs the reader). For attributing the paced row's reader figures.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PacedWork {
    Swap,
    Sync,
    Nothing,
    Membarrier,
    /// The other side's grace period: liburcu's for our reader and ours
    /// for liburcu's, to tell a reader that suffers from grace periods
    /// from a writer whose grace periods hurt.
    Cross,
}

fn paced_work() -> PacedWork {
    match std::env::var("RCU_BENCH_PACED_WORK").as_deref() {
        Ok("sync") => PacedWork::Sync,
        Ok("none") => PacedWork::Nothing,
        Ok("membarrier") => PacedWork::Membarrier,
        Ok("cross") => PacedWork::Cross,
        _ => PacedWork::Swap,
    }
}

/// The paced synchronous writer of every side: starts one unit of work
/// ([`paced_work`]) every `PACE_NS`, spinning in between; `swap(n)` swaps
/// in page `n`, waits for a grace period and frees, `sync()` only waits for
/// one. One Rust loop for both sides, so the writer spins alike on both.
#[inline(never)]
fn pub_write_paced(swap: impl Fn(u64), sync: impl Fn(), other_sync: impl Fn()) -> u64 {
    let work = paced_work();
    let period = Duration::from_nanos(PACE_NS);
    let mut next = Instant::now();
    let mut n = 0;
    while !stopped() {
        if Instant::now() < next {
            std::hint::spin_loop();
            continue;
        }
        next += period;
        n += 1;
        match work {
            PacedWork::Swap => swap(n),
            PacedWork::Sync => sync(),
            PacedWork::Cross => other_sync(),
            PacedWork::Nothing => {}
            PacedWork::Membarrier => {
                // SAFETY: membarrier takes integers only.
                unsafe { libc::syscall(libc::SYS_membarrier, 1 << 3, 0) };
            }
        }
    }
    n
}

fn pub_write_paced_rcu() -> u64 {
    pub_write_paced(
        |n| RCU_PAGE.replace_sync([n; 512]),
        rcu::synchronize_rcu,
        || urcu::shim_sync_loop(1),
    )
}

#[inline(never)]
fn pub_write_sync_rcu_loop() -> u64 {
    let cell = &*RCU_PAGE; // the LazyLock checked once, outside the loop
    let mut n = 0;
    while !stopped() {
        n += 1;
        cell.replace_sync([n; 512]);
    }
    n
}

#[inline(never)]
fn pub_write_epoch() -> u64 {
    let atomic = &*EPOCH_PAGE; // the LazyLock checked once, outside the loop
    let mut n = 0;
    while !stopped() {
        n += 1;
        let guard = crossbeam_epoch::pin();
        let old = atomic.swap(
            crossbeam_epoch::Owned::from(page_box(n)),
            Ordering::AcqRel,
            &guard,
        );
        // SAFETY: `old` is unreachable now; readers that still hold it are
        // pinned, and defer_destroy waits for them.
        unsafe { guard.defer_destroy(old) };
    }
    n
}

#[inline(never)]
fn pub_write_seize() -> u64 {
    // The LazyLocks checked once, outside the loop.
    let (page, collector) = (&*SEIZE_PAGE, &*SEIZE);
    let mut n = 0;
    while !stopped() {
        n += 1;
        let old = page.swap(Box::into_raw(page_box(n)), Ordering::AcqRel);
        // SAFETY: `old` came from `Box::into_raw` and is unreachable now;
        // `retire` waits for the guards that may hold it.
        unsafe { collector.retire(old, seize::reclaim::boxed) };
    }
    n
}

#[inline(never)]
fn pub_write_arcswap() -> u64 {
    let swap = &*ARCSWAP_PAGE; // the LazyLock checked once, outside the loop
    let mut n = 0;
    while !stopped() {
        n += 1;
        // Copied once into the Arc: no stable way to build in an `Arc`'s
        // allocation was found (the optimiser does not know it writable).
        swap.store(std::sync::Arc::new(page(n)));
    }
    n
}

#[inline(never)]
fn pub_write_rwlock() -> u64 {
    let mut n = 0;
    while !stopped() {
        n += 1;
        *RWLOCK_PAGE.write().unwrap_or_else(|e| e.into_inner()) = [n; 512];
    }
    n
}

fn pub_write_paced_urcu(f: Flavour) -> u64 {
    pub_write_paced(
        |n| f.page_swap_sync(n),
        || f.sync_loop(1),
        rcu::synchronize_rcu,
    )
}

/// The paced synchronous writers' period: 20 k swaps per second, well below
/// what either side's writer reaches, so both readers pay for the same
/// number of grace periods.
const PACE_NS: u64 = 50_000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Publish {
    RcuMemb,
    RcuFenced,
    Liburcu(Flavour),
    Epoch,
    Seize,
    ArcSwap,
    RwLock,
}

const PUBLISH: [Publish; 8] = [
    Publish::RcuMemb,
    Publish::RcuFenced,
    Publish::Liburcu(Flavour::Memb),
    Publish::Liburcu(Flavour::Mb),
    Publish::Epoch,
    Publish::Seize,
    Publish::ArcSwap,
    Publish::RwLock,
];

impl Publish {
    fn name(self) -> &'static str {
        match self {
            Publish::RcuMemb => "rcu (membarrier reader)",
            Publish::RcuFenced => "rcu (fenced reader)",
            Publish::Liburcu(Flavour::Memb) => "liburcu-memb (C loops)",
            Publish::Liburcu(Flavour::Mb) => "liburcu-mb (C loops)",
            Publish::Epoch => "crossbeam-epoch",
            Publish::Seize => "seize",
            Publish::ArcSwap => "arc-swap",
            Publish::RwLock => "std RwLock",
        }
    }
    fn reader_setup(self) {
        match self {
            Publish::RcuMemb | Publish::RcuFenced => {
                rcu::set_reader_mode(if self == Publish::RcuFenced {
                    ReaderMode::Fenced
                } else {
                    ReaderMode::Membarrier
                });
                drop(rcu::read_lock());
            }
            Publish::Liburcu(f) => f.register(),
            _ => {}
        }
    }
    /// Registers the writer where its side needs it (liburcu, for
    /// call_rcu and synchronize_rcu). The synchronous rcu writer registers
    /// too, as a fenced reader like the grace-period rows' caller, so both
    /// sides' grace periods run from a registered thread.
    fn writer_setup(self, sync: bool) {
        match self {
            Publish::Liburcu(f) => f.register(),
            Publish::RcuMemb | Publish::RcuFenced if sync => {
                rcu::set_reader_mode(ReaderMode::Fenced);
                drop(rcu::read_lock());
            }
            _ => {}
        }
    }
    fn teardown(self) {
        if let Publish::Liburcu(f) = self {
            f.unregister();
        }
    }
    fn read(self) -> (u64, u64) {
        match self {
            Publish::RcuMemb | Publish::RcuFenced => pub_read_rcu(),
            Publish::Liburcu(f) => f.page_read(),
            Publish::Epoch => pub_read_epoch(),
            Publish::Seize => pub_read_seize(),
            Publish::ArcSwap => pub_read_arcswap(),
            Publish::RwLock => pub_read_rwlock(),
        }
    }
    fn write(self) -> u64 {
        match self {
            Publish::RcuMemb | Publish::RcuFenced => pub_write_rcu(),
            Publish::Liburcu(f) => f.page_write(),
            Publish::Epoch => pub_write_epoch(),
            Publish::Seize => pub_write_seize(),
            Publish::ArcSwap => pub_write_arcswap(),
            Publish::RwLock => pub_write_rwlock(),
        }
    }
    /// The synchronous writer: the old value is freed on the writer thread
    /// once no reader can hold it, with no helper thread. `None` for peers
    /// without such a form (crossbeam-epoch and seize only defer). arc-swap
    /// and the lock are synchronous already: their loops are the same as in
    /// the deferred row.
    fn write_sync(self) -> Option<u64> {
        match self {
            Publish::RcuMemb | Publish::RcuFenced => Some(pub_write_sync_rcu()),
            Publish::Liburcu(f) => Some(f.page_write_sync()),
            Publish::Epoch | Publish::Seize => None,
            Publish::ArcSwap => Some(pub_write_arcswap()),
            Publish::RwLock => Some(pub_write_rwlock()),
        }
    }
    fn has_sync_form(self) -> bool {
        !matches!(self, Publish::Epoch | Publish::Seize)
    }
    /// The synchronous writer at a fixed rate (`PACE_NS`): rcu and liburcu
    /// only.
    fn write_paced(self) -> Option<u64> {
        match self {
            Publish::RcuMemb | Publish::RcuFenced => Some(pub_write_paced_rcu()),
            Publish::Liburcu(f) => Some(pub_write_paced_urcu(f)),
            _ => None,
        }
    }

    /// Waits until the old values queued by the writer are freed, outside
    /// the timed window, so one peer's backlog does not burden the next.
    fn drain(self) {
        match self {
            Publish::RcuMemb | Publish::RcuFenced => rcu::drain_call_rcu(),
            Publish::Liburcu(f) => f.barrier(),
            _ => {}
        }
    }
}

/// How the publish rows' writer frees old values.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Writer {
    /// call_rcu (and each peer's deferred form).
    Deferred,
    /// Swap, wait for a grace period, free, on the writer thread.
    Sync,
    /// As `Sync`, one swap every `PACE_NS`.
    Paced,
}

// ---------------------------------------------------------------------------
// Grace periods and callbacks.

#[inline(never)]
fn sync_rcu_loop(n: u64) {
    for _ in 0..n {
        rcu::synchronize_rcu();
    }
}

/// Set by a grace-period row's reader thread once it is registered.
static READY: AtomicBool = AtomicBool::new(false);

static CALLBACK_DONE: AtomicBool = AtomicBool::new(false);

#[inline(never)]
fn call_latency_rcu(n: u64, force: bool) {
    for _ in 0..n {
        CALLBACK_DONE.store(false, Ordering::Relaxed);
        rcu::call_rcu(|| CALLBACK_DONE.store(true, Ordering::Release));
        if force {
            rcu::force_rcu();
        }
        while !CALLBACK_DONE.load(Ordering::Acquire) {
            std::hint::spin_loop();
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Grace {
    RcuMemb,
    RcuFenced,
    Liburcu(Flavour),
}

const GRACE: [Grace; 4] = [
    Grace::RcuMemb,
    Grace::RcuFenced,
    Grace::Liburcu(Flavour::Memb),
    Grace::Liburcu(Flavour::Mb),
];

impl Grace {
    fn name(self) -> &'static str {
        match self {
            Grace::RcuMemb => "rcu (membarrier reader)",
            Grace::RcuFenced => "rcu (fenced reader)",
            Grace::Liburcu(Flavour::Memb) => "liburcu-memb (C loop)",
            Grace::Liburcu(Flavour::Mb) => "liburcu-mb (C loop)",
        }
    }
    /// The other reader thread: registered, then idle or busy until STOP.
    /// Returns its CPU time over wall time from registration to STOP (about
    /// 1.0 for a busy reader that really ran throughout).
    fn reader(self, busy: bool) -> f64 {
        match self {
            Grace::RcuMemb | Grace::RcuFenced => {
                rcu::set_reader_mode(if self == Grace::RcuFenced {
                    ReaderMode::Fenced
                } else {
                    ReaderMode::Membarrier
                });
                drop(rcu::read_lock());
                let (c0, t0) = (thread_cpu_time(), Instant::now());
                READY.store(true, Ordering::Release);
                while !stopped() {
                    if busy {
                        let g = rcu::read_lock();
                        for _ in 0..50 {
                            std::hint::spin_loop();
                        }
                        drop(g);
                    } else {
                        thread::sleep(Duration::from_millis(1));
                    }
                }
                (thread_cpu_time() - c0).as_secs_f64() / t0.elapsed().as_secs_f64()
            }
            Grace::Liburcu(f) => {
                f.register();
                let (c0, t0) = (thread_cpu_time(), Instant::now());
                READY.store(true, Ordering::Release);
                if busy {
                    f.busy_reader();
                } else {
                    while !stopped() {
                        thread::sleep(Duration::from_millis(1));
                    }
                }
                let frac = (thread_cpu_time() - c0).as_secs_f64() / t0.elapsed().as_secs_f64();
                f.unregister();
                frac
            }
        }
    }
    fn sync(self, n: u64) {
        match self {
            Grace::RcuMemb | Grace::RcuFenced => sync_rcu_loop(n),
            Grace::Liburcu(f) => f.sync_loop(n),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Callback {
    RcuForce,
    RcuLazy,
    Liburcu,
}

const CALLBACK: [Callback; 3] = [Callback::RcuForce, Callback::RcuLazy, Callback::Liburcu];

impl Callback {
    fn name(self) -> &'static str {
        match self {
            Callback::RcuForce => "rcu call_rcu + force_rcu",
            Callback::RcuLazy => "rcu call_rcu (lazy)",
            Callback::Liburcu => "liburcu-memb call_rcu (C loop)",
        }
    }
    fn run(self, n: u64) {
        match self {
            Callback::RcuForce => call_latency_rcu(n, true),
            Callback::RcuLazy => call_latency_rcu(n, false),
            Callback::Liburcu => urcu::shim_call_latency_loop(n),
        }
    }
}

// ---------------------------------------------------------------------------
// Measurement.

/// One thread's timed window.
#[derive(Clone, Copy)]
struct Window {
    cpu: Duration,
    wall: Duration,
    start: Instant,
    end: Instant,
    /// The thread's sleeps (voluntary context switches) and preemptions
    /// (involuntary ones) in the window, read just outside it.
    sleeps: u64,
    preemptions: u64,
}

fn timed<R>(f: impl FnOnce() -> R) -> (Window, R) {
    let (v0, n0) = rcu_bench::own_switches();
    let c0 = thread_cpu_time();
    let start = Instant::now();
    let r = f();
    let end = Instant::now();
    let cpu = thread_cpu_time() - c0;
    let (v1, n1) = rcu_bench::own_switches();
    (
        Window {
            cpu,
            wall: end - start,
            start,
            end,
            sleeps: v1.saturating_sub(v0),
            preemptions: n1.saturating_sub(n0),
        },
        r,
    )
}

/// Both threads ran on a CPU for ≥ 90 % of their windows, and the windows
/// overlap by ≥ 90 % of the longer one.
fn parallel(a: &Window, b: &Window) -> bool {
    let busy = |w: &Window| w.cpu.as_secs_f64() >= 0.9 * w.wall.as_secs_f64();
    let overlap = a
        .end
        .min(b.end)
        .saturating_duration_since(a.start.max(b.start));
    busy(a) && busy(b) && overlap.as_secs_f64() >= 0.9 * a.wall.max(b.wall).as_secs_f64()
}

/// Each thread's CPU/wall fraction and the windows' overlap, for the log.
fn busy_note(a: &Window, b: &Window) -> String {
    let frac = |w: &Window| w.cpu.as_secs_f64() / w.wall.as_secs_f64().max(1e-9);
    let overlap = a
        .end
        .min(b.end)
        .saturating_duration_since(a.start.max(b.start));
    format!(
        "CPU/wall {:.2} and {:.2}, overlap {:.2}; sleeps {} and {}, preemptions {} and {}",
        frac(a),
        frac(b),
        overlap.as_secs_f64() / a.wall.max(b.wall).as_secs_f64().max(1e-9),
        a.sleeps,
        b.sleeps,
        a.preemptions,
        b.preemptions
    )
}

/// Runs `peer`'s idle loop on `threads` threads at once; the CPU ns per
/// section (mean over the threads), or `None` if two threads did not run in
/// parallel.
fn idle_once(peer: Idle, threads: usize, n: u64) -> Option<f64> {
    let barrier = Barrier::new(threads);
    let windows: Vec<Window> = thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    peer.setup();
                    barrier.wait();
                    let (w, sum) = timed(|| peer.run(n));
                    black_box(sum);
                    peer.teardown();
                    w
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("bench thread"))
            .collect()
    });
    if threads == 2 && !parallel(&windows[0], &windows[1]) {
        eprintln!(
            "  idle read x2, {}: not parallel ({})",
            peer.name(),
            busy_note(&windows[0], &windows[1])
        );
        return None;
    }
    let ns: f64 = windows
        .iter()
        .map(|w| w.cpu.as_nanos() as f64 / n as f64)
        .sum();
    Some(ns / windows.len() as f64)
}

/// Which thread of a two-thread row is being pinned.
#[derive(Clone, Copy)]
enum PinRole {
    Reader,
    Writer,
}

/// Pins the calling thread as `RCU_BENCH_PIN` asks (see
/// [`rcu_bench::pinning`]); says once on stderr if it cannot.
fn pin(role: PinRole) {
    let Some((r, w)) = rcu_bench::pinning() else {
        return;
    };
    let cpu = match role {
        PinRole::Reader => r,
        PinRole::Writer => w,
    };
    if let Err(e) = rcu_bench::pin_current_thread(cpu) {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| eprintln!("peers: cannot pin to CPU {cpu}: {e}"));
    }
}

/// One publish run's figures.
struct PublishRun {
    /// Reader M sections per CPU second and writer k swaps per CPU second,
    /// or `None` if the two did not run in parallel.
    rates: Option<(f64, f64)>,
    /// Wake-ups per wall second of the process's other threads (a
    /// reclamation thread such as call_rcu's) while the two ran, counted
    /// alike for every peer (see [`rcu_bench::voluntary_switches`]).
    wakeups_per_s: f64,
}

/// One publish run of `dur`.
fn publish_once(peer: Publish, dur: Duration, mode: Writer) -> PublishRun {
    STOP.store(0, Ordering::Relaxed);
    let barrier = Barrier::new(3);
    let tids = [AtomicI32::new(0), AtomicI32::new(0)];
    let (r, w, wakeups_per_s) = thread::scope(|s| {
        let reader = s.spawn(|| {
            pin(PinRole::Reader);
            peer.reader_setup();
            tids[0].store(rcu_bench::thread_id(), Ordering::Relaxed);
            barrier.wait();
            let (w, (sum, n)) = timed(|| peer.read());
            black_box(sum);
            peer.teardown();
            (w, n)
        });
        let writer = s.spawn(|| {
            pin(PinRole::Writer);
            peer.writer_setup(mode != Writer::Deferred);
            tids[1].store(rcu_bench::thread_id(), Ordering::Relaxed);
            barrier.wait();
            let (w, n) = timed(|| match mode {
                Writer::Deferred => peer.write(),
                Writer::Sync => peer.write_sync().unwrap_or(0),
                Writer::Paced => peer.write_paced().unwrap_or(0),
            });
            if mode == Writer::Deferred {
                peer.drain();
            }
            peer.teardown();
            (w, n)
        });
        barrier.wait();
        let before = rcu_bench::voluntary_switches();
        let t0 = Instant::now();
        thread::sleep(dur);
        let after = rcu_bench::voluntary_switches();
        let window = t0.elapsed();
        STOP.store(1, Ordering::Relaxed);
        let exclude = [
            tids[0].load(Ordering::Relaxed),
            tids[1].load(Ordering::Relaxed),
            rcu_bench::thread_id(),
        ];
        let wakeups = rcu_bench::wakeups_between(&before, &after, &exclude);
        (
            reader.join().expect("reader"),
            writer.join().expect("writer"),
            wakeups as f64 / window.as_secs_f64(),
        )
    });
    if !parallel(&r.0, &w.0) {
        eprintln!(
            "  publish{}, {}: not parallel ({})",
            match mode {
                Writer::Deferred => "",
                Writer::Sync => " (synchronous)",
                Writer::Paced => " (synchronous, paced)",
            },
            peer.name(),
            busy_note(&r.0, &w.0)
        );
        return PublishRun {
            rates: None,
            wakeups_per_s,
        };
    }
    PublishRun {
        rates: Some((
            r.1 as f64 / r.0.cpu.as_secs_f64() / 1e6,
            w.1 as f64 / w.0.cpu.as_secs_f64() / 1e3,
        )),
        wakeups_per_s,
    }
}

/// Wall µs per `synchronize_rcu` from this (registered) thread while one
/// other registered reader is idle or busy, and that reader's CPU/wall.
fn grace_once(peer: Grace, busy: bool, n: u64) -> (f64, f64) {
    STOP.store(0, Ordering::Relaxed);
    READY.store(false, Ordering::Relaxed);
    thread::scope(|s| {
        let reader = s.spawn(|| peer.reader(busy));
        // Wait until the reader is registered, then let it settle.
        while !READY.load(Ordering::Acquire) {
            thread::sleep(Duration::from_millis(1));
        }
        thread::sleep(Duration::from_millis(20));
        let (w, ()) = timed(|| peer.sync(n));
        STOP.store(1, Ordering::Relaxed);
        let frac = reader.join().expect("reader");
        (w.wall.as_secs_f64() * 1e6 / n as f64, frac)
    })
}

/// Wall µs from queueing a callback to seeing it run.
fn callback_once(peer: Callback, n: u64) -> f64 {
    let (w, ()) = timed(|| peer.run(n));
    w.wall.as_secs_f64() * 1e6 / n as f64
}

/// Iterations for about `target` of work, from a trial of `trial` iterations
/// taking `took`.
fn scale(trial: u64, took: Duration, target: Duration, min: u64) -> u64 {
    let per = took.as_secs_f64() / trial as f64;
    ((target.as_secs_f64() / per.max(1e-12)) as u64).max(min)
}

// ---------------------------------------------------------------------------
// Results and the table.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Unit {
    Ns,
    Us,
    MPerS,
    KPerS,
    PerS,
}

impl Unit {
    fn suffix(self) -> &'static str {
        match self {
            Unit::Ns => "ns",
            Unit::Us => "µs",
            Unit::MPerS => "M/s",
            Unit::KPerS => "k/s",
            Unit::PerS => "/s",
        }
    }
}

struct Row {
    title: String,
    unit: Unit,
    /// Peer name → one entry per round (`None`: not parallel that round).
    peers: Vec<(&'static str, Vec<Option<f64>>)>,
    reference: &'static str,
    floor: Option<&'static str>,
    /// Per peer, the other reader's CPU/wall in each round (grace periods).
    notes: Vec<(&'static str, Vec<f64>)>,
    /// Further comparisons printed under the table: (peer, against).
    pairs: Vec<(&'static str, &'static str)>,
}

impl Row {
    fn new(title: &str, unit: Unit, reference: &'static str) -> Self {
        Self {
            title: title.to_string(),
            unit,
            peers: Vec::new(),
            reference,
            floor: None,
            notes: Vec::new(),
            pairs: Vec::new(),
        }
    }
    fn push(&mut self, peer: &'static str, v: Option<f64>) {
        match self.peers.iter_mut().find(|(p, _)| *p == peer) {
            Some((_, vs)) => vs.push(v),
            None => self.peers.push((peer, vec![v])),
        }
    }
    fn note(&mut self, peer: &'static str, v: f64) {
        match self.notes.iter_mut().find(|(p, _)| *p == peer) {
            Some((_, vs)) => vs.push(v),
            None => self.notes.push((peer, vec![v])),
        }
    }
    fn values(&self, peer: &str) -> Option<&Vec<Option<f64>>> {
        self.peers.iter().find(|(p, _)| *p == peer).map(|(_, v)| v)
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

/// Median over rounds of `a / b`, counting rounds where both counted.
fn ratio(a: &[Option<f64>], b: &[Option<f64>]) -> Option<f64> {
    median(
        a.iter()
            .zip(b)
            .filter_map(|(x, y)| Some(x.as_ref()? / y.as_ref()?))
            .collect(),
    )
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn print_row(row: &Row) {
    if row.peers.is_empty() {
        return;
    }
    println!("\n{} [{}]", row.title, row.unit.suffix());
    let floor_hdr = if row.floor.is_some() { "vs TLS++" } else { "" };
    let note_hdr = if row.notes.is_empty() {
        ""
    } else {
        "rdr CPU/wall"
    };
    println!(
        "  {:<32} {:>9} {:>19} {:>4} {:>10} {:>9} {note_hdr}",
        "peer", "median", "range", "par", "vs liburcu", floor_hdr
    );
    let reference = row.values(row.reference);
    let floor = row.floor.and_then(|f| row.values(f));
    for (peer, vs) in &row.peers {
        let ok: Vec<f64> = vs.iter().flatten().copied().collect();
        let par = format!("{}/{}", ok.len(), vs.len());
        let Some(m) = median(ok.clone()) else {
            println!("  {peer:<32} {:>9} {:>19} {par:>4}", "not parallel", "");
            continue;
        };
        let lo = ok.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ok.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let times = |r: f64| {
            if r < 0.1 {
                format!("{r:.4}×")
            } else {
                format!("{r:.2}×")
            }
        };
        let r = reference
            .and_then(|r| ratio(vs, r))
            .map(times)
            .unwrap_or_default();
        let f = floor
            .and_then(|f| ratio(vs, f))
            .map(times)
            .unwrap_or_default();
        let note = row
            .notes
            .iter()
            .find(|(p, _)| p == peer)
            .and_then(|(_, v)| median(v.clone()))
            .map(|v| format!("{v:.2}"))
            .unwrap_or_default();
        println!(
            "  {peer:<32} {:>9} {:>19} {par:>4} {r:>10} {f:>9} {note:>12}",
            fmt(m),
            format!("{}–{}", fmt(lo), fmt(hi)),
        );
    }
    for (peer, against) in &row.pairs {
        if let (Some(vs), Some(other)) = (row.values(peer), row.values(against))
            && let Some(r) = ratio(vs, other)
        {
            println!("  {peer} vs {against}: {r:.2}× (median of per-round ratios)");
        }
    }
}

// ---------------------------------------------------------------------------
// The machine-code check.

/// Prints how the timed read loops of both sides reach TLS, from the
/// disassembly of this executable; an error if any calls `__tls_get_addr`.
fn check_tls() -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let dump = objdump(&exe)?;
    let funcs = functions(&dump);
    println!(
        "TLS in the timed loops (objdump -d -C of {}):",
        exe.display()
    );
    let mut bad = Vec::new();
    for needle in [
        "shim_read_loop",
        "shim_page_read_until",
        "shim_mb_read_loop",
        "shim_mb_page_read_until",
        "idle_rcu",
        "pub_read_rcu",
        "idle_qemu",
        "idle_floor",
    ] {
        let Some(f) = find(&funcs, needle) else {
            return Err(format!("{needle} not found in the disassembly"));
        };
        let (name, u) = (&f.name, tls_use(&f.body));
        println!(
            "  {name:<36} {:>4} insns, {:>2} %fs accesses, {} __tls_get_addr; calls: {}",
            u.instructions,
            u.fs_accesses,
            u.tls_get_addr,
            if u.callees.is_empty() {
                "none".to_string()
            } else {
                let names: Vec<&str> = u.callees.iter().map(|(_, n)| n.as_str()).collect();
                names.join(", ")
            }
        );
        if u.tls_get_addr > 0 {
            bad.push(name.clone());
        }
        // One level down: a read_lock that was not inlined.
        for (addr, callee) in &u.callees {
            if let Some(cf) = at(&funcs, *addr) {
                let cu = tls_use(&cf.body);
                if cu.tls_get_addr > 0 {
                    bad.push(callee.clone());
                }
                println!(
                    "    -> {callee:<33} {:>4} insns, {:>2} %fs accesses, {} __tls_get_addr",
                    cu.instructions, cu.fs_accesses, cu.tls_get_addr
                );
            }
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "__tls_get_addr in a timed loop: {}",
            bad.join(", ")
        ))
    }
}

fn shell(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn main() {
    if rcu_bench::SHIM_ARCHIVES.is_none() {
        eprintln!("peers: {NO_LIBURCU}");
        std::process::exit(1);
    }
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --all-targets` runs this without `--bench`: a smoke run.
    let quick = args.iter().any(|a| a == "quick") || !args.iter().any(|a| a == "--bench");
    // Row groups named on the command line run alone; none named: all.
    let groups = ["idle", "publish", "sync", "paced", "grace", "callback"];
    let named: Vec<&str> = groups
        .into_iter()
        .filter(|g| args.iter().any(|a| a == g))
        .collect();
    let want = |g: &str| named.is_empty() || named.contains(&g);
    let rounds = if quick { 1 } else { 5 };
    let (idle_target, pub_dur, grace_target) = if quick {
        (
            Duration::from_millis(5),
            Duration::from_millis(30),
            Duration::from_millis(10),
        )
    } else {
        (
            Duration::from_millis(100),
            Duration::from_millis(500),
            Duration::from_millis(200),
        )
    };

    println!(
        "rcu-bench peers: {} · {} CPUs · load before: {}",
        shell("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]),
        thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    println!(
        "profile overrides at build time: lto={} codegen-units={} (unset: the workspace's [profile.bench])",
        option_env!("CARGO_PROFILE_BENCH_LTO").unwrap_or("unset"),
        option_env!("CARGO_PROFILE_BENCH_CODEGEN_UNITS").unwrap_or("unset"),
    );
    if let Err(e) = check_tls() {
        eprintln!("peers: {e}");
        std::process::exit(1);
    }

    // Through `black_box`: otherwise the compiler sees that PLAIN_PTR only
    // ever holds null or &PLAIN_VALUE (whose content is constant), drops
    // the load and the dereference from the QEMU-style and bare loops and
    // folds their sum to 7 * n, which made the floor one `inc` per section.
    PLAIN_PTR.store(
        black_box(std::ptr::from_ref(&PLAIN_VALUE).cast_mut()),
        Ordering::Release,
    );
    Flavour::Memb.init(7);
    Flavour::Mb.init(7);
    LazyLock::force(&SEIZE_VALUE);
    // The grace-period caller is registered once, on both sides. Ours is a
    // fenced reader, so whether our grace periods issue membarrier depends
    // only on the other reader's mode, as in a VMM whose vCPUs read fenced.
    Flavour::Memb.register();
    Flavour::Mb.register();
    rcu::set_reader_mode(ReaderMode::Fenced);
    drop(rcu::read_lock());

    // Calibration: iterations per peer for the target time.
    let idle_n: Vec<u64> = IDLE
        .iter()
        .map(|&p| {
            let trial = 200_000;
            let t = idle_once(p, 1, trial).unwrap_or(1.0) * trial as f64;
            scale(trial, Duration::from_nanos(t as u64), idle_target, 1000)
        })
        .collect();
    let grace_n: Vec<[u64; 2]> = GRACE
        .iter()
        .map(|&p| {
            [false, true].map(|busy| {
                let (us, _) = grace_once(p, busy, 5);
                scale(1, Duration::from_secs_f64(us / 1e6), grace_target, 3)
            })
        })
        .collect();
    let callback_n: Vec<u64> = CALLBACK
        .iter()
        .map(|&p| {
            let us = callback_once(p, 2);
            scale(1, Duration::from_secs_f64(us / 1e6), grace_target, 2)
        })
        .collect();

    let mut idle1 = Row::new(
        "idle read, 1 thread: lock + dereference + unlock, thread CPU time per section",
        Unit::Ns,
        Idle::Liburcu(Flavour::Memb).name(),
    );
    let mut idle2 = Row::new(
        "idle read, 2 threads at once: per section per thread",
        Unit::Ns,
        Idle::Liburcu(Flavour::Memb).name(),
    );
    idle1.floor = Some(Idle::BareTls.name());
    idle2.floor = Some(Idle::BareTls.name());
    for row in [&mut idle1, &mut idle2] {
        row.pairs
            .push((Idle::RcuFenced.name(), Idle::Liburcu(Flavour::Mb).name()));
    }
    let mut pub_r = Row::new(
        "publish 4 KiB: reader sections per reader CPU second, writer replacing continuously",
        Unit::MPerS,
        Publish::Liburcu(Flavour::Memb).name(),
    );
    let mut pub_w = Row::new(
        "publish 4 KiB: writer swaps per writer CPU second (same runs)",
        Unit::KPerS,
        Publish::Liburcu(Flavour::Memb).name(),
    );
    let mut pub_wake = Row::new(
        "publish 4 KiB: wake-ups per second of the process's other threads (the \
         reclamation thread, e.g. call_rcu's; fewer is better), same runs, every round",
        Unit::PerS,
        Publish::Liburcu(Flavour::Memb).name(),
    );
    let mut sync_r = Row::new(
        "publish 4 KiB, synchronous writer (swap, synchronize_rcu, free; 2 threads): \
         reader sections per reader CPU second",
        Unit::MPerS,
        Publish::Liburcu(Flavour::Memb).name(),
    );
    let mut sync_w = Row::new(
        "publish 4 KiB, synchronous writer: writer swaps per writer CPU second (same runs)",
        Unit::KPerS,
        Publish::Liburcu(Flavour::Memb).name(),
    );
    let mut paced_r = Row::new(
        "publish 4 KiB, synchronous writer paced to 20 k swaps/s (same grace periods on \
         both sides): reader sections per reader CPU second",
        Unit::MPerS,
        Publish::Liburcu(Flavour::Memb).name(),
    );
    let mut grace_idle = Row::new(
        "synchronize_rcu, one other registered reader idle: wall time per call",
        Unit::Us,
        Grace::Liburcu(Flavour::Memb).name(),
    );
    let mut grace_busy = Row::new(
        "synchronize_rcu, one other registered reader busy: wall time per call",
        Unit::Us,
        Grace::Liburcu(Flavour::Memb).name(),
    );
    let mut callback = Row::new(
        "call_rcu -> callback run, caller spinning: wall time per call",
        Unit::Us,
        Callback::Liburcu.name(),
    );

    // Our fenced mode (the VMM's vCPU readers) against the flavour whose
    // readers fence too.
    for row in [
        &mut pub_r,
        &mut pub_w,
        &mut sync_r,
        &mut sync_w,
        &mut paced_r,
    ] {
        row.pairs.push((
            Publish::RcuFenced.name(),
            Publish::Liburcu(Flavour::Mb).name(),
        ));
    }
    for row in [&mut grace_idle, &mut grace_busy] {
        row.pairs
            .push((Grace::RcuFenced.name(), Grace::Liburcu(Flavour::Mb).name()));
    }

    for round in 0..rounds {
        eprintln!("round {}/{rounds} (load {})", round + 1, loadavg());
        // Rotate the order, so no peer always runs first or last.
        let rot = |len: usize, i: usize| (i + round) % len;
        for i in 0..IDLE.len() * usize::from(want("idle")) {
            let k = rot(IDLE.len(), i);
            let p = IDLE[k];
            idle1.push(p.name(), idle_once(p, 1, idle_n[k]));
            idle2.push(p.name(), idle_once(p, 2, idle_n[k]));
        }
        for i in 0..PUBLISH.len() * usize::from(want("publish")) {
            let p = PUBLISH[rot(PUBLISH.len(), i)];
            let r = publish_once(p, pub_dur, Writer::Deferred);
            pub_r.push(p.name(), r.rates.map(|r| r.0));
            pub_w.push(p.name(), r.rates.map(|r| r.1));
            pub_wake.push(p.name(), Some(r.wakeups_per_s));
        }
        for i in 0..PUBLISH.len() * usize::from(want("sync")) {
            let p = PUBLISH[rot(PUBLISH.len(), i)];
            if !p.has_sync_form() {
                continue;
            }
            let r = publish_once(p, pub_dur, Writer::Sync).rates;
            sync_r.push(p.name(), r.map(|r| r.0));
            sync_w.push(p.name(), r.map(|r| r.1));
        }
        for i in 0..PUBLISH.len() * usize::from(want("paced")) {
            let p = PUBLISH[rot(PUBLISH.len(), i)];
            if !matches!(
                p,
                Publish::RcuMemb | Publish::RcuFenced | Publish::Liburcu(_)
            ) {
                continue;
            }
            let r = publish_once(p, pub_dur, Writer::Paced).rates;
            paced_r.push(p.name(), r.map(|r| r.0));
        }
        for i in 0..GRACE.len() * usize::from(want("grace")) {
            let k = rot(GRACE.len(), i);
            let p = GRACE[k];
            let (us, frac) = grace_once(p, false, grace_n[k][0]);
            grace_idle.push(p.name(), Some(us));
            grace_idle.note(p.name(), frac);
            let (us, frac) = grace_once(p, true, grace_n[k][1]);
            grace_busy.push(p.name(), Some(us));
            grace_busy.note(p.name(), frac);
        }
        for i in 0..CALLBACK.len() * usize::from(want("callback")) {
            let k = rot(CALLBACK.len(), i);
            let p = CALLBACK[k];
            callback.push(p.name(), Some(callback_once(p, callback_n[k])));
        }
    }
    // Rows in a fixed order (the first round's rotation set the push order).
    for row in [
        &mut idle1,
        &mut idle2,
        &mut pub_r,
        &mut pub_w,
        &mut pub_wake,
        &mut sync_r,
        &mut sync_w,
        &mut paced_r,
        &mut grace_idle,
        &mut grace_busy,
        &mut callback,
    ] {
        let order: Vec<&str> = IDLE
            .iter()
            .map(|p| p.name())
            .chain(PUBLISH.iter().map(|p| p.name()))
            .chain(GRACE.iter().map(|p| p.name()))
            .chain(CALLBACK.iter().map(|p| p.name()))
            .collect();
        row.peers
            .sort_by_key(|(p, _)| order.iter().position(|o| o == p).unwrap_or(usize::MAX));
        print_row(row);
    }
    println!(
        "\nrounds: {rounds} · load after: {} · vs liburcu: median of per-round ratios \
         (lower is better for ns/µs, higher for M/s and k/s) · par: rounds that counted",
        loadavg()
    );
    // What our grace periods did over the whole run, to attribute the rows:
    // a grace period that had to ask a reader to report (a wake request)
    // costs that reader a futex wake when it leaves its section.
    let st = rcu::stats();
    println!(
        "rcu over this run: {} grace periods ({} by synchronize_rcu, {} shared), {} reader \
         waits, {} wake requests, {} sleeps, {} membarriers ({} not needed)",
        st.grace_periods,
        st.synchronize_rcu,
        st.shared_grace_periods,
        st.reader_waits,
        st.wake_requests,
        st.gp_sleeps,
        st.membarriers,
        st.membarriers_skipped
    );
    Flavour::Memb.unregister();
    Flavour::Mb.unregister();
}
