//! Putting a kernel, its initrd, command line and boot parameters into guest memory.

use std::path::Path;

use linux_loader::cmdline::Cmdline;
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::address_plan::CMDLINE_MAX_SIZE;
use crate::bootparams::{self, BootParamsError, ZeroPageInputs};
use crate::cmdline::{self, CmdlineError};
use crate::initrd::{self, InitrdError, InitrdInfo};
use crate::loader::{self, BootProtocol, LoadedKernel, LoaderError};
use crate::pvh::{self, PvhError, StartInfoInputs};
use crate::ram_layout::RamLayout;

/// What to boot.
#[derive(Debug, Clone, Copy)]
pub struct BootConfig<'a> {
    /// The kernel image: a bzImage or an ELF vmlinux with a PVH note.
    pub kernel: &'a Path,
    /// An initrd/initramfs image, if any.
    pub initrd: Option<&'a Path>,
    /// The complete command line (see [`cmdline::build_cmdline`]).
    pub cmdline: &'a Cmdline,
    /// The VM's memory configuration (for the E820 map and where low RAM ends).
    pub memory: &'a RamLayout,
    /// The RSDP returned by [`crate::acpi::create_acpi_tables`], if ACPI tables exist.
    pub rsdp: Option<GuestAddress>,
}

/// How to start the boot vCPU, as [`load_kernel`] left guest memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BootInfo {
    /// The entry protocol.
    pub protocol: BootProtocol,
    /// Where the boot vCPU starts.
    pub entry: GuestAddress,
    /// The zero page (Linux64, for RSI) or the `hvm_start_info` (PVH, for RBX).
    pub boot_params: GuestAddress,
    /// The loaded kernel.
    pub kernel: LoadedKernel,
    /// The loaded initrd.
    pub initrd: Option<InitrdInfo>,
    /// Where the command line is.
    pub cmdline: GuestAddress,
    /// Its size including the NUL.
    pub cmdline_size: usize,
}

/// Errors loading a kernel and its boot data.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel image.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// The command line.
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),
    /// The initrd.
    #[error(transparent)]
    Initrd(#[from] InitrdError),
    /// The zero page.
    #[error(transparent)]
    BootParams(#[from] BootParamsError),
    /// The PVH start info.
    #[error(transparent)]
    Pvh(#[from] PvhError),
}

/// Loads the kernel, command line and initrd into `mem` and writes the boot parameters
/// of the kernel's entry protocol (zero page or PVH start info, with the E820 map of
/// `cfg.memory` and `cfg.rsdp`).
///
/// Call once, after guest memory for `cfg.memory` exists (and after the ACPI tables, if
/// `cfg.rsdp` points at them), before configuring the boot vCPU with the result.
pub fn load_kernel<M: GuestMemoryBackend>(
    mem: &M,
    cfg: &BootConfig<'_>,
) -> Result<BootInfo, BootError> {
    let kernel = loader::load_kernel_image(mem, cfg.kernel)?;
    let max = kernel.cmdline_max().unwrap_or(CMDLINE_MAX_SIZE);
    let (cmdline_addr, cmdline_size) = cmdline::write_cmdline(mem, cfg.cmdline, max)?;
    let initrd = cfg
        .initrd
        .map(|path| initrd::load_initrd(mem, path, &kernel, cfg.memory.low_ram_end()))
        .transpose()?;
    let e820 = cfg.memory.e820();
    let boot_params = match (kernel.protocol, kernel.setup_header) {
        (BootProtocol::Linux64, Some(hdr)) => {
            let inputs = ZeroPageInputs {
                cmdline: (cmdline_addr, cmdline_size),
                initrd,
                e820: &e820,
                rsdp: cfg.rsdp,
            };
            let params = bootparams::build_boot_params(&hdr, &inputs)?;
            bootparams::write_boot_params(mem, &params)?
        }
        _ => {
            let inputs = StartInfoInputs {
                cmdline: cmdline_addr,
                initrd,
                e820: &e820,
                rsdp: cfg.rsdp,
            };
            let start = pvh::build_start_info(&inputs)?;
            pvh::write_start_info(mem, &start)?
        }
    };
    Ok(BootInfo {
        protocol: kernel.protocol,
        entry: kernel.entry,
        boot_params,
        kernel,
        initrd,
        cmdline: cmdline_addr,
        cmdline_size,
    })
}

#[allow(clippy::unwrap_used)]
#[cfg(test)]
mod tests {
    use super::*;
    use linux_loader::bootparam::boot_params;
    use linux_loader::loader::elf::start_info::{hvm_modlist_entry, hvm_start_info};
    use vm_memory::{Bytes, GuestMemoryMmap};

    use crate::address_plan::{CMDLINE_START, MIB, PVH_START_INFO, RSDP_START, ZERO_PAGE_START};
    use crate::cmdline::build_cmdline;
    use crate::loader::KernelFormat;
    use crate::loader::tests::{fake_elf, real_kernel, temp_file};

    fn guest(map: &RamLayout) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&map.mmap_ranges()).unwrap()
    }

    #[test]
    fn pvh_kernel_with_initrd_gets_a_complete_start_info() {
        let map = RamLayout::new(64 * MIB, 0).unwrap();
        let mem = guest(&map);
        let kernel = temp_file(
            "setup-elf",
            &fake_elf(0x100_0000, &[0xf4; 32], Some(0x100_0000)),
        );
        let initrd = temp_file("setup-initrd", &[7u8; 5000]);
        let cmdline = build_cmdline("console=ttyS0", &["panic=-1"]).unwrap();
        let cfg = BootConfig {
            kernel: &kernel,
            initrd: Some(&initrd),
            cmdline: &cmdline,
            memory: &map,
            rsdp: Some(GuestAddress(RSDP_START)),
        };
        let info = load_kernel(&mem, &cfg).unwrap();
        assert_eq!(info.protocol, BootProtocol::Pvh);
        assert_eq!(info.entry, GuestAddress(0x100_0000));
        assert_eq!(info.boot_params, GuestAddress(PVH_START_INFO));
        assert_eq!(info.initrd.unwrap().addr, GuestAddress(64 * MIB - 8192));
        let start: hvm_start_info = mem.read_obj(info.boot_params).unwrap();
        assert_eq!(start.cmdline_paddr, CMDLINE_START);
        assert_eq!(start.rsdp_paddr, RSDP_START);
        assert_eq!(start.memmap_entries as usize, map.e820().len());
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(start.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (64 * MIB - 8192, 5000));
        let mut line = vec![0u8; info.cmdline_size];
        mem.read_slice(&mut line, info.cmdline).unwrap();
        assert_eq!(&line, b"console=ttyS0 panic=-1\0");
    }

    #[test]
    fn initrd_too_big_for_ram_is_reported() {
        let map = RamLayout::new(32 * MIB, 0).unwrap();
        let mem = guest(&map);
        let kernel = temp_file(
            "setup-elf2",
            &fake_elf(0x100_0000, &[0xf4; 32], Some(0x100_0000)),
        );
        let initrd = temp_file("setup-initrd-big", &vec![0u8; 20 * MIB as usize]);
        let cmdline = build_cmdline("", &[]).unwrap();
        let cfg = BootConfig {
            kernel: &kernel,
            initrd: Some(&initrd),
            cmdline: &cmdline,
            memory: &map,
            rsdp: None,
        };
        let err = load_kernel(&mem, &cfg).unwrap_err();
        assert!(
            matches!(err, BootError::Initrd(InitrdError::DoesNotFit { .. })),
            "{err}"
        );
    }

    #[test]
    fn real_bzimage_gets_a_zero_page_if_available() {
        let Some(path) = real_kernel(KernelFormat::BzImage) else {
            eprintln!("skipped: no bzImage (set BOOT_TEST_BZIMAGE, or build the guest kit)");
            return;
        };
        let map = RamLayout::new(256 * MIB, 0).unwrap();
        let mem = guest(&map);
        let initrd = temp_file("setup-real-initrd", &[0x30u8; 4096]);
        let cmdline = build_cmdline("console=ttyS0", &[]).unwrap();
        let cfg = BootConfig {
            kernel: &path,
            initrd: Some(&initrd),
            cmdline: &cmdline,
            memory: &map,
            rsdp: Some(GuestAddress(RSDP_START)),
        };
        let info = load_kernel(&mem, &cfg).unwrap();
        assert_eq!(info.protocol, BootProtocol::Linux64);
        assert_eq!(info.boot_params, GuestAddress(ZERO_PAGE_START));
        let zp: boot_params = mem.read_obj(info.boot_params).unwrap();
        let (magic, loader, ptr, rd, rsdp) = (
            zp.hdr.header,
            zp.hdr.type_of_loader,
            zp.hdr.cmd_line_ptr,
            zp.hdr.ramdisk_image,
            zp.acpi_rsdp_addr,
        );
        assert_eq!(magic, 0x5372_6448);
        assert_eq!(loader, 0xff);
        assert_eq!(u64::from(ptr), CMDLINE_START);
        assert_eq!(u64::from(rd), info.initrd.unwrap().addr.0);
        assert!(
            u64::from(rd) >= info.kernel.end,
            "initrd above the kernel's init_size"
        );
        assert_eq!(rsdp, RSDP_START);
        assert_eq!(usize::from(zp.e820_entries), map.e820().len());
    }
}
