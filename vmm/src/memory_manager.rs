//! Memory hot-plug: the virtio-mem region in slots that are mapped, given to
//! KVM and published to vCPUs only while they hold plugged memory.
//!
//! The region is split into fixed [`SLOT_SIZE`] slots. When the guest plugs
//! the first block of a slot, the slot is mapped (anonymous, lazily backed),
//! becomes a KVM memory slot, and a new guest memory map with it is published
//! with `RcuCell::replace` before the guest's request is answered. When a
//! slot's last block is unplugged, its KVM memory slot is deleted, a map
//! without it is published, and the old map, holding the last reference to
//! the slot's mapping, is freed by `call_rcu` after a grace period: that
//! unmaps the slot. `force_rcu()` makes that happen within one grace period
//! instead of after the call_rcu thread's batching delay. Blocks unplugged
//! from a slot still in use go back to the host with `madvise(MADV_DONTNEED)`.
//!
//! Firecracker and Cloud Hypervisor map the whole hot-plug range at boot and
//! never swap the map; here no reader can see an unmapped region because
//! every reader holds an RCU read section while it uses a map.
//!
//! Calls come from the control thread only (virtio-mem request processing),
//! with the virtio-mem device's lock held: nothing here waits for a grace
//! period (vCPUs may be waiting for that lock inside their read sections).

use crate::guest_memory::SharedMemory;
use crate::vm::Vm;
use devices::virtio::{MemoryBackend, MemoryBackendError};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use thiserror::Error;
use vm_memory::{GuestAddress, GuestRegionMmap};

/// Size of one hot-plug slot: Linux's x86 memory block size.
pub const SLOT_SIZE: u64 = 128 << 20;
/// Hot-plug slot mappings appear in `/proc/PID/maps` as
/// `[anon:vmm-hotplug-slot-<guest address in hex>]`.
pub const SLOT_MAPPING_NAME: &str = "vmm-hotplug-slot";
/// KVM memory slot number of the first hot-plug slot (RAM uses 0..).
pub const FIRST_HOTPLUG_KVM_SLOT: u32 = 16;

/// Errors of hot-plug operations.
#[derive(Debug, Error)]
pub enum HotplugError {
    /// The range is not inside the hot-plug region or not block-aligned.
    #[error("range {gpa:#x}+{len:#x} is not a block-aligned part of the hot-plug region")]
    Range {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// Mapping a slot failed.
    #[error("cannot map hot-plug slot at {gpa:#x}")]
    Map {
        /// Slot start.
        gpa: u64,
        /// Why.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// KVM refused the memory slot change.
    #[error(transparent)]
    Kvm(#[from] crate::vm::VmError),
    /// vm-memory refused the new map.
    #[error("cannot build the new guest memory map")]
    NewMap(#[source] vm_memory::GuestRegionCollectionError),
}

/// Counters and timings of hot-plug work.
#[derive(Debug, Default, Serialize)]
pub struct HotplugStats {
    /// Successful plug calls.
    pub plugs: AtomicU64,
    /// Successful unplug calls.
    pub unplugs: AtomicU64,
    /// Slots mapped (and given to KVM).
    pub slots_mapped: AtomicU64,
    /// Slots removed from KVM and retired.
    pub slots_retired: AtomicU64,
    /// Unplug calls that retired at least one slot (each publishes one map,
    /// queues one extra callback that records the unmapping, and forces).
    pub retire_events: AtomicU64,
    /// Slot mappings actually unmapped (by call_rcu callbacks).
    pub slots_unmapped: AtomicU64,
    /// Bytes returned with `MADV_DONTNEED` from slots still in use.
    pub madvised_bytes: AtomicU64,
    /// Guest memory maps published.
    pub map_swaps: AtomicU64,
    /// Control-thread time of the last map swap (memslot + publish +
    /// call_rcu), ns.
    pub last_swap_ns: AtomicU64,
    /// Sum of those times, ns.
    pub total_swap_ns: AtomicU64,
    /// Time from the last slot's retirement to its unmapping by the
    /// call_rcu thread, ns.
    pub last_retire_to_unmap_ns: AtomicU64,
}

#[derive(Debug)]
struct Slot {
    gpa: u64,
    kvm_slot: u32,
    region: Option<Arc<GuestRegionMmap>>,
    plugged: Vec<bool>,
    plugged_count: usize,
}

/// The hot-plug region's state; shared as the virtio-mem backend.
#[derive(Debug)]
pub struct MemoryManager {
    vm: Arc<Vm>,
    memory: SharedMemory,
    base: u64,
    size: u64,
    block_size: u64,
    slots: Mutex<Vec<Slot>>,
    stats: Arc<HotplugStats>,
}

/// A mapping waiting to be unmapped after a grace period.
struct Retired {
    at: Instant,
    stats: Arc<HotplugStats>,
}

impl Drop for Retired {
    fn drop(&mut self) {
        self.stats.slots_unmapped.fetch_add(1, Ordering::Relaxed);
        self.stats.last_retire_to_unmap_ns.store(
            u64::try_from(self.at.elapsed().as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

impl MemoryManager {
    /// A manager for the hot-plug region `[base, base + size)` (a multiple of
    /// [`SLOT_SIZE`]) with blocks of `block_size` (dividing [`SLOT_SIZE`]).
    pub fn new(vm: Arc<Vm>, memory: SharedMemory, base: u64, size: u64, block_size: u64) -> Self {
        let blocks = (SLOT_SIZE / block_size.max(1)) as usize;
        let slots = (0..size / SLOT_SIZE)
            .map(|i| Slot {
                gpa: base + i * SLOT_SIZE,
                kvm_slot: FIRST_HOTPLUG_KVM_SLOT + i as u32,
                region: None,
                plugged: vec![false; blocks],
                plugged_count: 0,
            })
            .collect();
        Self {
            vm,
            memory,
            base,
            size,
            block_size,
            slots: Mutex::new(slots),
            stats: Arc::new(HotplugStats::default()),
        }
    }

    /// Counters and timings.
    pub fn stats(&self) -> &Arc<HotplugStats> {
        &self.stats
    }

    /// Slots currently mapped.
    pub fn mapped_slots(&self) -> usize {
        self.lock().iter().filter(|s| s.region.is_some()).count()
    }

    /// The state `x-query-hotplug` reports: mapped slots and counters.
    pub fn state_json(&self) -> serde_json::Value {
        let slots: Vec<serde_json::Value> = self
            .lock()
            .iter()
            .filter_map(|s| {
                s.region.as_ref().map(|r| {
                    serde_json::json!({
                        "gpa": s.gpa,
                        "host": r.as_ptr() as u64,
                        "size": SLOT_SIZE,
                        "kvm-slot": s.kvm_slot,
                        "plugged-blocks": s.plugged_count,
                    })
                })
            })
            .collect();
        serde_json::json!({
            "slot-size": SLOT_SIZE,
            "block-size": self.block_size,
            "mapped-slots": slots,
            "stats": serde_json::to_value(&*self.stats).unwrap_or_default(),
        })
    }

    /// `(guest address, host address, length)` of every mapped slot.
    pub fn mapped_host_ranges(&self) -> Vec<(u64, u64, u64)> {
        self.lock()
            .iter()
            .filter_map(|s| {
                s.region
                    .as_ref()
                    .map(|r| (s.gpa, r.as_ptr() as u64, SLOT_SIZE))
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Block indices `(slot, first, last_exclusive)` covered by a range.
    fn split(&self, gpa: u64, len: u64) -> Result<Vec<(usize, usize, usize)>, HotplugError> {
        let bad = || HotplugError::Range { gpa, len };
        let end = gpa.checked_add(len).ok_or_else(bad)?;
        if len == 0
            || gpa < self.base
            || end > self.base + self.size
            || gpa % self.block_size != 0
            || len % self.block_size != 0
        {
            return Err(bad());
        }
        let mut v = Vec::new();
        let mut a = gpa;
        while a < end {
            let slot = ((a - self.base) / SLOT_SIZE) as usize;
            let slot_start = self.base + slot as u64 * SLOT_SIZE;
            let stop = end.min(slot_start + SLOT_SIZE);
            v.push((
                slot,
                ((a - slot_start) / self.block_size) as usize,
                ((stop - slot_start) / self.block_size) as usize,
            ));
            a = stop;
        }
        Ok(v)
    }

    /// Publishes a map with `add` regions added and regions at `remove`
    /// (slot starts) removed; the previous map is freed after a grace period.
    fn publish(
        &self,
        add: &[Arc<GuestRegionMmap>],
        remove: &[u64],
        retired: Option<Retired>,
    ) -> Result<(), HotplugError> {
        let g = rcu::read_lock();
        let cur = self.memory.read(&g);
        let mut mem = cur.memory().clone();
        for r in add {
            mem = mem
                .insert_region(Arc::clone(r))
                .map_err(HotplugError::NewMap)?;
        }
        for &gpa in remove {
            mem = mem
                .remove_region(GuestAddress(gpa), SLOT_SIZE)
                .map_err(HotplugError::NewMap)?
                .0;
        }
        let next = cur.next(mem);
        drop(g);
        self.memory.replace(next);
        self.stats.map_swaps.fetch_add(1, Ordering::Relaxed);
        if let Some(r) = retired {
            // Runs after the old map's own callback (FIFO): by then the
            // mapping is gone.
            rcu::call_rcu_labeled("hot-plug slot unmapped", move || drop(r));
        }
        Ok(())
    }

    fn map_slot(&self, slot: &mut Slot) -> Result<Arc<GuestRegionMmap>, HotplugError> {
        let region = Arc::new(
            GuestRegionMmap::from_range(GuestAddress(slot.gpa), SLOT_SIZE as usize, None).map_err(
                |source| HotplugError::Map {
                    gpa: slot.gpa,
                    source,
                },
            )?,
        );
        crate::guest_memory::name_mapping(&region, &format!("{SLOT_MAPPING_NAME}-{:x}", slot.gpa));
        crate::guest_memory::exclude_from_core_dumps(&region);
        let host = region.as_ptr() as u64;
        // SAFETY: the mapping is owned by `region`, which the slot and every
        // map published while the KVM slot exists keep alive; the KVM slot
        // is deleted before the last reference is given up.
        unsafe {
            self.vm
                .set_memslot(slot.kvm_slot, slot.gpa, SLOT_SIZE, host)
        }?;
        slot.region = Some(Arc::clone(&region));
        Ok(region)
    }

    fn plug_range(&self, gpa: u64, len: u64) -> Result<(), HotplugError> {
        let t = Instant::now();
        let parts = self.split(gpa, len)?;
        let mut slots = self.lock();
        let mut added = Vec::new();
        let mut newly_mapped = Vec::new();
        for &(i, _, _) in &parts {
            let slot = &mut slots[i];
            if slot.region.is_none() {
                match self.map_slot(slot) {
                    Ok(r) => {
                        added.push(r);
                        newly_mapped.push(i);
                    }
                    Err(e) => {
                        // All or nothing: undo the slots mapped so far.
                        for &j in &newly_mapped {
                            let s = &mut slots[j];
                            let _ = self.vm.delete_memslot(s.kvm_slot, s.gpa);
                            s.region = None;
                        }
                        return Err(e);
                    }
                }
            }
        }
        if !added.is_empty() {
            if let Err(e) = self.publish(&added, &[], None) {
                for &j in &newly_mapped {
                    let s = &mut slots[j];
                    let _ = self.vm.delete_memslot(s.kvm_slot, s.gpa);
                    s.region = None;
                }
                return Err(e);
            }
            self.stats
                .slots_mapped
                .fetch_add(added.len() as u64, Ordering::Relaxed);
            self.record_swap(t);
        }
        for (i, a, b) in parts {
            let slot = &mut slots[i];
            for blk in &mut slot.plugged[a..b] {
                if !*blk {
                    *blk = true;
                    slot.plugged_count += 1;
                }
            }
        }
        self.stats.plugs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn unplug_range(&self, gpa: u64, len: u64) -> Result<(), HotplugError> {
        let t = Instant::now();
        let parts = self.split(gpa, len)?;
        let mut slots = self.lock();
        // Which slots this empties, and which blocks of the others it frees.
        let mut emptied = Vec::new();
        let mut discards = Vec::new();
        for &(i, a, b) in &parts {
            let slot = &slots[i];
            let freeing: Vec<usize> = (a..b).filter(|&k| slot.plugged[k]).collect();
            if slot.region.is_some() && slot.plugged_count == freeing.len() {
                emptied.push(i);
            } else {
                discards.extend(freeing.into_iter().map(|k| (i, k)));
            }
        }
        if !emptied.is_empty() {
            // Guest accesses stop at the KVM level first...
            for (n, &i) in emptied.iter().enumerate() {
                let s = &slots[i];
                if let Err(e) = self.vm.delete_memslot(s.kvm_slot, s.gpa) {
                    // All or nothing: give back the slots already deleted.
                    self.restore_memslots(&slots, &emptied[..n]);
                    return Err(e.into());
                }
            }
            // ...then userspace readers move to a map without the slots; the
            // old map (the mappings' last owner) goes after a grace period.
            let removed: Vec<u64> = emptied.iter().map(|&i| slots[i].gpa).collect();
            let retired = Retired {
                at: Instant::now(),
                stats: Arc::clone(&self.stats),
            };
            if let Err(e) = self.publish(&[], &removed, Some(retired)) {
                self.restore_memslots(&slots, &emptied);
                return Err(e);
            }
            for &i in &emptied {
                slots[i].region = None;
            }
            self.stats
                .slots_retired
                .fetch_add(emptied.len() as u64, Ordering::Relaxed);
            self.stats.retire_events.fetch_add(1, Ordering::Relaxed);
            // Give the memory back within one grace period.
            rcu::force_rcu();
            self.record_swap(t);
        }
        for (i, k) in discards {
            if let Some(region) = &slots[i].region {
                self.discard(region, k as u64 * self.block_size, self.block_size);
            }
        }
        for (i, a, b) in parts {
            let slot = &mut slots[i];
            for blk in &mut slot.plugged[a..b] {
                if *blk {
                    *blk = false;
                    slot.plugged_count -= 1;
                }
            }
        }
        self.stats.unplugs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Re-registers the KVM memory slots of `which` (after a failed unplug).
    fn restore_memslots(&self, slots: &[Slot], which: &[usize]) {
        for &j in which {
            let r = &slots[j];
            if let Some(region) = &r.region {
                // SAFETY: as in `map_slot`: the region is still owned by the
                // slot and by the published map.
                let rc = unsafe {
                    self.vm
                        .set_memslot(r.kvm_slot, r.gpa, SLOT_SIZE, region.as_ptr() as u64)
                };
                if let Err(e) = rc {
                    log::error!("cannot restore hot-plug memory slot at {:#x}: {e}", r.gpa);
                }
            }
        }
    }

    fn record_swap(&self, since: Instant) {
        let ns = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.stats.last_swap_ns.store(ns, Ordering::Relaxed);
        self.stats.total_swap_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Returns `len` bytes at `offset` of a live slot to the host.
    fn discard(&self, region: &GuestRegionMmap, offset: u64, len: u64) {
        let host = region.as_ptr().wrapping_add(offset as usize);
        // SAFETY: `host..host + len` lies inside the slot's live mapping
        // (offset and len are block-aligned parts of it); MADV_DONTNEED on
        // private anonymous memory only drops its pages (later accesses see
        // zeros), it cannot make the mapping invalid.
        let rc = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) };
        if rc == 0 {
            self.stats.madvised_bytes.fetch_add(len, Ordering::Relaxed);
        } else {
            log::warn!(
                "madvise(MADV_DONTNEED) of unplugged guest memory failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

impl MemoryBackend for MemoryManager {
    fn plug(&self, gpa: u64, len: u64) -> Result<(), MemoryBackendError> {
        self.plug_range(gpa, len).map_err(MemoryBackendError::new)
    }

    fn unplug(&self, gpa: u64, len: u64) -> Result<(), MemoryBackendError> {
        self.unplug_range(gpa, len).map_err(MemoryBackendError::new)
    }
}
