//! Guest RAM: creating the mappings, registering them with KVM, and the
//! RCU-published map every reader of guest memory goes through.
//!
//! The map is an immutable `GuestMemoryMmap` held in an [`rcu::RcuCell`].
//! vCPU threads, device emulation and the control thread read it inside RCU
//! read sections; the memory manager (hot-plug) replaces it copy-on-write.
//! A replaced map, and any region only it still referenced, is dropped (and
//! so unmapped) on the call_rcu thread after a grace period.

use crate::vm::{Vm, VmError};
use rcu::RcuCell;
use std::sync::Arc;
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The published guest memory map.
pub type SharedMemory = Arc<RcuCell<GuestMemoryMmap>>;

/// Label under which replacements of the map are counted in RCU statistics.
pub const MEMORY_MAP_LABEL: &str = "memory map replace";

/// Errors creating guest RAM.
#[derive(Debug, Error)]
pub enum GuestMemoryError {
    /// The host refused the mapping.
    #[error("cannot map {size:#x} bytes of guest RAM at {gpa:#x}")]
    Map {
        /// Where.
        gpa: u64,
        /// How much.
        size: usize,
        /// Why.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// A region could not be given to KVM.
    #[error("cannot register guest RAM with KVM")]
    Register(#[source] VmError),
    /// vm-memory rejected the region list.
    #[error("invalid guest RAM layout")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
}

/// Maps guest RAM for `ranges` (anonymous, private, lazily allocated), and
/// registers each range as a KVM memory slot numbered from 0. Returns the
/// map and the number of slots used.
pub fn create_ram(
    vm: &Vm,
    ranges: &[(GuestAddress, usize)],
) -> Result<(GuestMemoryMmap, u32), GuestMemoryError> {
    let mut regions = Vec::with_capacity(ranges.len());
    for &(gpa, size) in ranges {
        let r = vm_memory::GuestRegionMmap::from_range(gpa, size, None).map_err(|source| {
            GuestMemoryError::Map {
                gpa: gpa.0,
                size,
                source,
            }
        })?;
        regions.push(r);
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(GuestMemoryError::Layout)?;
    let mut slot = 0u32;
    for region in mem.iter() {
        let host = region.as_ptr() as u64;
        // SAFETY: the mapping belongs to a region of `mem`; the VMM keeps
        // every region referenced by the published map (or by the memory
        // manager) for as long as its slot exists, and deletes hot-plug slots
        // before dropping their regions.
        unsafe { vm.set_memslot(slot, region.start_addr().0, region.len(), host) }
            .map_err(GuestMemoryError::Register)?;
        slot += 1;
    }
    Ok((mem, slot))
}

/// Bytes of `mem` that are resident in host RAM (pages the guest touched).
pub fn resident_bytes(mem: &GuestMemoryMmap) -> u64 {
    // SAFETY: sysconf has no memory effects.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let mut total = 0;
    for region in mem.iter() {
        let len = region.len() as usize;
        let pages = len.div_ceil(page as usize);
        let mut vec = vec![0u8; pages];
        // SAFETY: the range is a live mapping of `region` and `vec` has one
        // byte per page of it, as mincore requires.
        let rc = unsafe { libc::mincore(region.as_ptr().cast(), len, vec.as_mut_ptr()) };
        if rc == 0 {
            total += vec.iter().filter(|b| **b & 1 != 0).count() as u64 * page;
        }
    }
    total
}
