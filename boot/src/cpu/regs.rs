//! Register state for entering a kernel (or a test guest) on the boot vCPU.
//!
//! * Linux 64-bit boot protocol: long mode with paging (identity map of the first 4 GiB),
//!   CS = `__BOOT_CS` (0x10), DS/ES/SS = `__BOOT_DS` (0x18), RIP = entry, RSI = zero page,
//!   interrupts off.
//! * PVH: 32-bit protected mode, paging off, flat CS (0x08) and data (0x18), RIP = PVH
//!   entry, RBX = `hvm_start_info`, interrupts off.
//! * [`enter_long_mode`]: long mode at any RIP/RSP for tiny test guests, optionally with
//!   user-accessible pages so they can drop to CPL3 (with `iretq` to
//!   [`USER_CODE64_SELECTOR`](super::gdt::USER_CODE64_SELECTOR)).
//!
//! Each function writes what it needs to guest memory (GDT, TSS, IDT, page tables) at
//! the layout's fixed addresses, so guest RAM must cover 0..0x10000.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use super::gdt::{self, CODE32_SELECTOR, CODE64_SELECTOR, DATA_SELECTOR, GdtError, TSS_SELECTOR};
use super::paging::{self, PageAccess, PagingError};
use crate::address_plan::{BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER};

/// CR0 bits.
pub const CR0_PE: u64 = 1 << 0;
/// CR0.ET (always 1 on modern CPUs).
pub const CR0_ET: u64 = 1 << 4;
/// CR0.PG.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PAE.
pub const CR4_PAE: u64 = 1 << 5;
/// EFER.LME.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA.
pub const EFER_LMA: u64 = 1 << 10;
/// RFLAGS with only the always-one bit 1 set (interrupts disabled).
pub const RFLAGS_RESERVED: u64 = 1 << 1;
/// RFLAGS.IOPL = 3: lets CPL3 code execute `in`/`out` (for test guests).
pub const RFLAGS_IOPL3: u64 = 3 << 12;

/// x87 control word after `FNINIT`.
const FPU_FCW: u16 = 0x37f;
/// MXCSR reset value (all exceptions masked).
const FPU_MXCSR: u32 = 0x1f80;

/// Errors setting up vCPU registers.
#[derive(Debug, Error)]
pub enum RegsError {
    /// `KVM_GET_SREGS` failed.
    #[error("KVM_GET_SREGS failed")]
    GetSregs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_SREGS` failed.
    #[error("KVM_SET_SREGS failed")]
    SetSregs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_REGS` failed.
    #[error("KVM_SET_REGS failed")]
    SetRegs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_FPU` failed.
    #[error("KVM_SET_FPU failed")]
    SetFpu(#[source] kvm_ioctls::Error),
    /// Writing the GDT or TSS failed.
    #[error("cannot write the boot GDT")]
    Gdt(#[source] GdtError),
    /// Writing the IDT failed.
    #[error("cannot write the boot IDT")]
    Idt(#[source] GuestMemoryError),
    /// Writing the page tables failed.
    #[error("cannot write the boot page tables")]
    Paging(#[source] PagingError),
}

/// Where and how a test guest starts in long mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongModeEntry {
    /// First instruction (identity-mapped, so a guest physical address below 4 GiB).
    pub rip: u64,
    /// Initial stack pointer; also the TSS's RSP0, used when an interrupt or exception
    /// arrives while running at CPL3.
    pub rsp: u64,
    /// Make every page user-accessible (U/S set at every level) so the guest can run
    /// code at CPL3. SMEP/SMAP stay off, so CPL0 still executes and reads those pages.
    pub user_pages: bool,
}

/// Sets the x87 control word to its `FNINIT` value (0x37f) and asks for MXCSR 0x1f80.
///
/// `KVM_SET_FPU` does not load MXCSR (Linux's `kvm_arch_vcpu_ioctl_set_fpu` copies every
/// field but that one), so MXCSR keeps KVM's reset value; kernels set their own.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: FPU_FCW,
        mxcsr: FPU_MXCSR,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(RegsError::SetFpu)
}

/// Prepares the boot vCPU for the Linux 64-bit boot protocol: writes GDT, IDT and
/// identity page tables, enters long mode, RIP = `entry`, RSI = `zero_page`.
pub fn setup_linux64<M: GuestMemoryBackend>(
    mem: &M,
    vcpu: &VcpuFd,
    entry: GuestAddress,
    zero_page: GuestAddress,
) -> Result<(), RegsError> {
    let mut sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    long_mode_sregs(mem, &mut sregs, PageAccess::Supervisor, BOOT_STACK_POINTER)?;
    vcpu.set_sregs(&sregs).map_err(RegsError::SetSregs)?;
    let regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry.0,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: zero_page.0,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(RegsError::SetRegs)
}

/// Prepares the boot vCPU for the PVH entry: writes GDT and IDT, 32-bit protected mode
/// without paging, RIP = `entry`, RBX = `start_info`.
pub fn setup_pvh<M: GuestMemoryBackend>(
    mem: &M,
    vcpu: &VcpuFd,
    entry: GuestAddress,
    start_info: GuestAddress,
) -> Result<(), RegsError> {
    let mut sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    protected_mode_sregs(mem, &mut sregs)?;
    vcpu.set_sregs(&sregs).map_err(RegsError::SetSregs)?;
    let regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry.0,
        rbx: start_info.0,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(RegsError::SetRegs)
}

/// Puts `vcpu` in 64-bit long mode at `entry.rip` with stack `entry.rsp`, identity
/// paging of the first 4 GiB, the boot GDT (which has user segments) and a TSS whose RSP0
/// is `entry.rsp`. RFLAGS has IOPL 3 so code dropped to CPL3 can still use port I/O.
/// Meant for test guests; a kernel uses [`setup_linux64`].
pub fn enter_long_mode<M: GuestMemoryBackend>(
    mem: &M,
    vcpu: &VcpuFd,
    entry: &LongModeEntry,
) -> Result<(), RegsError> {
    let access = if entry.user_pages {
        PageAccess::User
    } else {
        PageAccess::Supervisor
    };
    let mut sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    long_mode_sregs(mem, &mut sregs, access, entry.rsp)?;
    vcpu.set_sregs(&sregs).map_err(RegsError::SetSregs)?;
    let regs = kvm_regs {
        rflags: RFLAGS_RESERVED | RFLAGS_IOPL3,
        rip: entry.rip,
        rsp: entry.rsp,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(RegsError::SetRegs)
}

/// Writes the GDT (with a TSS whose RSP0 is `rsp0`) and the null IDT, and points the
/// descriptor-table registers, TR and the data segments at them.
fn tables_and_segments<M: GuestMemoryBackend>(
    mem: &M,
    sregs: &mut kvm_sregs,
    rsp0: u64,
) -> Result<(), RegsError> {
    let limit = gdt::write_boot_gdt(mem, rsp0).map_err(RegsError::Gdt)?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = limit;
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(RegsError::Idt)?;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    let data = gdt::segment(DATA_SELECTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = gdt::segment(TSS_SELECTOR);
    Ok(())
}

fn long_mode_sregs<M: GuestMemoryBackend>(
    mem: &M,
    sregs: &mut kvm_sregs,
    access: PageAccess,
    rsp0: u64,
) -> Result<(), RegsError> {
    tables_and_segments(mem, sregs, rsp0)?;
    sregs.cs = gdt::segment(CODE64_SELECTOR);
    sregs.cr3 = paging::write_identity_page_tables(mem, access).map_err(RegsError::Paging)?;
    sregs.cr4 = CR4_PAE;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
    Ok(())
}

fn protected_mode_sregs<M: GuestMemoryBackend>(
    mem: &M,
    sregs: &mut kvm_sregs,
) -> Result<(), RegsError> {
    tables_and_segments(mem, sregs, 0)?;
    sregs.cs = gdt::segment(CODE32_SELECTOR);
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    Ok(())
}
