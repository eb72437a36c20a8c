//! Booting an x86-64 Linux guest on KVM: everything between "here is a kernel file" and
//! "the boot vCPU may run".
//!
//! The crate lays out guest physical memory ([`address_plan`], the plan of guest physical addresses; [`ram_layout`], where RAM goes and the E820 map), loads a
//! kernel ([`loader`]: bzImage through the 64-bit Linux boot protocol, or an ELF
//! `vmlinux` through PVH), its initrd ([`initrd`]) and command line ([`cmdline`]), writes
//! the protocol's boot parameters ([`bootparams`], [`pvh`]) and the ACPI tables that
//! describe CPUs and devices ([`acpi`]), and puts vCPUs in their initial state
//! ([`cpu`]: CPUID, MSRs, registers, page tables, FPU, LAPIC).
//!
//! It knows nothing of the VMM's devices beyond the addresses, ports and IRQs the caller
//! passes in, and nothing of QMP. It uses kvm-ioctls only to set vCPU state.
//!
//! A VMM uses it in this order:
//!
//! 1. [`RamLayout::new`] → create guest memory from [`RamLayout::mmap_ranges`];
//! 2. [`acpi::create_acpi_tables`] → the RSDP address;
//! 3. [`cmdline::build_cmdline`], then [`load_kernel`] → a [`BootInfo`];
//! 4. [`cpu::cpuid::supported_cpuid`] once (on a host whose KVM emulates guest kernel
//!    code, also [`cpu::cpuid::clear_kvm_features`] with
//!    [`cpu::cpuid::KVM_FEATURE_PV_SEND_IPI`]), then [`configure_vcpu`] for every vCPU,
//!    with `Some(&boot_info)` for vCPU 0 only: the others wait for INIT/SIPI in the
//!    in-kernel LAPIC (their first `KVM_RUN` after the SIPI returns `EAGAIN`; run again).
//!
//! x86-64 hosts only.

#![cfg(target_arch = "x86_64")]

// `u64` sizes and addresses are converted to `usize` losslessly throughout.
const _: () = assert!(usize::BITS == 64);

pub mod acpi;
pub mod address_plan;
pub mod bootparams;
pub mod cmdline;
pub mod cpu;
pub mod initrd;
pub mod loader;
pub mod mptable;
pub mod pvh;
pub mod ram_layout;
mod setup;

pub use cpu::{VcpuSetupError, configure_vcpu};
pub use linux_loader::cmdline::Cmdline;
pub use loader::{BootProtocol, KernelFormat, LoadedKernel};
pub use ram_layout::RamLayout;
pub use setup::{BootConfig, BootError, BootInfo, load_kernel};
