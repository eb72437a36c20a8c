//! Opening `/dev/kvm` and checking that it offers what the VMM needs.

use kvm_ioctls::{Cap, Kvm};
use thiserror::Error;

/// The KVM API version every supported kernel reports.
const KVM_API_VERSION: i32 = 12;

/// Capabilities the VMM cannot run without, with the reason in our words.
const REQUIRED: &[(Cap, &str)] = &[
    (
        Cap::Irqchip,
        "an in-kernel interrupt controller (KVM_CAP_IRQCHIP)",
    ),
    (Cap::Pit2, "an in-kernel PIT (KVM_CAP_PIT2)"),
    (Cap::UserMemory, "user memory regions (KVM_CAP_USER_MEMORY)"),
    (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
    (Cap::Ioeventfd, "ioeventfd (KVM_CAP_IOEVENTFD)"),
    (
        Cap::ImmediateExit,
        "immediate exit (KVM_CAP_IMMEDIATE_EXIT)",
    ),
    (Cap::ExtCpuid, "KVM_GET_SUPPORTED_CPUID (KVM_CAP_EXT_CPUID)"),
    (Cap::SetTssAddr, "KVM_SET_TSS_ADDR"),
];

/// Why KVM cannot be used.
#[derive(Debug, Error)]
pub enum KvmError {
    /// No `/dev/kvm`.
    #[error(
        "/dev/kvm does not exist: this host has no KVM (is the kvm_intel or kvm_amd module loaded?)"
    )]
    Missing,
    /// `/dev/kvm` exists but may not be opened.
    #[error("no permission to open /dev/kvm (run as root or as a member of the 'kvm' group)")]
    Permission,
    /// Opening failed otherwise.
    #[error("cannot open /dev/kvm")]
    Open(#[source] std::io::Error),
    /// An unexpected API version.
    #[error("KVM reports API version {0}, this VMM needs {KVM_API_VERSION}")]
    ApiVersion(i32),
    /// A required capability is missing.
    #[error("this host's KVM lacks {0}")]
    MissingCapability(&'static str),
    /// More vCPUs than KVM allows.
    #[error("{asked} vCPUs requested, this host's KVM allows at most {max}")]
    TooManyVcpus {
        /// Requested.
        asked: u32,
        /// KVM's limit.
        max: usize,
    },
}

/// Opens `/dev/kvm` and checks the API version and the capabilities the VMM
/// relies on. Fails with a message that says what to do.
pub(crate) fn open(vcpus: u32) -> Result<Kvm, KvmError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => KvmError::Missing,
        libc::EACCES | libc::EPERM => KvmError::Permission,
        n => KvmError::Open(std::io::Error::from_raw_os_error(n)),
    })?;
    let api = kvm.get_api_version();
    if api != KVM_API_VERSION {
        return Err(KvmError::ApiVersion(api));
    }
    for (cap, what) in REQUIRED {
        if !kvm.check_extension(*cap) {
            return Err(KvmError::MissingCapability(what));
        }
    }
    let max = kvm.get_max_vcpus();
    if vcpus as usize > max {
        return Err(KvmError::TooManyVcpus { asked: vcpus, max });
    }
    Ok(kvm)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs /dev/kvm; fails without it.
    #[test]
    fn opens_kvm_and_checks_capabilities() {
        let kvm = open(2).expect("/dev/kvm with the required capabilities");
        assert_eq!(kvm.get_api_version(), KVM_API_VERSION);
        let e = open(u32::MAX).unwrap_err();
        assert!(matches!(e, KvmError::TooManyVcpus { .. }), "{e}");
    }
}
