//! The Intel MultiProcessor Specification 1.4 table.
//!
//! ACPI's MADT is what Linux uses for SMP here, but Linux looks for an MP
//! table first, and when there is none it scans the whole 64 KiB BIOS area
//! 16 bytes at a time, remapping the area for every step; where KVM
//! emulates guest kernel code that scan alone costs seconds of boot. A table
//! at the start of the EBDA (the second place Linux looks) ends the search
//! at once, and gives guests booted with `acpi=off` a working SMP
//! description.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::address_plan::{EBDA_START, IOAPIC_PINS, IOAPIC_START, LAPIC_START};

/// Where the floating pointer goes: the start of the EBDA.
pub const MPTABLE_START: u64 = EBDA_START;
/// The highest address the table may reach (the ACPI area starts there).
const MPTABLE_LIMIT: u64 = crate::address_plan::ACPI_START;

const MPF_SIZE: usize = 16;
const MPC_HEADER_SIZE: usize = 44;
const PROCESSOR_SIZE: usize = 20;
const SMALL_ENTRY_SIZE: usize = 8;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINT: u8 = 3;
const ENTRY_LOCALINT: u8 = 4;

const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

/// Errors building the table.
#[derive(Debug, Error)]
pub enum MptableError {
    /// Zero or more vCPUs than 8-bit APIC IDs (with one left for the
    /// IOAPIC) can name.
    #[error("cannot describe {0} vCPUs in an MP table (1..=254)")]
    CpuCount(u32),
    /// The table does not fit below the ACPI area.
    #[error("MP table of {0} bytes does not fit below the ACPI tables")]
    TooBig(usize),
    /// Guest memory could not be written.
    #[error("cannot write the MP table to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_sub(*b))
}

/// Builds the floating pointer and configuration table for `num_cpus`
/// vCPUs (APIC IDs 0..num_cpus, the IOAPIC gets ID `num_cpus`), as bytes
/// to place at [`MPTABLE_START`].
pub fn build_mptable(num_cpus: u32) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > 254 {
        return Err(MptableError::CpuCount(num_cpus));
    }
    let ioapic_id = num_cpus as u8; // <= 254, checked above
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let mut e = [0u8; PROCESSOR_SIZE];
        e[0] = ENTRY_PROCESSOR;
        e[1] = cpu as u8;
        e[2] = APIC_VERSION;
        e[3] = CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 };
        e[4..8].copy_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        e[8..12].copy_from_slice(&0x201u32.to_le_bytes()); // FPU | APIC
        entries.extend_from_slice(&e);
        count += 1;
    }
    // One ISA bus.
    entries.extend_from_slice(&[ENTRY_BUS, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    let mut ioapic = [0u8; SMALL_ENTRY_SIZE];
    ioapic[0] = ENTRY_IOAPIC;
    ioapic[1] = ioapic_id;
    ioapic[2] = IOAPIC_VERSION;
    ioapic[3] = 1; // enabled
    ioapic[4..8].copy_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entries.extend_from_slice(&ioapic);
    count += 1;
    // ISA IRQ i goes to IOAPIC pin i (IRQ 0 as ExtINT, as on PCs), every
    // pin identity-mapped, as Linux expects of KVM's in-kernel irqchip.
    for irq in 0..IOAPIC_PINS as u8 {
        let kind = if irq == 0 {
            INT_TYPE_EXTINT
        } else {
            INT_TYPE_INT
        };
        entries.extend_from_slice(&[ENTRY_IOINT, kind, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 ExtINT and LINT1 NMI on every local APIC.
    entries.extend_from_slice(&[ENTRY_LOCALINT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCALINT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = MPC_HEADER_SIZE + entries.len();
    let total = MPF_SIZE + table_len;
    if MPTABLE_START + total as u64 > MPTABLE_LIMIT {
        return Err(MptableError::TooBig(total));
    }
    let mut header = [0u8; MPC_HEADER_SIZE];
    header[0..4].copy_from_slice(b"PCMP");
    header[4..6].copy_from_slice(&(table_len as u16).to_le_bytes());
    header[6] = 4; // spec revision 1.4
    header[8..16].copy_from_slice(b"RCUVMM  ");
    header[16..28].copy_from_slice(b"MICROVM     ");
    header[34..36].copy_from_slice(&count.to_le_bytes());
    header[36..40].copy_from_slice(&(LAPIC_START as u32).to_le_bytes());
    let mut table = header.to_vec();
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = [0u8; MPF_SIZE];
    mpf[0..4].copy_from_slice(b"_MP_");
    let physptr = (MPTABLE_START + MPF_SIZE as u64) as u32;
    mpf[4..8].copy_from_slice(&physptr.to_le_bytes());
    mpf[8] = 1; // length in 16-byte units
    mpf[9] = 4; // spec revision 1.4
    mpf[10] = checksum(&mpf);

    let mut out = mpf.to_vec();
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `num_cpus` vCPUs into guest memory.
pub fn write_mptable<M: GuestMemoryBackend>(mem: &M, num_cpus: u32) -> Result<(), MptableError> {
    let bytes = build_mptable(num_cpus)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_layout_are_valid() {
        for cpus in [1u32, 2, 8, 254] {
            let t = build_mptable(cpus).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let physptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(physptr, MPTABLE_START + 16);
            let table = &t[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes(table[4..6].try_into().unwrap()) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "configuration table checksum");
            let count = u16::from_le_bytes(table[34..36].try_into().unwrap()) as u32;
            assert_eq!(count, cpus + 1 + 1 + IOAPIC_PINS + 2);
            // The BSP flag only on CPU 0.
            assert_eq!(table[44 + 3], CPU_ENABLED | CPU_BSP);
            if cpus > 1 {
                assert_eq!(table[44 + 20 + 3], CPU_ENABLED);
            }
        }
    }

    #[test]
    fn rejects_impossible_cpu_counts() {
        assert!(matches!(build_mptable(0), Err(MptableError::CpuCount(0))));
        assert!(matches!(
            build_mptable(255),
            Err(MptableError::CpuCount(255))
        ));
    }
}
