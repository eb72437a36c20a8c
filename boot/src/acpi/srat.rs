//! The SRAT (System Resource Affinity Table, ACPI 6.5 §5.2.16): which NUMA node
//! (proximity domain) each vCPU and each memory range belongs to.
//!
//! Built only when the VMM places hot-plug memory in NUMA nodes. As Cloud Hypervisor
//! does for its virtio-mem zones: every vCPU and all boot RAM in node 0, and one
//! Memory Affinity structure per hot-plug region with the Enabled and Hot Pluggable
//! flags, in the region's node. A node that has only hot-plug memory is thereby known
//! to the guest at boot (Linux parses it as a possible node without memory and brings
//! it online when virtio-mem adds memory to it), and the range tells the guest where
//! hot-plug memory may appear (Linux sizes its direct map and SWIOTLB decisions from
//! it, which is why QEMU always lists its device-memory area).

use acpi_tables::sdt::Sdt;

use super::{OEM_ID, OEM_REVISION};
use crate::address_plan::GuestRange;

/// SRAT revision of ACPI 6.x.
const SRAT_REVISION: u8 = 3;
/// Standard header (36) + reserved u32 (must be 1) + reserved u64.
pub(super) const SRAT_HEADER_LEN: u32 = 48;
/// Processor Local APIC/SAPIC Affinity structure: type and length.
const CPU_AFFINITY_TYPE: u8 = 0;
const CPU_AFFINITY_LEN: u8 = 16;
/// Memory Affinity structure: type and length.
const MEMORY_AFFINITY_TYPE: u8 = 1;
const MEMORY_AFFINITY_LEN: u8 = 40;
/// Flags of both structures: the entry is in use.
pub const AFFINITY_ENABLED: u32 = 1 << 0;
/// Memory Affinity flag: the range may be hot-plugged or removed.
pub const MEMORY_HOT_PLUGGABLE: u32 = 1 << 1;

/// NUMA nodes for the SRAT: node 0 holds every vCPU and the boot RAM; hot-plug
/// regions may sit in any node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaAcpi {
    /// Boot RAM ranges (node 0).
    pub ram: Vec<GuestRange>,
    /// Hot-plug regions with their node (ACPI proximity domain).
    pub hotplug: Vec<(GuestRange, u32)>,
}

/// The SRAT for `num_cpus` vCPUs (APIC IDs `0..num_cpus`, checked by the caller to
/// fit 8 bits) and `numa`.
pub(super) fn build(num_cpus: u32, numa: &NumaAcpi) -> Vec<u8> {
    let mut srat = Sdt::new(
        *b"SRAT",
        SRAT_HEADER_LEN,
        SRAT_REVISION,
        OEM_ID,
        *b"MVMMSRAT",
        OEM_REVISION,
    );
    // "Reserved: must be set to 1 for backward compatibility"; then 8 reserved bytes.
    srat.write_u32(36, 1);
    let mut body = Vec::new();
    for cpu in 0..num_cpus {
        body.extend_from_slice(&cpu_affinity(cpu as u8, 0));
    }
    for r in &numa.ram {
        body.extend_from_slice(&memory_affinity(*r, 0, AFFINITY_ENABLED));
    }
    for (r, node) in &numa.hotplug {
        body.extend_from_slice(&memory_affinity(
            *r,
            *node,
            AFFINITY_ENABLED | MEMORY_HOT_PLUGGABLE,
        ));
    }
    srat.append_slice(&body);
    srat.as_slice().to_vec()
}

/// A Processor Local APIC/SAPIC Affinity structure: APIC `apic_id` is in `node`.
fn cpu_affinity(apic_id: u8, node: u32) -> [u8; CPU_AFFINITY_LEN as usize] {
    let d = node.to_le_bytes();
    let mut s = [0u8; CPU_AFFINITY_LEN as usize];
    s[0] = CPU_AFFINITY_TYPE;
    s[1] = CPU_AFFINITY_LEN;
    s[2] = d[0]; // proximity domain [7:0]
    s[3] = apic_id;
    s[4..8].copy_from_slice(&AFFINITY_ENABLED.to_le_bytes());
    s[8] = 0; // local SAPIC EID
    s[9..12].copy_from_slice(&d[1..4]); // proximity domain [31:8]
    // 12..16: clock domain 0.
    s
}

/// A Memory Affinity structure: `range` is in `node`.
fn memory_affinity(range: GuestRange, node: u32, flags: u32) -> [u8; MEMORY_AFFINITY_LEN as usize] {
    let mut s = [0u8; MEMORY_AFFINITY_LEN as usize];
    s[0] = MEMORY_AFFINITY_TYPE;
    s[1] = MEMORY_AFFINITY_LEN;
    s[2..6].copy_from_slice(&node.to_le_bytes());
    // 6..8 reserved.
    s[8..16].copy_from_slice(&range.start.to_le_bytes()); // base low, base high
    s[16..24].copy_from_slice(&range.size.to_le_bytes()); // length low, length high
    // 24..28 reserved.
    s[28..32].copy_from_slice(&flags.to_le_bytes());
    // 32..40 reserved.
    s
}

#[allow(clippy::unwrap_used)]
#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi::tests::{sum, u32_at, u64_at};

    const GIB: u64 = 1 << 30;

    #[test]
    fn srat_layout_follows_the_spec() {
        let numa = NumaAcpi {
            ram: vec![
                GuestRange {
                    start: 0,
                    size: 3 * GIB,
                },
                GuestRange {
                    start: 4 * GIB,
                    size: GIB,
                },
            ],
            hotplug: vec![
                (
                    GuestRange {
                        start: 5 * GIB,
                        size: 2 * GIB,
                    },
                    1,
                ),
                (
                    GuestRange {
                        start: 7 * GIB,
                        size: GIB,
                    },
                    0x0102_0304,
                ),
            ],
        };
        let t = build(2, &numa);
        // Header: signature, length, revision, checksum over the whole table.
        assert_eq!(&t[0..4], b"SRAT");
        // 48-byte header, 2 CPU structures of 16 bytes, 4 memory structures of 40.
        let len = 48 + 2 * 16 + 4 * 40;
        assert_eq!(u32_at(&t, 4) as usize, len);
        assert_eq!(t.len(), len);
        assert_eq!(t[8], 3, "revision");
        assert_eq!(sum(&t), 0, "checksum");
        assert_eq!(u32_at(&t, 36), 1, "reserved, must be 1");
        assert_eq!(u64_at(&t, 40), 0, "reserved");
        // Processor Local APIC Affinity: type 0, length 16, domain 0, APIC ID, enabled.
        for cpu in 0..2usize {
            let s = &t[48 + cpu * 16..48 + (cpu + 1) * 16];
            assert_eq!((s[0], s[1], s[2], s[3]), (0, 16, 0, cpu as u8));
            assert_eq!(u32_at(s, 4), 1, "enabled");
            assert_eq!(&s[9..12], &[0, 0, 0], "domain [31:8]");
        }
        // Memory Affinity: type 1, length 40, domain, base, length, flags.
        let mem = |i: usize| &t[80 + i * 40..80 + (i + 1) * 40];
        let expect = [
            (0u32, 0u64, 3 * GIB, 0b01u32),
            (0, 4 * GIB, GIB, 0b01),
            (1, 5 * GIB, 2 * GIB, 0b11),
            (0x0102_0304, 7 * GIB, GIB, 0b11),
        ];
        for (i, (node, base, size, flags)) in expect.into_iter().enumerate() {
            let s = mem(i);
            assert_eq!((s[0], s[1]), (1, 40), "entry {i}");
            assert_eq!(u32_at(s, 2), node, "entry {i} domain");
            assert_eq!(u32_at(s, 8), base as u32, "entry {i} base low");
            assert_eq!(u32_at(s, 12), (base >> 32) as u32, "entry {i} base high");
            assert_eq!(u32_at(s, 16), size as u32, "entry {i} length low");
            assert_eq!(u32_at(s, 20), (size >> 32) as u32, "entry {i} length high");
            assert_eq!(u32_at(s, 28), flags, "entry {i} flags");
            assert!(
                s[6..8]
                    .iter()
                    .chain(&s[24..28])
                    .chain(&s[32..40])
                    .all(|b| *b == 0)
            );
        }
    }
}
