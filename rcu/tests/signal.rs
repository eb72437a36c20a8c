//! The read side is async-signal-safe: a signal handler that takes a read
//! section, interrupting the thread's own `read_lock`/`drop` at any point,
//! leaves the interrupted section intact. Two checks: a handler fired at
//! random points by another thread, and (x86-64) a handler run after every
//! single instruction of `read_lock` and of the guard's drop, with the
//! processor's trap flag. Objects come from a pool that is
//! never deallocated and carry a LIVE/FREED state, as in the torture test,
//! so a section that a grace period failed to wait for is seen as a FREED
//! object, without undefined behaviour.

#![cfg(not(loom))] // The public API is not built under loom; see src/loom_models.rs.
#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

// Each test runs alone (`common::exclusive`): they share the pool and the
// counters.
mod common;

use rcu::ReaderMode;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

const LIVE: u64 = 1;
const FREED: u64 = 2;
const POOL: usize = 64;

struct Obj {
    state: AtomicU64,
    generation: AtomicU64,
}

static POOL_OBJS: [Obj; POOL] = [const {
    Obj {
        state: AtomicU64::new(FREED),
        generation: AtomicU64::new(0),
    }
}; POOL];
static CURRENT: AtomicPtr<Obj> = AtomicPtr::new(std::ptr::null_mut());
static STOP: AtomicBool = AtomicBool::new(false);
static VIOLATIONS: AtomicU64 = AtomicU64::new(0);
static HANDLER_SECTIONS: AtomicU64 = AtomicU64::new(0);
static READS: AtomicU64 = AtomicU64::new(0);
fn install(sig: libc::c_int, f: extern "C" fn(libc::c_int)) {
    // SAFETY: all-zero bytes are a valid `sigaction` (plain integers and
    // a signal set).
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = f as usize;
    sa.sa_flags = libc::SA_RESTART;
    // SAFETY: `sa_mask` is a valid, writable signal set.
    unsafe { libc::sigemptyset(&mut sa.sa_mask) };
    // SAFETY: `f` only does async-signal-safe work (atomics and the read
    // side); `sa` is fully initialised; a null old-action pointer is allowed.
    let rc = unsafe { libc::sigaction(sig, &sa, std::ptr::null_mut()) };
    assert_eq!(rc, 0);
}

/// Publishes object `idx` of the pool as the current object and returns the
/// previous one.
fn publish(idx: usize, generation: u64) -> &'static Obj {
    let o = &POOL_OBJS[idx];
    o.generation.store(generation, Ordering::Relaxed);
    o.state.store(LIVE, Ordering::Relaxed);
    let old = CURRENT.swap(std::ptr::from_ref(o).cast_mut(), Ordering::AcqRel);
    if old.is_null() {
        return o;
    }
    // SAFETY: non-null values of CURRENT point into the static pool.
    unsafe { &*old }
}

/// Reads the current object inside a section; counts a violation if it is
/// freed during the section.
fn checked_read(spin: u32) {
    let g = rcu::read_lock();
    // SAFETY: `CURRENT` always points into `POOL_OBJS`, which is static.
    let o = unsafe { &*CURRENT.load(Ordering::Acquire) };
    let gen0 = o.generation.load(Ordering::Acquire);
    let ok1 = o.state.load(Ordering::Acquire) == LIVE;
    for _ in 0..spin {
        std::hint::spin_loop();
    }
    let ok2 =
        o.state.load(Ordering::Acquire) == LIVE && o.generation.load(Ordering::Acquire) == gen0;
    drop(g);
    if !(ok1 && ok2) {
        VIOLATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

extern "C" fn handler(_sig: libc::c_int) {
    // Only atomics and the (async-signal-safe) read side.
    checked_read(0);
    HANDLER_SECTIONS.fetch_add(1, Ordering::Relaxed);
}

fn reader(mode: ReaderMode, tid_out: &AtomicU64) {
    rcu::set_reader_mode(mode);
    drop(rcu::read_lock()); // registered before any handler runs
    // SAFETY: pthread_self has no preconditions.
    tid_out.store(unsafe { libc::pthread_self() } as u64, Ordering::Release);
    let mut i = 0u32;
    while !STOP.load(Ordering::Relaxed) {
        checked_read(8 + (i % 7) * 4);
        READS.fetch_add(1, Ordering::Relaxed);
        i = i.wrapping_add(1);
    }
}

fn writer() {
    let mut next = 1;
    let mut generation = 1;
    while !STOP.load(Ordering::Relaxed) {
        generation += 1;
        let old = publish(next, generation);
        rcu::synchronize_rcu();
        old.state.store(FREED, Ordering::Release);
        next = (next + 1) % POOL;
    }
}

#[test]
fn signal_handler_sections_leave_the_interrupted_section_intact() {
    let _x = common::exclusive();
    let secs: u64 = std::env::var("RCU_SIGNAL_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    STOP.store(false, Ordering::Relaxed);
    publish(0, 1);
    install(libc::SIGUSR1, handler);
    let tids: &'static [AtomicU64; 2] = Box::leak(Box::new([AtomicU64::new(0), AtomicU64::new(0)]));
    // Fenced readers only: grace periods then need no membarrier, so the
    // writer frees at the highest rate (the read side's handling of nesting
    // is the same in both modes).
    let readers: Vec<_> = [ReaderMode::Fenced, ReaderMode::Fenced]
        .into_iter()
        .enumerate()
        .map(|(i, mode)| thread::spawn(move || reader(mode, &tids[i])))
        .collect();
    let w = thread::spawn(writer);
    while tids.iter().any(|t| t.load(Ordering::Acquire) == 0) {
        thread::yield_now();
    }
    let start = Instant::now();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut sent = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let t = tids[(x & 1) as usize].load(Ordering::Acquire);
        // SAFETY: the reader threads run until STOP is set below, so their
        // pthread_t values are live.
        let rc = unsafe { libc::pthread_kill(t as libc::pthread_t, libc::SIGUSR1) };
        assert_eq!(rc, 0);
        sent += 1;
        for _ in 0..(x >> 54) {
            std::hint::spin_loop();
        }
    }
    STOP.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    w.join().unwrap();
    let (v, h, r) = (
        VIOLATIONS.load(Ordering::Relaxed),
        HANDLER_SECTIONS.load(Ordering::Relaxed),
        READS.load(Ordering::Relaxed),
    );
    println!("signals sent {sent}, handler sections {h}, reader sections {r}, violations {v}");
    assert!(h > 0 && r > 0, "nothing ran: handler {h}, reader {r}");
    assert_eq!(v, 0, "objects freed inside a read section");
}

/// Sets or clears the x86 trap flag: while set, the thread gets SIGTRAP
/// after every instruction (the kernel clears the flag for the handler and
/// sigreturn restores it).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn trap_flag(on: bool) {
    if on {
        // SAFETY: pushf/popf on the thread's own stack change only EFLAGS.TF
        // (bit 8); the red zone is skipped so no live stack data is touched.
        unsafe {
            std::arch::asm!(
                "sub rsp, 128",
                "pushfq",
                "or qword ptr [rsp], 0x100",
                "popfq",
                "add rsp, 128"
            );
        }
    } else {
        // SAFETY: as above, clearing the bit.
        unsafe {
            std::arch::asm!(
                "sub rsp, 128",
                "pushfq",
                "and qword ptr [rsp], ~0x100",
                "popfq",
                "add rsp, 128"
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
extern "C" fn trap_handler(_sig: libc::c_int) {
    drop(rcu::read_lock());
    HANDLER_SECTIONS.fetch_add(1, Ordering::Relaxed);
}

/// Deterministic: a handler takes a whole read section after every single
/// instruction of the thread's outermost `read_lock` and of its guard's
/// drop. The interrupted section must still hold off a writer: the object
/// read in it is not freed until the guard drops.
#[cfg(target_arch = "x86_64")]
#[test]
fn section_survives_a_handler_section_after_every_instruction() {
    let _x = common::exclusive();
    install(libc::SIGTRAP, trap_handler);
    for mode in [ReaderMode::Fenced, ReaderMode::Membarrier] {
        publish(1, 100);
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let freed_old = std::sync::Arc::new(AtomicBool::new(false));
        let writer = {
            let freed_old = std::sync::Arc::clone(&freed_old);
            thread::spawn(move || {
                go_rx.recv().unwrap();
                let old = publish(2, 101);
                rcu::synchronize_rcu();
                old.state.store(FREED, Ordering::Release);
                freed_old.store(true, Ordering::SeqCst);
            })
        };
        let reader = thread::spawn(move || {
            rcu::set_reader_mode(mode);
            drop(rcu::read_lock()); // register outside the single-stepping
            let before = HANDLER_SECTIONS.load(Ordering::Relaxed);
            trap_flag(true);
            let g = rcu::read_lock();
            trap_flag(false);
            let stepped = HANDLER_SECTIONS.load(Ordering::Relaxed) - before;
            // SAFETY: CURRENT points into the static pool.
            let o = unsafe { &*CURRENT.load(Ordering::Acquire) };
            let live_at_start = o.state.load(Ordering::Acquire) == LIVE;
            go_tx.send(()).unwrap();
            // Give the writer every chance to free the object too early
            // (no timing is asserted: a correct section is never freed).
            let end = Instant::now() + Duration::from_millis(200);
            while Instant::now() < end && !freed_old.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(1));
            }
            let live_at_end = o.state.load(Ordering::Acquire) == LIVE;
            trap_flag(true);
            drop(g);
            trap_flag(false);
            let stepped_all = HANDLER_SECTIONS.load(Ordering::Relaxed) - before;
            (
                stepped,
                stepped_all,
                live_at_start,
                live_at_end,
                rcu::in_read_section(),
            )
        });
        let (stepped, stepped_all, live_at_start, live_at_end, still_inside) =
            reader.join().unwrap();
        writer.join().unwrap();
        println!("{mode:?}: handler sections during read_lock {stepped}, with drop {stepped_all}");
        assert!(
            stepped > 0 && stepped_all > stepped,
            "the trap flag had no effect"
        );
        assert!(
            live_at_start,
            "{mode:?}: object already freed at the section start"
        );
        assert!(
            live_at_end,
            "{mode:?}: object freed inside the read section"
        );
        assert!(
            !still_inside,
            "{mode:?}: the section did not end with its guard"
        );
    }
}
