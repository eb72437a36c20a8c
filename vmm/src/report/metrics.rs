//! The VMM's own costs, which hardware users feel whatever the guest does:
//! set-up time to the first `KVM_RUN`, CPU time outside `KVM_RUN`, exits
//! handled, and memory beyond what the guest touched.

use crate::kvm::vcpu::{Marks, VcpuStats};
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use vm_memory::GuestMemoryMmap;

/// The metrics report (`--metrics PATH`).
#[derive(Debug, Serialize)]
pub(crate) struct Metrics {
    /// Milliseconds from `main` to the first `KVM_RUN` of any vCPU.
    pub setup_ms: f64,
    /// `CLOCK_MONOTONIC` at the first `KVM_RUN`, in ns, so a harness that
    /// recorded when it started the process can measure exec to `KVM_RUN`.
    pub first_kvm_run_monotonic_ns: u64,
    /// Wall time from `main` to the end of the run, in ms.
    pub run_ms: f64,
    /// Exits handled, all vCPUs.
    pub exits: u64,
    /// Port-I/O exits.
    pub io_exits: u64,
    /// MMIO exits.
    pub mmio_exits: u64,
    /// Guest accesses no device claimed.
    pub unclaimed_accesses: u64,
    /// Returns from `KVM_RUN` for kicks and signals.
    pub interrupted_exits: u64,
    /// `int3` instructions completed for KVM's emulator.
    pub int3_completed: u64,
    /// CPU time of the whole process (user + system), ms.
    pub process_cpu_ms: f64,
    /// CPU time of the vCPU threads, ms (includes the guest's own time).
    pub vcpu_threads_cpu_ms: f64,
    /// vCPU time spent handling exits outside `KVM_RUN`, ms.
    pub vcpu_exit_handling_ms: f64,
    /// CPU time outside `KVM_RUN`: every non-vCPU thread plus the vCPUs'
    /// exit handling, ms.
    pub vmm_cpu_outside_kvm_run_ms: f64,
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// Guest RAM resident (touched by the guest), KiB.
    pub guest_resident_kib: u64,
    /// RSS less guest memory touched, KiB.
    pub overhead_kib: u64,
    /// Bytes of guest console output accepted for stdout.
    pub console_bytes: u64,
    /// Bytes of guest console output dropped: stdout did not keep up (the
    /// console buffer was full), failed, or did not take the rest at exit.
    pub console_bytes_dropped: u64,
}

fn ticks_ms(ticks: u64) -> f64 {
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 * 1000.0 / hz
}

/// (utime + stime) of a /proc stat file, in clock ticks.
fn stat_cpu(path: &std::path::Path) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    let close = s.rfind(')')?;
    let fields: Vec<&str> = s.get(close + 2..)?.split_whitespace().collect();
    // Fields after "(comm) ": state is index 0, utime 11, stime 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

impl Metrics {
    /// Collects the metrics. Call after the vCPU threads ended (each records
    /// its CPU time as it ends).
    pub(crate) fn collect(
        marks: &Marks,
        vcpus: &[Arc<VcpuStats>],
        memory: &GuestMemoryMmap,
    ) -> Self {
        let sum = |f: fn(&VcpuStats) -> u64| vcpus.iter().map(|v| f(v)).sum::<u64>();
        let first_ns = marks.first_run_ns.load(Ordering::Relaxed);
        let now_ns = monotonic_ns();
        let since_start = u64::try_from(marks.start.elapsed().as_nanos()).unwrap_or(0);
        let process_ticks = stat_cpu(std::path::Path::new("/proc/self/stat")).unwrap_or(0);
        let handling_ns = sum(|v| v.handling_ns.load(Ordering::Relaxed));
        let vcpu_ms = sum(|v| v.thread_cpu_ns.load(Ordering::Relaxed)) as f64 / 1e6;
        let process_ms = ticks_ms(process_ticks);
        let rss = rss_kib();
        let guest = crate::memory::guest_memory::resident_bytes(memory) / 1024;
        Metrics {
            setup_ms: first_ns as f64 / 1e6,
            first_kvm_run_monotonic_ns: now_ns.saturating_sub(since_start) + first_ns,
            run_ms: since_start as f64 / 1e6,
            exits: sum(VcpuStats::exits),
            io_exits: sum(|v| v.io.load(Ordering::Relaxed)),
            mmio_exits: sum(|v| v.mmio.load(Ordering::Relaxed)),
            unclaimed_accesses: sum(|v| v.unclaimed.load(Ordering::Relaxed)),
            interrupted_exits: sum(|v| v.interrupted.load(Ordering::Relaxed)),
            int3_completed: sum(|v| v.int3_completed.load(Ordering::Relaxed)),
            process_cpu_ms: process_ms,
            vcpu_threads_cpu_ms: vcpu_ms,
            vcpu_exit_handling_ms: handling_ns as f64 / 1e6,
            vmm_cpu_outside_kvm_run_ms: (process_ms - vcpu_ms).max(0.0) + handling_ns as f64 / 1e6,
            rss_kib: rss,
            guest_resident_kib: guest,
            overhead_kib: rss.saturating_sub(guest),
            console_bytes: 0,
            console_bytes_dropped: 0,
        }
    }

    /// The same metrics with the console output counts of the run.
    pub(crate) fn with_console(self, bytes: u64, dropped: u64) -> Self {
        Self {
            console_bytes: bytes,
            console_bytes_dropped: dropped,
            ..self
        }
    }
}
