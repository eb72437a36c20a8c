//! A torture test in the style of the kernel's rcutorture.
//!
//! Objects come from a fixed pool and are never returned to the allocator,
//! so a reader that holds a "freed" object reads valid memory and can tell:
//! each object carries a state (LIVE or FREED) and a generation bumped on
//! every reuse. Writers publish fresh objects into a few slots and retire the
//! old ones, half through `call_rcu` (with occasional `force_rcu`), half
//! through `synchronize_rcu`; retiring marks the object FREED and puts it back
//! in the pool for reuse. Readers, in both reader modes, take an object inside
//! a read section, check it is LIVE, spin a little, and check again that it is
//! still LIVE with the same generation. Any failed check is a grace period
//! that ended too early. A second check runs real frees: `RcuCell` values
//! with a checksum, dropped through `call_rcu`.
//!
//! Duration: `RCU_TORTURE_SECS` (default 2; CI runs 10 in release mode).

#![cfg(not(loom))] // The public API is not built under loom; see src/loom_models.rs.
#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use rcu::{RcuCell, ReaderMode};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const LIVE: u64 = 1;
const FREED: u64 = 2;
const POOL: usize = 4096;
const SLOTS: usize = 8;

struct Obj {
    state: AtomicU64,
    generation: AtomicU64,
    /// Written while the object is private to its writer, read by readers.
    payload: AtomicU64,
}

struct Shared {
    pool: Vec<Obj>,
    free: Mutex<Vec<usize>>,
    slots: Vec<AtomicPtr<Obj>>,
    stop: AtomicBool,
    violations: AtomicU64,
    reads: AtomicU64,
    updates: AtomicU64,
    retired_via_call_rcu: AtomicU64,
    retired_via_synchronize: AtomicU64,
    pool_exhausted: AtomicU64,
}

impl Shared {
    fn index_of(&self, p: *const Obj) -> usize {
        (p as usize - self.pool.as_ptr() as usize) / std::mem::size_of::<Obj>()
    }

    /// Marks the object FREED and makes it reusable.
    fn free(&self, idx: usize) {
        self.pool[idx].state.store(FREED, Ordering::Release);
        self.free.lock().unwrap().push(idx);
    }

    fn take_free(&self) -> Option<usize> {
        self.free.lock().unwrap().pop()
    }
}

fn payload_for(idx: usize, generation: u64) -> u64 {
    (idx as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ generation
}

fn reader(sh: &Shared, mode: ReaderMode, seed: u64) {
    rcu::set_reader_mode(mode);
    let mut x = seed | 1;
    while !sh.stop.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let g = rcu::read_lock();
        let p = sh.slots[(x as usize) % SLOTS].load(Ordering::Acquire);
        // SAFETY: pool objects are never deallocated while `sh` lives; what
        // this test checks is whether RCU kept them LIVE.
        let o = unsafe { &*p };
        let gen0 = o.generation.load(Ordering::Acquire);
        let ok1 = o.state.load(Ordering::Acquire) == LIVE
            && o.payload.load(Ordering::Relaxed) == payload_for(sh.index_of(p), gen0);
        // Hold the object for a while, sometimes nesting another section.
        let spin = (x >> 40) % 64;
        for _ in 0..spin {
            std::hint::spin_loop();
        }
        if x & 0x100 != 0 {
            let inner = rcu::read_lock();
            let _ = sh.slots[(x as usize >> 8) % SLOTS].load(Ordering::Acquire);
            drop(inner);
        }
        if x & 0xff == 0 {
            thread::yield_now(); // Get preempted inside the section.
        }
        let ok2 =
            o.state.load(Ordering::Acquire) == LIVE && o.generation.load(Ordering::Acquire) == gen0;
        drop(g);
        if !(ok1 && ok2) {
            sh.violations.fetch_add(1, Ordering::Relaxed);
        }
        sh.reads.fetch_add(1, Ordering::Relaxed);
    }
}

fn writer(sh: &Arc<Shared>, use_call_rcu: bool, seed: u64) {
    let mut x = seed | 1;
    while !sh.stop.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let Some(idx) = sh.take_free() else {
            sh.pool_exhausted.fetch_add(1, Ordering::Relaxed);
            rcu::drain_call_rcu();
            continue;
        };
        let o = &sh.pool[idx];
        let generation = o.generation.load(Ordering::Relaxed) + 1;
        o.generation.store(generation, Ordering::Relaxed);
        o.payload
            .store(payload_for(idx, generation), Ordering::Relaxed);
        o.state.store(LIVE, Ordering::Relaxed);
        let new = std::ptr::from_ref(o).cast_mut();
        // Release: readers that see the pointer see the initialised object.
        let old = sh.slots[(x as usize) % SLOTS].swap(new, Ordering::AcqRel);
        let old_idx = sh.index_of(old);
        sh.updates.fetch_add(1, Ordering::Relaxed);
        if use_call_rcu {
            let sh2 = Arc::clone(sh);
            rcu::call_rcu_labeled("torture retire", move || sh2.free(old_idx));
            sh.retired_via_call_rcu.fetch_add(1, Ordering::Relaxed);
            if x.is_multiple_of(97) {
                rcu::force_rcu();
            }
        } else {
            rcu::synchronize_rcu();
            sh.free(old_idx);
            sh.retired_via_synchronize.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Checksummed value whose drop poisons it, freed for real by `RcuCell`.
#[derive(Clone)]
struct Checked {
    words: Vec<u64>,
}

impl Checked {
    fn new(seed: u64) -> Self {
        let mut words: Vec<u64> = (0..31).map(|i| seed.wrapping_mul(i + 7)).collect();
        let sum = words.iter().fold(0u64, |a, w| a.wrapping_add(*w));
        words.push(sum);
        Self { words }
    }
    fn valid(&self) -> bool {
        let (sum, rest) = self.words.split_last().expect("non-empty");
        rest.iter().fold(0u64, |a, w| a.wrapping_add(*w)) == *sum
    }
}

impl Drop for Checked {
    fn drop(&mut self) {
        for w in &mut self.words {
            *w = 0xdead_beef_dead_beef;
        }
    }
}

#[test]
fn torture() {
    let secs: u64 = std::env::var("RCU_TORTURE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let pool: Vec<Obj> = (0..POOL)
        .map(|_| Obj {
            state: AtomicU64::new(FREED),
            generation: AtomicU64::new(0),
            payload: AtomicU64::new(0),
        })
        .collect();
    let sh = Arc::new(Shared {
        pool,
        free: Mutex::new(Vec::new()),
        slots: Vec::new(),
        stop: AtomicBool::new(false),
        violations: AtomicU64::new(0),
        reads: AtomicU64::new(0),
        updates: AtomicU64::new(0),
        retired_via_call_rcu: AtomicU64::new(0),
        retired_via_synchronize: AtomicU64::new(0),
        pool_exhausted: AtomicU64::new(0),
    });
    // Initial objects for the slots; the rest are free.
    let sh = {
        let mut s = Arc::into_inner(sh).expect("sole owner");
        for i in 0..SLOTS {
            let o = &s.pool[i];
            o.generation.store(1, Ordering::Relaxed);
            o.payload.store(payload_for(i, 1), Ordering::Relaxed);
            o.state.store(LIVE, Ordering::Relaxed);
            let p = std::ptr::from_ref(o).cast_mut();
            s.slots.push(AtomicPtr::new(p));
        }
        *s.free.get_mut().unwrap() = (SLOTS..POOL).collect();
        Arc::new(s)
    };
    let cell = Arc::new(RcuCell::with_label(
        Checked::new(1),
        "torture RcuCell replace",
    ));
    let cell_violations = Arc::new(AtomicU64::new(0));
    let cell_reads = Arc::new(AtomicU64::new(0));

    let before = rcu::stats();
    let start = Instant::now();
    let mut handles = Vec::new();
    for i in 0..4u64 {
        let sh = Arc::clone(&sh);
        let mode = if i % 2 == 0 {
            ReaderMode::Membarrier
        } else {
            ReaderMode::Fenced
        };
        handles.push(thread::spawn(move || reader(&sh, mode, 0x1234_5678 + i)));
    }
    for i in 0..3u64 {
        let sh = Arc::clone(&sh);
        handles.push(thread::spawn(move || writer(&sh, i != 2, 0xabcd_ef01 + i)));
    }
    {
        let (sh, cell, v, n) = (
            Arc::clone(&sh),
            Arc::clone(&cell),
            Arc::clone(&cell_violations),
            Arc::clone(&cell_reads),
        );
        handles.push(thread::spawn(move || {
            while !sh.stop.load(Ordering::Relaxed) {
                let g = rcu::read_lock();
                let c = cell.read(&g);
                let ok = c.valid();
                thread::yield_now();
                let ok = ok && c.valid();
                drop(g);
                if !ok {
                    v.fetch_add(1, Ordering::Relaxed);
                }
                n.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    {
        let (sh, cell) = (Arc::clone(&sh), Arc::clone(&cell));
        handles.push(thread::spawn(move || {
            let mut i = 2;
            while !sh.stop.load(Ordering::Relaxed) {
                cell.replace(Checked::new(i));
                i += 1;
                if i % 64 == 0 {
                    thread::sleep(Duration::from_micros(100));
                }
            }
        }));
    }

    let mut last = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        thread::sleep(Duration::from_millis(100));
        if last.elapsed() >= Duration::from_secs(2) {
            last = Instant::now();
            eprintln!(
                "torture: {:>4.1}s reads {} updates {} violations {}",
                start.elapsed().as_secs_f64(),
                sh.reads.load(Ordering::Relaxed),
                sh.updates.load(Ordering::Relaxed),
                sh.violations.load(Ordering::Relaxed)
            );
        }
    }
    sh.stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().expect("torture thread");
    }
    rcu::drain_call_rcu();
    let after = rcu::stats();
    let site = after
        .by_site
        .iter()
        .find(|s| s.label == "torture retire")
        .map_or(0, |s| s.calls);

    println!("torture: ran {:.1}s", start.elapsed().as_secs_f64());
    println!(
        "torture: pool reads {}  updates {}  retired by call_rcu {}  by synchronize_rcu {}  pool exhausted {}",
        sh.reads.load(Ordering::Relaxed),
        sh.updates.load(Ordering::Relaxed),
        sh.retired_via_call_rcu.load(Ordering::Relaxed),
        sh.retired_via_synchronize.load(Ordering::Relaxed),
        sh.pool_exhausted.load(Ordering::Relaxed),
    );
    println!(
        "torture: RcuCell reads {}  checksum failures {}",
        cell_reads.load(Ordering::Relaxed),
        cell_violations.load(Ordering::Relaxed)
    );
    println!(
        "torture: call_rcu {}  callbacks run {}  grace periods {}  synchronize_rcu {}  force_rcu {}  \
         wake-ups {}  loops {}  reader waits {}  membarriers {}  max latency {} us",
        after.call_rcu - before.call_rcu,
        after.callbacks_run - before.callbacks_run,
        after.grace_periods - before.grace_periods,
        after.synchronize_rcu - before.synchronize_rcu,
        after.force_rcu - before.force_rcu,
        after.wakeups - before.wakeups,
        after.loops - before.loops,
        after.reader_waits - before.reader_waits,
        after.membarriers - before.membarriers,
        after.latency.max_ns / 1000,
    );
    println!(
        "torture: violations {}",
        sh.violations.load(Ordering::Relaxed)
    );

    assert_eq!(
        sh.violations.load(Ordering::Relaxed),
        0,
        "objects freed under readers"
    );
    assert_eq!(
        cell_violations.load(Ordering::Relaxed),
        0,
        "RcuCell values freed under readers"
    );
    assert!(sh.reads.load(Ordering::Relaxed) > 0 && sh.updates.load(Ordering::Relaxed) > 0);
    assert_eq!(site, sh.retired_via_call_rcu.load(Ordering::Relaxed));
    assert_eq!(after.callbacks_run, after.call_rcu);
}
