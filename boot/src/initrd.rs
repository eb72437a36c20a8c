//! Loading an initrd (initramfs) image into guest memory.
//!
//! The initrd goes as high as possible in the RAM range below the MMIO hole, page
//! aligned, ending at or below the kernel's `initrd_addr_max` and starting above the
//! memory the kernel needs at boot, as boot loaders do so the kernel can grow upwards
//! from its load address without meeting it.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::address_plan::{PAGE_SIZE, align_down, align_up};
use crate::loader::LoadedKernel;

/// Where the initrd was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdInfo {
    /// Guest address of its first byte (page aligned).
    pub addr: GuestAddress,
    /// Its size in bytes.
    pub size: u64,
}

/// Errors loading the initrd.
#[derive(Debug, Error)]
pub enum InitrdError {
    /// The file cannot be opened (missing, or no permission).
    #[error("cannot open initrd {}", path.display())]
    Open {
        /// The initrd path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading the file's size failed.
    #[error("cannot read initrd {}", path.display())]
    Read {
        /// The initrd path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file is empty.
    #[error("initrd {} is empty", path.display())]
    Empty {
        /// The initrd path.
        path: PathBuf,
    },
    /// There is not enough room between the kernel and the top of low RAM.
    #[error(
        "initrd {} is {size} bytes, only {room} bytes of guest RAM are free for it",
        path.display()
    )]
    DoesNotFit {
        /// The initrd path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Bytes available between the kernel's end and the highest usable address.
        room: u64,
    },
    /// Copying the file into guest memory failed (including a short read).
    #[error("cannot copy initrd {} into guest memory", path.display())]
    Write {
        /// The initrd path.
        path: PathBuf,
        /// Why.
        #[source]
        source: GuestMemoryError,
    },
}

/// Chooses where an initrd of `size` bytes goes: the highest page-aligned address such
/// that it ends at or below `min(low_ram_end, kernel.initrd_addr_max() + 1)` and starts
/// at or above the kernel's end (rounded up to a page). Returns the address, or the room
/// there is when it does not fit.
pub fn place_initrd(size: u64, kernel: &LoadedKernel, low_ram_end: u64) -> Result<u64, u64> {
    let top = low_ram_end.min(kernel.initrd_addr_max().saturating_add(1));
    let bottom = align_up(kernel.end, PAGE_SIZE).unwrap_or(u64::MAX);
    let room = top.saturating_sub(bottom);
    match top.checked_sub(size) {
        Some(start) if align_down(start, PAGE_SIZE) >= bottom => Ok(align_down(start, PAGE_SIZE)),
        _ => Err(room),
    }
}

/// Loads the initrd at `path` into the RAM range below `low_ram_end`, above `kernel`.
pub fn load_initrd<M: GuestMemoryBackend>(
    mem: &M,
    path: &Path,
    kernel: &LoadedKernel,
    low_ram_end: u64,
) -> Result<InitrdInfo, InitrdError> {
    let mut file = File::open(path).map_err(|source| InitrdError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| InitrdError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    if size == 0 {
        return Err(InitrdError::Empty {
            path: path.to_path_buf(),
        });
    }
    let addr = place_initrd(size, kernel, low_ram_end).map_err(|room| InitrdError::DoesNotFit {
        path: path.to_path_buf(),
        size,
        room,
    })?;
    // `size` fits below `low_ram_end` (a guest address), so it fits a usize on 64-bit.
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| InitrdError::Write {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(InitrdInfo {
        addr: GuestAddress(addr),
        size,
    })
}

#[allow(clippy::unwrap_used)]
#[cfg(test)]
mod tests {
    use super::*;
    use linux_loader::bootparam::setup_header;

    use crate::address_plan::MIB;
    use crate::loader::tests::{mem, temp_file};
    use crate::loader::{BootProtocol, KernelFormat};

    fn kernel(end: u64, initrd_addr_max: Option<u32>) -> LoadedKernel {
        LoadedKernel {
            format: KernelFormat::BzImage,
            protocol: BootProtocol::Linux64,
            entry: GuestAddress(0x10_0200),
            load_addr: GuestAddress(0x10_0000),
            end,
            setup_header: initrd_addr_max.map(|m| setup_header {
                initrd_addr_max: m,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_page_aligned() {
        let k = kernel(20 * MIB, Some(0x7fff_ffff));
        assert_eq!(place_initrd(4096, &k, 128 * MIB), Ok(128 * MIB - 4096));
        assert_eq!(place_initrd(5000, &k, 128 * MIB), Ok(128 * MIB - 8192));
    }

    #[test]
    fn initrd_respects_initrd_addr_max() {
        // 3 GiB of low RAM but the kernel only takes initrds below 2 GiB.
        let k = kernel(20 * MIB, Some(0x7fff_ffff));
        assert_eq!(place_initrd(MIB, &k, 3 << 30), Ok((2 << 30) - MIB));
        // A zero initrd_addr_max means the protocol default, 0x7fffffff.
        let k = kernel(20 * MIB, Some(0));
        assert_eq!(place_initrd(MIB, &k, 3 << 30), Ok((2 << 30) - MIB));
        // PVH kernels (no setup header) take anything below 4 GiB.
        let k = kernel(20 * MIB, None);
        assert_eq!(place_initrd(MIB, &k, 3 << 30), Ok((3 << 30) - MIB));
    }

    #[test]
    fn initrd_never_overlaps_the_kernel() {
        let k = kernel(100 * MIB + 1, Some(0x7fff_ffff));
        // Room: from 100 MiB + 4 KiB (kernel end page-rounded) to 128 MiB.
        assert_eq!(place_initrd(28 * MIB, &k, 128 * MIB), Err(28 * MIB - 4096));
        assert_eq!(
            place_initrd(28 * MIB - 4096, &k, 128 * MIB),
            Ok(100 * MIB + 4096)
        );
    }

    #[test]
    fn load_copies_the_file_and_reports_where() {
        let bytes: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let p = temp_file("initrd-ok", &bytes);
        let m = mem(64 * MIB);
        let info = load_initrd(&m, &p, &kernel(20 * MIB, Some(0x7fff_ffff)), 64 * MIB).unwrap();
        assert_eq!(
            info,
            InitrdInfo {
                addr: GuestAddress(64 * MIB - 12288),
                size: 10_000
            }
        );
        let mut back = vec![0u8; bytes.len()];
        m.read_slice(&mut back, info.addr).unwrap();
        assert_eq!(back, bytes);
    }

    #[test]
    fn too_big_initrd_error_says_size_and_room() {
        let p = temp_file("initrd-big", &vec![1u8; 2 * MIB as usize]);
        let err = load_initrd(
            &mem(64 * MIB),
            &p,
            &kernel(63 * MIB, Some(0x7fff_ffff)),
            64 * MIB,
        )
        .unwrap_err();
        assert!(
            matches!(err, InitrdError::DoesNotFit { size, room, .. } if size == 2 * MIB && room == MIB)
        );
        let msg = err.to_string();
        assert!(msg.contains("2097152") && msg.contains("1048576"), "{msg}");
    }

    #[test]
    fn missing_and_empty_initrds_are_errors() {
        let k = kernel(20 * MIB, Some(0x7fff_ffff));
        let m = mem(64 * MIB);
        assert!(matches!(
            load_initrd(&m, Path::new("/nonexistent/initrd"), &k, 64 * MIB),
            Err(InitrdError::Open { .. })
        ));
        let p = temp_file("initrd-empty", &[]);
        assert!(matches!(
            load_initrd(&m, &p, &k, 64 * MIB),
            Err(InitrdError::Empty { .. })
        ));
    }
}
