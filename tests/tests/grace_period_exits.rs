//! Grace periods must not cost running guests: `membarrier` interrupts every
//! CPU running a thread of the process, vCPUs inside `KVM_RUN` included, and
//! each interrupt is a VM exit. The VMM's threads all read in `Fenced` mode,
//! so its grace periods send no `membarrier` at all. This test counts, with
//! KVM's own per-vCPU statistics, the exits while both vCPUs spin in CPL3:
//! during an idle window, during grace periods as the VMM runs them, and, as
//! a control, during grace periods with one membarrier-mode reader thread
//! registered (what a VMM using plain membarrier RCU would do).

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code.

use devices::ExitRequest;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tests::bare_vm::BareVm;
use tests::guest_code;
use vmm::test_utils::KvmStats;
use vmm::test_utils::StopReason;

guest_code! {
    /// Drops to CPL3 (user stack in r13) and spins there without exits.
    fn spin_cpl3(spin_cpl3_start, spin_cpl3_end) in user mode {
        "2:",
        "inc r12",
        "mov qword ptr [rdi], r12",
        "jmp 2b",
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Exits {
    exits: u64,
    irq_exits: u64,
}

fn sample(stats: &[KvmStats]) -> Exits {
    stats.iter().fold(Exits::default(), |a, s| Exits {
        exits: a.exits + s.get("exits").unwrap_or(0),
        irq_exits: a.irq_exits + s.get("irq_exits").unwrap_or(0),
    })
}

fn delta(a: Exits, b: Exits) -> Exits {
    Exits {
        exits: b.exits - a.exits,
        irq_exits: b.irq_exits - a.irq_exits,
    }
}

#[test]
fn grace_periods_cause_no_vm_exits() {
    const GPS: u64 = 2000;
    rcu::set_reader_mode(rcu::ReaderMode::Fenced);
    let mut vm = BareVm::new(2, 64 << 20, spin_cpl3(), 0);
    for cpu in 0..2u64 {
        vm.start_vcpu(cpu as usize, 0, 0x7_0000 - cpu * 0x1000, true, |r| {
            r.rdi = 0x20_0000 + cpu * 0x1_0000;
            r.r13 = 0x6_0000 - cpu * 0x1000;
        });
    }
    let stats: Vec<KvmStats> = vm
        .machine
        .vcpu_fds()
        .iter()
        .map(|fd| KvmStats::open(fd).unwrap())
        .collect();
    let exit = Arc::clone(&vm.machine.devices.exit);
    let measure = std::thread::spawn(move || {
        rcu::set_reader_mode(rcu::ReaderMode::Fenced);
        // Let both vCPUs get going.
        std::thread::sleep(Duration::from_millis(300));

        // Baseline: the same kind of window without grace periods.
        let t = Instant::now();
        let s0 = sample(&stats);
        std::thread::sleep(Duration::from_millis(200));
        let idle = delta(s0, sample(&stats));
        let idle_s = t.elapsed().as_secs_f64();

        // Grace periods as the VMM runs them: every reader fenced.
        let r0 = rcu::stats();
        let t = Instant::now();
        let s1 = sample(&stats);
        for _ in 0..GPS {
            rcu::synchronize_rcu();
        }
        let fenced = delta(s1, sample(&stats));
        let fenced_s = t.elapsed().as_secs_f64();
        let r1 = rcu::stats();

        // Control: one thread reading in membarrier mode (registered, idle).
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            rcu::set_reader_mode(rcu::ReaderMode::Membarrier);
            drop(rcu::read_lock());
            ready_tx.send(()).unwrap();
            while !stop2.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        ready_rx.recv().unwrap();
        let t = Instant::now();
        let s2 = sample(&stats);
        for _ in 0..GPS {
            rcu::synchronize_rcu();
        }
        let membarrier = delta(s2, sample(&stats));
        let membarrier_s = t.elapsed().as_secs_f64();
        let r2 = rcu::stats();
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap();
        exit.request(ExitRequest::PowerOff);
        (
            idle,
            idle_s,
            fenced,
            fenced_s,
            membarrier,
            membarrier_s,
            r0,
            r1,
            r2,
        )
    });
    assert_eq!(
        vm.run(Duration::from_secs(300)),
        StopReason::Guest(ExitRequest::PowerOff)
    );
    let (idle, idle_s, fenced, fenced_s, membarrier, membarrier_s, r0, r1, r2) =
        measure.join().unwrap();
    let rate = |e: Exits, s: f64| e.exits as f64 / s;
    println!(
        "VM exits on 2 spinning vCPUs (KVM statistics):\n\
         \x20 idle window         {:>8} exits ({:>6} irq) in {:.3} s = {:>8.0}/s\n\
         \x20 {GPS} grace periods, all readers fenced (the VMM): {:>8} exits ({:>6} irq) in {:.3} s = {:>8.0}/s; membarriers sent {}\n\
         \x20 {GPS} grace periods, one membarrier-mode reader (control): {:>8} exits ({:>6} irq) in {:.3} s = {:>8.0}/s; membarriers sent {}\n\
         \x20 exits attributable to grace periods: fenced {:.2} per grace period, membarrier {:.2} per grace period",
        idle.exits,
        idle.irq_exits,
        idle_s,
        rate(idle, idle_s),
        fenced.exits,
        fenced.irq_exits,
        fenced_s,
        rate(fenced, fenced_s),
        r1.membarriers - r0.membarriers,
        membarrier.exits,
        membarrier.irq_exits,
        membarrier_s,
        rate(membarrier, membarrier_s),
        r2.membarriers - r1.membarriers,
        (fenced.exits as f64 - rate(idle, idle_s) * fenced_s).max(0.0) / GPS as f64,
        (membarrier.exits as f64 - rate(idle, idle_s) * membarrier_s).max(0.0) / GPS as f64,
    );
    // The design property, exactly: the VMM's grace periods send no IPI.
    assert_eq!(
        r1.membarriers, r0.membarriers,
        "a grace period sent membarrier"
    );
    // The control really is the other case.
    assert!(
        r2.membarriers - r1.membarriers >= GPS,
        "control sent no membarrier"
    );
}
