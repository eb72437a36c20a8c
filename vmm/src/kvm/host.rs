//! What kind of KVM this host has, and what that means for guests.
//!
//! Users run the VMM with hardware virtualization (VT-x / AMD-V). Some hosts
//! offer `/dev/kvm` without it (docs/hosts.md): KVM's
//! software-nested PVM runs guest user mode natively but guest kernel code
//! through its instruction emulator, which lacks some instructions. There the
//! VMM says so once and appends kernel arguments that keep Linux off the
//! missing instructions. Nothing else in the VMM depends on the difference.

use std::path::Path;

/// How this host virtualizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostKind {
    /// The CPU has VT-x or AMD-V.
    Hardware,
    /// `/dev/kvm` works but guest kernel code is emulated instruction by
    /// instruction (for example KVM's `kvm_pvm` module).
    EmulationOnly,
}

/// Kernel arguments that keep a Linux guest off the instructions KVM's
/// emulator lacks (XSAVE, FSGSBASE, PCID, CMPXCHG16B, POPCNT, SMAP's
/// CLAC/STAC, ...). CPUID set with `KVM_SET_CPUID2` does not fully reach the
/// guest on such hosts, so the features are hidden on the command line.
///
/// The last two only save time there: making kernel data read-only and
/// the embedded per-CPU allocator's page-table work cost seconds of
/// emulated code per boot.
pub(crate) const EMULATION_ONLY_KERNEL_ARGS: &[&str] = &[
    "noxsave",
    "nofsgsbase",
    "nopcid",
    "tsc=reliable",
    "clearcpuid=cx16,popcnt,rdrand,rdseed,rdtscp,rdpid,invpcid,clflushopt,clwb,movbe,smap,erms,fsrm",
    "rodata=off",
    "percpu_alloc=page",
];

impl HostKind {
    /// Detects the host kind from `/sys/module` and `/proc/cpuinfo`.
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/"))
    }

    /// As [`detect`](Self::detect), reading files below `root` (for tests).
    pub fn detect_in(root: &Path) -> Self {
        if root.join("sys/module/kvm_pvm").exists() {
            return HostKind::EmulationOnly;
        }
        match std::fs::read_to_string(root.join("proc/cpuinfo")) {
            Ok(info) => {
                let hw = info
                    .lines()
                    .filter(|l| l.starts_with("flags"))
                    .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
                if hw {
                    HostKind::Hardware
                } else {
                    HostKind::EmulationOnly
                }
            }
            // Without the information assume the common case.
            Err(_) => HostKind::Hardware,
        }
    }

    /// The kernel arguments this host needs appended, if any.
    pub fn kernel_args(self) -> &'static [&'static str] {
        match self {
            HostKind::Hardware => &[],
            HostKind::EmulationOnly => EMULATION_ONLY_KERNEL_ARGS,
        }
    }

    /// The name `vmm --host-kind` prints: `hardware` or `emulation-only`
    /// (`scripts/lib/host-kind.sh` prints the same names by the same rule).
    pub fn name(self) -> &'static str {
        match self {
            HostKind::Hardware => "hardware",
            HostKind::EmulationOnly => "emulation-only",
        }
    }

    /// The one line printed on stderr on an emulation-only host.
    pub fn notice(self) -> Option<String> {
        match self {
            HostKind::Hardware => None,
            HostKind::EmulationOnly => Some(format!(
                "vmm: this host's KVM has no hardware virtualization (software-nested, \
                 e.g. kvm_pvm): guest kernel code runs in KVM's instruction emulator, \
                 about 1000x slower; appending kernel arguments: {}",
                EMULATION_ONLY_KERNEL_ARGS.join(" ")
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_root(pvm: bool, flags: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "vmm-host-test-{}-{}-{}",
            std::process::id(),
            pvm,
            flags.len()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("proc")).unwrap();
        if pvm {
            std::fs::create_dir_all(dir.join("sys/module/kvm_pvm")).unwrap();
        }
        std::fs::write(
            dir.join("proc/cpuinfo"),
            format!("processor\t: 0\nflags\t\t: fpu {flags} sse2\n"),
        )
        .unwrap();
        dir
    }

    #[test]
    fn detects_hardware_virtualization_from_cpu_flags() {
        assert_eq!(
            HostKind::detect_in(&fake_root(false, "vmx")),
            HostKind::Hardware
        );
        assert_eq!(
            HostKind::detect_in(&fake_root(false, "svm lm")),
            HostKind::Hardware
        );
    }

    #[test]
    fn detects_emulation_only_hosts() {
        assert_eq!(
            HostKind::detect_in(&fake_root(false, "lm")),
            HostKind::EmulationOnly
        );
        assert_eq!(
            HostKind::detect_in(&fake_root(true, "vmx")),
            HostKind::EmulationOnly
        );
        assert!(
            HostKind::EmulationOnly
                .notice()
                .unwrap()
                .contains("noxsave")
        );
        assert!(HostKind::Hardware.kernel_args().is_empty());
    }
}
