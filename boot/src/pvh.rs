//! The PVH start-of-day structure (`hvm_start_info`, version 1) for ELF kernels.
//!
//! The boot vCPU enters the kernel's PVH entry with RBX pointing at the structure, which
//! gives the command line, the initrd as module 0, the memory map (E820 types) and the
//! RSDP.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams, Error as ConfiguratorError};
use linux_loader::loader::elf::start_info::{
    XEN_HVM_START_MAGIC_VALUE, hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::address_plan::{
    PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, PVH_MODLIST_START, PVH_START_INFO,
};
use crate::initrd::InitrdInfo;
use crate::ram_layout::E820Entry;

/// The `hvm_start_info` version we write (version 1 has the memory map fields).
pub const START_INFO_VERSION: u32 = 1;

/// Errors building or writing the PVH start info.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PvhError {
    /// The memory map has more entries than its area holds.
    #[error("memory map has {count} entries, room for {max}")]
    TooManyMemmapEntries {
        /// Entries in the map.
        count: usize,
        /// Capacity.
        max: usize,
    },
    /// The memory map is empty (the kernel cannot boot without RAM).
    #[error("memory map is empty")]
    EmptyMemmap,
    /// Writing the structures failed.
    #[error("cannot write the PVH start info")]
    Write(#[source] ConfiguratorError),
}

/// What the start info describes.
#[derive(Debug, Clone, Copy)]
pub struct StartInfoInputs<'a> {
    /// Address of the NUL-terminated command line.
    pub cmdline: GuestAddress,
    /// The initrd, passed as module 0.
    pub initrd: Option<InitrdInfo>,
    /// The guest's memory map.
    pub e820: &'a [E820Entry],
    /// The ACPI RSDP, if ACPI tables were written.
    pub rsdp: Option<GuestAddress>,
}

/// The structures the PVH entry reads, ready to be written.
#[derive(Debug, Clone, PartialEq)]
pub struct StartInfo {
    /// The header, written at [`PVH_START_INFO`].
    pub info: hvm_start_info,
    /// Module list (at most the initrd), written at [`PVH_MODLIST_START`].
    pub modules: Vec<hvm_modlist_entry>,
    /// Memory map, written at [`PVH_MEMMAP_START`].
    pub memmap: Vec<hvm_memmap_table_entry>,
}

/// Builds the start info for `inputs`.
pub fn build_start_info(inputs: &StartInfoInputs<'_>) -> Result<StartInfo, PvhError> {
    if inputs.e820.is_empty() {
        return Err(PvhError::EmptyMemmap);
    }
    if inputs.e820.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(PvhError::TooManyMemmapEntries {
            count: inputs.e820.len(),
            max: PVH_MEMMAP_MAX_ENTRIES,
        });
    }
    let memmap: Vec<hvm_memmap_table_entry> = inputs
        .e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind.raw(),
            reserved: 0,
        })
        .collect();
    let modules: Vec<hvm_modlist_entry> = inputs
        .initrd
        .iter()
        .map(|rd| hvm_modlist_entry {
            paddr: rd.addr.0,
            size: rd.size,
            cmdline_paddr: 0,
            reserved: 0,
        })
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: START_INFO_VERSION,
        flags: 0,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            PVH_MODLIST_START
        },
        cmdline_paddr: inputs.cmdline.0,
        rsdp_paddr: inputs.rsdp.map_or(0, |a| a.0),
        memmap_paddr: PVH_MEMMAP_START,
        // Bounded by PVH_MEMMAP_MAX_ENTRIES above.
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    Ok(StartInfo {
        info,
        modules,
        memmap,
    })
}

/// Writes `start` to guest memory and returns the address the PVH entry gets in RBX.
pub fn write_start_info<M: GuestMemoryBackend>(
    mem: &M,
    start: &StartInfo,
) -> Result<GuestAddress, PvhError> {
    let addr = GuestAddress(PVH_START_INFO);
    let mut params = BootParams::new(&start.info, addr);
    params.set_sections(&start.memmap, GuestAddress(PVH_MEMMAP_START));
    if !start.modules.is_empty() {
        params.set_modules(&start.modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(PvhError::Write)?;
    Ok(addr)
}

#[allow(clippy::unwrap_used)]
#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    use crate::ram_layout::RamLayout;

    #[test]
    fn start_info_describes_cmdline_initrd_memmap_and_rsdp() {
        let map = RamLayout::new(512 << 20, 0).unwrap();
        let e820 = map.e820();
        let inputs = StartInfoInputs {
            cmdline: GuestAddress(0x2_0000),
            initrd: Some(InitrdInfo {
                addr: GuestAddress(0x1f00_0000),
                size: 4096,
            }),
            e820: &e820,
            rsdp: Some(GuestAddress(0xe_0000)),
        };
        let s = build_start_info(&inputs).unwrap();
        assert_eq!(s.info.magic, 0x336e_c578);
        assert_eq!(s.info.version, 1);
        assert_eq!(s.info.cmdline_paddr, 0x2_0000);
        assert_eq!(s.info.rsdp_paddr, 0xe_0000);
        assert_eq!(s.info.nr_modules, 1);
        assert_eq!(s.info.modlist_paddr, PVH_MODLIST_START);
        assert_eq!(s.modules[0].paddr, 0x1f00_0000);
        assert_eq!(s.modules[0].size, 4096);
        assert_eq!(s.info.memmap_entries as usize, e820.len());
        for (m, e) in s.memmap.iter().zip(&e820) {
            assert_eq!((m.addr, m.size, m.type_), (e.addr, e.size, e.kind.raw()));
        }
    }

    #[test]
    fn without_initrd_there_is_no_module_list() {
        let e820 = RamLayout::new(64 << 20, 0).unwrap().e820();
        let inputs = StartInfoInputs {
            cmdline: GuestAddress(0x2_0000),
            initrd: None,
            e820: &e820,
            rsdp: None,
        };
        let s = build_start_info(&inputs).unwrap();
        assert_eq!(
            (s.info.nr_modules, s.info.modlist_paddr, s.info.rsdp_paddr),
            (0, 0, 0)
        );
    }

    #[test]
    fn bad_memmaps_are_rejected() {
        let inputs = StartInfoInputs {
            cmdline: GuestAddress(0x2_0000),
            initrd: None,
            e820: &[],
            rsdp: None,
        };
        assert_eq!(build_start_info(&inputs), Err(PvhError::EmptyMemmap));
        let e = RamLayout::new(64 << 20, 0).unwrap().e820()[0];
        let big = vec![e; PVH_MEMMAP_MAX_ENTRIES + 1];
        let inputs = StartInfoInputs {
            e820: &big,
            ..inputs
        };
        assert!(matches!(
            build_start_info(&inputs),
            Err(PvhError::TooManyMemmapEntries { .. })
        ));
    }

    #[test]
    fn written_start_info_reads_back() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let e820 = RamLayout::new(64 << 20, 0).unwrap().e820();
        let inputs = StartInfoInputs {
            cmdline: GuestAddress(0x2_0000),
            initrd: Some(InitrdInfo {
                addr: GuestAddress(0x300_0000),
                size: 77,
            }),
            e820: &e820,
            rsdp: Some(GuestAddress(0xe_0000)),
        };
        let s = build_start_info(&inputs).unwrap();
        let addr = write_start_info(&mem, &s).unwrap();
        assert_eq!(addr, GuestAddress(PVH_START_INFO));
        let info: hvm_start_info = mem.read_obj(addr).unwrap();
        assert_eq!(info, s.info);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 77));
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(
                info.memmap_paddr + 24 * (u64::from(info.memmap_entries) - 1),
            ))
            .unwrap();
        assert_eq!(last.addr, 1 << 20);
        assert_eq!(last.type_, 1);
    }
}
