//! Seccomp filters on a running VM. A system call outside the vCPU
//! allow-list, made on a vCPU thread while it handles an exit, ends the
//! whole VMM with `SIGSYS` before it takes effect, after one line naming the
//! thread and the call; with the same guest and
//! no filter, the call runs. With every thread filtered as the `vmm`
//! command filters them, a VM still powers off and still reports an
//! instruction KVM cannot emulate.
//!
//! Filters cannot be removed, so each case runs in a child process: this
//! test binary, re-executed for one test with the case in an environment
//! variable.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code.

use devices::{BusDevice, BusRange, ExitRequest};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;
use tests::bare_vm::BareVm;
use tests::guest_code;
use vmm::test_utils::RunOptions;
use vmm::test_utils::SeccompMode;
use vmm::test_utils::StopReason;

/// Names the case a child process runs.
const CASE_ENV: &str = "VMM_SECCOMP_TEST_CASE";
/// The file the device creates, in the child.
const MARKER_ENV: &str = "VMM_SECCOMP_TEST_MARKER";
/// Port of the file-creating device.
const CREATE_PORT: u64 = 0x90;
const LIMIT: Duration = Duration::from_secs(60);

/// A port device whose write handler creates a file: `openat(O_CREAT)` on
/// the vCPU thread that handles the guest's `out`, which no vCPU filter
/// allows.
struct FileCreator(PathBuf);

impl BusDevice for FileCreator {
    fn read(&self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, _base: u64, _offset: u64, _data: &[u8]) {
        let _ = std::fs::File::create(&self.0);
    }
}

guest_code! {
    /// Writes to the file-creating device, then powers off.
    fn create_then_off(create_then_off_start, create_then_off_end) then power off {
        ".code64",
        "mov dx, 0x90",
        "mov al, 1",
        "out dx, al",
    }
}

guest_code! {
    /// Reports to the test port, then powers off.
    fn report_then_off(report_then_off_start, report_then_off_end) then power off {
        ".code64",
        "mov dx, 0x80",
        "mov eax, 0x5ec",
        "out dx, eax",
    }
}

guest_code! {
    /// popcnt with an MMIO operand, which KVM's emulator cannot do.
    fn seccomp_unemulated(seccomp_unemulated_start, seccomp_unemulated_end) {
        ".code64",
        "mov rbx, 0xd8000000",
        "popcnt rax, qword ptr [rbx]",
        "2: hlt",
        "jmp 2b",
    }
}

/// Runs test `test` of this binary in a child process with `case` (and
/// `marker`) in its environment.
fn run_child(test: &str, case: &str, marker: &Path) -> Output {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CASE_ENV, case)
        .env(MARKER_ENV, marker)
        .output()
        .unwrap()
}

/// In a child: no core file when the filter kills it.
fn no_core_dumps() {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `zero` is a valid rlimit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) }, 0);
}

fn mode(case: &str) -> SeccompMode {
    match case {
        "vcpu" => SeccompMode::VcpuThreads,
        "all" => SeccompMode::AllThreads,
        "off" => SeccompMode::Off,
        other => panic!("unknown case {other}"),
    }
}

fn run_vm(vm: &mut BareVm, seccomp: SeccompMode) -> StopReason {
    vm.machine
        .run(RunOptions {
            console: false,
            timeout: Some(LIMIT),
            qmp: None,
            seccomp,
            console_out: None,
            on_reset: Default::default(),
        })
        .expect("run")
        .reason
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn scratch(name: &str) -> PathBuf {
    tests::scratch_dir(&format!("seccomp-{name}"))
}

#[test]
fn forbidden_syscall_on_a_vcpu_thread_kills_the_vmm_before_it_runs() {
    const TEST: &str = "forbidden_syscall_on_a_vcpu_thread_kills_the_vmm_before_it_runs";
    if let Ok(case) = std::env::var(CASE_ENV) {
        // The child: the VM's vCPU thread meets the device.
        no_core_dumps();
        let marker = PathBuf::from(std::env::var_os(MARKER_ENV).unwrap());
        let mut vm = BareVm::new(1, 64 << 20, create_then_off(), 0);
        vm.machine
            .devices
            .add_pio(
                BusRange::new(CREATE_PORT, 1).unwrap(),
                Arc::new(FileCreator(marker)),
            )
            .unwrap();
        vm.start_long_mode(0, false);
        let reason = run_vm(&mut vm, mode(&case));
        // Only reached when the call was allowed.
        assert_eq!(reason, StopReason::Guest(ExitRequest::PowerOff));
        return;
    }

    let dir = scratch("forbidden");
    // Without filters the guest's `out` makes the device create the file.
    let marker = dir.join("off");
    let out = run_child(TEST, "off", &marker);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(marker.exists(), "the device ran and created the file");

    // With the vCPU filter (as the VMM installs it), or with every thread
    // filtered as the `vmm` command does, the same call kills the process.
    for case in ["vcpu", "all"] {
        let marker = dir.join(case);
        let out = run_child(TEST, case, &marker);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSYS),
            "{case}: {}",
            describe(&out)
        );
        assert!(
            !marker.exists(),
            "{case}: the forbidden openat did not take effect"
        );
        // The SIGSYS handler said which thread made which call.
        let want = format!(
            "vmm: seccomp: thread vcpu0 made a forbidden system call {} (openat); ending with SIGSYS",
            libc::SYS_openat
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(&want),
            "{case}: no '{want}' in {}",
            describe(&out)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn with_every_thread_filtered_a_vm_powers_off_and_reports_an_emulation_failure() {
    const TEST: &str =
        "with_every_thread_filtered_a_vm_powers_off_and_reports_an_emulation_failure";
    if let Ok(case) = std::env::var(CASE_ENV) {
        no_core_dumps();
        match case.as_str() {
            "power-off" => {
                let mut vm = BareVm::new(2, 64 << 20, report_then_off(), 0);
                vm.start_long_mode(0, false);
                let reason = run_vm(&mut vm, SeccompMode::AllThreads);
                assert_eq!(reason, StopReason::Guest(ExitRequest::PowerOff));
                assert_eq!(vm.pio.writes(), vec![(0x80, 0x5ec)]);
                // The exit path of the `vmm` command: drain the callbacks.
                rcu::drain_call_rcu();
            }
            "emulation-failure" => {
                let mut vm = BareVm::new(1, 64 << 20, seccomp_unemulated(), 0);
                vm.start_long_mode(0, false);
                let reason = run_vm(&mut vm, SeccompMode::AllThreads);
                let StopReason::Fatal(msg) = reason else {
                    panic!("expected a fatal error, got {reason:?}");
                };
                assert!(msg.contains("instruction bytes: f3 48 0f b8 03"), "{msg}");
            }
            other => panic!("unknown case {other}"),
        }
        println!("case {case} passed under seccomp");
        return;
    }

    let dir = scratch("lifecycle");
    for case in ["power-off", "emulation-failure"] {
        let out = run_child(TEST, case, &dir.join(case));
        assert!(out.status.success(), "{case}: {}", describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&format!("case {case} passed")),
            "{case}: {}",
            describe(&out)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
