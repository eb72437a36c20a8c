//! Bad input from the command line or the environment: a one-line error, a
//! non-zero exit status, never a panic or a backtrace.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tests::vmm_process::{VmmRun, run, run_as};

const VMM: &str = env!("CARGO_BIN_EXE_vmm");
const LIMIT: Duration = Duration::from_secs(60);

/// A scratch directory that user `nobody` can read.
fn scratch(name: &str) -> PathBuf {
    let d = tests::scratch_dir(&format!("bad-input-{name}"));
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn kernel() -> PathBuf {
    tests::kit::file("bzImage")
}

/// Checks the run failed cleanly: status `code`, one line on stderr that
/// contains `needle`.
#[track_caller]
fn assert_clean_failure(r: &VmmRun, code: i32, needle: &str) {
    assert_eq!(r.code(), code, "{r}");
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr:\n{r}");
    assert!(lines[0].starts_with("vmm: "), "{r}");
    assert!(lines[0].contains(needle), "expected '{needle}':\n{r}");
    assert!(
        !r.stderr.contains("panicked") && !r.stderr.contains("backtrace"),
        "{r}"
    );
    assert!(r.stdout.is_empty(), "no guest should have run:\n{r}");
}

fn vmm(args: &[&str]) -> VmmRun {
    run(Path::new(VMM), args, b"", LIMIT)
}

/// Runs the VMM with the kit's kernel and `args`.
fn vmm_with_kit_kernel(args: &[&str]) -> VmmRun {
    let k = kernel();
    vmm(&[&["--kernel", k.to_str().unwrap()], args].concat())
}

/// Runs the VMM as user `nobody` (group `nogroup`, no supplementary groups).
fn vmm_as_nobody(args: &[&str]) -> VmmRun {
    let prefix = [
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
    ];
    run_as(Path::new(VMM), args, b"", LIMIT, Some(&prefix))
}

/// A copy of the kit's kernel in `dir` that user `nobody` can read.
fn kernel_readable_by_nobody(dir: &Path) -> PathBuf {
    let k = dir.join("bzImage");
    std::fs::copy(kernel(), &k).unwrap();
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
    k
}

/// What this host's KVM allows for hot-plug memory: (the number of memory
/// slots, the size of one hot-plug slot, the first slot hot-plug uses).
fn kvm_slot_budget() -> (u64, u64, u64) {
    let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
    let limit = kvm.get_nr_memslots() as u64;
    let slot = vmm::test_utils::SLOT_SIZE;
    let first = u64::from(vmm::test_utils::FIRST_HOTPLUG_KVM_SLOT);
    (limit, slot, first)
}

#[test]
fn missing_kernel() {
    let r = vmm(&["--kernel", "/nonexistent/bzImage"]);
    assert_clean_failure(&r, 2, "cannot open kernel '/nonexistent/bzImage'");
}

#[test]
fn corrupt_kernel() {
    let d = scratch("corrupt");
    let garbage = d.join("garbage");
    let bytes: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&garbage, &bytes).unwrap();
    let r = vmm(&["--kernel", garbage.to_str().unwrap(), "--memory", "128M"]);
    assert_clean_failure(&r, 1, "not a");

    // A real bzImage cut short.
    let cut = d.join("truncated");
    let real = std::fs::read(kernel()).unwrap();
    std::fs::write(&cut, &real[..real.len() / 3]).unwrap();
    let r = vmm(&["--kernel", cut.to_str().unwrap(), "--memory", "128M"]);
    assert_eq!(r.code(), 1, "{r}");
    assert_eq!(r.stderr.lines().count(), 1, "{r}");
    assert!(!r.stderr.contains("panicked"), "{r}");
}

#[test]
fn kernel_is_a_directory_or_empty() {
    let d = scratch("dir");
    let r = vmm(&["--kernel", d.to_str().unwrap()]);
    assert_clean_failure(&r, 2, "is a directory");
    let empty = d.join("empty");
    std::fs::write(&empty, b"").unwrap();
    let r = vmm(&["--kernel", empty.to_str().unwrap()]);
    assert_clean_failure(&r, 2, "is empty");
}

#[test]
fn unreadable_initrd() {
    let d = scratch("initrd");
    let k = kernel_readable_by_nobody(&d);
    let initrd = d.join("initrd");
    std::fs::write(&initrd, b"not for nobody").unwrap();
    std::fs::set_permissions(&initrd, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = vmm_as_nobody(&[
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
    ]);
    assert_clean_failure(&r, 2, "cannot open initrd");
    assert!(r.stderr.contains("Permission denied"), "{r}");

    let r = vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        "/nonexistent/initrd",
    ]);
    assert_clean_failure(&r, 2, "cannot open initrd '/nonexistent/initrd'");
}

#[test]
fn no_permission_for_dev_kvm() {
    let k = kernel_readable_by_nobody(&scratch("perm"));
    let meta = std::fs::metadata("/dev/kvm").expect("/dev/kvm");
    assert_eq!(
        meta.permissions().mode() & 0o006,
        0,
        "/dev/kvm is open to everyone here"
    );
    let r = vmm_as_nobody(&["--kernel", k.to_str().unwrap(), "--memory", "128M"]);
    assert_clean_failure(&r, 1, "no permission to open /dev/kvm");
}

#[test]
fn no_dev_kvm() {
    // A private mount namespace whose /dev is an empty tmpfs.
    let k = kernel();
    let r = run_as(
        Path::new(VMM),
        &["--kernel", k.to_str().unwrap(), "--memory", "128M"],
        b"",
        LIMIT,
        Some(&[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount -t tmpfs none /dev && exec \"$@\"",
            "sh",
        ]),
    );
    assert_clean_failure(&r, 1, "/dev/kvm does not exist");
}

#[test]
fn malformed_sizes() {
    let cases: [(&[&str], i32, &str); 5] = [
        (&["--memory", "12Q"], 2, "invalid --memory"),
        (&["--memory", ""], 2, "invalid --memory"),
        (&["--hotplug-memory", "lots"], 2, "invalid --hotplug-memory"),
        (&["--memory", "99999999999999999999"], 2, "too large"),
        (&["--memory", "16M"], 1, "below the minimum"),
    ];
    for (args, code, needle) in cases {
        assert_clean_failure(&vmm_with_kit_kernel(args), code, needle);
    }
}

#[test]
fn zero_or_too_many_vcpus() {
    let cases: [(&[&str], &str); 3] = [
        (&["--cpus", "0"], "must be between 1 and 254"),
        (&["--cpus", "300"], "must be between 1 and 254"),
        (&["--cpus", "two"], "not a number"),
    ];
    for (args, needle) in cases {
        assert_clean_failure(&vmm_with_kit_kernel(args), 2, needle);
    }
}

#[test]
fn initrd_that_does_not_fit() {
    let d = scratch("bigrd");
    let big = d.join("initrd");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(200 << 20).unwrap(); // Sparse: 200 MiB for a 128 MiB guest.
    let r = vmm_with_kit_kernel(&["--initrd", big.to_str().unwrap(), "--memory", "128M"]);
    assert_clean_failure(&r, 1, "initrd");
    assert!(
        r.stderr.contains("bytes of guest RAM are free for it"),
        "{r}"
    );
}

#[test]
fn unknown_flag_and_missing_kernel_flag() {
    assert_clean_failure(&vmm(&["--kernal", "x"]), 2, "unexpected argument");
    assert_clean_failure(&vmm(&[]), 2, "--kernel");
}

#[test]
fn hotplug_region_beyond_the_kvm_memory_slot_limit() {
    let (limit, slot, first) = kvm_slot_budget();
    // One slot more than KVM can register.
    let size = (limit - first + 1) * slot;
    let size_arg = format!("{}M", size >> 20);
    let r = vmm_with_kit_kernel(&["--memory", "128M", "--hotplug-memory", &size_arg]);
    assert_clean_failure(&r, 1, &format!("but KVM allows {limit}"));
    assert!(r.stderr.contains(&format!("needs {}", limit + 1)), "{r}");
}

#[test]
fn several_hotplug_devices_with_bad_ids_or_nodes_are_refused_in_one_line() {
    let cases: [(&[&str], &str); 4] = [
        (
            &["512M", "size=512M,id=vmem0"],
            "invalid --hotplug-memory: id 'vmem0' is given to two devices",
        ),
        (
            &["size=512M,node=9"],
            "invalid --hotplug-memory: node=9: expected a NUMA node number from 0 to 7",
        ),
        (
            &["size=512M,node=2", "size=512M,node=0"],
            "node=2 but no device is in node 1",
        ),
        (
            &["size=512M,id=a/b"],
            "invalid --hotplug-memory: id=a/b: expected a letter",
        ),
    ];
    for (options, needle) in cases {
        let mut args = vec!["--memory", "128M"];
        for o in options {
            args.extend(["--hotplug-memory", o]);
        }
        assert_clean_failure(&vmm_with_kit_kernel(&args), 2, needle);
    }
}

#[test]
fn the_kvm_memory_slot_budget_counts_every_hotplug_device() {
    let (limit, slot, first) = kvm_slot_budget();
    // Two devices, each within the budget alone, one slot too many together.
    let free = limit - first;
    let (a, b) = (free / 2, free - free / 2 + 1);
    let (a_arg, b_arg) = (
        format!("{}M", (a * slot) >> 20),
        format!("size={}M,id=second", (b * slot) >> 20),
    );
    let r = vmm_with_kit_kernel(&[
        "--memory",
        "128M",
        "--hotplug-memory",
        &a_arg,
        "--hotplug-memory",
        &b_arg,
    ]);
    assert_clean_failure(&r, 1, &format!("but KVM allows {limit}"));
    assert!(r.stderr.contains(&format!("needs {}", limit + 1)), "{r}");
    assert!(
        r.stderr
            .contains(&format!("a {} MiB hot-plug region", ((a + b) * slot) >> 20)),
        "{r}"
    );
}
