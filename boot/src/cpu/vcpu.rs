//! Configuring one vCPU before its first run.

use kvm_bindings::CpuId;
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::GuestMemoryBackend;

use super::cpuid::{self, CpuidError};
use super::lapic::{self, LapicError};
use super::msr::{self, MsrError};
use super::regs::{self, RegsError};
use crate::loader::BootProtocol;
use crate::setup::BootInfo;

/// Errors configuring a vCPU; each names the vCPU.
#[derive(Debug, Error)]
pub enum VcpuSetupError {
    /// Computing or setting CPUID failed.
    #[error("vCPU {index}: CPUID set-up failed")]
    Cpuid {
        /// The vCPU.
        index: u32,
        /// Why.
        #[source]
        source: CpuidError,
    },
    /// Setting the boot MSRs failed.
    #[error("vCPU {index}: MSR set-up failed")]
    Msr {
        /// The vCPU.
        index: u32,
        /// Why.
        #[source]
        source: MsrError,
    },
    /// Setting registers or FPU failed.
    #[error("vCPU {index}: register set-up failed")]
    Regs {
        /// The vCPU.
        index: u32,
        /// Why.
        #[source]
        source: RegsError,
    },
    /// Programming the LAPIC failed.
    #[error("vCPU {index}: LAPIC set-up failed")]
    Lapic {
        /// The vCPU.
        index: u32,
        /// Why.
        #[source]
        source: LapicError,
    },
}

/// Configures vCPU `index` of `num_cpus` before it first runs.
///
/// Every vCPU gets its CPUID (from `supported_cpuid`, the result of
/// [`cpuid::supported_cpuid`], patched for this vCPU), the boot MSRs, the FPU reset state
/// and LAPIC LINT0 = ExtINT / LINT1 = NMI. The boot vCPU (`boot` is `Some`) also gets the
/// entry state of the kernel's protocol, which writes the GDT, IDT and (for Linux64)
/// page tables into `mem`. Application processors (`boot` is `None`) keep the register
/// state KVM gave them: they wait for INIT/SIPI in the in-kernel LAPIC.
///
/// Requires KVM's in-kernel irqchip; call from any thread before the vCPU's first
/// `KVM_RUN`.
pub fn configure_vcpu<M: GuestMemoryBackend>(
    vcpu: &VcpuFd,
    mem: &M,
    supported_cpuid: &CpuId,
    index: u32,
    num_cpus: u32,
    boot: Option<&BootInfo>,
) -> Result<(), VcpuSetupError> {
    let cpuid = cpuid::vcpu_cpuid(supported_cpuid, index, num_cpus)
        .map_err(|source| VcpuSetupError::Cpuid { index, source })?;
    cpuid::setup_cpuid(vcpu, &cpuid).map_err(|source| VcpuSetupError::Cpuid { index, source })?;
    msr::setup_boot_msrs(vcpu).map_err(|source| VcpuSetupError::Msr { index, source })?;
    if let Some(boot) = boot {
        match boot.protocol {
            BootProtocol::Linux64 => regs::setup_linux64(mem, vcpu, boot.entry, boot.boot_params),
            BootProtocol::Pvh => regs::setup_pvh(mem, vcpu, boot.entry, boot.boot_params),
        }
        .map_err(|source| VcpuSetupError::Regs { index, source })?;
    }
    regs::setup_fpu(vcpu).map_err(|source| VcpuSetupError::Regs { index, source })?;
    lapic::setup_lint(vcpu).map_err(|source| VcpuSetupError::Lapic { index, source })?;
    Ok(())
}

#[allow(clippy::unwrap_used)]
#[cfg(test)]
mod tests {
    //! These tests need /dev/kvm and fail (not skip) without it.

    use super::*;
    use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, Msrs, kvm_msr_entry, kvm_userspace_memory_region};
    use kvm_ioctls::{Kvm, VcpuExit, VmFd};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestMemoryRegion};

    use crate::address_plan::{
        BOOT_GDT_START, KVM_TSS_ADDRESS, PML4_START, PVH_START_INFO, ZERO_PAGE_START,
    };
    use crate::cpu::gdt::{
        CODE32_SELECTOR, CODE64_SELECTOR, DATA_SELECTOR, USER_CODE64_SELECTOR, USER_DATA_SELECTOR,
    };
    use crate::cpu::lapic::{APIC_LVT0, APIC_LVT1, lapic_reg};
    use crate::cpu::msr::{MSR_IA32_MISC_ENABLE, MSR_MTRR_DEF_TYPE, boot_msr_entries};
    use crate::cpu::regs::{
        CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, LongModeEntry, enter_long_mode,
    };
    use crate::loader::{KernelFormat, LoadedKernel};

    struct TestVm {
        kvm: Kvm,
        vm: VmFd,
        mem: GuestMemoryMmap,
    }

    /// A VM with `size` bytes of RAM from 0 and, if asked, the in-kernel irqchip.
    fn test_vm(size: usize, irqchip: bool) -> TestVm {
        let kvm = Kvm::new().expect("/dev/kvm is required for this test");
        let vm = kvm.create_vm().unwrap();
        vm.set_tss_address(KVM_TSS_ADDRESS as usize).unwrap();
        if irqchip {
            vm.create_irq_chip().unwrap();
        }
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        for (slot, r) in vm_memory::GuestMemoryBackend::iter(&mem).enumerate() {
            let host =
                vm_memory::GuestMemoryBackend::get_host_address(&mem, r.start_addr()).unwrap();
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `host..host + len` is a live mapping owned by `mem`, which the
            // returned TestVm keeps alive as long as the VM.
            unsafe { vm.set_user_memory_region(region).unwrap() };
        }
        TestVm { kvm, vm, mem }
    }

    fn boot_info(protocol: BootProtocol, entry: u64) -> BootInfo {
        BootInfo {
            protocol,
            entry: GuestAddress(entry),
            boot_params: GuestAddress(match protocol {
                BootProtocol::Linux64 => ZERO_PAGE_START,
                BootProtocol::Pvh => PVH_START_INFO,
            }),
            kernel: LoadedKernel {
                format: KernelFormat::BzImage,
                protocol,
                entry: GuestAddress(entry),
                load_addr: GuestAddress(0x10_0000),
                end: 0x20_0000,
                setup_header: None,
            },
            initrd: None,
            cmdline: GuestAddress(0x2_0000),
            cmdline_size: 1,
        }
    }

    #[test]
    fn bsp_linux64_state_reads_back() {
        let t = test_vm(2 << 20, true);
        let vcpu = t.vm.create_vcpu(0).unwrap();
        let cpuid = t.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let boot = boot_info(BootProtocol::Linux64, 0x10_0200);
        configure_vcpu(&vcpu, &t.mem, &cpuid, 0, 2, Some(&boot)).unwrap();

        let regs = vcpu.get_regs().unwrap();
        assert_eq!(
            (regs.rip, regs.rsi, regs.rflags & 0x200),
            (0x10_0200, ZERO_PAGE_START, 0)
        );
        let sregs = vcpu.get_sregs().unwrap();
        assert_eq!(sregs.cs.selector, CODE64_SELECTOR);
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(
            (sregs.ds.selector, sregs.ss.selector),
            (DATA_SELECTOR, DATA_SELECTOR)
        );
        assert_eq!(sregs.gdt.base, BOOT_GDT_START);
        assert_eq!(sregs.cr3, PML4_START);
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_ne!(sregs.cr4 & CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);

        let back = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
        let leaf1 = back.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, 0, "APIC ID of vCPU 0");
        assert_ne!(leaf1.ecx & (1 << 31), 0, "hypervisor bit");

        let mut msrs = Msrs::from_entries(&[
            kvm_msr_entry {
                index: MSR_IA32_MISC_ENABLE,
                ..Default::default()
            },
            kvm_msr_entry {
                index: MSR_MTRR_DEF_TYPE,
                ..Default::default()
            },
        ])
        .unwrap();
        assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), 2);
        assert_eq!(msrs.as_slice()[0].data & 1, 1, "fast strings");
        assert_eq!(
            msrs.as_slice()[1].data,
            0x806,
            "MTRRs on, write-back default"
        );

        let lapic = vcpu.get_lapic().unwrap();
        assert_eq!((lapic_reg(&lapic, APIC_LVT0) >> 8) & 7, 7, "LINT0 ExtINT");
        assert_ne!(
            lapic_reg(&lapic, APIC_LVT0) & crate::cpu::lapic::APIC_LVT_MASKED,
            0,
            "LINT0 masked"
        );
        assert_eq!((lapic_reg(&lapic, APIC_LVT1) >> 8) & 7, 4, "LINT1 NMI");

        // KVM_SET_FPU does not load MXCSR (see `setup_fpu`); only the control word is ours.
        assert_eq!(vcpu.get_fpu().unwrap().fcw, 0x37f);
    }

    #[test]
    fn bsp_pvh_state_is_32bit_protected_mode_without_paging() {
        let t = test_vm(2 << 20, true);
        let vcpu = t.vm.create_vcpu(0).unwrap();
        let cpuid = t.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let boot = boot_info(BootProtocol::Pvh, 0x100_0040);
        configure_vcpu(&vcpu, &t.mem, &cpuid, 0, 1, Some(&boot)).unwrap();
        let regs = vcpu.get_regs().unwrap();
        assert_eq!((regs.rip, regs.rbx), (0x100_0040, PVH_START_INFO));
        let sregs = vcpu.get_sregs().unwrap();
        assert_eq!(sregs.cs.selector, CODE32_SELECTOR);
        assert_eq!(
            (sregs.cs.db, sregs.cs.l, sregs.cs.limit),
            (1, 0, 0xffff_ffff)
        );
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!(sregs.efer & EFER_LMA, 0);
    }

    #[test]
    fn ap_gets_its_apic_id_and_keeps_reset_registers() {
        let t = test_vm(2 << 20, true);
        let _bsp = t.vm.create_vcpu(0).unwrap();
        let ap = t.vm.create_vcpu(1).unwrap();
        let before = ap.get_sregs().unwrap();
        let cpuid = t.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        configure_vcpu(&ap, &t.mem, &cpuid, 1, 2, None).unwrap();
        let after = ap.get_sregs().unwrap();
        assert_eq!(
            (after.cr0, after.cs.selector, after.cs.base),
            (before.cr0, before.cs.selector, before.cs.base)
        );
        let back = ap.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
        let leaf1 = back.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, 1, "APIC ID of vCPU 1");
        let mp = ap.get_mp_state().unwrap();
        assert_eq!(
            mp.mp_state,
            kvm_bindings::KVM_MP_STATE_UNINITIALIZED,
            "waits for INIT/SIPI"
        );
    }

    #[test]
    fn all_boot_msrs_are_accepted_and_read_back() {
        let t = test_vm(2 << 20, true);
        let vcpu = t.vm.create_vcpu(0).unwrap();
        let cpuid = t.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        configure_vcpu(&vcpu, &t.mem, &cpuid, 0, 1, None).unwrap();
        let wanted = boot_msr_entries();
        let mut msrs = Msrs::from_entries(
            &wanted
                .iter()
                .map(|e| kvm_msr_entry {
                    index: e.index,
                    ..Default::default()
                })
                .collect::<Vec<_>>(),
        )
        .unwrap();
        assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), wanted.len());
        for (got, want) in msrs.as_slice().iter().zip(&wanted) {
            if want.index == crate::cpu::msr::MSR_IA32_TSC {
                continue; // It has been counting since it was set.
            }
            assert_eq!(got.data, want.data, "MSR {:#x}", want.index);
        }
    }

    /// Runs `vcpu` once; it must exit with port output. Returns (port, first byte).
    fn run_to_out(vcpu: &mut kvm_ioctls::VcpuFd) -> (u16, u8) {
        let exit = match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(port, data) => Ok((port, data[0])),
            other => Err(format!("{other:?}")),
        };
        exit.unwrap_or_else(|e| {
            let regs = vcpu.get_regs().unwrap();
            panic!("unexpected exit {e} at rip {:#x}", regs.rip)
        })
    }

    #[test]
    fn guest_runs_in_long_mode_set_up_by_enter_long_mode() {
        let t = test_vm(4 << 20, false);
        // mov rax, 0x1122334455667788 (needs 64-bit mode); shr rax, 56 -> 0x11;
        // mov dx, 0x3f8; out dx, al; hlt
        let code = [
            0x48, 0xb8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // movabs rax, imm64
            0x48, 0xc1, 0xe8, 0x38, // shr rax, 56
            0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
            0xee, // out dx, al
            0xf4, // hlt
        ];
        t.mem.write_slice(&code, GuestAddress(0x10_0000)).unwrap();
        let mut vcpu = t.vm.create_vcpu(0).unwrap();
        let entry = LongModeEntry {
            rip: 0x10_0000,
            rsp: 0x20_0000,
            user_pages: false,
        };
        enter_long_mode(&t.mem, &vcpu, &entry).unwrap();
        assert_eq!(run_to_out(&mut vcpu), (0x3f8, 0x11));
    }

    #[test]
    fn guest_drops_to_cpl3_with_user_pages() {
        let t = test_vm(4 << 20, false);
        // CPL0: push ss, rsp, rflags, cs, rip; iretq to CPL3 at 0x101000.
        let code = [
            0x6a,
            USER_DATA_SELECTOR as u8, // push 0x33 (SS)
            0x68,
            0x00,
            0x00,
            0x18,
            0x00, // push 0x180000 (RSP)
            0x9c, // pushfq
            0x6a,
            USER_CODE64_SELECTOR as u8, // push 0x3b (CS)
            0x68,
            0x00,
            0x10,
            0x10,
            0x00, // push 0x101000 (RIP)
            0x48,
            0xcf, // iretq
        ];
        // CPL3: the privilege level is CS's RPL; report it with an MMIO write into the
        // hole (port I/O would need IOPL 3, which PVM hosts do not keep for user mode,
        // and the CS selector value itself is the host's there).
        let user = [
            0x8c, 0xc8, // mov eax, cs
            0x83, 0xe0, 0x03, // and eax, 3
            0xbb, 0x00, 0x00, 0x00, 0xd0, // mov ebx, 0xd0000000
            0x88, 0x03, // mov [rbx], al
            0xeb, 0xfe, // jmp $
        ];
        t.mem.write_slice(&code, GuestAddress(0x10_0000)).unwrap();
        t.mem.write_slice(&user, GuestAddress(0x10_1000)).unwrap();
        let mut vcpu = t.vm.create_vcpu(0).unwrap();
        let entry = LongModeEntry {
            rip: 0x10_0000,
            rsp: 0x20_0000,
            user_pages: true,
        };
        enter_long_mode(&t.mem, &vcpu, &entry).unwrap();
        let exit = match vcpu.run().expect("KVM_RUN") {
            VcpuExit::MmioWrite(addr, data) => Some((addr, data.to_vec())),
            _ => None,
        };
        assert_eq!(exit, Some((0xd000_0000, vec![3])), "MMIO write of CPL 3");
    }
}
