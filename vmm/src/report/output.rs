//! What the VMM writes and prints when the VM ends: the RCU statistics
//! (`--rcu-stats`), a short table of them on stderr, and the metrics
//! (`--metrics`).

use crate::report::rcu_lifetime::{LifetimeReport, MarkerKind, short_site, site_label};
use rcu::Stats;
use std::path::Path;
use thiserror::Error;

/// A report could not be written.
#[derive(Debug, Error)]
pub(crate) enum ReportError {
    /// Writing the file failed (full disk, permissions, ...).
    #[error("cannot write {what} to '{path}'")]
    Write {
        /// Which report.
        what: &'static str,
        /// Where.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Serialising failed.
    #[error("cannot serialise {0}")]
    Json(&'static str, #[source] serde_json::Error),
}

/// Writes `value` as pretty JSON to `path`: a new file renamed into place
/// (a failure leaves the old file or none, never a truncated one), or a
/// special file such as `/dev/stdout` written in place; links planted by
/// someone else are never followed ([`crate::report::report_file`]).
pub(crate) fn write_json<T: serde::Serialize>(
    what: &'static str,
    path: &Path,
    value: &T,
) -> Result<(), ReportError> {
    let mut text = serde_json::to_vec_pretty(value).map_err(|e| ReportError::Json(what, e))?;
    text.push(b'\n');
    crate::report::report_file::write_report(path, &text).map_err(|source| ReportError::Write {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// A duration in ns, in the unit that keeps it short ("16.4 us", "3.6 ms").
fn duration(ns: u64) -> String {
    let ns = ns as f64;
    if ns < 1e6 {
        format!("{:.1} us", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.1} ms", ns / 1e6)
    } else {
        format!("{:.2} s", ns / 1e9)
    }
}

/// Most call sites listed in the table.
const TABLE_SITES: usize = 5;

/// The RCU table printed at exit (at most 18 lines): counts, the call_rcu
/// thread's work, latency, and the busiest call sites by human label;
/// headed with the lifetime's length and its boot, plug and unplug markers.
pub(crate) fn lifetime_table(r: &LifetimeReport) -> String {
    let count = |k: MarkerKind| r.markers.iter().filter(|m| m.kind == k).count();
    let mut events = vec![duration(r.uptime_ms.saturating_mul(1_000_000))];
    for (k, one, many) in [
        (MarkerKind::Plug, "plug", "plugs"),
        (MarkerKind::Unplug, "unplug", "unplugs"),
    ] {
        match count(k) {
            0 => {}
            1 => events.push(format!("1 {one}")),
            n => events.push(format!("{n} {many}")),
        }
    }
    table(
        &r.rcu,
        format!(
            "RCU over this VM's lifetime ({}; wake-up: {}, membarrier: {})",
            events.join(", "),
            r.rcu.wakeup.name(),
            if r.rcu.membarrier { "yes" } else { "no" }
        ),
    )
}

fn table(s: &Stats, heading: String) -> String {
    let mut t = heading;
    t.push('\n');
    let plural = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let mut run = s.callbacks_run.to_string();
    if s.callback_panics > 0 {
        run.push_str(&format!(" ({} panicked)", s.callback_panics));
    }
    let latency = if s.latency.histogram.is_empty() {
        "none measured".to_string()
    } else {
        format!(
            "max {}, p50 < {}, p99 < {}",
            duration(s.latency.max_ns),
            duration(s.latency.p50_ns),
            duration(s.latency.p99_ns)
        )
    };
    let rows: [(&str, String); 10] = [
        ("call_rcu calls", s.call_rcu.to_string()),
        ("callbacks run", run),
        (
            "grace periods",
            format!(
                "{} ({} by synchronize_rcu; {}, {} forced, {} held for the batch gap{}, \
                 largest {})",
                s.grace_periods,
                s.synchronize_rcu,
                plural(s.batches, "batch", "batches"),
                s.forced_batches,
                s.paced_batches,
                if s.capped_gaps == 0 {
                    String::new()
                } else {
                    format!(" ({} cut short by the cap)", s.capped_gaps)
                },
                s.max_batch
            ),
        ),
        (
            "force_rcu calls",
            format!("{} ({} by drain_call_rcu)", s.force_rcu, s.drain_call_rcu),
        ),
        (
            "call_rcu thread wake-ups",
            format!("{} ({} found nothing to do)", s.wakeups, s.empty_wakeups),
        ),
        ("call_rcu thread loop rounds", s.loops.to_string()),
        (
            "reader waits",
            format!("{} (in synchronize_rcu and grace periods)", s.reader_waits),
        ),
        (
            "membarrier calls",
            format!("{} ({} not needed)", s.membarriers, s.membarriers_skipped),
        ),
        ("call-to-callback latency", latency),
        ("call_rcu thread CPU time", duration(s.thread_cpu_ns)),
    ];
    for (k, v) in rows {
        t.push_str(&format!("  {k:<28} {v}\n"));
    }
    if !s.by_site.is_empty() {
        t.push_str("  top call_rcu sites:\n");
        let shown = s.by_site.iter().take(TABLE_SITES);
        let width = shown
            .clone()
            .map(|x| site_label(x).len())
            .max()
            .unwrap_or(0);
        for site in shown {
            t.push_str(&format!(
                "    {:>8}  {:<width$}  {}\n",
                site.calls,
                site_label(site),
                short_site(&site.site)
            ));
        }
        let rest: u64 = s.by_site.iter().skip(TABLE_SITES).map(|x| x.calls).sum();
        if rest > 0 {
            let n = s.by_site.len() - TABLE_SITES;
            t.push_str(&format!(
                "    {rest:>8}  at {}\n",
                plural(n as u64, "other site", "other sites")
            ));
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcu::SiteStats;

    fn stats() -> Stats {
        let site = |s: &str, l: &str, calls| SiteStats {
            site: s.into(),
            label: l.into(),
            calls,
            run: calls,
        };
        Stats {
            call_rcu: 1490,
            callbacks_run: 1490,
            grace_periods: 63,
            force_rcu: 2,
            wakeups: 62,
            loops: 127,
            reader_waits: 4,
            latency: rcu::Latency {
                max_ns: 3_600_000,
                p50_ns: 16_384,
                p99_ns: 65_536,
                histogram: vec![rcu::Bucket {
                    lt_ns: 16_384,
                    count: 1490,
                }],
            },
            by_site: vec![
                site("vmm/src/device_manager.rs:140:22", "bus replace", 1440),
                site(
                    "vmm/src/memory/memory_manager.rs:230:9",
                    "memory map replace",
                    20,
                ),
                site(
                    "vmm/src/memory/memory_manager.rs:243:13",
                    "hot-plug slot unmapped",
                    10,
                ),
                site("vmm/src/lib.rs:86:5", "drain_call_rcu", 1),
                site("vmm/src/x.rs:1:1", "RcuCell::replace", 1),
                site("vmm/src/control/event_loop.rs:77:3", "", 15),
                site("vmm/src/y.rs:9:1", "", 3),
            ],
            ..Stats::default()
        }
    }

    /// Seen on the old code: a link planted at `<stem>.tmp.<pid>` made
    /// `--rcu-stats` write its JSON into the link's target.
    #[test]
    fn write_json_follows_no_link_planted_at_the_temporary_or_final_name() {
        let d = std::env::temp_dir().join(format!("vmm-report-links-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let p = d.join("stats.json");
        let planted = d.join(format!("stats.tmp.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        write_json("RCU statistics", &p, &[1, 2, 3]).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let v: Vec<u32> = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(v, [1, 2, 3]);
        // Now a link at the final name: replaced, its target untouched.
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        write_json("RCU statistics", &p, &[4]).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(!std::fs::symlink_metadata(&p).unwrap().is_symlink());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn table_is_short_and_names_sites_by_label() {
        let t = table(&stats(), "RCU".to_string());
        assert!(t.lines().count() <= 20, "{t}");
        for want in [
            "call_rcu calls               1490",
            "grace periods                63",
            "force_rcu calls              2",
            "call_rcu thread wake-ups     62",
            "call_rcu thread loop rounds  127",
            "reader waits                 4",
            "max 3.6 ms, p50 < 16.4 us, p99 < 65.5 us",
            "call_rcu thread CPU time",
        ] {
            assert!(t.contains(want), "no '{want}' in\n{t}");
        }
        let line = |label: &str| {
            t.lines()
                .find(|l| l.contains(label))
                .unwrap_or_else(|| panic!("no '{label}' in\n{t}"))
                .to_string()
        };
        assert!(line("bus replace").contains("1440"));
        assert!(line("bus replace").contains("device_manager.rs:140"));
        assert!(line("hot-plug slot unmapped").contains("memory_manager.rs:243"));
        assert!(line("1  drain_call_rcu").contains("lib.rs:86"));
        // Top five by the core's order; the rest summed.
        assert!(!t.contains("event_loop.rs"));
        assert!(line("other sites").contains("18"));
    }

    #[test]
    fn lifetime_table_heads_with_uptime_and_events() {
        let start = std::time::Instant::now();
        let at = |ms| start + std::time::Duration::from_millis(ms);
        let mut rec = crate::report::rcu_lifetime::LifetimeRecorder::new(start);
        rec.plugged_size(at(10), 1 << 30);
        rec.plugged_size(at(20), 2 << 30);
        rec.plugged_size(at(30), 1 << 30);
        let r = rec.report_with(at(42_000), stats());
        let t = lifetime_table(&r);
        let head = t.lines().next().unwrap();
        assert!(head.contains("42.00 s, 2 plugs, 1 unplug"), "{head}");
        assert!(t.contains("bus replace"));
    }
}
