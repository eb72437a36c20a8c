//! What a vCPU's state says at a triple fault (`KVM_EXIT_SHUTDOWN`).
//!
//! A triple fault resets the machine, and a guest that resets by surprise
//! leaves nothing on its console: the state KVM holds when it reports the
//! shutdown (where the guest was, its page tables and descriptor tables,
//! the exception being delivered) is the only trace. QEMU prints the CPU
//! state on such events with `-d cpu_reset`; this VMM logs one line of it
//! with the reset, at info. On Intel hosts KVM keeps the state of the
//! fault; on AMD hosts it puts the vCPU through INIT first (the VMCB is
//! undefined after a shutdown), and the line says so.

use crate::kvm::guest_pagewalk::read_linear;
use kvm_bindings::{kvm_regs, kvm_sregs, kvm_vcpu_events};
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;

/// Bytes shown from RIP (the longest x86 instruction).
const CODE_BYTES: usize = 15;

/// One line describing `vcpu`'s state at a triple fault: RIP and the bytes
/// there, RSP, RFLAGS, CR0/2/3/4, EFER, CS, SS, the IDT, GDT and TR, and
/// the exception KVM was delivering, if any. Reads registers only (never
/// changes the vCPU); what cannot be read is said so in the line.
pub(crate) fn describe(vcpu: &VcpuFd, mem: &GuestMemoryMmap) -> String {
    let regs = match vcpu.get_regs() {
        Ok(r) => r,
        Err(e) => return format!("registers unreadable: {e}"),
    };
    let sregs = match vcpu.get_sregs() {
        Ok(s) => s,
        Err(e) => return format!("RIP {:#x}; special registers unreadable: {e}", regs.rip),
    };
    let mut code = [0u8; CODE_BYTES];
    let n = read_linear(mem, &sregs, sregs.cs.base.wrapping_add(regs.rip), &mut code);
    let line = format_state(
        &regs,
        &sregs,
        vcpu.get_vcpu_events().ok().as_ref(),
        &code[..n],
    );
    if is_init_state(&regs, &sregs) {
        format!(
            "{line} (the INIT state: KVM on AMD resets a vCPU before it reports a shutdown, \
             so where the guest was is lost; the kvm:kvm_exit tracepoint still has its RIP)"
        )
    } else {
        line
    }
}

/// Whether the vCPU is at the reset vector in real mode, as INIT leaves it.
fn is_init_state(regs: &kvm_regs, sregs: &kvm_sregs) -> bool {
    regs.rip == 0xfff0 && sregs.cs.base == 0xffff_0000 && sregs.cr0 & 1 == 0
}

/// [`describe`]'s line from the values read.
fn format_state(
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    events: Option<&kvm_vcpu_events>,
    code: &[u8],
) -> String {
    let code = if code.is_empty() {
        "(unreadable)".to_string()
    } else {
        code.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let exception = match events {
        None => "unreadable".to_string(),
        Some(ev) if ev.exception.injected != 0 || ev.exception.pending != 0 => format!(
            "vector {}{}{}",
            ev.exception.nr,
            if ev.exception.has_error_code != 0 {
                format!(" error code {:#x}", ev.exception.error_code)
            } else {
                String::new()
            },
            if ev.exception.injected != 0 {
                " (injected)"
            } else {
                " (pending)"
            }
        ),
        Some(_) => "none".to_string(),
    };
    format!(
        "RIP {:#x} (bytes {code}), RSP {:#x}, RFLAGS {:#x}, CR0 {:#x}, CR2 {:#x}, CR3 {:#x}, \
         CR4 {:#x}, EFER {:#x}, CS {:#x} (base {:#x}, L {}, DPL {}), SS {:#x}, \
         IDT {:#x}+{:#x}, GDT {:#x}+{:#x}, TR {:#x} (base {:#x}), exception {exception}",
        regs.rip,
        regs.rsp,
        regs.rflags,
        sregs.cr0,
        sregs.cr2,
        sregs.cr3,
        sregs.cr4,
        sregs.efer,
        sregs.cs.selector,
        sregs.cs.base,
        sregs.cs.l,
        sregs.cs.dpl,
        sregs.ss.selector,
        sregs.idt.base,
        sregs.idt.limit,
        sregs.gdt.base,
        sregs.gdt.limit,
        sregs.tr.selector,
        sregs.tr.base,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_names_where_the_guest_was_and_the_exception_being_delivered() {
        let regs = kvm_regs {
            rip: 0xffff_ffff_8100_1234,
            rsp: 0xffff_c900_0000_7f00,
            rflags: 0x10046,
            ..Default::default()
        };
        let mut sregs = kvm_sregs {
            cr2: 0xdead_b000,
            cr3: 0x1a0_c000,
            ..Default::default()
        };
        sregs.idt.base = 0xffff_fe00_0000_0000;
        sregs.idt.limit = 0xfff;
        let mut events = kvm_vcpu_events::default();
        events.exception.injected = 1;
        events.exception.nr = 14;
        events.exception.has_error_code = 1;
        events.exception.error_code = 2;
        let line = format_state(&regs, &sregs, Some(&events), &[0x0f, 0x0b]);
        for want in [
            "RIP 0xffffffff81001234 (bytes 0f 0b)",
            "CR2 0xdeadb000",
            "CR3 0x1a0c000",
            "IDT 0xfffffe0000000000+0xfff",
            "exception vector 14 error code 0x2 (injected)",
        ] {
            assert!(line.contains(want), "{want:?} not in {line:?}");
        }
        let none = format_state(&regs, &sregs, Some(&kvm_vcpu_events::default()), &[]);
        assert!(none.contains("(bytes (unreadable))") && none.ends_with("exception none"));
        assert!(format_state(&regs, &sregs, None, &[]).ends_with("exception unreadable"));
        assert!(!is_init_state(&regs, &sregs));
        let init = kvm_regs {
            rip: 0xfff0,
            ..Default::default()
        };
        let mut real = kvm_sregs {
            cr0: 0x10,
            ..Default::default()
        };
        real.cs.base = 0xffff_0000;
        assert!(is_init_state(&init, &real));
    }
}
