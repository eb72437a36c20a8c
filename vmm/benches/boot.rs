//! Boot benchmark: this VMM and QEMU (`-M microvm,acpi=off -accel kvm`, QEMU
//! 10 from bookworm-backports) boot the same minimal kernel, initramfs and
//! kernel arguments, in the same run, N times each; the medians are printed
//! side by side.
//!
//! Guest boot time here measures KVM's instruction emulator (this host has
//! no hardware virtualization), so the VMM's own costs are reported too:
//! exec to first `KVM_RUN`, CPU time of the VMM outside the vCPUs, KVM exits,
//! and memory beyond what the guest touched. Those are what users on
//! hardware feel. The VMM runs twice per round: as it is (ACPI tables, the
//! platform the distribution kernel needs) and with `acpi=off` appended, the
//! platform QEMU's `microvm,acpi=off` gives the guest (SMP from the MP
//! table), so the guest does the same work under both VMMs.
//!
//! `cargo bench -p vmm --bench boot` (needs root, /dev/kvm, the guest kit and
//! `scripts/install-deps.sh --qemu`); `BOOT_RUNS=N` sets the runs (3).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

fn kit() -> PathBuf {
    std::env::var_os("VMM_GUEST_KIT").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest-kit"),
        PathBuf::from,
    )
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory effects.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// (thread name, CPU ticks) of every thread of `pid`.
fn threads_cpu(pid: u32) -> Vec<(String, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let s = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let open = s.find('(')?;
            let close = s.rfind(')')?;
            let comm = s[open + 1..close].to_string();
            let f: Vec<&str> = s[close + 2..].split_whitespace().collect();
            Some((
                comm,
                f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
            ))
        })
        .collect()
}

/// RSS of `pid` less the RSS of its largest anonymous mapping of at least
/// `guest` bytes (the guest RAM), in KiB; and that guest RSS.
fn rss_less_guest(pid: u32, guest: u64) -> (u64, u64) {
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return (0, 0);
    };
    let mut total = 0;
    let mut best = (0u64, 0u64); // (size, rss)
    let mut size = 0;
    for line in smaps.lines() {
        let mut it = line.split_whitespace();
        let first = it.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            let (a, b) = first.split_once('-').unwrap_or(("0", "0"));
            size =
                u64::from_str_radix(b, 16).unwrap_or(0) - u64::from_str_radix(a, 16).unwrap_or(0);
        } else if first == "Rss:" {
            let kib: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            total += kib;
            if size >= guest && size > best.0 {
                best = (size, kib);
            }
        }
    }
    (total - best.1, best.1)
}

#[derive(Debug, Default, Clone)]
struct Run {
    to_init_s: f64,
    to_exit_s: f64,
    exec_to_first_run_ms: Option<f64>,
    /// CPU of the threads that are not vCPUs, to Run /init.
    vmm_cpu_ms: f64,
    /// vCPU-thread time handling exits outside KVM_RUN (this VMM reports it).
    exit_handling_ms: Option<f64>,
    overhead_kib: u64,
    guest_kib: u64,
    ok: bool,
}

/// Starts `child`, watches its console for `Run /init`, samples the
/// process there, and waits for it to end.
fn observe(mut child: Child, spawn_mono: u64, vcpu_thread: fn(&str) -> bool) -> Run {
    let start = Instant::now();
    let pid = child.id();
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if line.contains("Run /init as init process") {
                let _ = tx.send(());
            }
        }
    });
    let mut r = Run::default();
    if rx.recv_timeout(Duration::from_secs(900)).is_ok() {
        r.to_init_s = start.elapsed().as_secs_f64();
        let cpu: u64 = threads_cpu(pid)
            .iter()
            .filter(|(n, _)| !vcpu_thread(n))
            .map(|(_, t)| t)
            .sum();
        r.vmm_cpu_ms = cpu as f64 * 1000.0 / clk_tck();
        let (over, guest) = rss_less_guest(pid, 128 << 20);
        r.overhead_kib = over;
        r.guest_kib = guest;
    }
    let status = child.wait().expect("wait");
    r.to_exit_s = start.elapsed().as_secs_f64();
    r.ok = status.success() && r.to_init_s > 0.0;
    let _ = spawn_mono;
    r
}

fn run_vmm(cmdline: &str) -> Run {
    let k = kit();
    let metrics = std::env::temp_dir().join(format!("boot-bench-{}.json", std::process::id()));
    let spawn_mono = monotonic_ns();
    let child = Command::new(VMM)
        .args(["--kernel", k.join("vmlinux").to_str().unwrap_or_default()])
        .args([
            "--initrd",
            k.join("initramfs-halt.cpio").to_str().unwrap_or_default(),
        ])
        .args([
            "--cpus",
            "2",
            "--memory",
            "128M",
            "--quiet",
            "--cmdline",
            cmdline,
        ])
        .args(["--metrics", metrics.to_str().unwrap_or_default()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start vmm");
    let mut r = observe(child, spawn_mono, |n| n.starts_with("vcpu"));
    if let Ok(m) = std::fs::read(&metrics)
        && let Ok(m) = serde_json::from_slice::<serde_json::Value>(&m)
    {
        if let Some(first) = m["first_kvm_run_monotonic_ns"].as_u64() {
            r.exec_to_first_run_ms = Some(first.saturating_sub(spawn_mono) as f64 / 1e6);
        }
        // The VMM's own account of vCPU time spent outside KVM_RUN.
        r.exit_handling_ms = m["vcpu_exit_handling_ms"].as_f64();
    }
    r
}

fn run_qemu() -> Run {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/guest/qemu-boot.sh");
    let spawn_mono = monotonic_ns();
    let child = Command::new(script)
        .args([
            "-c",
            "2",
            "-m",
            "128M",
            "--",
            "-name",
            "bench,debug-threads=on",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu (scripts/install-deps.sh --qemu installs it)");
    observe(child, spawn_mono, |n| {
        n.starts_with("CPU ") && n.ends_with("/KVM")
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; a filter argument selects nothing else.
    let runs: usize = std::env::var("BOOT_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    if !Path::new("/sys/kernel/debug/kvm").exists() {
        let _ = Command::new("mount")
            .args(["-t", "debugfs", "none", "/sys/kernel/debug"])
            .status();
    }
    let cmdline = std::fs::read_to_string(kit().join("cmdline-emulated.txt"))
        .expect("guest kit: tests/guest/build-kit.sh")
        .trim()
        .to_string();
    let no_acpi = format!("{cmdline} acpi=off");
    let mut results: BTreeMap<&str, Vec<Run>> = BTreeMap::new();
    for i in 0..runs {
        // Alternate so drift on a shared machine hits all alike.
        for (name, f) in [
            ("vmm", &(|| run_vmm(&cmdline)) as &dyn Fn() -> Run),
            ("vmm-noacpi", &(|| run_vmm(&no_acpi)) as &dyn Fn() -> Run),
            ("qemu", &run_qemu),
        ] {
            let r = f();
            eprintln!("run {}/{runs} {name}: {r:?}", i + 1);
            results.entry(name).or_default().push(r);
        }
    }
    let col = |name: &str, f: &dyn Fn(&Run) -> Option<f64>| -> f64 {
        median(
            results
                .get(name)
                .map(|v| v.iter().filter(|r| r.ok).filter_map(f).collect())
                .unwrap_or_default(),
        )
    };
    let row = |label: &str, unit: &str, f: &dyn Fn(&Run) -> Option<f64>| {
        let (a, b, c) = (col("vmm", f), col("vmm-noacpi", f), col("qemu", f));
        let show = |x: f64| {
            if x.is_nan() {
                "n/a".to_string()
            } else {
                format!("{x:.1} {unit}")
            }
        };
        println!(
            "{label:<42} {:>12} {:>18} {:>18}",
            show(a),
            show(b),
            show(c)
        );
    };
    println!(
        "\nBoot of the minimal kernel, 2 vCPUs, 128 MiB, PVH vmlinux, halt initramfs \
         (median of {runs} runs each, same kernel arguments)"
    );
    println!(
        "{:<42} {:>12} {:>18} {:>18}",
        "", "this vmm", "vmm, acpi=off", "QEMU 10 microvm"
    );
    println!(
        "{:<42} {:>12} {:>18} {:>18}",
        "", "(ACPI)", "(MP table)", "(acpi=off)"
    );
    row("time to 'Run /init'", "s", &|r| Some(r.to_init_s));
    row("time to exit (guest reset)", "s", &|r| Some(r.to_exit_s));
    row("exec to first KVM_RUN", "ms", &|r| r.exec_to_first_run_ms);
    row("CPU of non-vCPU threads, to Run /init", "ms", &|r| {
        Some(r.vmm_cpu_ms)
    });
    row("vCPU time handling exits outside KVM_RUN", "ms", &|r| {
        r.exit_handling_ms
    });
    row("RSS less guest RAM touched, at Run /init", "MiB", &|r| {
        Some(r.overhead_kib as f64 / 1024.0)
    });
    row("guest RAM touched, at Run /init", "MiB", &|r| {
        Some(r.guest_kib as f64 / 1024.0)
    });
    let ok = |n: &str| {
        results
            .get(n)
            .map_or(0, |v| v.iter().filter(|r| r.ok).count())
    };
    println!(
        "successful runs: vmm {}/{runs}, vmm acpi=off {}/{runs}, qemu {}/{runs}",
        ok("vmm"),
        ok("vmm-noacpi"),
        ok("qemu")
    );
    println!(
        "(Non-vCPU thread CPU is read from /proc for all three alike; exit handling \
         on vCPU threads is the VMM's own measurement, whole run.)"
    );
}
