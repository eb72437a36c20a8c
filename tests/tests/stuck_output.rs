//! A guest's console output never blocks a vCPU, and vCPUs that do not
//! answer never hang the VMM: tiny guests on bare VMs, driven over QMP.
//!
//! * A guest that writes COM1 in a loop while stdout is a pipe nobody reads:
//!   grace periods keep completing, QMP answers (`stop` included), the
//!   output is dropped and counted, and `quit` ends the run.
//! * A vCPU stuck in a device access (a test device that blocks until the
//!   test opens it, standing for any access that never returns): QMP `stop`
//!   answers with an error naming it instead of hanging, and the end of the
//!   run leaves it behind instead of waiting for it forever.
//!
//! The tests run one at a time: a stuck vCPU sits inside an RCU read
//! section, which would hold up the grace periods of a test beside it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code.

use devices::{BusDevice, BusRange};
use serde_json::Value;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};
use tests::bare_vm::BareVm;
use tests::guest_code;
use tests::raw_qmp::{self, RawQmp};
use vmm::test_utils::RunOptions;
use vmm::test_utils::RunOutcome;
use vmm::test_utils::{QmpStop, StopReason};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

guest_code! {
    /// Writes 'A' to COM1 forever.
    fn flood_com1(flood_com1_start, flood_com1_end) {
        "mov dx, 0x3f8",
        "2:",
        "mov al, 0x41",
        "out dx, al",
        "jmp 2b",
    }
}

/// Port of the blocking test device.
const GATE_PORT: u16 = 0x90;

guest_code! {
    /// Writes the gate port once, then halts forever.
    fn write_gate(write_gate_start, write_gate_end) {
        "mov al, 1",
        "out 0x90, al",
        "2:",
        "hlt",
        "jmp 2b",
    }
}

/// A device whose writes block until the test opens it.
#[derive(Default)]
struct Gate {
    /// (a write entered, the gate is open)
    state: Mutex<(bool, bool)>,
    cv: Condvar,
}

impl Gate {
    fn wait_entered(&self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        let mut s = self.state.lock().unwrap();
        while !s.0 {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self.cv.wait_timeout(s, left).unwrap().0;
        }
        true
    }

    fn open(&self) {
        self.state.lock().unwrap().1 = true;
        self.cv.notify_all();
    }
}

impl BusDevice for Gate {
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, _base: u64, _offset: u64, _data: &[u8]) {
        let mut s = self.state.lock().unwrap();
        s.0 = true;
        self.cv.notify_all();
        while !s.1 {
            s = self.cv.wait(s).unwrap();
        }
    }
}

fn scratch(name: &str) -> PathBuf {
    tests::scratch_dir(&format!("stuck-{name}"))
}

/// A negotiated QMP connection (tests::raw_qmp), run by command name.
struct Qmp(RawQmp);

impl Qmp {
    fn connect(sock: &Path) -> Self {
        Self(raw_qmp::connect(sock))
    }

    /// Runs `cmd`; returns its reply (events are skipped).
    fn execute(&mut self, cmd: &str) -> Value {
        raw_qmp::execute(&mut self.0, &format!(r#"{{"execute":"{cmd}"}}"#))
    }

    fn status(&mut self) -> Value {
        self.execute("query-status")["return"]["status"].clone()
    }
}

/// A 1-vCPU VM whose guest writes the [`Gate`] port, which holds the vCPU
/// inside the device until the test opens it; the vCPU is started.
fn gated_vm() -> (BareVm, Arc<Gate>) {
    let vm = BareVm::new(1, 64 << 20, write_gate(), 0);
    let gate = Arc::new(Gate::default());
    vm.machine
        .devices
        .add_pio(
            BusRange::new(u64::from(GATE_PORT), 1).unwrap(),
            gate.clone(),
        )
        .unwrap();
    vm.start_long_mode(0, false);
    (vm, gate)
}

/// Runs `vm` with QMP at `sock` (and console output to `console_out`)
/// while `drive` runs on another thread; `drive` must end the VM.
fn run_with(
    vm: &mut BareVm,
    sock: &Path,
    console_out: Option<std::os::fd::RawFd>,
    drive: impl FnOnce() + Send,
) -> (RunOutcome, Duration) {
    std::thread::scope(|s| {
        let driver = s.spawn(drive);
        let outcome = vm
            .machine
            .run(RunOptions {
                console: false,
                timeout: Some(Duration::from_secs(300)),
                qmp: Some(sock.to_path_buf()),
                seccomp: vmm::test_utils::SeccompMode::VcpuThreads,
                console_out,
                on_reset: Default::default(),
            })
            .expect("run");
        let ended = Instant::now();
        if let Err(p) = driver.join() {
            std::panic::resume_unwind(p);
        }
        (outcome, ended.elapsed())
    })
}

/// Waits at most `limit` for `f` to return, on a thread of its own.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}

#[test]
fn grace_periods_and_qmp_go_on_while_stdout_is_stuck() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let d = scratch("flood");
    let sock = d.join("qmp.sock");
    let mut vm = BareVm::new(1, 64 << 20, flood_com1(), 0);
    vm.start_long_mode(0, false);
    // stdout: a pipe nobody reads (the read end stays open, so writes
    // would block rather than fail).
    let (_reader, writer) = std::io::pipe().unwrap();
    let output = Arc::clone(&vm.machine.devices.console_output);
    let sock2 = sock.clone();
    let (outcome, _) = run_with(&mut vm, &sock, Some(writer.as_raw_fd()), move || {
        let mut q = Qmp::connect(&sock2);
        // The pipe and the console buffer fill up: output is being dropped.
        let end = Instant::now() + Duration::from_secs(120);
        while output.dropped() == 0 {
            assert!(
                Instant::now() < end,
                "no output dropped in 120 s ({} bytes buffered)",
                output.accepted()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Grace periods still end: the vCPU is not stuck in a read section.
        let gps = within(Duration::from_secs(30), || {
            let before = rcu::stats().grace_periods;
            for _ in 0..3 {
                rcu::synchronize_rcu();
            }
            rcu::stats().grace_periods - before
        });
        assert!(
            gps.is_some_and(|n| n >= 3),
            "grace periods did not complete while stdout was stuck"
        );
        // QMP answers, and the vCPU parks and resumes.
        assert_eq!(q.status(), "running");
        let r = q.execute("x-query-rcu");
        assert!(r["return"]["grace_periods"].as_u64().unwrap() >= 3, "{r}");
        let r = q.execute("stop");
        assert!(r.get("return").is_some(), "{r}");
        assert_eq!(q.status(), "paused");
        let r = q.execute("cont");
        assert!(r.get("return").is_some(), "{r}");
        let dropped = output.dropped();
        let end = Instant::now() + Duration::from_secs(60);
        while output.dropped() == dropped {
            assert!(Instant::now() < end, "the guest did not run after cont");
            std::thread::sleep(Duration::from_millis(20));
        }
        q.execute("quit");
    });
    assert_eq!(outcome.reason, StopReason::Qmp(QmpStop::Quit));
    assert!(outcome.stuck_vcpus.is_empty());
    assert!(outcome.console_bytes_dropped > 0);
    // What was not dropped is what the pipe and the buffer held.
    assert!(
        outcome.console_bytes >= vmm::test_utils::console_output::CAPACITY as u64,
        "{} bytes accepted",
        outcome.console_bytes
    );
}

#[test]
fn qmp_stop_names_a_vcpu_that_cannot_park() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let d = scratch("stop");
    let sock = d.join("qmp.sock");
    let (mut vm, gate) = gated_vm();
    let sock2 = sock.clone();
    let g = Arc::clone(&gate);
    let (outcome, _) = run_with(&mut vm, &sock, None, move || {
        let mut q = Qmp::connect(&sock2);
        assert!(
            g.wait_entered(Duration::from_secs(120)),
            "the guest never wrote the gate"
        );
        // vCPU 0 is inside the device: it cannot park.
        let r = q.execute("stop");
        assert_eq!(r["error"]["class"], "GenericError", "{r}");
        let desc = r["error"]["desc"].as_str().unwrap();
        assert!(desc.contains("vCPU 0 did not pause"), "{desc}");
        // Nothing changed: the VM still runs.
        assert_eq!(q.status(), "running");
        // Once the access returns, stop works.
        g.open();
        let r = q.execute("stop");
        assert!(r.get("return").is_some(), "{r}");
        assert_eq!(q.status(), "paused");
        q.execute("quit");
    });
    assert_eq!(outcome.reason, StopReason::Qmp(QmpStop::Quit));
    assert!(outcome.stuck_vcpus.is_empty());
}

#[test]
fn the_end_of_a_run_leaves_a_stuck_vcpu_behind() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let d = scratch("end");
    let sock = d.join("qmp.sock");
    let (mut vm, gate) = gated_vm();
    let sock2 = sock.clone();
    let g = Arc::clone(&gate);
    let quit_sent = Arc::new(Mutex::new(None));
    let q_sent = Arc::clone(&quit_sent);
    let (outcome, _) = run_with(&mut vm, &sock, None, move || {
        let mut q = Qmp::connect(&sock2);
        assert!(
            g.wait_entered(Duration::from_secs(120)),
            "the guest never wrote the gate"
        );
        *q_sent.lock().unwrap() = Some(Instant::now());
        q.execute("quit");
    });
    let took = quit_sent.lock().unwrap().unwrap().elapsed();
    // Let the vCPU thread finish before the machine goes away.
    gate.open();
    assert_eq!(outcome.reason, StopReason::Qmp(QmpStop::Quit));
    assert_eq!(outcome.stuck_vcpus, vec![0]);
    assert!(
        took < Duration::from_secs(60),
        "the run took {took:?} to end after quit"
    );
}
