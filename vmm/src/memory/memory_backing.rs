//! How the hot-plug region's memory is backed (`--hotplug-memory
//! size=...,backend=...,hugetlb=...,prealloc=...,thp=...`), and the three
//! things a backing does to a slot: map it with every block unplugged, plug
//! blocks, unplug blocks.
//!
//! # Backends
//!
//! * `backend=ram` (the default): private anonymous memory. Unplugged
//!   blocks are made read-only (`mprotect`) and returned with
//!   `madvise(MADV_DONTNEED)`.
//! * `backend=memfd`: one sealed memfd per 128 MiB slot
//!   (`MFD_CLOEXEC | MFD_ALLOW_SEALING`, sized to the slot, then sealed
//!   against shrinking, growing and further seals), with `hugetlb=on` a
//!   hugetlbfs memfd (`MFD_HUGETLB` with the page size). Unplugged blocks
//!   are *not* the memfd: they are private anonymous read-only memory laid
//!   over the slot with `MAP_FIXED`, so a guest (or VMM) read of an
//!   unplugged block sees the kernel's zero page and allocates nothing (a
//!   read fault on a memfd hole would allocate a page, and on a hugetlbfs
//!   hole with the pool empty it would be `SIGBUS`). Plugging maps the
//!   memfd's range over the blocks, shared and writable; unplugging lays the
//!   anonymous read-only memory back and punches the blocks out of the memfd
//!   (`fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`).
//!
//! Why one memfd per slot and not one for the region: a slot's memory then
//! lives exactly as long as its mapping. The memfd's descriptor is held by
//! the slot's `GuestRegionMmap` (vm-memory's `FileOffset`), so when an
//! emptied slot's old map is freed after a grace period, the unmapping and
//! the descriptor's close free all of it, on the same path and at the same
//! time as an anonymous slot, with no punch racing readers of the old map.
//! Descriptors held are the slots mapped plus those retired and not yet
//! unmapped (at most `MAX_RETIRED_SLOTS`).
//!
//! # Huge pages
//!
//! * `thp=on`: `MADV_HUGEPAGE` on plugged memory (anonymous: the whole
//!   slot; memfd: each plugged range). Whether the host gives huge pages
//!   is its setting (`/sys/kernel/mm/transparent_hugepage/enabled`, and
//!   `shmem_enabled` for memfd); a setting that ignores the advice is
//!   warned about at start.
//! * `hugetlb=on` (memfd only, `hugetlbsize=2M`, the only size that divides
//!   the 2 MiB block virtio-mem plugs and unplugs): huge pages come from
//!   the host's pool, which the host administrator sizes. A hugetlbfs page
//!   missing when it is first touched is not an out-of-memory kill but
//!   `SIGBUS` in the toucher: for the guest, KVM fails the access and the
//!   VM stops; for the VMM's own accesses the process dies. Reservations
//!   made at `mmap` time do not help here: punching an unplugged block out
//!   of the memfd gives its reservation back, and a later plug into the
//!   same slot would fault without one. So `hugetlb=on` needs
//!   `prealloc=on`: the memfd's ranges are mapped `MAP_NORESERVE` and every
//!   plug populates its blocks before the guest is told; a pool that cannot
//!   supply them answers the plug with an error (checked first against
//!   `free_hugepages - resv_hugepages` for a message that names the pool,
//!   and in any case `MADV_POPULATE_WRITE` fails with `EFAULT` rather than
//!   raising a signal). Once populated, a plugged page is never taken away
//!   until it is unplugged.
//!
//! # Preallocation
//!
//! `prealloc=on` populates plugged blocks (`MADV_POPULATE_WRITE`, Linux
//! 5.14) after they are made writable and before the guest is told they
//! are plugged. The guest then never faults on first touch, and a host
//! that is out of memory answers the plug with an error (the device
//! answers the guest's request with an error and the VM runs on) instead
//! of killing the VM at a later page fault. Kernels without
//! `MADV_POPULATE_WRITE` are refused at start.
//!
//! Calls come from the control thread (the memory manager), whose seccomp
//! filter allows the calls they make (`seccomp/control.rs`).

use crate::cli::size::format_size;
use crate::memory::guest_memory::{HUGE_PAGE, HostMapping, RAM_FLAGS, advise_range, name_range};
use crate::memory::memory_manager::SLOT_MAPPING_NAME;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use thiserror::Error;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

/// The block size backings must work with: virtio-mem's block.
const BLOCK_SIZE: u64 = devices::virtio::VIRTIO_MEM_DEFAULT_BLOCK_SIZE;

/// Seals applied to every slot memfd: its size is fixed for its life.
pub(crate) const MEMFD_SEALS: libc::c_int =
    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Where plugged memory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// Private anonymous memory (`backend=ram`).
    #[default]
    Ram,
    /// A sealed memfd per slot (`backend=memfd`).
    Memfd,
}

/// The options of a backing as given, before their combination is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackingOptions {
    /// `backend=`.
    pub backend: Backend,
    /// `hugetlb=on`.
    pub hugetlb: bool,
    /// `hugetlbsize=`, in bytes.
    pub hugetlbsize: Option<u64>,
    /// `prealloc=on`.
    pub prealloc: bool,
    /// `thp=on`.
    pub thp: bool,
}

/// A checked backing: a combination that can work (whether the host can
/// provide it is [`MemoryBacking::check_host`]'s question).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryBacking {
    backend: Backend,
    /// hugetlbfs page size, with `hugetlb=on`.
    hugetlb: Option<u64>,
    prealloc: bool,
    thp: bool,
}

/// A combination of backing options that cannot work.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BackingConfigError {
    /// hugetlb without a memfd.
    #[error("hugetlb=on needs backend=memfd (backend=ram is anonymous memory)")]
    HugetlbNeedsMemfd,
    /// A page size without hugetlb.
    #[error("hugetlbsize= needs hugetlb=on")]
    SizeWithoutHugetlb,
    /// Both kinds of huge pages.
    #[error("thp=on and hugetlb=on exclude each other (hugetlb pages are huge already)")]
    ThpWithHugetlb,
    /// hugetlb without population.
    #[error(
        "hugetlb=on needs prealloc=on: a huge page the pool cannot supply at first touch \
         is SIGBUS, not an error the plug can report"
    )]
    HugetlbNeedsPrealloc,
    /// A page size that does not fit virtio-mem's blocks.
    #[error(
        "hugetlbsize={0} is not supported: the only size is 2M (pages must divide the 2 MiB \
         block the guest plugs and unplugs, and be larger than 4 KiB)"
    )]
    PageSize(String),
}

/// Errors checking the host at start, and of slot operations.
#[derive(Debug, Error)]
pub enum BackingError {
    /// The host has no huge pages of the size asked for.
    #[error("hugetlbsize={size}: this host has no pool of such pages ({path} is missing)")]
    NoPool {
        /// Page size as given back.
        size: String,
        /// The sysfs directory looked for.
        path: String,
    },
    /// `MADV_POPULATE_WRITE` is not supported.
    #[error("prealloc=on needs MADV_POPULATE_WRITE (Linux 5.14 or later)")]
    PopulateUnsupported(#[source] io::Error),
    /// The memfd could not be created, sized or sealed.
    #[error("cannot {what} the memfd of hot-plug slot at {gpa:#x}")]
    Memfd {
        /// "create", "size", "seal".
        what: &'static str,
        /// Slot start.
        gpa: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A slot could not be mapped.
    #[error("cannot map hot-plug slot at {gpa:#x}")]
    MapSlot {
        /// Slot start.
        gpa: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Blocks could not be mapped, protected or populated.
    #[error("cannot {what} {len:#x} bytes of hot-plug memory at {gpa:#x}")]
    Range {
        /// What failed ("make writable", "make unplugged", "map the memfd over",
        /// "populate").
        what: &'static str,
        /// Guest address.
        gpa: u64,
        /// Length.
        len: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The hugetlb pool cannot supply a plug.
    #[error(
        "hugetlb pool short: plugging {len:#x} bytes at {gpa:#x} needs {need} pages of \
         {page}, {available} are free and unreserved ({pool}/free_hugepages - resv_hugepages)"
    )]
    PoolShort {
        /// Guest address.
        gpa: u64,
        /// Length.
        len: u64,
        /// Pages needed.
        need: u64,
        /// Pages available.
        available: u64,
        /// Page size, formatted.
        page: String,
        /// The pool's sysfs directory.
        pool: String,
    },
    /// A part of a slot could be neither remapped nor protected: the slot's
    /// address range may have a hole, which the VM must not outlive.
    #[error(
        "hot-plug memory at {gpa:#x}+{len:#x} may be unmapped inside its KVM memory slot \
         ({source})"
    )]
    Hole {
        /// Guest address.
        gpa: u64,
        /// Length.
        len: u64,
        /// Why the range could not be protected.
        #[source]
        source: io::Error,
    },
}

impl TryFrom<BackingOptions> for MemoryBacking {
    type Error = BackingConfigError;

    fn try_from(o: BackingOptions) -> Result<Self, BackingConfigError> {
        if o.hugetlbsize.is_some() && !o.hugetlb {
            return Err(BackingConfigError::SizeWithoutHugetlb);
        }
        let hugetlb = if o.hugetlb {
            if o.backend != Backend::Memfd {
                return Err(BackingConfigError::HugetlbNeedsMemfd);
            }
            if o.thp {
                return Err(BackingConfigError::ThpWithHugetlb);
            }
            let size = o.hugetlbsize.unwrap_or(BLOCK_SIZE);
            if size != BLOCK_SIZE {
                return Err(BackingConfigError::PageSize(format_size(size)));
            }
            if !o.prealloc {
                return Err(BackingConfigError::HugetlbNeedsPrealloc);
            }
            Some(size)
        } else {
            None
        };
        Ok(Self {
            backend: o.backend,
            hugetlb,
            prealloc: o.prealloc,
            thp: o.thp,
        })
    }
}

impl std::fmt::Display for MemoryBacking {
    /// The options in `--hotplug-memory` spelling, defaults included.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let on = |b: bool| if b { "on" } else { "off" };
        match self.backend {
            Backend::Ram => f.write_str("backend=ram")?,
            Backend::Memfd => f.write_str("backend=memfd")?,
        }
        if let Some(size) = self.hugetlb {
            write!(f, ",hugetlb=on,hugetlbsize={}", format_size(size))?;
        }
        write!(f, ",prealloc={},thp={}", on(self.prealloc), on(self.thp))
    }
}

/// The sysfs directory of the host's pool of `page`-byte huge pages.
fn pool_dir(page: u64) -> String {
    format!("/sys/kernel/mm/hugepages/hugepages-{}kB", page >> 10)
}

fn read_count(path: &str) -> io::Result<u64> {
    std::fs::read_to_string(path)?
        .trim()
        .parse()
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// Huge pages of the pool free and not reserved by anyone.
fn pool_available(page: u64) -> io::Result<u64> {
    let dir = pool_dir(page);
    let free = read_count(&format!("{dir}/free_hugepages"))?;
    let resv = read_count(&format!("{dir}/resv_hugepages"))?;
    Ok(free.saturating_sub(resv))
}

/// Whether a THP setting file (`[always] madvise never`) ignores
/// `MADV_HUGEPAGE`.
fn thp_ignored(path: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|s| {
        s.split_whitespace()
            .any(|w| w == "[never]" || w == "[deny]")
    })
}

impl MemoryBacking {
    /// Which backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The hugetlbfs page size, with `hugetlb=on`.
    pub fn hugetlb(&self) -> Option<u64> {
        self.hugetlb
    }

    /// Whether plugs populate their blocks.
    pub fn prealloc(&self) -> bool {
        self.prealloc
    }

    /// Whether plugged memory is advised `MADV_HUGEPAGE`.
    pub fn thp(&self) -> bool {
        self.thp
    }

    /// `memfd_create` flags of a slot's memfd.
    pub(crate) fn memfd_flags(&self) -> libc::c_uint {
        let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        if let Some(page) = self.hugetlb {
            flags |= libc::MFD_HUGETLB | (page.trailing_zeros() << libc::MFD_HUGE_SHIFT);
        }
        flags
    }

    /// Checks, at start, that this host can provide the backing: the
    /// hugetlb pool's page size exists, `MADV_POPULATE_WRITE` works, a
    /// memfd of the right kind can be created. Warns (does not fail) when
    /// the host ignores `thp=on` or the hugetlb pool cannot hold one slot
    /// (it may be grown later; plugs fail with a clear error until then).
    pub fn check_host(&self) -> Result<(), BackingError> {
        if let Some(page) = self.hugetlb {
            let path = pool_dir(page);
            if !std::path::Path::new(&path).is_dir() {
                return Err(BackingError::NoPool {
                    size: format_size(page),
                    path,
                });
            }
            let slot_pages = crate::memory::memory_manager::SLOT_SIZE / page;
            match pool_available(page) {
                Ok(n) if n < slot_pages => log::warn!(
                    "hugetlb pool {path} has {n} free pages: plugs beyond {} will fail \
                     until it is grown",
                    format_size(n * page)
                ),
                Ok(_) => {}
                Err(e) => log::warn!("cannot read the hugetlb pool {path}: {e}"),
            }
        }
        if self.prealloc {
            probe_populate().map_err(BackingError::PopulateUnsupported)?;
        }
        if self.backend == Backend::Memfd {
            let fd = memfd(self.memfd_flags()).map_err(|source| BackingError::Memfd {
                what: "create",
                gpa: 0,
                source,
            })?;
            drop(fd);
        }
        if self.thp {
            let setting = match self.backend {
                Backend::Ram => "/sys/kernel/mm/transparent_hugepage/enabled",
                Backend::Memfd => "/sys/kernel/mm/transparent_hugepage/shmem_enabled",
            };
            if thp_ignored(setting) {
                log::warn!("thp=on has no effect: {setting} ignores MADV_HUGEPAGE");
            }
        }
        Ok(())
    }

    /// Maps the `size`-byte slot at `gpa` with every block unplugged:
    /// read-only, reading as zeros, holding no host memory. Named
    /// `[anon:vmm-hotplug-slot-<gpa>]` and left out of core dumps. The
    /// mapping starts at a multiple of [`HUGE_PAGE`] (and of the hugetlbfs
    /// page size), like the slot's guest address, so KVM can map it with
    /// huge pages. The region does not own it: the [`HostMapping`] does,
    /// and must outlive the region and every copy of it.
    pub(crate) fn map_slot(
        &self,
        gpa: u64,
        size: u64,
    ) -> Result<(GuestRegionMmap, Arc<HostMapping>), BackingError> {
        let map_err = |source| BackingError::MapSlot { gpa, source };
        let align = (self.hugetlb.unwrap_or(0) as usize).max(HUGE_PAGE);
        let file = match self.backend {
            Backend::Ram => None,
            Backend::Memfd => {
                let fd = memfd(self.memfd_flags()).map_err(|source| BackingError::Memfd {
                    what: "create",
                    gpa,
                    source,
                })?;
                let file = File::from(fd);
                file.set_len(size).map_err(|source| BackingError::Memfd {
                    what: "size",
                    gpa,
                    source,
                })?;
                seal(&file).map_err(|source| BackingError::Memfd {
                    what: "seal",
                    gpa,
                    source,
                })?;
                Some(file)
            }
        };
        // Read-only anonymous memory is the unplugged state of a `ram`
        // slot; for a memfd slot it only holds the address range until the
        // memfd is mapped over it.
        let mapping =
            HostMapping::aligned(size as usize, align, libc::PROT_READ).map_err(map_err)?;
        let (flags, file_offset) = match file {
            None => (RAM_FLAGS, None),
            Some(file) => {
                map_memfd_over(&mapping, &file).map_err(map_err)?;
                (
                    libc::MAP_SHARED | libc::MAP_NORESERVE,
                    Some(FileOffset::new(file, 0)),
                )
            }
        };
        let mut builder = vm_memory::mmap::MmapRegionBuilder::new(size as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags);
        if let Some(f) = file_offset {
            builder = builder.with_file_offset(f);
        }
        // SAFETY: `mapping` is a mapping of `size` bytes that the caller
        // keeps until the region and every copy of it are gone (see above).
        let region = unsafe { builder.with_raw_mmap_pointer(mapping.host() as *mut u8) }
            .build()
            .map_err(|e| map_err(io::Error::other(e)))?;
        let region = GuestRegionMmap::new(region, GuestAddress(gpa))
            .ok_or_else(|| map_err(io::Error::from_raw_os_error(libc::EINVAL)))?;
        if self.backend == Backend::Memfd {
            lay_unplugged(&region, 0, size).map_err(map_err)?;
        }
        crate::memory::guest_memory::name_mapping(&region, &slot_name(gpa));
        crate::memory::guest_memory::exclude_from_core_dumps(&region);
        if self.thp && self.backend == Backend::Ram {
            crate::memory::guest_memory::advise_hugepages(&region);
        }
        Ok((region, Arc::new(mapping)))
    }

    /// Makes the `len` bytes at `offset` of a slot mapped by
    /// [`map_slot`](Self::map_slot) plugged: writable, backed by this
    /// backing, populated with `prealloc=on`. On an error the range is
    /// unplugged again (read-only, no memory), unless the error is
    /// [`BackingError::Hole`], which the VM must not outlive.
    pub(crate) fn plug(
        &self,
        region: &GuestRegionMmap,
        offset: u64,
        len: u64,
    ) -> Result<(), BackingError> {
        let gpa = region.start_addr().0 + offset;
        let range_err = |what, source| BackingError::Range {
            what,
            gpa,
            len,
            source,
        };
        if !in_bounds(region, offset, len) {
            return Err(range_err(
                "plug",
                io::Error::from_raw_os_error(libc::EINVAL),
            ));
        }
        let host = region.as_ptr().wrapping_add(offset as usize);
        match self.backend {
            Backend::Ram => {
                protect(region, offset, len, true).map_err(|e| range_err("make writable", e))?
            }
            Backend::Memfd => {
                if let Some(page) = self.hugetlb {
                    let need = len.div_ceil(page);
                    if let Ok(available) = pool_available(page)
                        && available < need
                    {
                        return Err(BackingError::PoolShort {
                            gpa,
                            len,
                            need,
                            available,
                            page: format_size(page),
                            pool: pool_dir(page),
                        });
                    }
                }
                if let Err(e) = map_memfd(region, offset, len) {
                    // The range may now be a hole: lay the unplugged memory
                    // back.
                    if let Err(source) = lay_unplugged(region, offset, len) {
                        return Err(BackingError::Hole { gpa, len, source });
                    }
                    return Err(range_err("map the memfd over", e));
                }
                if let Err(e) = advise_range(host, len as usize, libc::MADV_DONTDUMP) {
                    log::warn!("cannot leave guest memory out of core dumps (MADV_DONTDUMP): {e}");
                }
                if self.thp
                    && let Err(e) = advise_range(host, len as usize, libc::MADV_HUGEPAGE)
                {
                    log::debug!("MADV_HUGEPAGE on hot-plug memory: {e}");
                }
            }
        }
        if self.prealloc
            && let Err(e) = advise_range(host, len as usize, libc::MADV_POPULATE_WRITE)
        {
            let undo = self.unplug(region, offset, len);
            if let Err(BackingError::Hole { .. }) = undo.protected {
                return undo.protected;
            }
            return Err(range_err("populate", e));
        }
        Ok(())
    }

    /// Makes the `len` bytes at `offset` of a slot unplugged: read-only
    /// first (a guest write in between would otherwise fault in a page that
    /// stays), then their memory returned to the host. Both steps are tried
    /// whatever the other's outcome.
    pub(crate) fn unplug(&self, region: &GuestRegionMmap, offset: u64, len: u64) -> Unplugged {
        let gpa = region.start_addr().0 + offset;
        if !in_bounds(region, offset, len) {
            let e = || io::Error::from_raw_os_error(libc::EINVAL);
            return Unplugged {
                protected: Err(BackingError::Range {
                    what: "unplug",
                    gpa,
                    len,
                    source: e(),
                }),
                returned: Err(e()),
                how: Returned::Nothing,
            };
        }
        let host = region.as_ptr().wrapping_add(offset as usize);
        match self.backend {
            Backend::Ram => {
                let protected =
                    protect(region, offset, len, false).map_err(|source| BackingError::Range {
                        what: "make read-only",
                        gpa,
                        len,
                        source,
                    });
                // `host..host + len` lies inside the slot's live private
                // anonymous mapping (checked above).
                let returned = crate::memory::guest_memory::discard_range(host, len as usize);
                Unplugged {
                    protected,
                    returned,
                    how: Returned::Dontneed,
                }
            }
            Backend::Memfd => {
                let protected = match lay_unplugged(region, offset, len) {
                    Ok(()) => Ok(()),
                    // Still the memfd, or a hole: at least read-only?
                    Err(e) => match protect(region, offset, len, false) {
                        Ok(()) => Err(BackingError::Range {
                            what: "make unplugged",
                            gpa,
                            len,
                            source: e,
                        }),
                        Err(source) => Err(BackingError::Hole { gpa, len, source }),
                    },
                };
                let returned = match region.file_offset() {
                    Some(f) => punch(f.file(), offset, len),
                    None => Err(io::Error::from_raw_os_error(libc::EBADF)),
                };
                Unplugged {
                    protected,
                    returned,
                    how: Returned::Punched,
                }
            }
        }
    }
}

/// How unplugged memory went back to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Returned {
    /// `madvise(MADV_DONTNEED)`.
    Dontneed,
    /// `fallocate(FALLOC_FL_PUNCH_HOLE)`.
    Punched,
    /// Not at all (bad range).
    Nothing,
}

/// The outcome of [`MemoryBacking::unplug`]'s two steps.
#[derive(Debug)]
pub(crate) struct Unplugged {
    /// Made read-only (or unplugged memory laid over it).
    pub protected: Result<(), BackingError>,
    /// Memory returned to the host.
    pub returned: io::Result<()>,
    /// How.
    pub how: Returned,
}

/// The `/proc/PID/maps` name of the slot at `gpa`.
pub(crate) fn slot_name(gpa: u64) -> String {
    format!("{SLOT_MAPPING_NAME}-{gpa:x}")
}

/// Maps all of `file` (read-only, shared) over `mapping`, which must be
/// exactly as long as the file.
fn map_memfd_over(mapping: &HostMapping, file: &File) -> io::Result<()> {
    // SAFETY: MAP_FIXED replaces `mapping`'s own range, made just now by
    // the caller and not yet referred to by any region, slot or memory
    // slot; `mapping` unmaps the whole range (whatever is mapped there)
    // when dropped.
    let p = unsafe {
        libc::mmap(
            mapping.host() as *mut libc::c_void,
            mapping.size(),
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_NORESERVE | libc::MAP_FIXED,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn in_bounds(region: &GuestRegionMmap, offset: u64, len: u64) -> bool {
    offset
        .checked_add(len)
        .is_some_and(|end| end <= region.len())
}

/// Makes `len` bytes at `offset` of `region` writable or read-only.
pub(crate) fn protect(
    region: &GuestRegionMmap,
    offset: u64,
    len: u64,
    writable: bool,
) -> io::Result<()> {
    if !in_bounds(region, offset, len) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let prot = if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    let host = region.as_ptr().wrapping_add(offset as usize);
    // SAFETY: `host..host + len` lies inside the slot's live mapping (checked
    // above), which this process owns; protection changes cannot make it
    // invalid. Read-only parts are never written by the VMM: its only writer
    // of hot-plug memory is the virtio-mem device, on the control thread,
    // which checks its plugged bitmap before writing, and the bitmap is
    // updated on that thread after this call.
    let rc = unsafe { libc::mprotect(host.cast(), len as usize, prot) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Lays private anonymous read-only memory over `len` bytes at `offset` of
/// `region` (unplugged blocks of a memfd slot: reads see zeros and allocate
/// nothing), named and left out of core dumps like the rest of the slot.
fn lay_unplugged(region: &GuestRegionMmap, offset: u64, len: u64) -> io::Result<()> {
    if !in_bounds(region, offset, len) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let host = region.as_ptr().wrapping_add(offset as usize);
    // SAFETY: MAP_FIXED replaces `host..host + len`, a part of the slot's
    // own mapping (checked above), which `region` owns and unmaps as a
    // whole when dropped; no Rust reference points into guest memory (it
    // is only accessed through vm-memory's volatile accessors). Readers of
    // the range see either the old or the new memory; the VMM never writes
    // blocks being unplugged (the device checks its plugged bitmap).
    let p = unsafe {
        libc::mmap(
            host.cast(),
            len as usize,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    name_range(host, len as usize, &slot_name(region.start_addr().0));
    if let Err(e) = advise_range(host, len as usize, libc::MADV_DONTDUMP) {
        log::warn!("cannot leave guest memory out of core dumps (MADV_DONTDUMP): {e}");
    }
    Ok(())
}

/// Maps the slot memfd's range `offset..offset + len` over the same range
/// of the slot, shared and writable (hugetlbfs: without a reservation; the
/// caller populates it).
fn map_memfd(region: &GuestRegionMmap, offset: u64, len: u64) -> io::Result<()> {
    let Some(f) = region.file_offset() else {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    };
    let host = region.as_ptr().wrapping_add(offset as usize);
    let file_offset = libc::off_t::try_from(f.start() + offset)
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: as in `lay_unplugged`: MAP_FIXED replaces a part of the
    // slot's own mapping (the caller checked the bounds) with the slot's
    // own memfd at the same offset; nothing else refers to the old pages.
    let p = unsafe {
        libc::mmap(
            host.cast(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE | libc::MAP_FIXED,
            f.file().as_raw_fd(),
            file_offset,
        )
    };
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Returns `len` bytes at `offset` of a memfd to the host (its size stays).
fn punch(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(offset), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate on a descriptor we own; punching a hole only frees
    // the file's pages in the range (mappings of it read zeros afterwards).
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A new memfd named after the hot-plug slots, with `flags`.
fn memfd(flags: libc::c_uint) -> io::Result<OwnedFd> {
    let name = c"vmm-hotplug-slot";
    // SAFETY: memfd_create reads the NUL-terminated name and returns a new
    // descriptor or -1; no memory of ours is written.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Seals a slot memfd against shrinking, growing and further seals.
fn seal(file: &File) -> io::Result<()> {
    // SAFETY: fcntl(F_ADD_SEALS) on a descriptor we own changes only what
    // may later be done to the file.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, MEMFD_SEALS) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether `MADV_POPULATE_WRITE` works here (one page of a scratch
/// mapping).
fn probe_populate() -> io::Result<()> {
    let r = MmapRegion::<()>::new(4096).map_err(io::Error::other)?;
    advise_range(r.as_ptr(), 4096, libc::MADV_POPULATE_WRITE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(backend: Backend) -> BackingOptions {
        BackingOptions {
            backend,
            ..BackingOptions::default()
        }
    }

    #[test]
    fn every_conflicting_combination_is_refused_with_its_reason() {
        let cases = [
            (
                BackingOptions {
                    hugetlb: true,
                    prealloc: true,
                    ..opts(Backend::Ram)
                },
                BackingConfigError::HugetlbNeedsMemfd,
            ),
            (
                BackingOptions {
                    hugetlbsize: Some(BLOCK_SIZE),
                    ..opts(Backend::Memfd)
                },
                BackingConfigError::SizeWithoutHugetlb,
            ),
            (
                BackingOptions {
                    hugetlb: true,
                    prealloc: true,
                    thp: true,
                    ..opts(Backend::Memfd)
                },
                BackingConfigError::ThpWithHugetlb,
            ),
            (
                BackingOptions {
                    hugetlb: true,
                    ..opts(Backend::Memfd)
                },
                BackingConfigError::HugetlbNeedsPrealloc,
            ),
            (
                BackingOptions {
                    hugetlb: true,
                    hugetlbsize: Some(1 << 30),
                    prealloc: true,
                    ..opts(Backend::Memfd)
                },
                BackingConfigError::PageSize("1G".into()),
            ),
        ];
        for (o, want) in cases {
            assert_eq!(MemoryBacking::try_from(o), Err(want), "{o:?}");
        }
    }

    #[test]
    fn valid_combinations_describe_themselves_in_option_spelling() {
        let b = MemoryBacking::try_from(BackingOptions::default()).unwrap();
        assert_eq!(b, MemoryBacking::default());
        assert_eq!(b.to_string(), "backend=ram,prealloc=off,thp=off");
        let b = MemoryBacking::try_from(BackingOptions {
            hugetlb: true,
            prealloc: true,
            ..opts(Backend::Memfd)
        })
        .unwrap();
        assert_eq!(b.hugetlb(), Some(2 << 20));
        assert_eq!(
            b.to_string(),
            "backend=memfd,hugetlb=on,hugetlbsize=2M,prealloc=on,thp=off"
        );
        assert_eq!(
            b.memfd_flags(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB
        );
    }
}
