//! Memory hot-plug end to end: a real Linux guest (the kit's minimal kernel,
//! kernel-only; its virtio-mem driver plugs, onlines and unplugs by itself)
//! driven over QMP by QEMU's own Python client (`qemu.qmp`).
//!
//! One boot serves every check: bad QMP input while the guest runs (and the
//! guest still plugging memory afterwards shows it kept running), then
//! plug/unplug cycles with the guest's own view, the new KVM memory slots,
//! the slot mappings returned to the host (`/proc/PID/maps`), the RCU
//! counts the unplug caused, and no growth of mappings or RSS over cycles.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code.

use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tests::proc_maps::{address_range, overlaps};
use tests::vmm_process::Captured;

const VMM: &str = env!("CARGO_BIN_EXE_vmm");
const MIB: u64 = 1 << 20;
/// Plug sizes of the cycles, MiB: the first is the one the issue names.
const CYCLES: &[u64] = &[256, 128, 128];

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a u64: {v}"))
}

fn site_calls(rcu: &Value, label: &str) -> u64 {
    rcu["by_site"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["label"] == label)
        .map(|s| u(&s["calls"]))
        .sum()
}

/// Mappings in a `/proc/PID/maps` snapshot overlapping `[start, start+len)`.
fn overlapping(maps: &[Value], start: u64, len: u64) -> Vec<String> {
    maps.iter()
        .map(|l| l.as_str().unwrap().to_string())
        .filter(|l| overlaps(l, start, len))
        .collect()
}

/// The address ranges mapped in `after` that were not mapped in `before`
/// (`/proc/PID/maps` snapshots): what a plug mapped, found without the
/// VMM telling its host addresses.
fn newly_mapped(before: &[Value], after: &[Value]) -> Vec<(u64, u64)> {
    let old: Vec<(u64, u64)> = before
        .iter()
        .map(|l| address_range(l.as_str().unwrap()))
        .collect();
    let mut new = Vec::new();
    for l in after {
        let (mut a, b) = address_range(l.as_str().unwrap());
        // Both snapshots are sorted and non-overlapping: cut the old
        // ranges out of [a, b).
        for &(oa, ob) in &old {
            if ob <= a || oa >= b {
                continue;
            }
            if oa > a {
                new.push((a, oa));
            }
            a = a.max(ob);
        }
        if a < b {
            new.push((a, b));
        }
    }
    new
}

fn mapped_bytes(maps: &[Value]) -> u64 {
    maps.iter()
        .map(|l| {
            let (a, b) = address_range(l.as_str().unwrap());
            b - a
        })
        .sum()
}

#[test]
fn memory_hotplug_over_qmp_with_a_linux_guest() {
    tests::require_kvm();
    let python = tests::qmp_python();
    let dir = tests::scratch_dir("hotplug");
    let sock = dir.join("qmp.sock");
    let stats = dir.join("rcu.json");

    let start = Instant::now();
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
                "--qmp",
                sock.to_str().unwrap(),
                "--rcu-stats",
                stats.to_str().unwrap(),
            ]),
    );

    let sizes: Vec<String> = CYCLES.iter().map(u64::to_string).collect();
    let session = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/qmp/hotplug_session.py"))
        .arg(&sock)
        .arg(vmm.child.id().to_string())
        .arg(sizes.join(","))
        .output()
        .unwrap();
    let py_err = String::from_utf8_lossy(&session.stderr).to_string();

    // The session ends with `quit`: the VMM exits 0 by itself.
    let (status, console, stderr) = vmm.finish(Duration::from_secs(60));
    let context = || {
        let tail: Vec<&str> = console.lines().rev().take(30).collect();
        format!(
            "--- python stderr ---\n{py_err}\n--- vmm stderr ---\n{stderr}\n--- console tail ---\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    };
    assert!(
        session.status.success(),
        "QMP session failed\n{}",
        context()
    );
    let rep: Value = serde_json::from_slice(&session.stdout)
        .unwrap_or_else(|e| panic!("session output: {e}\n{}", context()));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "vmm did not exit 0\n{}",
        context()
    );

    // --- bad input, the guest keeps running ---
    let bad = &rep["bad_input"];
    let r = &bad["before_negotiation"]["replies"][1]["error"];
    assert_eq!(r["class"], "CommandNotFound", "{bad}");
    assert!(r["desc"].as_str().unwrap().contains("qmp_capabilities"));
    let m = bad["malformed_json"]["replies"].as_array().unwrap();
    let parse_error = m.iter().position(|r| {
        r["error"]["desc"]
            .as_str()
            .is_some_and(|d| d.starts_with("JSON parse error"))
    });
    let status = m.iter().position(|r| r["return"]["status"] == "running");
    assert!(
        matches!((parse_error, status), (Some(e), Some(s)) if e < s),
        "bad JSON must get an error and the connection carry on: {m:?}"
    );
    assert_eq!(
        bad["not_an_object"]["replies"][2]["error"]["desc"],
        "QMP input must be a JSON object"
    );
    let big = &bad["ten_mib_line"];
    assert!(
        big["closed"] == true || big["replies"][2]["error"]["class"] == "GenericError",
        "{big}"
    );
    assert_eq!(bad["unknown_command"]["class"], "CommandNotFound");
    for k in [
        "wrong_type",
        "missing_argument",
        "unexpected_argument",
        "not_block_multiple",
        "too_large",
    ] {
        assert_eq!(bad[k]["class"], "GenericError", "{k}: {}", bad[k]);
    }
    assert!(
        bad["not_block_multiple"]["desc"]
            .as_str()
            .unwrap()
            .contains("block-size")
    );
    assert_eq!(bad["unknown_device"]["class"], "DeviceNotFound");
    assert_eq!(bad["status_after"]["status"], "running");
    assert_eq!(rep["cpus"].as_array().unwrap().len(), 2);

    // --- plug / unplug cycles ---
    let cycles = rep["cycles"].as_array().unwrap();
    assert_eq!(cycles.len(), CYCLES.len());
    let events = rep["events"].as_array().unwrap();
    let mut rss_after = Vec::new();
    let mut mapped_after = Vec::new();
    for (c, &mib) in cycles.iter().zip(CYCLES) {
        let want = mib * MIB;
        assert_eq!(
            c["plugged"],
            true,
            "guest did not plug {mib} MiB\n{}",
            context()
        );
        assert_eq!(c["unplugged"], true, "guest did not unplug\n{}", context());
        assert_eq!(
            c["returned"], true,
            "mapping not returned: {}",
            c["hotplug_after"]
        );
        let dev = &c["devices_plugged"][0]["data"];
        assert_eq!(u(&dev["size"]), want);
        assert_eq!(u(&dev["requested-size"]), want);
        assert_eq!(u(&c["summary_plugged"]["plugged-memory"]), want);
        assert!(
            events
                .iter()
                .any(|e| e["event"] == "MEMORY_DEVICE_SIZE_CHANGE"
                    && e["data"]["id"] == "vmem0"
                    && e["data"]["size"] == want),
            "no MEMORY_DEVICE_SIZE_CHANGE for {want}: {events:?}"
        );
        // The last size change of each phase arrives, at most a second
        // late (the rate limit), and is the size the device reports.
        assert_eq!(c["plug_event"], true, "{events:?}");
        assert_eq!(c["unplug_event"], true, "{events:?}");
        // The new memory slots: one KVM slot per 128 MiB slot, plugged.
        let slots = c["hotplug_plugged"]["mapped-slots"].as_array().unwrap();
        let slot_size = u(&c["hotplug_plugged"]["slot-size"]);
        assert_eq!(slots.len() as u64, want / slot_size, "{slots:?}");
        assert!(slots.iter().all(|s| u(&s["kvm-slot"]) >= 16));
        // Unplugged: no slot mapped, and their host mappings are gone.
        assert!(
            c["hotplug_after"]["mapped-slots"]
                .as_array()
                .unwrap()
                .is_empty()
        );
        // The plug's new mappings hold at least the slots, and none of them
        // is left after the unplug.
        let maps_before = rep["maps_before"].as_array().unwrap();
        let maps_plugged = c["maps_plugged"].as_array().unwrap();
        let maps_after = c["maps_after"].as_array().unwrap();
        // Slots are whole 128 MiB mappings; the allocator's heaps are at
        // most 64 MiB.
        let new: Vec<(u64, u64)> = newly_mapped(maps_before, maps_plugged)
            .into_iter()
            .filter(|(a, b)| b - a >= slot_size)
            .collect();
        let new_bytes: u64 = new.iter().map(|(a, b)| b - a).sum();
        assert!(new_bytes >= want, "plug mapped {new_bytes} bytes: {new:x?}");
        for &(a, b) in &new {
            let left = overlapping(maps_after, a, b - a);
            assert!(left.is_empty(), "{a:#x}-{b:#x} still mapped: {left:?}");
        }
        assert!(
            slots.iter().all(|s| s.get("host").is_none()),
            "x-query-hotplug gives host addresses: {slots:?}"
        );
        // RCU: the unplug's map swaps went through call_rcu, and each
        // unplug that retired slots queued one unmap record and forced.
        let (hp, ha) = (&c["hotplug_plugged"]["stats"], &c["hotplug_after"]["stats"]);
        let swaps = u(&ha["map_swaps"]) - u(&hp["map_swaps"]);
        let retires = u(&ha["retire_events"]) - u(&hp["retire_events"]);
        let (rp, ra) = (&c["rcu_plugged"], &c["rcu_after"]);
        assert!(swaps >= 1 && retires >= 1, "{ha}");
        assert_eq!(
            site_calls(ra, "memory map replace") - site_calls(rp, "memory map replace"),
            swaps
        );
        assert_eq!(
            site_calls(ra, "hot-plug slot unmapped") - site_calls(rp, "hot-plug slot unmapped"),
            retires
        );
        assert_eq!(u(&ra["call_rcu"]) - u(&rp["call_rcu"]), swaps + retires);
        assert_eq!(u(&ra["force_rcu"]) - u(&rp["force_rcu"]), retires);
        println!(
            "cycle {mib} MiB: plugged in {:.1} s, unplugged and returned in {:.1} s; \
             {swaps} map swaps, {retires} slot retirements; call_rcu +{}, force_rcu +{}; RSS {} KiB",
            c["plug_s"].as_f64().unwrap(),
            c["unplug_s"].as_f64().unwrap(),
            u(&ra["call_rcu"]) - u(&rp["call_rcu"]),
            u(&ra["force_rcu"]) - u(&rp["force_rcu"]),
            c["rss_after_kib"]
        );
        rss_after.push(u(&c["rss_after_kib"]));
        mapped_after.push(mapped_bytes(maps_after));
    }
    // No growth across cycles: a leaked slot would be 128 MiB of mappings,
    // a leaked plugged block 2 MiB of RSS.
    let first_map = mapped_after[0];
    assert!(
        mapped_after.iter().all(|m| *m <= first_map + MIB),
        "mappings grew over cycles: {mapped_after:?}"
    );
    assert!(
        rss_after.iter().all(|r| *r <= rss_after[0] + 1024),
        "RSS grew over cycles: {rss_after:?} KiB"
    );
    let before = mapped_bytes(rep["maps_before"].as_array().unwrap());
    assert!(
        first_map <= before + MIB,
        "mappings {before} before, {first_map} after unplug"
    );

    // The guest's own view of the plug, from its kernel log.
    assert!(
        console.contains("virtio_mem virtio0: plugged size: 0x10000000"),
        "{}",
        context()
    );
    // At exit, every queued callback has run.
    let s: Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
    assert_eq!(s["callbacks_run"], s["call_rcu"]);
    // The file against x-query-rcu taken just before `quit`: the same
    // report, and between the two the only call_rcu is the exit path's
    // drain marker (counted as one call_rcu, one drain, one force_rcu).
    let end = &rep["rcu_end"];
    let keys = |v: &Value| {
        v.as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(keys(&s), keys(end), "file and x-query-rcu differ in keys");
    assert_eq!(u(&s["call_rcu"]), u(&end["call_rcu"]) + 1, "{end}");
    assert_eq!(u(&s["drain_call_rcu"]), u(&end["drain_call_rcu"]) + 1);
    assert_eq!(u(&s["force_rcu"]), u(&end["force_rcu"]) + 1);
    assert!(u(&s["callbacks_run"]) >= u(&end["callbacks_run"]));
    for label in [
        "memory map replace",
        "hot-plug slot unmapped",
        "bus replace",
        "seccomp filter",
    ] {
        assert_eq!(site_calls(&s, label), site_calls(end, label), "{label}");
    }
    assert_eq!(
        site_calls(&s, "drain_call_rcu"),
        site_calls(end, "drain_call_rcu") + 1
    );
    let (file_marks, live_marks) = (
        s["markers"].as_array().unwrap(),
        end["markers"].as_array().unwrap(),
    );
    assert!(
        file_marks.starts_with(live_marks) && file_marks.len() > live_marks.len(),
        "the file's markers do not continue the live report's: {live_marks:?} / {file_marks:?}"
    );
    println!(
        "hot-plug test: {:.0} s including boot",
        start.elapsed().as_secs_f64()
    );
}
