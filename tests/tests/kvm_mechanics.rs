//! KVM mechanics with tiny assembly guests: long-mode start, port I/O and
//! MMIO dispatch through the RCU-published buses, AP start through
//! INIT/SIPI, the ways a guest ends (i8042 reset, ACPI reset and power-off,
//! triple fault), `int3` completion and the report of an instruction KVM
//! cannot emulate. Each needs /dev/kvm and fails without it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code.

use devices::{BusRange, ExitRequest};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tests::bare_vm::{BareVm, CODE_ADDR, TEST_MMIO, TEST_PORT};
use tests::guest_code;
use tests::recorder::Recorder;
use vmm::test_utils::StopReason;

const LIMIT: Duration = Duration::from_secs(60);

guest_code! {
    /// 64-bit guest: port I/O out and in, MMIO write and read (with a value
    /// only 64-bit code can produce), then ACPI power-off.
    fn io_and_mmio(io_and_mmio_start, io_and_mmio_end) then power off {
        ".code64",
        "mov dx, 0x80",
        "mov eax, 0x12345678",
        "out dx, eax",
        "in eax, dx",
        "mov dx, 0x84",
        "out dx, eax",
        "mov rbx, 0xd8000000",
        "mov rax, 0x1122334455667788",
        "mov qword ptr [rbx], rax",
        "mov rax, qword ptr [rbx + 8]",
        "mov qword ptr [rbx + 16], rax",
    }
}

#[test]
fn vcpu_starts_in_long_mode_and_io_and_mmio_reach_devices() {
    let mut vm = BareVm::new(1, 64 << 20, io_and_mmio(), 0xcafe_f00d_dead_beef);
    vm.start_long_mode(0, false);
    let reason = vm.run(LIMIT);
    assert_eq!(reason, StopReason::Guest(ExitRequest::PowerOff));
    let port = u64::from(TEST_PORT);
    assert_eq!(
        vm.pio.writes(),
        vec![(port, 0x1234_5678), (port + 4, 0xdead_beef)],
        "port writes; the second echoes the 4-byte read"
    );
    assert_eq!(
        vm.mmio.writes(),
        vec![
            (TEST_MMIO, 0x1122_3344_5566_7788),
            (TEST_MMIO + 16, 0xcafe_f00d_dead_beef)
        ]
    );
    let reads = vm.mmio.accesses().into_iter().filter(|a| !a.write).count();
    assert_eq!(reads, 1);
}

guest_code! {
    /// Ends through the i8042 CPU-reset command.
    fn i8042_reset(i8042_reset_start, i8042_reset_end) {
        ".code64",
        "mov al, 0xfe",
        "out 0x64, al",
        "2: hlt",
        "jmp 2b",
    }
}

guest_code! {
    /// Ends through the ACPI reset register.
    fn acpi_reset(acpi_reset_start, acpi_reset_end) {
        ".code64",
        "mov dx, 0x602",
        "mov al, 1",
        "out dx, al",
        "2: hlt",
        "jmp 2b",
    }
}

guest_code! {
    /// Faults with no usable IDT: #UD, #GP, #DF, then a triple fault.
    fn triple_fault(triple_fault_start, triple_fault_end) {
        ".code64",
        "ud2",
    }
}

#[test]
fn guest_ends_through_i8042_reset() {
    let mut vm = BareVm::new(1, 64 << 20, i8042_reset(), 0);
    vm.start_long_mode(0, false);
    assert_eq!(vm.run(LIMIT), StopReason::Guest(ExitRequest::Reset));
}

#[test]
fn guest_ends_through_acpi_reset_register() {
    let mut vm = BareVm::new(1, 64 << 20, acpi_reset(), 0);
    vm.start_long_mode(0, false);
    assert_eq!(vm.run(LIMIT), StopReason::Guest(ExitRequest::Reset));
}

#[test]
fn triple_fault_is_a_reset() {
    let mut vm = BareVm::new(1, 64 << 20, triple_fault(), 0);
    vm.start_long_mode(0, false);
    assert_eq!(vm.run(LIMIT), StopReason::Guest(ExitRequest::Reset));
}

guest_code! {
    /// BSP: enable the LAPIC, send INIT then SIPI (vector 0x70: the AP
    /// starts in real mode at 0x70000), then wait. The AP trampoline (at
    /// offset 0x100 of this blob, copied to 0x70000) writes 0xa1 to the test
    /// port and powers off.
    fn init_sipi(init_sipi_start, init_sipi_end) {
        ".code64",
        "mov rbx, 0xfee00000",
        "mov dword ptr [rbx + 0xf0], 0x1ff",
        "mov dword ptr [rbx + 0x310], 0x01000000",
        "mov dword ptr [rbx + 0x300], 0x00004500",
        "mov dword ptr [rbx + 0x310], 0x01000000",
        "mov dword ptr [rbx + 0x300], 0x00004670",
        "2: pause",
        "jmp 2b",
        ".balign 0x100",
        ".code16",
        "mov dx, 0x80",
        "mov al, 0xa1",
        "out dx, al",
        "mov dx, 0x600",
        "mov al, 0x34",
        "out dx, al",
        "3: hlt",
        "jmp 3b",
    }
}

#[test]
fn application_processor_starts_through_init_sipi() {
    let code = init_sipi();
    let mut vm = BareVm::new(2, 64 << 20, code, 0);
    vm.write(0x7_0000, &code[0x100..]);
    vm.start_long_mode(0, false);
    assert_eq!(vm.run(LIMIT), StopReason::Guest(ExitRequest::PowerOff));
    assert_eq!(vm.pio.writes(), vec![(u64::from(TEST_PORT), 0xa1)]);
}

guest_code! {
    /// Installs a #BP handler that reports its return RIP over MMIO, then
    /// executes int3. Before that it reports where int3 should return to.
    fn breakpoint(breakpoint_start, breakpoint_end) then power off {
        ".code64",
        "lea rax, [rip + 5f]",
        "mov rdi, 0x60000",
        "mov word ptr [rdi + 48], ax",
        "mov word ptr [rdi + 50], 0x10",
        "mov byte ptr [rdi + 52], 0",
        "mov byte ptr [rdi + 53], 0x8e",
        "shr rax, 16",
        "mov word ptr [rdi + 54], ax",
        "shr rax, 16",
        "mov dword ptr [rdi + 56], eax",
        "mov dword ptr [rdi + 60], 0",
        "mov word ptr [rdi + 0xff0], 0xfff",
        "mov qword ptr [rdi + 0xff2], rdi",
        "lidt [rdi + 0xff0]",
        "mov rbx, 0xd8000000",
        "lea rcx, [rip + 4f]",
        "mov qword ptr [rbx + 8], rcx",
        "int3",
        "4: hlt",
        "jmp 4b",
        "5:",
        "mov rax, qword ptr [rsp]",
        "mov qword ptr [rbx], rax",
    }
}

#[test]
fn int3_raises_breakpoint_with_rip_after_it() {
    let mut vm = BareVm::new(1, 64 << 20, breakpoint(), 0);
    vm.start_long_mode(0, false);
    let outcome = vm.run_outcome(LIMIT);
    assert_eq!(outcome.reason, StopReason::Guest(ExitRequest::PowerOff));
    let completed = outcome.vcpu_stats[0]
        .int3_completed
        .load(std::sync::atomic::Ordering::Relaxed);
    if vm.machine.host() == vmm::HostKind::EmulationOnly {
        // KVM's emulator cannot run int3; the VMM completed it.
        assert_eq!(completed, 1);
    } else {
        // Hardware runs int3 itself.
        assert_eq!(completed, 0);
    }
    let w = vm.mmio.writes();
    assert_eq!(w.len(), 2, "{w:x?}");
    let (expected, got) = (w[0].1, w[1].1);
    assert!(
        expected > CODE_ADDR && expected < CODE_ADDR + 0x100,
        "{expected:#x}"
    );
    assert_eq!(
        got, expected,
        "the #BP handler saw RIP {got:#x}, expected {expected:#x}"
    );
}

guest_code! {
    /// popcnt with an MMIO operand: KVM must emulate it and its emulator
    /// has no popcnt (on emulation-only hosts even the register form fails).
    fn unemulated(unemulated_start, unemulated_end) {
        ".code64",
        "mov rbx, 0xd8000000",
        "popcnt rax, qword ptr [rbx]",
        "2: hlt",
        "jmp 2b",
    }
}

#[test]
fn instruction_kvm_cannot_emulate_stops_the_vm_naming_rip_and_bytes() {
    let mut vm = BareVm::new(1, 64 << 20, unemulated(), 0);
    vm.start_long_mode(0, false);
    let reason = vm.run(LIMIT);
    let StopReason::Fatal(msg) = reason else {
        panic!("expected a fatal error, got {reason:?}");
    };
    let rip = CODE_ADDR + 10; // after the 10-byte mov
    assert!(msg.contains(&format!("at RIP {rip:#x}")), "{msg}");
    assert!(msg.contains("instruction bytes: f3 48 0f b8 03"), "{msg}");
    assert!(msg.contains("vCPU 0"), "{msg}");
}

guest_code! {
    /// Writes an increasing counter to the MMIO test page forever.
    fn mmio_counter(mmio_counter_start, mmio_counter_end) {
        ".code64",
        "mov rbx, 0xd8000000",
        "xor rax, rax",
        "2: inc rax",
        "mov qword ptr [rbx], rax",
        "jmp 2b",
    }
}

/// While the guest keeps writing to one MMIO address, the control side
/// swaps the device behind it by publishing a new bus: the guest's writes
/// move to the new device, none is lost or misdirected, and the old table
/// is freed through call_rcu.
#[test]
fn bus_swapped_under_a_running_vcpu_takes_effect() {
    let mut vm = BareVm::new(1, 64 << 20, mmio_counter(), 0);
    vm.start_long_mode(0, false);
    let mmio_bus = Arc::clone(&vm.machine.devices.mmio);
    let exit = Arc::clone(&vm.machine.devices.exit);
    let first = Arc::clone(&vm.mmio);
    let second = Arc::new(Recorder::new(0));
    let second2 = Arc::clone(&second);
    let before = rcu::stats();
    let swapper = std::thread::spawn(move || {
        let wait_for = |r: &Recorder, n: usize| {
            let end = Instant::now() + LIMIT;
            while r.writes().len() < n && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(1));
            }
            r.writes().len() >= n
        };
        assert!(wait_for(&first, 20), "guest did not start writing");
        let range = BusRange::new(TEST_MMIO, 4096).unwrap();
        let g = rcu::read_lock();
        let (without, _) = mmio_bus.read(&g).without_range(TEST_MMIO).unwrap();
        let next = without.with_device(range, second2.clone()).unwrap();
        drop(g);
        mmio_bus.replace(next);
        assert!(
            wait_for(&second2, 20),
            "writes did not reach the new device"
        );
        exit.request(ExitRequest::PowerOff);
    });
    assert_eq!(vm.run(LIMIT), StopReason::Guest(ExitRequest::PowerOff));
    swapper.join().unwrap();
    // The counter sequence continues across the swap without a gap.
    let a: Vec<u64> = vm.mmio.writes().into_iter().map(|w| w.1).collect();
    let b: Vec<u64> = second.writes().into_iter().map(|w| w.1).collect();
    let all: Vec<u64> = a.iter().chain(b.iter()).copied().collect();
    assert!(
        all.windows(2).all(|w| w[1] == w[0] + 1),
        "lost or duplicated writes"
    );
    rcu::drain_call_rcu();
    let after = rcu::stats();
    let swaps = |s: &rcu::Stats| {
        s.by_site
            .iter()
            .filter(|e| e.label == vmm::test_utils::BUS_LABEL)
            .map(|e| e.run)
            .sum::<u64>()
    };
    assert!(
        swaps(&after) > swaps(&before),
        "the old bus was not freed through call_rcu"
    );
}

/// KVM's own exit counters can be read for a vCPU (the hot-plug checks use
/// them to count exits caused by grace periods).
#[test]
fn kvm_vcpu_statistics_are_readable() {
    let mut vm = BareVm::new(1, 64 << 20, io_and_mmio(), 0);
    vm.start_long_mode(0, false);
    let stats = vmm::test_utils::KvmStats::open(&vm.machine.vcpu_fds()[0]).expect("stats fd");
    let before = stats.get("exits").expect("an 'exits' counter");
    assert_eq!(vm.run(LIMIT), StopReason::Guest(ExitRequest::PowerOff));
    let after = stats.get("exits").unwrap();
    // Two port writes, one read, two MMIO writes, one MMIO read, power-off.
    assert!(
        after >= before + 7,
        "exits {before} -> {after}; have {:?}",
        stats.names()
    );
}
