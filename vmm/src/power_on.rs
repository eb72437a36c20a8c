//! The machine's power-on image: guest RAM as it was loaded and the
//! in-kernel interrupt controllers and PIT as they were before the first
//! `KVM_RUN`, kept so that a reset (`--on-reset restart`) reboots the guest
//! in place.
//!
//! RAM: every page resident right after loading (the kernel, initrd,
//! command line, boot parameters, ACPI and MP tables, boot page tables, or
//! a test's own code) is copied aside; nothing else was written. A reset
//! discards all of guest RAM (`MADV_DONTNEED` on the private anonymous
//! mapping: the host gets the pages back and the guest reads zeros) and
//! copies the loaded pages back, as QEMU's reset copies its ROM blobs (the
//! kernel and initrd it loaded once) back into RAM. The same mapping and
//! KVM memory slots stay: no mapping or descriptor is created by a reset.
//!
//! What this cannot see: a loaded page that the host swapped out between
//! loading and capturing (milliseconds, before the guest ran) is not
//! resident and would be missed.
//!
//! vCPU state is captured per vCPU ([`crate::kvm::vcpu_state`]).

use crate::kvm::vm::Vm;
use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_irqchip, kvm_pit_state2,
};
use thiserror::Error;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

/// Errors capturing or restoring the power-on image.
#[derive(Debug, Error)]
pub enum PowerOnError {
    /// An interrupt controller or PIT ioctl failed.
    #[error("{what} failed")]
    Kvm {
        /// Which ioctl.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest RAM could not be inspected, discarded or written.
    #[error("cannot {what} guest RAM at {gpa:#x}")]
    Ram {
        /// What was being done.
        what: &'static str,
        /// Guest address.
        gpa: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A RAM region of the image is not in the guest memory map.
    #[error("guest RAM at {gpa:#x} is not in the memory map")]
    Missing {
        /// Guest address.
        gpa: u64,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> PowerOnError {
    move |source| PowerOnError::Kvm { what, source }
}

/// What RAM, the PICs, the IOAPIC and the PIT held before the first run.
pub(crate) struct PowerOnImage {
    /// `(start, length)` of each RAM region.
    ram: Vec<(u64, u64)>,
    /// Runs of loaded pages: guest address and contents.
    loaded: Vec<(u64, Vec<u8>)>,
    irqchips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
}

impl std::fmt::Debug for PowerOnImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PowerOnImage")
            .field("ram", &self.ram)
            .field("loaded_bytes", &self.loaded_bytes())
            .finish_non_exhaustive()
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// Runs `(first page, pages)` of `region` resident in host RAM.
fn resident_runs(region: &GuestRegionMmap) -> Result<Vec<(usize, usize)>, PowerOnError> {
    let page = page_size() as usize;
    let len = region.len() as usize;
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: the range is a live mapping owned by `region` and `vec` has
    // one byte per page of it, as mincore requires.
    let rc = unsafe { libc::mincore(region.as_ptr().cast(), len, vec.as_mut_ptr()) };
    if rc != 0 {
        return Err(PowerOnError::Ram {
            what: "inspect",
            gpa: region.start_addr().0,
            source: std::io::Error::last_os_error(),
        });
    }
    let mut runs = Vec::new();
    let mut i = 0;
    while i < vec.len() {
        if vec[i] & 1 == 0 {
            i += 1;
            continue;
        }
        let first = i;
        while i < vec.len() && vec[i] & 1 != 0 {
            i += 1;
        }
        runs.push((first, i - first));
    }
    Ok(runs)
}

/// `madvise(MADV_DONTNEED)` over the whole of `region`: a private
/// anonymous mapping then reads as zeros and holds no host memory.
fn discard(region: &GuestRegionMmap) -> Result<(), PowerOnError> {
    // The region is a live private anonymous mapping; no vCPU runs.
    crate::memory::guest_memory::discard_range(region.as_ptr(), region.len() as usize).map_err(
        |source| PowerOnError::Ram {
            what: "discard",
            gpa: region.start_addr().0,
            source,
        },
    )
}

impl PowerOnImage {
    /// Captures the image of `vm` whose RAM is `ram` (the boot map, without
    /// hot-plugged memory). Call it once everything is loaded, before any
    /// vCPU runs.
    pub(crate) fn capture(vm: &Vm, ram: &GuestMemoryMmap) -> Result<Self, PowerOnError> {
        let page = page_size() as usize;
        let mut loaded = Vec::new();
        let mut regions = Vec::new();
        for region in ram.iter() {
            let start = region.start_addr().0;
            regions.push((start, region.len()));
            for (first, pages) in resident_runs(region)? {
                let gpa = start + (first * page) as u64;
                let mut buf = vec![0u8; pages * page];
                ram.read_slice(&mut buf, GuestAddress(gpa))
                    .map_err(|e| PowerOnError::Ram {
                        what: "copy",
                        gpa,
                        source: std::io::Error::other(e.to_string()),
                    })?;
                loaded.push((gpa, buf));
            }
        }
        let mut irqchips = Vec::with_capacity(3);
        for chip_id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.fd()
                .get_irqchip(&mut chip)
                .map_err(kvm("KVM_GET_IRQCHIP"))?;
            irqchips.push(chip);
        }
        let pit = vm.fd().get_pit2().map_err(kvm("KVM_GET_PIT2"))?;
        Ok(Self {
            ram: regions,
            loaded,
            irqchips,
            pit,
        })
    }

    /// Bytes of loaded RAM kept (host memory this image costs).
    pub(crate) fn loaded_bytes(&self) -> u64 {
        self.loaded.iter().map(|(_, b)| b.len() as u64).sum()
    }

    /// Puts the PICs, IOAPIC and PIT back. Control thread, no vCPU running.
    pub(crate) fn restore_interrupt_controllers(&self, vm: &Vm) -> Result<(), PowerOnError> {
        for chip in &self.irqchips {
            vm.fd().set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        vm.fd().set_pit2(&self.pit).map_err(kvm("KVM_SET_PIT2"))
    }

    /// Discards all of guest RAM in `mem` (the regions captured) and
    /// writes the loaded pages back. Control thread, no vCPU running and
    /// no device using guest memory.
    pub(crate) fn restore_ram(&self, mem: &GuestMemoryMmap) -> Result<(), PowerOnError> {
        for &(gpa, len) in &self.ram {
            let region = mem
                .find_region(GuestAddress(gpa))
                .filter(|r| r.start_addr().0 == gpa && r.len() == len)
                .ok_or(PowerOnError::Missing { gpa })?;
            discard(region)?;
        }
        for (gpa, bytes) in &self.loaded {
            mem.write_slice(bytes, GuestAddress(*gpa))
                .map_err(|e| PowerOnError::Ram {
                    what: "write",
                    gpa: *gpa,
                    source: std::io::Error::other(e.to_string()),
                })?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// What a reset leaves in RAM: the pages loaded before capture, with
    /// their loaded contents; everything the guest wrote since reads zero
    /// and no longer holds host memory.
    #[test]
    fn restore_ram_brings_back_the_loaded_pages_and_zeroes_the_rest() {
        let vm = Vm::new(crate::kvm::dev_kvm::open(1).unwrap()).unwrap();
        let (mem, _ram) =
            crate::memory::guest_memory::map_ram(&[(GuestAddress(0), 64 << 20)]).unwrap();
        mem.write_slice(b"kernel", GuestAddress(0x10_0000)).unwrap();
        let image = PowerOnImage::capture(&vm, &mem).unwrap();
        assert!(image.loaded_bytes() >= page_size());
        // The "guest" changes the loaded page and writes elsewhere.
        mem.write_slice(b"KERNEL", GuestAddress(0x10_0000)).unwrap();
        mem.write_slice(&[0xaa; 4096 * 16], GuestAddress(0x200_0000))
            .unwrap();
        let resident_before = crate::memory::guest_memory::resident_bytes(&mem);
        image.restore_ram(&mem).unwrap();
        // Before reading the discarded range (a read maps the zero page,
        // which mincore counts as resident).
        let resident_after = crate::memory::guest_memory::resident_bytes(&mem);
        let mut back = [0u8; 6];
        mem.read_slice(&mut back, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(&back, b"kernel");
        let mut other = vec![0xffu8; 4096 * 16];
        mem.read_slice(&mut other, GuestAddress(0x200_0000))
            .unwrap();
        assert!(other.iter().all(|&b| b == 0), "guest writes are gone");
        assert!(
            resident_after < resident_before,
            "discarded pages went back to the host: {resident_after} >= {resident_before}"
        );
        image.restore_interrupt_controllers(&vm).unwrap();
    }
}
