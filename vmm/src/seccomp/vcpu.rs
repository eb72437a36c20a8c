//! The vCPU threads' allow-list: run the vCPU, read and complete its state
//! on an emulation failure, and let devices write to the console and to
//! eventfds. Everything else a vCPU thread does (exit dispatch through the
//! RCU-published buses, device locks, reading guest memory) is memory
//! access and locking.

use super::allow_list::AllowList;
use kvm_bindings::{
    KVMIO, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use seccompiler::BackendError;

/// The vCPU ioctl request numbers, from the kernel's `linux/kvm.h`.
#[allow(missing_docs)]
mod request {
    use super::*;
    vmm_sys_util::ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    vmm_sys_util::ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    vmm_sys_util::ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
    vmm_sys_util::ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
    vmm_sys_util::ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
    vmm_sys_util::ioctl_iow_nr!(KVM_SET_LAPIC, KVMIO, 0x8f, kvm_lapic_state);
    vmm_sys_util::ioctl_iow_nr!(KVM_SET_MP_STATE, KVMIO, 0x99, kvm_mp_state);
    vmm_sys_util::ioctl_iow_nr!(KVM_SET_DEBUGREGS, KVMIO, 0xa2, kvm_debugregs);
    vmm_sys_util::ioctl_iow_nr!(KVM_SET_XSAVE, KVMIO, 0xa5, kvm_xsave);
    vmm_sys_util::ioctl_iow_nr!(KVM_SET_XCRS, KVMIO, 0xa7, kvm_xcrs);
}

/// The ioctls a vCPU thread makes on its own vCPU.
pub(crate) fn ioctls() -> [u64; 13] {
    [
        // The run loop.
        request::KVM_RUN(),
        // An internal error is reported with RIP and the instruction bytes
        // (registers, segments, then a guest page walk in memory).
        request::KVM_GET_REGS(),
        request::KVM_GET_SREGS(),
        // `int3` the emulator cannot do is completed: RIP past it, #BP
        // injected.
        request::KVM_GET_VCPU_EVENTS(),
        request::KVM_SET_REGS(),
        request::KVM_SET_VCPU_EVENTS(),
        // A machine reset with `--on-reset restart`: the parked vCPU puts
        // its own power-on state back (kvm/vcpu_state.rs; with KVM_SET_REGS
        // and KVM_SET_VCPU_EVENTS above). Only setters on its own vCPU fd.
        request::KVM_SET_MP_STATE(),
        request::KVM_SET_SREGS(),
        request::KVM_SET_XSAVE(),
        request::KVM_SET_XCRS(),
        request::KVM_SET_DEBUGREGS(),
        request::KVM_SET_LAPIC(),
        request::KVM_SET_MSRS(),
    ]
}

/// Adds the vCPU threads' own calls to `list`.
pub(crate) fn allow(list: &mut AllowList) -> Result<(), BackendError> {
    list.when_arg_in(libc::SYS_ioctl, 1, &ioctls())?;
    // The rest is in the common list: `write` (the serial console on
    // stdout; irqfds, the exit and fatal-error eventfds), `futex` (device
    // locks, pause), `rt_sigreturn` (after a kick), `clock_gettime` (the
    // thread's CPU time when it ends), `close` and `munmap` (its vCPU fd
    // and `kvm_run` mapping when it ends).
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_the_kernel_headers() {
        // linux/kvm.h on x86-64: _IO(0xAE, 0x80), _IOR(0xAE, 0x81, struct
        // kvm_regs) (144 bytes), _IOR(0xAE, 0x83, struct kvm_sregs) (312
        // bytes), _IOR(0xAE, 0x9f, struct kvm_vcpu_events) (64 bytes).
        assert_eq!(request::KVM_RUN(), 0xae80);
        assert_eq!(request::KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(request::KVM_SET_REGS(), 0x4090_ae82);
        assert_eq!(request::KVM_GET_SREGS(), 0x8138_ae83);
        assert_eq!(request::KVM_GET_VCPU_EVENTS(), 0x8040_ae9f);
        assert_eq!(request::KVM_SET_VCPU_EVENTS(), 0x4040_aea0);
        // _IOW(0xAE, n, struct): sregs 312, msrs 8 (header), lapic 1024,
        // mp_state 4, debugregs 128, xsave 4096, xcrs 392 bytes.
        assert_eq!(request::KVM_SET_SREGS(), 0x4138_ae84);
        assert_eq!(request::KVM_SET_MSRS(), 0x4008_ae89);
        assert_eq!(request::KVM_SET_LAPIC(), 0x4400_ae8f);
        assert_eq!(request::KVM_SET_MP_STATE(), 0x4004_ae99);
        assert_eq!(request::KVM_SET_DEBUGREGS(), 0x4080_aea2);
        assert_eq!(request::KVM_SET_XSAVE(), 0x5000_aea5);
        assert_eq!(request::KVM_SET_XCRS(), 0x4188_aea7);
    }
}
