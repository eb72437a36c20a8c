//! The vCPU threads' allow-list: run the vCPU, read and complete its state
//! on an emulation failure, and let devices write to the console and to
//! eventfds. Everything else a vCPU thread does (exit dispatch through the
//! RCU-published buses, device locks, reading guest memory) is memory
//! access and locking.

use super::allow_list::AllowList;
use kvm_bindings::{KVMIO, kvm_regs, kvm_sregs, kvm_vcpu_events};
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
}

/// The ioctls a vCPU thread makes on its own vCPU.
pub(crate) fn ioctls() -> [u64; 6] {
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
    }
}
