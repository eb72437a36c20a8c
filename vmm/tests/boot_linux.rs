//! End-to-end boots of real Linux kernels with the `vmm` binary, checked
//! against what the guest kernel itself prints.
//!
//! Here (KVM without hardware virtualization) a Linux guest is the guest
//! kit's minimal kernel, kernel-only: it boots to `Run /init`, and the halt
//! initramfs's `/init` then executes `ud2`, so the kernel panics and resets
//! (`panic=-1`), which ends the VMM with status 0. About a minute per boot.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code.

use std::io::Write;
use std::path::Path;
use std::time::Duration;
use tests::vmm_process::{Session, run};
use vmm::HostKind;

const VMM: &str = env!("CARGO_BIN_EXE_vmm");
/// Generous: a boot takes about a minute here, two at once take longer.
const BOOT_LIMIT: Duration = Duration::from_secs(900);

/// Boots the minimal kernel and checks the guest's own report of it.
fn boot_minimal(image: &str, cpus: u32) {
    tests::require_kvm();
    let boot = tests::kit::boot_args(image, "initramfs-halt.cpio");
    let d = tests::scratch_dir(&format!("boot-{image}-{cpus}"));
    let stats = d.join("rcu.json");
    let metrics = d.join("metrics.json");
    let cpus_s = cpus.to_string();
    let r = run(
        Path::new(VMM),
        &[
            boot.each_ref().map(String::as_str).as_slice(),
            &[
                "--cpus",
                &cpus_s,
                "--memory",
                "128M",
                "--cmdline",
                "panic=-1",
                "--rcu-stats",
                stats.to_str().unwrap(),
                "--metrics",
                metrics.to_str().unwrap(),
            ],
        ]
        .concat(),
        b"",
        BOOT_LIMIT,
    );
    assert_eq!(r.code(), 0, "{r}");
    let console = &r.stdout;
    let cpu_word = if cpus == 1 { "CPU" } else { "CPUs" };
    for needle in [
        "Run /init as init process".to_string(),
        format!("smp: Brought up 1 node, {cpus} {cpu_word}"),
        "console=ttyS0".to_string(),
        "ACPI: RSDP 0x00000000000E0000".to_string(),
        // The kit's /init ends the boot with ud2.
        "Attempted to kill init".to_string(),
    ] {
        assert!(
            console.contains(&needle),
            "guest console lacks '{needle}'\n{r}"
        );
    }
    if HostKind::detect() == HostKind::EmulationOnly {
        assert!(r.stderr.contains("no hardware virtualization"), "{r}");
        assert!(
            console.contains("noxsave"),
            "emulation-only arguments not appended\n{r}"
        );
    }

    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
    assert_eq!(s["callbacks_run"], s["call_rcu"], "{s}");
    assert!(s["call_rcu"].as_u64().unwrap() >= 1, "{s}");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&metrics).unwrap()).unwrap();
    assert!(m["exits"].as_u64().unwrap() > 0, "{m}");
    assert!(m["setup_ms"].as_f64().unwrap() > 0.0, "{m}");
    println!(
        "{image} with {cpus} vCPU(s): exit 0 after {:.1} s; VMM set-up {:.1} ms; {} exits",
        r.elapsed.as_secs_f64(),
        m["setup_ms"].as_f64().unwrap(),
        m["exits"]
    );
}

#[test]
fn minimal_kernel_pvh_vmlinux_two_vcpus() {
    boot_minimal("vmlinux", 2);
}

#[test]
fn minimal_kernel_bzimage_one_vcpu() {
    boot_minimal("bzImage", 1);
}

/// The distribution kernel with a busybox user space: what users boot on
/// hardware. Guest user space cannot make system calls on emulation-only
/// hosts, so there the test says why it does not run; the test host of
/// `tests/hwhost` runs it on every machine.
#[test]
fn distribution_kernel_boots_to_a_shell_and_powers_off() {
    tests::require_kvm();
    if HostKind::detect() == HostKind::EmulationOnly {
        // Written past the test harness's capture so CI logs show it.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED distribution_kernel_boots_to_a_shell_and_powers_off: this host's KVM \
             has no hardware virtualization (guest kernel code is emulated and guest user \
             space cannot make system calls), so the busybox shell cannot run; this test \
             runs where VT-x or AMD-V is available, and on every machine inside the \
             hardware-virtualization test host (tests/hwhost, scenario cargo-tests, which \
             scripts/test.sh runs)"
        );
        return;
    }
    let (kernel, initrd) = tests::kit::distro()
        .expect("distribution kit missing: tests/guest/build-kit.sh --distro builds it");
    let mut s = Session::start(
        Path::new(VMM),
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--initrd",
            initrd.to_str().unwrap(),
            "--cpus",
            "2",
            "--memory",
            "512M",
        ],
    );
    assert!(
        s.wait_for("CPUS_ONLINE=2", Duration::from_secs(120)),
        "{}",
        s.console
    );
    assert!(
        s.wait_for("MEMTOTAL_KB=", Duration::from_secs(10)),
        "{}",
        s.console
    );
    // stdin reaches the shell.
    s.send("echo shell-$((40+2))\n");
    assert!(
        s.wait_for("shell-42", Duration::from_secs(30)),
        "{}",
        s.console
    );
    s.send("poweroff -f\n");
    let (status, took) = s.wait_exit(Duration::from_secs(30));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", s.console);
    println!(
        "poweroff -f ended the vmm {:.0} ms after it was typed",
        took.as_secs_f64() * 1e3
    );
}
