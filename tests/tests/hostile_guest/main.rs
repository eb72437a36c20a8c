//! Hostile tiny guests against the VMM's real devices.
//!
//! A guest here is the attacker: vCPU 0 runs the mailbox runner of
//! `tests::guest_driver`, and a test thread makes it write pseudo-random
//! values of random widths to every register of every device and to
//! unassigned port and MMIO space, or abuse the virtio-mem queue with
//! malformed descriptor chains. vCPU 1 runs a CPL3 heartbeat loop.
//! After the abuse every test checks that:
//! - no thread of the VMM panicked (a panic hook records panics on every
//!   thread, vCPU threads included) and no vCPU reported a fatal error;
//! - the VM still runs: the runner answers, the heartbeat still moves, a
//!   final known write reaches the test device, the virtio-mmio registers
//!   still identify the device;
//! - guest RAM outside what the guest and the devices were allowed to
//!   write is unchanged, and the hot-plug region is unplugged and unmapped
//!   unless the guest plugged memory with a valid request;
//! - the virtio-mem device works again after a driver reset and a proper
//!   handshake: a valid PLUG request is acknowledged and maps the memory.
//!
//! `a_panic_on_a_vcpu_thread_is_noticed` checks the panic watch itself.
//!
//! The pseudo-random sequences come from a seed printed by every test (set
//! `HOSTILE_SEED` to replay one); `HOSTILE_ACCESSES` scales the number of
//! accesses. MMIO abuse runs at CPL3, native speed here; port I/O needs CPL0,
//! which KVM emulates here, so those counts are smaller.

//!
//! Layout: this file holds the tests; `harness` what they all use (the VM,
//! the seeded generator, the checks), `virtq` the test's virtqueue and the
//! guest-side driver steps, and `mmio_abuse`, `port_abuse` and `queue_abuse`
//! what each kind of abuse generates and checks.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code.

mod harness;
mod mmio_abuse;
mod port_abuse;
mod queue_abuse;
mod virtq;

use std::sync::Arc;
use std::time::Duration;

use devices::{BusRange, ExitRequest};
use tests::bare_vm::BareVm;
use tests::guest_driver::{DriverError, Privilege, SCRATCH, SCRATCH_SIZE, runner, start_runner};
use vm_memory::{Bytes, GuestAddress};
use vmm::test_utils::StopReason;

use harness::{
    BLOCK, HOTPLUG_BASE, RAM_SIZE, Rng, accesses, assert_final_write, assert_no_panics,
    assert_ram_unchanged, final_checks, hotplug_vm, identity_checks, r, run_driven, seed,
    serialise, snapshot, start_user, w, watch_panics,
};
use mmio_abuse::{fill_scratch, mmio_abuse};
use port_abuse::{CountingSink, SegmentEnd, port_abuse, port_segment};
use queue_abuse::{
    ALL_MALFORMED, bad_queue_setups_break_the_device, malformed_chains_break_the_device,
    mapping_rss_kib, overlapping_requests_are_answered, refused_requests_are_answered,
    unplug_all_takes_it_all_back, unplugging_the_rings_under_the_device,
};
use virtq::{Virtq, handshake, plug_properly};

#[test]
fn random_mmio_writes_to_every_device_leave_the_vm_running() {
    let _one = serialise();
    let panics = watch_panics();
    let seed = seed("mmio abuse", 0x6d6d_696f_0000_0001);
    let n = accesses(40_000);
    let mut rng = Rng::new(seed);
    let (mut vm, view) = hotplug_vm(runner());
    fill_scratch(&vm, &mut rng);
    start_user(&vm);
    let before = snapshot(&vm);
    let ops = mmio_abuse(&mut rng, n);
    let view = Arc::new(view);
    let v2 = Arc::clone(&view);
    let (reason, ()) = run_driven(&mut vm, move |mut driver| {
        assert!(
            driver.heartbeat_moves(Duration::from_secs(30)),
            "no heartbeat"
        );
        for (i, batch) in ops.chunks(4096).enumerate() {
            if let Err(e) = driver.run(batch) {
                let at = match e {
                    DriverError::Timeout { progress } | DriverError::VmEnded { progress } => {
                        progress as usize
                    }
                };
                let recent = &batch[at.saturating_sub(4)..=at.min(batch.len() - 1)];
                panic!("seed {seed:#x}: batch {i}: {e:?}; last ops {recent:x?}");
            }
        }
        // Nothing can be plugged while the requested size is 0.
        assert_eq!(v2.plugged(), 0, "seed {seed:#x}: memory got plugged");
        assert_eq!(v2.mapped_slots(), 0, "seed {seed:#x}: a slot got mapped");
        identity_checks(&mut driver);
        let mut q = Virtq::new(&v2, SCRATCH + SCRATCH_SIZE - 0x1_0000);
        plug_properly(&mut driver, &v2, &mut q);
        final_checks(&mut driver);
    });
    assert_eq!(
        reason,
        StopReason::Guest(ExitRequest::PowerOff),
        "seed {seed:#x}"
    );
    assert_no_panics(panics, seed);
    assert_eq!(vm.machine.fatal_errors().first(), None);
    assert_final_write(&vm);
    assert_ram_unchanged(&vm, &before, seed);
    let stats = view.transport().stats();
    let unclaimed = {
        let g = rcu::read_lock();
        vm.machine.devices.mmio.read(&g).unclaimed()
    };
    eprintln!(
        "mmio abuse: {n} accesses; virtio-mmio {stats:?}; virtio-mem {:?}; unclaimed MMIO {unclaimed:?}",
        view.hp.vmem.stats()
    );
    assert!(stats.ignored > 0 && stats.bad_width > 0, "{stats:?}");
    assert!(unclaimed.reads + unclaimed.writes > 0);
}

#[test]
fn random_port_writes_to_every_device_leave_the_vm_running() {
    let _one = serialise();
    let panics = watch_panics();
    let seed = seed("port abuse", 0x706f_7274_0000_0001);
    let n = accesses(40_000) / 4;
    let mut rng = Rng::new(seed);
    let ops = Arc::new(port_abuse(&mut rng, n));
    let sink = CountingSink::default();
    let mut start = 0;
    let mut restarts = 0;
    while let SegmentEnd::Ended(k) = port_segment(&ops, start, seed, &sink, panics) {
        restarts += 1;
        start = k + 1;
    }
    let bytes = sink.0.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "port abuse: {n} accesses, {restarts} legitimate resets/power-offs (each a new VM), {bytes} bytes sent to COM1"
    );
    assert!(bytes > 0, "the abuse never reached COM1's transmitter");
}

#[test]
fn a_guest_write_to_an_unplugged_block_gets_no_host_memory() {
    let _one = serialise();
    let panics = watch_panics();
    let (mut vm, view) = hotplug_vm(runner());
    start_user(&vm);
    let view = Arc::new(view);
    let v = Arc::clone(&view);
    // Block 2 of the first slot: the slot is mapped (blocks 0 and 1 are
    // plugged), block 2 is not plugged.
    let target = HOTPLUG_BASE + 2 * BLOCK + 0x40;
    let (reason, (read, wrote)) = run_driven(&mut vm, move |mut driver| {
        let mut q = Virtq::new(&v, SCRATCH);
        plug_properly(&mut driver, &v, &mut q);
        let read = driver
            .one(r(target, 8))
            .expect("the read of the unplugged block")
            .value;
        // The write either stops the VM (KVM_RUN fails with EFAULT: the
        // page is read-only to KVM) or goes nowhere (this machine's KVM
        // emulates the access and, unable to write the page, treats it as
        // MMIO to an unassigned address).
        let wrote = driver.one(w(target, 8, 0x5eed_5eed_5eed_5eed)).is_ok();
        (read, wrote)
    });
    let fatal = vm.machine.fatal_errors().first();
    println!("read {read:#x}; write answered: {wrote}; stop: {reason:?}; fatal: {fatal:?}");
    assert_eq!(read, 0, "an unplugged block reads as zeros");
    if !wrote {
        let msg = fatal.expect("the runner stopped answering, so a vCPU failed");
        assert!(
            msg.contains("KVM_RUN failed") && msg.contains("Bad address"),
            "{msg}"
        );
        assert!(
            msg.contains("unplugged"),
            "the error names the likely cause: {msg}"
        );
    }
    // Host side: the block holds no memory and the value did not land.
    let (_, host, _) = view.hp.manager.mapped_host_ranges()[0];
    let host_target = host + (target - HOTPLUG_BASE);
    let (rss_kib, perms) = mapping_rss_kib(host_target);
    assert_eq!(rss_kib, 0, "the unplugged blocks hold host memory");
    assert!(
        perms.starts_with("r-"),
        "unplugged blocks are read-only: {perms}"
    );
    let (_, plugged_perms) = mapping_rss_kib(host);
    assert!(
        plugged_perms.starts_with("rw"),
        "plugged blocks are writable: {plugged_perms}"
    );
    let g = rcu::read_lock();
    let got: u64 = view
        .memory
        .read(&g)
        .memory()
        .read_obj(GuestAddress(target))
        .unwrap();
    drop(g);
    assert_eq!(got, 0, "the guest's write reached the unplugged block");
    assert_no_panics(panics, 0);
}

#[test]
fn malformed_virtio_mem_requests_break_the_device_and_plug_nothing() {
    let _one = serialise();
    let panics = watch_panics();
    let seed = seed("virtio-mem queue abuse", 0);
    let (mut vm, view) = hotplug_vm(runner());
    start_user(&vm);
    let before = snapshot(&vm);
    let view = Arc::new(view);
    let v = Arc::clone(&view);
    let (reason, ()) = run_driven(&mut vm, move |mut driver| {
        let mut q = Virtq::new(&v, SCRATCH);
        v.hp.vmem.set_requested_size(8 * BLOCK).unwrap();
        handshake(&mut driver, &mut q);
        refused_requests_are_answered(&mut driver, &mut q, &v);
        overlapping_requests_are_answered(&mut driver, &mut q, &v);
        malformed_chains_break_the_device(&mut driver, &mut q, &v);
        bad_queue_setups_break_the_device(&mut driver, &mut q, &v);
        unplugging_the_rings_under_the_device(&mut driver, &q, &v);

        identity_checks(&mut driver);
        let mut q = Virtq::new(&v, SCRATCH + 0x8000);
        plug_properly(&mut driver, &v, &mut q);
        unplug_all_takes_it_all_back(&mut driver, &mut q, &v);
        final_checks(&mut driver);
    });
    assert_eq!(reason, StopReason::Guest(ExitRequest::PowerOff));
    assert_no_panics(panics, seed);
    assert_eq!(vm.machine.fatal_errors().first(), None);
    assert_final_write(&vm);
    assert_ram_unchanged(&vm, &before, seed);
    let stats = view.hp.vmem.stats();
    eprintln!(
        "queue abuse: virtio-mem {stats:?}; virtio-mmio {:?}",
        view.transport().stats()
    );
    // Every malformed chain counts, except the available index running
    // ahead: that is a broken ring, not a broken chain.
    assert_eq!(stats.malformed, ALL_MALFORMED.len() as u64 - 1, "{stats:?}");
    rcu::drain_call_rcu();
    let hp_stats = view.hp.manager.stats();
    assert_eq!(
        hp_stats
            .slots_mapped
            .load(std::sync::atomic::Ordering::Relaxed),
        hp_stats
            .slots_unmapped
            .load(std::sync::atomic::Ordering::Relaxed),
        "every slot mapping was released"
    );
}

/// A device that panics when written: stands for a VMM bug a guest hits.
struct PanicsOnWrite;

impl devices::BusDevice for PanicsOnWrite {
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, _base: u64, _offset: u64, _data: &[u8]) {
        panic!("test device: deliberate panic on a guest write");
    }
}

/// The tests above rely on noticing a panic on a vCPU thread, which would
/// otherwise end that thread quietly while the VM goes on without it. Both
/// ways must see one: the panic watch records it, and the VMM stops the VM
/// with a fatal error naming it. Under the vCPU seccomp filter, as the other
/// tests run.
#[test]
fn a_panic_on_a_vcpu_thread_is_noticed() {
    let _one = serialise();
    let panics = watch_panics();
    let mut vm = BareVm::new(2, RAM_SIZE, runner(), 0);
    let bug = 0xd800_2000;
    vm.machine
        .devices
        .add_mmio(BusRange::new(bug, 0x1000).unwrap(), Arc::new(PanicsOnWrite))
        .unwrap();
    start_runner(&vm, Privilege::User, true);
    let (reason, result) = run_driven(&mut vm, move |mut driver| {
        driver.timeout = Duration::from_secs(30);
        driver.one(w(bug, 4, 1))
    });
    let StopReason::Fatal(msg) = &reason else {
        panic!("a vCPU panic did not stop the VM: {reason:?}");
    };
    assert!(
        msg.contains("vCPU 0") && msg.contains("deliberate panic"),
        "{msg}"
    );
    assert!(
        matches!(result, Err(DriverError::VmEnded { progress: 0 })),
        "{result:?}"
    );
    let new = tests::panic_watch::panics().split_off(panics);
    assert_eq!(new.len(), 1, "{new:#?}");
    assert!(
        new[0].starts_with("thread 'vcpu0'") && new[0].contains("deliberate panic"),
        "{new:#?}"
    );
}
