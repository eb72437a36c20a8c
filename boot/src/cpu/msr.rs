//! Model-specific registers every vCPU starts with.
//!
//! The set follows Firecracker and Cloud Hypervisor: the SYSENTER/SYSCALL MSRs and
//! KERNEL_GS_BASE cleared, the TSC at zero (KVM synchronises vCPUs written within a
//! second of each other), fast strings enabled in MISC_ENABLE, and MTRRs enabled with
//! write-back as the default memory type (the guest has no BIOS to program them).

use kvm_bindings::{Msrs, kvm_msr_entry};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vmm_sys_util::fam::Error as FamError;

/// `IA32_SYSENTER_CS`.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// `IA32_SYSENTER_ESP`.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// `IA32_SYSENTER_EIP`.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// `IA32_TSC`.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_MISC_ENABLE`.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// `IA32_MISC_ENABLE` bit 0: fast string operations.
pub const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
/// `IA32_MTRR_DEF_TYPE`.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// `IA32_MTRR_DEF_TYPE` value: MTRRs enabled (bit 11), default type write-back (6).
pub const MTRR_DEF_TYPE_ENABLED_WB: u64 = (1 << 11) | 6;
/// `STAR` (SYSCALL segments).
pub const MSR_STAR: u32 = 0xc000_0081;
/// `LSTAR` (64-bit SYSCALL target).
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// `CSTAR` (compatibility-mode SYSCALL target).
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// `SFMASK` (SYSCALL RFLAGS mask).
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// `KERNEL_GS_BASE` (SWAPGS).
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// Errors setting the boot MSRs.
#[derive(Debug, Error)]
pub enum MsrError {
    /// Building the KVM MSR list failed.
    #[error("cannot build the MSR list")]
    Fam(#[source] FamError),
    /// `KVM_SET_MSRS` failed.
    #[error("KVM_SET_MSRS failed")]
    Set(#[source] kvm_ioctls::Error),
    /// KVM stopped at an MSR it refused.
    #[error("KVM refused MSR {index:#x} (set {set} of {total})")]
    Refused {
        /// The first MSR not set.
        index: u32,
        /// How many were set.
        set: usize,
        /// How many were asked for.
        total: usize,
    },
}

/// The boot MSRs and their values, in the order they are written.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_ENABLED_WB),
    ]
}

/// Writes [`boot_msr_entries`] to `vcpu`; fails unless KVM accepted all of them.
pub fn setup_boot_msrs(vcpu: &VcpuFd) -> Result<(), MsrError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(MsrError::Fam)?;
    let set = vcpu.set_msrs(&msrs).map_err(MsrError::Set)?;
    if set != entries.len() {
        return Err(MsrError::Refused {
            index: entries.get(set).map_or(0, |e| e.index),
            set,
            total: entries.len(),
        });
    }
    Ok(())
}

#[allow(clippy::unwrap_used)]
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_msrs_enable_fast_strings_and_write_back_mtrrs() {
        let e = boot_msr_entries();
        let get = |i| e.iter().find(|m| m.index == i).map(|m| m.data);
        assert_eq!(get(MSR_IA32_MISC_ENABLE), Some(1));
        assert_eq!(get(MSR_MTRR_DEF_TYPE), Some(0x806));
        for msr in [
            MSR_STAR,
            MSR_LSTAR,
            MSR_CSTAR,
            MSR_SYSCALL_MASK,
            MSR_KERNEL_GS_BASE,
            MSR_IA32_TSC,
        ] {
            assert_eq!(get(msr), Some(0), "{msr:#x}");
        }
        let mut idx: Vec<u32> = e.iter().map(|m| m.index).collect();
        idx.sort_unstable();
        idx.dedup();
        assert_eq!(idx.len(), e.len(), "no MSR twice");
    }
}
