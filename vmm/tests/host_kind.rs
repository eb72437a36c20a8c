//! The scripts and the VMM tell host kinds apart by one rule: the shell
//! version (`scripts/lib/host-kind.sh`) agrees with `vmm::HostKind`
//! on every kind of host, and `vmm --host-kind` prints what the script
//! prints on this one. Needs neither root nor `/dev/kvm`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // A test: failing loudly is the point.

use std::path::{Path, PathBuf};
use std::process::Command;
use vmm::HostKind;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/lib/host-kind.sh")
}

fn script_says(root: Option<&Path>) -> String {
    let mut cmd = Command::new("bash");
    cmd.arg(script());
    if let Some(root) = root {
        cmd.env("HOST_KIND_ROOT", root);
    }
    let out = cmd.output().expect("run scripts/lib/host-kind.sh");
    assert!(out.status.success(), "host-kind.sh failed: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A directory that looks like `/` of a host with the given module and
/// CPU flags (`None`: no /proc/cpuinfo at all).
fn fake_root(name: &str, pvm: bool, flags: Option<&str>) -> PathBuf {
    let dir = tests::scratch_dir(&format!("host-kind-{name}"));
    std::fs::create_dir_all(dir.join("proc")).unwrap();
    if pvm {
        std::fs::create_dir_all(dir.join("sys/module/kvm_pvm")).unwrap();
    }
    if let Some(flags) = flags {
        std::fs::write(
            dir.join("proc/cpuinfo"),
            format!("processor\t: 0\nmodel name\t: test svm_lock vmx_like\nflags\t\t: fpu {flags} lm\n\n"),
        )
        .unwrap();
    }
    dir
}

#[test]
fn the_script_and_the_vmm_classify_every_kind_of_host_alike() {
    let cases = [
        ("vmx", false, Some("vmx")),
        ("svm", false, Some("svm")),
        ("none", false, Some("sse2")),
        ("lookalikes", false, Some("svm_lock vmx_x")),
        ("pvm-with-vmx", true, Some("vmx")),
        ("pvm", true, Some("sse2")),
        ("no-cpuinfo", false, None),
    ];
    let mut kinds = Vec::new();
    for (name, pvm, flags) in cases {
        let root = fake_root(name, pvm, flags);
        let rust = HostKind::detect_in(&root).name();
        assert_eq!(script_says(Some(&root)), rust, "host {name}");
        kinds.push(rust);
        let _ = std::fs::remove_dir_all(&root);
    }
    // The cases cover both kinds, so agreement is not agreement on one answer.
    assert!(kinds.contains(&"hardware") && kinds.contains(&"emulation-only"));
}

#[test]
fn vmm_host_kind_prints_what_the_script_prints_on_this_host() {
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("--host-kind")
        .output()
        .expect("run vmm --host-kind");
    assert!(out.status.success(), "vmm --host-kind failed: {out:?}");
    let vmm = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(vmm, script_says(None));
    assert_eq!(vmm, HostKind::detect().name());
}
