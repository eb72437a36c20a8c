//! `--on-reset restart`: a guest reset (i8042 reset command, triple fault)
//! and QMP `system_reset` reboot the guest in place: the same process and
//! QMP socket, connected clients get QEMU's `RESET` event, the guest runs
//! its loaded code again from its power-on state, and nothing (descriptors,
//! mappings, resident memory) grows from one reboot to the next.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code.

use serde_json::Value;
use std::io::{BufRead, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tests::bare_vm::BareVm;
use tests::guest_code;

use devices::ExitRequest;
use tests::raw_qmp::{self, RawQmp};
use vmm::test_utils::OnReset;
use vmm::test_utils::{QmpStop, StopReason};
use vmm::test_utils::{RunOptions, RunOutcome};

const LINE: &str = "guest says hello";

/// The tests of this file run one at a time: the leak test counts the
/// whole process's descriptors and mappings, which another test's VM
/// would change under it.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A guest that runs `before`, prints LINE on COM1 (touching no memory but
/// its code), then runs `after`. The string is labelled `3`, the print loop
/// uses `2` and ends at `4`; `before` and `after` must not reuse those.
macro_rules! hello_guest {
    ($(#[$doc:meta])* fn $name:ident($start:ident, $end:ident) {
        before: [$($before:literal),* $(,)?],
        after: [$($after:literal),* $(,)?] $(,)?
    }) => {
        guest_code! {
            $(#[$doc])*
            fn $name($start, $end) {
                ".code64",
                $($before,)*
                "lea rsi, [rip + 3f]",
                "mov dx, 0x3f8",
                "2: lodsb",
                "test al, al",
                "jz 4f",
                "out dx, al",
                "jmp 2b",
                "4:",
                $($after,)*
                "3: .asciz \"guest says hello\\n\"",
            }
        }
    };
}

hello_guest! {
    /// Prints LINE on COM1, then resets through the i8042.
    fn hello_then_i8042_reset(hello_i8042_start, hello_i8042_end) {
        before: [],
        after: ["mov al, 0xfe", "out 0x64, al", "5: hlt", "jmp 5b"],
    }
}

hello_guest! {
    /// Prints LINE on COM1, then faults with no usable IDT: a triple fault.
    fn hello_then_triple_fault(hello_triple_start, hello_triple_end) {
        before: [],
        after: ["ud2"],
    }
}

hello_guest! {
    /// Writes a marker into RAM at 0x20_0000 (which must read zero again
    /// after a reset: it reports what it found on port 0x80 first), prints
    /// LINE on COM1, then halts for good.
    fn hello_then_halt(hello_halt_start, hello_halt_end) {
        before: [
            "mov rax, [0x200000]",
            "out 0x80, eax",
            "mov qword ptr [0x200000], 0x5a5a",
        ],
        after: ["cli", "5: hlt", "jmp 5b"],
    }
}

fn sock_path(name: &str) -> PathBuf {
    tests::scratch_dir(&format!("reset-{name}")).join("qmp.sock")
}

/// Runs `vm` with `--on-reset restart`, QMP at `sock` and console output
/// collected, while `drive` runs on another thread (it must end the VM).
/// Returns the outcome, the console output and what `drive` returned.
fn run_restart<T: Send>(
    vm: &mut BareVm,
    sock: &Path,
    on_reset: OnReset,
    drive: impl FnOnce(Arc<Mutex<Vec<u8>>>) -> T + Send,
) -> (RunOutcome, String, T) {
    #[allow(clippy::incompatible_msrv)] // As stuck_output.rs: std::io::pipe (1.87).
    let (mut reader, writer) = std::io::pipe().unwrap();
    let console = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|s| {
        let c = Arc::clone(&console);
        let collector = s.spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                c.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let c = Arc::clone(&console);
        let driver = s.spawn(move || drive(c));
        let outcome = vm
            .machine
            .run(RunOptions {
                console: false,
                timeout: Some(Duration::from_secs(120)),
                qmp: Some(sock.to_path_buf()),
                seccomp: vmm::test_utils::SeccompMode::VcpuThreads,
                console_out: Some(writer.as_raw_fd()),
                on_reset,
            })
            .expect("run");
        drop(writer);
        let driven = match driver.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        };
        collector.join().unwrap();
        let out = String::from_utf8_lossy(&console.lock().unwrap()).into_owned();
        (outcome, out, driven)
    })
}

/// The next event of `c` (commands' replies are not expected here).
fn next_event(c: &mut RawQmp) -> Option<Value> {
    loop {
        let mut line = String::new();
        match c.1.read_line(&mut line) {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        let v: Value = serde_json::from_str(&line).expect("JSON from QMP");
        if v.get("event").is_some() {
            return Some(v);
        }
    }
}

/// What the process holds: open descriptors, mappings, resident bytes.
#[derive(Debug, Clone, Copy)]
struct Footprint {
    fds: usize,
    maps: usize,
    rss: u64,
}

fn footprint() -> Footprint {
    let fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
    let maps = std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024;
    Footprint { fds, maps, rss }
}

/// Ten guest resets through the i8042 with `--on-reset restart`: the guest
/// prints its line after every reboot, both connected QMP clients get one
/// `RESET {guest: true, reason: guest-reset}` per reboot, and the process
/// holds as many descriptors and mappings after the tenth reboot as after
/// the second, and no more resident memory than a tolerance well below
/// what one leaked guest RAM image per reboot would add. `quit` then ends
/// the run with status 0.
#[test]
fn ten_guest_resets_reboot_in_place_and_leak_nothing() {
    let _serial = one_at_a_time();
    let mut vm = BareVm::new(2, 64 << 20, hello_then_i8042_reset(), 0);
    vm.start_long_mode(0, false);
    let sock = sock_path("i8042");
    let s2 = sock.clone();
    let (outcome, console, (seen_a, seen_b, at2, at10)) =
        run_restart(&mut vm, &sock, OnReset::Restart, move |_| {
            // b first: it then sees every RESET that a sees.
            let mut b = raw_qmp::connect(&s2);
            let mut a = raw_qmp::connect(&s2);
            let mut seen_a = 0u32;
            let (mut at2, mut at10) = (None, None);
            while seen_a < 10 {
                let ev = next_event(&mut a).expect("a RESET event");
                assert_eq!(ev["event"], "RESET", "{ev}");
                assert_eq!(ev["data"]["guest"], true, "{ev}");
                assert_eq!(ev["data"]["reason"], "guest-reset", "{ev}");
                seen_a += 1;
                if seen_a == 2 {
                    at2 = Some(footprint());
                }
            }
            at10 = at10.or(Some(footprint()));
            let r = raw_qmp::execute(&mut a, r#"{"execute":"quit"}"#);
            assert!(r.get("return").is_some(), "{r}");
            // Client b saw every RESET until the socket closed.
            let mut seen_b = 0u32;
            while let Some(ev) = next_event(&mut b) {
                if ev["event"] == "RESET" {
                    seen_b += 1;
                }
            }
            (seen_a, seen_b, at2.unwrap(), at10.unwrap())
        });
    assert_eq!(outcome.reason, StopReason::Qmp(QmpStop::Quit));
    assert_eq!(outcome.reason.exit_code(), 0);
    let lines = console.matches(LINE).count() as u64;
    // The guest resets from its first boot on, before the clients connect:
    // every reset the guest asked for is counted by the device side.
    let resets = vm.machine.devices.exit.count(ExitRequest::Reset);
    assert!(
        seen_a == 10 && seen_b >= 10,
        "RESET events: a {seen_a}, b {seen_b}"
    );
    assert!(
        u64::from(seen_b) <= resets,
        "{seen_b} RESET events, {resets} resets"
    );
    // Each reboot prints once more; `quit` may come before the last one
    // printed.
    assert!(
        lines == resets + 1 || lines == resets,
        "{lines} lines for {resets} resets: {console:?}"
    );
    assert_eq!(at10.fds, at2.fds, "descriptors: {at2:?} -> {at10:?}");
    assert!(
        at10.maps <= at2.maps + 2,
        "mappings grew over 8 reboots: {at2:?} -> {at10:?}"
    );
    assert!(
        at10.rss <= at2.rss + (4 << 20),
        "resident memory grew over 8 reboots: {at2:?} -> {at10:?}"
    );
}

/// A triple fault with `--on-reset restart` reboots the guest too, and
/// the rcu counters balance at the end (every callback queued ran).
#[test]
fn triple_faults_reboot_in_place() {
    let _serial = one_at_a_time();
    let mut vm = BareVm::new(1, 64 << 20, hello_then_triple_fault(), 0);
    vm.start_long_mode(0, false);
    let sock = sock_path("triple");
    let s2 = sock.clone();
    let (outcome, console, ()) = run_restart(&mut vm, &sock, OnReset::Restart, move |_| {
        let mut a = raw_qmp::connect(&s2);
        for _ in 0..3 {
            let ev = next_event(&mut a).expect("a RESET event");
            assert_eq!(ev["event"], "RESET", "{ev}");
            assert_eq!(ev["data"]["reason"], "guest-reset", "{ev}");
        }
        let r = raw_qmp::execute(&mut a, r#"{"execute":"quit"}"#);
        assert!(r.get("return").is_some(), "{r}");
    });
    assert_eq!(outcome.reason, StopReason::Qmp(QmpStop::Quit));
    assert!(console.matches(LINE).count() >= 3, "{console:?}");
}

/// Waits until the console shows LINE `n` times (60 s at most).
fn wait_lines(console: &Mutex<Vec<u8>>, n: usize) {
    let end = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let count = String::from_utf8_lossy(&console.lock().unwrap())
            .matches(LINE)
            .count();
        if count >= n {
            return;
        }
        assert!(std::time::Instant::now() < end, "{count} of {n} lines");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// QMP `system_reset` with `--on-reset restart`: `RESET {guest: false,
/// reason: host-qmp-system-reset}` and no `SHUTDOWN`, the client stays
/// connected, the VM keeps running (`query-status`), the guest runs again
/// from its loaded code and finds the RAM it wrote before the reset zeroed.
#[test]
fn qmp_system_reset_with_restart_reboots_and_keeps_the_connection() {
    let _serial = one_at_a_time();
    let mut vm = BareVm::new(1, 64 << 20, hello_then_halt(), 0);
    vm.start_long_mode(0, false);
    let pio = Arc::clone(&vm.pio);
    let sock = sock_path("qmp-restart");
    let s2 = sock.clone();
    let (outcome, console, ()) = run_restart(&mut vm, &sock, OnReset::Restart, move |c| {
        let mut a = raw_qmp::connect(&s2);
        wait_lines(&c, 1);
        for round in 1..=2 {
            let r = raw_qmp::execute(&mut a, r#"{"execute":"system_reset"}"#);
            assert!(r.get("return").is_some(), "{r}");
            let ev = next_event(&mut a).expect("an event after system_reset");
            assert_eq!(ev["event"], "RESET", "round {round}: {ev}");
            assert_eq!(ev["data"]["guest"], false, "{ev}");
            assert_eq!(ev["data"]["reason"], "host-qmp-system-reset", "{ev}");
            wait_lines(&c, round + 1);
            let st = raw_qmp::execute(&mut a, r#"{"execute":"query-status"}"#);
            assert_eq!(st["return"]["status"], "running", "{st}");
        }
        a.0.write_all(br#"{"execute":"quit"}"#).unwrap();
    });
    assert_eq!(outcome.reason, StopReason::Qmp(QmpStop::Quit));
    assert_eq!(console.matches(LINE).count(), 3, "{console:?}");
    // Each boot read the marker's place before writing it: zero each time.
    let reads: Vec<u64> = pio.writes().into_iter().map(|(_, v)| v).collect();
    assert_eq!(reads, vec![0, 0, 0], "what each boot found in RAM");
}

/// QMP `system_reset` with the default `--on-reset exit` ends the run as
/// before: `SHUTDOWN {guest: false, reason: host-qmp-system-reset}`.
#[test]
fn qmp_system_reset_with_exit_ends_the_run() {
    let _serial = one_at_a_time();
    let mut vm = BareVm::new(1, 64 << 20, hello_then_halt(), 0);
    vm.start_long_mode(0, false);
    let sock = sock_path("qmp-exit");
    let s2 = sock.clone();
    let (outcome, _console, ev) = run_restart(&mut vm, &sock, OnReset::Exit, move |c| {
        let mut a = raw_qmp::connect(&s2);
        wait_lines(&c, 1);
        let r = raw_qmp::execute(&mut a, r#"{"execute":"system_reset"}"#);
        assert!(r.get("return").is_some(), "{r}");
        next_event(&mut a).expect("an event after system_reset")
    });
    assert_eq!(outcome.reason, StopReason::Qmp(QmpStop::SystemReset));
    assert_eq!(ev["event"], "SHUTDOWN", "{ev}");
    assert_eq!(ev["data"]["reason"], "host-qmp-system-reset", "{ev}");
}

/// Where the test devices of the tests below sit on the MMIO bus: the page
/// after the bare VM's recorder.
const RESET_DEVICE_MMIO: u64 = tests::bare_vm::TEST_MMIO + 0x1000;

/// An MMIO register whose first read asks for a machine reset and is held
/// until that reset has reached the reading vCPU (it was kicked out of the
/// guest), so that the vCPU leaves the access with KVM still owing the
/// guest the end of the instruction. Reads return `0x5a` bytes.
struct ResetOnFirstRead {
    exit: Arc<devices::ExitSink>,
    armed: std::sync::atomic::AtomicBool,
}

impl devices::BusDevice for ResetOnFirstRead {
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
        if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.exit.request(ExitRequest::Reset);
            let end = std::time::Instant::now() + Duration::from_secs(60);
            while !vmm::test_utils::this_vcpu_was_kicked() {
                assert!(
                    std::time::Instant::now() < end,
                    "the reset was not asked of the vCPU within 60 s"
                );
                std::thread::yield_now();
            }
        }
        data.fill(0x5a);
    }

    fn write(&self, _base: u64, _offset: u64, _data: &[u8]) {}
}

guest_code! {
    /// Reports 1 on port 0x80, reads the register at RESET_DEVICE_MMIO
    /// (whose first read resets the machine), reports 2, powers off.
    fn report_read_report(report_read_start, report_read_end) then power off {
        ".code64",
        "mov eax, 1",
        "out 0x80, eax",
        "mov rbx, 0xd8001000",
        "mov eax, dword ptr [rbx]",
        "mov eax, 2",
        "out 0x80, eax",
    }
}

guest_code! {
    /// As `report_read_report`, reading port RESET_DEVICE_PORT instead.
    fn report_in_report(report_in_start, report_in_end) then power off {
        ".code64",
        "mov eax, 1",
        "out 0x80, eax",
        "mov dx, 0x8c",
        "in eax, dx",
        "mov eax, 2",
        "out 0x80, eax",
    }
}

/// Where the reset-on-read device sits on the port-I/O bus (4 ports).
const RESET_DEVICE_PORT: u16 = 0x8c;

/// Runs `vm` with `--on-reset restart` until the guest powers off (120 s
/// at most), no QMP, vCPU threads filtered as the `vmm` command does.
fn run_until_power_off(vm: &mut BareVm) -> RunOutcome {
    vm.machine
        .run(RunOptions {
            console: false,
            timeout: Some(Duration::from_secs(120)),
            qmp: None,
            seccomp: vmm::test_utils::SeccompMode::VcpuThreads,
            console_out: None,
            on_reset: OnReset::Restart,
        })
        .expect("run")
}

/// Runs `code` (which reports 1, reads the reset-on-read device at
/// `range` on the port-I/O bus if `pio`, else the MMIO bus, reports 2 and
/// powers off) and returns what it reported over both boots.
fn reports_around_a_reset_during_a_read(
    code: &[u8],
    pio: bool,
    range: devices::BusRange,
) -> Vec<u64> {
    let mut vm = BareVm::new(1, 64 << 20, code, 0);
    vm.start_long_mode(0, false);
    let device = Arc::new(ResetOnFirstRead {
        exit: Arc::clone(&vm.machine.devices.exit),
        armed: std::sync::atomic::AtomicBool::new(true),
    });
    if pio {
        vm.machine.devices.add_pio(range, device).unwrap();
    } else {
        vm.machine.devices.add_mmio(range, device).unwrap();
    }
    let outcome = run_until_power_off(&mut vm);
    assert_eq!(outcome.reason, StopReason::Guest(ExitRequest::PowerOff));
    assert_eq!(vm.machine.devices.exit.count(ExitRequest::Reset), 1);
    vm.pio.writes().into_iter().map(|(_, v)| v).collect()
}

/// A reset that reaches a vCPU while KVM still owes it the end of an MMIO
/// read (KVM finishes an I/O or MMIO instruction in the next `KVM_RUN`)
/// reboots that vCPU from its power-on state all the same: the rebooted
/// guest starts at its entry point and reports 1 again, instead of KVM
/// finishing the old guest's read on top of the power-on registers and
/// resuming after it (which reports 2 at once).
#[test]
fn a_reset_during_an_mmio_read_reboots_from_the_power_on_state() {
    let _serial = one_at_a_time();
    assert_eq!(RESET_DEVICE_MMIO, 0xd800_1000, "the guest's address");
    let range = devices::BusRange::new(RESET_DEVICE_MMIO, 4096).unwrap();
    assert_eq!(
        reports_around_a_reset_during_a_read(report_read_report(), false, range),
        vec![1, 1, 2],
        "what the cold boot and the rebooted guest reported"
    );
}

/// The same with a port read (`in`). Where KVM emulates `in` (as on
/// hosts without hardware virtualization) it finishes it as it finishes an
/// MMIO read; KVM's fast path for `in` (with hardware virtualization,
/// `complete_fast_pio_in` in arch/x86/kvm/x86.c) finishes it only if RIP
/// did not change, so there the old read was dropped rather than resumed.
#[test]
fn a_reset_during_a_port_read_reboots_from_the_power_on_state() {
    let _serial = one_at_a_time();
    assert_eq!(RESET_DEVICE_PORT, 0x8c, "the guest's port");
    let range = devices::BusRange::new(u64::from(RESET_DEVICE_PORT), 4).unwrap();
    assert_eq!(
        reports_around_a_reset_during_a_read(report_in_report(), true, range),
        vec![1, 1, 2],
        "what the cold boot and the rebooted guest reported"
    );
}

/// Local APIC registers each vCPU reports at boot (offsets in its page),
/// in the order of `report_lapic`'s table.
const LAPIC_REGS: [(u16, &str); 35] = [
    (0x20, "ID"),
    (0x30, "version"),
    (0x80, "TPR"),
    (0xd0, "LDR"),
    (0xe0, "DFR"),
    (0xf0, "SVR"),
    (0x100, "ISR0"),
    (0x110, "ISR1"),
    (0x120, "ISR2"),
    (0x130, "ISR3"),
    (0x140, "ISR4"),
    (0x150, "ISR5"),
    (0x160, "ISR6"),
    (0x170, "ISR7"),
    (0x180, "TMR0"),
    (0x190, "TMR1"),
    (0x1a0, "TMR2"),
    (0x1b0, "TMR3"),
    (0x1c0, "TMR4"),
    (0x1d0, "TMR5"),
    (0x1e0, "TMR6"),
    (0x1f0, "TMR7"),
    (0x200, "IRR0"),
    (0x210, "IRR1"),
    (0x220, "IRR2"),
    (0x230, "IRR3"),
    (0x240, "IRR4"),
    (0x250, "IRR5"),
    (0x260, "IRR6"),
    (0x270, "IRR7"),
    (0x320, "LVT timer"),
    (0x350, "LVT LINT0"),
    (0x360, "LVT LINT1"),
    (0x380, "timer initial count"),
    (0x390, "timer current count"),
];

guest_code! {
    /// Subroutine (at REPORT_LAPIC_ADDR): writes this vCPU's local APIC
    /// registers (LAPIC_REGS, then ESR, LVT error and the divide
    /// configuration) and its TSC-deadline MSR (low, high) to port `dx`.
    /// Clobbers rax, rcx, rdx, r8, r9.
    fn report_lapic(report_lapic_start, report_lapic_end) {
        ".code64",
        "push rbx",
        "push rsi",
        "mov r8d, edx",
        "mov rbx, 0xfee00000",
        "lea rsi, [rip + 20f]",
        "10:",
        "movzx eax, word ptr [rsi]",
        "cmp eax, 0xffff",
        "je 11f",
        "mov eax, dword ptr [rbx + rax]",
        "out dx, eax",
        "add rsi, 2",
        "jmp 10b",
        "11:",
        "mov ecx, 0x6e0",
        "rdmsr",
        "mov r9d, edx",
        "mov edx, r8d",
        "out dx, eax",
        "mov eax, r9d",
        "out dx, eax",
        "pop rsi",
        "pop rbx",
        "ret",
        "20:",
        ".short 0x20, 0x30, 0x80, 0xd0, 0xe0, 0xf0",
        ".short 0x100, 0x110, 0x120, 0x130, 0x140, 0x150, 0x160, 0x170",
        ".short 0x180, 0x190, 0x1a0, 0x1b0, 0x1c0, 0x1d0, 0x1e0, 0x1f0",
        ".short 0x200, 0x210, 0x220, 0x230, 0x240, 0x250, 0x260, 0x270",
        ".short 0x320, 0x350, 0x360, 0x380, 0x390",
        ".short 0xffff",
    }
}

/// Where `report_lapic` is loaded.
const REPORT_LAPIC_ADDR: u64 = tests::bare_vm::CODE_ADDR + 0x2000;
/// Where the second vCPU's code is loaded.
const AP_CODE_ADDR: u64 = tests::bare_vm::CODE_ADDR + 0x1000;
/// The port of the boot counter (reads return 0 at the first boot, 1 at
/// the next...).
const BOOT_COUNTER_PORT: u16 = 0x88;
/// The guest-RAM flag the second vCPU sets once its part of a boot is done.
const AP_DONE_FLAG: u64 = 0x20_0000;

guest_code! {
    /// The boot vCPU. Every boot: reads its boot number N from the boot
    /// counter; reports on port 0x80 N, its local APIC and TSC deadline,
    /// the IOAPIC's 24 redirection entries (low, high), both PICs' IMR, IRR
    /// and ISR and the ELCR, the PIT's read-back status of channels 0-2 and
    /// port 0x61 (without the refresh bit), then N on port 0x81 (end of the
    /// report). Then it enables its local APIC and takes interrupts for a
    /// while (none was enabled: with the null IDT, one would triple-fault),
    /// reports N on port 0x82 and waits for the second vCPU's flag.
    /// Boot 0 then makes the in-kernel devices busy: both PICs initialised
    /// and unmasked, LINT0 ExtINT unmasked, IOAPIC pin 0 (PIT, edge, vector
    /// 0x30) and pin 4 (COM1, level, vector 0x34) unmasked, PIT channel 0
    /// periodic, channel 2 running with its gate on, COM1's THR-empty
    /// interrupt enabled, the local APIC timer one-shot (vector 0x40); with
    /// interrupts off it waits until the three vectors are pending, reports
    /// the local APIC's IRR words 1 and 2, IOAPIC entry 4 and the master
    /// PIC's IRR on port 0x83, arms the local APIC timer again (far away)
    /// and resets through the i8042 (or, if bit 8 of the boot number is
    /// set, halts with interrupts off and waits for a reset from outside).
    /// Later boots (low byte of the number not 0) power off instead.
    fn busy_then_reset(busy_reset_start, busy_reset_end) then power off {
        ".code64",
        "in eax, 0x88",
        "mov r12d, eax",
        "mov dx, 0x80",
        "out dx, eax",
        "mov rax, 0x102000",
        "call rax",
        "mov dx, 0x80",
        "mov rdi, 0xfec00000",
        "xor ecx, ecx",
        "12:",
        "lea eax, [rcx * 2 + 0x10]",
        "mov dword ptr [rdi], eax",
        "mov eax, dword ptr [rdi + 0x10]",
        "out dx, eax",
        "lea eax, [rcx * 2 + 0x11]",
        "mov dword ptr [rdi], eax",
        "mov eax, dword ptr [rdi + 0x10]",
        "out dx, eax",
        "inc ecx",
        "cmp ecx, 24",
        "jb 12b",
        "in al, 0x21",
        "movzx eax, al",
        "out dx, eax",
        "in al, 0xa1",
        "movzx eax, al",
        "out dx, eax",
        "mov al, 0x0a",
        "out 0x20, al",
        "in al, 0x20",
        "movzx eax, al",
        "out dx, eax",
        "mov al, 0x0b",
        "out 0x20, al",
        "in al, 0x20",
        "movzx eax, al",
        "out dx, eax",
        "mov al, 0x0a",
        "out 0xa0, al",
        "in al, 0xa0",
        "movzx eax, al",
        "out dx, eax",
        "mov al, 0x0b",
        "out 0xa0, al",
        "in al, 0xa0",
        "movzx eax, al",
        "out dx, eax",
        "mov dx, 0x4d0",
        "in al, dx",
        "movzx eax, al",
        "mov dx, 0x80",
        "out dx, eax",
        "mov dx, 0x4d1",
        "in al, dx",
        "movzx eax, al",
        "mov dx, 0x80",
        "out dx, eax",
        "mov al, 0xe2",
        "out 0x43, al",
        "in al, 0x40",
        "movzx eax, al",
        "out dx, eax",
        "mov al, 0xe4",
        "out 0x43, al",
        "in al, 0x41",
        "movzx eax, al",
        "out dx, eax",
        "mov al, 0xe8",
        "out 0x43, al",
        "in al, 0x42",
        "movzx eax, al",
        "out dx, eax",
        "in al, 0x61",
        "and al, 0xef",
        "movzx eax, al",
        "out dx, eax",
        "mov eax, r12d",
        "out 0x81, eax",
        // Interrupts on for a while: none may come.
        "mov rbx, 0xfee00000",
        "mov dword ptr [rbx + 0xf0], 0x1ff",
        "sti",
        "mov ecx, 100000",
        "13:",
        "pause",
        "dec ecx",
        "jnz 13b",
        "cli",
        "mov eax, r12d",
        "out 0x82, eax",
        // Wait for the second vCPU (bounded).
        "mov ecx, 0x1000000",
        "18:",
        "cmp dword ptr [0x200000], 1",
        "je 19f",
        "pause",
        "dec ecx",
        "jnz 18b",
        "19:",
        "test r12d, 0xff",
        "jnz 40f",
        // Boot 0: busy devices, then a reset.
        "mov al, 0x11",
        "out 0x20, al",
        "mov al, 0x20",
        "out 0x21, al",
        "mov al, 0x04",
        "out 0x21, al",
        "mov al, 0x01",
        "out 0x21, al",
        "mov al, 0x11",
        "out 0xa0, al",
        "mov al, 0x28",
        "out 0xa1, al",
        "mov al, 0x02",
        "out 0xa1, al",
        "mov al, 0x01",
        "out 0xa1, al",
        "xor eax, eax",
        "out 0x21, al",
        "out 0xa1, al",
        "mov dx, 0x4d1",
        "mov al, 0x0e",
        "out dx, al",
        "mov dword ptr [rbx + 0x350], 0x700",
        "mov dword ptr [rdi], 0x10",
        "mov dword ptr [rdi + 0x10], 0x30",
        "mov dword ptr [rdi], 0x11",
        "mov dword ptr [rdi + 0x10], 0",
        "mov dword ptr [rdi], 0x18",
        "mov dword ptr [rdi + 0x10], 0x8034",
        "mov dword ptr [rdi], 0x19",
        "mov dword ptr [rdi + 0x10], 0",
        "mov al, 0x34",
        "out 0x43, al",
        "xor eax, eax",
        "out 0x40, al",
        "mov al, 0x10",
        "out 0x40, al",
        "mov al, 0xb6",
        "out 0x43, al",
        "xor eax, eax",
        "out 0x42, al",
        "mov al, 0x08",
        "out 0x42, al",
        "in al, 0x61",
        "or al, 3",
        "out 0x61, al",
        "mov dx, 0x3f9",
        "mov al, 0x02",
        "out dx, al",
        "mov dword ptr [rbx + 0x3e0], 0xb",
        "mov dword ptr [rbx + 0x320], 0x40",
        "mov dword ptr [rbx + 0x380], 0x10000",
        "mov ecx, 0x100000",
        "15:",
        "mov eax, dword ptr [rbx + 0x210]",
        "and eax, 0x110000",
        "cmp eax, 0x110000",
        "jne 16f",
        "test dword ptr [rbx + 0x220], 1",
        "jnz 17f",
        "16:",
        "dec ecx",
        "jnz 15b",
        "17:",
        "mov dx, 0x83",
        "mov eax, dword ptr [rbx + 0x210]",
        "out dx, eax",
        "mov eax, dword ptr [rbx + 0x220]",
        "out dx, eax",
        "mov dword ptr [rdi], 0x18",
        "mov eax, dword ptr [rdi + 0x10]",
        "out dx, eax",
        "mov al, 0x0a",
        "out 0x20, al",
        "in al, 0x20",
        "movzx eax, al",
        "out dx, eax",
        "mov dword ptr [rbx + 0x380], 0xffffffff",
        "test r12d, 0x100",
        "jnz 14f",
        "mov al, 0xfe",
        "out 0x64, al",
        "14:",
        "hlt",
        "jmp 14b",
        "40:",
    }
}

guest_code! {
    /// The second vCPU (at AP_CODE_ADDR). Every boot: reports its local
    /// APIC and TSC deadline on port 0x84, then the boot's end marker on
    /// 0x85 (one byte, as the markers on 0x86 and 0x87: the recorder's
    /// ports end at 0x87); enables its local APIC and takes interrupts for a while (none
    /// may come), marks 0x87; then arms its TSC-deadline timer (vector
    /// 0x41) close, waits with interrupts off until the vector is pending,
    /// reports the low half of IRR word 2 on port 0x86, arms the timer again far away, sets
    /// the flag at AP_DONE_FLAG and halts with interrupts off.
    fn ap_busy(ap_busy_start, ap_busy_end) {
        ".code64",
        "mov dx, 0x84",
        "mov rax, 0x102000",
        "call rax",
        "xor eax, eax",
        "out 0x85, al",
        "mov rbx, 0xfee00000",
        "mov dword ptr [rbx + 0xf0], 0x1ff",
        "sti",
        "mov ecx, 100000",
        "13:",
        "pause",
        "dec ecx",
        "jnz 13b",
        "cli",
        "xor eax, eax",
        "out 0x87, al",
        "mov dword ptr [rbx + 0x320], 0x40041",
        "rdtsc",
        "shl rdx, 32",
        "or rax, rdx",
        "add rax, 0x10000",
        "mov rdx, rax",
        "shr rdx, 32",
        "mov ecx, 0x6e0",
        "wrmsr",
        "mov ecx, 0x100000",
        "15:",
        "test dword ptr [rbx + 0x220], 2",
        "jnz 17f",
        "dec ecx",
        "jnz 15b",
        "17:",
        "mov eax, dword ptr [rbx + 0x220]",
        "out 0x86, ax",
        "rdtsc",
        "shl rdx, 32",
        "or rax, rdx",
        "mov rsi, 0x10000000000",
        "add rax, rsi",
        "mov rdx, rax",
        "shr rdx, 32",
        "mov ecx, 0x6e0",
        "wrmsr",
        "mov dword ptr [0x200000], 1",
        "14:",
        "cli",
        "hlt",
        "jmp 14b",
    }
}

/// Reads return how many reads came before (the guest's boot number),
/// plus the initial value.
#[derive(Default)]
struct BootCounter(std::sync::atomic::AtomicU32);

impl devices::BusDevice for BootCounter {
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        for (d, s) in data.iter_mut().zip(n.to_le_bytes()) {
            *d = s;
        }
    }

    fn write(&self, _base: u64, _offset: u64, _data: &[u8]) {}
}

/// Two vCPUs running `busy_then_reset` and `ap_busy`, with the boot
/// counter at BOOT_COUNTER_PORT counting from `first_boot`.
fn busy_vm(first_boot: u32) -> BareVm {
    let vm = BareVm::new(2, 64 << 20, busy_then_reset(), 0);
    assert_eq!(REPORT_LAPIC_ADDR, 0x10_2000, "the guest's address");
    assert_eq!(AP_DONE_FLAG, 0x20_0000, "the guest's address");
    assert_eq!(BOOT_COUNTER_PORT, 0x88, "the guest's port");
    vm.write(REPORT_LAPIC_ADDR, report_lapic());
    vm.write(AP_CODE_ADDR, ap_busy());
    vm.machine
        .devices
        .add_pio(
            devices::BusRange::new(u64::from(BOOT_COUNTER_PORT), 4).unwrap(),
            Arc::new(BootCounter(std::sync::atomic::AtomicU32::new(first_boot))),
        )
        .unwrap();
    vm.start_long_mode(0, false);
    vm.start_vcpu(
        1,
        AP_CODE_ADDR - tests::bare_vm::CODE_ADDR,
        0x7_0000,
        false,
        |_| {},
    );
    vm
}

/// Names of the values of the boot vCPU's report, in its order.
fn bsp_report_names() -> Vec<String> {
    let mut names = vec!["boot number".to_string()];
    names.extend(LAPIC_REGS.iter().map(|(_, n)| format!("LAPIC {n}")));
    names.push("TSC deadline low".into());
    names.push("TSC deadline high".into());
    for pin in 0..24 {
        names.push(format!("IOAPIC pin {pin} low"));
        names.push(format!("IOAPIC pin {pin} high"));
    }
    for n in [
        "PIC master IMR",
        "PIC slave IMR",
        "PIC master IRR",
        "PIC master ISR",
        "PIC slave IRR",
        "PIC slave ISR",
        "ELCR 0x4d0",
        "ELCR 0x4d1",
        "PIT channel 0 status",
        "PIT channel 1 status",
        "PIT channel 2 status",
        "port 0x61 (no refresh bit)",
    ] {
        names.push(n.into());
    }
    names
}

/// The values written to `port`, in order.
fn written_to(vm: &BareVm, port: u16) -> Vec<u64> {
    vm.pio
        .writes()
        .into_iter()
        .filter(|&(a, _)| a == u64::from(port))
        .map(|(_, v)| v)
        .collect()
}

/// Splits a run of reports of `len` values each into reports.
fn reports(values: &[u64], len: usize) -> Vec<Vec<u64>> {
    values.chunks(len).map(<[u64]>::to_vec).collect()
}

/// The differences between two reports, named.
fn differences(names: &[String], cold: &[u64], rebooted: &[u64]) -> Vec<String> {
    names
        .iter()
        .zip(cold.iter().zip(rebooted))
        .filter(|(_, (a, b))| a != b)
        .map(|(n, (a, b))| format!("{n}: cold boot {a:#x}, rebooted {b:#x}"))
        .collect()
}

/// A guest that resets while the in-kernel interrupt controllers and
/// timers are busy (PIT channel 0 periodic with a tick pending and
/// unacknowledged, channel 2 running, both PICs programmed, an IOAPIC level
/// pin waiting for its EOI, local APIC timers armed, one-shot on vCPU 0 and
/// TSC-deadline on vCPU 1, vectors pending in both local APICs, COM1's
/// interrupt raised) finds them, after the reboot in place, as it found
/// them at the cold boot: each vCPU's local APIC and TSC deadline, the
/// IOAPIC, the PICs and the PIT read the same, and no interrupt arrives
/// that the rebooted guest did not enable.
#[test]
fn a_rebooted_guest_finds_the_interrupt_controllers_and_timers_as_at_cold_boot() {
    let _serial = one_at_a_time();
    let mut vm = busy_vm(0);
    let outcome = run_until_power_off(&mut vm);
    assert_eq!(outcome.reason, StopReason::Guest(ExitRequest::PowerOff));
    assert_eq!(
        vm.machine.devices.exit.count(ExitRequest::Reset),
        1,
        "one reset (an unexpected interrupt would triple-fault: another)"
    );

    // The busy state was reached before the reset.
    let busy = written_to(&vm, 0x83);
    assert_eq!(busy.len(), 4, "boot 0's busy state: {busy:x?}");
    assert_ne!(
        busy[0] & (1 << 16),
        0,
        "vector 0x30 (PIT) pending: {busy:x?}"
    );
    assert_ne!(
        busy[0] & (1 << 20),
        0,
        "vector 0x34 (COM1) pending: {busy:x?}"
    );
    assert_ne!(
        busy[1] & 1,
        0,
        "vector 0x40 (APIC timer) pending: {busy:x?}"
    );
    assert_ne!(busy[2] & (1 << 14), 0, "IOAPIC pin 4 remote IRR: {busy:x?}");
    let ap_busy = written_to(&vm, 0x86);
    assert!(
        ap_busy.first().is_some_and(|v| v & 2 != 0),
        "vector 0x41 (TSC deadline) pending on vCPU 1: {ap_busy:x?}"
    );

    // Both boots took interrupts for a while and got none.
    assert_eq!(
        written_to(&vm, 0x82),
        vec![0, 1],
        "boot vCPU's quiet probes"
    );
    assert_eq!(written_to(&vm, 0x87), vec![0, 0], "vCPU 1's quiet probes");

    let names = bsp_report_names();
    let bsp = reports(&written_to(&vm, 0x80), names.len());
    assert_eq!(bsp.len(), 2, "two boot reports: {bsp:x?}");
    assert_eq!(written_to(&vm, 0x81), vec![0, 1], "two whole boot reports");
    let mut diffs = differences(&names[1..], &bsp[0][1..], &bsp[1][1..]);
    let ap_names: Vec<String> = names[1..LAPIC_REGS.len() + 3]
        .iter()
        .map(|n| format!("vCPU 1 {n}"))
        .collect();
    let ap = reports(&written_to(&vm, 0x84), ap_names.len());
    assert_eq!(ap.len(), 2, "two reports of vCPU 1: {ap:x?}");
    diffs.extend(differences(&ap_names, &ap[0], &ap[1]));
    assert!(
        diffs.is_empty(),
        "the rebooted guest found, unlike the cold boot:\n{}",
        diffs.join("\n")
    );
}

/// KVM's vCPU ioctls, for reading a parked vCPU's state from the test's
/// thread (the VMM's vCPU threads own their `VcpuFd`s).
mod vcpu_ioctls {
    use vmm_sys_util::{ioctl_ior_nr, ioctl_iowr_nr};
    const KVMIO: u32 = 0xae;
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_bindings::kvm_msrs);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_bindings::kvm_lapic_state);
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_bindings::kvm_mp_state);
    ioctl_ior_nr!(
        KVM_GET_VCPU_EVENTS,
        KVMIO,
        0x9f,
        kvm_bindings::kvm_vcpu_events
    );
}

/// A vCPU file descriptor of the machine under test, by number.
struct RawVcpu(std::os::fd::RawFd);

impl std::os::fd::AsRawFd for RawVcpu {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

/// What KVM reports of a vCPU.
#[derive(Debug, Clone, PartialEq)]
struct VcpuView {
    mp_state: u32,
    events: kvm_bindings::kvm_vcpu_events,
    lapic: Vec<u8>,
    msrs: std::collections::BTreeMap<u32, u64>,
}

/// Reads what KVM reports of the vCPU `fd` (which must not be in
/// `KVM_RUN`: its thread not started, or parked), with the MSRs of
/// `msr_indexes` that it can read.
fn vcpu_view(fd: std::os::fd::RawFd, msr_indexes: &[u32]) -> VcpuView {
    use vmm_sys_util::ioctl::{ioctl_with_mut_ptr, ioctl_with_mut_ref};
    let fd = RawVcpu(fd);
    let mut mp = kvm_bindings::kvm_mp_state::default();
    // SAFETY: KVM writes one kvm_mp_state into `mp`.
    let rc = unsafe { ioctl_with_mut_ref(&fd, vcpu_ioctls::KVM_GET_MP_STATE(), &mut mp) };
    assert_eq!(rc, 0, "KVM_GET_MP_STATE");
    let mut events = kvm_bindings::kvm_vcpu_events::default();
    // SAFETY: KVM writes one kvm_vcpu_events into `events`.
    let rc = unsafe { ioctl_with_mut_ref(&fd, vcpu_ioctls::KVM_GET_VCPU_EVENTS(), &mut events) };
    assert_eq!(rc, 0, "KVM_GET_VCPU_EVENTS");
    let mut lapic = kvm_bindings::kvm_lapic_state::default();
    // SAFETY: KVM writes one kvm_lapic_state into `lapic`.
    let rc = unsafe { ioctl_with_mut_ref(&fd, vcpu_ioctls::KVM_GET_LAPIC(), &mut lapic) };
    assert_eq!(rc, 0, "KVM_GET_LAPIC");
    let mut msrs = std::collections::BTreeMap::new();
    for &index in msr_indexes {
        let mut one = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .unwrap();
        // SAFETY: `one` is a kvm_msrs with room for the one entry it
        // announces; KVM writes at most that entry's data.
        let n = unsafe {
            ioctl_with_mut_ptr(
                &fd,
                vcpu_ioctls::KVM_GET_MSRS(),
                one.as_mut_fam_struct_ptr(),
            )
        };
        if n == 1 {
            msrs.insert(index, one.as_slice()[0].data);
        }
    }
    VcpuView {
        mp_state: mp.mp_state,
        events,
        lapic: lapic.regs.iter().map(|&b| b as u8).collect(),
        msrs,
    }
}

/// What KVM reports of the PIT, the PICs and the IOAPIC, and of each vCPU.
#[derive(Debug, Clone)]
struct KvmView {
    pit: kvm_bindings::kvm_pit_state2,
    chips: Vec<Vec<u8>>,
    vcpus: Vec<VcpuView>,
}

fn kvm_view(vm: &VmFd, vcpu_fds: &[std::os::fd::RawFd], msrs: &[u32]) -> KvmView {
    let pit = vm.get_pit2().unwrap();
    let chips = (0..3)
        .map(|chip_id| {
            let mut chip = kvm_bindings::kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip).unwrap();
            // SAFETY: every field of the union is plain bytes; `dummy`
            // covers all 512 of them.
            unsafe { chip.chip.dummy }
                .iter()
                .map(|&b| b as u8)
                .collect()
        })
        .collect();
    let vcpus = vcpu_fds.iter().map(|&fd| vcpu_view(fd, msrs)).collect();
    KvmView { pit, chips, vcpus }
}

use kvm_ioctls::VmFd;

/// The differences between a cold boot's view and a rebooted one, named.
/// Left out, as they differ between any two readings: each PIT channel's
/// `count_load_time` (a host clock reading), the local APIC timer's
/// current count, and the TSC.
fn view_differences(cold: &KvmView, rebooted: &KvmView) -> Vec<String> {
    let mut d = Vec::new();
    let (mut a, mut b) = (cold.pit, rebooted.pit);
    for c in a.channels.iter_mut().chain(b.channels.iter_mut()) {
        c.count_load_time = 0;
    }
    if a != b {
        d.push(format!("PIT: cold boot {a:?}, rebooted {b:?}"));
    }
    for (i, (x, y)) in cold.chips.iter().zip(&rebooted.chips).enumerate() {
        for (off, (p, q)) in x.iter().zip(y).enumerate() {
            if p != q {
                d.push(format!(
                    "irqchip {i} byte {off}: cold boot {p:#x}, rebooted {q:#x}"
                ));
            }
        }
    }
    for (n, (x, y)) in cold.vcpus.iter().zip(&rebooted.vcpus).enumerate() {
        if x.mp_state != y.mp_state {
            d.push(format!(
                "vCPU {n} mp_state: {} -> {}",
                x.mp_state, y.mp_state
            ));
        }
        if x.events != y.events {
            d.push(format!(
                "vCPU {n} events: cold boot {:?}, rebooted {:?}",
                x.events, y.events
            ));
        }
        for reg in (0..x.lapic.len()).step_by(16) {
            if reg == 0x390 {
                continue;
            }
            let (p, q) = (&x.lapic[reg..reg + 4], &y.lapic[reg..reg + 4]);
            if p != q {
                d.push(format!(
                    "vCPU {n} LAPIC {reg:#x}: cold boot {p:x?}, rebooted {q:x?}"
                ));
            }
        }
        for (index, v) in &x.msrs {
            if *index == 0x10 {
                continue;
            }
            let w = y.msrs.get(index);
            if w != Some(v) {
                d.push(format!(
                    "vCPU {n} MSR {index:#x}: cold boot {v:#x}, rebooted {w:x?}"
                ));
            }
        }
    }
    d
}

/// What KVM itself reports after a reset made while the in-kernel
/// interrupt controllers, timers and vCPUs were busy (as in the test
/// above, reset by QMP `system_reset` while the VM is paused, so the
/// vCPUs stay parked and nothing runs between the restore and the
/// reading) is what it reported before the cold boot: the PIT (all but
/// the load times), both PICs and the IOAPIC byte for byte, and each
/// vCPU's MP state, pending events, local APIC registers (all but the
/// timer's current count) and every MSR it can read (all but the TSC).
#[test]
fn after_a_reset_kvm_reports_the_cold_boot_state() {
    let _serial = one_at_a_time();
    let mut vm = busy_vm(0x100);
    let fds: Vec<std::os::fd::RawFd> = vm
        .machine
        .vcpu_fds()
        .iter()
        .map(std::os::fd::AsRawFd::as_raw_fd)
        .collect();
    let msr_indexes = vm.machine.vm.kvm().get_msr_index_list().unwrap();
    let msr_indexes = msr_indexes.as_slice().to_vec();
    let cold = kvm_view(vm.machine.vm.fd(), &fds, &msr_indexes);
    let kvm_vm = Arc::clone(&vm.machine.vm);
    let pio = Arc::clone(&vm.pio);
    let sock = sock_path("kvm-view");
    let s2 = sock.clone();
    let (outcome, _console, rebooted) = run_restart(&mut vm, &sock, OnReset::Restart, move |_| {
        let mut a = raw_qmp::connect(&s2);
        let end = std::time::Instant::now() + Duration::from_secs(60);
        let busy = |port: u64| pio.writes().iter().filter(|(p, _)| *p == port).count();
        while busy(0x83) < 4 || busy(0x86) < 1 {
            assert!(std::time::Instant::now() < end, "the guest never got busy");
            std::thread::sleep(Duration::from_millis(10));
        }
        let r = raw_qmp::execute(&mut a, r#"{"execute":"stop"}"#);
        assert!(r.get("return").is_some(), "{r}");
        let r = raw_qmp::execute(&mut a, r#"{"execute":"system_reset"}"#);
        assert!(r.get("return").is_some(), "{r}");
        loop {
            let ev = next_event(&mut a).expect("RESET");
            if ev["event"] == "RESET" {
                break;
            }
        }
        let rebooted = kvm_view(kvm_vm.fd(), &fds, &msr_indexes);
        let r = raw_qmp::execute(&mut a, r#"{"execute":"quit"}"#);
        assert!(r.get("return").is_some(), "{r}");
        rebooted
    });
    assert_eq!(outcome.reason, StopReason::Qmp(QmpStop::Quit));
    assert!(cold.vcpus.iter().all(|v| !v.msrs.is_empty()));
    let diffs = view_differences(&cold, &rebooted);
    assert!(
        diffs.is_empty(),
        "after the reset KVM reports, unlike before the cold boot:\n{}",
        diffs.join("\n")
    );
}
