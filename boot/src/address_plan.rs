//! The guest physical address map every VM of this VMM uses.
//!
//! ```text
//! 0x0000_0000 ┬ real-mode IVT and BIOS data area (left zero; nothing of ours below 0x500)
//! 0x0000_0500 ┼ boot GDT (BOOT_GDT_MAX_ENTRIES descriptors), then the boot IDT, then the boot TSS
//! 0x0000_6000 ┼ PVH `hvm_start_info`, its module list (initrd) and its memory map
//! 0x0000_7000 ┼ zero page (`boot_params`) of the Linux 64-bit boot protocol
//! 0x0000_8ff0 ┼ initial stack pointer of the boot vCPU (grows down)
//! 0x0000_9000 ┼ identity page tables: PML4, PDPT, then IDENTITY_MAP_PDS page directories
//! 0x0002_0000 ┼ kernel command line (CMDLINE_MAX_SIZE bytes)
//! 0x0009_fc00 ┼ EBDA and legacy VGA/ROM hole: reserved in E820
//! 0x000e_0000 ┼ ACPI tables (RSDP first, where legacy scans look): ACPI data in E820
//! 0x0010_0000 ┼ high RAM: the kernel, then free RAM, the initrd at its top
//! 0xc000_0000 ┼ 32-bit MMIO hole (no RAM): device MMIO window from 0xd000_0000,
//!             │ IOAPIC at 0xfec0_0000, LAPIC at 0xfee0_0000
//! 0x1_0000_0000 ┼ RAM that did not fit below the hole
//!             ┴ hot-plug region (virtio-mem) above RAM, 128 MiB aligned, not in E820
//! ```
//!
//! Everything here is a constant or pure arithmetic, so the VMM, the devices and the
//! tests agree on addresses without sharing state.

use thiserror::Error;

/// One KiB.
pub const KIB: u64 = 1 << 10;
/// One MiB.
pub const MIB: u64 = 1 << 20;
/// One GiB.
pub const GIB: u64 = 1 << 30;

/// Guest page size; RAM sizes and the initrd address are multiples of it.
pub const PAGE_SIZE: u64 = 4 * KIB;

/// Boot GDT written by the vCPU set-up (see `cpu::gdt` for its descriptors).
pub const BOOT_GDT_START: u64 = 0x500;
/// Number of 8-byte descriptors reserved for the boot GDT (0x500..0x540).
pub const BOOT_GDT_MAX_ENTRIES: usize = 8;
/// Boot IDT: a single null gate, so any exception before the kernel installs its own IDT
/// ends in a triple fault (a shutdown exit) instead of running garbage. It follows the
/// GDT, which needs more than the 32 bytes 0x500..0x520 because it also carries the
/// user-mode and TSS descriptors that test guests use.
pub const BOOT_IDT_START: u64 = 0x540;
/// Boot 64-bit TSS (104 bytes); its RSP0 is only meaningful for test guests that run
/// code at CPL3 (see `cpu::regs::enter_long_mode`).
pub const BOOT_TSS_START: u64 = 0x580;
/// Size of the boot TSS (the architectural 64-bit TSS, without an I/O bitmap).
pub const BOOT_TSS_SIZE: u64 = 0x68;

/// PVH `hvm_start_info`, whose address the PVH entry receives in RBX.
pub const PVH_START_INFO: u64 = 0x6000;
/// PVH module list (`hvm_modlist_entry`, one per module; we pass at most the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map (`hvm_memmap_table_entry` array).
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Entries that fit between [`PVH_MEMMAP_START`] and the zero page (24 bytes each).
pub const PVH_MEMMAP_MAX_ENTRIES: usize = ((ZERO_PAGE_START - PVH_MEMMAP_START) / 24) as usize;

/// The Linux boot protocol's zero page (`struct boot_params`, 4 KiB); RSI points here.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial RSP/RBP of the boot vCPU for the Linux 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// Page-map level 4 of the boot identity mapping (CR3).
pub const PML4_START: u64 = 0x9000;
/// The page-directory-pointer table referenced by PML4 entry 0.
pub const PDPT_START: u64 = 0xa000;
/// The first page directory; the others follow at 4 KiB strides.
pub const PD_START: u64 = 0xb000;
/// Number of page directories (one per GiB identity-mapped with 2 MiB pages).
pub const IDENTITY_MAP_PDS: u64 = 4;
/// Bytes identity-mapped by the boot page tables: the first 4 GiB, so the kernel, the
/// boot structures and also the MMIO hole are reachable from a test guest in long mode.
pub const IDENTITY_MAP_SIZE: u64 = IDENTITY_MAP_PDS * GIB;

/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Largest command line including its NUL, equal to x86 Linux's `COMMAND_LINE_SIZE`.
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// Start of the Extended BIOS Data Area; RAM below it is usable by the guest.
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of the ACPI table area (inside the legacy BIOS range Linux scans for the RSDP).
pub const ACPI_START: u64 = 0xe_0000;
/// The RSDP sits at the start of the ACPI area, 16-byte aligned as the legacy scan needs.
pub const RSDP_START: u64 = ACPI_START;
/// End (exclusive) of the ACPI area and of the legacy hole.
pub const ACPI_END: u64 = HIGH_RAM_START;
/// First byte of high RAM (1 MiB); the bzImage kernel is loaded here.
pub const HIGH_RAM_START: u64 = MIB;

/// Start of the 32-bit MMIO hole; RAM below 4 GiB ends here at the latest.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End (exclusive) of the 32-bit MMIO hole; RAM resumes here.
pub const MMIO_HOLE_END: u64 = RAM_64BIT_START;
/// RAM that does not fit below the hole starts at 4 GiB.
pub const RAM_64BIT_START: u64 = 1 << 32;

/// Start of the window for our MMIO devices inside the hole.
pub const DEVICE_MMIO_START: u64 = 0xd000_0000;
/// End (exclusive) of the device MMIO window.
pub const DEVICE_MMIO_END: u64 = 0xe000_0000;
/// The GED (ACPI Generic Event Device) event register page.
pub const GED_MMIO_BASE: u64 = DEVICE_MMIO_START;
/// Size of the GED page.
pub const GED_MMIO_SIZE: u64 = PAGE_SIZE;
/// First virtio-mmio device; device `i` is at `VIRTIO_MMIO_START + i * VIRTIO_MMIO_SIZE`.
pub const VIRTIO_MMIO_START: u64 = DEVICE_MMIO_START + GED_MMIO_SIZE;
/// Size of (and stride between) virtio-mmio device windows.
pub const VIRTIO_MMIO_SIZE: u64 = PAGE_SIZE;
/// Most virtio-mmio devices the layout (and the DSDT naming `VR00`..`VRFF`) provides for.
pub const VIRTIO_MMIO_MAX_DEVICES: u32 = 256;

/// IOAPIC registers (KVM's in-kernel IOAPIC).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Number of IOAPIC pins (GSIs 0..=23) of KVM's in-kernel IOAPIC.
pub const IOAPIC_PINS: u32 = 24;
/// Local APIC registers (KVM's in-kernel LAPIC), the architectural default.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// Where `KVM_SET_TSS_ADDR` should put its three pages (Intel only): inside the hole,
/// below the BIOS ROM area, clear of the devices.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// Linux's x86-64 memory block size: the granularity of hot-plugged memory.
pub const MEMORY_BLOCK_SIZE: u64 = 128 * MIB;

/// Legacy COM1 base port.
pub const COM1_PORT: u16 = 0x3f8;
/// Legacy COM1 ISA IRQ (and GSI).
pub const COM1_IRQ: u32 = 4;
/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 status/command port (a write of 0xfe resets the machine).
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// i8042 keyboard ISA IRQ (and GSI).
pub const I8042_KBD_IRQ: u32 = 1;
/// First GSI free for our devices (GED, virtio-mmio): 0..=4 are ISA legacy ones we use
/// or that KVM's PIT and PIC own.
pub const FIRST_DEVICE_GSI: u32 = 5;

/// Default I/O port of the ACPI sleep control register (FADT `SLEEP_CONTROL_REG`).
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// Default I/O port of the ACPI sleep status register (FADT `SLEEP_STATUS_REG`).
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// Default I/O port of the ACPI reset register (FADT `RESET_REG`).
pub const RESET_PORT: u16 = 0x602;
/// Value the guest writes to [`RESET_PORT`] to reset (FADT `RESET_VALUE`).
pub const RESET_VALUE: u8 = 0x01;
/// `SLP_TYP` value of the `_S5_` (soft-off) package. A hardware-reduced guest powers off
/// by writing `(S5_SLEEP_TYPE << 2) | SLEEP_ENABLE` to the sleep control register.
pub const S5_SLEEP_TYPE: u8 = 5;
/// `SLP_EN` bit of the sleep control register.
pub const SLEEP_ENABLE: u8 = 1 << 5;
/// Bit of the GED event register that asks the guest to press its power button.
pub const GED_EVENT_POWER_BUTTON: u8 = 1 << 0;

// Invariants of the map, checked at compile time.
const _: () = {
    // The boot stack grows down from below the page tables, above the zero page.
    assert!(BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 4096);
    // The PVH memory map has room for far more entries than our E820 maps have (<= 6).
    assert!(PVH_MEMMAP_MAX_ENTRIES >= 128);
    // Device windows are inside the hole, below the IOAPIC; the GED page comes first.
    assert!(MMIO_HOLE_START <= DEVICE_MMIO_START && DEVICE_MMIO_END <= IOAPIC_START);
    assert!(GED_MMIO_BASE + GED_MMIO_SIZE <= VIRTIO_MMIO_START);
    // KVM's three TSS pages are inside the hole, above the LAPIC.
    assert!(KVM_TSS_ADDRESS > LAPIC_START && KVM_TSS_ADDRESS + 3 * PAGE_SIZE <= MMIO_HOLE_END);
    // The identity map covers the hole, so test guests can reach device windows.
    assert!(IDENTITY_MAP_SIZE >= MMIO_HOLE_END);
};

/// Errors of the layout arithmetic.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum AddressPlanError {
    /// The requested hot-plug region does not fit in the 64-bit address space.
    #[error("hot-plug region of {size:#x} bytes above {start:#x} overflows the address space")]
    HotplugOverflow {
        /// Where the region would start.
        start: u64,
        /// Requested size.
        size: u64,
    },
}

/// A range of guest physical addresses `[start, start + size)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRange {
    /// First address.
    pub start: u64,
    /// Length in bytes (never zero for ranges this crate returns).
    pub size: u64,
}

impl GuestRange {
    /// First address past the range (saturating at `u64::MAX`).
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.size)
    }
}

/// Rounds `value` up to a multiple of `align` (a power of two), or `None` on overflow.
pub fn align_up(value: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    let mask = align - 1;
    value.checked_add(mask).map(|v| v & !mask)
}

/// Rounds `value` down to a multiple of `align` (a power of two).
pub fn align_down(value: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    value & !(align - 1)
}

/// Address of virtio-mmio device number `index`, or `None` past the last slot.
pub fn virtio_mmio_base(index: u32) -> Option<u64> {
    if index >= VIRTIO_MMIO_MAX_DEVICES {
        return None;
    }
    Some(VIRTIO_MMIO_START + u64::from(index) * VIRTIO_MMIO_SIZE)
}

/// Places a hot-plug region of (at least) `size` bytes above RAM that ends at `ram_end`
/// (exclusive, as a guest physical address).
///
/// The region starts at or above 4 GiB and above RAM, aligned to [`MEMORY_BLOCK_SIZE`],
/// and its size is rounded up to a multiple of [`MEMORY_BLOCK_SIZE`], as Linux onlines
/// hot-plugged memory by whole memory blocks. A `size` of zero means no region.
pub fn hotplug_region(ram_end: u64, size: u64) -> Result<Option<GuestRange>, AddressPlanError> {
    if size == 0 {
        return Ok(None);
    }
    let floor = ram_end.max(RAM_64BIT_START);
    let overflow = || AddressPlanError::HotplugOverflow { start: floor, size };
    let start = align_up(floor, MEMORY_BLOCK_SIZE).ok_or_else(overflow)?;
    let size = align_up(size, MEMORY_BLOCK_SIZE).ok_or_else(overflow)?;
    start.checked_add(size).ok_or_else(overflow)?;
    Ok(Some(GuestRange { start, size }))
}

#[allow(clippy::unwrap_used)]
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_structures_do_not_overlap() {
        let areas = [
            (BOOT_GDT_START, BOOT_GDT_MAX_ENTRIES as u64 * 8),
            (BOOT_IDT_START, 8),
            (BOOT_TSS_START, BOOT_TSS_SIZE),
            (PVH_START_INFO, 56),
            (PVH_MODLIST_START, 32),
            (PVH_MEMMAP_START, PVH_MEMMAP_MAX_ENTRIES as u64 * 24),
            (ZERO_PAGE_START, 4096),
            (PML4_START, 4096),
            (PDPT_START, 4096),
            (PD_START, IDENTITY_MAP_PDS * 4096),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
        ];
        for (i, a) in areas.iter().enumerate() {
            assert!(a.0 + a.1 <= EBDA_START, "area {i} runs into the EBDA");
            for b in &areas[i + 1..] {
                assert!(a.0 + a.1 <= b.0, "{:#x} overlaps {:#x}", a.0, b.0);
            }
        }
    }

    #[test]
    fn last_virtio_slot_ends_inside_the_device_window() {
        let last = virtio_mmio_base(VIRTIO_MMIO_MAX_DEVICES - 1).unwrap();
        assert!(last + VIRTIO_MMIO_SIZE <= DEVICE_MMIO_END);
    }

    #[test]
    fn virtio_mmio_slots_are_page_strided() {
        assert_eq!(virtio_mmio_base(0), Some(0xd000_1000));
        assert_eq!(virtio_mmio_base(1), Some(0xd000_2000));
        assert_eq!(virtio_mmio_base(VIRTIO_MMIO_MAX_DEVICES), None);
    }

    #[test]
    fn hotplug_region_starts_at_4g_for_small_ram() {
        let r = hotplug_region(512 * MIB, 4 * GIB).unwrap().unwrap();
        assert_eq!(
            r,
            GuestRange {
                start: 4 * GIB,
                size: 4 * GIB
            }
        );
    }

    #[test]
    fn hotplug_region_is_block_aligned_above_high_ram() {
        // 16 GiB of RAM: 3 GiB below the hole, 13 GiB from 4 GiB -> RAM ends at 17 GiB.
        let r = hotplug_region(17 * GIB, 1).unwrap().unwrap();
        assert_eq!(r.start, 17 * GIB);
        assert_eq!(r.size, MEMORY_BLOCK_SIZE);
        // An unaligned RAM end moves the region up to the next block boundary.
        let r = hotplug_region(4 * GIB + 3 * MIB, 200 * MIB)
            .unwrap()
            .unwrap();
        assert_eq!(r.start, 4 * GIB + 128 * MIB);
        assert_eq!(r.size, 256 * MIB);
        assert_eq!(r.start % MEMORY_BLOCK_SIZE, 0);
    }

    #[test]
    fn hotplug_region_of_zero_is_none() {
        assert_eq!(hotplug_region(GIB, 0).unwrap(), None);
    }

    #[test]
    fn hotplug_region_overflow_is_an_error() {
        assert!(matches!(
            hotplug_region(u64::MAX - GIB, GIB),
            Err(AddressPlanError::HotplugOverflow { .. })
        ));
        assert!(matches!(
            hotplug_region(8 * GIB, u64::MAX - 10),
            Err(AddressPlanError::HotplugOverflow { .. })
        ));
    }

    #[test]
    fn align_helpers_round_to_powers_of_two() {
        assert_eq!(align_up(1, 4096), Some(4096));
        assert_eq!(align_up(4096, 4096), Some(4096));
        assert_eq!(align_up(u64::MAX, 4096), None);
        assert_eq!(align_down(8191, 4096), 4096);
    }
}
