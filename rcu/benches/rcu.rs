//! Criterion benchmarks of the RCU core against its peers, all in one run:
//! liburcu's memb flavour (through a C shim, so its inline fast path is what
//! is measured), crossbeam-epoch, arc-swap, `std::sync::RwLock` and
//! parking_lot's `RwLock`.
//!
//! `cargo bench -p rcu` runs everything and ends with a side-by-side table
//! (read from criterion's estimates). `cargo bench -p rcu -- <filter>` runs a
//! subset as usual.

use arc_swap::ArcSwap;
use criterion::{BenchmarkId, Criterion, Throughput, black_box};
use rcu::{RcuCell, ReaderMode};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

#[cfg(have_liburcu)]
mod urcu {
    // SAFETY: the signatures match benches/urcu_shim.c. The functions marked
    // `safe` take no pointers and only use liburcu's own state; liburcu
    // requires read-side and call_rcu users to be registered threads, which
    // the benchmarks ensure (an unregistered use is a liburcu assertion, not
    // memory unsafety in this process's Rust code).
    unsafe extern "C" {
        pub safe fn shim_register();
        pub safe fn shim_unregister();
        pub safe fn shim_init_ptr(v: u64);
        pub safe fn shim_read_loop(n: u64) -> u64;
        pub safe fn shim_read_lock();
        pub safe fn shim_read_unlock();
        pub safe fn shim_synchronize();
        pub safe fn shim_call_rcu_loop(n: u64);
        /// Queues a callback that writes 1 to `*done`: `done` must stay valid
        /// until that write is seen.
        pub fn shim_call_rcu_flag(done: *const i32);
        pub safe fn shim_barrier();
    }
}

#[cfg(not(have_liburcu))]
compile_error!("liburcu-dev is not installed: run scripts/install-deps.sh (as root) first");

/// A value behind each mechanism, read with one dereference.
struct Value(u64);

fn rcu_read_loop(cell: &RcuCell<Value>, n: u64) -> u64 {
    let mut sum = 0;
    for _ in 0..n {
        let g = rcu::read_lock();
        sum += black_box(cell.read(&g)).0;
        drop(g);
    }
    sum
}

/// Runs `body(iters)` on `threads` threads at once; returns the wall time of
/// the slowest, i.e. the time per iteration seen by each thread.
fn concurrent<F>(threads: usize, iters: u64, body: F) -> Duration
where
    F: Fn(u64) + Send + Sync + 'static,
{
    let body = Arc::new(body);
    let start = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (body, start) = (Arc::clone(&body), Arc::clone(&start));
            thread::spawn(move || {
                start.wait();
                let t = Instant::now();
                body(iters);
                t.elapsed()
            })
        })
        .collect();
    start.wait();
    handles
        .into_iter()
        .map(|h| h.join().expect("bench thread"))
        .max()
        .unwrap_or_default()
}

fn read_side(c: &mut Criterion) {
    let cell = Arc::new(RcuCell::new(Value(7)));
    urcu::shim_init_ptr(7);
    let epoch_atomic = Arc::new(crossbeam_epoch::Atomic::new(Value(7)));
    let arcswap = Arc::new(ArcSwap::from_pointee(Value(7)));
    let std_rw = Arc::new(std::sync::RwLock::new(Value(7)));
    let pl_rw = Arc::new(parking_lot::RwLock::new(Value(7)));

    for threads in [1usize, 2] {
        let mut g = c.benchmark_group(format!("read_side/{threads}_threads"));
        g.throughput(Throughput::Elements(1));
        {
            let cell = Arc::clone(&cell);
            g.bench_function("rcu (membarrier mode)", move |b| {
                let cell = Arc::clone(&cell);
                b.iter_custom(move |iters| {
                    let cell = Arc::clone(&cell);
                    concurrent(threads, iters, move |n| {
                        rcu::set_reader_mode(ReaderMode::Membarrier);
                        black_box(rcu_read_loop(&cell, n));
                    })
                });
            });
        }
        {
            let cell = Arc::clone(&cell);
            g.bench_function("rcu (fenced mode)", move |b| {
                let cell = Arc::clone(&cell);
                b.iter_custom(move |iters| {
                    let cell = Arc::clone(&cell);
                    concurrent(threads, iters, move |n| {
                        rcu::set_reader_mode(ReaderMode::Fenced);
                        black_box(rcu_read_loop(&cell, n));
                    })
                });
            });
        }
        g.bench_function("liburcu memb", |b| {
            b.iter_custom(|iters| {
                concurrent(threads, iters, |n| {
                    urcu::shim_register();
                    black_box(urcu::shim_read_loop(n));
                    urcu::shim_unregister();
                })
            });
        });
        {
            let a = Arc::clone(&epoch_atomic);
            g.bench_function("crossbeam-epoch pin", move |b| {
                let a = Arc::clone(&a);
                b.iter_custom(move |iters| {
                    let a = Arc::clone(&a);
                    concurrent(threads, iters, move |n| {
                        let mut sum = 0;
                        for _ in 0..n {
                            let guard = crossbeam_epoch::pin();
                            let s = a.load(Ordering::Acquire, &guard);
                            // SAFETY: the value is never replaced or freed
                            // while the benchmark runs.
                            sum += unsafe { s.deref() }.0;
                        }
                        black_box(sum);
                    })
                });
            });
        }
        {
            let a = Arc::clone(&arcswap);
            g.bench_function("arc-swap load", move |b| {
                let a = Arc::clone(&a);
                b.iter_custom(move |iters| {
                    let a = Arc::clone(&a);
                    concurrent(threads, iters, move |n| {
                        let mut sum = 0;
                        for _ in 0..n {
                            sum += black_box(a.load()).0;
                        }
                        black_box(sum);
                    })
                });
            });
        }
        {
            let l = Arc::clone(&std_rw);
            g.bench_function("std RwLock read", move |b| {
                let l = Arc::clone(&l);
                b.iter_custom(move |iters| {
                    let l = Arc::clone(&l);
                    concurrent(threads, iters, move |n| {
                        let mut sum = 0;
                        for _ in 0..n {
                            sum += black_box(l.read().expect("not poisoned")).0;
                        }
                        black_box(sum);
                    })
                });
            });
        }
        {
            let l = Arc::clone(&pl_rw);
            g.bench_function("parking_lot RwLock read", move |b| {
                let l = Arc::clone(&l);
                b.iter_custom(move |iters| {
                    let l = Arc::clone(&l);
                    concurrent(threads, iters, move |n| {
                        let mut sum = 0;
                        for _ in 0..n {
                            sum += black_box(l.read()).0;
                        }
                        black_box(sum);
                    })
                });
            });
        }
        g.finish();
    }
}

/// A reader thread running until dropped: either busy (entering and
/// leaving read sections in a loop) or holding one section open.
struct ReaderThread {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl ReaderThread {
    /// Keeps entering and leaving `rcu` read sections, in `mode`.
    fn busy_rcu(mode: ReaderMode) -> Self {
        Self::spawn(move |stop| {
            rcu::set_reader_mode(mode);
            while !stop.load(Ordering::Relaxed) {
                let g = rcu::read_lock();
                for _ in 0..50 {
                    std::hint::spin_loop();
                }
                drop(g);
            }
        })
    }
    /// Keeps entering and leaving liburcu read sections.
    fn busy_urcu() -> Self {
        Self::spawn(|stop| {
            urcu::shim_register();
            while !stop.load(Ordering::Relaxed) {
                urcu::shim_read_lock();
                for _ in 0..50 {
                    std::hint::spin_loop();
                }
                urcu::shim_read_unlock();
            }
            urcu::shim_unregister();
        })
    }
    /// Holds one `rcu` read section open.
    fn held_rcu() -> Self {
        Self::spawn(|stop| {
            let g = rcu::read_lock();
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(1));
            }
            drop(g);
        })
    }
    /// Holds one liburcu read section open.
    fn held_urcu() -> Self {
        Self::spawn(|stop| {
            urcu::shim_register();
            urcu::shim_read_lock();
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(1));
            }
            urcu::shim_read_unlock();
            urcu::shim_unregister();
        })
    }
    fn spawn(f: impl FnOnce(Arc<AtomicBool>) + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let handle = thread::spawn(move || f(s));
        thread::sleep(Duration::from_millis(20));
        Self {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for ReaderThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn synchronize(c: &mut Criterion) {
    let mut g = c.benchmark_group("synchronize_rcu");
    for busy in [0usize, 1] {
        {
            let _r = (busy == 1).then(|| ReaderThread::busy_rcu(ReaderMode::Membarrier));
            g.bench_function(BenchmarkId::new("rcu, membarrier-mode reader", busy), |b| {
                b.iter(rcu::synchronize_rcu)
            });
        }
        {
            let _r = (busy == 1).then(|| ReaderThread::busy_rcu(ReaderMode::Fenced));
            g.bench_function(BenchmarkId::new("rcu, fenced reader", busy), |b| {
                b.iter(rcu::synchronize_rcu)
            });
        }
        {
            let _r = (busy == 1).then(ReaderThread::busy_urcu);
            urcu::shim_register();
            g.bench_function(BenchmarkId::new("liburcu memb", busy), |b| {
                b.iter(|| urcu::shim_synchronize())
            });
            urcu::shim_unregister();
        }
    }
    g.finish();
}

/// Enqueue throughput, in two situations: with the call_rcu thread free to
/// consume callbacks as they arrive (it then contends with the producer for
/// the queue's cache lines and the allocator's arena), and with a reader
/// holding a read section, so the thread sits in its grace period and the
/// producer runs alone (liburcu's thread also sleeps 10 ms between batches).
fn enqueue(c: &mut Criterion) {
    let mut g = c.benchmark_group("call_rcu_enqueue");
    g.throughput(Throughput::Elements(1));
    for held in [false, true] {
        let suffix = if held { ", reader in section" } else { "" };
        {
            let holder = held.then(ReaderThread::held_rcu);
            g.bench_function(format!("rcu{suffix}"), |b| {
                b.iter_custom(|iters| {
                    // One allocation per callback (the node holding the
                    // closure), as liburcu's side allocates one rcu_head.
                    let t = Instant::now();
                    for i in 0..iters {
                        rcu::call_rcu(move || {
                            black_box(i);
                        });
                    }
                    t.elapsed()
                })
            });
            drop(holder);
            rcu::drain_call_rcu();
        }
        {
            let holder = held.then(ReaderThread::held_urcu);
            urcu::shim_register();
            g.bench_function(format!("liburcu memb{suffix}"), |b| {
                b.iter_custom(|iters| {
                    let t = Instant::now();
                    urcu::shim_call_rcu_loop(iters);
                    t.elapsed()
                })
            });
            drop(holder);
            urcu::shim_barrier();
            urcu::shim_unregister();
        }
    }
    g.finish();
}

fn call_to_callback(c: &mut Criterion) {
    let mut g = c.benchmark_group("call_to_callback");
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(3));
    for force in [true, false] {
        let name = if force {
            "rcu + force_rcu"
        } else {
            "rcu (lazy)"
        };
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let done = Arc::new(AtomicBool::new(false));
                    let d = Arc::clone(&done);
                    let t = Instant::now();
                    rcu::call_rcu(move || d.store(true, Ordering::Release));
                    if force {
                        rcu::force_rcu();
                    }
                    while !done.load(Ordering::Acquire) {
                        std::hint::spin_loop();
                    }
                    total += t.elapsed();
                }
                total
            })
        });
    }
    urcu::shim_register();
    g.bench_function("liburcu memb", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let done = AtomicI32::new(0);
                let t = Instant::now();
                // SAFETY: the callback writes `done`, which outlives it
                // (we wait for the write below).
                unsafe { urcu::shim_call_rcu_flag(done.as_ptr()) };
                while done.load(Ordering::Acquire) == 0 {
                    std::hint::spin_loop();
                }
                total += t.elapsed();
            }
            total
        })
    });
    urcu::shim_unregister();
    g.finish();
}

type Page = [u8; 4096];

/// The publish pattern: one writer replaces a 4 KiB value as fast as it can
/// while a reader reads it; both sides are measured.
fn publish(c: &mut Criterion) {
    let mut g = c.benchmark_group("publish_4KiB");
    let new_page = |i: u64| -> Box<Page> { Box::new([i as u8; 4096]) };

    // Writer cost while a reader runs.
    {
        let cell = Arc::new(RcuCell::new(*new_page(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (cell, stop) = (Arc::clone(&cell), Arc::clone(&stop));
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let gd = rcu::read_lock();
                    black_box(cell.read(&gd)[4095]);
                }
            })
        };
        let mut i = 0u64;
        g.bench_function("writer: rcu RcuCell::replace", |b| {
            b.iter(|| {
                i += 1;
                cell.replace(*new_page(i));
            })
        });
        stop.store(true, Ordering::Relaxed);
        let _ = reader.join();
        rcu::drain_call_rcu();
    }
    {
        let a = Arc::new(ArcSwap::from_pointee(*new_page(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (a, stop) = (Arc::clone(&a), Arc::clone(&stop));
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    black_box(a.load()[4095]);
                }
            })
        };
        let mut i = 0u64;
        g.bench_function("writer: arc-swap store", |b| {
            b.iter(|| {
                i += 1;
                a.store(Arc::new(*new_page(i)));
            })
        });
        stop.store(true, Ordering::Relaxed);
        let _ = reader.join();
    }
    {
        let l = Arc::new(std::sync::RwLock::new(new_page(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (l, stop) = (Arc::clone(&l), Arc::clone(&stop));
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    black_box(l.read().expect("not poisoned")[4095]);
                }
            })
        };
        let mut i = 0u64;
        g.bench_function("writer: std RwLock write", |b| {
            b.iter(|| {
                i += 1;
                *l.write().expect("not poisoned") = new_page(i);
            })
        });
        stop.store(true, Ordering::Relaxed);
        let _ = reader.join();
    }

    // Reader cost while a writer replaces.
    {
        let cell = Arc::new(RcuCell::new(*new_page(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (cell, stop) = (Arc::clone(&cell), Arc::clone(&stop));
            thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    cell.replace(*new_page(i));
                    thread::sleep(Duration::from_micros(10));
                }
            })
        };
        g.bench_function("reader: rcu read", |b| {
            b.iter(|| {
                let gd = rcu::read_lock();
                black_box(cell.read(&gd)[4095])
            })
        });
        stop.store(true, Ordering::Relaxed);
        let _ = writer.join();
    }
    {
        let a = Arc::new(ArcSwap::from_pointee(*new_page(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (a, stop) = (Arc::clone(&a), Arc::clone(&stop));
            thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    a.store(Arc::new(*new_page(i)));
                    thread::sleep(Duration::from_micros(10));
                }
            })
        };
        g.bench_function("reader: arc-swap load", |b| {
            b.iter(|| black_box(a.load()[4095]))
        });
        stop.store(true, Ordering::Relaxed);
        let _ = writer.join();
    }
    {
        let l = Arc::new(std::sync::RwLock::new(new_page(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (l, stop) = (Arc::clone(&l), Arc::clone(&stop));
            thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    *l.write().expect("not poisoned") = new_page(i);
                    thread::sleep(Duration::from_micros(10));
                }
            })
        };
        g.bench_function("reader: std RwLock read", |b| {
            b.iter(|| black_box(l.read().expect("not poisoned")[4095]))
        });
        stop.store(true, Ordering::Relaxed);
        let _ = writer.join();
    }
    g.finish();
}

/// Prints every benchmark's point estimate, grouped, from criterion's
/// output directory, so the peers can be read side by side.
fn summary(started: std::time::SystemTime) {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("criterion");
    let mut rows = Vec::new();
    collect(&dir, &dir, started, &mut rows);
    if rows.is_empty() {
        return;
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    println!("\n{:<60} {:>14}", "benchmark", "time");
    let mut group = String::new();
    for (name, ns) in rows {
        let (g, rest) = name.split_once('/').unwrap_or((&name, ""));
        if g != group {
            println!("{g}");
            group = g.to_string();
        }
        println!("  {:<58} {:>14}", rest, human(ns));
    }
}

fn collect(
    root: &std::path::Path,
    dir: &std::path::Path,
    started: std::time::SystemTime,
    rows: &mut Vec<(String, f64)>,
) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.file_name().is_some_and(|n| n == "report") {
            continue;
        }
        let est = p.join("new/estimates.json");
        if est.exists() {
            // Only what this run measured.
            let fresh = std::fs::metadata(&est)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= started);
            if !fresh {
                continue;
            }
            let bench = p.join("new/benchmark.json");
            let name = std::fs::read_to_string(&bench)
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .and_then(|v| v["full_id"].as_str().map(str::to_string))
                .unwrap_or_else(|| p.strip_prefix(root).unwrap_or(&p).display().to_string());
            let ns = std::fs::read_to_string(&est)
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .and_then(|v| v["median"]["point_estimate"].as_f64());
            if let Some(ns) = ns {
                rows.push((name, ns));
            }
        } else if p.is_dir() {
            collect(root, &p, started, rows);
        }
    }
}

fn human(ns: f64) -> String {
    if ns < 1_000.0 {
        format!("{ns:.2} ns")
    } else if ns < 1_000_000.0 {
        format!("{:.2} us", ns / 1e3)
    } else {
        format!("{:.2} ms", ns / 1e6)
    }
}

fn main() {
    let started = std::time::SystemTime::now();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        .configure_from_args();
    read_side(&mut c);
    synchronize(&mut c);
    enqueue(&mut c);
    call_to_callback(&mut c);
    publish(&mut c);
    c.final_summary();
    summary(started);
}
