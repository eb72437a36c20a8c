//! The boot GDT and the segment registers built from it.
//!
//! One table serves every entry protocol:
//!
//! | selector | descriptor                         | used by                                 |
//! |----------|------------------------------------|-----------------------------------------|
//! | 0x00     | null                               |                                         |
//! | 0x08     | 32-bit flat code, DPL 0            | PVH entry (CS)                          |
//! | 0x10     | 64-bit code, DPL 0                 | Linux 64-bit entry (`__BOOT_CS`), tests |
//! | 0x18     | flat data, DPL 0                   | all (`__BOOT_DS`): DS, ES, FS, GS, SS   |
//! | 0x20     | 64-bit TSS (two slots), busy       | TR                                      |
//! | 0x33     | flat data, DPL 3 (index 6, RPL 3)  | test guests at CPL3                     |
//! | 0x3b     | 64-bit code, DPL 3 (index 7, RPL 3)| test guests at CPL3                     |
//!
//! The kernel replaces the table early; until then it only needs the selectors the boot
//! protocols name (0x10/0x18 for Linux; PVH leaves them unspecified).

use kvm_bindings::kvm_segment;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::address_plan::{BOOT_GDT_MAX_ENTRIES, BOOT_GDT_START, BOOT_TSS_SIZE, BOOT_TSS_START};

/// 32-bit flat code segment (PVH).
pub const CODE32_SELECTOR: u16 = 0x08;
/// 64-bit code segment (`__BOOT_CS` of the Linux boot protocol).
pub const CODE64_SELECTOR: u16 = 0x10;
/// Flat data segment (`__BOOT_DS`).
pub const DATA_SELECTOR: u16 = 0x18;
/// The boot TSS.
pub const TSS_SELECTOR: u16 = 0x20;
/// User (CPL3) flat data segment, with RPL 3.
pub const USER_DATA_SELECTOR: u16 = 0x33;
/// User (CPL3) 64-bit code segment, with RPL 3.
pub const USER_CODE64_SELECTOR: u16 = 0x3b;

// Descriptor flags as the kernel's GDT_ENTRY() takes them: bits 15..12 are G, D/B, L,
// AVL; bits 7..0 the access byte (P, DPL, S, type).
const FLAGS_CODE32: u16 = 0xc09b; // G, D; P, DPL0, S, execute/read accessed
const FLAGS_CODE64: u16 = 0xa09b; // G, L; P, DPL0, S, execute/read accessed
const FLAGS_DATA: u16 = 0xc093; // G, B; P, DPL0, S, read/write accessed
const FLAGS_TSS: u16 = 0x008b; // P, DPL0, busy 64-bit TSS
const FLAGS_USER_DATA: u16 = 0xc0f3; // as FLAGS_DATA with DPL3
const FLAGS_USER_CODE64: u16 = 0xa0fb; // as FLAGS_CODE64 with DPL3

/// Errors writing the GDT.
#[derive(Debug, Error)]
pub enum GdtError {
    /// Guest memory does not cover the GDT or TSS area.
    #[error("cannot write the boot GDT or TSS to guest memory")]
    Write(#[source] GuestMemoryError),
}

/// Encodes a (non-system or low half of a system) segment descriptor.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0xffff)
}

/// The boot GDT (see the module documentation), its TSS descriptor pointing at
/// [`BOOT_TSS_START`].
pub fn boot_gdt() -> [u64; BOOT_GDT_MAX_ENTRIES] {
    // BOOT_TSS_START is below 4 GiB, so the high half of the TSS descriptor is zero.
    let tss_low = gdt_entry(FLAGS_TSS, BOOT_TSS_START as u32, (BOOT_TSS_SIZE - 1) as u32);
    [
        0,
        gdt_entry(FLAGS_CODE32, 0, 0xfffff),
        gdt_entry(FLAGS_CODE64, 0, 0xfffff),
        gdt_entry(FLAGS_DATA, 0, 0xfffff),
        tss_low,
        0,
        gdt_entry(FLAGS_USER_DATA, 0, 0xfffff),
        gdt_entry(FLAGS_USER_CODE64, 0, 0xfffff),
    ]
}

/// Writes the boot GDT at [`BOOT_GDT_START`] and a zeroed TSS with `rsp0` at
/// [`BOOT_TSS_START`]; returns the GDT limit for `GDTR`.
pub fn write_boot_gdt<M: GuestMemoryBackend>(mem: &M, rsp0: u64) -> Result<u16, GdtError> {
    let gdt = boot_gdt();
    let bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(BOOT_GDT_START))
        .map_err(GdtError::Write)?;
    // 64-bit TSS: RSP0 at offset 4; the I/O map base (offset 102) points past the
    // segment limit, so there is no I/O permission bitmap.
    let mut tss = [0u8; BOOT_TSS_SIZE as usize];
    tss[4..12].copy_from_slice(&rsp0.to_le_bytes());
    tss[102..104].copy_from_slice(&(BOOT_TSS_SIZE as u16).to_le_bytes());
    mem.write_slice(&tss, GuestAddress(BOOT_TSS_START))
        .map_err(GdtError::Write)?;
    Ok((bytes.len() - 1) as u16)
}

/// The segment register contents KVM needs for the descriptor at `selector` (whose
/// index selects the entry of [`boot_gdt`]). The limit is expanded to bytes when the
/// granularity bit is set, as KVM takes byte limits.
pub fn segment(selector: u16) -> kvm_segment {
    let gdt = boot_gdt();
    let entry = gdt
        .get(usize::from(selector >> 3))
        .copied()
        .unwrap_or_default();
    segment_from_entry(entry, selector)
}

/// Decodes descriptor `entry` into a `kvm_segment` with `selector`.
pub fn segment_from_entry(entry: u64, selector: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let g = bit(55);
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = bit(47);
    kvm_segment {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff),
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[allow(clippy::unwrap_used)]
#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn descriptors_match_known_encodings() {
        // The flat 4 GiB descriptors every x86 OS uses.
        assert_eq!(gdt_entry(0xc09b, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x008b, 0x1234_5678, 0x67), 0x1200_8b34_5678_0067);
    }

    #[test]
    fn linux_boot_selectors_are_64bit_code_and_flat_data() {
        let cs = segment(CODE64_SELECTOR);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.type_, cs.s, cs.dpl, cs.present),
            (0x10, 1, 0, 0xb, 1, 0, 1)
        );
        let ds = segment(DATA_SELECTOR);
        assert_eq!(
            (ds.selector, ds.type_, ds.db, ds.g, ds.limit, ds.base),
            (0x18, 3, 1, 1, 0xffff_ffff, 0)
        );
    }

    #[test]
    fn pvh_code_segment_is_32bit_flat() {
        let cs = segment(CODE32_SELECTOR);
        assert_eq!(
            (cs.l, cs.db, cs.g, cs.limit, cs.base, cs.unusable),
            (0, 1, 1, 0xffff_ffff, 0, 0)
        );
    }

    #[test]
    fn user_segments_have_dpl3_and_rpl3() {
        let cs = segment(USER_CODE64_SELECTOR);
        let ds = segment(USER_DATA_SELECTOR);
        assert_eq!((cs.dpl, cs.l, cs.selector & 3), (3, 1, 3));
        assert_eq!((ds.dpl, ds.type_, ds.selector & 3), (3, 3, 3));
    }

    #[test]
    fn tss_segment_points_at_the_boot_tss() {
        let tr = segment(TSS_SELECTOR);
        assert_eq!(
            (tr.base, tr.limit, tr.type_, tr.s, tr.present),
            (BOOT_TSS_START, 0x67, 0xb, 0, 1)
        );
    }

    #[test]
    fn gdt_and_tss_are_written_where_the_layout_says() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let limit = write_boot_gdt(&mem, 0x8000).unwrap();
        assert_eq!(limit, 63);
        for (i, want) in boot_gdt().iter().enumerate() {
            let got: u64 = mem
                .read_obj(GuestAddress(BOOT_GDT_START + 8 * i as u64))
                .unwrap();
            assert_eq!(got, *want, "entry {i}");
        }
        let rsp0: u64 = mem.read_obj(GuestAddress(BOOT_TSS_START + 4)).unwrap();
        assert_eq!(rsp0, 0x8000);
    }

    #[test]
    fn writing_without_low_memory_fails() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x10_0000), 0x1000)]).unwrap();
        assert!(write_boot_gdt(&mem, 0).is_err());
    }
}
