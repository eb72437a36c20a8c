//! Support for the integration tests: finding the guest kit, requiring KVM,
//! tiny assembly guests on bare VMs, and recording test devices.
//!
//! The tests themselves are in `tests/tests/` (KVM mechanics with tiny
//! guests) and `vmm/tests/` (end-to-end runs of the `vmm` binary, which only
//! that package's tests can build and locate).

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test support: failing loudly is the point.

pub mod bare_vm;
pub mod guest_code;
pub mod guest_driver;
pub mod kit;
pub mod panic_watch;
pub mod proc_maps;
pub mod raw_qmp;
pub mod recorder;
pub mod stderr_redirect;
pub mod virtio_ops;
pub mod vmm_process;

/// Panics (fails the test) if `/dev/kvm` cannot be opened: tests that need
/// KVM never skip silently.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test needs /dev/kvm, which cannot be opened: {e}");
    }
}

/// A fresh, empty scratch directory for one test: `vmm-<name>-<pid>` in the
/// temporary directory (what an earlier run left there is removed first).
pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The Python with QEMU's `qemu.qmp` client: `$QMP_PYTHON`, or the venv
/// `scripts/install-deps.sh` makes (`$VMM_PY_VENV`, default
/// `/var/cache/vmm-venv`). Panics with what to run if it is missing.
pub fn qmp_python() -> std::path::PathBuf {
    let p = std::env::var_os("QMP_PYTHON").map_or_else(
        || {
            std::path::PathBuf::from(
                std::env::var_os("VMM_PY_VENV").unwrap_or_else(|| "/var/cache/vmm-venv".into()),
            )
            .join("bin/python3")
        },
        std::path::PathBuf::from,
    );
    let ok = std::process::Command::new(&p)
        .args(["-c", "import qemu.qmp"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} cannot import qemu.qmp: run scripts/install-deps.sh (as root) first",
        p.display()
    );
    p
}
