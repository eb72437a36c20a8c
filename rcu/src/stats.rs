//! Counters, cheap enough to stay on in production.
//!
//! Producers (`call_rcu` callers) touch one per-site counter; everything else
//! is written by the call_rcu thread or by grace periods, with relaxed
//! atomics. A [`Stats`] snapshot is not atomic as a whole: taken while
//! callbacks are being queued, its fields may disagree by the callbacks in
//! flight. After [`drain_call_rcu`](crate::drain_call_rcu) with no other
//! thread queueing, `callbacks_run == call_rcu` exactly.

use serde::Serialize;
use std::panic::Location;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

/// A point-in-time copy of the RCU statistics (see [`stats`](crate::stats)).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    /// The call_rcu thread's wake-up strategy.
    pub wakeup: crate::WakeupStrategy,
    /// Whether readers in `Membarrier` mode rely on `membarrier(2)` (false: the
    /// kernel lacks it, or it was disabled, and every reader fences).
    pub membarrier: bool,
    /// Threads registered as readers now.
    pub readers: u64,
    /// `call_rcu` calls, including those made by `RcuCell` and the marker of
    /// each `drain_call_rcu`.
    pub call_rcu: u64,
    /// Callbacks invoked by the call_rcu thread (counted as each starts).
    pub callbacks_run: u64,
    /// Callbacks that panicked (caught; the thread carried on).
    pub callback_panics: u64,
    /// Grace periods completed: by the call_rcu thread and by
    /// `synchronize_rcu`.
    pub grace_periods: u64,
    /// Explicit `synchronize_rcu` calls.
    pub synchronize_rcu: u64,
    /// Grace-period waits (by `synchronize_rcu` or the call_rcu thread) that
    /// were satisfied by a grace period another caller ran.
    pub shared_grace_periods: u64,
    /// `force_rcu` calls, including those made by `drain_call_rcu`.
    pub force_rcu: u64,
    /// `drain_call_rcu` calls.
    pub drain_call_rcu: u64,
    /// Times the call_rcu thread returned from a wait because it was
    /// notified (by `call_rcu` on an empty queue, or by `force_rcu`).
    pub wakeups: u64,
    /// Of those, wake-ups that found no callback left to handle.
    pub empty_wakeups: u64,
    /// Rounds of the call_rcu thread's wait loop: each read of the pending
    /// count, including those that found the count already handled.
    pub loops: u64,
    /// Batches of callbacks run after one grace period each.
    pub batches: u64,
    /// Of those, batches whose grace period was forced (no batching sleep).
    pub forced_batches: u64,
    /// Largest batch.
    pub max_batch: u64,
    /// 10 ms batching polls that ran to their end (lazy grace periods).
    pub lazy_polls: u64,
    /// Lazy batches held back because the previous batch ended less than a
    /// gap before (sustained load): [`BATCH_GAP`](crate::BATCH_GAP), doubled
    /// after each batch held back, up to
    /// [`MAX_BATCH_GAP`](crate::MAX_BATCH_GAP).
    pub paced_batches: u64,
    /// Of those, batches that stopped waiting because
    /// [`GAP_CAP`](crate::GAP_CAP) callbacks were pending.
    pub capped_gaps: u64,
    /// Passes of a grace period that found a reader still inside a section.
    pub reader_waits: u64,
    /// `membarrier` system calls issued by grace periods.
    pub membarriers: u64,
    /// Grace-period barriers that needed no `membarrier` because no reader
    /// other than the caller relied on it.
    pub membarriers_skipped: u64,
    /// Requests to a reader to report leaving its section: stores into its
    /// slot by a grace period that still waited for it after spinning (one
    /// per such reader and grace period). A grace period never stores into
    /// the slot of a reader it does not wait for.
    pub wake_requests: u64,
    /// Times a grace period went to sleep until a reader it waited for left
    /// its section (after spinning and requesting a report).
    pub gp_sleeps: u64,
    /// Grace periods that a reader kept waiting for over a second.
    pub stalls: u64,
    /// The readers (thread name and id) that did, most recent last (at most
    /// 16, each once).
    pub stalled_readers: Vec<String>,
    /// CPU time used by the call_rcu thread, in nanoseconds.
    pub thread_cpu_ns: u64,
    /// Time from `call_rcu` to the start of its callback.
    pub latency: Latency,
    /// Counts per `call_rcu` call site, most calls first.
    pub by_site: Vec<SiteStats>,
}

/// Call-to-callback latency.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Largest latency seen, in nanoseconds.
    pub max_ns: u64,
    /// Median, as the upper bound of its histogram bucket (capped at the
    /// maximum), in nanoseconds.
    pub p50_ns: u64,
    /// 99th percentile, as the upper bound of its histogram bucket (capped
    /// at the maximum).
    pub p99_ns: u64,
    /// Non-empty buckets: `count` callbacks waited less than `lt_ns` and at
    /// least the previous bucket's bound (buckets are powers of two).
    pub histogram: Vec<Bucket>,
}

/// One histogram bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Bucket {
    /// Exclusive upper bound in nanoseconds.
    pub lt_ns: u64,
    /// Number of callbacks in the bucket.
    pub count: u64,
}

/// Counts for one call site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SiteStats {
    /// `file:line:column` of the `call_rcu` (or `RcuCell::replace`...) call.
    pub site: String,
    /// The label given with the call (`RcuCell::with_label`, ...), or "".
    pub label: String,
    /// Callbacks queued from this site.
    pub calls: u64,
    /// Of those, callbacks run.
    pub run: u64,
}

/// Number of distinct (site, label) pairs tracked individually; further
/// sites are summed in an overflow entry.
#[cfg(not(loom))]
const SITES: usize = 256;
/// Under loom the tables live on the models' small coroutine stacks.
#[cfg(loom)]
const SITES: usize = 8;

const EMPTY: u8 = 0;
const CLAIMING: u8 = 1;
const READY: u8 = 2;

struct SiteEntry {
    /// EMPTY, CLAIMING (key being written) or READY (key readable).
    state: AtomicU8,
    key: OnceLock<(&'static Location<'static>, &'static str)>,
    calls: AtomicU64,
}

impl SiteEntry {
    const fn new() -> Self {
        Self {
            state: AtomicU8::new(EMPTY),
            key: OnceLock::new(),
            calls: AtomicU64::new(0),
        }
    }

    /// Same site and the same label string (by address, as labels are
    /// `'static` literals; equal text at different addresses counts apart).
    fn matches(&self, site: &'static Location<'static>, label: &'static str) -> bool {
        self.key
            .get()
            .is_some_and(|(s, l)| std::ptr::eq(*s, site) && std::ptr::eq(*l, label))
    }
}

/// Lock-free table of per-site counters, open addressing keyed by the
/// address of the `Location` and the label.
pub(crate) struct SiteTable {
    /// Written by producers (`calls`).
    entries: [SiteEntry; SITES],
    overflow_calls: AtomicU64,
    /// Callbacks run per entry, written by the call_rcu thread only. Kept
    /// apart from `entries` so the call_rcu thread never writes a cache line
    /// that producers write (which cost an enqueue a cache-line transfer).
    run: CacheAligned<[AtomicU64; SITES]>,
    overflow_run: CacheAligned<AtomicU64>,
}

/// Aligns its content to its own cache lines.
#[repr(align(128))]
struct CacheAligned<T>(T);

impl std::fmt::Debug for SiteTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteTable").finish_non_exhaustive()
    }
}

/// Index into the table, or `None` for the overflow entry.
pub(crate) type SiteId = Option<usize>;

impl SiteTable {
    pub(crate) const fn new() -> Self {
        Self {
            entries: [const { SiteEntry::new() }; SITES],
            overflow_calls: AtomicU64::new(0),
            run: CacheAligned([const { AtomicU64::new(0) }; SITES]),
            overflow_run: CacheAligned(AtomicU64::new(0)),
        }
    }

    fn find_or_insert(&self, site: &'static Location<'static>, label: &'static str) -> SiteId {
        let h = (site as *const Location<'_> as usize >> 3)
            .wrapping_add(label.as_ptr() as usize)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15_usize);
        let start = (h >> (usize::BITS - 16)) % SITES;
        for i in 0..SITES {
            let idx = (start + i) % SITES;
            let e = &self.entries[idx];
            loop {
                match e.state.load(Ordering::Acquire) {
                    READY if e.matches(site, label) => return Some(idx),
                    READY => break,
                    CLAIMING => std::hint::spin_loop(),
                    _ => {
                        if e.state
                            .compare_exchange(EMPTY, CLAIMING, Ordering::Acquire, Ordering::Relaxed)
                            .is_ok()
                        {
                            // Only the claimer sets the key, exactly once.
                            let _ = e.key.set((site, label));
                            e.state.store(READY, Ordering::Release);
                            return Some(idx);
                        }
                    }
                }
            }
        }
        None
    }

    /// Counts one queued callback from `site`.
    #[inline]
    pub(crate) fn count_call(&self, site: &'static Location<'static>, label: &'static str) {
        match self.find_or_insert(site, label) {
            Some(i) => self.entries[i].calls.fetch_add(1, Ordering::Relaxed),
            None => self.overflow_calls.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Counts one callback run (call_rcu thread only).
    pub(crate) fn count_run(&self, site: &'static Location<'static>, label: &'static str) {
        match self.find_or_insert(site, label) {
            Some(i) => self.run.0[i].fetch_add(1, Ordering::Relaxed),
            None => self.overflow_run.0.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Total calls over all sites.
    pub(crate) fn total_calls(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| e.calls.load(Ordering::Relaxed))
            .sum::<u64>()
            + self.overflow_calls.load(Ordering::Relaxed)
    }

    pub(crate) fn snapshot(&self) -> Vec<SiteStats> {
        let mut v: Vec<SiteStats> = self
            .entries
            .iter()
            .zip(self.run.0.iter())
            .filter(|(e, _)| e.state.load(Ordering::Acquire) == READY)
            .filter_map(|(e, run)| {
                let (site, label) = e.key.get()?;
                Some(SiteStats {
                    site: format!("{}:{}:{}", site.file(), site.line(), site.column()),
                    label: (*label).to_string(),
                    calls: e.calls.load(Ordering::Relaxed),
                    run: run.load(Ordering::Relaxed),
                })
            })
            .collect();
        let (oc, or) = (
            self.overflow_calls.load(Ordering::Relaxed),
            self.overflow_run.0.load(Ordering::Relaxed),
        );
        if oc > 0 || or > 0 {
            v.push(SiteStats {
                site: "(other sites)".to_string(),
                label: String::new(),
                calls: oc,
                run: or,
            });
        }
        v.sort_by(|a, b| b.calls.cmp(&a.calls).then_with(|| a.site.cmp(&b.site)));
        v
    }
}

/// Power-of-two latency histogram, written by one thread.
pub(crate) struct Histogram {
    buckets: [AtomicU64; 64],
    max: AtomicU64,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram").finish_non_exhaustive()
    }
}

impl Histogram {
    pub(crate) const fn new() -> Self {
        Self {
            buckets: [const { AtomicU64::new(0) }; 64],
            max: AtomicU64::new(0),
        }
    }

    /// Records one sample. Single writer: plain load/store pairs suffice.
    pub(crate) fn record(&self, ns: u64) {
        let b = (64 - ns.leading_zeros()) as usize; // 0 for ns == 0
        let b = b.min(63);
        let c = &self.buckets[b];
        c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        if ns > self.max.load(Ordering::Relaxed) {
            self.max.store(ns, Ordering::Relaxed);
        }
    }

    pub(crate) fn snapshot(&self) -> Latency {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let bound = |i: usize| if i >= 63 { u64::MAX } else { 1u64 << i };
        let quantile = |q: f64| -> u64 {
            if total == 0 {
                return 0;
            }
            // Rank of the sample at quantile q, 1-based, rounded up.
            let rank = ((total as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (i, &c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return bound(i);
                }
            }
            u64::MAX
        };
        let max_ns = self.max.load(Ordering::Relaxed);
        Latency {
            max_ns,
            // A bucket's bound can exceed the largest sample in it.
            p50_ns: quantile(0.50).min(max_ns),
            p99_ns: quantile(0.99).min(max_ns),
            histogram: counts
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, &count)| Bucket {
                    lt_ns: bound(i),
                    count,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_powers_of_two_and_quantiles_follow() {
        let h = Histogram::new();
        for _ in 0..98 {
            h.record(1000); // bucket [512, 1024)
        }
        h.record(5000); // [4096, 8192)
        h.record(3_000_000); // [2^21, 2^22)
        let l = h.snapshot();
        assert_eq!(l.max_ns, 3_000_000);
        assert_eq!(l.p50_ns, 1024);
        assert_eq!(l.p99_ns, 8192);
        let h = Histogram::new();
        h.record(1000);
        assert_eq!(h.snapshot().p99_ns, 1000, "capped at the maximum");
        assert_eq!(
            l.histogram,
            vec![
                Bucket {
                    lt_ns: 1024,
                    count: 98
                },
                Bucket {
                    lt_ns: 8192,
                    count: 1
                },
                Bucket {
                    lt_ns: 1 << 22,
                    count: 1
                },
            ]
        );
    }

    #[test]
    fn site_table_counts_per_site_and_label() {
        let t = SiteTable::new();
        let a = Location::caller();
        let b = Location::caller();
        for _ in 0..3 {
            t.count_call(a, "");
        }
        t.count_call(b, "x");
        t.count_call(b, "y");
        t.count_run(a, "");
        let s = t.snapshot();
        assert_eq!(t.total_calls(), 5);
        assert_eq!(s[0].calls, 3);
        assert_eq!(s[0].run, 1);
        assert!(s[0].site.contains("stats.rs"));
        let labels: Vec<&str> = s[1..].iter().map(|e| e.label.as_str()).collect();
        assert!(labels.contains(&"x") && labels.contains(&"y"));
    }

    #[test]
    fn site_table_overflows_into_one_entry() {
        // Locations from a loop body are the same; build distinct ones by
        // using distinct labels with one site.
        let t = SiteTable::new();
        let site = Location::caller();
        let labels: Vec<&'static str> = (0..SITES + 10)
            .map(|i| &*Box::leak(format!("l{i}").into_boxed_str()))
            .collect();
        for l in &labels {
            t.count_call(site, l);
        }
        assert_eq!(t.total_calls(), (SITES + 10) as u64);
        let s = t.snapshot();
        assert_eq!(s.len(), SITES + 1);
        assert!(s.iter().any(|e| e.site == "(other sites)" && e.calls == 10));
    }
}
