//! Translating a guest linear address to a guest-physical one by walking the
//! guest's page tables, as the CPU would (4- and 5-level long mode, 32-bit
//! PAE, 32-bit, or paging off). Used to show the instruction bytes at a
//! failing RIP; it never writes guest memory.

use kvm_bindings::kvm_sregs;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const PRESENT: u64 = 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;
/// Physical-address bits 12..51 of a 64-bit entry.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Why a linear address could not be translated.
#[derive(Debug, Error, PartialEq, Eq)]
pub(crate) enum WalkError {
    /// A page-table entry on the way is not present.
    #[error(
        "linear address {linear:#x} is not mapped (level {level} entry {entry:#x} not present)"
    )]
    NotPresent {
        /// The address.
        linear: u64,
        /// Paging level (4 = PML4, 1 = PTE).
        level: u32,
        /// The entry.
        entry: u64,
    },
    /// A page-table entry lies outside guest memory.
    #[error("page table at {gpa:#x} is outside guest memory")]
    TableOutsideMemory {
        /// Where the entry should be.
        gpa: u64,
    },
}

fn read_u64(mem: &GuestMemoryMmap, gpa: u64) -> Result<u64, WalkError> {
    mem.read_obj::<u64>(GuestAddress(gpa))
        .map_err(|_| WalkError::TableOutsideMemory { gpa })
}

fn read_u32(mem: &GuestMemoryMmap, gpa: u64) -> Result<u64, WalkError> {
    mem.read_obj::<u32>(GuestAddress(gpa))
        .map(u64::from)
        .map_err(|_| WalkError::TableOutsideMemory { gpa })
}

/// Translates `linear` with the paging state in `sregs`.
pub(crate) fn translate(
    mem: &GuestMemoryMmap,
    sregs: &kvm_sregs,
    linear: u64,
) -> Result<u64, WalkError> {
    if sregs.cr0 & CR0_PG == 0 {
        return Ok(if sregs.efer & EFER_LMA != 0 {
            linear
        } else {
            linear & 0xffff_ffff
        });
    }
    if sregs.efer & EFER_LMA != 0 {
        let levels = if sregs.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
        walk64(mem, sregs.cr3 & ADDR_MASK, linear, levels)
    } else if sregs.cr4 & CR4_PAE != 0 {
        // 32-bit PAE: a 4-entry PDPT, then 2-level 64-bit entries.
        let linear = linear & 0xffff_ffff;
        let pdpt = (sregs.cr3 & 0xffff_ffe0) + ((linear >> 30) & 3) * 8;
        let pdpte = read_u64(mem, pdpt)?;
        if pdpte & PRESENT == 0 {
            return Err(WalkError::NotPresent {
                linear,
                level: 3,
                entry: pdpte,
            });
        }
        walk64(mem, pdpte & ADDR_MASK, linear, 2)
    } else {
        let linear = linear & 0xffff_ffff;
        let pde_addr = (sregs.cr3 & 0xffff_f000) + ((linear >> 22) & 0x3ff) * 4;
        let pde = read_u32(mem, pde_addr)?;
        if pde & PRESENT == 0 {
            return Err(WalkError::NotPresent {
                linear,
                level: 2,
                entry: pde,
            });
        }
        if pde & PAGE_SIZE_BIT != 0 && sregs.cr4 & CR4_PSE != 0 {
            // 4 MiB page; bits 13..20 hold physical bits 32..39.
            let base = (pde & 0xffc0_0000) | ((pde >> 13) & 0xff) << 32;
            return Ok(base | (linear & 0x3f_ffff));
        }
        let pte_addr = (pde & 0xffff_f000) + ((linear >> 12) & 0x3ff) * 4;
        let pte = read_u32(mem, pte_addr)?;
        if pte & PRESENT == 0 {
            return Err(WalkError::NotPresent {
                linear,
                level: 1,
                entry: pte,
            });
        }
        Ok((pte & 0xffff_f000) | (linear & 0xfff))
    }
}

/// Walks `levels` levels of 64-bit entries (9 index bits each) from `table`.
fn walk64(
    mem: &GuestMemoryMmap,
    mut table: u64,
    linear: u64,
    levels: u32,
) -> Result<u64, WalkError> {
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (level - 1);
        let entry_addr = table + ((linear >> shift) & 0x1ff) * 8;
        let entry = read_u64(mem, entry_addr)?;
        if entry & PRESENT == 0 {
            return Err(WalkError::NotPresent {
                linear,
                level,
                entry,
            });
        }
        // Large pages at the 1 GiB and 2 MiB levels.
        if level <= 3 && level > 1 && entry & PAGE_SIZE_BIT != 0 {
            let page_mask = (1u64 << shift) - 1;
            return Ok((entry & ADDR_MASK & !page_mask) | (linear & page_mask));
        }
        table = entry & ADDR_MASK;
    }
    Ok(table | (linear & 0xfff))
}

/// Reads up to `buf.len()` bytes at linear address `linear`, translating
/// page by page; returns how many could be read (stops at the first
/// unmapped page).
pub(crate) fn read_linear(
    mem: &GuestMemoryMmap,
    sregs: &kvm_sregs,
    linear: u64,
    buf: &mut [u8],
) -> usize {
    let mut done = 0;
    while done < buf.len() {
        let addr = linear.wrapping_add(done as u64);
        let Ok(gpa) = translate(mem, sregs, addr) else {
            break;
        };
        let in_page = (4096 - (addr & 0xfff)) as usize;
        let n = in_page.min(buf.len() - done);
        if mem
            .read_slice(&mut buf[done..done + n], GuestAddress(gpa))
            .is_err()
        {
            break;
        }
        done += n;
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    fn long_mode(cr3: u64) -> kvm_sregs {
        kvm_sregs {
            cr0: CR0_PG | 1,
            cr3,
            cr4: CR4_PAE,
            efer: EFER_LMA | (1 << 8),
            ..Default::default()
        }
    }

    #[test]
    fn walks_four_levels_with_4k_and_2m_pages() {
        let m = mem();
        // PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000.
        let linear: u64 = 0xffff_8000_0020_1234;
        let i4 = (linear >> 39) & 0x1ff;
        let i3 = (linear >> 30) & 0x1ff;
        let i2 = (linear >> 21) & 0x1ff;
        let i1 = (linear >> 12) & 0x1ff;
        m.write_obj(0x2000u64 | 3, GuestAddress(0x1000 + i4 * 8))
            .unwrap();
        m.write_obj(0x3000u64 | 3, GuestAddress(0x2000 + i3 * 8))
            .unwrap();
        m.write_obj(0x4000u64 | 3, GuestAddress(0x3000 + i2 * 8))
            .unwrap();
        m.write_obj(0x0050_0000u64 | 3, GuestAddress(0x4000 + i1 * 8))
            .unwrap();
        assert_eq!(translate(&m, &long_mode(0x1000), linear), Ok(0x0050_0234));

        // A 2 MiB page for the next PD entry.
        let l2 = linear + (2 << 20);
        m.write_obj(
            0x0060_0000u64 | 3 | PAGE_SIZE_BIT,
            GuestAddress(0x3000 + (i2 + 1) * 8),
        )
        .unwrap();
        assert_eq!(
            translate(&m, &long_mode(0x1000), l2),
            Ok(0x0060_0000 | (l2 & 0x1f_ffff))
        );

        let unmapped = linear + (1 << 30);
        assert!(matches!(
            translate(&m, &long_mode(0x1000), unmapped),
            Err(WalkError::NotPresent { level: 3, .. })
        ));
    }

    #[test]
    fn paging_off_is_identity_and_bad_tables_are_errors() {
        let m = mem();
        let s = kvm_sregs::default();
        assert_eq!(translate(&m, &s, 0x1_0000_1234), Ok(0x1234));
        let bad = long_mode(0xffff_f000_0000);
        assert!(matches!(
            translate(&m, &bad, 0x1000),
            Err(WalkError::TableOutsideMemory { .. })
        ));
    }

    #[test]
    fn reads_bytes_across_pages() {
        let m = mem();
        let s = kvm_sregs::default();
        m.write_slice(&[1, 2, 3, 4], GuestAddress(0xffe)).unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(read_linear(&m, &s, 0xffe, &mut buf), 4);
        assert_eq!(buf, [1, 2, 3, 4]);
        let mut buf = [0u8; 8];
        assert_eq!(read_linear(&m, &s, (16 << 20) - 4, &mut buf), 4);
    }

    #[test]
    fn walks_32bit_tables() {
        let m = mem();
        let s = kvm_sregs {
            cr0: CR0_PG | 1,
            cr3: 0x1000,
            cr4: CR4_PSE,
            ..Default::default()
        };
        // 4 MiB page for linear 0xc0000000.
        m.write_obj(
            0x0080_0000u32 | 0x83,
            GuestAddress(0x1000 + (0xc00 >> 2) * 4),
        )
        .unwrap();
        assert_eq!(translate(&m, &s, 0xc012_3456), Ok(0x0080_0000 | 0x12_3456));
    }
}
