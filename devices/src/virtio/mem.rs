//! The virtio-mem device model (virtio 1.2 §5.15, device ID 24).
//!
//! The device manages a guest-physical region split into fixed-size blocks. The VMM
//! sets a requested size ([`VirtioMem::set_requested_size`], QMP `qom-set
//! requested-size`); the guest driver answers with PLUG and UNPLUG requests for ranges of
//! blocks on the single request queue. This model decides everything virtio-mem: the
//! configuration space, request validation, the plugged-block bitmap and the responses.
//! The memory work itself goes through a [`MemoryBackend`] the VMM implements.
//!
//! Choices, with the facts behind them:
//! - Feature bits: only `VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE` (the VMM does not back
//!   unplugged memory at all), and `FEATURES_OK` fails if the driver does not accept it,
//!   as QEMU does on x86, where drivers older than Linux 5.16 may read unplugged memory.
//!   Linux 6.1's driver always accepts the bit (it is in its feature table
//!   unconditionally) and behaves the same either way. `VIRTIO_MEM_F_ACPI_PXM` is
//!   offered only when the VMM describes NUMA nodes to the guest
//!   ([`VirtioMemConfig::acpi_pxm`], an ACPI SRAT), as QEMU offers it only with NUMA
//!   configured; the driver may leave it unacked.
//! - Block size: [`VIRTIO_MEM_DEFAULT_BLOCK_SIZE`] = 2 MiB, QEMU's default on x86 (the
//!   THP size). Linux 6.1 accepts any power of two; with 2 MiB blocks and 128 MiB memory
//!   blocks it plugs 2 MiB sub-blocks (its "SBM" mode).
//! - Usable region: as QEMU computes it, the requested size plus
//!   [`VIRTIO_MEM_USABLE_EXTENT`] (two x86 memory blocks), rounded up to the block size
//!   and capped at the region size, 0 when nothing is requested. It only grows, except on
//!   UNPLUG_ALL and system reset. Linux only uses whole 128 MiB memory blocks inside it.
//! - A backend failure is answered BUSY, as QEMU does: Linux 6.1 retries BUSY with a
//!   back-off, while it treats ERROR on PLUG/UNPLUG as "unknown error" and gives up on
//!   the device until reboot.
//! - A device reset (driver writes status 0) keeps every plugged block: the spec forbids
//!   changing block states on device reset, and the guest may still use plugged memory
//!   (for example after unloading the driver). [`VirtioMem::system_reset`] unplugs
//!   everything, for machine resets.
//! - Malformed chains (cut short, readable after writable, request shorter than 24 bytes,
//!   response room shorter than 10 bytes, buffers outside guest memory, more descriptors
//!   than the queue size) break the device,
//!   as QEMU's `virtio_error` does; unknown request types are answered ERROR.
//! - Every requested-size write starts a resize whose outcome the device follows
//!   (module [`mem_progress`](super::mem_progress)): done when the plugged size reaches
//!   the requested size, stalled when it stops getting closer for the stall timeout,
//!   with the reason. The VMM polls it ([`VirtioMem::resize_poll`]) after each batch of
//!   requests, after each requested-size write and at the stall deadline.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use thiserror::Error;
use virtio_bindings::virtio_ids::VIRTIO_ID_MEM;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{ByteValued, GuestMemoryMmap, Le16, Le64};

use super::chain::{ChainError, RequestBuffers};
use super::device::{QueueProgress, VirtioDevice, VirtioDeviceError};
use super::interrupt::{VirtioInterrupt, VirtioInterruptKind};
use super::mem_backend::{MemoryBackend, MemoryBackendError};
use super::mem_bitmap::BlockBitmap;
use super::mem_progress::{
    DriverView, ResizeEvent, ResizeState, ResizeTracker, StallReason, Stamp,
};
use super::mem_request::{
    BlockState, MEM_REQUEST_SIZE, MEM_RESPONSE_SIZE, MemRequest, MemResponse,
};
use crate::interrupt::InterruptError;

/// Feature bit: `node_id` is a valid ACPI proximity domain (offered with
/// [`VirtioMemConfig::acpi_pxm`]).
pub const VIRTIO_MEM_F_ACPI_PXM: u32 = 0;
/// Feature bit: the driver must not access unplugged memory (offered and required).
pub const VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE: u32 = 1;
/// The default block size: 2 MiB, the x86 THP size (QEMU's default).
pub const VIRTIO_MEM_DEFAULT_BLOCK_SIZE: u64 = 2 << 20;
/// The smallest block size accepted: one 4 KiB page.
pub const VIRTIO_MEM_MIN_BLOCK_SIZE: u64 = 4 << 10;
/// How far the usable region extends past the requested size: two 128 MiB x86 memory
/// blocks (QEMU's `VIRTIO_MEM_USABLE_EXTENT`).
pub const VIRTIO_MEM_USABLE_EXTENT: u64 = 2 * (128 << 20);
/// Size of the request queue (QEMU's).
pub const VIRTIO_MEM_QUEUE_SIZE: u16 = 128;
/// Size of `struct virtio_mem_config`.
pub const VIRTIO_MEM_CONFIG_SIZE: usize = 56;

/// The configuration space as the driver reads it (`struct
/// virtio_mem_config`, virtio 1.2 §5.15.4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct WireConfig {
    block_size: Le64,
    node_id: Le16,
    padding: [u8; 6],
    addr: Le64,
    region_size: Le64,
    usable_region_size: Le64,
    plugged_size: Le64,
    requested_size: Le64,
}

// SAFETY: little-endian integer fields only, with the spec's padding as an
// explicit field (no implicit padding: the size assertion below), so every
// byte pattern is a valid value and every value's bytes are initialised.
unsafe impl ByteValued for WireConfig {}

const _: () = assert!(std::mem::size_of::<WireConfig>() == VIRTIO_MEM_CONFIG_SIZE);

const QUEUE_SIZES: [u16; 1] = [VIRTIO_MEM_QUEUE_SIZE];
const OFFERED_FEATURES: u64 = 1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE;

/// Errors of the virtio-mem device.
#[derive(Debug, Error)]
pub enum VirtioMemError {
    /// The block size is not a power of two of at least 4 KiB.
    #[error("block-size {0:#x} is not a power of two of at least 4 KiB")]
    BlockSize(u64),
    /// The region start is not a multiple of the block size.
    #[error("memaddr {addr:#x} is not a multiple of the block-size {block_size:#x}")]
    UnalignedAddress {
        /// The region start.
        addr: u64,
        /// The block size.
        block_size: u64,
    },
    /// The region size is zero or not a multiple of the block size.
    #[error("size {size:#x} is not a non-zero multiple of the block-size {block_size:#x}")]
    RegionSize {
        /// The region size.
        size: u64,
        /// The block size.
        block_size: u64,
    },
    /// The region does not fit in the address space (or its bitmap in memory).
    #[error("region at {addr:#x} of size {size:#x} is too large")]
    RegionTooLarge {
        /// The region start.
        addr: u64,
        /// The region size.
        size: u64,
    },
    /// A requested size that is not a multiple of the block size.
    #[error("requested-size {size:#x} is not a multiple of the block-size {block_size:#x}")]
    UnalignedRequestedSize {
        /// The refused size.
        size: u64,
        /// The block size.
        block_size: u64,
    },
    /// A requested size larger than the region.
    #[error("requested-size {size:#x} exceeds the maximum size {max:#x}")]
    RequestedSizeTooLarge {
        /// The refused size.
        size: u64,
        /// The region size.
        max: u64,
    },
    /// The configuration changed but the change interrupt could not be raised.
    #[error("cannot raise the configuration-change interrupt")]
    Interrupt(#[source] InterruptError),
    /// Unplugging during a system reset failed; some blocks are still plugged.
    #[error("cannot unplug all memory")]
    Backend(#[source] MemoryBackendError),
}

/// How to build a [`VirtioMem`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMemConfig {
    /// Guest-physical start of the region; a multiple of `block_size`. Linux uses the
    /// region in 128 MiB memory blocks, so a 128 MiB-aligned start wastes nothing.
    pub addr: u64,
    /// Size of the region (the most that can be plugged); a non-zero multiple of
    /// `block_size`.
    pub region_size: u64,
    /// Block size: a power of two, at least [`VIRTIO_MEM_MIN_BLOCK_SIZE`].
    pub block_size: u64,
    /// NUMA node (ACPI proximity domain) of the region, reported to the VMM's clients
    /// and, with `acpi_pxm`, to the guest.
    pub node_id: u16,
    /// Offer `VIRTIO_MEM_F_ACPI_PXM`: `node_id` is a proximity domain of the guest's
    /// ACPI SRAT. Off by default (no SRAT).
    pub acpi_pxm: bool,
    /// The requested size at start; a multiple of `block_size`, at most `region_size`.
    pub requested_size: u64,
}

impl VirtioMemConfig {
    /// A region at `addr` of `region_size` bytes with the default block size, node 0 and
    /// nothing requested.
    pub fn new(addr: u64, region_size: u64) -> VirtioMemConfig {
        VirtioMemConfig {
            addr,
            region_size,
            block_size: VIRTIO_MEM_DEFAULT_BLOCK_SIZE,
            node_id: 0,
            acpi_pxm: false,
            requested_size: 0,
        }
    }
}

/// A consistent snapshot of the device, for QMP `query-memory-devices` and friends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMemInfo {
    /// Guest-physical start of the region (QMP `memaddr`).
    pub addr: u64,
    /// Size of the region (QMP `max-size`).
    pub region_size: u64,
    /// Block size (QMP `block-size`).
    pub block_size: u64,
    /// NUMA node (QMP `node`).
    pub node_id: u16,
    /// The requested size (QMP `requested-size`).
    pub requested_size: u64,
    /// The plugged size (QMP `size`).
    pub plugged_size: u64,
    /// The usable part of the region, from its start.
    pub usable_region_size: u64,
}

/// How many requests of one type got which answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResponseCounts {
    /// Answered ACK.
    pub ack: u64,
    /// Answered NACK.
    pub nack: u64,
    /// Answered BUSY.
    pub busy: u64,
    /// Answered ERROR.
    pub error: u64,
}

impl ResponseCounts {
    fn count(&mut self, response: MemResponse) {
        let counter = match response {
            MemResponse::Ack(_) => &mut self.ack,
            MemResponse::Nack => &mut self.nack,
            MemResponse::Busy => &mut self.busy,
            MemResponse::Error => &mut self.error,
        };
        *counter += 1;
    }
}

/// Request counters since the device was created (see [`VirtioMem::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VirtioMemStats {
    /// PLUG requests by answer.
    pub plug: ResponseCounts,
    /// UNPLUG requests by answer.
    pub unplug: ResponseCounts,
    /// UNPLUG_ALL requests by answer.
    pub unplug_all: ResponseCounts,
    /// STATE requests by answer.
    pub state: ResponseCounts,
    /// Requests of an unknown type (answered ERROR).
    pub unknown: u64,
    /// Descriptor chains so malformed that they broke the device.
    pub malformed: u64,
    /// Backend calls that failed.
    pub backend_failures: u64,
}

/// A resize event ([`VirtioMem::resize_poll`]) with the device's sizes when it was
/// found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResizeReport {
    /// What happened.
    pub event: ResizeEvent,
    /// The requested size.
    pub requested_size: u64,
    /// The plugged size.
    pub plugged_size: u64,
    /// For a stall while the guest should unplug: the ranges still plugged, as
    /// `(gpa, len)`, ascending and maximal. Empty otherwise.
    pub plugged_ranges: Vec<(u64, u64)>,
}

/// What [`VirtioMem::resize_poll`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResizePoll {
    /// The event due now, if any (each is reported once).
    pub report: Option<ResizeReport>,
    /// When to poll again even if nothing happens (the stall deadline), if ever.
    pub next_deadline: Option<Instant>,
}

/// Where the current resize stands ([`VirtioMem::resize_status`]), for
/// `x-query-hotplug`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResizeStatus {
    /// The state.
    pub state: ResizeState,
    /// The requested size.
    pub requested_size: u64,
    /// The plugged size.
    pub plugged_size: u64,
    /// The stall timeout.
    pub stall_timeout: Duration,
    /// When the requested size was last written, if ever.
    pub last_request: Option<SystemTime>,
    /// When the guest last got closer to the requested size, if ever.
    pub last_progress: Option<SystemTime>,
    /// When the resize counted as stalled (set while [`ResizeState::Stalled`]).
    pub stalled_since: Option<SystemTime>,
    /// Why it is stalled (set while [`ResizeState::Stalled`]).
    pub stall_reason: Option<StallReason>,
    /// While stalled with the guest to unplug: the ranges still plugged.
    pub plugged_ranges: Vec<(u64, u64)>,
}

#[derive(Debug)]
struct MemState {
    bitmap: BlockBitmap,
    requested_size: u64,
    usable_region_size: u64,
    generation: u32,
    interrupt: Option<Arc<VirtioInterrupt>>,
    size_changed: bool,
    stats: VirtioMemStats,
    resize: ResizeTracker,
}

/// A virtio-mem device.
///
/// Put it behind a transport ([`VirtioMmio`](super::VirtioMmio)) and keep an `Arc` for
/// the VMM's own calls. All state sits behind one lock, held for a whole batch of
/// requests including the backend calls. Configuration reads from vCPU threads wait
/// for that lock.
pub struct VirtioMem {
    addr: u64,
    region_size: u64,
    block_size: u64,
    node_id: u16,
    features: u64,
    backend: Arc<dyn MemoryBackend>,
    state: Mutex<MemState>,
}

impl VirtioMem {
    /// Creates a device with every block unplugged.
    ///
    /// Fails if the block size is not a power of two of at least 4 KiB, the region start
    /// or size is not a multiple of it, the region is empty or runs past the end of the
    /// address space, or the initial requested size is invalid (see
    /// [`set_requested_size`](VirtioMem::set_requested_size)).
    pub fn new(
        config: VirtioMemConfig,
        backend: Arc<dyn MemoryBackend>,
    ) -> Result<VirtioMem, VirtioMemError> {
        let bs = config.block_size;
        if !bs.is_power_of_two() || bs < VIRTIO_MEM_MIN_BLOCK_SIZE {
            return Err(VirtioMemError::BlockSize(bs));
        }
        if !config.addr.is_multiple_of(bs) {
            return Err(VirtioMemError::UnalignedAddress {
                addr: config.addr,
                block_size: bs,
            });
        }
        if config.region_size == 0 || !config.region_size.is_multiple_of(bs) {
            return Err(VirtioMemError::RegionSize {
                size: config.region_size,
                block_size: bs,
            });
        }
        let too_large = VirtioMemError::RegionTooLarge {
            addr: config.addr,
            size: config.region_size,
        };
        if config.addr.checked_add(config.region_size).is_none() {
            return Err(too_large);
        }
        let Ok(blocks) = usize::try_from(config.region_size / bs) else {
            return Err(too_large);
        };
        let dev = VirtioMem {
            addr: config.addr,
            region_size: config.region_size,
            block_size: bs,
            node_id: config.node_id,
            features: if config.acpi_pxm {
                OFFERED_FEATURES | 1 << VIRTIO_MEM_F_ACPI_PXM
            } else {
                OFFERED_FEATURES
            },
            backend,
            state: Mutex::new(MemState {
                bitmap: BlockBitmap::new(blocks),
                requested_size: 0,
                usable_region_size: 0,
                generation: 0,
                interrupt: None,
                size_changed: false,
                stats: VirtioMemStats::default(),
                resize: ResizeTracker::new(),
            }),
        };
        dev.check_requested_size(config.requested_size)?;
        {
            let mut st = dev.lock();
            st.requested_size = config.requested_size;
            dev.resize_usable_region(&mut st, true);
            if config.requested_size != 0 {
                st.resize.request(Stamp::now(), config.requested_size, 0);
            }
        }
        Ok(dev)
    }

    /// Sets the size the guest is asked to plug (QMP `qom-set ... requested-size`).
    ///
    /// Refuses sizes that are not a multiple of the block size or exceed the region,
    /// with errors whose text suits a QMP error `desc`. Otherwise updates the
    /// configuration (growing the usable region if needed), changes the configuration
    /// generation, and, if the driver is active, raises a configuration-change
    /// interrupt, even if the size did not change (which makes the driver look again).
    /// If raising the interrupt fails the new size stays set and
    /// [`VirtioMemError::Interrupt`] is returned. Every accepted call starts a new
    /// resize for [`resize_poll`](VirtioMem::resize_poll) (a done event is owed, the
    /// stall clock restarts). Blocks while a request batch is in progress.
    pub fn set_requested_size(&self, size: u64) -> Result<(), VirtioMemError> {
        self.check_requested_size(size)?;
        let interrupt = {
            let mut st = self.lock();
            st.requested_size = size;
            let plugged = self.plugged_size_of(&st);
            st.resize.request(Stamp::now(), size, plugged);
            st.generation = st.generation.wrapping_add(1);
            self.resize_usable_region(&mut st, false);
            st.interrupt.clone()
        };
        log::debug!("virtio-mem: requested size set to {size:#x}");
        match interrupt {
            Some(irq) => irq
                .signal(VirtioInterruptKind::ConfigChange)
                .map_err(VirtioMemError::Interrupt),
            None => Ok(()),
        }
    }

    /// A consistent snapshot of the region, sizes and node.
    pub fn info(&self) -> VirtioMemInfo {
        let st = self.lock();
        VirtioMemInfo {
            addr: self.addr,
            region_size: self.region_size,
            block_size: self.block_size,
            node_id: self.node_id,
            requested_size: st.requested_size,
            plugged_size: self.plugged_size_of(&st),
            usable_region_size: st.usable_region_size,
        }
    }

    /// Guest-physical start of the region.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Size of the region.
    pub fn region_size(&self) -> u64 {
        self.region_size
    }

    /// The block size.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// The NUMA node.
    pub fn node_id(&self) -> u16 {
        self.node_id
    }

    /// The requested size.
    pub fn requested_size(&self) -> u64 {
        self.lock().requested_size
    }

    /// The plugged size: block size times plugged blocks.
    pub fn plugged_size(&self) -> u64 {
        let st = self.lock();
        self.plugged_size_of(&st)
    }

    /// The guest-physical ranges currently plugged, as `(gpa, len)`, ascending and
    /// maximal (adjacent plugged blocks form one range).
    pub fn plugged_ranges(&self) -> Vec<(u64, u64)> {
        let st = self.lock();
        self.ranges_of(&st)
    }

    fn ranges_of(&self, st: &MemState) -> Vec<(u64, u64)> {
        st.bitmap
            .set_runs()
            .into_iter()
            .map(|(first, count)| (self.block_addr(first), count as u64 * self.block_size))
            .collect()
    }

    /// If the plugged size changed since the last call, the current plugged size.
    ///
    /// The VMM calls it after [`VirtioMmio::process_queue`](super::VirtioMmio::process_queue)
    /// and [`system_reset`](VirtioMem::system_reset) to emit QMP's
    /// `MEMORY_DEVICE_SIZE_CHANGE`; each change is reported once.
    pub fn take_size_change(&self) -> Option<u64> {
        let mut st = self.lock();
        if std::mem::take(&mut st.size_changed) {
            Some(self.plugged_size_of(&st))
        } else {
            None
        }
    }

    /// Request counters since creation.
    pub fn stats(&self) -> VirtioMemStats {
        self.lock().stats
    }

    /// The resize event due at `now`, given what the transport says about the driver
    /// (`view`), and when to poll again. Each event is returned once: one
    /// [`ResizeEvent::Done`] per requested-size write once the plugged size matches,
    /// one [`ResizeEvent::Stalled`] per stall. The VMM calls it on the control thread
    /// after processing requests, after writing the requested size, and at
    /// [`ResizePoll::next_deadline`].
    pub fn resize_poll(&self, now: Instant, view: DriverView) -> ResizePoll {
        let mut st = self.lock();
        let (requested, plugged) = (st.requested_size, self.plugged_size_of(&st));
        let report = st
            .resize
            .poll(now, view, requested, plugged)
            .map(|event| ResizeReport {
                plugged_ranges: match event {
                    ResizeEvent::Stalled(_) if plugged > requested => self.ranges_of(&st),
                    _ => Vec::new(),
                },
                event,
                requested_size: requested,
                plugged_size: plugged,
            });
        ResizePoll {
            report,
            next_deadline: st.resize.next_deadline(requested, plugged),
        }
    }

    /// Where the current resize stands at `now`, with the stall reason `view` implies.
    pub fn resize_status(&self, now: Instant, view: DriverView) -> ResizeStatus {
        let st = self.lock();
        let (requested, plugged) = (st.requested_size, self.plugged_size_of(&st));
        let state = st.resize.state(now, requested, plugged);
        let stalled = state == ResizeState::Stalled;
        ResizeStatus {
            state,
            requested_size: requested,
            plugged_size: plugged,
            stall_timeout: st.resize.stall_timeout(),
            last_request: st.resize.last_request().map(|s| s.wall),
            last_progress: st.resize.last_progress().map(|s| s.wall),
            stalled_since: stalled
                .then(|| st.resize.stalls_at(requested, plugged).map(|s| s.wall))
                .flatten(),
            stall_reason: stalled.then(|| st.resize.reason(view, requested, plugged)),
            plugged_ranges: if stalled && plugged > requested {
                self.ranges_of(&st)
            } else {
                Vec::new()
            },
        }
    }

    /// The stall timeout of resizes.
    pub fn stall_timeout(&self) -> Duration {
        self.lock().resize.stall_timeout()
    }

    /// Sets the stall timeout (clamped to
    /// [`MIN_STALL_TIMEOUT`](super::mem_progress::MIN_STALL_TIMEOUT)..=
    /// [`MAX_STALL_TIMEOUT`](super::mem_progress::MAX_STALL_TIMEOUT)); it applies to the
    /// resize in progress too. Returns the timeout set. The caller polls again
    /// ([`resize_poll`](VirtioMem::resize_poll)) for the new deadline.
    pub fn set_stall_timeout(&self, timeout: Duration) -> Duration {
        self.lock().resize.set_stall_timeout(timeout)
    }

    /// Unplugs every plugged block through the backend and shrinks the usable region to
    /// what the requested size needs: what a machine reset does to the device (virtio
    /// 1.2 §5.15.6: the device SHOULD unplug all memory on system reset). The requested
    /// size stays. Call it on the control thread while the guest is stopped. If the
    /// backend fails, the blocks unplugged so far stay unplugged, the rest stay plugged,
    /// and the error is returned.
    pub fn system_reset(&self) -> Result<(), VirtioMemError> {
        let mut st = self.lock();
        self.unplug_all(&mut st).map_err(VirtioMemError::Backend)?;
        // The kept requested size is a new resize for the rebooted guest: it
        // is followed to its outcome like a requested-size write.
        if st.requested_size != 0 {
            let (requested, plugged) = (st.requested_size, self.plugged_size_of(&st));
            st.resize.request(Stamp::now(), requested, plugged);
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, MemState> {
        // Updates of the state either complete or leave it as before (the bitmap is
        // changed only after the backend succeeded), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check_requested_size(&self, size: u64) -> Result<(), VirtioMemError> {
        if !size.is_multiple_of(self.block_size) {
            return Err(VirtioMemError::UnalignedRequestedSize {
                size,
                block_size: self.block_size,
            });
        }
        if size > self.region_size {
            return Err(VirtioMemError::RequestedSizeTooLarge {
                size,
                max: self.region_size,
            });
        }
        Ok(())
    }

    fn plugged_size_of(&self, st: &MemState) -> u64 {
        st.bitmap.count_set() as u64 * self.block_size
    }

    fn block_addr(&self, index: usize) -> u64 {
        // Cannot overflow: index < region_size / block_size and addr + region_size fits.
        self.addr + index as u64 * self.block_size
    }

    /// QEMU's rule: requested size plus the extent, rounded up to the block size,
    /// capped at the region size; 0 if nothing is requested. Shrinks only if allowed.
    fn resize_usable_region(&self, st: &mut MemState, can_shrink: bool) {
        let new = if st.requested_size == 0 {
            0
        } else {
            let wanted = st
                .requested_size
                .saturating_add(VIRTIO_MEM_USABLE_EXTENT)
                .min(self.region_size);
            // The region size is a multiple of the block size, so this stays within it.
            wanted.div_ceil(self.block_size) * self.block_size
        };
        if new < st.usable_region_size && !can_shrink {
            return;
        }
        if new != st.usable_region_size {
            st.usable_region_size = new;
            st.generation = st.generation.wrapping_add(1);
        }
    }

    /// The blocks `[addr, addr + nb_blocks * block_size)` as `(first, count, bytes)` if
    /// the range is aligned, non-empty and inside the usable region.
    fn block_range(&self, st: &MemState, addr: u64, nb_blocks: u16) -> Option<(usize, usize, u64)> {
        if nb_blocks == 0 || !addr.is_multiple_of(self.block_size) || addr < self.addr {
            return None;
        }
        let len = u64::from(nb_blocks).checked_mul(self.block_size)?;
        let end = addr.checked_add(len)?;
        if end > self.addr + st.usable_region_size {
            return None;
        }
        let first = usize::try_from((addr - self.addr) / self.block_size).ok()?;
        Some((first, usize::from(nb_blocks), len))
    }

    fn handle(&self, st: &mut MemState, request: MemRequest) -> MemResponse {
        let response = match request {
            MemRequest::Plug { addr, nb_blocks } => {
                let r = self.plug(st, addr, nb_blocks);
                st.stats.plug.count(r);
                r
            }
            MemRequest::Unplug { addr, nb_blocks } => {
                let r = self.unplug(st, addr, nb_blocks);
                st.stats.unplug.count(r);
                r
            }
            MemRequest::UnplugAll => {
                let r = match self.unplug_all(st) {
                    Ok(()) => MemResponse::Ack(None),
                    Err(_) => MemResponse::Busy,
                };
                st.stats.unplug_all.count(r);
                r
            }
            MemRequest::State { addr, nb_blocks } => {
                let r = match self.block_range(st, addr, nb_blocks) {
                    None => MemResponse::Error,
                    Some((first, count, _)) if st.bitmap.all_set(first, count) => {
                        MemResponse::Ack(Some(BlockState::Plugged))
                    }
                    Some((first, count, _)) if st.bitmap.all_clear(first, count) => {
                        MemResponse::Ack(Some(BlockState::Unplugged))
                    }
                    Some(_) => MemResponse::Ack(Some(BlockState::Mixed)),
                };
                st.stats.state.count(r);
                r
            }
            MemRequest::Unknown { .. } => {
                st.stats.unknown += 1;
                MemResponse::Error
            }
        };
        log::debug!("virtio-mem: {request:?} -> {response:?}");
        response
    }

    fn plug(&self, st: &mut MemState, addr: u64, nb_blocks: u16) -> MemResponse {
        let Some((first, count, len)) = self.block_range(st, addr, nb_blocks) else {
            return MemResponse::Error;
        };
        let within_request = self
            .plugged_size_of(st)
            .checked_add(len)
            .is_some_and(|total| total <= st.requested_size);
        if !within_request {
            return MemResponse::Nack;
        }
        if !st.bitmap.all_clear(first, count) {
            return MemResponse::Error;
        }
        if let Err(e) = self.backend.plug(addr, len) {
            self.backend_failed(st, "plug", addr, len, &e);
            return MemResponse::Busy;
        }
        st.bitmap.assign(first, count, true);
        self.plugged_size_changed(st);
        MemResponse::Ack(None)
    }

    fn unplug(&self, st: &mut MemState, addr: u64, nb_blocks: u16) -> MemResponse {
        let Some((first, count, len)) = self.block_range(st, addr, nb_blocks) else {
            return MemResponse::Error;
        };
        if !st.bitmap.all_set(first, count) {
            return MemResponse::Error;
        }
        if let Err(e) = self.backend.unplug(addr, len) {
            self.backend_failed(st, "unplug", addr, len, &e);
            return MemResponse::Busy;
        }
        st.bitmap.assign(first, count, false);
        self.plugged_size_changed(st);
        MemResponse::Ack(None)
    }

    /// Unplugs every run of plugged blocks, then lets the usable region shrink. Stops at
    /// the first backend failure, keeping what was done.
    fn unplug_all(&self, st: &mut MemState) -> Result<(), MemoryBackendError> {
        for (first, count) in st.bitmap.set_runs() {
            let addr = self.block_addr(first);
            let len = count as u64 * self.block_size;
            if let Err(e) = self.backend.unplug(addr, len) {
                self.backend_failed(st, "unplug", addr, len, &e);
                return Err(e);
            }
            st.bitmap.assign(first, count, false);
            self.plugged_size_changed(st);
        }
        self.resize_usable_region(st, true);
        Ok(())
    }

    fn plugged_size_changed(&self, st: &mut MemState) {
        st.size_changed = true;
        st.generation = st.generation.wrapping_add(1);
        let plugged = self.plugged_size_of(st);
        st.resize
            .size_changed(Stamp::now(), st.requested_size, plugged);
    }

    fn backend_failed(
        &self,
        st: &mut MemState,
        op: &str,
        addr: u64,
        len: u64,
        err: &MemoryBackendError,
    ) {
        st.stats.backend_failures += 1;
        let cause = std::error::Error::source(err).map(ToString::to_string);
        st.resize.backend_failed(format!(
            "cannot {op} [{addr:#x}, +{len:#x}): {}",
            cause.as_deref().unwrap_or("memory backend failed")
        ));
        // A guest can retry a failing request without end: the first failure is a
        // warning, later ones are counted and logged at debug level only.
        if st.stats.backend_failures == 1 {
            log::warn!(
                "virtio-mem: cannot {op} [{addr:#x}, +{len:#x}): {err}: {} \
                 (later failures are counted and logged at debug level)",
                cause.unwrap_or_default()
            );
        } else {
            log::debug!(
                "virtio-mem: cannot {op} [{addr:#x}, +{len:#x}): {err}: {}",
                cause.unwrap_or_default()
            );
        }
    }

    fn config_bytes(&self, st: &MemState) -> [u8; VIRTIO_MEM_CONFIG_SIZE] {
        let config = WireConfig {
            block_size: self.block_size.into(),
            node_id: self.node_id.into(),
            padding: [0; 6],
            addr: self.addr.into(),
            region_size: self.region_size.into(),
            usable_region_size: st.usable_region_size.into(),
            plugged_size: self.plugged_size_of(st).into(),
            requested_size: st.requested_size.into(),
        };
        let mut c = [0u8; VIRTIO_MEM_CONFIG_SIZE];
        c.copy_from_slice(config.as_slice());
        c
    }

    fn malformed(st: &mut MemState, err: ChainError) -> VirtioDeviceError {
        st.stats.malformed += 1;
        VirtioDeviceError::Chain(err)
    }
}

impl VirtioDevice for VirtioMem {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_MEM
    }

    fn features(&self) -> u64 {
        self.features
    }

    /// Requires `VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE`: unplugged memory is not backed.
    fn accepts_features(&self, acked: u64) -> bool {
        acked & OFFERED_FEATURES == OFFERED_FEATURES
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let st = self.lock();
        let config = self.config_bytes(&st);
        drop(st);
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio-mem: ignored {}-byte write to read-only config at {offset:#x}",
            data.len()
        );
    }

    fn config_generation(&self) -> u32 {
        self.lock().generation
    }

    fn activate(
        &self,
        _acked_features: u64,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), VirtioDeviceError> {
        let mut st = self.lock();
        st.interrupt = Some(interrupt);
        st.resize.driver_activated();
        Ok(())
    }

    fn process_queue(
        &self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueProgress, VirtioDeviceError> {
        if index != 0 {
            return Err(VirtioDeviceError::NoSuchQueue { index });
        }
        let mut st = self.lock();
        let st = &mut *st;
        // One ring's worth per call, so a driver that keeps adding requests cannot hold
        // the control thread; the transport re-signals the queue for the rest.
        let budget = usize::from(queue.size());
        let mut progress = QueueProgress::default();
        loop {
            if progress.completed >= budget {
                let avail = queue
                    .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
                    .map_err(VirtioDeviceError::Queue)?;
                progress.more_pending = avail.0 != queue.next_avail();
                break;
            }
            let chain = queue.iter(mem).map_err(VirtioDeviceError::Queue)?.next();
            let Some(chain) = chain else {
                break;
            };
            // A request needs two descriptors; more than a ring's worth is only possible
            // through an indirect table, which is not negotiated.
            let bufs = RequestBuffers::new(chain, budget).map_err(|e| Self::malformed(st, e))?;
            let mut raw = [0u8; MEM_REQUEST_SIZE];
            bufs.read_prefix(mem, &mut raw)
                .map_err(|e| Self::malformed(st, e))?;
            // Check the room for the response before acting on the request.
            bufs.check_writable(mem, MEM_RESPONSE_SIZE)
                .map_err(|e| Self::malformed(st, e))?;
            let response = self.handle(st, MemRequest::parse(&raw));
            // The backend may have made unplugged memory read-only: check the
            // response and the used ring as things are after this request.
            let used_ring = (queue.used_ring(), 6 + 8 * u64::from(queue.size()));
            if let Some((addr, len)) = bufs
                .writable_ranges(MEM_RESPONSE_SIZE)
                .chain(std::iter::once(used_ring))
                .find(|&(a, l)| !self.backend.writable(a, l))
            {
                return Err(Self::malformed(st, ChainError::Unplugged { addr, len }));
            }
            let len = bufs
                .write_prefix(mem, &response.to_bytes())
                .map_err(|e| Self::malformed(st, e))?;
            queue
                .add_used(mem, bufs.head(), len)
                .map_err(VirtioDeviceError::Queue)?;
            progress.completed += 1;
        }
        Ok(progress)
    }

    fn reset(&self) {
        self.lock().interrupt = None;
    }
}

impl fmt::Debug for VirtioMem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtioMem")
            .field("info", &self.info())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;
    use virtio_bindings::virtio_mmio::*;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::bus::BusDevice;
    use crate::virtio::fixtures::*;
    use crate::virtio::mem_progress::DEFAULT_STALL_TIMEOUT;
    use crate::virtio::mem_request::{
        VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_RESP_BUSY, VIRTIO_MEM_RESP_ERROR, VIRTIO_MEM_RESP_NACK,
        VIRTIO_MEM_STATE_MIXED, VIRTIO_MEM_STATE_PLUGGED, VIRTIO_MEM_STATE_UNPLUGGED,
    };

    const MIB: u64 = 1 << 20;

    // Offsets in struct virtio_mem_config.
    const CFG_BLOCK_SIZE: u32 = 0;
    const CFG_NODE_ID: u32 = 8;
    const CFG_ADDR: u32 = 16;
    const CFG_REGION_SIZE: u32 = 24;
    const CFG_USABLE: u32 = 32;
    const CFG_PLUGGED: u32 = 40;
    const CFG_REQUESTED: u32 = 48;

    fn kind(resp: Option<[u8; 10]>) -> u16 {
        let resp = resp.expect("the request was answered");
        u16::from_le_bytes([resp[0], resp[1]])
    }

    fn state(resp: Option<[u8; 10]>) -> (u16, u16) {
        let resp = resp.expect("the request was answered");
        (
            u16::from_le_bytes([resp[0], resp[1]]),
            u16::from_le_bytes([resp[8], resp[9]]),
        )
    }

    fn plug(addr: u64, nb_blocks: u16) -> MemRequest {
        MemRequest::Plug { addr, nb_blocks }
    }

    fn unplug(addr: u64, nb_blocks: u16) -> MemRequest {
        MemRequest::Unplug { addr, nb_blocks }
    }

    fn block(i: u64) -> u64 {
        REGION_ADDR + i * BLOCK
    }

    fn blocks(range: std::ops::Range<u64>) -> BTreeSet<u64> {
        range.map(block).collect()
    }

    /// The device's bitmap, as block addresses.
    fn device_blocks(vmem: &VirtioMem) -> BTreeSet<u64> {
        vmem.plugged_ranges()
            .into_iter()
            .flat_map(|(gpa, len)| (0..len / BLOCK).map(move |i| gpa + i * BLOCK))
            .collect()
    }

    #[test]
    fn config_space_reads_as_linux_reads_it() {
        let f = MemFixture::new(100 * MIB);
        assert_eq!(f.config_u64(CFG_BLOCK_SIZE), 2 * MIB);
        assert_eq!(f.config_u64(CFG_ADDR), REGION_ADDR);
        assert_eq!(f.config_u64(CFG_REGION_SIZE), REGION_SIZE);
        assert_eq!(f.config_u64(CFG_REQUESTED), 100 * MIB);
        assert_eq!(f.config_u64(CFG_PLUGGED), 0);
        assert_eq!(
            f.config_u64(CFG_USABLE),
            356 * MIB,
            "requested + 256 MiB, block aligned"
        );
        let mut node = [0xaa; 2];
        f.mmio
            .read(0, u64::from(VIRTIO_MMIO_CONFIG + CFG_NODE_ID), &mut node);
        assert_eq!(node, [0, 0]);
        let mut past_end = [0xaa; 8];
        f.mmio
            .read(0, u64::from(VIRTIO_MMIO_CONFIG) + 56, &mut past_end);
        assert_eq!(past_end, [0; 8]);
        assert_eq!(read32(&f.mmio, VIRTIO_MMIO_DEVICE_ID), 24);
        // Config writes are ignored.
        f.mmio
            .write(0, u64::from(VIRTIO_MMIO_CONFIG + CFG_REQUESTED), &[0xff; 4]);
        assert_eq!(f.config_u64(CFG_REQUESTED), 100 * MIB);
    }

    #[test]
    fn construction_validates_the_geometry() {
        let backend: Arc<dyn MemoryBackend> = Arc::new(CheckedBackend::new(BLOCK));
        let bad = |c: VirtioMemConfig| VirtioMem::new(c, backend.clone()).unwrap_err();
        let good = VirtioMemConfig::new(REGION_ADDR, REGION_SIZE);
        assert!(matches!(
            bad(VirtioMemConfig {
                block_size: 3 * MIB,
                ..good
            }),
            VirtioMemError::BlockSize(_)
        ));
        assert!(matches!(
            bad(VirtioMemConfig {
                block_size: 2048,
                ..good
            }),
            VirtioMemError::BlockSize(2048)
        ));
        assert!(matches!(
            bad(VirtioMemConfig {
                addr: REGION_ADDR + MIB,
                ..good
            }),
            VirtioMemError::UnalignedAddress { .. }
        ));
        assert!(matches!(
            bad(VirtioMemConfig {
                region_size: 0,
                ..good
            }),
            VirtioMemError::RegionSize { .. }
        ));
        assert!(matches!(
            bad(VirtioMemConfig {
                region_size: REGION_SIZE + MIB,
                ..good
            }),
            VirtioMemError::RegionSize { .. }
        ));
        assert!(matches!(
            bad(VirtioMemConfig {
                addr: u64::MAX - BLOCK + 1,
                ..good
            }),
            VirtioMemError::RegionTooLarge { .. }
        ));
        assert!(matches!(
            bad(VirtioMemConfig {
                requested_size: MIB,
                ..good
            }),
            VirtioMemError::UnalignedRequestedSize { .. }
        ));
        let dev = VirtioMem::new(good, backend.clone()).unwrap();
        let info = dev.info();
        assert_eq!((info.plugged_size, info.usable_region_size), (0, 0));
        assert!(format!("{dev:?}").contains("VirtioMem"));
    }

    #[test]
    fn usable_region_follows_qemu() {
        let f = MemFixture::new(0);
        assert_eq!(f.vmem.info().usable_region_size, 0, "nothing requested");
        f.vmem.set_requested_size(2 * MIB).unwrap();
        assert_eq!(f.vmem.info().usable_region_size, 258 * MIB);
        f.vmem.set_requested_size(900 * MIB).unwrap();
        assert_eq!(
            f.vmem.info().usable_region_size,
            REGION_SIZE,
            "capped at the region"
        );
        f.vmem.set_requested_size(0).unwrap();
        assert_eq!(
            f.vmem.info().usable_region_size,
            REGION_SIZE,
            "never shrinks on a smaller request"
        );
        let mut q = f.activate();
        assert_eq!(
            kind(f.request(&mut q, MemRequest::UnplugAll)),
            VIRTIO_MEM_RESP_ACK
        );
        assert_eq!(f.vmem.info().usable_region_size, 0, "UNPLUG_ALL shrinks it");
    }

    #[test]
    fn features_ok_requires_unplugged_inaccessible() {
        let f = MemFixture::new(0);
        let offered = device_features(&f.mmio);
        assert_eq!(
            offered,
            (1 << 32) | (1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE)
        );
        assert_eq!(f.negotiate(1 << 32) & S_FEATURES_OK, 0);
        assert_eq!(f.negotiate(offered) & S_FEATURES_OK, S_FEATURES_OK);
        assert_eq!(f.mmio.acked_features(), offered);
    }

    #[test]
    fn plug_calls_the_backend_then_acks() {
        let f = MemFixture::new(64 * MIB);
        let mut q = f.activate();
        let gen0 = read32(&f.mmio, VIRTIO_MMIO_CONFIG_GENERATION);
        assert_eq!(
            kind(f.request(&mut q, plug(block(3), 4))),
            VIRTIO_MEM_RESP_ACK
        );
        assert_eq!(
            f.backend.calls(),
            vec![BackendCall::Plug(block(3), 4 * BLOCK)]
        );
        assert_eq!(f.backend.plugged(), blocks(3..7));
        assert_eq!(device_blocks(&f.vmem), blocks(3..7));
        assert_eq!(f.config_u64(CFG_PLUGGED), 8 * MIB);
        assert_ne!(read32(&f.mmio, VIRTIO_MMIO_CONFIG_GENERATION), gen0);
        assert_eq!(f.vmem.take_size_change(), Some(8 * MIB));
        assert_eq!(f.vmem.take_size_change(), None, "reported once");
        assert_eq!(
            read32(&f.mmio, VIRTIO_MMIO_INTERRUPT_STATUS),
            1,
            "used buffer"
        );
        assert_eq!(f.vmem.stats().plug.ack, 1);
    }

    #[test]
    fn plug_beyond_the_requested_size_is_nacked() {
        let f = MemFixture::new(8 * MIB);
        let mut q = f.activate();
        assert_eq!(
            kind(f.request(&mut q, plug(block(0), 5))),
            VIRTIO_MEM_RESP_NACK
        );
        assert_eq!(
            kind(f.request(&mut q, plug(block(0), 4))),
            VIRTIO_MEM_RESP_ACK
        );
        assert_eq!(
            kind(f.request(&mut q, plug(block(4), 1))),
            VIRTIO_MEM_RESP_NACK
        );
        assert_eq!(f.backend.calls().len(), 1);
        assert_eq!(f.vmem.stats().plug.nack, 2);
    }

    #[test]
    fn invalid_ranges_are_errors() {
        let f = MemFixture::new(64 * MIB);
        let mut q = f.activate();
        let usable_end = REGION_ADDR + f.vmem.info().usable_region_size;
        let cases = [
            plug(block(0) + 4096, 1),      // unaligned
            plug(block(0), 0),             // no blocks
            plug(REGION_ADDR - BLOCK, 1),  // before the region
            plug(usable_end - BLOCK, 2),   // past the usable region
            plug(usable_end, 1),           // starts past it
            plug(u64::MAX - BLOCK + 1, 1), // overflows
            unplug(block(0) + MIB, 1),
            unplug(usable_end, 1),
            MemRequest::State {
                addr: block(0),
                nb_blocks: 0,
            },
            MemRequest::State {
                addr: usable_end - BLOCK,
                nb_blocks: 2,
            },
            MemRequest::State {
                addr: u64::MAX - BLOCK + 1,
                nb_blocks: u16::MAX,
            },
        ];
        for req in cases {
            assert_eq!(
                kind(f.request(&mut q, req)),
                VIRTIO_MEM_RESP_ERROR,
                "{req:?}"
            );
        }
        assert!(f.backend.calls().is_empty());
        let stats = f.vmem.stats();
        assert_eq!(
            (stats.plug.error, stats.unplug.error, stats.state.error),
            (6, 2, 3)
        );
        assert_eq!(
            read32(&f.mmio, VIRTIO_MMIO_STATUS) & 0x40,
            0,
            "errors are not fatal"
        );
    }

    #[test]
    fn a_response_in_memory_the_request_unplugs_breaks_the_device_and_is_not_written() {
        let mut f = MemFixture::new(64 * MIB);
        // Guest memory that also covers the first blocks of the region.
        f.mem = vm_memory::GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), RAM_SIZE),
            (GuestAddress(REGION_ADDR), 4 * BLOCK as usize),
        ])
        .unwrap();
        let mut q = f.activate();
        assert_eq!(
            kind(f.request(&mut q, plug(block(0), 2))),
            VIRTIO_MEM_RESP_ACK
        );
        let send = |q: &mut TestQueue<&GuestMemoryMmap>, req: MemRequest, resp: u64| {
            f.mem
                .write_slice(&req.to_bytes(), GuestAddress(REQ_ADDR))
                .unwrap();
            f.mem
                .write_slice(&[0xff; MEM_RESPONSE_SIZE], GuestAddress(resp))
                .unwrap();
            q.push(&[
                (REQ_ADDR, 24, false),
                (resp, MEM_RESPONSE_SIZE as u32, true),
            ]);
            f.kick()
        };
        let resp_of = |at: u64| {
            let mut b = [0u8; MEM_RESPONSE_SIZE];
            f.mem.read_slice(&mut b, GuestAddress(at)).unwrap();
            b
        };
        // A response in a plugged block is written.
        let in_block1 = block(1) + 0x100;
        let out = send(
            &mut q,
            MemRequest::State {
                addr: block(0),
                nb_blocks: 1,
            },
            in_block1,
        );
        assert!(!out.needs_reset && out.completed == 1, "{out:?}");
        assert_eq!(
            u16::from_le_bytes([resp_of(in_block1)[0], 0]),
            VIRTIO_MEM_RESP_ACK
        );
        // Unplugging the block that holds the response: the request is
        // carried out, the response is not written, the device breaks.
        let out = send(&mut q, unplug(block(1), 1), in_block1);
        assert!(out.needs_reset && out.completed == 0, "{out:?}");
        assert_eq!(resp_of(in_block1), [0xff; MEM_RESPONSE_SIZE]);
        assert_eq!(device_blocks(&f.vmem), blocks(0..1));
        assert_eq!(f.vmem.stats().malformed, 1);
    }

    #[test]
    fn plugging_plugged_or_unplugging_unplugged_blocks_is_an_error() {
        let f = MemFixture::new(64 * MIB);
        let mut q = f.activate();
        assert_eq!(
            kind(f.request(&mut q, plug(block(2), 2))),
            VIRTIO_MEM_RESP_ACK
        );
        assert_eq!(
            kind(f.request(&mut q, plug(block(3), 2))),
            VIRTIO_MEM_RESP_ERROR
        );
        assert_eq!(
            kind(f.request(&mut q, unplug(block(1), 2))),
            VIRTIO_MEM_RESP_ERROR
        );
        assert_eq!(
            kind(f.request(&mut q, unplug(block(5), 1))),
            VIRTIO_MEM_RESP_ERROR
        );
        assert_eq!(
            kind(f.request(&mut q, unplug(block(3), 1))),
            VIRTIO_MEM_RESP_ACK
        );
        assert_eq!(
            f.backend.calls(),
            vec![
                BackendCall::Plug(block(2), 2 * BLOCK),
                BackendCall::Unplug(block(3), BLOCK)
            ]
        );
        assert_eq!(device_blocks(&f.vmem), blocks(2..3));
        assert_eq!(f.vmem.take_size_change(), Some(2 * MIB));
    }

    #[test]
    fn state_reports_plugged_unplugged_and_mixed() {
        let f = MemFixture::new(64 * MIB);
        let mut q = f.activate();
        f.request(&mut q, plug(block(4), 2));
        let st = |q: &mut TestQueue<&GuestMemoryMmap>, addr, nb_blocks| {
            state(f.request(q, MemRequest::State { addr, nb_blocks }))
        };
        assert_eq!(
            st(&mut q, block(4), 2),
            (VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_PLUGGED)
        );
        assert_eq!(
            st(&mut q, block(0), 4),
            (VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_UNPLUGGED)
        );
        assert_eq!(
            st(&mut q, block(3), 2),
            (VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_MIXED)
        );
        assert_eq!(f.vmem.stats().state.ack, 3);
        assert_eq!(f.backend.calls().len(), 1);
    }

    #[test]
    fn unplug_all_unplugs_each_run_and_shrinks_the_usable_region() {
        let f = MemFixture::new(64 * MIB);
        let mut q = f.activate();
        f.request(&mut q, plug(block(0), 2));
        f.request(&mut q, plug(block(5), 1));
        f.request(&mut q, plug(block(2), 1));
        f.vmem.set_requested_size(0).unwrap();
        f.vmem.take_size_change();
        assert_eq!(
            kind(f.request(&mut q, MemRequest::UnplugAll)),
            VIRTIO_MEM_RESP_ACK
        );
        let unplugs: Vec<BackendCall> = f.backend.calls().into_iter().skip(3).collect();
        assert_eq!(
            unplugs,
            vec![
                BackendCall::Unplug(block(0), 3 * BLOCK),
                BackendCall::Unplug(block(5), BLOCK)
            ]
        );
        assert!(f.backend.plugged().is_empty());
        assert_eq!(f.config_u64(CFG_PLUGGED), 0);
        assert_eq!(f.config_u64(CFG_USABLE), 0);
        assert_eq!(f.vmem.take_size_change(), Some(0));
        assert_eq!(
            kind(f.request(&mut q, MemRequest::UnplugAll)),
            VIRTIO_MEM_RESP_ACK
        );
        assert_eq!(f.backend.calls().len(), 5, "nothing left to unplug");
        assert_eq!(f.vmem.stats().unplug_all.ack, 2);
    }

    #[test]
    fn backend_failures_answer_busy_and_keep_the_bitmap() {
        let f = MemFixture::new(64 * MIB);
        let mut q = f.activate();
        f.backend.fail_next(1);
        assert_eq!(
            kind(f.request(&mut q, plug(block(0), 1))),
            VIRTIO_MEM_RESP_BUSY
        );
        assert!(device_blocks(&f.vmem).is_empty());
        assert_eq!(f.vmem.take_size_change(), None);
        f.request(&mut q, plug(block(0), 1));
        f.request(&mut q, plug(block(2), 1));
        f.backend.fail_next(1);
        assert_eq!(
            kind(f.request(&mut q, unplug(block(0), 1))),
            VIRTIO_MEM_RESP_BUSY
        );
        assert_eq!(device_blocks(&f.vmem), f.backend.plugged());
        assert_eq!(f.backend.plugged().len(), 2);
        // UNPLUG_ALL: the first run goes, the second fails.
        f.vmem.take_size_change();
        f.backend.fail_after(1);
        assert_eq!(
            kind(f.request(&mut q, MemRequest::UnplugAll)),
            VIRTIO_MEM_RESP_BUSY
        );
        assert_eq!(device_blocks(&f.vmem), blocks(2..3));
        assert_eq!(f.backend.plugged(), blocks(2..3));
        assert_eq!(f.vmem.take_size_change(), Some(2 * MIB));
        assert_ne!(f.config_u64(CFG_USABLE), 0, "not shrunk after a failure");
        let stats = f.vmem.stats();
        assert_eq!(stats.backend_failures, 3);
        assert_eq!(
            (stats.plug.busy, stats.unplug.busy, stats.unplug_all.busy),
            (1, 1, 1)
        );
        assert_eq!(f.backend.contract_violations(), 0);
    }

    /// A driver retrying a request the backend keeps failing gets one warning in all;
    /// the rest are counted and logged at debug level.
    #[test]
    fn repeated_backend_failures_warn_once() {
        let f = MemFixture::new(64 * MIB);
        let mut q = f.activate();
        let ((), logs) = capture_logs(|| {
            for _ in 0..50 {
                f.backend.fail_next(1);
                assert_eq!(
                    kind(f.request(&mut q, plug(block(0), 1))),
                    VIRTIO_MEM_RESP_BUSY
                );
            }
        });
        assert_eq!(f.vmem.stats().backend_failures, 50);
        assert_eq!(warnings(&logs), 1, "{logs:#?}");
        let failures = logs
            .iter()
            .filter(|(_, m)| m.contains("virtio-mem: cannot plug"))
            .count();
        assert_eq!(failures, 50, "every failure is still logged: {logs:#?}");
    }

    #[test]
    fn unknown_request_types_are_errors() {
        let f = MemFixture::new(64 * MIB);
        let mut q = f.activate();
        assert_eq!(
            kind(f.request(&mut q, MemRequest::Unknown { kind: 9 })),
            VIRTIO_MEM_RESP_ERROR
        );
        assert_eq!(f.vmem.stats().unknown, 1);
    }

    #[test]
    fn set_requested_size_validates_and_announces_the_change() {
        let f = MemFixture::new(0);
        let err = f.vmem.set_requested_size(MIB).unwrap_err();
        assert_eq!(
            err.to_string(),
            "requested-size 0x100000 is not a multiple of the block-size 0x200000"
        );
        let err = f.vmem.set_requested_size(REGION_SIZE + BLOCK).unwrap_err();
        assert_eq!(
            err.to_string(),
            "requested-size 0x40200000 exceeds the maximum size 0x40000000"
        );
        // Before DRIVER_OK: no interrupt, but the generation moves.
        let gen0 = read32(&f.mmio, VIRTIO_MMIO_CONFIG_GENERATION);
        f.vmem.set_requested_size(4 * BLOCK).unwrap();
        assert_ne!(read32(&f.mmio, VIRTIO_MMIO_CONFIG_GENERATION), gen0);
        assert_eq!(f.irq.count(), 0);

        let _q = f.activate();
        f.vmem.set_requested_size(8 * BLOCK).unwrap();
        assert_eq!(f.irq.count(), 1);
        assert_eq!(
            read32(&f.mmio, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_CONFIG
        );
        assert_eq!(f.config_u64(CFG_REQUESTED), 8 * BLOCK);
        assert_eq!(f.vmem.requested_size(), 8 * BLOCK);
        assert_eq!(f.vmem.info().requested_size, 8 * BLOCK);

        // After a device reset the device no longer raises interrupts.
        write32(&f.mmio, VIRTIO_MMIO_STATUS, 0);
        f.vmem.set_requested_size(2 * BLOCK).unwrap();
        assert_eq!(f.irq.count(), 1);
    }

    #[test]
    fn a_numa_node_is_offered_as_acpi_pxm_with_node_id_in_the_config_space() {
        // virtio 1.2 §5.15.3: feature bit 0 is VIRTIO_MEM_F_ACPI_PXM; §5.15.4:
        // `le16 node_id` follows `le64 block_size` at offset 8.
        let backend = Arc::new(CheckedBackend::new(BLOCK));
        let config = VirtioMemConfig {
            node_id: 3,
            acpi_pxm: true,
            ..VirtioMemConfig::new(REGION_ADDR, REGION_SIZE)
        };
        let vmem = Arc::new(VirtioMem::new(config, backend).unwrap());
        assert_eq!(vmem.features(), 0b11, "ACPI_PXM and UNPLUGGED_INACCESSIBLE");
        let mut node = [0u8; 2];
        vmem.read_config(8, &mut node);
        assert_eq!(u16::from_le_bytes(node), 3);
        // The driver may leave ACPI_PXM unacked (a guest without NUMA).
        assert!(vmem.accepts_features(1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE));
        // Without acpi_pxm (no SRAT), only UNPLUGGED_INACCESSIBLE is offered.
        let plain = MemFixture::new(0);
        assert_eq!(
            plain.vmem.features(),
            1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE
        );
    }

    #[test]
    fn getters_match_the_configuration() {
        let f = MemFixture::new(4 * BLOCK);
        assert_eq!(f.vmem.addr(), REGION_ADDR);
        assert_eq!(f.vmem.region_size(), REGION_SIZE);
        assert_eq!(f.vmem.block_size(), BLOCK);
        assert_eq!(f.vmem.node_id(), 0);
        assert_eq!(f.vmem.plugged_size(), 0);
        let info = f.vmem.info();
        assert_eq!(
            info,
            VirtioMemInfo {
                addr: REGION_ADDR,
                region_size: REGION_SIZE,
                block_size: BLOCK,
                node_id: 0,
                requested_size: 4 * BLOCK,
                plugged_size: 0,
                usable_region_size: 4 * BLOCK + VIRTIO_MEM_USABLE_EXTENT,
            }
        );
    }

    #[test]
    fn device_reset_keeps_plugged_memory_and_system_reset_unplugs_it() {
        let f = MemFixture::new(64 * MIB);
        let mut q = f.activate();
        f.request(&mut q, plug(block(1), 3));
        f.vmem.take_size_change();
        write32(&f.mmio, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(f.vmem.plugged_size(), 6 * MIB);
        assert_eq!(f.backend.plugged(), blocks(1..4));
        // A new driver sees the plugged memory and can unplug all of it.
        let mut q = f.activate();
        assert_eq!(f.config_u64(CFG_PLUGGED), 6 * MIB);
        assert_eq!(
            kind(f.request(&mut q, MemRequest::UnplugAll)),
            VIRTIO_MEM_RESP_ACK
        );
        assert!(f.backend.plugged().is_empty());

        f.request(&mut q, plug(block(7), 1));
        f.vmem.take_size_change();
        f.vmem.system_reset().unwrap();
        assert!(f.backend.plugged().is_empty());
        assert_eq!(f.vmem.plugged_size(), 0);
        assert_eq!(f.vmem.take_size_change(), Some(0));
        assert_eq!(f.vmem.requested_size(), 64 * MIB, "the request stays");

        f.request(&mut q, plug(block(7), 1));
        f.backend.fail_next(1);
        assert!(matches!(
            f.vmem.system_reset(),
            Err(VirtioMemError::Backend(_))
        ));
        assert_eq!(f.vmem.plugged_size(), 2 * MIB);
    }

    #[test]
    fn request_split_over_several_descriptors_is_fine() {
        let f = MemFixture::new(64 * MIB);
        let mut q = f.activate();
        let raw = plug(block(0), 1).to_bytes();
        f.mem.write_slice(&raw[..5], GuestAddress(0x8000)).unwrap();
        f.mem.write_slice(&raw[5..], GuestAddress(0x8800)).unwrap();
        q.push(&[
            (0x8000, 5, false),
            (0x8800, 100, false),
            (0x9000, 3, true),
            (0x9800, 64, true),
        ]);
        assert_eq!(f.kick().completed, 1);
        assert_eq!(q.used(0).1, 10, "the response length");
        let mut resp = [0xffu8; 3];
        f.mem.read_slice(&mut resp, GuestAddress(0x9000)).unwrap();
        assert_eq!(resp, [0, 0, 0]);
        assert_eq!(f.backend.plugged(), blocks(0..1));
    }

    /// Pushes a malformed chain and checks the device broke without acting.
    fn assert_breaks(
        f: &MemFixture,
        q: &mut TestQueue<&GuestMemoryMmap>,
        make: impl FnOnce(&mut TestQueue<&GuestMemoryMmap>),
    ) {
        let irqs = f.irq.count();
        let malformed = f.vmem.stats().malformed;
        make(q);
        let outcome = f.kick();
        assert!(outcome.needs_reset);
        assert_eq!(read32(&f.mmio, VIRTIO_MMIO_STATUS) & 0x40, 0x40);
        assert_eq!(read32(&f.mmio, VIRTIO_MMIO_INTERRUPT_STATUS) & 2, 2);
        assert_eq!(f.irq.count(), irqs + 1, "one config-change interrupt");
        assert_eq!(f.vmem.stats().malformed, malformed + 1);
        assert!(f.backend.calls().is_empty(), "nothing was done");
        assert_eq!(q.used_idx(), 0, "nothing was completed");
    }

    /// The resize poll as the VMM does it: with the transport's view of the driver.
    fn poll_at(f: &MemFixture, now: Instant) -> ResizePoll {
        f.vmem
            .resize_poll(now, DriverView::from_status(f.mmio.status()))
    }

    /// A moment after any stall deadline of the fixture's device.
    fn after_timeout(f: &MemFixture) -> Instant {
        Instant::now() + f.vmem.stall_timeout() + Duration::from_millis(1)
    }

    #[test]
    fn after_a_reset_the_kept_requested_size_is_followed_again_to_done() {
        let f = MemFixture::new(0);
        let mut q = f.activate();
        f.vmem.set_requested_size(2 * BLOCK).unwrap();
        assert_eq!(
            kind(f.request(&mut q, plug(block(0), 2))),
            VIRTIO_MEM_RESP_ACK
        );
        assert_eq!(
            poll_at(&f, Instant::now()).report.map(|r| r.event),
            Some(ResizeEvent::Done)
        );
        f.vmem.system_reset().unwrap();
        assert_eq!(f.vmem.plugged_size(), 0);
        assert_eq!(f.vmem.requested_size(), 2 * BLOCK, "kept over the reset");
        let p = poll_at(&f, Instant::now());
        assert_eq!(p.report, None);
        assert!(p.next_deadline.is_some(), "a stall deadline runs again");
        // The rebooted guest's driver plugs the requested size again.
        let mut q = f.activate();
        assert_eq!(
            kind(f.request(&mut q, plug(block(3), 2))),
            VIRTIO_MEM_RESP_ACK
        );
        assert_eq!(
            poll_at(&f, Instant::now()).report,
            Some(ResizeReport {
                event: ResizeEvent::Done,
                requested_size: 2 * BLOCK,
                plugged_size: 2 * BLOCK,
                plugged_ranges: Vec::new(),
            })
        );
    }

    #[test]
    fn a_plug_that_reaches_the_requested_size_is_reported_done_once() {
        let f = MemFixture::new(0);
        let mut q = f.activate();
        assert_eq!(
            poll_at(&f, after_timeout(&f)),
            ResizePoll::default(),
            "nothing requested: idle, no deadline"
        );
        f.vmem.set_requested_size(6 * BLOCK).unwrap();
        let p = poll_at(&f, Instant::now());
        assert_eq!(p.report, None);
        assert!(p.next_deadline.is_some(), "a stall deadline runs");
        assert_eq!(
            f.vmem
                .resize_status(Instant::now(), DriverView::default())
                .state,
            ResizeState::InProgress
        );
        assert_eq!(
            kind(f.request(&mut q, plug(block(0), 4))),
            VIRTIO_MEM_RESP_ACK
        );
        assert_eq!(poll_at(&f, Instant::now()).report, None);
        assert_eq!(
            kind(f.request(&mut q, plug(block(9), 2))),
            VIRTIO_MEM_RESP_ACK
        );
        let p = poll_at(&f, Instant::now());
        assert_eq!(
            p.report,
            Some(ResizeReport {
                event: ResizeEvent::Done,
                requested_size: 6 * BLOCK,
                plugged_size: 6 * BLOCK,
                plugged_ranges: Vec::new(),
            })
        );
        assert_eq!(p.next_deadline, None);
        assert_eq!(poll_at(&f, after_timeout(&f)), ResizePoll::default());
        let status = f.vmem.resize_status(Instant::now(), DriverView::default());
        assert_eq!(status.state, ResizeState::Done);
        assert!(status.last_request.is_some() && status.last_progress.is_some());
        assert!(status.last_progress >= status.last_request);
        assert_eq!(status.stall_reason, None);
    }

    #[test]
    fn a_request_without_a_driver_stalls_with_no_driver() {
        let f = MemFixture::new(0);
        f.vmem.set_requested_size(4 * BLOCK).unwrap();
        let deadline = poll_at(&f, Instant::now()).next_deadline.unwrap();
        assert_eq!(
            poll_at(&f, deadline - Duration::from_millis(1)).report,
            None
        );
        let p = poll_at(&f, deadline);
        let report = p.report.unwrap();
        assert_eq!(
            report.event,
            ResizeEvent::Stalled(StallReason::NoDriver { ever_active: false })
        );
        assert_eq!((report.requested_size, report.plugged_size), (4 * BLOCK, 0));
        assert_eq!(p.next_deadline, None, "reported once, no more deadline");
        assert_eq!(poll_at(&f, deadline + Duration::from_secs(60)).report, None);
        let view = DriverView::from_status(f.mmio.status());
        let status = f.vmem.resize_status(deadline, view);
        assert_eq!(status.state, ResizeState::Stalled);
        assert_eq!(
            status.stall_reason,
            Some(StallReason::NoDriver { ever_active: false })
        );
        assert_eq!(status.last_progress, None);
        assert_eq!(
            status.stalled_since.unwrap(),
            status.last_request.unwrap() + f.vmem.stall_timeout()
        );
        // A driver that comes late and plugs completes the same request.
        let mut q = f.activate();
        assert_eq!(
            kind(f.request(&mut q, plug(block(2), 4))),
            VIRTIO_MEM_RESP_ACK
        );
        assert_eq!(
            poll_at(&f, Instant::now()).report.unwrap().event,
            ResizeEvent::Done
        );
    }

    #[test]
    fn a_shrink_the_guest_does_not_do_stalls_with_the_blocks_still_plugged() {
        let f = MemFixture::new(8 * BLOCK);
        let mut q = f.activate();
        assert_eq!(
            kind(f.request(&mut q, plug(block(3), 2))),
            VIRTIO_MEM_RESP_ACK
        );
        assert_eq!(
            kind(f.request(&mut q, plug(block(10), 3))),
            VIRTIO_MEM_RESP_ACK
        );
        f.vmem.set_requested_size(0).unwrap();
        // The guest unplugs one block, then nothing more.
        assert_eq!(
            kind(f.request(&mut q, unplug(block(11), 1))),
            VIRTIO_MEM_RESP_ACK
        );
        let report = poll_at(&f, after_timeout(&f)).report.unwrap();
        assert_eq!(
            report.event,
            ResizeEvent::Stalled(StallReason::GuestNoProgress { unplugging: true })
        );
        assert_eq!(report.plugged_size, 4 * BLOCK);
        assert_eq!(
            report.plugged_ranges,
            vec![
                (block(3), 2 * BLOCK),
                (block(10), BLOCK),
                (block(12), BLOCK)
            ]
        );
        let view = DriverView::from_status(f.mmio.status());
        let status = f.vmem.resize_status(after_timeout(&f), view);
        assert_eq!(status.plugged_ranges, report.plugged_ranges);
    }

    #[test]
    fn backend_refusals_stall_as_host_busy_and_a_broken_device_as_needs_reset() {
        let f = MemFixture::new(0);
        f.vmem.set_stall_timeout(Duration::from_millis(200));
        let mut q = f.activate();
        f.vmem.set_requested_size(2 * BLOCK).unwrap();
        f.backend.fail_next(2);
        for _ in 0..2 {
            assert_eq!(
                kind(f.request(&mut q, plug(block(0), 2))),
                VIRTIO_MEM_RESP_BUSY
            );
        }
        match poll_at(&f, after_timeout(&f)).report.unwrap().event {
            ResizeEvent::Stalled(StallReason::HostBusy { failures, detail }) => {
                assert_eq!(failures, 2);
                assert!(detail.contains("injected failure"), "{detail}");
                assert!(detail.contains(&format!("{:#x}", block(0))), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        // The driver breaks the protocol: the reason becomes the error state.
        q.publish(QUEUE_SIZE + 3);
        assert!(f.kick().needs_reset);
        let view = DriverView::from_status(f.mmio.status());
        assert_eq!(
            f.vmem.resize_status(after_timeout(&f), view).stall_reason,
            Some(StallReason::NeedsReset)
        );
    }

    #[test]
    fn a_new_stall_timeout_applies_to_the_running_resize() {
        let f = MemFixture::new(0);
        f.vmem.set_requested_size(2 * BLOCK).unwrap();
        let before = poll_at(&f, Instant::now()).next_deadline.unwrap();
        assert_eq!(
            f.vmem.set_stall_timeout(Duration::from_secs(1)),
            Duration::from_secs(1)
        );
        let after = poll_at(&f, Instant::now()).next_deadline.unwrap();
        assert_eq!(
            before - after,
            DEFAULT_STALL_TIMEOUT - Duration::from_secs(1)
        );
    }

    type MakeChain = Box<dyn Fn(&mut TestQueue<&GuestMemoryMmap>)>;

    #[test]
    fn malformed_chains_break_the_device() {
        let req = plug(block(0), 1).to_bytes();
        let cases: Vec<(&str, MakeChain)> = vec![
            (
                "loop",
                Box::new(|q| {
                    q.store(0, 0x8000, 24, 1, 1);
                    q.store(1, 0x9000, 10, 1 | 2, 0);
                    q.publish(0);
                }),
            ),
            (
                "next out of the table",
                Box::new(|q| {
                    q.store(0, 0x8000, 24, 1, 200);
                    q.publish(0);
                }),
            ),
            (
                "head out of the table",
                Box::new(|q| q.publish(QUEUE_SIZE + 3)),
            ),
            (
                "request outside memory",
                Box::new(|q| {
                    q.push(&[(RAM_SIZE as u64 - 8, 24, false), (0x9000, 10, true)]);
                }),
            ),
            (
                "response outside memory",
                Box::new(|q| {
                    q.push(&[(0x8000, 24, false), (RAM_SIZE as u64 - 4, 10, true)]);
                }),
            ),
            (
                "short request",
                Box::new(|q| {
                    q.push(&[(0x8000, 23, false), (0x9000, 10, true)]);
                }),
            ),
            (
                "short response",
                Box::new(|q| {
                    q.push(&[(0x8000, 24, false), (0x9000, 9, true)]);
                }),
            ),
            (
                "device-readable response",
                Box::new(|q| {
                    q.push(&[(0x8000, 24, false), (0x9000, 10, false)]);
                }),
            ),
            (
                "readable after writable",
                Box::new(|q| {
                    q.push(&[(0x9000, 10, true), (0x8000, 24, false)]);
                }),
            ),
            (
                "no descriptors readable",
                Box::new(|q| {
                    q.push(&[(0x9000, 34, true)]);
                }),
            ),
        ];
        for (name, make) in cases {
            let f = MemFixture::new(64 * MIB);
            f.mem.write_slice(&req, GuestAddress(0x8000)).unwrap();
            let mut q = f.activate();
            eprintln!("case: {name}");
            assert_breaks(&f, &mut q, |q| make(q));
            // Stays broken until reset, then works again.
            let mut q = f.activate();
            assert_eq!(
                kind(f.request(&mut q, plug(block(0), 1))),
                VIRTIO_MEM_RESP_ACK,
                "{name}"
            );
        }
    }

    #[test]
    fn avail_index_running_ahead_breaks_the_device() {
        let f = MemFixture::new(64 * MIB);
        let q = f.activate();
        q.set_avail_idx(QUEUE_SIZE + 1);
        assert!(f.kick().needs_reset);
        assert_eq!(
            f.vmem.stats().malformed,
            0,
            "a ring error, not a chain error"
        );
    }

    /// What the device should answer, computed independently.
    #[derive(Debug, Default)]
    struct Model {
        plugged: BTreeSet<u64>,
        requested: u64,
        usable: u64,
    }

    impl Model {
        fn valid(&self, addr: u64, nb: u16) -> Option<Vec<u64>> {
            let len = u64::from(nb) * BLOCK;
            let in_range = nb > 0
                && addr.is_multiple_of(BLOCK)
                && addr >= REGION_ADDR
                && addr
                    .checked_add(len)
                    .is_some_and(|e| e <= REGION_ADDR + self.usable);
            in_range.then(|| (0..u64::from(nb)).map(|i| addr + i * BLOCK).collect())
        }

        fn grow(&mut self, shrink: bool) {
            let new = if self.requested == 0 {
                0
            } else {
                (self.requested + 256 * MIB).min(REGION_SIZE)
            };
            if shrink || new > self.usable {
                self.usable = new;
            }
        }

        fn answer(&mut self, req: MemRequest, fail: bool) -> u16 {
            match req {
                MemRequest::Plug { addr, nb_blocks } => match self.valid(addr, nb_blocks) {
                    None => VIRTIO_MEM_RESP_ERROR,
                    Some(b) if (self.plugged.len() + b.len()) as u64 * BLOCK > self.requested => {
                        VIRTIO_MEM_RESP_NACK
                    }
                    Some(b) if b.iter().any(|x| self.plugged.contains(x)) => VIRTIO_MEM_RESP_ERROR,
                    Some(_) if fail => VIRTIO_MEM_RESP_BUSY,
                    Some(b) => {
                        self.plugged.extend(b);
                        VIRTIO_MEM_RESP_ACK
                    }
                },
                MemRequest::Unplug { addr, nb_blocks } => match self.valid(addr, nb_blocks) {
                    None => VIRTIO_MEM_RESP_ERROR,
                    Some(b) if !b.iter().all(|x| self.plugged.contains(x)) => VIRTIO_MEM_RESP_ERROR,
                    Some(_) if fail => VIRTIO_MEM_RESP_BUSY,
                    Some(b) => {
                        for x in b {
                            self.plugged.remove(&x);
                        }
                        VIRTIO_MEM_RESP_ACK
                    }
                },
                MemRequest::UnplugAll => {
                    if fail && !self.plugged.is_empty() {
                        // The first run fails: nothing changes.
                        return VIRTIO_MEM_RESP_BUSY;
                    }
                    self.plugged.clear();
                    self.grow(true);
                    VIRTIO_MEM_RESP_ACK
                }
                MemRequest::State { addr, nb_blocks } => match self.valid(addr, nb_blocks) {
                    None => VIRTIO_MEM_RESP_ERROR,
                    Some(_) => VIRTIO_MEM_RESP_ACK,
                },
                MemRequest::Unknown { .. } => VIRTIO_MEM_RESP_ERROR,
            }
        }
    }

    fn arb_request() -> impl Strategy<Value = MemRequest> {
        let addr = prop_oneof![
            (0u64..80).prop_map(block),
            (0u64..600).prop_map(block),
            (REGION_ADDR - 4 * BLOCK..REGION_ADDR + REGION_SIZE + 4 * BLOCK),
            any::<u64>(),
        ];
        let nb = prop_oneof![0u16..8, 0u16..600, any::<u16>()];
        prop_oneof![
            (addr.clone(), nb.clone())
                .prop_map(|(addr, nb_blocks)| MemRequest::Plug { addr, nb_blocks }),
            (addr.clone(), nb.clone())
                .prop_map(|(addr, nb_blocks)| MemRequest::Unplug { addr, nb_blocks }),
            (addr, nb).prop_map(|(addr, nb_blocks)| MemRequest::State { addr, nb_blocks }),
            Just(MemRequest::UnplugAll),
            (4u16..).prop_map(|kind| MemRequest::Unknown { kind }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Random requests, requested-size changes and backend failures: the device
        /// answers what an independent model of the spec answers, its bitmap always
        /// equals what the backend backs, and the backend contract holds.
        #[test]
        fn requests_match_the_model(
            steps in prop::collection::vec(
                (arb_request(), any::<bool>(), prop::option::of(0u64..600)),
                1..60,
            ),
        ) {
            let f = MemFixture::new(0);
            let mut q = f.activate();
            let mut model = Model::default();
            for (req, fail, resize) in steps {
                if let Some(blocks) = resize {
                    let result = f.vmem.set_requested_size(blocks * BLOCK);
                    if blocks * BLOCK > REGION_SIZE {
                        prop_assert!(result.is_err());
                    } else {
                        prop_assert!(result.is_ok());
                        model.requested = blocks * BLOCK;
                        model.grow(false);
                    }
                }
                let expected = model.answer(req, fail);
                f.backend.fail_next(usize::from(fail));
                let got = kind(f.request(&mut q, req));
                f.backend.fail_next(0);
                prop_assert_eq!(got, expected, "{:?}", req);
                prop_assert_eq!(device_blocks(&f.vmem), model.plugged.clone());
                prop_assert_eq!(f.backend.plugged(), model.plugged.clone());
                let info = f.vmem.info();
                prop_assert_eq!(info.plugged_size, model.plugged.len() as u64 * BLOCK);
                prop_assert_eq!(info.usable_region_size, model.usable);
                prop_assert_eq!(f.config_u64(CFG_PLUGGED), info.plugged_size);
                prop_assert!(model.plugged.iter().all(|&b| b + BLOCK <= REGION_ADDR + info.usable_region_size));
            }
            prop_assert_eq!(f.backend.contract_violations(), 0);
            prop_assert_eq!(read32(&f.mmio, VIRTIO_MMIO_STATUS) & 0x40, 0);
        }

        /// Random descriptors, random heads and random ring indices never panic; the
        /// device either answers or breaks, and its bitmap matches the backend.
        #[test]
        fn random_chains_never_panic(
            descs in prop::collection::vec(
                (prop_oneof![0x8000u64..0x8100, 0u64..RAM_SIZE as u64 + 64, any::<u64>()],
                 prop_oneof![0u32..40, any::<u32>()],
                 0u16..8,
                 prop_oneof![0u16..QUEUE_SIZE, any::<u16>()]),
                QUEUE_SIZE as usize,
            ),
            heads in prop::collection::vec(prop_oneof![0u16..QUEUE_SIZE, any::<u16>()], 1..20),
            requests in prop::collection::vec(arb_request(), 4),
            avail_jump in prop::option::of(any::<u16>()),
        ) {
            let f = MemFixture::new(128 * BLOCK);
            for (i, req) in requests.iter().enumerate() {
                f.mem.write_slice(&req.to_bytes(), GuestAddress(0x8000 + 0x40 * i as u64)).unwrap();
            }
            let q = f.activate();
            for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
                q.store(i as u16, addr, len, flags, next);
            }
            for h in heads {
                q.publish(h);
            }
            if let Some(idx) = avail_jump {
                q.set_avail_idx(idx);
            }
            let outcome = f.kick();
            prop_assert!(outcome.completed <= usize::from(QUEUE_SIZE));
            prop_assert_eq!(device_blocks(&f.vmem), f.backend.plugged());
            prop_assert_eq!(f.backend.contract_violations(), 0);
            let broken = read32(&f.mmio, VIRTIO_MMIO_STATUS) & 0x40 != 0;
            prop_assert_eq!(broken, outcome.needs_reset);
            prop_assert_eq!(usize::from(q.used_idx()), outcome.completed);
        }

        /// Random register traffic and queue processing on the full stack never panic,
        /// and the device's bitmap always matches the backend.
        #[test]
        fn random_registers_and_requests_never_panic(
            ops in prop::collection::vec(
                (0u8..5,
                 prop_oneof![(0u64..0x40).prop_map(|r| r * 4), 0x100u64..0x140, any::<u64>()],
                 prop_oneof![Just(4usize), 0usize..=9],
                 any::<u32>(),
                 arb_request()),
                0..120,
            ),
        ) {
            let f = MemFixture::new(64 * BLOCK);
            let mut q = f.activate();
            for (op, offset, len, value, req) in ops {
                match op {
                    0 => {
                        let mut data = vec![0u8; len];
                        f.mmio.read(0, offset, &mut data);
                    }
                    1 => {
                        let data: Vec<u8> = value.to_le_bytes().iter().copied().cycle().take(len).collect();
                        f.mmio.write(0, offset, &data);
                    }
                    2 => {
                        // A request through whatever state the transport is in; if
                        // the used ring is full or the queue moved, it may stay unanswered.
                        f.mem.write_slice(&req.to_bytes(), GuestAddress(REQ_ADDR)).unwrap();
                        q.push(&[(REQ_ADDR, 24, false), (RESP_ADDR, 10, true)]);
                        let _ = f.mmio.process_queue(0, &f.mem);
                    }
                    3 => {
                        let _ = f.vmem.set_requested_size(u64::from(value % 80) * BLOCK);
                    }
                    _ => {
                        let _ = f.mmio.process_queue(value as usize % 2, &f.mem);
                    }
                }
                prop_assert_eq!(device_blocks(&f.vmem), f.backend.plugged());
            }
            prop_assert_eq!(f.backend.contract_violations(), 0);
            // Whatever happened, a fresh driver can still use the device.
            f.vmem.set_requested_size(80 * BLOCK).unwrap();
            let mut q = f.activate();
            let before = f.vmem.plugged_size();
            let free = (0u64..80).map(block).find(|b| !f.backend.plugged().contains(b));
            if let (Some(b), true) = (free, before < 80 * BLOCK) {
                prop_assert_eq!(kind(f.request(&mut q, plug(b, 1))), VIRTIO_MEM_RESP_ACK);
            }
        }
    }
}
