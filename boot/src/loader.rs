//! Loading a Linux kernel image from a file into guest memory.
//!
//! Two formats are accepted and told apart by their magic numbers:
//!
//! * a **bzImage**, entered through the 64-bit Linux boot protocol at its load address
//!   plus 0x200; it needs boot protocol 2.12 or newer with `XLF_KERNEL_64`;
//! * an uncompressed ELF **`vmlinux`** with a PVH entry note (`XEN_ELFNOTE_PHYS32_ENTRY`),
//!   entered in 32-bit protected mode at that entry.
//!
//! The headers are validated here before linux-loader copies anything, so a truncated or
//! corrupt file is reported as a typed error and never partly loaded, and the memory the
//! kernel will need (including a bzImage's decompression buffer, `init_size`) is checked
//! against the RAM it lands in.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use linux_loader::bootparam::{LOADED_HIGH, XLF_KERNEL_64, setup_header};
use linux_loader::elf::{
    EI_CLASS, EI_DATA, ELFCLASS64, ELFDATA2LSB, ELFMAG, EM_X86_64, Elf64_Ehdr, Elf64_Phdr, PT_LOAD,
};
use linux_loader::loader::{
    BzImage, Elf, Error as LinuxLoaderError, KernelLoader, KernelLoaderResult, PvhBootCapability,
};
use thiserror::Error;
use vm_memory::{ByteValued, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::address_plan::HIGH_RAM_START;

/// Offset of the setup header in a bzImage.
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
/// "HdrS", the setup header magic.
const SETUP_HEADER_MAGIC: u32 = 0x5372_6448;
/// The 64-bit entry point is this far past the start of the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Boot protocol 2.12: the first with `xloadflags` (and so `XLF_KERNEL_64`).
pub const MIN_BOOT_PROTOCOL: u16 = 0x020c;
/// More program headers than this is not a kernel (vmlinux has about five).
const MAX_PROGRAM_HEADERS: u16 = 64;

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux 64-bit boot protocol: long mode, identity paging, RSI = zero page.
    Linux64,
    /// PVH: 32-bit protected mode without paging, RBX = `hvm_start_info`.
    Pvh,
}

/// The file format of a kernel image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// A compressed, self-decompressing bzImage.
    BzImage,
    /// An uncompressed ELF vmlinux.
    Elf,
}

/// A kernel loaded into guest memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadedKernel {
    /// The image's format.
    pub format: KernelFormat,
    /// The entry protocol ([`BootProtocol::Linux64`] for bzImage, [`BootProtocol::Pvh`] for ELF).
    pub protocol: BootProtocol,
    /// Where the boot vCPU starts.
    pub entry: GuestAddress,
    /// Lowest guest address the image was copied to.
    pub load_addr: GuestAddress,
    /// First guest address past all memory the kernel needs at boot (its image, BSS, and
    /// for a bzImage the decompression buffer); an initrd must be placed above it.
    pub end: u64,
    /// The bzImage's setup header (with `code32_start` set to the load address), which
    /// the zero page starts from. `None` for ELF.
    pub setup_header: Option<setup_header>,
}

impl LoadedKernel {
    /// Highest address (inclusive) the kernel accepts for the initrd's last byte.
    /// A bzImage says so in `initrd_addr_max`; ELF/PVH kernels take anything below 4 GiB.
    pub fn initrd_addr_max(&self) -> u64 {
        match self.setup_header {
            Some(hdr) if hdr.initrd_addr_max != 0 => u64::from(hdr.initrd_addr_max),
            Some(_) => 0x7fff_ffff,
            None => 0xffff_ffff,
        }
    }

    /// Longest command line (including the NUL) the kernel accepts, if it says.
    pub fn cmdline_max(&self) -> Option<usize> {
        let hdr = self.setup_header?;
        // `cmdline_size` excludes the NUL (boot protocol 2.06+; we require 2.12).
        let size = hdr.cmdline_size;
        Some(size as usize + 1)
    }
}

/// Errors loading a kernel image.
#[derive(Debug, Error)]
pub enum LoaderError {
    /// The file cannot be opened (missing, or no permission).
    #[error("cannot open kernel {}", path.display())]
    Open {
        /// The kernel path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading the file failed.
    #[error("cannot read kernel {}", path.display())]
    Read {
        /// The kernel path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Neither a bzImage nor an ELF file.
    #[error("{} is not a Linux kernel (neither bzImage nor ELF vmlinux)", path.display())]
    NotAKernel {
        /// The kernel path.
        path: PathBuf,
    },
    /// An ELF file, but not a little-endian x86-64 executable.
    #[error("{} is not an x86-64 ELF kernel", path.display())]
    NotX86_64 {
        /// The kernel path.
        path: PathBuf,
    },
    /// Headers point past the end of the file.
    #[error("kernel {} is truncated or corrupt: {what}", path.display())]
    Corrupt {
        /// The kernel path.
        path: PathBuf,
        /// Which structure is inconsistent.
        what: &'static str,
    },
    /// A bzImage older than boot protocol 2.12.
    #[error(
        "kernel {} uses boot protocol {}.{:02}, at least 2.12 is needed",
        path.display(), version >> 8, version & 0xff
    )]
    ProtocolTooOld {
        /// The kernel path.
        path: PathBuf,
        /// The image's protocol version (major << 8 | minor).
        version: u16,
    },
    /// A bzImage without a 64-bit entry point (a 32-bit kernel).
    #[error("kernel {} has no 64-bit entry point", path.display())]
    Not64Bit {
        /// The kernel path.
        path: PathBuf,
    },
    /// An ELF kernel without the PVH entry note.
    #[error("ELF kernel {} has no PVH entry note (build it with CONFIG_PVH)", path.display())]
    NoPvhNote {
        /// The kernel path.
        path: PathBuf,
    },
    /// The kernel would be loaded over the boot structures below 1 MiB.
    #[error("kernel {} wants to load at {addr:#x}, below 1 MiB", path.display())]
    LoadsTooLow {
        /// The kernel path.
        path: PathBuf,
        /// The offending address.
        addr: u64,
    },
    /// The kernel does not fit in the guest's RAM.
    #[error(
        "kernel {} needs guest RAM up to {needed_end:#x}, RAM ends at {ram_end:#x}",
        path.display()
    )]
    TooBig {
        /// The kernel path.
        path: PathBuf,
        /// First address past what the kernel needs.
        needed_end: u64,
        /// End of the RAM range the kernel is loaded into.
        ram_end: u64,
    },
    /// linux-loader failed to copy the image.
    #[error("cannot load kernel {}", path.display())]
    Load {
        /// The kernel path.
        path: PathBuf,
        /// linux-loader's error.
        #[source]
        source: LinuxLoaderError,
    },
}

/// Loads the kernel at `path` into `mem` and says how to enter it.
///
/// A bzImage is loaded at 1 MiB; an ELF at its segments' physical addresses (all at or
/// above 1 MiB). The kernel must fit in the RAM region that contains 1 MiB. On error
/// nothing has been written to guest memory, except after [`LoaderError::Load`].
pub fn load_kernel_image<M: GuestMemoryBackend>(
    mem: &M,
    path: &Path,
) -> Result<LoadedKernel, LoaderError> {
    let file = File::open(path).map_err(|source| LoaderError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let image = ImageFile::new(&file, path)?;
    let ram_end = mem
        .find_region(GuestAddress(HIGH_RAM_START))
        .map_or(HIGH_RAM_START, |r| r.start_addr().0.saturating_add(r.len()));

    if image.starts_with(ELFMAG)? {
        let plan = image.check_elf()?;
        image.check_fits(plan.end, ram_end)?;
        let result = Elf::load(mem, None, &mut &file, Some(GuestAddress(HIGH_RAM_START)))
            .map_err(|source| image.load_error(source))?;
        let entry = match result.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(entry) => entry,
            _ => {
                return Err(LoaderError::NoPvhNote {
                    path: path.to_path_buf(),
                });
            }
        };
        return Ok(LoadedKernel {
            format: KernelFormat::Elf,
            protocol: BootProtocol::Pvh,
            entry,
            load_addr: GuestAddress(plan.start),
            end: plan.end.max(result.kernel_end),
            setup_header: None,
        });
    }

    if let Some(hdr) = image.setup_header()? {
        let needed_end = image.check_bzimage(&hdr)?;
        image.check_fits(needed_end, ram_end)?;
        let load = GuestAddress(HIGH_RAM_START);
        let result: KernelLoaderResult = BzImage::load(
            mem,
            Some(load),
            &mut &file,
            Some(GuestAddress(HIGH_RAM_START)),
        )
        .map_err(|source| image.load_error(source))?;
        return Ok(LoadedKernel {
            format: KernelFormat::BzImage,
            protocol: BootProtocol::Linux64,
            entry: GuestAddress(result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
            load_addr: result.kernel_load,
            end: needed_end.max(result.kernel_end),
            setup_header: Some(result.setup_header.unwrap_or(hdr)),
        });
    }

    Err(LoaderError::NotAKernel {
        path: path.to_path_buf(),
    })
}

/// Where an ELF kernel's loadable segments go.
struct ElfPlan {
    start: u64,
    end: u64,
}

/// A kernel file being validated: positional reads only, so the file offset that
/// linux-loader later seeks from is untouched.
struct ImageFile<'a> {
    file: &'a File,
    path: &'a Path,
    size: u64,
}

impl<'a> ImageFile<'a> {
    fn new(file: &'a File, path: &'a Path) -> Result<Self, LoaderError> {
        let size = file
            .metadata()
            .map_err(|source| LoaderError::Read {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        Ok(ImageFile { file, path, size })
    }

    fn corrupt(&self, what: &'static str) -> LoaderError {
        LoaderError::Corrupt {
            path: self.path.to_path_buf(),
            what,
        }
    }

    fn load_error(&self, source: LinuxLoaderError) -> LoaderError {
        LoaderError::Load {
            path: self.path.to_path_buf(),
            source,
        }
    }

    /// Reads exactly `buf.len()` bytes at `offset`; `Ok(false)` if the file is shorter.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<bool, LoaderError> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.size) {
            return Ok(false);
        }
        self.file
            .read_exact_at(buf, offset)
            .map(|()| true)
            .map_err(|source| LoaderError::Read {
                path: self.path.to_path_buf(),
                source,
            })
    }

    fn starts_with(&self, magic: &[u8]) -> Result<bool, LoaderError> {
        let mut buf = vec![0u8; magic.len()];
        Ok(self.read_at(&mut buf, 0)? && buf == magic)
    }

    /// The bzImage setup header, or `None` if the file has no "HdrS" magic.
    fn setup_header(&self) -> Result<Option<setup_header>, LoaderError> {
        let mut hdr = setup_header::default();
        if !self.read_at(hdr.as_mut_slice(), SETUP_HEADER_OFFSET)? {
            return Ok(None);
        }
        let magic = hdr.header;
        Ok((magic == SETUP_HEADER_MAGIC).then_some(hdr))
    }

    /// Validates a bzImage header; returns the first address past what the kernel needs
    /// when loaded at 1 MiB.
    fn check_bzimage(&self, hdr: &setup_header) -> Result<u64, LoaderError> {
        let path = || self.path.to_path_buf();
        let version = hdr.version;
        if version < MIN_BOOT_PROTOCOL {
            return Err(LoaderError::ProtocolTooOld {
                path: path(),
                version,
            });
        }
        let xloadflags = hdr.xloadflags;
        if xloadflags & XLF_KERNEL_64 == 0 || hdr.loadflags & LOADED_HIGH == 0 {
            return Err(LoaderError::Not64Bit { path: path() });
        }
        let setup_sects = match hdr.setup_sects {
            0 => 4,
            n => u64::from(n),
        };
        let setup_size = (setup_sects + 1) * 512;
        let payload = self
            .size
            .checked_sub(setup_size)
            .filter(|p| *p > 0)
            .ok_or_else(|| self.corrupt("setup sectors extend past the end of the file"))?;
        // `syssize` is the protected-mode payload in 16-byte units, rounded up.
        let syssize = u64::from(hdr.syssize) * 16;
        if payload + 15 < syssize {
            return Err(self.corrupt("payload shorter than the header's syssize"));
        }
        // The decompressor extracts the kernel to max(load address, pref_address) (it
        // never goes below LOAD_PHYSICAL_ADDR) and needs `init_size` bytes from there.
        let pref_address = hdr.pref_address;
        let out = HIGH_RAM_START.max(pref_address);
        let init_end = out
            .checked_add(u64::from(hdr.init_size))
            .ok_or_else(|| self.corrupt("init_size overflows"))?;
        Ok(init_end.max(HIGH_RAM_START + payload))
    }

    /// Validates an ELF kernel's headers and returns where its segments go.
    fn check_elf(&self) -> Result<ElfPlan, LoaderError> {
        let mut ehdr = Elf64_Ehdr::default();
        if !self.read_at(ehdr.as_mut_slice(), 0)? {
            return Err(self.corrupt("ELF header"));
        }
        if ehdr.e_ident[EI_CLASS] != ELFCLASS64
            || ehdr.e_ident[EI_DATA] != ELFDATA2LSB
            || ehdr.e_machine != EM_X86_64
        {
            return Err(LoaderError::NotX86_64 {
                path: self.path.to_path_buf(),
            });
        }
        if usize::from(ehdr.e_phentsize) != std::mem::size_of::<Elf64_Phdr>()
            || ehdr.e_phnum == 0
            || ehdr.e_phnum > MAX_PROGRAM_HEADERS
            || ehdr.e_phoff < std::mem::size_of::<Elf64_Ehdr>() as u64
        {
            return Err(self.corrupt("program header table"));
        }
        let mut plan = ElfPlan {
            start: u64::MAX,
            end: 0,
        };
        for i in 0..u64::from(ehdr.e_phnum) {
            let mut phdr = Elf64_Phdr::default();
            let offset = ehdr.e_phoff + i * std::mem::size_of::<Elf64_Phdr>() as u64;
            if !self.read_at(phdr.as_mut_slice(), offset)? {
                return Err(self.corrupt("program header table"));
            }
            // Every segment's file contents (loadable ones and the notes linux-loader
            // parses) must lie inside the file.
            if phdr
                .p_offset
                .checked_add(phdr.p_filesz)
                .is_none_or(|end| end > self.size)
            {
                return Err(self.corrupt("segment extends past the end of the file"));
            }
            if phdr.p_type != PT_LOAD || phdr.p_filesz == 0 {
                continue;
            }
            if phdr.p_paddr < HIGH_RAM_START {
                return Err(LoaderError::LoadsTooLow {
                    path: self.path.to_path_buf(),
                    addr: phdr.p_paddr,
                });
            }
            let end = phdr
                .p_paddr
                .checked_add(phdr.p_memsz.max(phdr.p_filesz))
                .ok_or_else(|| self.corrupt("segment address overflows"))?;
            plan.start = plan.start.min(phdr.p_paddr);
            plan.end = plan.end.max(end);
        }
        if plan.end == 0 {
            return Err(self.corrupt("no loadable segment"));
        }
        Ok(plan)
    }

    fn check_fits(&self, needed_end: u64, ram_end: u64) -> Result<(), LoaderError> {
        if needed_end > ram_end {
            return Err(LoaderError::TooBig {
                path: self.path.to_path_buf(),
                needed_end,
                ram_end,
            });
        }
        Ok(())
    }
}

#[allow(clippy::unwrap_used)]
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::{Bytes, GuestMemoryMmap};

    use crate::address_plan::MIB;

    /// A real kernel to test with, if one is around: `$BOOT_TEST_BZIMAGE`/`$BOOT_TEST_VMLINUX`,
    /// the guest kit's `$VMM_KIT_BZIMAGE`/`$VMM_KIT_VMLINUX` or its files under
    /// target/guest-kit, or (bzImage only) a distribution kernel in /boot.
    pub(crate) fn real_kernel(kind: KernelFormat) -> Option<PathBuf> {
        let (vars, names): ([&str; 2], &[&str]) = match kind {
            KernelFormat::BzImage => (["BOOT_TEST_BZIMAGE", "VMM_KIT_BZIMAGE"], &["bzImage"]),
            KernelFormat::Elf => (["BOOT_TEST_VMLINUX", "VMM_KIT_VMLINUX"], &["vmlinux"]),
        };
        if let Some(p) = vars.iter().find_map(std::env::var_os) {
            return Some(PathBuf::from(p));
        }
        let kit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest-kit");
        if let Some(p) = find_named(&kit, names, 3) {
            return Some(p);
        }
        if kind == KernelFormat::BzImage {
            let mut boot: Vec<PathBuf> = std::fs::read_dir("/boot")
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
                })
                .filter(|p| File::open(p).is_ok())
                .collect();
            boot.sort();
            return boot.pop();
        }
        None
    }

    fn find_named(dir: &Path, names: &[&str], depth: u32) -> Option<PathBuf> {
        let entries = std::fs::read_dir(dir).ok()?;
        let mut dirs = Vec::new();
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.file_name().is_some_and(|n| names.iter().any(|w| n == *w)) {
                return Some(p);
            }
        }
        if depth == 0 {
            return None;
        }
        dirs.sort();
        dirs.iter().find_map(|d| find_named(d, names, depth - 1))
    }

    pub(crate) fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    pub(crate) fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("boot-loader-tests-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        let mut f = File::create(&p).unwrap();
        f.write_all(bytes).unwrap();
        p
    }

    /// A synthetic bzImage: a setup header with the given fields and a payload of
    /// `payload` bytes of 0xcc.
    fn fake_bzimage(version: u16, xloadflags: u16, payload: usize, init_size: u32) -> Vec<u8> {
        let setup_sects = 4u8;
        let mut hdr = setup_header {
            setup_sects,
            header: SETUP_HEADER_MAGIC,
            version,
            loadflags: LOADED_HIGH,
            code32_start: 0x10_0000,
            xloadflags,
            init_size,
            pref_address: 0x100_0000,
            kernel_alignment: 0x20_0000,
            initrd_addr_max: 0x7fff_ffff,
            cmdline_size: 2047,
            syssize: payload.div_ceil(16) as u32,
            ..Default::default()
        };
        hdr.boot_flag = 0xaa55;
        let mut image = vec![0u8; (usize::from(setup_sects) + 1) * 512];
        image[0x1f1..0x1f1 + std::mem::size_of::<setup_header>()].copy_from_slice(hdr.as_slice());
        image.extend(std::iter::repeat_n(0xcc, payload));
        image
    }

    /// A synthetic x86-64 ELF with one PT_LOAD at `paddr` and, if `pvh_entry` is given,
    /// a PT_NOTE with the PVH entry note.
    pub(crate) fn fake_elf(paddr: u64, code: &[u8], pvh_entry: Option<u32>) -> Vec<u8> {
        let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
        let phoff = 64u64;
        let data_off = phoff + u64::from(phnum) * 56;
        let mut note = Vec::new();
        if let Some(entry) = pvh_entry {
            note.extend_from_slice(&4u32.to_le_bytes()); // namesz
            note.extend_from_slice(&4u32.to_le_bytes()); // descsz
            note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
            note.extend_from_slice(b"Xen\0");
            note.extend_from_slice(&entry.to_le_bytes());
        }
        let code_off = data_off + note.len() as u64;
        let mut ehdr = Elf64_Ehdr::default();
        ehdr.e_ident[..4].copy_from_slice(ELFMAG);
        ehdr.e_ident[EI_CLASS] = ELFCLASS64;
        ehdr.e_ident[EI_DATA] = ELFDATA2LSB;
        ehdr.e_ident[6] = 1;
        ehdr.e_type = 2;
        ehdr.e_machine = EM_X86_64;
        ehdr.e_version = 1;
        ehdr.e_entry = paddr;
        ehdr.e_phoff = phoff;
        ehdr.e_ehsize = 64;
        ehdr.e_phentsize = 56;
        ehdr.e_phnum = phnum;
        let load = Elf64_Phdr {
            p_type: PT_LOAD,
            p_flags: 5,
            p_offset: code_off,
            p_vaddr: paddr,
            p_paddr: paddr,
            p_filesz: code.len() as u64,
            p_memsz: code.len() as u64 + 0x1000,
            p_align: 0x1000,
        };
        let mut out = ehdr.as_slice().to_vec();
        out.extend_from_slice(load.as_slice());
        if pvh_entry.is_some() {
            let n = Elf64_Phdr {
                p_type: linux_loader::elf::PT_NOTE,
                p_offset: data_off,
                p_filesz: note.len() as u64,
                p_memsz: note.len() as u64,
                p_align: 4,
                ..Default::default()
            };
            out.extend_from_slice(n.as_slice());
        }
        out.extend_from_slice(&note);
        out.extend_from_slice(code);
        out
    }

    #[test]
    fn missing_file_is_an_open_error() {
        let err = load_kernel_image(&mem(64 * MIB), Path::new("/nonexistent/bzImage")).unwrap_err();
        assert!(
            matches!(err, LoaderError::Open { ref source, .. } if source.kind() == io::ErrorKind::NotFound)
        );
    }

    #[test]
    fn directory_is_not_a_kernel() {
        let dir = std::env::temp_dir();
        let err = load_kernel_image(&mem(64 * MIB), &dir).unwrap_err();
        // Opening a directory works on Linux; reading it as a kernel must fail cleanly.
        assert!(matches!(
            err,
            LoaderError::NotAKernel { .. } | LoaderError::Read { .. }
        ));
    }

    #[test]
    fn garbage_and_empty_files_are_not_kernels() {
        let garbage: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for (name, bytes) in [
            ("garbage", &garbage[..]),
            ("empty", &[][..]),
            ("tiny", &b"\x7fEL"[..]),
        ] {
            let p = temp_file(name, bytes);
            let err = load_kernel_image(&mem(64 * MIB), &p).unwrap_err();
            assert!(
                matches!(err, LoaderError::NotAKernel { .. }),
                "{name}: {err}"
            );
        }
    }

    #[test]
    fn synthetic_bzimage_loads_at_1mib_with_64bit_entry() {
        let image = fake_bzimage(0x020f, XLF_KERNEL_64, 8192, 0x10_0000);
        let p = temp_file("bz-ok", &image);
        let m = mem(64 * MIB);
        let k = load_kernel_image(&m, &p).unwrap();
        assert_eq!(k.format, KernelFormat::BzImage);
        assert_eq!(k.protocol, BootProtocol::Linux64);
        assert_eq!(k.load_addr, GuestAddress(0x10_0000));
        assert_eq!(k.entry, GuestAddress(0x10_0200));
        // Decompression buffer: pref_address (16 MiB) + init_size (1 MiB).
        assert_eq!(k.end, 17 * MIB);
        assert_eq!(k.initrd_addr_max(), 0x7fff_ffff);
        assert_eq!(k.cmdline_max(), Some(2048));
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(), 0xcc);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(0x10_0000 + 8191)).unwrap(),
            0xcc
        );
    }

    #[test]
    fn old_boot_protocol_is_rejected() {
        let p = temp_file("bz-old", &fake_bzimage(0x0206, 0, 4096, 0));
        let err = load_kernel_image(&mem(64 * MIB), &p).unwrap_err();
        assert!(matches!(
            err,
            LoaderError::ProtocolTooOld {
                version: 0x0206,
                ..
            }
        ));
        assert!(err.to_string().contains("2.06"), "{err}");
    }

    #[test]
    fn bzimage_without_64bit_entry_is_rejected() {
        let p = temp_file("bz-32", &fake_bzimage(0x020f, 0, 4096, 0));
        let err = load_kernel_image(&mem(64 * MIB), &p).unwrap_err();
        assert!(matches!(err, LoaderError::Not64Bit { .. }));
    }

    #[test]
    fn truncated_bzimage_is_corrupt() {
        let image = fake_bzimage(0x020f, XLF_KERNEL_64, 64 * 1024, 0);
        // Cut in the payload, and cut inside the setup sectors.
        for cut in [image.len() - 4096, 0x1f1 + 0x80, 1024] {
            let p = temp_file(&format!("bz-cut-{cut}"), &image[..cut]);
            let err = load_kernel_image(&mem(64 * MIB), &p).unwrap_err();
            assert!(
                matches!(
                    err,
                    LoaderError::Corrupt { .. } | LoaderError::NotAKernel { .. }
                ),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn bzimage_too_big_for_ram_is_rejected_before_loading() {
        let image = fake_bzimage(0x020f, XLF_KERNEL_64, 4096, 100 * MIB as u32);
        let p = temp_file("bz-big", &image);
        let m = mem(64 * MIB);
        let err = load_kernel_image(&m, &p).unwrap_err();
        assert!(
            matches!(err, LoaderError::TooBig { needed_end, ram_end, .. } if needed_end == 116 * MIB && ram_end == 64 * MIB)
        );
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(),
            0,
            "nothing was loaded"
        );
    }

    #[test]
    fn synthetic_elf_with_pvh_note_loads() {
        let code = [0x90u8; 64];
        let p = temp_file("elf-pvh", &fake_elf(0x20_0000, &code, Some(0x20_0010)));
        let m = mem(64 * MIB);
        let k = load_kernel_image(&m, &p).unwrap();
        assert_eq!(k.format, KernelFormat::Elf);
        assert_eq!(k.protocol, BootProtocol::Pvh);
        assert_eq!(k.entry, GuestAddress(0x20_0010));
        assert_eq!(k.load_addr, GuestAddress(0x20_0000));
        assert_eq!(k.end, 0x20_0000 + 64 + 0x1000);
        assert_eq!(k.setup_header, None);
        assert_eq!(k.cmdline_max(), None);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x20_0000)).unwrap(), 0x90);
    }

    #[test]
    fn elf_without_pvh_note_is_rejected() {
        let p = temp_file("elf-nopvh", &fake_elf(0x20_0000, &[0x90; 16], None));
        let err = load_kernel_image(&mem(64 * MIB), &p).unwrap_err();
        assert!(matches!(err, LoaderError::NoPvhNote { .. }), "{err}");
    }

    #[test]
    fn elf_below_1mib_is_rejected() {
        let p = temp_file("elf-low", &fake_elf(0x8000, &[0x90; 16], Some(0x8000)));
        let err = load_kernel_image(&mem(64 * MIB), &p).unwrap_err();
        assert!(
            matches!(err, LoaderError::LoadsTooLow { addr: 0x8000, .. }),
            "{err}"
        );
    }

    #[test]
    fn elf_beyond_ram_is_too_big() {
        let p = temp_file(
            "elf-high",
            &fake_elf(63 * MIB, &[0x90; 16], Some(0x20_0000)),
        );
        let err = load_kernel_image(&mem(63 * MIB + 0x800), &p).unwrap_err();
        assert!(matches!(err, LoaderError::TooBig { .. }), "{err}");
    }

    #[test]
    fn non_x86_64_elf_is_rejected() {
        let mut image = fake_elf(0x20_0000, &[0x90; 16], Some(0x20_0000));
        image[EI_CLASS] = 1; // ELFCLASS32
        let p = temp_file("elf32", &image);
        let err = load_kernel_image(&mem(64 * MIB), &p).unwrap_err();
        assert!(matches!(err, LoaderError::NotX86_64 { .. }), "{err}");
    }

    #[test]
    fn every_truncation_of_an_elf_fails_cleanly() {
        let image = fake_elf(0x20_0000, &[0x90; 256], Some(0x20_0000));
        for cut in 0..image.len() {
            let p = temp_file("elf-cut", &image[..cut]);
            assert!(
                load_kernel_image(&mem(64 * MIB), &p).is_err(),
                "cut at {cut} loaded"
            );
        }
    }

    #[test]
    fn corrupt_elf_fields_never_panic() {
        let image = fake_elf(0x20_0000, &[0x90; 256], Some(0x20_0000));
        // Flip every byte of the headers and the note to a few bad values.
        for pos in 0..(64 + 2 * 56 + 20) {
            for v in [0x00u8, 0xff, 0x7f, 0x80] {
                let mut bad = image.clone();
                bad[pos] = v;
                let p = temp_file("elf-fuzz", &bad);
                let _ = load_kernel_image(&mem(64 * MIB), &p);
            }
        }
    }

    #[test]
    fn corrupt_bzimage_fields_never_panic() {
        let image = fake_bzimage(0x020f, XLF_KERNEL_64, 4096, 0x1000);
        for pos in 0x1f1..0x1f1 + std::mem::size_of::<setup_header>() {
            for v in [0x00u8, 0xff, 0x80] {
                let mut bad = image.clone();
                bad[pos] = v;
                let p = temp_file("bz-fuzz", &bad);
                let _ = load_kernel_image(&mem(64 * MIB), &p);
            }
        }
    }

    #[test]
    fn real_bzimage_loads_if_available() {
        let Some(path) = real_kernel(KernelFormat::BzImage) else {
            eprintln!("skipped: no bzImage (set BOOT_TEST_BZIMAGE, or build the guest kit)");
            return;
        };
        let m = mem(256 * MIB);
        let k = load_kernel_image(&m, &path).unwrap();
        assert_eq!(k.protocol, BootProtocol::Linux64);
        assert_eq!(k.entry, GuestAddress(0x10_0200));
        let hdr = k.setup_header.unwrap();
        let version = hdr.version;
        assert!(version >= MIN_BOOT_PROTOCOL);
        assert!(k.end > 16 * MIB && k.end < 256 * MIB, "end {:#x}", k.end);
        // A truncated copy of the real kernel is reported, not loaded.
        let bytes = std::fs::read(&path).unwrap();
        let p = temp_file("real-bz-cut", &bytes[..bytes.len() / 2]);
        assert!(matches!(
            load_kernel_image(&mem(256 * MIB), &p),
            Err(LoaderError::Corrupt { .. })
        ));
    }

    #[test]
    fn real_vmlinux_loads_with_pvh_entry_if_available() {
        let Some(path) = real_kernel(KernelFormat::Elf) else {
            eprintln!("skipped: no vmlinux (set BOOT_TEST_VMLINUX, or build the guest kit)");
            return;
        };
        let m = mem(256 * MIB);
        let k = load_kernel_image(&m, &path).unwrap();
        assert_eq!(k.protocol, BootProtocol::Pvh);
        assert!(
            k.entry.0 >= HIGH_RAM_START && k.entry.0 < k.end,
            "entry {:#x}",
            k.entry.0
        );
        assert!(k.load_addr.0 >= HIGH_RAM_START);
    }
}
