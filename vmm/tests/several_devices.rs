//! Several virtio-mem devices (issue 14, item 5), against the `vmm` binary
//! running the kit's minimal kernel (kernel-only), in one boot:
//!
//! - two `--hotplug-memory` options make two devices, each with its own
//!   region (the second right after the first), transport and id; the
//!   guest's virtio-mem driver binds both;
//! - each is resized over QMP by its id, independently: the size-change and
//!   done events carry that id, `query-memory-devices` and `qom-get` report
//!   each device's own size, and `x-query-hotplug` shows the mapped slots
//!   under the device whose region holds them, with distinct KVM slots;
//! - `node=1` on the second device gives the guest an ACPI SRAT (its boot
//!   log lists the table) and the device's `node` is 1. The kit's minimal
//!   kernel has no `CONFIG_NUMA`, so it cannot report the node itself: the
//!   guest-side check is the SRAT being found, and both devices' regions as
//!   its driver prints them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code.

use serde_json::{Value, json};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tests::raw_qmp::{RawQmp, connect, execute_ok, wait_event, wait_exit};
use tests::vmm_process::ScratchVmm;

const VMM: &str = env!("CARGO_BIN_EXE_vmm");
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Hot-plug slots are Linux's x86 memory blocks, 128 MiB.
const SLOT: u64 = 128 * MIB;
/// KVM slot number of the first hot-plug slot (the VMM's RAM uses fewer).
const FIRST_KVM_SLOT: u64 = vmm::test_utils::FIRST_HOTPLUG_KVM_SLOT as u64;
/// Generous: the guest kernel runs under KVM's instruction emulator here.
const GUEST_LIMIT: Duration = Duration::from_secs(600);

fn devices(c: &mut RawQmp) -> Vec<Value> {
    execute_ok(c, json!({"execute": "query-memory-devices"}))
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["data"].clone())
        .collect()
}

/// `x-query-hotplug`'s entry for device `id`.
fn state_of(c: &mut RawQmp, id: &str) -> Value {
    let all = execute_ok(c, json!({"execute": "x-query-hotplug"}));
    all["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == id)
        .unwrap_or_else(|| panic!("no {id} in {all}"))
        .clone()
}

/// `(gpa, kvm-slot)` of the slots mapped for device `id`.
fn slots_of(c: &mut RawQmp, id: &str) -> Vec<(u64, u64)> {
    state_of(c, id)["mapped-slots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["gpa"].as_u64().unwrap(), s["kvm-slot"].as_u64().unwrap()))
        .collect()
}

/// Sets `requested-size` of the device at QOM `path` and waits for the done
/// event; returns it with the messages read on the way.
fn resize(c: &mut RawQmp, path: &str, size: u64) -> (Value, Vec<Value>) {
    execute_ok(
        c,
        json!({"execute": "qom-set", "arguments": {"path": path, "property": "requested-size", "value": size}}),
    );
    wait_event(c, "X_MEMORY_DEVICE_RESIZE_DONE", GUEST_LIMIT)
}

/// Ids of the size-change events among `seen`.
fn size_change_ids(seen: &[Value]) -> Vec<String> {
    seen.iter()
        .filter(|m| m["event"] == "MEMORY_DEVICE_SIZE_CHANGE")
        .map(|m| m["data"]["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn two_devices_are_plugged_independently_by_id() {
    tests::require_kvm();
    let dir = tests::scratch_dir("several");
    let sock = dir.join("qmp.sock");
    let console = dir.join("console.txt");
    let child = Command::new(VMM)
        .args(tests::kit::boot_args("vmlinux", "initramfs-idle.cpio"))
        .args(["--memory", "128M"])
        .args(["--hotplug-memory", "512M"])
        .args(["--hotplug-memory", "size=512M,id=fast,node=1"])
        .args(["--qmp", sock.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&console).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut vm = ScratchVmm { child, dir };
    let mut c = connect(&sock);

    // The layout, derived from the rules: 128 MiB of RAM ends below the
    // 32-bit hole, so hot-plug starts at 4 GiB; the second region follows
    // the first (512 MiB, already a multiple of 128 MiB).
    let (vmem0_base, fast_base) = (4 * GIB, 4 * GIB + 512 * MIB);
    let d = devices(&mut c);
    assert_eq!(d.len(), 2, "{d:?}");
    assert_eq!(
        (
            d[0]["id"].clone(),
            d[0]["memaddr"].clone(),
            d[0]["node"].clone()
        ),
        (json!("vmem0"), json!(vmem0_base), json!(0))
    );
    assert_eq!(
        (
            d[1]["id"].clone(),
            d[1]["memaddr"].clone(),
            d[1]["node"].clone()
        ),
        (json!("fast"), json!(fast_base), json!(1))
    );
    assert!(d.iter().all(|d| d["max-size"] == 512 * MIB), "{d:?}");
    assert_eq!(
        execute_ok(
            &mut c,
            json!({"execute": "qom-get", "arguments": {"path": "/machine/peripheral/fast", "property": "memaddr"}})
        ),
        json!(fast_base)
    );

    // The guest's driver binds both.
    let end = Instant::now() + GUEST_LIMIT;
    for id in ["vmem0", "fast"] {
        while state_of(&mut c, id)["resize"]["driver-ok"] != true {
            assert!(
                Instant::now() < end,
                "{id}: the guest driver never set DRIVER_OK"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    for id in ["vmem0", "fast"] {
        execute_ok(
            &mut c,
            json!({"execute": "qom-set", "arguments": {"path": id, "property": "x-stall-timeout", "value": 600_000}}),
        );
    }

    // Plug 256 MiB into the second device only, by its QEMU path.
    let (done, seen) = resize(&mut c, "/machine/peripheral/fast", 256 * MIB);
    assert_eq!(done["id"], "fast", "{done}");
    assert_eq!(done["size"], 256 * MIB);
    let ids = size_change_ids(&seen);
    assert!(
        !ids.is_empty() && ids.iter().all(|i| i == "fast"),
        "{seen:?}"
    );
    let d = devices(&mut c);
    assert_eq!(
        (d[0]["size"].clone(), d[1]["size"].clone()),
        (json!(0), json!(256 * MIB))
    );
    // Its slots: the first two of its own region; its KVM slots follow the
    // 4 numbers reserved for vmem0's 4 slots.
    let fast_first_kvm = FIRST_KVM_SLOT + 512 * MIB / SLOT;
    assert_eq!(
        slots_of(&mut c, "fast"),
        [
            (fast_base, fast_first_kvm),
            (fast_base + SLOT, fast_first_kvm + 1)
        ]
    );
    assert_eq!(slots_of(&mut c, "vmem0"), []);
    assert_eq!(state_of(&mut c, "fast")["resize"]["state"], "done");
    assert_eq!(state_of(&mut c, "vmem0")["resize"]["state"], "idle");

    // Then 128 MiB into the first, by its bare id.
    let (done, seen) = resize(&mut c, "vmem0", 128 * MIB);
    assert_eq!(done["id"], "vmem0", "{done}");
    let ids = size_change_ids(&seen);
    assert!(
        !ids.is_empty() && ids.iter().all(|i| i == "vmem0"),
        "{seen:?}"
    );
    let d = devices(&mut c);
    assert_eq!(
        (d[0]["size"].clone(), d[1]["size"].clone()),
        (json!(128 * MIB), json!(256 * MIB))
    );
    assert_eq!(slots_of(&mut c, "vmem0"), [(vmem0_base, FIRST_KVM_SLOT)]);
    assert_eq!(slots_of(&mut c, "fast").len(), 2);
    // The top level of x-query-hotplug stays the first device's, as with one.
    let top = execute_ok(&mut c, json!({"execute": "x-query-hotplug"}));
    assert_eq!(top["id"], "vmem0");
    assert_eq!(top["resize"]["size"], 128 * MIB);

    // Unplug the second device: the first keeps its memory.
    let (done, _) = resize(&mut c, "fast", 0);
    assert_eq!(done["id"], "fast");
    let d = devices(&mut c);
    assert_eq!(
        (d[0]["size"].clone(), d[1]["size"].clone()),
        (json!(128 * MIB), json!(0))
    );

    execute_ok(&mut c, json!({"execute": "quit"}));
    let status = wait_exit(&mut vm.child, Duration::from_secs(60));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "vmm exit after quit"
    );

    // What the guest reported: the SRAT among its ACPI tables (there is one
    // because of node=1), and one virtio-mem driver per region.
    let log = std::fs::read_to_string(&console).unwrap();
    assert!(
        log.lines().any(|l| l.contains("ACPI: SRAT ")),
        "the guest lists no SRAT:\n{log}"
    );
    for base in [vmem0_base, fast_base] {
        let want = format!("start address: {base:#x}");
        assert!(
            log.lines()
                .any(|l| l.contains("virtio_mem") && l.contains(&want)),
            "no virtio_mem driver at {base:#x}:\n{log}"
        );
    }
}
