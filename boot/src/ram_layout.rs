//! Where a VM's RAM goes, and the E820 map that tells the guest.
//!
//! RAM of `ram_size` bytes is split around the 32-bit MMIO hole: up to 3 GiB from
//! address 0, the rest from 4 GiB. The guest's E820 map marks RAM below the EBDA and
//! from 1 MiB as usable, the EBDA/legacy hole as reserved and the ACPI table area as
//! ACPI data. The hot-plug region (if any) is placed above RAM but left out of E820:
//! virtio-mem tells the guest about it.

use thiserror::Error;
use vm_memory::GuestAddress;

use crate::address_plan::{
    self, ACPI_END, ACPI_START, AddressPlanError, EBDA_START, GIB, GuestRange, HIGH_RAM_START, MIB,
    MMIO_HOLE_START, PAGE_SIZE, RAM_64BIT_START,
};

/// Smallest RAM size we accept: room for a kernel above 16 MiB and its initrd.
pub const MIN_RAM_SIZE: u64 = 32 * MIB;
/// Largest RAM size we accept (a sanity bound well inside any host's physical address width).
pub const MAX_RAM_SIZE: u64 = 1024 * GIB;

/// Errors in a requested memory configuration.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RamLayoutError {
    /// RAM size below [`MIN_RAM_SIZE`].
    #[error("memory size {size:#x} is below the minimum of {min:#x} bytes")]
    TooSmall {
        /// Requested size.
        size: u64,
        /// The minimum.
        min: u64,
    },
    /// RAM size above [`MAX_RAM_SIZE`].
    #[error("memory size {size:#x} is above the maximum of {max:#x} bytes")]
    TooLarge {
        /// Requested size.
        size: u64,
        /// The maximum.
        max: u64,
    },
    /// RAM size not a whole number of pages.
    #[error("memory size {size:#x} is not a multiple of 4 KiB")]
    Unaligned {
        /// Requested size.
        size: u64,
    },
    /// The hot-plug region could not be placed.
    #[error("cannot place the hot-plug region")]
    Hotplug(#[source] AddressPlanError),
}

/// The kind of an E820 entry; the discriminant is the value the guest sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    /// Usable RAM.
    Ram = 1,
    /// Reserved: the guest must not use it.
    Reserved = 2,
    /// ACPI tables (usable after the guest parsed them; Linux keeps them).
    Acpi = 3,
}

impl E820Type {
    /// The numeric type of the boot protocol (equal to PVH's `XEN_HVM_MEMMAP_TYPE_*`).
    pub fn raw(self) -> u32 {
        self as u32
    }
}

/// One E820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: E820Type,
}

/// A VM's memory configuration: its RAM ranges, E820 map and hot-plug region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamLayout {
    ram_size: u64,
    ram: Vec<GuestRange>,
    hotplug: Vec<GuestRange>,
}

impl RamLayout {
    /// Lays out `ram_size` bytes of boot RAM and a hot-plug region of `hotplug_size` bytes
    /// (rounded up to 128 MiB; zero for none).
    ///
    /// Fails if `ram_size` is below [`MIN_RAM_SIZE`], above [`MAX_RAM_SIZE`] or not a
    /// multiple of 4 KiB, or if the hot-plug region does not fit the address space.
    pub fn new(ram_size: u64, hotplug_size: u64) -> Result<Self, RamLayoutError> {
        Self::with_hotplug(ram_size, &[hotplug_size])
    }

    /// Lays out `ram_size` bytes of boot RAM and one hot-plug region per entry of
    /// `hotplug_sizes`, in order, one after the other above RAM, each placed and rounded
    /// as [`address_plan::hotplug_region`] does (a size of zero gives no region).
    ///
    /// Fails as [`new`](Self::new) does, or if the regions do not fit the address space.
    pub fn with_hotplug(ram_size: u64, hotplug_sizes: &[u64]) -> Result<Self, RamLayoutError> {
        if ram_size < MIN_RAM_SIZE {
            return Err(RamLayoutError::TooSmall {
                size: ram_size,
                min: MIN_RAM_SIZE,
            });
        }
        if ram_size > MAX_RAM_SIZE {
            return Err(RamLayoutError::TooLarge {
                size: ram_size,
                max: MAX_RAM_SIZE,
            });
        }
        if !ram_size.is_multiple_of(PAGE_SIZE) {
            return Err(RamLayoutError::Unaligned { size: ram_size });
        }
        let low = ram_size.min(MMIO_HOLE_START);
        let mut ram = vec![GuestRange {
            start: 0,
            size: low,
        }];
        if ram_size > low {
            ram.push(GuestRange {
                start: RAM_64BIT_START,
                size: ram_size - low,
            });
        }
        let mut floor = ram.last().map_or(0, GuestRange::end);
        let mut hotplug = Vec::new();
        for &size in hotplug_sizes {
            if let Some(r) =
                address_plan::hotplug_region(floor, size).map_err(RamLayoutError::Hotplug)?
            {
                floor = r.end();
                hotplug.push(r);
            }
        }
        Ok(RamLayout {
            ram_size,
            ram,
            hotplug,
        })
    }

    /// Total boot RAM in bytes.
    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// The RAM ranges, sorted and non-overlapping: one from 0, and one from 4 GiB if RAM
    /// does not fit below the hole. The first includes the legacy hole and ACPI area.
    pub fn ram_ranges(&self) -> &[GuestRange] {
        &self.ram
    }

    /// The RAM ranges in the form `GuestMemoryMmap::from_ranges` takes.
    pub fn mmap_ranges(&self) -> Vec<(GuestAddress, usize)> {
        self.ram
            .iter()
            // Lossless: the crate only builds for 64-bit targets (see lib.rs).
            .map(|r| (GuestAddress(r.start), r.size as usize))
            .collect()
    }

    /// End (exclusive) of the RAM range that starts at 0: the top of "low" RAM, where the
    /// initrd goes.
    pub fn low_ram_end(&self) -> u64 {
        self.ram.first().map_or(0, GuestRange::end)
    }

    /// End (exclusive) of the highest RAM range.
    pub fn ram_end(&self) -> u64 {
        self.ram.last().map_or(0, GuestRange::end)
    }

    /// The (first) hot-plug region, if one was requested.
    pub fn hotplug_region(&self) -> Option<GuestRange> {
        self.hotplug.first().copied()
    }

    /// Every hot-plug region, in the order requested (ascending addresses, disjoint).
    pub fn hotplug_regions(&self) -> &[GuestRange] {
        &self.hotplug
    }

    /// End (exclusive) of the hot-plug address space: the last region's end, or the
    /// end of RAM without hot-plug memory.
    pub fn hotplug_end(&self) -> u64 {
        self.hotplug.last().map_or(self.ram_end(), GuestRange::end)
    }

    /// The E820 map for the guest, sorted by address. The hot-plug region is not in it.
    pub fn e820(&self) -> Vec<E820Entry> {
        let mut map = vec![
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820Type::Ram,
            },
            E820Entry {
                addr: EBDA_START,
                size: ACPI_START - EBDA_START,
                kind: E820Type::Reserved,
            },
            E820Entry {
                addr: ACPI_START,
                size: ACPI_END - ACPI_START,
                kind: E820Type::Acpi,
            },
            E820Entry {
                addr: HIGH_RAM_START,
                size: self.low_ram_end() - HIGH_RAM_START,
                kind: E820Type::Ram,
            },
        ];
        map.extend(self.ram.iter().skip(1).map(|r| E820Entry {
            addr: r.start,
            size: r.size,
            kind: E820Type::Ram,
        }));
        map
    }
}

#[allow(clippy::unwrap_used)]
#[cfg(test)]
mod tests {
    use super::*;

    fn usable(map: &[E820Entry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == E820Type::Ram)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn small_ram_is_one_range_from_zero() {
        let m = RamLayout::new(128 * MIB, 0).unwrap();
        assert_eq!(
            m.ram_ranges(),
            &[GuestRange {
                start: 0,
                size: 128 * MIB
            }]
        );
        assert_eq!(
            m.mmap_ranges(),
            vec![(GuestAddress(0), (128 * MIB) as usize)]
        );
        assert_eq!(m.low_ram_end(), 128 * MIB);
        assert_eq!(m.hotplug_region(), None);
    }

    #[test]
    fn e820_of_small_ram_reserves_legacy_hole_and_acpi() {
        let m = RamLayout::new(128 * MIB, 0).unwrap();
        let e820 = m.e820();
        assert_eq!(
            e820,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9_fc00,
                    kind: E820Type::Ram
                },
                E820Entry {
                    addr: 0x9_fc00,
                    size: 0x4_0400,
                    kind: E820Type::Reserved
                },
                E820Entry {
                    addr: 0xe_0000,
                    size: 0x2_0000,
                    kind: E820Type::Acpi
                },
                E820Entry {
                    addr: 0x10_0000,
                    size: 127 * MIB,
                    kind: E820Type::Ram
                },
            ]
        );
        // Usable RAM = total minus the 384 KiB + 1 KiB of the legacy area.
        assert_eq!(usable(&e820), 128 * MIB - (MIB - 0x9_fc00));
    }

    #[test]
    fn sixteen_gib_is_split_around_the_hole() {
        let m = RamLayout::new(16 * GIB, 4 * GIB).unwrap();
        assert_eq!(
            m.ram_ranges(),
            &[
                GuestRange {
                    start: 0,
                    size: 3 * GIB
                },
                GuestRange {
                    start: 4 * GIB,
                    size: 13 * GIB
                },
            ]
        );
        assert_eq!(m.low_ram_end(), 3 * GIB);
        assert_eq!(m.ram_end(), 17 * GIB);
        let e820 = m.e820();
        assert_eq!(e820.len(), 5);
        assert_eq!(
            e820[3],
            E820Entry {
                addr: MIB,
                size: 3 * GIB - MIB,
                kind: E820Type::Ram
            }
        );
        assert_eq!(
            e820[4],
            E820Entry {
                addr: 4 * GIB,
                size: 13 * GIB,
                kind: E820Type::Ram
            }
        );
        // Nothing is mapped as RAM inside the hole.
        assert!(
            e820.iter()
                .all(|e| e.addr + e.size <= MMIO_HOLE_START || e.addr >= 4 * GIB)
        );
        assert_eq!(
            m.hotplug_region(),
            Some(GuestRange {
                start: 17 * GIB,
                size: 4 * GIB
            })
        );
    }

    #[test]
    fn exactly_three_gib_needs_no_high_range() {
        let m = RamLayout::new(3 * GIB, 0).unwrap();
        assert_eq!(m.ram_ranges().len(), 1);
        assert_eq!(m.e820().len(), 4);
    }

    #[test]
    fn several_hotplug_regions_follow_each_other_block_aligned() {
        let m = RamLayout::with_hotplug(512 * MIB, &[GIB, 200 * MIB, 0, 128 * MIB]).unwrap();
        let r = m.hotplug_regions();
        assert_eq!(r.len(), 3, "a size of 0 gives no region");
        // From 4 GiB (RAM ends below the hole), each rounded up to 128 MiB.
        assert_eq!((r[0].start, r[0].size), (4 * GIB, GIB));
        assert_eq!((r[1].start, r[1].size), (5 * GIB, 256 * MIB));
        assert_eq!((r[2].start, r[2].size), (5 * GIB + 256 * MIB, 128 * MIB));
        assert_eq!(m.hotplug_end(), 5 * GIB + 384 * MIB);
        assert_eq!(m.hotplug_region(), Some(r[0]));
        assert!(
            m.e820().iter().all(|e| e.addr + e.size <= 4 * GIB),
            "no hot-plug region in E820"
        );
    }

    #[test]
    fn hotplug_region_is_not_in_e820() {
        let m = RamLayout::new(512 * MIB, 2 * GIB).unwrap();
        let hp = m.hotplug_region().unwrap();
        assert_eq!(
            hp,
            GuestRange {
                start: 4 * GIB,
                size: 2 * GIB
            }
        );
        assert!(
            m.e820()
                .iter()
                .all(|e| e.addr + e.size <= hp.start || e.addr >= hp.end())
        );
    }

    #[test]
    fn e820_is_sorted_and_disjoint() {
        for size in [MIN_RAM_SIZE, GIB, 3 * GIB + PAGE_SIZE, 16 * GIB] {
            let e820 = RamLayout::new(size, 0).unwrap().e820();
            for w in e820.windows(2) {
                assert!(w[0].addr + w[0].size <= w[1].addr);
            }
            assert!(e820.iter().all(|e| e.size > 0));
        }
    }

    #[test]
    fn bad_sizes_are_rejected() {
        assert_eq!(
            RamLayout::new(MIB, 0),
            Err(RamLayoutError::TooSmall {
                size: MIB,
                min: MIN_RAM_SIZE
            })
        );
        assert_eq!(
            RamLayout::new(128 * MIB + 1, 0),
            Err(RamLayoutError::Unaligned {
                size: 128 * MIB + 1
            })
        );
        assert!(matches!(
            RamLayout::new(MAX_RAM_SIZE + PAGE_SIZE, 0),
            Err(RamLayoutError::TooLarge { .. })
        ));
        assert!(matches!(
            RamLayout::new(GIB, u64::MAX - GIB),
            Err(RamLayoutError::Hotplug(_))
        ));
    }
}
