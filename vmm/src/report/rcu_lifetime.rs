//! The RCU lifetime record of one VM: how the RCU core's cumulative counters
//! grew from VMM start to the end, with markers for boot, each memory plug
//! and unplug, and the end.
//!
//! The control thread owns a [`LifetimeRecorder`]: it calls
//! [`maybe_sample`](LifetimeRecorder::maybe_sample) from its loop and
//! [`mark`](LifetimeRecorder::mark) (or the helpers built on it) at events.
//! [`report`](LifetimeRecorder::report) gives the [`LifetimeReport`] that
//! `--rcu-stats PATH` writes at exit and `x-query-rcu` returns live: every
//! field of [`rcu::Stats`] at the top level, plus the `timeline`, the
//! `markers` and the uptime.
//!
//! Memory stays bounded however long the VM runs: at most [`MAX_SAMPLES`]
//! samples (older ones are thinned evenly over the lifetime, keeping the
//! first and last samples and those taken at markers) and at most
//! [`MAX_MARKERS`] markers.

use rcu::{SiteStats, Stats};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// Least time between two readings of the counters by
/// [`LifetimeRecorder::maybe_sample`].
pub(crate) const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// Longest stretch without a recorded sample while the counters do not
/// change: a quiet VM still gets one sample per this period, so the
/// timeline shows how long it stayed quiet.
pub(crate) const QUIET_SAMPLE_INTERVAL: Duration = Duration::from_secs(10);

/// Most samples kept. Reaching it thins the timeline to about half.
pub(crate) const MAX_SAMPLES: usize = 4096;

/// Most markers kept. Past it the oldest markers after the first are
/// dropped (and counted in [`LifetimeReport::markers_dropped`]).
pub(crate) const MAX_MARKERS: usize = 1024;

/// Time buckets a thinned timeline is spread over: each keeps its first and
/// last sample, so steps keep their shape.
const THIN_BUCKETS: u64 = (MAX_SAMPLES / 8) as u64;

/// The RCU core's cumulative counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Milliseconds since VMM start.
    pub t_ms: u64,
    /// `call_rcu` calls so far.
    pub call_rcu: u64,
    /// Callbacks run so far.
    pub callbacks_run: u64,
    /// Grace periods completed so far.
    pub grace_periods: u64,
    /// `force_rcu` calls so far.
    pub force_rcu: u64,
    /// call_rcu thread wake-ups so far.
    pub wakeups: u64,
    /// call_rcu thread loop rounds so far.
    pub loops: u64,
    /// Passes of grace periods that found a reader inside a section so far.
    pub reader_waits: u64,
}

impl Sample {
    /// The counters of `s`, stamped `t_ms`.
    pub fn from_stats(t_ms: u64, s: &Stats) -> Self {
        Self {
            t_ms,
            call_rcu: s.call_rcu,
            callbacks_run: s.callbacks_run,
            grace_periods: s.grace_periods,
            force_rcu: s.force_rcu,
            wakeups: s.wakeups,
            loops: s.loops,
            reader_waits: s.reader_waits,
        }
    }

    /// `self`, with its time and each counter raised to `prev`'s where lower:
    /// counters are cumulative and time moves on, whatever the caller's
    /// instants or a snapshot racing with updates say.
    fn not_before(self, prev: &Sample) -> Sample {
        Sample {
            t_ms: self.t_ms.max(prev.t_ms),
            call_rcu: self.call_rcu.max(prev.call_rcu),
            callbacks_run: self.callbacks_run.max(prev.callbacks_run),
            grace_periods: self.grace_periods.max(prev.grace_periods),
            force_rcu: self.force_rcu.max(prev.force_rcu),
            wakeups: self.wakeups.max(prev.wakeups),
            loops: self.loops.max(prev.loops),
            reader_waits: self.reader_waits.max(prev.reader_waits),
        }
    }

    /// Whether the counters (not the time) are equal.
    fn same_counts(&self, other: &Sample) -> bool {
        Sample { t_ms: 0, ..*self } == Sample { t_ms: 0, ..*other }
    }
}

/// What a marker marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MarkerKind {
    /// The first `KVM_RUN` of any vCPU.
    Boot,
    /// Plugged guest memory grew.
    Plug,
    /// Plugged guest memory shrank.
    Unplug,
    /// The VM ended.
    End,
}

impl MarkerKind {
    /// The kind's name as the JSON and the plot spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Boot => "boot",
            Self::Plug => "plug",
            Self::Unplug => "unplug",
            Self::End => "end",
        }
    }
}

/// An event in the VM's life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// Milliseconds since VMM start.
    pub t_ms: u64,
    /// What happened.
    pub kind: MarkerKind,
    /// Details for people: the new plugged size (as `--memory` spells
    /// sizes: "512M"), the end's reason.
    pub detail: String,
    /// Plugged memory after a `plug` or `unplug`, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugged_bytes: Option<u64>,
}

/// The lifetime report: the RCU statistics now, with their history.
///
/// Serialised, the fields of [`rcu::Stats`] (`call_rcu`, `callbacks_run`,
/// `grace_periods`, `latency`, `by_site`, ...) are at the top level, beside
/// `uptime_ms`, `sample_interval_ms`, `markers_dropped`, `timeline` and
/// `markers`.
#[derive(Debug, Clone, Serialize)]
pub struct LifetimeReport {
    /// The RCU statistics when the report was made.
    #[serde(flatten)]
    pub rcu: Stats,
    /// Milliseconds from VMM start to the report.
    pub uptime_ms: u64,
    /// [`SAMPLE_INTERVAL`] in ms: the finest spacing of the timeline.
    pub sample_interval_ms: u64,
    /// Markers dropped to stay within [`MAX_MARKERS`].
    pub markers_dropped: u64,
    /// Samples in time order, counters never decreasing; the last one is
    /// taken with `rcu` at `uptime_ms`.
    pub timeline: Vec<Sample>,
    /// Markers in time order.
    pub markers: Vec<Marker>,
}

/// Records the RCU counters over a VM's life. Owned and used by one thread
/// (the control thread); it never blocks, and each call reads the RCU
/// statistics at most once.
#[derive(Debug)]
pub struct LifetimeRecorder {
    start: Instant,
    samples: Vec<Sample>,
    markers: Vec<Marker>,
    markers_dropped: u64,
    /// When the counters were last read.
    last_read: Option<Instant>,
    /// The newest reading not recorded because it equalled the last
    /// recorded one: recorded before the next change, so a quiet period
    /// shows as flat rather than as a slope.
    held: Option<Sample>,
    /// Plugged memory as last told (0 at start).
    plugged: u64,
}

impl LifetimeRecorder {
    /// A recorder whose times count from `start` (the VMM's start). Takes
    /// no sample yet.
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            samples: Vec::new(),
            markers: Vec::new(),
            markers_dropped: 0,
            last_read: None,
            held: None,
            plugged: 0,
        }
    }

    /// Milliseconds from start to `at` (0 for an earlier `at`).
    fn ms(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.start).as_millis()).unwrap_or(u64::MAX)
    }

    /// How long after `now` the next [`maybe_sample`](Self::maybe_sample)
    /// call would read the counters: a bound for the caller's poll timeout.
    pub fn next_sample_in(&self, now: Instant) -> Duration {
        self.last_read.map_or(Duration::ZERO, |t| {
            (t + SAMPLE_INTERVAL).saturating_duration_since(now)
        })
    }

    /// Reads the RCU counters if [`SAMPLE_INTERVAL`] passed since the last
    /// reading, and records them if they changed (with the last unchanged
    /// reading before them) or if [`QUIET_SAMPLE_INTERVAL`] passed since the
    /// last recorded sample. Returns whether it read them. Cheap to call on
    /// every loop iteration.
    pub fn maybe_sample(&mut self, now: Instant) -> bool {
        if self.next_sample_in(now) > Duration::ZERO {
            return false;
        }
        let s = Sample::from_stats(self.ms(now), &rcu::stats());
        self.observe(now, s, false);
        true
    }

    /// Reads and records the RCU counters now, changed or not.
    pub fn sample_now(&mut self, now: Instant) {
        let s = Sample::from_stats(self.ms(now), &rcu::stats());
        self.observe(now, s, true);
    }

    /// Records a marker at `at` and a sample of the counters (stamped `at`,
    /// or the latest sample's time if that is later). `at` may be slightly
    /// in the past (the first `KVM_RUN` noticed later).
    pub fn mark(&mut self, at: Instant, kind: MarkerKind, detail: impl Into<String>) {
        self.push_marker(at, kind, detail.into(), None);
        self.sample_now(at);
    }

    /// Marks the first `KVM_RUN` (call once).
    pub fn mark_boot(&mut self, at: Instant) {
        self.mark(at, MarkerKind::Boot, "first KVM_RUN");
    }

    /// Tells the plugged hot-plug memory size (all devices together): marks
    /// a `plug` when it grew and an `unplug` when it shrank since the last
    /// call (or since start, when nothing is plugged), nothing when it is
    /// unchanged.
    pub fn plugged_size(&mut self, at: Instant, bytes: u64) {
        let before = std::mem::replace(&mut self.plugged, bytes);
        let kind = match bytes.cmp(&before) {
            std::cmp::Ordering::Greater => MarkerKind::Plug,
            std::cmp::Ordering::Less => MarkerKind::Unplug,
            std::cmp::Ordering::Equal => return,
        };
        self.push_marker(at, kind, crate::cli::size::format_size(bytes), Some(bytes));
        self.sample_now(at);
    }

    /// Marks the end of the VM with its reason (for example "guest powered
    /// off").
    pub fn mark_end(&mut self, at: Instant, reason: &str) {
        self.mark(at, MarkerKind::End, reason);
    }

    /// The report as of `now`: fresh RCU statistics (callbacks still
    /// queued are not waited for: call `rcu::drain_call_rcu()` first for a
    /// final report where every callback has run), the timeline ending with
    /// a sample of those statistics, and the markers.
    pub fn report(&self, now: Instant) -> LifetimeReport {
        self.report_with(now, rcu::stats())
    }

    /// [`report`](Self::report) with statistics the caller already took.
    pub fn report_with(&self, now: Instant, stats: Stats) -> LifetimeReport {
        let last_t = self.samples.last().map_or(0, |s| s.t_ms);
        let held_t = self.held.map_or(0, |s| s.t_ms);
        let uptime_ms = self.ms(now).max(last_t).max(held_t);
        let mut timeline = self.samples.clone();
        let mut fin = Sample::from_stats(uptime_ms, &stats);
        if let Some(l) = timeline.last() {
            fin = fin.not_before(l);
        }
        match timeline.last() {
            Some(l) if *l == fin => {}
            Some(l) if !l.same_counts(&fin) => {
                // Keep the flat stretch flat, as `observe` does.
                if let Some(h) = self.held {
                    timeline.push(h);
                }
                timeline.push(fin);
            }
            _ => timeline.push(fin),
        }
        LifetimeReport {
            rcu: stats,
            uptime_ms,
            sample_interval_ms: u64::try_from(SAMPLE_INTERVAL.as_millis()).unwrap_or(u64::MAX),
            markers_dropped: self.markers_dropped,
            timeline,
            markers: self.markers.clone(),
        }
    }

    /// Records reading `s` taken at `now`; `force` records it even when
    /// nothing changed.
    fn observe(&mut self, now: Instant, s: Sample, force: bool) {
        self.last_read = Some(now);
        let Some(last) = self.samples.last().copied() else {
            self.push_sample(s);
            return;
        };
        let s = s.not_before(&last);
        if !s.same_counts(&last) {
            if let Some(h) = self.held.take() {
                self.push_sample(h);
            }
            self.push_sample(s);
        } else if force || s.t_ms - last.t_ms >= duration_ms(QUIET_SAMPLE_INTERVAL) {
            self.held = None;
            self.push_sample(s);
        } else {
            self.held = Some(s);
        }
    }

    fn push_sample(&mut self, s: Sample) {
        self.samples.push(s);
        if self.samples.len() > MAX_SAMPLES {
            self.thin();
        }
    }

    fn push_marker(&mut self, at: Instant, kind: MarkerKind, detail: String, bytes: Option<u64>) {
        let last = self.markers.last().map_or(0, |m| m.t_ms);
        self.markers.push(Marker {
            t_ms: self.ms(at).max(last),
            kind,
            detail,
            plugged_bytes: bytes,
        });
        if self.markers.len() > MAX_MARKERS {
            self.markers.remove(1);
            self.markers_dropped += 1;
        }
    }

    /// Thins the timeline to at most about half of [`MAX_SAMPLES`]: the
    /// lifetime is cut into [`THIN_BUCKETS`] equal spans, each keeping its
    /// first and last sample; the first and last samples overall and the
    /// first sample at or after each marker are kept too.
    fn thin(&mut self) {
        let n = self.samples.len();
        let (Some(first), Some(last)) = (self.samples.first(), self.samples.last()) else {
            return;
        };
        let t0 = first.t_ms;
        let width = (last.t_ms - t0).div_ceil(THIN_BUCKETS).max(1);
        let bucket = |s: &Sample| (s.t_ms - t0) / width;
        let mut keep = vec![false; n];
        for m in &self.markers {
            let i = self.samples.partition_point(|s| s.t_ms < m.t_ms);
            if let Some(k) = keep.get_mut(i) {
                *k = true;
            }
        }
        for (i, w) in self.samples.windows(2).enumerate() {
            if bucket(&w[0]) != bucket(&w[1]) {
                keep[i] = true; // last of its bucket
                keep[i + 1] = true; // first of the next
            }
        }
        keep[0] = true;
        keep[n - 1] = true;
        let mut k = keep.into_iter();
        self.samples.retain(|_| k.next().unwrap_or(true));
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A short human name for a `call_rcu` call site: its label when it has
/// one (the VMM's "memory map replace", "bus replace", "hot-plug slot
/// unmapped", and the RCU core's "RcuCell::replace" and "drain_call_rcu"),
/// otherwise its file name and line ("memory_manager.rs:243").
pub(crate) fn site_label(site: &SiteStats) -> String {
    if !site.label.is_empty() {
        return site.label.clone();
    }
    short_site(&site.site)
}

/// `path/to/file.rs:line[:column]` shortened to `file.rs:line`; other text
/// (such as "(other sites)") is returned as it is.
pub(crate) fn short_site(site: &str) -> String {
    let mut parts = site.rsplitn(3, ':');
    let (Some(a), Some(b)) = (parts.next(), parts.next()) else {
        return site.to_string();
    };
    // file:line:column, or file:line.
    let (file, line) = match parts.next() {
        Some(file) if b.parse::<u32>().is_ok() => (file, b),
        _ => (b, a),
    };
    if line.parse::<u32>().is_err() {
        return site.to_string();
    }
    let name = file.rsplit(['/', '\\']).next().unwrap_or(file);
    format!("{name}:{line}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    fn counts(t_ms: u64, n: u64) -> Sample {
        Sample {
            t_ms,
            call_rcu: n,
            callbacks_run: n,
            grace_periods: n / 3,
            force_rcu: n / 10,
            wakeups: n / 2,
            loops: n,
            reader_waits: 0,
        }
    }

    /// Feeds `s` as `maybe_sample` would with counters `s`.
    fn feed(r: &mut LifetimeRecorder, now: Instant, s: Sample) -> bool {
        if r.next_sample_in(now) > Duration::ZERO {
            return false;
        }
        r.observe(now, s, false);
        true
    }

    #[test]
    fn recorder_can_move_to_the_control_thread() {
        fn send<T: Send>(_: &T) {}
        send(&LifetimeRecorder::new(Instant::now()));
    }

    #[test]
    fn reads_at_most_once_per_interval() {
        let start = Instant::now();
        let mut r = LifetimeRecorder::new(start);
        assert!(feed(&mut r, at(start, 0), counts(0, 0)));
        assert!(!feed(&mut r, at(start, 50), counts(50, 1)));
        assert_eq!(r.next_sample_in(at(start, 60)), Duration::from_millis(40));
        assert!(feed(&mut r, at(start, 100), counts(100, 1)));
        assert_eq!(
            r.samples.iter().map(|s| s.t_ms).collect::<Vec<_>>(),
            [0, 100]
        );
    }

    #[test]
    fn quiet_period_is_flat_then_steps() {
        let start = Instant::now();
        let mut r = LifetimeRecorder::new(start);
        feed(&mut r, start, counts(0, 5));
        // Unchanged for 2 s: nothing recorded.
        for ms in (100..=2000).step_by(100) {
            feed(&mut r, at(start, ms), counts(ms, 5));
        }
        assert_eq!(r.samples.len(), 1);
        // A change: the last unchanged reading (2000 ms) comes first.
        feed(&mut r, at(start, 2100), counts(2100, 9));
        let t: Vec<(u64, u64)> = r.samples.iter().map(|s| (s.t_ms, s.call_rcu)).collect();
        assert_eq!(t, [(0, 5), (2000, 5), (2100, 9)]);
    }

    #[test]
    fn quiet_vm_still_gets_a_sample_per_quiet_interval() {
        let start = Instant::now();
        let mut r = LifetimeRecorder::new(start);
        let quiet = duration_ms(QUIET_SAMPLE_INTERVAL);
        for ms in (0..=3 * quiet).step_by(100) {
            feed(&mut r, at(start, ms), counts(ms, 1));
        }
        let t: Vec<u64> = r.samples.iter().map(|s| s.t_ms).collect();
        assert_eq!(t, [0, quiet, 2 * quiet, 3 * quiet]);
    }

    #[test]
    fn thinning_bounds_the_timeline_and_keeps_ends_and_markers() {
        let start = Instant::now();
        let mut r = LifetimeRecorder::new(start);
        // A marker early on, its sample forced in between ordinary ones.
        r.push_marker(at(start, 1234), MarkerKind::Plug, "x".into(), Some(1));
        let days = 3 * 24 * 3600 * 1000;
        let mut n = 0;
        let mut ms = 0;
        let mut marked = false;
        let mut fed = 0;
        while ms <= days {
            n += 1; // the counters change on every reading: the worst case
            if !marked && ms >= 1234 {
                r.observe(at(start, 1234), counts(1234, n), true);
                marked = true;
            }
            if feed(&mut r, at(start, ms), counts(ms, n)) {
                fed = ms;
            }
            assert!(r.samples.len() <= MAX_SAMPLES);
            ms += 100 + ms / 1000; // readings thin out a little over time
        }
        let first = r.samples[0];
        let last = *r.samples.last().unwrap();
        assert_eq!((first.t_ms, first.call_rcu), (0, 1));
        assert_eq!((last.t_ms, last.call_rcu), (fed, n));
        assert!(r.samples.iter().any(|s| s.t_ms == 1234));
        // The shape survives: samples spread over the whole life.
        assert!(r.samples.len() > MAX_SAMPLES / 4);
        let mid = r
            .samples
            .iter()
            .filter(|s| s.t_ms > days / 3 && s.t_ms < 2 * days / 3)
            .count();
        assert!(mid > 100, "only {mid} samples in the middle third");
        for w in r.samples.windows(2) {
            assert!(w[0].t_ms <= w[1].t_ms && w[0].call_rcu <= w[1].call_rcu);
        }
    }

    #[test]
    fn markers_are_bounded_and_keep_the_first() {
        let start = Instant::now();
        let mut r = LifetimeRecorder::new(start);
        r.mark_boot(at(start, 5));
        // Plug, unplug, plug, ...: one marker each.
        for i in 0..MAX_MARKERS as u64 + 10 {
            r.plugged_size(at(start, 10 + i), (1 - i % 2) << 27);
        }
        assert_eq!(r.markers.len(), MAX_MARKERS);
        assert_eq!(r.markers[0].kind, MarkerKind::Boot);
        assert_eq!(r.markers_dropped, 11);
        let last = r.markers.last().unwrap();
        assert_eq!(last.t_ms, 10 + MAX_MARKERS as u64 + 9);
    }

    #[test]
    fn plugged_size_marks_plug_and_unplug_with_the_new_size() {
        let start = Instant::now();
        let mut r = LifetimeRecorder::new(start);
        r.plugged_size(at(start, 1), 0); // nothing plugged at start
        r.plugged_size(at(start, 2), 256 << 20);
        r.plugged_size(at(start, 3), 256 << 20);
        r.plugged_size(at(start, 4), 128 << 20);
        let m: Vec<(MarkerKind, &str, Option<u64>)> = r
            .markers
            .iter()
            .map(|m| (m.kind, m.detail.as_str(), m.plugged_bytes))
            .collect();
        assert_eq!(
            m,
            [
                (MarkerKind::Plug, "256M", Some(256 << 20)),
                (MarkerKind::Unplug, "128M", Some(128 << 20)),
            ]
        );
        // Each marker forced a sample at its time.
        let t: Vec<u64> = r.samples.iter().map(|s| s.t_ms).collect();
        assert_eq!(t, [2, 4]);
    }

    #[test]
    fn report_has_rcu_keys_at_top_level_and_parses_back() {
        let start = Instant::now();
        let mut r = LifetimeRecorder::new(start);
        r.maybe_sample(start);
        r.mark_boot(at(start, 10));
        // Real RCU work, counted by the global statistics.
        for _ in 0..3 {
            rcu::call_rcu(|| {});
        }
        rcu::drain_call_rcu();
        r.plugged_size(at(start, 30), 1 << 30);
        r.mark_end(at(start, 40), "guest powered off");
        let rep = r.report(at(start, 50));
        let text = serde_json::to_string(&rep).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        for key in [
            "wakeup",
            "call_rcu",
            "callbacks_run",
            "grace_periods",
            "force_rcu",
            "wakeups",
            "loops",
            "reader_waits",
            "latency",
            "by_site",
            "uptime_ms",
            "timeline",
            "markers",
        ] {
            assert!(v.get(key).is_some(), "no top-level '{key}' in {text}");
        }
        assert!(v.get("rcu").is_none());
        assert!(v["call_rcu"].as_u64().unwrap() >= 4);
        assert!(v["latency"]["p99_ns"].is_u64());
        assert!(
            v["by_site"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["label"] == "drain_call_rcu")
        );
        assert_eq!(v["uptime_ms"], 50);
        let timeline: Vec<Sample> = serde_json::from_value(v["timeline"].clone()).unwrap();
        let markers: Vec<Marker> = serde_json::from_value(v["markers"].clone()).unwrap();
        assert_eq!(timeline, rep.timeline);
        assert_eq!(markers, rep.markers);
        let kinds: Vec<&str> = v["markers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["boot", "plug", "end"]);
        assert_eq!(v["markers"][1]["plugged_bytes"], 1u64 << 30);
        assert!(v["markers"][0].get("plugged_bytes").is_none());
        // The timeline ends at the report, with its counters.
        let fin = timeline.last().unwrap();
        assert_eq!(fin.t_ms, 50);
        assert_eq!(fin.call_rcu, rep.rcu.call_rcu);
        assert_eq!(fin.grace_periods, rep.rcu.grace_periods);
        for w in timeline.windows(2) {
            assert!(w[0].t_ms <= w[1].t_ms);
            assert!(w[0].call_rcu <= w[1].call_rcu);
            assert!(w[0].callbacks_run <= w[1].callbacks_run);
            assert!(w[0].grace_periods <= w[1].grace_periods);
        }
    }

    #[test]
    fn timeline_counts_stay_monotone_under_a_racy_snapshot() {
        let start = Instant::now();
        let mut r = LifetimeRecorder::new(start);
        feed(&mut r, start, counts(0, 10));
        // A snapshot where callbacks_run lags (taken mid-batch), and an
        // earlier instant.
        let mut s = counts(100, 12);
        s.callbacks_run = 8;
        r.observe(at(start, 100), s, true);
        r.observe(at(start, 50), counts(50, 13), true);
        for w in r.samples.windows(2) {
            assert!(w[0].t_ms <= w[1].t_ms);
            assert!(w[0].callbacks_run <= w[1].callbacks_run);
            assert!(w[0].call_rcu <= w[1].call_rcu);
        }
        assert_eq!(r.samples.last().unwrap().call_rcu, 13);
    }

    #[test]
    fn report_keeps_a_quiet_stretch_flat() {
        let start = Instant::now();
        let mut r = LifetimeRecorder::new(start);
        feed(&mut r, start, counts(0, 2));
        feed(&mut r, at(start, 900), counts(900, 2));
        let mut stats = Stats {
            call_rcu: 7,
            ..Stats::default()
        };
        stats.callbacks_run = 7;
        let rep = r.report_with(at(start, 1000), stats);
        let t: Vec<(u64, u64)> = rep.timeline.iter().map(|s| (s.t_ms, s.call_rcu)).collect();
        assert_eq!(t, [(0, 2), (900, 2), (1000, 7)]);
    }

    #[test]
    fn site_labels_prefer_the_label_then_file_and_line() {
        let site = |s: &str, l: &str| SiteStats {
            site: s.into(),
            label: l.into(),
            calls: 1,
            run: 1,
        };
        assert_eq!(
            site_label(&site(
                "vmm/src/memory/memory_manager.rs:243:13",
                "hot-plug slot unmapped"
            )),
            "hot-plug slot unmapped"
        );
        assert_eq!(
            site_label(&site("vmm/src/memory/memory_manager.rs:243:13", "")),
            "memory_manager.rs:243"
        );
        assert_eq!(short_site("/abs/x.rs:7"), "x.rs:7");
        assert_eq!(short_site("(other sites)"), "(other sites)");
    }
}
