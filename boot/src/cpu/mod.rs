//! vCPU set-up: CPUID, MSRs, registers, GDT, page tables, FPU and LAPIC.
//!
//! [`configure_vcpu`] applies everything a vCPU needs before its first `KVM_RUN`; the
//! submodules expose the single steps for callers (and tests) that need only one.

pub mod cpuid;
pub mod gdt;
pub mod lapic;
pub mod msr;
pub mod paging;
pub mod regs;
mod vcpu;

pub use vcpu::{VcpuSetupError, configure_vcpu};
