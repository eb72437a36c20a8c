//! `KVM_EXIT_INTERNAL_ERROR`: explaining it, and completing the one
//! instruction we can complete exactly.
//!
//! On hosts whose KVM emulates guest kernel code, an instruction missing from
//! KVM's emulator ends `KVM_RUN` with an emulation failure. QEMU pauses the VM
//! then; this VMM stops with the vCPU, RIP and the instruction bytes, so the
//! user sees what happened instead of a hang. One instruction is completed
//! here because doing so is cheap and exact: `int3` (0xCC) raises `#BP`, so we
//! inject that exception with RIP past the instruction, as the CPU would.

use crate::kvm::guest_pagewalk::read_linear;
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;

/// `KVM_INTERNAL_ERROR_EMULATION`.
const SUBERROR_EMULATION: u32 = 1;
/// Longest x86 instruction.
const MAX_INSN: usize = 15;

/// What to do about an internal error.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The instruction was completed (`int3` → `#BP` injected); run on.
    Completed,
    /// Stop the VM with this message.
    Fatal(String),
}

/// The names of the internal-error sub-codes.
fn suberror_name(s: u32) -> &'static str {
    match s {
        SUBERROR_EMULATION => "emulation failure",
        2 => "simultaneous exceptions",
        3 => "delivery event",
        4 => "unexpected exit reason",
        _ => "unknown",
    }
}

/// Handles an internal-error exit on `vcpu` (vCPU `index`): completes `int3`
/// or describes the failure. `mem` is the current guest memory map.
pub(crate) fn handle_internal_error(
    vcpu: &mut VcpuFd,
    index: u32,
    mem: &GuestMemoryMmap,
) -> Outcome {
    let (suberror, ndata, data) = {
        let run = vcpu.get_kvm_run();
        // SAFETY: KVM filled the `internal` member of the exit union for
        // KVM_EXIT_INTERNAL_ERROR, which is the exit being handled.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        (internal.suberror, internal.ndata, internal.data)
    };
    let regs = match vcpu.get_regs() {
        Ok(r) => r,
        Err(e) => {
            return Outcome::Fatal(format!(
                "vCPU {index}: KVM internal error ({}), and its registers cannot be read: {e}",
                suberror_name(suberror)
            ));
        }
    };
    let sregs = match vcpu.get_sregs() {
        Ok(s) => s,
        Err(e) => {
            return Outcome::Fatal(format!(
                "vCPU {index}: KVM internal error ({}) at RIP {:#x}; special registers unreadable: {e}",
                suberror_name(suberror),
                regs.rip
            ));
        }
    };
    let linear = sregs.cs.base.wrapping_add(regs.rip);
    let mut bytes = [0u8; MAX_INSN];
    let n = read_linear(mem, &sregs, linear, &mut bytes);
    let bytes = &bytes[..n];

    if suberror == SUBERROR_EMULATION && bytes.first() == Some(&0xcc) {
        match inject_breakpoint(vcpu, regs) {
            Ok(()) => return Outcome::Completed,
            Err(e) => log::warn!("vCPU {index}: cannot complete int3 at {:#x}: {e}", regs.rip),
        }
    }

    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let extra: Vec<String> = data
        .iter()
        .take(ndata.min(16) as usize)
        .map(|d| format!("{d:#x}"))
        .collect();
    Outcome::Fatal(format!(
        "vCPU {index}: KVM internal error ({}, suberror {suberror}) at RIP {:#x} (CS {:#x}, CPL {}), \
         instruction bytes: {}{}",
        suberror_name(suberror),
        regs.rip,
        sregs.cs.selector,
        sregs.cs.dpl,
        if hex.is_empty() {
            "(unreadable)".to_string()
        } else {
            hex.join(" ")
        },
        if extra.is_empty() {
            String::new()
        } else {
            format!("; KVM data: {}", extra.join(" "))
        }
    ))
}

/// Completes `int3` at `regs.rip`: RIP moves past the one-byte instruction
/// and `#BP` (vector 3, a trap) is injected, so the guest's handler sees the
/// state the CPU would have produced.
fn inject_breakpoint(
    vcpu: &VcpuFd,
    mut regs: kvm_bindings::kvm_regs,
) -> Result<(), kvm_ioctls::Error> {
    let mut events = vcpu.get_vcpu_events()?;
    regs.rip = regs.rip.wrapping_add(1);
    vcpu.set_regs(&regs)?;
    events.exception.injected = 1;
    events.exception.nr = 3;
    events.exception.has_error_code = 0;
    events.exception.error_code = 0;
    vcpu.set_vcpu_events(&events)
}
