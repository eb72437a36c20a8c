//! A vCPU's power-on state: everything KVM lets a VMM read of a vCPU,
//! captured before its first `KVM_RUN` and put back on a machine reset.
//!
//! A reboot in place must leave nothing of the previous guest in the vCPU.
//! The registers are the easy part; the dangerous part is MSRs that make
//! KVM itself write guest memory (kvmclock's system time, steal time,
//! async page faults, PV EOI): left set, KVM would keep writing where the
//! old kernel asked, in memory the new kernel uses for something else.
//! So every MSR KVM reports (`KVM_GET_MSR_INDEX_LIST`) that this vCPU can
//! read is captured and written back, as QEMU's reset does for the MSRs it
//! knows and Firecracker's snapshot restore does for all of them.
//!
//! The order of [`VcpuState::restore`] is Firecracker's restore order (MP
//! state, registers, special registers, XSAVE, XCRs, debug registers,
//! LAPIC, MSRs, events): the APIC base (in the special registers) before
//! the LAPIC, the LAPIC before the MSRs that depend on its mode (TSC
//! deadline), pending events last.

use kvm_bindings::{
    Msrs, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::VcpuFd;
use thiserror::Error;

/// Errors capturing or restoring a vCPU's state: which step failed.
#[derive(Debug, Error)]
pub enum VcpuStateError {
    /// A `KVM_GET_*` or `KVM_SET_*` ioctl failed.
    #[error("{what} failed")]
    Ioctl {
        /// The ioctl.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_SET_MSRS` stopped before the end of the list.
    #[error("KVM_SET_MSRS restored {done} of {total} MSRs (stopped at MSR {index:#x})")]
    Msrs {
        /// MSRs written.
        done: usize,
        /// MSRs to write.
        total: usize,
        /// The first one not written.
        index: u32,
    },
    /// An MSR list could not be built (more entries than KVM allows).
    #[error("cannot build an MSR list of {0} entries")]
    MsrList(usize),
}

fn ioctl<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VcpuStateError> {
    r.map_err(|source| VcpuStateError::Ioctl { what, source })
}

/// One vCPU's state as KVM reports it. Captured and restored on the
/// thread that owns the vCPU (or before it has one).
pub(crate) struct VcpuState {
    mp_state: kvm_mp_state,
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    debugregs: kvm_debugregs,
    lapic: kvm_lapic_state,
    msrs: Vec<kvm_msr_entry>,
    events: kvm_vcpu_events,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// The largest MSR list KVM takes in one call (`KVM_MAX_MSR_ENTRIES`).
const MAX_MSRS: usize = 256;

impl VcpuState {
    /// Reads `vcpu`'s state. `msr_indexes` is KVM's MSR index list
    /// (`Kvm::get_msr_index_list`); the MSRs this vCPU cannot read (KVM
    /// lists every MSR it knows, not only those of this CPU model) are
    /// left out, one probe each.
    pub(crate) fn capture(vcpu: &VcpuFd, msr_indexes: &[u32]) -> Result<Self, VcpuStateError> {
        let mut msrs = Vec::with_capacity(msr_indexes.len());
        for &index in msr_indexes {
            let mut one = Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }])
            .map_err(|_| VcpuStateError::MsrList(1))?;
            // Kept only if it can be written back too (KVM refuses host
            // writes of a few read-only MSRs); writing the value just read,
            // before the vCPU ever ran, changes nothing.
            if matches!(vcpu.get_msrs(&mut one), Ok(1))
                && matches!(vcpu.set_msrs(&one), Ok(1))
                && let Some(e) = one.as_slice().first()
            {
                msrs.push(*e);
            }
        }
        Ok(Self {
            mp_state: ioctl("KVM_GET_MP_STATE", vcpu.get_mp_state())?,
            regs: ioctl("KVM_GET_REGS", vcpu.get_regs())?,
            sregs: ioctl("KVM_GET_SREGS", vcpu.get_sregs())?,
            xsave: ioctl("KVM_GET_XSAVE", vcpu.get_xsave())?,
            xcrs: ioctl("KVM_GET_XCRS", vcpu.get_xcrs())?,
            debugregs: ioctl("KVM_GET_DEBUGREGS", vcpu.get_debug_regs())?,
            lapic: ioctl("KVM_GET_LAPIC", vcpu.get_lapic())?,
            msrs,
            events: ioctl("KVM_GET_VCPU_EVENTS", vcpu.get_vcpu_events())?,
        })
    }

    /// Number of MSRs captured.
    pub(crate) fn msr_count(&self) -> usize {
        self.msrs.len()
    }

    /// Writes this state back into `vcpu` (which must not be running).
    /// Stops at the first step that fails; the vCPU is then in a mixed
    /// state and must not run again.
    pub(crate) fn restore(&self, vcpu: &VcpuFd) -> Result<(), VcpuStateError> {
        ioctl("KVM_SET_MP_STATE", vcpu.set_mp_state(self.mp_state))?;
        ioctl("KVM_SET_REGS", vcpu.set_regs(&self.regs))?;
        ioctl("KVM_SET_SREGS", vcpu.set_sregs(&self.sregs))?;
        // SAFETY: `self.xsave` is what KVM_GET_XSAVE returned for this
        // vCPU: a whole `kvm_xsave` whose header names only features the
        // kernel itself saved into that buffer, so the kernel reads no
        // further than the struct.
        ioctl("KVM_SET_XSAVE", unsafe { vcpu.set_xsave(&self.xsave) })?;
        ioctl("KVM_SET_XCRS", vcpu.set_xcrs(&self.xcrs))?;
        ioctl("KVM_SET_DEBUGREGS", vcpu.set_debug_regs(&self.debugregs))?;
        ioctl("KVM_SET_LAPIC", vcpu.set_lapic(&self.lapic))?;
        for chunk in self.msrs.chunks(MAX_MSRS) {
            let list =
                Msrs::from_entries(chunk).map_err(|_| VcpuStateError::MsrList(chunk.len()))?;
            let done = ioctl("KVM_SET_MSRS", vcpu.set_msrs(&list))?;
            if done != chunk.len() {
                return Err(VcpuStateError::Msrs {
                    done,
                    total: chunk.len(),
                    index: chunk.get(done).map_or(0, |e| e.index),
                });
            }
        }
        ioctl("KVM_SET_VCPU_EVENTS", vcpu.set_vcpu_events(&self.events))?;
        Ok(())
    }
}
