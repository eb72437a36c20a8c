//! The KVM VM object: creation with the in-kernel irqchip and PIT, memory
//! slots, irqfds and ioeventfds.

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

/// Guest-physical page KVM uses for the real-mode TSS on Intel (3 pages).
pub(crate) const KVM_TSS_ADDRESS: u64 = boot::address_plan::KVM_TSS_ADDRESS;
/// Guest-physical page for the EPT identity map on Intel, just below the TSS.
pub(crate) const KVM_IDENTITY_MAP_ADDRESS: u64 = KVM_TSS_ADDRESS - 0x1000;

/// Errors creating or configuring the VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// `KVM_CREATE_VM` failed.
    #[error("cannot create the VM")]
    Create(#[source] kvm_ioctls::Error),
    /// `KVM_SET_TSS_ADDR` or `KVM_SET_IDENTITY_MAP_ADDR` failed.
    #[error("cannot set the VM's TSS or identity-map address")]
    TssAddress(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_IRQCHIP` failed.
    #[error("cannot create the in-kernel interrupt controller")]
    Irqchip(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_PIT2` failed.
    #[error("cannot create the in-kernel PIT")]
    Pit(#[source] kvm_ioctls::Error),
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("cannot set memory slot {slot} ({size:#x} bytes at {gpa:#x})")]
    Memslot {
        /// Slot number.
        slot: u32,
        /// Guest-physical start.
        gpa: u64,
        /// Size (0 deletes).
        size: u64,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_IRQFD` failed.
    #[error("cannot connect an eventfd to GSI {gsi}")]
    Irqfd {
        /// The interrupt.
        gsi: u32,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_IOEVENTFD` failed.
    #[error("cannot register an ioeventfd at {addr:#x}")]
    Ioeventfd {
        /// The address.
        addr: u64,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Creating an eventfd failed.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
}

/// A VM with an in-kernel IOAPIC, per-vCPU LAPICs and a PIT.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    #[cfg(test)]
    memslot_faults: memslot_faults::MemslotFaults,
}

impl Vm {
    /// Creates the VM, its interrupt controllers and PIT. vCPUs are created
    /// afterwards.
    pub fn new(kvm: Kvm) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(VmError::Create)?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(VmError::TssAddress)?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(VmError::TssAddress)?;
        fd.create_irq_chip().map_err(VmError::Irqchip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmError::Pit)?;
        Ok(Self {
            kvm,
            fd,
            #[cfg(test)]
            memslot_faults: memslot_faults::MemslotFaults::default(),
        })
    }

    /// The `/dev/kvm` handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Maps `size` bytes at host address `host` into the guest at `gpa`, in
    /// memory slot `slot` (replacing what the slot held). `size == 0`
    /// deletes the slot.
    ///
    /// # Safety
    /// `host..host + size` must be a mapping that stays valid (not unmapped,
    /// not moved) until this slot is deleted or the VM is destroyed.
    pub unsafe fn set_memslot(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        host: u64,
    ) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
        };
        #[cfg(test)]
        if self.memslot_faults.should_fail(slot, size) {
            return Err(VmError::Memslot {
                slot,
                gpa,
                size,
                source: kvm_ioctls::Error::new(libc::ENOMEM),
            });
        }
        // SAFETY: the caller guarantees the host range outlives the slot.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(|source| VmError::Memslot {
            slot,
            gpa,
            size,
            source,
        })
    }

    /// Deletes memory slot `slot`: the guest loses access to its range once
    /// this returns (KVM makes every vCPU drop its mappings of it).
    pub fn delete_memslot(&self, slot: u32, gpa: u64) -> Result<(), VmError> {
        // SAFETY: a zero-size region maps no host memory.
        unsafe { self.set_memslot(slot, gpa, 0, 0) }
    }

    /// The number of memory slots KVM allows this VM (`KVM_CAP_NR_MEMSLOTS`).
    pub fn memslot_limit(&self) -> usize {
        self.kvm.get_nr_memslots()
    }

    /// Makes `KVM_SET_USER_MEMORY_REGION` calls for which `fail(slot, size)`
    /// is true fail with `ENOMEM` without reaching KVM (unit tests only).
    #[cfg(test)]
    pub(crate) fn inject_memslot_faults(&self, fail: impl Fn(u32, u64) -> bool + Send + 'static) {
        self.memslot_faults.set(Box::new(fail));
    }

    /// Makes a write to `evt` raise GSI `gsi` (edge) in the in-kernel irqchip.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| VmError::Irqfd { gsi, source })
    }

    /// A new eventfd connected to GSI `gsi`.
    pub fn irq_eventfd(&self, gsi: u32) -> Result<EventFd, VmError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        self.register_irqfd(&evt, gsi)?;
        Ok(evt)
    }

    /// Makes a guest write of 4 bytes to MMIO address `addr` signal `evt`
    /// inside KVM, without a userspace exit.
    pub fn register_mmio_ioeventfd(&self, evt: &EventFd, addr: u64) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), kvm_ioctls::NoDatamatch)
            .map_err(|source| VmError::Ioeventfd { addr, source })
    }
}

/// Memory-slot failures injected by unit tests.
#[cfg(test)]
mod memslot_faults {
    use std::sync::Mutex;

    type Predicate = Box<dyn Fn(u32, u64) -> bool + Send>;

    #[derive(Default)]
    pub(super) struct MemslotFaults(Mutex<Option<Predicate>>);

    impl std::fmt::Debug for MemslotFaults {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("MemslotFaults")
        }
    }

    impl MemslotFaults {
        pub(super) fn set(&self, p: Predicate) {
            *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(p);
        }

        pub(super) fn should_fail(&self, slot: u32, size: u64) -> bool {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_ref()
                .is_some_and(|p| p(slot, size))
        }
    }
}
