//! Guest RAM: creating the mappings, registering them with KVM, and the
//! RCU-published map every reader of guest memory goes through.
//!
//! The map is an immutable `GuestMemoryMmap` held in an [`rcu::RcuCell`].
//! vCPU threads, device emulation and the control thread read it inside RCU
//! read sections; the memory manager (hot-plug) replaces it copy-on-write.
//! A replaced map, and any region only it still referenced, is dropped (and
//! so unmapped) on the call_rcu thread after a grace period.

use crate::kvm::vm::{Vm, VmError};
use rcu::RcuCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The published guest memory map.
pub type SharedGuestMap = Arc<RcuCell<GuestMap>>;

/// One published version of the guest memory map.
///
/// Versions are numbered from 1 in publication order. Because a single
/// writer (the control thread) publishes them and retires each predecessor
/// through `call_rcu`, whose callbacks run in order, versions are freed in
/// order too: [`MapVersions::freed_up_to`] is the newest freed version. A
/// reader holding version `g` can therefore check, without touching freed
/// memory, that its map is still alive (`GuestMap::freed_under_reader`, in tests):
/// it must be, for as long as the reader is inside its RCU read section.
#[derive(Debug)]
pub struct GuestMap {
    mem: GuestMemoryMmap,
    /// The mappings of hot-plug slots in `mem`, whose regions do not own
    /// them: each is unmapped when the last version holding it goes.
    slots: Vec<Arc<HostMapping>>,
    generation: u64,
    versions: Arc<MapVersions>,
}

/// Bookkeeping shared by all versions of one VM's map.
#[derive(Debug)]
pub(crate) struct MapVersions {
    freed_up_to: AtomicU64,
    published: AtomicU64,
    /// Boot RAM: emptied when the last version goes (held, never read).
    _ram: AlignedRam,
}

impl MapVersions {
    /// The newest version that has been freed (0: none).
    #[cfg(any(test, feature = "test-utils"))]
    pub(crate) fn freed_up_to(&self) -> u64 {
        self.freed_up_to.load(Ordering::Acquire)
    }
}

impl GuestMap {
    /// The first version of a VM's map, over `ram` (the mappings of
    /// [`map_ram`]), which is kept until every version of the map is gone.
    pub fn first(mem: GuestMemoryMmap, ram: AlignedRam) -> Self {
        let versions = Arc::new(MapVersions {
            freed_up_to: AtomicU64::new(0),
            published: AtomicU64::new(1),
            _ram: ram,
        });
        Self {
            mem,
            slots: Vec::new(),
            generation: 1,
            versions,
        }
    }

    /// The version after `self`, holding `mem`, whose hot-plug slots are
    /// this version's without the mappings starting at the host addresses
    /// in `unmapped` and with `mapped` added: every mapping a region of
    /// `mem` points into that the region does not own must be in the list.
    /// Control thread only (one writer keeps versions in publication order).
    pub(crate) fn next(
        &self,
        mem: GuestMemoryMmap,
        mapped: &[Arc<HostMapping>],
        unmapped: &[u64],
    ) -> Self {
        let generation = self.versions.published.fetch_add(1, Ordering::Relaxed) + 1;
        let slots = self
            .slots
            .iter()
            .filter(|m| !unmapped.contains(&m.host()))
            .chain(mapped)
            .cloned()
            .collect();
        Self {
            mem,
            slots,
            generation,
            versions: Arc::clone(&self.versions),
        }
    }

    /// This version's number.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether this version has been freed although the caller still holds
    /// it: an RCU violation. Always `false` when RCU works.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn freed_under_reader(&self) -> bool {
        self.versions.freed_up_to() >= self.generation
    }

    /// The map itself.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

impl std::ops::Deref for GuestMap {
    type Target = GuestMemoryMmap;
    fn deref(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

impl Drop for GuestMap {
    fn drop(&mut self) {
        self.versions
            .freed_up_to
            .fetch_max(self.generation, Ordering::Release);
    }
}

/// Label under which replacements of the map are counted in RCU statistics.
pub(crate) const MEMORY_MAP_LABEL: &str = "memory map replace";

/// Errors creating guest RAM.
#[derive(Debug, Error)]
pub enum GuestMemoryError {
    /// The host refused the mapping.
    #[error("cannot map {size:#x} bytes of guest RAM at {gpa:#x}")]
    Map {
        /// Where.
        gpa: u64,
        /// How much.
        size: usize,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A region could not be given to KVM.
    #[error("cannot register guest RAM with KVM")]
    Register(#[source] VmError),
    /// vm-memory rejected the region list.
    #[error("invalid guest RAM layout")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
}

/// Maps guest RAM for `ranges` (anonymous, private, lazily allocated,
/// named, with transparent huge pages advised) without telling KVM; see
/// [`register_ram`]. Each range's host address is congruent to its guest
/// address modulo [`HUGE_PAGE`] (see [`AlignedRam`]). The mappings stay
/// for the rest of the process: the map's regions do not own them, and
/// [`GuestMap::first`] empties them when the VM's last map goes.
pub(crate) fn map_ram(
    ranges: &[(GuestAddress, usize)],
) -> Result<(GuestMemoryMmap, AlignedRam), GuestMemoryError> {
    let mut regions = Vec::with_capacity(ranges.len());
    let mut ram = AlignedRam { ranges: Vec::new() };
    for &(gpa, size) in ranges {
        let map_err = |source| GuestMemoryError::Map {
            gpa: gpa.0,
            size,
            source,
        };
        let phase = (gpa.0 % HUGE_PAGE as u64) as usize;
        let host = map_aligned(size, phase, HUGE_PAGE, libc::PROT_READ | libc::PROT_WRITE)
            .map_err(map_err)?;
        ram.ranges.push((host as usize, size));
        // SAFETY: `host` is the start of a mapping of `size` bytes made just
        // now, which is never unmapped (`AlignedRam`).
        let mapping = unsafe {
            vm_memory::mmap::MmapRegionBuilder::new(size)
                .with_raw_mmap_pointer(host)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(RAM_FLAGS)
        }
        .build()
        .map_err(|e| map_err(std::io::Error::other(e)))?;
        let r = vm_memory::GuestRegionMmap::new(mapping, gpa)
            .ok_or_else(|| map_err(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
        name_mapping(&r, "guest-ram");
        advise_hugepages(&r);
        exclude_from_core_dumps(&r);
        regions.push(r);
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(GuestMemoryError::Layout)?;
    Ok((mem, ram))
}

/// Size of an x86-64 huge page: KVM maps guest memory with 2 MiB pages only
/// where the host address and the guest address agree modulo it (and the
/// host backs it with a transparent huge page). `mmap` alone promises 4 KiB
/// alignment (some recent kernels align large anonymous mappings; Debian
/// 12's 6.1 does not), so guest RAM mapped by chance at an odd 4 KiB is
/// mapped 4 KiB by 4 KiB in the nested page tables: 512 times the page
/// faults after every memory slot deletion, which zaps them all (measured
/// in `tests/hwhost/README.md`). QEMU and Firecracker align their RAM too.
pub(crate) const HUGE_PAGE: usize = 2 << 20;

/// The flags guest RAM is mapped with (those vm-memory's own regions use).
pub(crate) const RAM_FLAGS: libc::c_int =
    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

/// The guest RAM mappings of one VM. They are never unmapped, so no map,
/// region or KVM memory slot that still points into them can reach memory
/// that is not guest RAM; when this is dropped their memory goes back to
/// the host (`MADV_DONTNEED`) and only the address space stays.
#[derive(Debug)]
pub struct AlignedRam {
    ranges: Vec<(usize, usize)>,
}

impl Drop for AlignedRam {
    fn drop(&mut self) {
        for &(host, len) in &self.ranges {
            if let Err(e) = discard_range(host as *const u8, len) {
                log::warn!("cannot return guest RAM at {host:#x}+{len:#x} to the host: {e}");
            }
        }
    }
}

/// A mapping of `size` bytes this process made for guest memory that no
/// region owns (see [`GuestMap::next`]): unmapped when dropped.
#[derive(Debug)]
pub(crate) struct HostMapping {
    host: usize,
    size: usize,
}

impl HostMapping {
    /// A new private anonymous mapping of `size` bytes with protection
    /// `prot`, holding no memory until written, that starts at a multiple
    /// of `align` (a power of two, at least [`HUGE_PAGE`]).
    pub(crate) fn aligned(size: usize, align: usize, prot: libc::c_int) -> std::io::Result<Self> {
        let host = map_aligned(size, 0, align, prot)? as usize;
        Ok(Self { host, size })
    }

    /// Where the mapping starts.
    pub(crate) fn host(&self) -> u64 {
        self.host as u64
    }

    /// Its length in bytes.
    pub(crate) fn size(&self) -> usize {
        self.size
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        // SAFETY: the range is the mapping made by `aligned`, which only
        // this value owns; every region pointing into it is gone (the map
        // versions and the slot holding it keep it alive).
        unsafe { libc::munmap(self.host as *mut libc::c_void, self.size) };
    }
}

/// A new private anonymous mapping of `size` bytes with protection `prot`
/// whose start is `phase` bytes past a multiple of `align` (a power of
/// two): a larger mapping is made where the kernel picks, and its head and
/// tail are unmapped.
fn map_aligned(
    size: usize,
    phase: usize,
    align: usize,
    prot: libc::c_int,
) -> std::io::Result<*mut u8> {
    let len = size
        .checked_add(align)
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
    // SAFETY: a new anonymous mapping at an address the kernel picks (no
    // MAP_FIXED): no existing memory is touched.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, RAM_FLAGS, -1, 0) };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = p as usize;
    // The first address at or after `start` with the phase asked for.
    let host = (start + phase).next_multiple_of(align) - phase;
    let end = host + size;
    if host > start {
        // SAFETY: the head `[start, host)` is part of the mapping made
        // above (`host - start < align`), which nothing refers to yet.
        unsafe { libc::munmap(p, host - start) };
    }
    if start + len > end {
        // SAFETY: likewise the tail `[end, start + len)`.
        unsafe { libc::munmap(end as *mut libc::c_void, start + len - end) };
    }
    Ok(host as *mut u8)
}

/// Registers each region of `mem` as a KVM memory slot numbered from 0 and
/// returns the number of slots used. The caller keeps `mem` mapped for as
/// long as the VM lives (the slots point into it). Safe to run on another
/// thread while `mem` is being written and vCPUs are being created; no
/// vCPU may run before it returns.
pub(crate) fn register_ram(vm: &Vm, mem: &GuestMemoryMmap) -> Result<u32, GuestMemoryError> {
    let mut slot = 0u32;
    for region in mem.iter() {
        let host = region.as_ptr() as u64;
        // SAFETY: the mapping belongs to a region of `mem`; the VMM keeps
        // every region referenced by the published map (or by the memory
        // manager) for as long as its slot exists, and deletes hot-plug slots
        // before dropping their regions.
        unsafe { vm.set_memslot(slot, region.start_addr().0, region.len(), host) }
            .map_err(GuestMemoryError::Register)?;
        slot += 1;
    }
    Ok(slot)
}

/// Bytes of `mem` that are resident in host RAM (pages the guest touched).
pub(crate) fn resident_bytes(mem: &GuestMemoryMmap) -> u64 {
    // SAFETY: sysconf has no memory effects.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let mut total = 0;
    for region in mem.iter() {
        let len = region.len() as usize;
        let pages = len.div_ceil(page as usize);
        let mut vec = vec![0u8; pages];
        // SAFETY: the range is a live mapping of `region` and `vec` has one
        // byte per page of it, as mincore requires.
        let rc = unsafe { libc::mincore(region.as_ptr().cast(), len, vec.as_mut_ptr()) };
        if rc == 0 {
            total += vec.iter().filter(|b| **b & 1 != 0).count() as u64 * page;
        }
    }
    total
}

/// Names an anonymous mapping in `/proc/PID/maps` (`[anon:NAME]`), so guest
/// RAM and hot-plug slots can be told apart from the VMM's own memory, and
/// so the kernel does not merge them with neighbouring mappings. Best
/// effort: kernels without `CONFIG_ANON_VMA_NAME` ignore it.
pub(crate) fn name_mapping(region: &vm_memory::GuestRegionMmap, name: &str) {
    name_range(region.as_ptr(), region.len() as usize, name);
}

/// As [`name_mapping`], for the `len` bytes at `host`, which must lie
/// inside a live mapping of this process (a part of a hot-plug slot that
/// was mapped anew). Best effort, as [`name_mapping`].
pub(crate) fn name_range(host: *const u8, len: usize, name: &str) {
    const PR_SET_VMA: libc::c_int = 0x53564d41;
    const PR_SET_VMA_ANON_NAME: libc::c_ulong = 0;
    let Ok(cname) = std::ffi::CString::new(name) else {
        return;
    };
    // SAFETY: prctl only labels the address range (anonymous mappings in
    // it); it fails without effect on a range that is not mapped. The name
    // is a NUL-terminated string the kernel copies during the call.
    let rc = unsafe {
        libc::prctl(
            PR_SET_VMA,
            PR_SET_VMA_ANON_NAME,
            host as libc::c_ulong,
            len as libc::c_ulong,
            cname.as_ptr() as libc::c_ulong,
        )
    };
    if rc != 0 {
        log::debug!(
            "cannot name mapping {name}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// `madvise(ADVICE)` over the whole of `region`.
fn advise(region: &vm_memory::GuestRegionMmap, advice: libc::c_int) -> std::io::Result<()> {
    advise_range(region.as_ptr(), region.len() as usize, advice)
}

/// `madvise(ADVICE)` over `len` bytes at `host`, a range inside a live
/// mapping of guest memory, with advice that only changes flags on the
/// mapping or how the kernel backs it (`MADV_DONTDUMP`, `MADV_HUGEPAGE`,
/// `MADV_POPULATE_WRITE`), never its contents or validity.
pub(crate) fn advise_range(
    host: *const u8,
    len: usize,
    advice: libc::c_int,
) -> std::io::Result<()> {
    debug_assert!(matches!(
        advice,
        libc::MADV_DONTDUMP | libc::MADV_HUGEPAGE | libc::MADV_POPULATE_WRITE
    ));
    // SAFETY: the advice callers give (checked above in debug builds)
    // changes flags on the mapping or allocates its pages, never its
    // contents or validity; on a range that is not mapped madvise fails.
    let rc = unsafe { libc::madvise(host.cast_mut().cast(), len, advice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `madvise(MADV_DONTNEED)` over `len` bytes at `host`, a range inside a
/// live private anonymous mapping of guest memory: its pages go back to
/// the host and later reads see zeros. For memory whose contents nobody
/// needs any more (unplugged blocks, RAM discarded by a reset).
pub(crate) fn discard_range(host: *const u8, len: usize) -> std::io::Result<()> {
    // SAFETY: on a private anonymous mapping MADV_DONTNEED only drops the
    // pages (the range stays mapped and reads as zeros), so no reference
    // the VMM holds becomes invalid; guest memory is accessed only through
    // volatile copies, so a changed content is no Rust-level hazard. On a
    // range that is not mapped madvise fails.
    let rc = unsafe { libc::madvise(host.cast_mut().cast(), len, libc::MADV_DONTNEED) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Leaves guest memory out of the VMM's core dumps (`MADV_DONTDUMP`, as
/// QEMU's `dump-guest-core=off` does): a crash must not write the guest's
/// secrets, or GiBs of RAM, into a core file. Best effort: a failure is
/// logged and changes nothing else.
pub(crate) fn exclude_from_core_dumps(region: &vm_memory::GuestRegionMmap) {
    if let Err(e) = advise(region, libc::MADV_DONTDUMP) {
        log::warn!("cannot leave guest memory out of core dumps (MADV_DONTDUMP): {e}");
    }
}

/// Asks for transparent huge pages on guest memory (as QEMU does): fewer
/// host page faults and TLB misses, and KVM can map the guest with 2 MiB
/// pages. Best effort: hosts with THP off ignore it.
pub(crate) fn advise_hugepages(region: &vm_memory::GuestRegionMmap) {
    if let Err(e) = advise(region, libc::MADV_HUGEPAGE) {
        log::debug!("MADV_HUGEPAGE on guest memory: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    /// The `VmFlags` of this process's mapping that holds `addr`.
    fn vm_flags(addr: u64) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((a, b)) = range.split_once('-')
                && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
            {
                inside = a <= addr && addr < b;
            } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
                return flags.trim().to_string();
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[test]
    fn guest_ram_host_addresses_agree_with_guest_addresses_modulo_a_huge_page() {
        let ranges = [
            (GuestAddress(0), 4 << 20),
            (GuestAddress(0x50_0000), 3 << 20),
            (GuestAddress(1 << 32), (2 << 20) + 4096),
        ];
        // Several times: the kernel's choice of address differs as other
        // mappings come and go.
        let mut kept = Vec::new();
        for _ in 0..8 {
            let (mem, ram) = map_ram(&ranges).unwrap();
            for r in mem.iter() {
                assert_eq!(
                    r.as_ptr() as u64 % HUGE_PAGE as u64,
                    r.start_addr().0 % HUGE_PAGE as u64,
                    "guest {:#x} at host {:p}",
                    r.start_addr().0,
                    r.as_ptr()
                );
            }
            // An odd-sized mapping (malloc maps large buffers) between
            // rounds moves the kernel's next choice.
            kept.push((mem, ram, vec![0u8; 3 * 4096 + 12345 * 4096]));
        }
    }

    #[test]
    fn dropped_guest_ram_goes_back_to_the_host_and_stays_mapped() {
        let (mem, ram) = map_ram(&[(GuestAddress(0), 4 << 20)]).unwrap();
        mem.write_slice(&[0xa5; 8192], GuestAddress(0x1000))
            .unwrap();
        assert!(resident_bytes(&mem) >= 8192);
        drop(ram);
        assert_eq!(resident_bytes(&mem), 0);
        let mut back = [0xffu8; 16];
        mem.read_slice(&mut back, GuestAddress(0x1000)).unwrap();
        assert_eq!(back, [0; 16]);
    }

    #[test]
    fn guest_ram_is_left_out_of_core_dumps() {
        let (mem, _ram) =
            map_ram(&[(GuestAddress(0), 4 << 20), (GuestAddress(1 << 32), 2 << 20)]).unwrap();
        for r in mem.iter() {
            let flags = vm_flags(r.as_ptr() as u64);
            assert!(
                flags.split_whitespace().any(|f| f == "dd"),
                "guest RAM at {:#x} may be dumped: VmFlags {flags}",
                r.start_addr().0
            );
        }
    }
}
