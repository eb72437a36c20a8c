//! Resize outcomes end to end (issue 14, item 1): the extension events
//! `X_MEMORY_DEVICE_RESIZE_DONE` / `X_MEMORY_DEVICE_RESIZE_STALLED`, the
//! `resize` member of `x-query-hotplug`, and `scripts/vmm-resize`, against
//! the `vmm` binary running the kit's minimal kernel (kernel-only).
//!
//! - With the guest's virtio-mem driver: a plug completes, the done event
//!   comes, and the sizes it and `x-query-hotplug` report match what
//!   `query-memory-devices` and the mapped slots say; the script resizes
//!   further and exits 0.
//! - With `acpi=off` the kernel never finds the virtio-mmio device (it is
//!   described only in the DSDT), so no driver sets DRIVER_OK: the stall
//!   event says `no-driver`, and the script exits 1 with that reason.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code.

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tests::raw_qmp::{RawQmp, connect, execute_ok, wait_event, wait_exit};
use tests::vmm_process::ScratchVmm;

const VMM: &str = env!("CARGO_BIN_EXE_vmm");
const MIB: u64 = 1 << 20;
/// The hot-plug slot size (Linux's x86 memory block): one slot is mapped per
/// 128 MiB plugged from the region's start.
const SLOT: u64 = 128 * MIB;
/// Generous: the guest kernel runs under KVM's instruction emulator here.
const GUEST_LIMIT: Duration = Duration::from_secs(600);

struct Vm {
    vmm: ScratchVmm,
    sock: PathBuf,
}

fn start(name: &str, cmdline: &str) -> Vm {
    tests::require_kvm();
    let dir = tests::scratch_dir(&format!("resize-{name}"));
    let sock = dir.join("qmp.sock");
    let child = Command::new(VMM)
        .args(tests::kit::boot_args("vmlinux", "initramfs-idle.cpio"))
        .args(["--memory", "128M", "--hotplug-memory", "1G"])
        .args(["--cmdline", cmdline])
        .args(["--qmp", sock.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Vm {
        vmm: ScratchVmm { child, dir },
        sock,
    }
}

fn hotplug_state(c: &mut RawQmp) -> Value {
    execute_ok(c, json!({"execute": "x-query-hotplug"}))
}

fn device_size(c: &mut RawQmp) -> u64 {
    execute_ok(c, json!({"execute": "query-memory-devices"}))[0]["data"]["size"]
        .as_u64()
        .unwrap()
}

fn set_requested(c: &mut RawQmp, size: u64) {
    execute_ok(
        c,
        json!({"execute": "qom-set", "arguments": {"path": "vmem0", "property": "requested-size", "value": size}}),
    );
}

fn seconds(ts: &Value) -> f64 {
    ts["seconds"].as_f64().unwrap() + ts["microseconds"].as_f64().unwrap() / 1e6
}

/// Runs `scripts/vmm-resize OPTIONS SOCKET SIZE`.
fn script(sock: &Path, options: &[&str], size: &str) -> (Option<i32>, String, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/vmm-resize");
    let mut child = Command::new("python3")
        .arg(path)
        .args(options)
        .arg(sock)
        .arg(size)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut child, GUEST_LIMIT);
    let out = child.wait_with_output().unwrap();
    (
        status.and_then(|s| s.code()),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn quit(vm: &mut Vm, c: &mut RawQmp) {
    execute_ok(c, json!({"execute": "quit"}));
    let status = wait_exit(&mut vm.vmm.child, Duration::from_secs(60));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "vmm exit after quit"
    );
}

#[test]
fn a_plug_that_completes_is_reported_done_and_the_script_exits_0() {
    let mut vm = start("done", "");
    let mut c = connect(&vm.sock);
    // Nothing requested yet.
    let r = &hotplug_state(&mut c)["resize"];
    assert_eq!(r["state"], "idle", "{r}");
    assert_eq!(r["last-request"], Value::Null);
    // The guest's driver binds during boot.
    let end = Instant::now() + GUEST_LIMIT;
    while hotplug_state(&mut c)["resize"]["driver-ok"] != true {
        assert!(Instant::now() < end, "the guest driver never set DRIVER_OK");
        std::thread::sleep(Duration::from_millis(250));
    }
    // A generous stall timeout: this is about completion, not stalls.
    execute_ok(
        &mut c,
        json!({"execute": "qom-set", "arguments": {"path": "vmem0", "property": "x-stall-timeout", "value": 600_000}}),
    );
    set_requested(&mut c, 128 * MIB);
    let (done, _) = wait_event(&mut c, "X_MEMORY_DEVICE_RESIZE_DONE", GUEST_LIMIT);
    assert_eq!(done["id"], "vmem0");
    assert_eq!(done["requested-size"], 128 * MIB);
    assert_eq!(done["size"], 128 * MIB);
    // Independent sources agree: QEMU's query and the slots mapped.
    assert_eq!(device_size(&mut c), 128 * MIB);
    let state = hotplug_state(&mut c);
    assert_eq!(
        state["mapped-slots"].as_array().unwrap().len() as u64,
        128 * MIB / SLOT
    );
    let r = &state["resize"];
    assert_eq!(r["state"], "done", "{r}");
    assert_eq!(r["size"], 128 * MIB);
    assert_eq!(r["stall-reason"], Value::Null);
    assert!(
        seconds(&r["last-progress"]) >= seconds(&r["last-request"]),
        "{r}"
    );

    // The script, further up; it prints progress and the outcome.
    let (code, out, err) = script(&vm.sock, &["--stall-timeout", "600"], "256M");
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("done"), "{out}");
    assert_eq!(device_size(&mut c), 256 * MIB);
    assert_eq!(hotplug_state(&mut c)["resize"]["state"], "done");
    quit(&mut vm, &mut c);
}

#[test]
fn without_a_guest_driver_a_resize_stalls_with_no_driver() {
    // No ACPI: the virtio-mmio device, described only in the DSDT, is never
    // probed.
    let mut vm = start("nodriver", "acpi=off");
    let mut c = connect(&vm.sock);
    execute_ok(
        &mut c,
        json!({"execute": "qom-set", "arguments": {"path": "vmem0", "property": "x-stall-timeout", "value": 1000}}),
    );
    assert_eq!(
        execute_ok(
            &mut c,
            json!({"execute": "qom-get", "arguments": {"path": "vmem0", "property": "x-stall-timeout"}})
        ),
        json!(1000)
    );
    set_requested(&mut c, 128 * MIB);
    let (stalled, seen) = wait_event(&mut c, "X_MEMORY_DEVICE_RESIZE_STALLED", GUEST_LIMIT);
    assert!(
        seen.iter()
            .all(|m| m["event"] != "X_MEMORY_DEVICE_RESIZE_DONE"),
        "{seen:?}"
    );
    assert_eq!(stalled["reason"], "no-driver", "{stalled}");
    assert_eq!(stalled["requested-size"], 128 * MIB);
    assert_eq!(stalled["size"], 0);
    assert_eq!(stalled["stall-timeout"], 1000);
    assert_eq!(device_size(&mut c), 0);
    let r = hotplug_state(&mut c)["resize"].clone();
    assert_eq!(r["state"], "stalled", "{r}");
    assert_eq!(r["stall-reason"], "no-driver");
    assert_eq!(r["driver-ok"], false);
    assert_eq!(r["last-progress"], Value::Null);
    let stalled_after = seconds(&r["stalled-since"]) - seconds(&r["last-request"]);
    assert!((stalled_after - 1.0).abs() < 0.01, "{r}");

    // The script reports the stall and exits 1.
    let (code, out, err) = script(&vm.sock, &["--stall-timeout", "1"], "64M");
    assert_eq!(code, Some(1), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains("stalled") && out.contains("no-driver"),
        "{out}"
    );
    // A bad size is a usage error (2), and changes nothing.
    let (code, _, err) = script(&vm.sock, &[], "3M");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("block-size"), "{err}");
    assert_eq!(
        execute_ok(
            &mut c,
            json!({"execute": "qom-get", "arguments": {"path": "vmem0", "property": "requested-size"}})
        ),
        json!(64 * MIB)
    );
    quit(&mut vm, &mut c);
}
