//! The zero page (`struct boot_params`) of the Linux 64-bit boot protocol.
//!
//! It starts from the kernel's own setup header (as read from the bzImage) and adds
//! what the boot loader supplies: loader type, command line, initrd, E820 map and the
//! RSDP address. It is written at [`ZERO_PAGE_START`], whose address the boot vCPU gets
//! in RSI.

use linux_loader::bootparam::{
    E820_MAX_ENTRIES_ZEROPAGE, boot_e820_entry, boot_params, setup_header,
};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams, Error as ConfiguratorError};
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::address_plan::ZERO_PAGE_START;
use crate::initrd::InitrdInfo;
use crate::ram_layout::E820Entry;

/// `type_of_loader` value for a boot loader without an assigned ID.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;

/// Errors building or writing the zero page.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BootParamsError {
    /// The E820 map has more entries than the zero page holds.
    #[error("E820 map has {count} entries, the zero page holds {max}")]
    TooManyE820Entries {
        /// Entries in the map.
        count: usize,
        /// Capacity of the zero page.
        max: usize,
    },
    /// The command line is not below 4 GiB (the zero page has 32-bit fields for it here).
    #[error("command line at {0:#x} is not below 4 GiB")]
    CmdlineAbove4G(u64),
    /// Writing the zero page failed.
    #[error("cannot write the zero page")]
    Write(#[source] ConfiguratorError),
}

/// What the zero page describes besides the kernel's own header.
#[derive(Debug, Clone, Copy)]
pub struct ZeroPageInputs<'a> {
    /// Where the command line is, and its size including the NUL.
    pub cmdline: (GuestAddress, usize),
    /// The initrd, if any.
    pub initrd: Option<InitrdInfo>,
    /// The guest's E820 map.
    pub e820: &'a [E820Entry],
    /// The ACPI RSDP, if ACPI tables were written.
    pub rsdp: Option<GuestAddress>,
}

/// Builds the zero page from the kernel's setup header `hdr` and `inputs`.
pub fn build_boot_params(
    hdr: &setup_header,
    inputs: &ZeroPageInputs<'_>,
) -> Result<boot_params, BootParamsError> {
    let mut params = boot_params {
        hdr: *hdr,
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;

    let (cmdline_addr, cmdline_size) = inputs.cmdline;
    params.hdr.cmd_line_ptr = u32::try_from(cmdline_addr.0)
        .map_err(|_| BootParamsError::CmdlineAbove4G(cmdline_addr.0))?;
    // The kernel's header says how long a command line it accepts; the loader's field of
    // the same name (boot protocol 2.06+) is what we tell it we passed.
    params.hdr.cmdline_size = cmdline_size as u32;

    if let Some(initrd) = inputs.initrd {
        params.hdr.ramdisk_image = initrd.addr.0 as u32;
        params.ext_ramdisk_image = (initrd.addr.0 >> 32) as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
        params.ext_ramdisk_size = (initrd.size >> 32) as u32;
    }

    if inputs.e820.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(BootParamsError::TooManyE820Entries {
            count: inputs.e820.len(),
            max: E820_MAX_ENTRIES_ZEROPAGE,
        });
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(inputs.e820) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind.raw(),
        };
    }
    // Checked against E820_MAX_ENTRIES_ZEROPAGE (128) above.
    params.e820_entries = inputs.e820.len() as u8;

    if let Some(rsdp) = inputs.rsdp {
        params.acpi_rsdp_addr = rsdp.0;
    }
    Ok(params)
}

/// Writes `params` at [`ZERO_PAGE_START`] and returns that address.
pub fn write_boot_params<M: GuestMemoryBackend>(
    mem: &M,
    params: &boot_params,
) -> Result<GuestAddress, BootParamsError> {
    let addr = GuestAddress(ZERO_PAGE_START);
    LinuxBootConfigurator::write_bootparams(&BootParams::new(params, addr), mem)
        .map_err(BootParamsError::Write)?;
    Ok(addr)
}

#[allow(clippy::unwrap_used)]
#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{ByteValued, Bytes, GuestMemoryMmap};

    use crate::ram_layout::{E820Type, RamLayout};

    const MIB: u64 = 1 << 20;

    fn kernel_header() -> setup_header {
        setup_header {
            header: 0x5372_6448,
            version: 0x020f,
            boot_flag: 0xaa55,
            code32_start: 0x10_0000,
            cmdline_size: 2047,
            initrd_addr_max: 0x7fff_ffff,
            init_size: 0x200_0000,
            ..Default::default()
        }
    }

    #[test]
    fn zero_page_carries_kernel_header_and_loader_fields() {
        let map = RamLayout::new(256 * MIB, 0).unwrap();
        let e820 = map.e820();
        let inputs = ZeroPageInputs {
            cmdline: (GuestAddress(0x2_0000), 23),
            initrd: Some(InitrdInfo {
                addr: GuestAddress(0xf00_0000),
                size: 0x12345,
            }),
            e820: &e820,
            rsdp: Some(GuestAddress(0xe_0000)),
        };
        let p = build_boot_params(&kernel_header(), &inputs).unwrap();
        let (magic, init_size, loader) = (p.hdr.header, p.hdr.init_size, p.hdr.type_of_loader);
        assert_eq!((magic, init_size, loader), (0x5372_6448, 0x200_0000, 0xff));
        let (ptr, size) = (p.hdr.cmd_line_ptr, p.hdr.cmdline_size);
        assert_eq!((ptr, size), (0x2_0000, 23));
        let (rd, rd_size, ext) = (p.hdr.ramdisk_image, p.hdr.ramdisk_size, p.ext_ramdisk_image);
        assert_eq!((rd, rd_size, ext), (0xf00_0000, 0x12345, 0));
        let rsdp = p.acpi_rsdp_addr;
        assert_eq!(rsdp, 0xe_0000);
        assert_eq!(usize::from(p.e820_entries), e820.len());
        for (raw, want) in p.e820_table.iter().zip(&e820) {
            let (addr, size, ty) = (raw.addr, raw.size, raw.r#type);
            assert_eq!((addr, size, ty), (want.addr, want.size, want.kind.raw()));
        }
    }

    #[test]
    fn no_initrd_no_rsdp_leaves_fields_zero() {
        let inputs = ZeroPageInputs {
            cmdline: (GuestAddress(0x2_0000), 1),
            initrd: None,
            e820: &[],
            rsdp: None,
        };
        let p = build_boot_params(&kernel_header(), &inputs).unwrap();
        let (rd, rd_size, rsdp) = (p.hdr.ramdisk_image, p.hdr.ramdisk_size, p.acpi_rsdp_addr);
        assert_eq!((rd, rd_size, rsdp), (0, 0, 0));
    }

    #[test]
    fn oversized_e820_is_rejected() {
        let e820 = vec![
            E820Entry {
                addr: 0,
                size: 4096,
                kind: E820Type::Ram,
            };
            129
        ];
        let inputs = ZeroPageInputs {
            cmdline: (GuestAddress(0x2_0000), 1),
            initrd: None,
            e820: &e820,
            rsdp: None,
        };
        assert_eq!(
            build_boot_params(&kernel_header(), &inputs).unwrap_err(),
            BootParamsError::TooManyE820Entries {
                count: 129,
                max: 128
            }
        );
    }

    #[test]
    fn written_zero_page_reads_back() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let inputs = ZeroPageInputs {
            cmdline: (GuestAddress(0x2_0000), 10),
            initrd: None,
            e820: &[],
            rsdp: Some(GuestAddress(0xe_0000)),
        };
        let p = build_boot_params(&kernel_header(), &inputs).unwrap();
        let addr = write_boot_params(&mem, &p).unwrap();
        assert_eq!(addr, GuestAddress(0x7000));
        let back: boot_params = mem.read_obj(addr).unwrap();
        assert_eq!(back.as_slice(), p.as_slice());
        // The "HdrS" magic sits at its architectural offset 0x202 in the zero page.
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x7202)).unwrap(),
            0x5372_6448
        );
    }

    #[test]
    fn zero_page_past_ram_fails() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x7800)]).unwrap();
        let p = boot_params::default();
        assert!(matches!(
            write_boot_params(&mem, &p),
            Err(BootParamsError::Write(_))
        ));
    }
}
