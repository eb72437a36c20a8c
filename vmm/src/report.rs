//! What the VMM writes and prints when the VM ends: the RCU statistics
//! (`--rcu-stats`), a short table of them on stderr, and the metrics
//! (`--metrics`).

use rcu::Stats;
use std::io::Write;
use std::path::Path;
use thiserror::Error;

/// A report could not be written.
#[derive(Debug, Error)]
pub enum ReportError {
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

/// Writes `value` as pretty JSON to `path`, atomically (a temporary file in
/// the same directory, synced, then renamed), so a full disk leaves either
/// the old file or none, never a truncated one.
pub fn write_json<T: serde::Serialize>(
    what: &'static str,
    path: &Path,
    value: &T,
) -> Result<(), ReportError> {
    let text = serde_json::to_vec_pretty(value).map_err(|e| ReportError::Json(what, e))?;
    let err = |source| ReportError::Write {
        what,
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&text)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

fn us(ns: u64) -> String {
    if ns >= 10_000_000 {
        format!("{:.1} ms", ns as f64 / 1e6)
    } else {
        format!("{:.1} us", ns as f64 / 1e3)
    }
}

/// The lifetime table printed at exit.
pub fn rcu_table(s: &Stats) -> String {
    let mut t = String::new();
    t.push_str(&format!(
        "RCU over this VM's lifetime (wake-up: {}, membarrier: {})\n",
        s.wakeup,
        if s.membarrier { "yes" } else { "no" }
    ));
    let rows: [(&str, String); 10] = [
        ("call_rcu calls", s.call_rcu.to_string()),
        ("callbacks run", s.callbacks_run.to_string()),
        ("grace periods", s.grace_periods.to_string()),
        ("force_rcu calls", s.force_rcu.to_string()),
        (
            "call_rcu thread wake-ups",
            format!("{} ({} found nothing to do)", s.wakeups, s.empty_wakeups),
        ),
        ("call_rcu thread loop rounds", s.loops.to_string()),
        ("reader waits in grace periods", s.reader_waits.to_string()),
        (
            "membarrier calls",
            format!("{} ({} avoided)", s.membarriers, s.membarriers_skipped),
        ),
        (
            "call-to-callback latency",
            format!(
                "max {}, p50 < {}, p99 < {}",
                us(s.latency.max_ns),
                us(s.latency.p50_ns),
                us(s.latency.p99_ns)
            ),
        ),
        ("call_rcu thread CPU", us(s.thread_cpu_ns)),
    ];
    for (k, v) in rows {
        t.push_str(&format!("  {k:<32} {v}\n"));
    }
    if !s.by_site.is_empty() {
        t.push_str("  top call sites:\n");
        for site in s.by_site.iter().take(5) {
            let label = if site.label.is_empty() {
                String::new()
            } else {
                format!("{}  ", site.label)
            };
            t.push_str(&format!("    {:>6}  {label}{}\n", site.calls, site.site));
        }
    }
    t
}
