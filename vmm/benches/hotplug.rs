//! Hot-plug benchmarks.
//!
//! 1. The control thread's own cost per map swap: plug (map a slot + new KVM
//!    memory slot + publish the map) and unplug (delete the KVM slot +
//!    publish + `call_rcu` + `force_rcu`), min/median over N cycles, with
//!    two vCPUs running a tiny guest, and the time from retiring a slot to
//!    its `munmap` by the call_rcu thread.
//! 2. The wake-up stress variant of the RCU experiment: plug/unplug as fast
//!    as possible, and at fixed rates, for each call_rcu wake-up strategy
//!    (each in its own process, since the strategy is chosen per process),
//!    showing where the semaphore's extra loop rounds begin to cost. At the
//!    maximum rate the call_rcu thread can fall behind by the memory
//!    manager's cap of retired slots; the driver then waits, and counts it.
//! 3. With a Linux guest (the kit's minimal kernel): time from `qom-set` to
//!    the guest's plug being complete, and from the unplug request to the
//!    mapping being returned to the host, over QMP with QEMU's client.
//! 4. Many GiB: a 64 GiB region (512 slots) plugged slot by slot and
//!    unplugged again, with two vCPUs running: the control thread's CPU time
//!    per plug and unplug against the number of slots already mapped (does
//!    a map swap stay flat as the map grows?), and the totals for 16 GiB.
//!
//! `cargo bench -p vmm --bench hotplug` (root, /dev/kvm, guest kit, the
//! qemu.qmp venv from scripts/install-deps.sh). `HOTPLUG_CYCLES` (200),
//! `STRESS_SECS` (5), `LINUX_CYCLES` (5); `-- quick` skips part 3;
//! `-- scale` runs part 4 only, `-- swap` part 1 only.

use devices::virtio::MemoryBackend;
use devices::{BusRange, ExitRequest, ExitSink};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tests::bare_vm::BareVm;
use tests::guest_code;
use vmm::test_utils::{Hotplug, MAX_RETIRED_SLOTS, SLOT_SIZE};

const HOTPLUG_BASE: u64 = 1 << 32;

guest_code! {
    /// Drops to CPL3 and keeps touching its RAM word and the first
    /// hot-plug slot (user stack in r13, word in rdi, slot in rsi).
    fn busy(busy_start, busy_end) in user mode {
        "2:",
        "inc r12",
        "mov qword ptr [rdi], r12",
        "mov qword ptr [rsi], r12",
        "jmp 2b",
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A bare VM with 2 vCPUs busy in CPL3 and a 4-slot hot-plug region; slot 0
/// stays plugged (the vCPUs touch it).
fn busy_vm() -> BareVm {
    busy_vm_with(4)
}

/// As [`busy_vm`], with a hot-plug region of `slots` slots.
fn busy_vm_with(slots: u64) -> BareVm {
    let vm = BareVm::with_hotplug(2, 64 << 20, slots * SLOT_SIZE, busy(), 0);
    let hp = vm.machine.hotplug.first().expect("hot-plug").clone();
    hp.manager
        .plug(HOTPLUG_BASE, SLOT_SIZE)
        .expect("plug slot 0");
    for cpu in 0..2u64 {
        vm.start_vcpu(cpu as usize, 0, 0x7_0000 - cpu * 0x1000, true, |r| {
            r.rdi = 0x20_0000 + cpu * 0x1_0000;
            r.rsi = HOTPLUG_BASE + cpu * 0x1000;
            r.r13 = 0x6_0000 - cpu * 0x1000;
        });
    }
    vm.map_high(HOTPLUG_BASE, 1 << 30);
    let _ = BusRange::new(0, 1);
    vm
}

/// Polls every `poll` until fewer than `limit` retired slots wait for
/// their grace period; whether it had to wait.
fn wait_retired_below(hp: &Hotplug, limit: u64, poll: Duration) -> bool {
    let mut waited = false;
    while hp.manager.retired_pending() >= limit {
        waited = true;
        std::thread::sleep(poll);
    }
    waited
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let p = |q: f64| v[((v.len() - 1) as f64 * q) as usize];
    (v[0], p(0.5), p(0.99))
}

/// Powers the VM off when dropped: at the end of a driver thread, also when
/// it panics, so a failed run ends at once instead of at `vm.run`'s timeout.
struct PowerOffOnDrop(Arc<ExitSink>);

impl Drop for PowerOffOnDrop {
    fn drop(&mut self) {
        self.0.request(ExitRequest::PowerOff);
    }
}

/// Part 1, in this process.
fn swap_cost() {
    rcu::set_reader_mode(rcu::ReaderMode::Fenced);
    let cycles = env("HOTPLUG_CYCLES", 200);
    let mut vm = busy_vm();
    let hp = vm.machine.hotplug.first().expect("hot-plug").clone();
    let end = PowerOffOnDrop(Arc::clone(&vm.machine.devices.exit));
    let driver = std::thread::spawn(move || {
        rcu::set_reader_mode(rcu::ReaderMode::Fenced);
        std::thread::sleep(Duration::from_millis(200));
        let (mut plug, mut unplug, mut unmap) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..cycles {
            let gpa = HOTPLUG_BASE + (1 + i % 3) * SLOT_SIZE;
            let t = Instant::now();
            hp.manager.plug(gpa, SLOT_SIZE).expect("plug");
            plug.push(t.elapsed().as_secs_f64() * 1e6);
            let t = Instant::now();
            hp.manager.unplug(gpa, SLOT_SIZE).expect("unplug");
            unplug.push(t.elapsed().as_secs_f64() * 1e6);
            // Wait for the unmapping, so each cycle's figure is its own.
            let want = i + 1;
            let st = hp.manager.stats();
            while st.slots_unmapped.load(Ordering::Relaxed) < want {
                std::hint::spin_loop();
            }
            unmap.push(st.last_retire_to_unmap_ns.load(Ordering::Relaxed) as f64 / 1e3);
        }
        drop(end);
        (plug, unplug, unmap)
    });
    let _ = vm.run(Duration::from_secs(600));
    let (plug, unplug, unmap) = driver.join().expect("driver");
    println!(
        "\n1. Control-thread cost per map swap ({cycles} cycles, 2 vCPUs running; microseconds)"
    );
    println!("{:<58} {:>9} {:>9} {:>9}", "", "min", "median", "p99");
    for (name, v) in [
        ("plug: mmap + KVM memory slot + publish map", plug),
        (
            "unplug: delete KVM slot + publish + call_rcu + force_rcu",
            unplug,
        ),
        (
            "retire to munmap on the call_rcu thread (grace period)",
            unmap,
        ),
    ] {
        let (a, b, c) = stats(v);
        println!("{name:<58} {a:>9.1} {b:>9.1} {c:>9.1}");
    }
}

/// Part 2, child process: runs the stress for one strategy and rate and
/// prints one JSON line.
fn stress_child(strategy: &str, per_sec: u64) {
    rcu::set_wakeup_strategy(strategy.parse().expect("strategy")).expect("set strategy");
    rcu::set_reader_mode(rcu::ReaderMode::Fenced);
    let secs = env("STRESS_SECS", 5);
    let mut vm = busy_vm();
    let hp = vm.machine.hotplug.first().expect("hot-plug").clone();
    let end = PowerOffOnDrop(Arc::clone(&vm.machine.devices.exit));
    let driver = std::thread::spawn(move || {
        rcu::set_reader_mode(rcu::ReaderMode::Fenced);
        std::thread::sleep(Duration::from_millis(200));
        rcu::drain_call_rcu();
        let before = rcu::stats();
        let start = Instant::now();
        let (mut n, mut backlog_waits) = (0u64, 0u64);
        while start.elapsed() < Duration::from_secs(secs) {
            let gpa = HOTPLUG_BASE + (1 + n % 3) * SLOT_SIZE;
            // A plug that needs a new slot is refused while MAX_RETIRED_SLOTS
            // retired slots wait for their grace period (the call_rcu thread
            // is behind): wait for it, as a guest retrying the plug would.
            if wait_retired_below(&hp, MAX_RETIRED_SLOTS, Duration::from_micros(100)) {
                backlog_waits += 1;
            }
            hp.manager.plug(gpa, SLOT_SIZE).expect("plug");
            hp.manager.unplug(gpa, SLOT_SIZE).expect("unplug");
            n += 1;
            if per_sec > 0 {
                // Pace: cycle n starts no earlier than n / rate.
                let due = Duration::from_secs_f64(n as f64 / per_sec as f64);
                if let Some(w) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(w);
                }
            }
        }
        let took = start.elapsed().as_secs_f64();
        rcu::drain_call_rcu();
        let after = rcu::stats();
        drop(end);
        (n, backlog_waits, took, before, after)
    });
    let _ = vm.run(Duration::from_secs(600));
    let (n, backlog_waits, took, b, a) = driver.join().expect("driver");
    let j = serde_json::json!({
        "strategy": strategy,
        "rate": per_sec,
        "cycles": n,
        "backlog_waits": backlog_waits,
        "secs": took,
        "call_rcu": a.call_rcu - b.call_rcu,
        "grace_periods": a.grace_periods - b.grace_periods,
        "wakeups": a.wakeups - b.wakeups,
        "empty_wakeups": a.empty_wakeups - b.empty_wakeups,
        "loops": a.loops - b.loops,
        "batches": a.batches - b.batches,
        "thread_cpu_ms": (a.thread_cpu_ns - b.thread_cpu_ns) as f64 / 1e6,
        "p50_us": a.latency.p50_ns as f64 / 1e3,
        "p99_us": a.latency.p99_ns as f64 / 1e3,
        "max_us": a.latency.max_ns as f64 / 1e3,
    });
    println!("STRESS {j}");
}

/// Part 2, parent: runs the children and prints the comparison.
fn stress() {
    let exe = std::env::current_exe().expect("exe");
    println!(
        "\n2. Wake-up stress: plug/unplug cycles (2 map swaps and 3 call_rcu each) for {} s per row; \
         'backlog': times the driver waited because {MAX_RETIRED_SLOTS} retired slots were not yet \
         unmapped (a plug would have been refused)",
        env("STRESS_SECS", 5)
    );
    println!(
        "{:<10} {:>8} {:>7} {:>8} {:>9} {:>8} {:>8} {:>15} {:>7} {:>9} {:>11} {:>17}",
        "wake-up",
        "target/s",
        "cycles",
        "backlog",
        "call_rcu",
        "gps",
        "batches",
        "wakeups (empty)",
        "loops",
        "loops/cb",
        "thread CPU",
        "latency p50/p99"
    );
    for rate in [0u64, 1000, 100] {
        for strategy in ["event", "semaphore"] {
            let out = Command::new(&exe)
                .env("HOTPLUG_BENCH_CHILD", format!("{strategy}:{rate}"))
                .output()
                .expect("child");
            let text = String::from_utf8_lossy(&out.stdout);
            let Some(line) = text.lines().find_map(|l| l.strip_prefix("STRESS ")) else {
                println!(
                    "{strategy}: child failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                continue;
            };
            let j: serde_json::Value = serde_json::from_str(line).expect("json");
            let f = |k: &str| j[k].as_f64().unwrap_or(f64::NAN);
            let rate_s = if rate == 0 {
                "max".to_string()
            } else {
                rate.to_string()
            };
            let wakeups = format!("{} ({})", j["wakeups"], j["empty_wakeups"]);
            let latency = format!("{:.0}/{:.0} us", f("p50_us"), f("p99_us"));
            println!(
                "{:<10} {:>8} {:>7} {:>8} {:>9} {:>8} {:>8} {:>15} {:>7} {:>9.2} {:>8.1} ms {:>17}",
                strategy,
                rate_s,
                j["cycles"].to_string(),
                j["backlog_waits"].to_string(),
                j["call_rcu"].to_string(),
                j["grace_periods"].to_string(),
                j["batches"].to_string(),
                wakeups,
                j["loops"].to_string(),
                f("loops") / f("call_rcu").max(1.0),
                f("thread_cpu_ms"),
                latency,
            );
        }
    }
}

/// Part 3: the Linux guest over QMP.
fn linux() {
    let kit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest-kit");
    let dir = std::env::temp_dir().join(format!("hotplug-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let sock = dir.join("qmp.sock");
    let cycles = env("LINUX_CYCLES", 5);
    let mut vmm = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["--kernel", kit.join("vmlinux").to_str().unwrap_or_default()])
        .args([
            "--initrd",
            kit.join("initramfs-idle.cpio").to_str().unwrap_or_default(),
        ])
        .args([
            "--cpus",
            "2",
            "--memory",
            "256M",
            "--hotplug-memory",
            "1G",
            "--quiet",
        ])
        .args(["--qmp", sock.to_str().unwrap_or_default()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("vmm");
    let out = Command::new(tests::qmp_python())
        .arg(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/qmp/lifetime_session.py"),
        )
        .arg(&sock)
        .arg(cycles.to_string())
        .arg("128")
        .output()
        .expect("session");
    let _ = vmm.wait();
    let Ok(j) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        println!(
            "\n3. Linux guest: session failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    };
    let col = |k: &str| -> Vec<f64> {
        j["cycles"]
            .as_array()
            .map(|c| c.iter().filter_map(|x| x[k].as_f64()).collect())
            .unwrap_or_default()
    };
    println!("\n3. Linux guest (minimal kernel, 2 vCPUs), 128 MiB per cycle, {cycles} cycles");
    println!("{:<58} {:>9} {:>9} {:>9}", "", "min", "median", "max");
    for (name, v, scale, unit) in [
        (
            "qom-set to the guest's plug complete",
            col("plug_s"),
            1.0,
            "s",
        ),
        (
            "unplug request to the mapping returned to the host",
            col("unplug_s"),
            1.0,
            "s",
        ),
        (
            "of which: retire to munmap (call_rcu + force_rcu)",
            col("retire_to_unmap_us"),
            1e-3,
            "ms",
        ),
    ] {
        if v.is_empty() {
            continue;
        }
        let (a, b, _) = stats(v.clone());
        let max = v.iter().copied().fold(f64::MIN, f64::max);
        println!(
            "{:<58} {:>7.2}{unit:>2} {:>7.2}{unit:>2} {:>7.2}{unit:>2}",
            name,
            a * scale,
            b * scale,
            max * scale
        );
    }
}

/// The calling thread's CPU time.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID
    // always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Part 4: plug a 64 GiB region slot by slot, then unplug it, measuring
/// each call's CPU time on the calling (control) thread.
fn scale() {
    const SLOTS: u64 = 512;
    rcu::set_reader_mode(rcu::ReaderMode::Fenced);
    let mut vm = busy_vm_with(SLOTS);
    let hp = vm.machine.hotplug.first().expect("hot-plug").clone();
    let end = PowerOffOnDrop(Arc::clone(&vm.machine.devices.exit));
    let driver = std::thread::spawn(move || {
        rcu::set_reader_mode(rcu::ReaderMode::Fenced);
        std::thread::sleep(Duration::from_millis(200));
        let (mut plug, mut unplug) = (Vec::new(), Vec::new());
        // Slot 0 is plugged by busy_vm_with (the vCPUs touch it).
        for i in 1..SLOTS {
            let gpa = HOTPLUG_BASE + i * SLOT_SIZE;
            let t = thread_cpu();
            hp.manager.plug(gpa, SLOT_SIZE).expect("plug");
            plug.push((
                (thread_cpu() - t).as_secs_f64() * 1e6,
                hp.manager.mapped_slots(),
            ));
        }
        for i in (1..SLOTS).rev() {
            let gpa = HOTPLUG_BASE + i * SLOT_SIZE;
            let before = hp.manager.mapped_slots();
            let t = thread_cpu();
            hp.manager.unplug(gpa, SLOT_SIZE).expect("unplug");
            unplug.push(((thread_cpu() - t).as_secs_f64() * 1e6, before));
            // Stay under the retired-slot cap: let the grace period pass.
            wait_retired_below(&hp, 33, Duration::from_millis(1));
        }
        rcu::drain_call_rcu();
        let left = hp.manager.mapped_slots();
        drop(end);
        (plug, unplug, left)
    });
    let _ = vm.run(Duration::from_secs(900));
    let (plug, unplug, left) = driver.join().expect("driver");
    println!(
        "\n4. Control-thread CPU per map swap against slots mapped (64 GiB region, {SLOTS} slots \
         of {} MiB, 2 vCPUs running; microseconds)",
        SLOT_SIZE >> 20
    );
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>9}",
        "slots mapped at the call", "plug min", "median", "unplug min", "median"
    );
    for (lo, hi) in [(2, 9), (60, 67), (124, 131), (252, 259), (504, 512)] {
        let pick = |v: &[(f64, usize)]| {
            v.iter()
                .filter(|(_, n)| (lo..=hi).contains(n))
                .map(|(t, _)| *t)
                .collect::<Vec<_>>()
        };
        let (p, u) = (pick(&plug), pick(&unplug));
        if p.is_empty() || u.is_empty() {
            continue;
        }
        let (pa, pb, _) = stats(p);
        let (ua, ub, _) = stats(u);
        println!(
            "{:<34} {pa:>9.1} {pb:>9.1} {ua:>9.1} {ub:>9.1}",
            format!("{lo}-{hi}")
        );
    }
    let sum = |v: &[(f64, usize)], n: usize| v.iter().take(n).map(|(t, _)| t).sum::<f64>() / 1e3;
    let per_gib = (1u64 << 30) / SLOT_SIZE;
    println!(
        "16 GiB ({} slots): plug {:.1} ms, unplug {:.1} ms of control-thread CPU \
         ({:.2} / {:.2} ms per GiB); slots still mapped at the end: {left} (slot 0 is the vCPUs')",
        16 * per_gib,
        sum(&plug, (16 * per_gib) as usize),
        sum(&unplug, (16 * per_gib) as usize),
        sum(&plug, (16 * per_gib) as usize) / 16.0,
        sum(&unplug, (16 * per_gib) as usize) / 16.0,
    );
}

fn main() {
    if let Ok(spec) = std::env::var("HOTPLUG_BENCH_CHILD") {
        let (s, rate) = spec.split_once(':').unwrap_or((&spec, "0"));
        stress_child(s, rate.parse().unwrap_or(0));
        return;
    }
    if std::env::args().any(|a| a == "scale") {
        scale();
        return;
    }
    if std::env::args().any(|a| a == "swap") {
        swap_cost();
        return;
    }
    let quick = std::env::args().any(|a| a == "quick");
    swap_cost();
    stress();
    scale();
    if !quick {
        linux();
    }
}
