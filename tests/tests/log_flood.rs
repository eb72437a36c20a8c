//! A guest that loops on what the VMM logs cannot flood its stderr.
//!
//! The VM runs in this process with the VMM's own logger (`vmm::logger`, as
//! the `vmm` command installs it) at the default level, its stderr
//! (descriptor 2) redirected to a file. A tiny guest (the
//! `tests::guest_driver` runner at CPL3 on vCPU 0) then:
//! - breaks the virtio-mem device and resets it, over and over (a queue
//!   whose rings are outside guest memory, notified);
//! - notifies the broken queue tens of thousands of times, thousands of
//!   them each waited for until the control thread has refused it;
//! - makes thousands of ignored or unclaimed MMIO accesses (bad widths,
//!   read-only registers, unassigned addresses, the GED).
//!
//! The device counters prove each loop ran; stderr must hold the one
//! warning that the device needs a reset and little else, whatever the
//! counts. The per-call-site rate limit of the logger is not what keeps it
//! small: at 10 lines a second per site, this run would print far more.
//!
//! This file holds one test: descriptor 2 and the logger are process-wide.
//! The `vmm` binary cannot run such a guest (it boots a Linux kernel), so
//! the VM runs in-process as in `hostile_guest.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code.

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::ExitRequest;
use tests::bare_vm::TEST_MMIO;
use tests::guest_driver::{GuestDriver, Op, run_driven};
use tests::stderr_redirect::{StderrRedirect, default_log_level};
use tests::virtio_ops::{
    QUEUE_NOTIFY, STATUS, VIRTIO, break_device, first_read_then_watch_panics, r32, run,
    runner_vm_with_virtio_mem, w32,
};
use vmm::test_utils::{Hotplug, StopReason};

const LIMIT: Duration = Duration::from_secs(600);
/// How long the control thread may take to answer one notification (it
/// shares two cores with spinning vCPUs and other work here).
const ANSWER_WITHIN: Duration = Duration::from_secs(60);

/// Break-and-reset cycles of the device.
const CYCLES: u64 = 200;
/// Notifications of the broken queue, each waited for until refused.
const ANSWERED_NOTIFIES: u64 = 2_000;
/// Notifications of the broken queue in batches, not waited for.
const BATCHED_NOTIFIES: usize = 40_000;
/// Other ignored or unclaimed MMIO accesses.
const ABUSE: usize = 20_000;

/// What stderr may hold in all: the one warning, with room to spare.
const MAX_LINES: usize = 4;
const MAX_BYTES: usize = 1024;

const GED: u64 = 0xd000_0000;
const UNASSIGNED: u64 = 0xd100_0000;

fn w(addr: u64, width: u8, value: u64) -> Op {
    Op::Write { addr, width, value }
}

/// Waits until the transport has refused more than `before` notifications.
fn wait_refused(hp: &Hotplug, before: u64, n: u64) {
    let end = Instant::now() + ANSWER_WITHIN;
    while hp.transport.stats().refused_while_broken <= before {
        assert!(
            Instant::now() < end,
            "notification {n} of the broken queue was never processed"
        );
        std::thread::sleep(Duration::from_micros(20));
    }
}

/// Ignored and unclaimed MMIO accesses, round robin.
fn abuse_ops() -> Vec<Op> {
    (0..ABUSE as u64)
        .map(|k| match k % 5 {
            // Register accesses that are not 32 bits wide.
            0 => w(VIRTIO + STATUS, 1, 0xff),
            // Writes to the read-only configuration space.
            1 => w(VIRTIO + 0x100 + (k % 0x40) * 4, 4, k),
            // Nothing there.
            2 => w(UNASSIGNED + (k % 0x200) * 8, 8, k),
            3 => Op::Read {
                addr: UNASSIGNED + (k % 0x200) * 8,
                width: 4,
            },
            // The GED ignores writes.
            _ => w(GED + (k % 4), 1, k),
        })
        .collect()
}

fn drive(mut driver: GuestDriver, hp: &Hotplug) {
    // The runner answers: the VM runs.
    first_read_then_watch_panics(&mut driver);
    for cycle in 0..CYCLES {
        break_device(&mut driver, cycle, ANSWER_WITHIN);
    }
    for n in 0..ANSWERED_NOTIFIES {
        let before = hp.transport.stats().refused_while_broken;
        run(&mut driver, "notify", &[w32(QUEUE_NOTIFY, 0)]);
        wait_refused(hp, before, n);
    }
    let notifies = vec![w32(QUEUE_NOTIFY, 0); BATCHED_NOTIFIES];
    for batch in notifies.chunks(4096) {
        let before = hp.transport.stats().refused_while_broken;
        run(&mut driver, "notify batch", batch);
        wait_refused(hp, before, 0);
    }
    for batch in abuse_ops().chunks(4096) {
        run(&mut driver, "abuse", batch);
    }
    // Still broken, still alive.
    let status = run(&mut driver, "status", &[r32(STATUS)])[0].value;
    assert_eq!(status & 0x40, 0x40, "status {status:#x}");
    run(&mut driver, "final write", &[w(TEST_MMIO, 8, 0x600d)]);
}

#[test]
fn a_guest_looping_on_logged_paths_prints_little_on_stderr() {
    default_log_level();
    tests::require_kvm();
    tests::panic_watch::install();
    let path = std::env::temp_dir().join(format!("vmm-log-flood-{}.stderr", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();

    let (mut vm, hp) = runner_vm_with_virtio_mem();

    let redirect = StderrRedirect::to(&file);
    vmm::logger::init();
    let hp2 = Arc::clone(&hp);
    let (outcome, driven) = run_driven(&mut vm, LIMIT, move |driver| drive(driver, &hp2));
    drop(redirect);
    let mut stderr = String::new();
    std::fs::File::open(&path)
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let _ = std::fs::remove_file(&path);
    if let Err(p) = driven {
        eprintln!("--- VMM stderr ---\n{stderr}");
        std::panic::resume_unwind(p);
    }

    assert_eq!(
        outcome.reason,
        StopReason::Guest(ExitRequest::PowerOff),
        "{stderr}"
    );
    assert_eq!(vm.machine.fatal_errors().first(), None);
    assert!(tests::panic_watch::panics().is_empty(), "{stderr}");

    // The loops ran: the device's own counters.
    let stats = hp.transport.stats();
    let unclaimed = {
        let g = rcu::read_lock();
        vm.machine.devices.mmio.read(&g).unclaimed()
    };
    eprintln!("virtio-mmio {stats:?}; unclaimed MMIO {unclaimed:?}");
    assert_eq!(stats.broken, CYCLES, "{stats:?}");
    let batches = BATCHED_NOTIFIES.div_ceil(4096) as u64;
    assert!(
        stats.refused_while_broken >= ANSWERED_NOTIFIES + batches,
        "{stats:?}"
    );
    assert!(stats.bad_width >= (ABUSE / 5) as u64, "{stats:?}");
    assert!(
        unclaimed.reads + unclaimed.writes >= 2 * (ABUSE / 5) as u64,
        "{unclaimed:?}"
    );

    // And stderr holds the one warning, not one line per loop.
    let lines: Vec<&str> = stderr.lines().collect();
    let warnings = lines
        .iter()
        .filter(|l| l.starts_with("vmm: warning: virtio-mmio: device needs reset"))
        .count();
    assert_eq!(
        warnings, 1,
        "the first break is one warning (the logger writes to the redirected stderr):\n{stderr}"
    );
    assert!(
        lines.len() <= MAX_LINES && stderr.len() <= MAX_BYTES,
        "{} lines, {} bytes on stderr after {} breaks and {} refused notifications:\n{stderr}",
        lines.len(),
        stderr.len(),
        stats.broken,
        stats.refused_while_broken
    );
}
