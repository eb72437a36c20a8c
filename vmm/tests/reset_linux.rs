//! Reboot in place with hot-plugged memory: the kit's minimal Linux kernel
//! (kernel-only; its virtio-mem driver plugs by itself) run by the `vmm`
//! binary with `--on-reset restart` and its seccomp filters, driven over a
//! raw QMP socket.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code.

use serde_json::Value;
use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};
use tests::raw_qmp::{self, RawQmp};
use tests::vmm_process::Captured;

const VMM: &str = env!("CARGO_BIN_EXE_vmm");
const MIB: u64 = 1 << 20;

/// `query-memory-devices`' first device.
fn vmem(q: &mut RawQmp) -> Value {
    let r = raw_qmp::execute(q, r#"{"execute":"query-memory-devices"}"#);
    r["return"][0]["data"].clone()
}

fn mapped_slots(q: &mut RawQmp) -> usize {
    let r = raw_qmp::execute(q, r#"{"execute":"x-query-hotplug"}"#);
    r["return"]["mapped-slots"]
        .as_array()
        .unwrap_or_else(|| panic!("x-query-hotplug: {r}"))
        .len()
}

/// Polls until the device's plugged size is `want` (the guest's driver
/// works at its own pace; a generous liveness deadline).
fn wait_size(q: &mut RawQmp, want: u64, what: &str) {
    let end = Instant::now() + Duration::from_secs(240);
    loop {
        let d = vmem(q);
        if d["size"].as_u64() == Some(want) {
            return;
        }
        assert!(
            Instant::now() < end,
            "{what}: size never reached {want}: {d}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Plugged memory before a QMP `system_reset` with `--on-reset restart`:
/// the reset sends `RESET`, unplugs everything (size 0, no slot mapped
/// until the rebooted guest plugs again), keeps
/// `requested-size`, and the rebooted guest's driver plugs it again on
/// its own. `quit` then ends the VMM with status 0, with every RCU
/// callback run.
#[test]
fn hotplugged_memory_is_unplugged_on_reset_and_plugged_again_by_the_rebooted_guest() {
    tests::require_kvm();
    let dir = tests::scratch_dir("reset-linux");
    let sock = dir.join("qmp.sock");
    let stats = dir.join("rcu.json");
    let metrics = dir.join("metrics.json");
    let vmm = Captured::spawn(
        Command::new(VMM)
            .args(tests::kit::boot_args("vmlinux", "initramfs-idle.cpio"))
            .args([
                "--cpus",
                "2",
                "--memory",
                "128M",
                "--hotplug-memory",
                "1G",
                "--on-reset",
                "restart",
                "--qmp",
                sock.to_str().unwrap(),
                "--rcu-stats",
                stats.to_str().unwrap(),
                "--metrics",
                metrics.to_str().unwrap(),
            ]),
    );

    let mut q = raw_qmp::connect(&sock);
    let r = raw_qmp::execute(
        &mut q,
        r#"{"execute":"qom-set","arguments":{"path":"vmem0","property":"requested-size","value":268435456}}"#,
    );
    assert!(r.get("return").is_some(), "{r}");
    wait_size(&mut q, 256 * MIB, "first boot");
    assert_eq!(mapped_slots(&mut q), 2, "256 MiB is two 128 MiB slots");

    let r = raw_qmp::execute(&mut q, r#"{"execute":"system_reset"}"#);
    assert!(r.get("return").is_some(), "{r}");
    let (ev, _) = raw_qmp::wait_event(&mut q, "RESET", Duration::from_secs(60));
    assert_eq!(ev["guest"], false, "{ev}");
    assert_eq!(ev["reason"], "host-qmp-system-reset", "{ev}");
    // Right after the reset the guest is booting again (seconds here):
    // nothing is plugged or mapped, and the request stays.
    let d = vmem(&mut q);
    assert_eq!(d["size"].as_u64(), Some(0), "{d}");
    assert_eq!(d["requested-size"].as_u64(), Some(256 * MIB), "{d}");
    assert_eq!(mapped_slots(&mut q), 0, "no slot mapped after the reset");

    wait_size(&mut q, 256 * MIB, "rebooted guest");
    assert_eq!(mapped_slots(&mut q), 2);
    let st = raw_qmp::execute(&mut q, r#"{"execute":"query-status"}"#);
    assert_eq!(st["return"]["status"], "running", "{st}");

    q.0.write_all(br#"{"execute":"quit"}"#).unwrap();
    let (status, console, stderr) = vmm.finish(Duration::from_secs(60));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "vmm did not exit 0\n--- stderr ---\n{stderr}"
    );
    // The kernel booted twice in the same process.
    assert_eq!(
        console.matches("Linux version").count(),
        2,
        "--- console ---\n{console}"
    );
    let s: Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
    assert_eq!(s["callbacks_run"], s["call_rcu"], "{s}");
    let m: Value = serde_json::from_slice(&std::fs::read(&metrics).unwrap()).unwrap();
    assert!(m["exits"].as_u64().unwrap() > 0, "{m}");
}
