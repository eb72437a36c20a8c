//! Hot-plug backings end to end, host side: the `vmm` binary boots the kit's
//! minimal kernel (kernel-only; its virtio-mem driver plugs and unplugs by
//! itself) with a `--hotplug-memory` backing, and the test looks at the
//! VMM process from outside (`/proc/PID/maps`, `smaps`, `fdinfo`) while
//! resizing over QMP.
//!
//! * memfd with prealloc: the plugged slot is mapped from a memfd, resident
//!   as soon as the guest sees it plugged (before the guest touches it),
//!   and gone (mapping and descriptor) once unplugged.
//! * hugetlb with a pool that cannot supply a plug: the plug fails with the
//!   pool named on stderr, the guest is answered BUSY and the VM runs on.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code.

use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tests::raw_qmp::{RawQmp, connect, execute, wait_exit};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");
const MIB: u64 = 1 << 20;
/// How long the guest's driver may take to act (its kernel code is emulated
/// on this machine).
const DRIVER_LIMIT: Duration = Duration::from_secs(600);

struct Vm {
    child: Child,
    qmp: RawQmp,
    /// The VMM's stderr, a file (read while the VMM runs).
    stderr: PathBuf,
    console: std::thread::JoinHandle<String>,
    dir: PathBuf,
}

fn start(name: &str, hotplug: &str) -> Vm {
    tests::require_kvm();
    let dir = tests::scratch_dir(name);
    let sock = dir.join("qmp.sock");
    let stderr = dir.join("stderr");
    let mut child = Command::new(VMM)
        .args(tests::kit::boot_args("vmlinux", "initramfs-idle.cpio"))
        .args([
            "--memory",
            "128M",
            "--hotplug-memory",
            hotplug,
            "--qmp",
            sock.to_str().unwrap(),
            "--quiet",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let read_all = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let console = read_all(Box::new(child.stdout.take().unwrap()));
    let qmp = connect(&sock);
    Vm {
        child,
        qmp,
        stderr,
        console,
        dir,
    }
}

impl Vm {
    fn cmd(&mut self, cmd: &str) -> Value {
        execute(&mut self.qmp, cmd)
    }

    fn resize(&mut self, bytes: u64) {
        let r = self.cmd(&format!(
            r#"{{"execute":"qom-set","arguments":{{"path":"vmem0","property":"requested-size","value":{bytes}}}}}"#
        ));
        assert!(r.get("return").is_some(), "{r}");
    }

    fn plugged(&mut self) -> u64 {
        let r = self.cmd(r#"{"execute":"query-memory-devices"}"#);
        r["return"][0]["data"]["size"].as_u64().unwrap()
    }

    /// Waits until the guest plugged exactly `bytes`.
    fn wait_plugged(&mut self, bytes: u64) -> bool {
        let end = Instant::now() + DRIVER_LIMIT;
        while Instant::now() < end {
            if self.plugged() == bytes {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    fn hotplug_state(&mut self) -> Value {
        self.cmd(r#"{"execute":"x-query-hotplug"}"#)["return"].clone()
    }

    fn status(&mut self) -> String {
        let r = self.cmd(r#"{"execute":"query-status"}"#);
        r["return"]["status"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Quits and returns (exit code, stderr, console).
    fn quit(mut self) -> (Option<i32>, String, String) {
        let _ = self.cmd(r#"{"execute":"quit"}"#);
        let status = wait_exit(&mut self.child, Duration::from_secs(60));
        let stderr = self.stderr();
        let console = self.console.join().unwrap();
        let _ = std::fs::remove_dir_all(&self.dir);
        (status.and_then(|s| s.code()), stderr, console)
    }
}

/// Lines of `/proc/PID/maps` (or `smaps` blocks: `(maps line, fields)`).
fn smaps(pid: u32) -> Vec<(String, Vec<(String, u64)>)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut out: Vec<(String, Vec<(String, u64)>)> = Vec::new();
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            out.push((line.to_string(), Vec::new()));
        } else if let (Some((k, v)), Some(last)) = (line.split_once(':'), out.last_mut())
            && let Some(n) = v.split_whitespace().next().and_then(|n| n.parse().ok())
        {
            last.1.push((k.to_string(), n));
        }
    }
    out
}

/// Descriptors of the VMM that are slot memfds.
fn memfds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy().starts_with("/memfd:vmm-hotplug-slot"))
        .count()
}

/// The VMM's mappings of slot memfds.
fn memfd_lines(pid: u32) -> Vec<(String, Vec<(String, u64)>)> {
    smaps(pid)
        .into_iter()
        .filter(|(l, _)| l.contains("/memfd:vmm-hotplug-slot"))
        .collect()
}

fn field(fields: &[(String, u64)], key: &str) -> u64 {
    fields
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| *v)
        .sum()
}

#[test]
fn a_memfd_prealloc_plug_is_resident_before_the_guest_touches_it_and_returned_on_unplug() {
    let mut vm = start("backing-memfd", "size=512M,backend=memfd,prealloc=on");
    let pid = vm.child.id();
    assert_eq!(memfds(pid), 0, "no slot mapped before a plug");
    vm.resize(256 * MIB);
    assert!(vm.wait_plugged(256 * MIB), "the guest did not plug 256 MiB");
    let state = vm.hotplug_state();
    assert_eq!(
        state["backing"], "backend=memfd,prealloc=on,thp=off",
        "{state}"
    );
    assert_eq!(
        state["mapped-slots"].as_array().unwrap().len(),
        2,
        "{state}"
    );
    assert_eq!(memfds(pid), 2, "one memfd per mapped slot");
    // Every plugged byte is mapped from a memfd, shared and writable, and
    // resident: populated before the guest was told (the idle guest's
    // kernel only touches the struct pages it puts in its own memory).
    let lines = memfd_lines(pid);
    let mapped: u64 = lines
        .iter()
        .map(|(l, _)| {
            let (a, b) = tests::proc_maps::address_range(l);
            assert!(l.split_whitespace().nth(1) == Some("rw-s"), "{l}");
            b - a
        })
        .sum();
    assert_eq!(mapped, 256 * MIB, "{lines:?}");
    let rss_kb: u64 = lines.iter().map(|(_, f)| field(f, "Rss")).sum();
    assert!(rss_kb << 10 >= 256 * MIB, "{rss_kb} kB resident of 256 MiB");
    assert_eq!(
        state["stats"]["populated_bytes"].as_u64(),
        Some(256 * MIB),
        "{state}"
    );
    // Unplug: every slot emptied, retired, unmapped with its memfd closed.
    vm.resize(0);
    assert!(vm.wait_plugged(0), "the guest did not unplug");
    let end = Instant::now() + Duration::from_secs(30);
    while (memfds(pid) > 0 || !memfd_lines(pid).is_empty()) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(memfds(pid), 0, "memfds left open after the unplug");
    assert!(memfd_lines(pid).is_empty(), "memfd mappings left");
    let (code, stderr, _) = vm.quit();
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn a_hugetlb_plug_the_pool_cannot_supply_is_refused_and_the_vm_runs_on() {
    let dir = Path::new("/sys/kernel/mm/hugepages/hugepages-2048kB");
    let count = |f: &str| -> u64 {
        std::fs::read_to_string(dir.join(f))
            .expect("this test needs 2 MiB huge pages in the host kernel")
            .trim()
            .parse()
            .unwrap()
    };
    let available = count("free_hugepages").saturating_sub(count("resv_hugepages"));
    // A region one slot larger than the pool can fill, plugged whole.
    let region = ((available * 2 * MIB) / (128 * MIB) + 1) * 128 * MIB;
    let mut vm = start(
        "backing-hugetlb",
        &format!("size={region},backend=memfd,hugetlb=on,prealloc=on"),
    );
    vm.resize(region);
    // The guest asks, is answered BUSY, and keeps asking; the VMM says why
    // once on stderr.
    let end = Instant::now() + DRIVER_LIMIT;
    while !vm.stderr().contains("hugetlb pool short") && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
    }
    let stderr = vm.stderr();
    assert!(
        stderr.contains("hugetlb pool short") && stderr.contains("hugepages-2048kB"),
        "{stderr}"
    );
    assert!(
        vm.plugged() < region,
        "the whole region was plugged with {available} huge pages free"
    );
    // Still answering and running after the refusals (the guest keeps
    // retrying them).
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(vm.status(), "running");
    let (code, stderr, console) = vm.quit();
    assert_eq!(code, Some(0), "{stderr}\n{console}");
}
