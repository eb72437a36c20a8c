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
    let mut vm = BareVm::new(1, 64 << 20, report_read_report(), 0);
    vm.start_long_mode(0, false);
    let device = Arc::new(ResetOnFirstRead {
        exit: Arc::clone(&vm.machine.devices.exit),
        armed: std::sync::atomic::AtomicBool::new(true),
    });
    vm.machine
        .devices
        .add_mmio(
            devices::BusRange::new(RESET_DEVICE_MMIO, 4096).unwrap(),
            device,
        )
        .unwrap();
    let outcome = run_until_power_off(&mut vm);
    assert_eq!(outcome.reason, StopReason::Guest(ExitRequest::PowerOff));
    assert_eq!(vm.machine.devices.exit.count(ExitRequest::Reset), 1);
    let reports: Vec<u64> = vm.pio.writes().into_iter().map(|(_, v)| v).collect();
    assert_eq!(
        reports,
        vec![1, 1, 2],
        "what the cold boot and the rebooted guest reported"
    );
}
