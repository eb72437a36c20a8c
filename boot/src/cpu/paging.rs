//! Identity page tables for entering long mode: the first
//! [`IDENTITY_MAP_SIZE`](crate::address_plan::IDENTITY_MAP_SIZE) bytes
//! mapped virtual = physical with 2 MiB pages.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::address_plan::{IDENTITY_MAP_PDS, PD_START, PDPT_START, PML4_START};

/// Page-table entry bits.
const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const PAGE_SIZE_2M: u64 = 1 << 7;

/// Who may access the identity-mapped pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageAccess {
    /// Supervisor only (CPL0-2): what a kernel boots with.
    Supervisor,
    /// Also user mode (CPL3): for test guests that drop to user mode.
    User,
}

/// Errors writing the page tables.
#[derive(Debug, Error)]
pub enum PagingError {
    /// Guest memory does not cover the page-table area.
    #[error("cannot write the boot page tables to guest memory")]
    Write(#[source] GuestMemoryError),
}

/// Each table's address and entries: PML4, PDPT, then the page directories.
fn tables(access: PageAccess) -> Vec<(u64, [u64; 512])> {
    let flags = PRESENT
        | WRITABLE
        | match access {
            PageAccess::Supervisor => 0,
            PageAccess::User => USER,
        };
    let mut pml4 = [0u64; 512];
    pml4[0] = PDPT_START | flags;
    let mut pdpt = [0u64; 512];
    let mut out = vec![(PML4_START, pml4)];
    let mut pds = Vec::new();
    for (gib, slot) in pdpt.iter_mut().enumerate().take(IDENTITY_MAP_PDS as usize) {
        let pd_addr = PD_START + gib as u64 * 0x1000;
        *slot = pd_addr | flags;
        let mut pd = [0u64; 512];
        for (i, e) in pd.iter_mut().enumerate() {
            *e = ((gib as u64) << 30 | (i as u64) << 21) | flags | PAGE_SIZE_2M;
        }
        pds.push((pd_addr, pd));
    }
    out.push((PDPT_START, pdpt));
    out.extend(pds);
    out
}

/// Writes the identity page tables and returns the value for CR3.
pub fn write_identity_page_tables<M: GuestMemoryBackend>(
    mem: &M,
    access: PageAccess,
) -> Result<u64, PagingError> {
    for (addr, table) in tables(access) {
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(PagingError::Write)?;
    }
    Ok(PML4_START)
}

#[allow(clippy::unwrap_used)]
#[cfg(test)]
mod tests {
    use super::*;
    use crate::address_plan::IDENTITY_MAP_SIZE;
    use vm_memory::GuestMemoryMmap;

    /// Walks the tables in `mem` like the MMU does for a 2 MiB-page mapping.
    fn translate(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<(u64, bool)> {
        let read = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        let mask = 0x000f_ffff_ffff_f000;
        let pml4e = read(cr3 + ((va >> 39) & 0x1ff) * 8);
        let pdpte = read((pml4e & mask) + ((va >> 30) & 0x1ff) * 8);
        let pde = read((pdpte & mask) + ((va >> 21) & 0x1ff) * 8);
        let present = pml4e & pdpte & pde & PRESENT != 0;
        let user = pml4e & pdpte & pde & USER != 0;
        assert!(!present || pde & PAGE_SIZE_2M != 0);
        present.then_some(((pde & 0x000f_ffff_ffe0_0000) | (va & 0x1f_ffff), user))
    }

    fn low_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn first_4gib_is_identity_mapped() {
        let mem = low_mem();
        let cr3 = write_identity_page_tables(&mem, PageAccess::Supervisor).unwrap();
        assert_eq!(cr3, PML4_START);
        for va in [
            0,
            0x1000,
            0x10_0200,
            0x3fff_ffff,
            0x4000_0000,
            0xd000_1234,
            0xfee0_0000,
            IDENTITY_MAP_SIZE - 1,
        ] {
            assert_eq!(translate(&mem, cr3, va), Some((va, false)), "{va:#x}");
        }
        assert_eq!(translate(&mem, cr3, IDENTITY_MAP_SIZE), None);
    }

    #[test]
    fn user_access_sets_the_user_bit_at_every_level() {
        let mem = low_mem();
        let cr3 = write_identity_page_tables(&mem, PageAccess::User).unwrap();
        assert_eq!(translate(&mem, cr3, 0x12_3456), Some((0x12_3456, true)));
    }

    #[test]
    fn writing_without_low_memory_fails() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x9000)]).unwrap();
        assert!(write_identity_page_tables(&mem, PageAccess::Supervisor).is_err());
    }
}
