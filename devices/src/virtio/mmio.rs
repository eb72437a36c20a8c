//! The virtio-mmio transport, modern interface only (virtio 1.2 §4.2.2, `Version` = 2).
//!
//! A [`VirtioMmio`] is a [`BusDevice`] for one 4 KiB MMIO window. Registers occupy the
//! first 0x100 bytes and are 32 bits wide; the device configuration space starts at
//! 0x100 and is handed to the [`VirtioDevice`] with any width. The transport owns the
//! register file, feature negotiation, the device status state machine and the
//! `virtio_queue::Queue`s, and raises interrupts through a [`VirtioInterrupt`].
//!
//! Queue notifications: the VMM may register each queue's [`EventFd`]
//! ([`VirtioMmio::queue_notify_event`]) as a KVM ioeventfd at
//! `base + `[`QUEUE_NOTIFY_OFFSET`] with the queue index as datamatch. Without one, a
//! guest write to `QueueNotify` reaches [`BusDevice::write`], which signals the same
//! eventfd, so one control-thread path serves both cases: when the eventfd becomes
//! readable, the VMM reads it and calls [`VirtioMmio::process_queue`].
//!
//! Guest accesses never panic. A register access that is not 32 bits wide and aligned is
//! ignored (reads return 0); accesses to undefined registers, reads of write-only ones,
//! writes to read-only ones and writes the status state machine refuses are ignored too.
//! All of them are counted ([`MmioStats`]) and logged at debug level.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use thiserror::Error;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_MAGIC_VALUE, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_SEL, VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_SHM_BASE_HIGH, VIRTIO_MMIO_SHM_BASE_LOW, VIRTIO_MMIO_SHM_LEN_HIGH,
    VIRTIO_MMIO_SHM_LEN_LOW, VIRTIO_MMIO_SHM_SEL, VIRTIO_MMIO_STATUS, VIRTIO_MMIO_VENDOR_ID,
    VIRTIO_MMIO_VERSION,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::device::{QueueProgress, VirtioDevice, VirtioDeviceError};
use super::interrupt::{VirtioInterrupt, VirtioInterruptKind};
use crate::bus::BusDevice;
use crate::interrupt::{Interrupt, InterruptError};

/// Size of a virtio-mmio window: one 4 KiB page.
pub const VIRTIO_MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the `QueueNotify` register: where a KVM ioeventfd for the queues goes
/// (4-byte write, datamatch = queue index).
pub const QUEUE_NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// Offset of the device configuration space in the window.
pub const CONFIG_SPACE_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;
/// Value of the `MagicValue` register ("virt").
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// Value of the `Version` register: the modern (virtio 1.x) interface.
pub const MMIO_VERSION: u32 = 2;
/// Value of the `VendorID` register.
pub const MMIO_VENDOR_ID: u32 = 0;
/// The transport feature bits the transport offers on top of the device's:
/// `VIRTIO_F_VERSION_1` only.
pub const TRANSPORT_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1;

/// `QueueReset` (virtio 1.2), only meaningful with `VIRTIO_F_RING_RESET`, which is not
/// offered: reads 0, writes are ignored.
const QUEUE_RESET: u64 = 0xc0;

const ACKNOWLEDGE: u8 = VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
const DRIVER: u8 = VIRTIO_CONFIG_S_DRIVER as u8;
const DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;
const FEATURES_OK: u8 = VIRTIO_CONFIG_S_FEATURES_OK as u8;
const NEEDS_RESET: u8 = VIRTIO_CONFIG_S_NEEDS_RESET as u8;
const FAILED: u8 = VIRTIO_CONFIG_S_FAILED as u8;
/// Status bits a driver may set.
const DRIVER_STATUS_BITS: u8 = ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK | FAILED;

/// Errors creating a transport or processing its queues.
#[derive(Debug, Error)]
pub enum MmioError {
    /// The device reported a queue size the virtqueue implementation refuses.
    #[error("queue {index} has an invalid maximum size {size}")]
    QueueSize {
        /// Queue index.
        index: usize,
        /// The size the device reported.
        size: u16,
        /// What `virtio-queue` said.
        #[source]
        source: virtio_queue::Error,
    },
    /// A queue notification eventfd could not be created.
    #[error("cannot create a queue notification eventfd")]
    EventFd(#[source] io::Error),
    /// The VMM asked for a queue the device does not have.
    #[error("the device has no queue {index}")]
    NoSuchQueue {
        /// The queue index asked for.
        index: usize,
    },
    /// Raising the used-buffer interrupt failed.
    #[error("cannot raise the virtio interrupt")]
    Interrupt(#[source] InterruptError),
    /// Re-arming a queue's notification eventfd failed.
    #[error("cannot signal the queue notification eventfd")]
    Notify(#[source] io::Error),
}

/// Counters of guest accesses the transport ignored (see [`VirtioMmio::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MmioStats {
    /// Register accesses that were not 32 bits wide and aligned.
    pub bad_width: u64,
    /// Accesses ignored for another reason: undefined register, read of a write-only or
    /// write to a read-only register, or a write refused by the current device status.
    pub ignored: u64,
    /// Queue notifications received through `QueueNotify` writes (ioeventfd
    /// notifications never reach the transport and are not counted).
    pub notifies: u64,
    /// Times the device was marked as needing a reset.
    pub broken: u64,
    /// [`VirtioMmio::process_queue`] calls refused because the device needed a reset
    /// (a driver notifying a broken device; nothing is processed or logged for them).
    pub refused_while_broken: u64,
}

/// What one [`VirtioMmio::process_queue`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueOutcome {
    /// Descriptor chains put in the used ring by this call (also when the device broke
    /// after completing some).
    pub completed: usize,
    /// `DEVICE_NEEDS_RESET` is set: the driver broke the protocol (during this call or
    /// before) and nothing is processed until it resets the device. The transport logs
    /// the transition itself (at warn level the first time, at debug level after); a
    /// caller must not log per call, since a driver can notify a broken device without
    /// end (see [`MmioStats::refused_while_broken`]).
    pub needs_reset: bool,
}

#[derive(Debug, Default)]
struct Counters {
    bad_width: AtomicU64,
    ignored: AtomicU64,
    notifies: AtomicU64,
    broken: AtomicU64,
    refused_while_broken: AtomicU64,
}

#[derive(Debug)]
struct QueueSlot {
    queue: Queue,
    /// The driver wrote an invalid size or a misaligned ring address since the last
    /// reset; processing the queue breaks the device.
    misconfigured: bool,
}

#[derive(Debug)]
struct MmioState {
    /// The bits the driver set (never `NEEDS_RESET`).
    status: u8,
    needs_reset: bool,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    acked_features: u64,
    queue_sel: u32,
    queues: Vec<QueueSlot>,
}

/// A virtio device behind a virtio-mmio register window.
///
/// Register accesses (vCPU threads) and [`process_queue`](VirtioMmio::process_queue)
/// (the control thread) serialise on the transport's own lock; the device is called with
/// that lock held. `InterruptStatus`, `InterruptACK` and the identification registers
/// take no lock.
pub struct VirtioMmio {
    device: Arc<dyn VirtioDevice>,
    interrupt: Arc<VirtioInterrupt>,
    notify: Vec<EventFd>,
    offered_features: u64,
    state: Mutex<MmioState>,
    counters: Counters,
    warned_broken: AtomicBool,
}

impl VirtioMmio {
    /// Puts `device` behind a new transport that raises `interrupt` (edge style: once per
    /// event). Creates one non-blocking notification eventfd per queue.
    pub fn new(
        device: Arc<dyn VirtioDevice>,
        interrupt: Arc<dyn Interrupt>,
    ) -> Result<VirtioMmio, MmioError> {
        let mut queues = Vec::new();
        let mut notify = Vec::new();
        for (index, &size) in device.queue_max_sizes().iter().enumerate() {
            let queue = Queue::new(size).map_err(|source| MmioError::QueueSize {
                index,
                size,
                source,
            })?;
            queues.push(QueueSlot {
                queue,
                misconfigured: false,
            });
            notify.push(EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd)?);
        }
        Ok(VirtioMmio {
            offered_features: device.features() | TRANSPORT_FEATURES,
            device,
            interrupt: Arc::new(VirtioInterrupt::new(interrupt)),
            notify,
            state: Mutex::new(MmioState {
                status: 0,
                needs_reset: false,
                device_features_sel: 0,
                driver_features_sel: 0,
                driver_features: 0,
                acked_features: 0,
                queue_sel: 0,
                queues,
            }),
            counters: Counters::default(),
            warned_broken: AtomicBool::new(false),
        })
    }

    /// The device behind the transport.
    pub fn device(&self) -> &Arc<dyn VirtioDevice> {
        &self.device
    }

    /// Number of queues of the device.
    pub fn num_queues(&self) -> usize {
        self.notify.len()
    }

    /// The eventfd that queue `index` is notified on, if the queue exists.
    ///
    /// Register it as a KVM ioeventfd at `window base + `[`QUEUE_NOTIFY_OFFSET`], length
    /// 4, datamatch `index`, and watch it on the control thread. Guest `QueueNotify`
    /// writes that reach the transport signal it too, and so does
    /// [`process_queue`](VirtioMmio::process_queue) when it leaves work for a later call.
    pub fn queue_notify_event(&self, index: usize) -> Option<&EventFd> {
        self.notify.get(index)
    }

    /// The device status register as the driver reads it (including
    /// `DEVICE_NEEDS_RESET`).
    pub fn status(&self) -> u8 {
        let st = self.lock();
        status_value(&st)
    }

    /// The features negotiated when the driver set `FEATURES_OK` (0 before, and after a
    /// reset).
    pub fn acked_features(&self) -> u64 {
        self.lock().acked_features
    }

    /// The pending interrupt bits (`InterruptStatus`).
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt.status()
    }

    /// Counters of ignored guest accesses and notifications since creation.
    pub fn stats(&self) -> MmioStats {
        MmioStats {
            bad_width: self.counters.bad_width.load(Ordering::Relaxed),
            ignored: self.counters.ignored.load(Ordering::Relaxed),
            notifies: self.counters.notifies.load(Ordering::Relaxed),
            broken: self.counters.broken.load(Ordering::Relaxed),
            refused_while_broken: self.counters.refused_while_broken.load(Ordering::Relaxed),
        }
    }

    /// Processes the chains the driver made available on queue `index`, reading and
    /// writing guest memory only through `mem`.
    ///
    /// Call it on the control thread after reading the queue's notification eventfd,
    /// inside the RCU read section that keeps `mem` alive. Does nothing unless the
    /// driver set `DRIVER_OK`, the device does not need a reset and the queue is ready. A
    /// queue whose configuration was invalid, whose rings are not in `mem`, or on which
    /// the device finds a malformed request breaks the device: `DEVICE_NEEDS_RESET` is
    /// set and a configuration-change interrupt raised (the outcome says so; it is not an
    /// error for the VMM). Completed chains raise one used-buffer interrupt. If the device left chains for later, the queue's
    /// eventfd is signalled again. Blocks on the transport lock and for as long as the
    /// device works (a memory device waits for its backend).
    pub fn process_queue(
        &self,
        index: usize,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, MmioError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        if index >= st.queues.len() {
            return Err(MmioError::NoSuchQueue { index });
        }
        if st.needs_reset {
            self.counters
                .refused_while_broken
                .fetch_add(1, Ordering::Relaxed);
            return Ok(QueueOutcome {
                completed: 0,
                needs_reset: true,
            });
        }
        let live = st.status & DRIVER_OK != 0 && st.status & FAILED == 0;
        let Some(slot) = st.queues.get_mut(index).filter(|s| live && s.queue.ready()) else {
            return Ok(QueueOutcome::default());
        };
        if slot.misconfigured {
            self.mark_broken(st, "queue configured with an invalid size or ring address");
            return Ok(QueueOutcome {
                completed: 0,
                needs_reset: true,
            });
        }
        // Checked here first: `Queue::is_valid` logs each failure at error level, a
        // line per notification of a broken queue.
        if let Some(ring) = ring_outside(&slot.queue, mem) {
            self.mark_broken(st, &format!("queue {ring} is outside guest memory"));
            return Ok(QueueOutcome {
                completed: 0,
                needs_reset: true,
            });
        }
        if !slot.queue.is_valid(mem) {
            self.mark_broken(st, "queue rings are outside guest memory");
            return Ok(QueueOutcome {
                completed: 0,
                needs_reset: true,
            });
        }
        let used_before = slot.queue.next_used();
        let result = self.device.process_queue(index, &mut slot.queue, mem);
        // Count what reached the used ring, even if the device failed afterwards.
        let completed = usize::from(slot.queue.next_used().wrapping_sub(used_before));
        // Without VIRTIO_F_RING_EVENT_IDX this is always true; an unreadable event
        // index is treated the same way.
        let notify = completed > 0 && slot.queue.needs_notification(mem).unwrap_or(true);
        let more_pending = matches!(
            result,
            Ok(QueueProgress {
                more_pending: true,
                ..
            })
        );
        if let Err(e) = &result {
            self.mark_broken_by(st, e);
        }
        let needs_reset = st.needs_reset;
        // Signalled under the lock, so a reset cannot come between and leave a stale bit.
        if notify {
            self.interrupt
                .signal(VirtioInterruptKind::UsedBuffer)
                .map_err(MmioError::Interrupt)?;
        }
        if more_pending && let Some(evt) = self.notify.get(index) {
            evt.write(1).map_err(MmioError::Notify)?;
        }
        Ok(QueueOutcome {
            completed,
            needs_reset,
        })
    }

    fn lock(&self) -> MutexGuard<'_, MmioState> {
        // Every update of the state is a plain field store, so a panic elsewhere while
        // holding the lock leaves it consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn ignore(&self, what: &str, offset: u64) {
        self.counters.ignored.fetch_add(1, Ordering::Relaxed);
        log::debug!("virtio-mmio: ignored {what} at offset {offset:#x}");
    }

    fn mark_broken_by(&self, st: &mut MmioState, err: &VirtioDeviceError) {
        let mut text = err.to_string();
        let mut source = std::error::Error::source(err);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        self.mark_broken(st, &text);
    }

    /// Sets `DEVICE_NEEDS_RESET` and, if the driver is live, announces it with a
    /// configuration-change interrupt (virtio 1.2 §2.1.2).
    fn mark_broken(&self, st: &mut MmioState, reason: &str) {
        if st.needs_reset {
            return;
        }
        st.needs_reset = true;
        self.counters.broken.fetch_add(1, Ordering::Relaxed);
        if self.warned_broken.swap(true, Ordering::Relaxed) {
            log::debug!("virtio-mmio: device needs reset: {reason}");
        } else {
            log::warn!("virtio-mmio: device needs reset: {reason}");
        }
        if st.status & DRIVER_OK != 0
            && let Err(e) = self.interrupt.signal(VirtioInterruptKind::ConfigChange)
        {
            log::warn!("virtio-mmio: cannot raise the config interrupt: {e}");
        }
    }

    /// Back to the power-on state (a machine reset): what a driver's write of 0 to the
    /// status register does (status, features, queues and interrupt status cleared,
    /// the device reset). Blocks only on this transport's lock.
    pub fn system_reset(&self) {
        let mut st = self.lock();
        self.reset(&mut st);
    }

    fn reset(&self, st: &mut MmioState) {
        st.status = 0;
        st.needs_reset = false;
        st.device_features_sel = 0;
        st.driver_features_sel = 0;
        st.driver_features = 0;
        st.acked_features = 0;
        st.queue_sel = 0;
        for slot in &mut st.queues {
            slot.queue.reset();
            slot.misconfigured = false;
        }
        self.interrupt.clear();
        self.device.reset();
    }

    fn write_status(&self, st: &mut MmioState, value: u32) {
        if value == 0 {
            self.reset(st);
            return;
        }
        let Ok(value) = u8::try_from(value) else {
            self.ignore("status write with bits above 7", VIRTIO_MMIO_STATUS.into());
            return;
        };
        // DEVICE_NEEDS_RESET is the device's bit; a driver writing back what it read
        // does not set it.
        let requested = value & !NEEDS_RESET;
        let current = st.status;
        let added = requested & !current;
        let after = current | added;
        let refused = if requested & current != current {
            Some("status write clearing bits")
        } else if added & !DRIVER_STATUS_BITS != 0 {
            Some("status write with undefined bits")
        } else if added & DRIVER != 0 && after & ACKNOWLEDGE == 0 {
            Some("DRIVER before ACKNOWLEDGE")
        } else if added & FEATURES_OK != 0 && after & DRIVER == 0 {
            Some("FEATURES_OK before DRIVER")
        } else if added & DRIVER_OK != 0 && after & FEATURES_OK == 0 {
            Some("DRIVER_OK before FEATURES_OK")
        } else {
            None
        };
        if let Some(what) = refused {
            self.ignore(what, VIRTIO_MMIO_STATUS.into());
            return;
        }
        let mut new = after;
        if added & FEATURES_OK != 0 {
            if self.features_acceptable(st.driver_features) {
                st.acked_features = st.driver_features;
            } else {
                log::debug!(
                    "virtio-mmio: refusing features {:#x} (offered {:#x})",
                    st.driver_features,
                    self.offered_features
                );
                // FEATURES_OK stays clear, and so does a DRIVER_OK set in the same write.
                new &= !(FEATURES_OK | DRIVER_OK);
            }
        }
        st.status = new;
        if added & new & DRIVER_OK != 0
            && !st.needs_reset
            && let Err(e) = self
                .device
                .activate(st.acked_features, Arc::clone(&self.interrupt))
        {
            self.mark_broken_by(st, &e);
        }
    }

    fn features_acceptable(&self, features: u64) -> bool {
        features & !self.offered_features == 0
            && features & TRANSPORT_FEATURES == TRANSPORT_FEATURES
            && self.device.accepts_features(features)
    }

    /// Queue configuration registers may be written after FEATURES_OK and before
    /// DRIVER_OK (virtio 1.2 §3.1.1), while the device does not need a reset.
    fn queue_config_open(st: &MmioState) -> bool {
        st.status & FEATURES_OK != 0 && st.status & DRIVER_OK == 0 && !st.needs_reset
    }

    fn read_register(&self, offset: u64) -> Option<u32> {
        let Ok(reg) = u32::try_from(offset) else {
            return None;
        };
        let value = match reg {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => MMIO_VENDOR_ID,
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_DEVICE_FEATURES => {
                let sel = self.lock().device_features_sel;
                match sel {
                    0 => self.offered_features as u32,
                    1 => (self.offered_features >> 32) as u32,
                    _ => 0,
                }
            }
            VIRTIO_MMIO_STATUS => u32::from(self.status()),
            VIRTIO_MMIO_CONFIG_GENERATION => self.device.config_generation(),
            // No shared memory regions: a length of -1 says the selected one does not exist.
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            VIRTIO_MMIO_QUEUE_NUM_MAX
            | VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_READY
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => {
                let st = self.lock();
                // A queue that does not exist reads as 0 everywhere (QueueNumMax 0 says
                // "not available").
                let q = st.queues.get(st.queue_sel as usize).map(|s| &s.queue);
                q.map_or(0, |q| match reg {
                    VIRTIO_MMIO_QUEUE_NUM_MAX => u32::from(q.max_size()),
                    VIRTIO_MMIO_QUEUE_NUM => u32::from(q.size()),
                    VIRTIO_MMIO_QUEUE_READY => u32::from(q.ready()),
                    VIRTIO_MMIO_QUEUE_DESC_LOW => q.desc_table() as u32,
                    VIRTIO_MMIO_QUEUE_DESC_HIGH => (q.desc_table() >> 32) as u32,
                    VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.avail_ring() as u32,
                    VIRTIO_MMIO_QUEUE_AVAIL_HIGH => (q.avail_ring() >> 32) as u32,
                    VIRTIO_MMIO_QUEUE_USED_LOW => q.used_ring() as u32,
                    _ => (q.used_ring() >> 32) as u32,
                })
            }
            _ if offset == QUEUE_RESET => 0,
            _ => return None,
        };
        Some(value)
    }

    fn write_register(&self, offset: u64, value: u32) {
        let Ok(reg) = u32::try_from(offset) else {
            self.ignore("write to an undefined register", offset);
            return;
        };
        match reg {
            VIRTIO_MMIO_QUEUE_NOTIFY => self.guest_notify(value),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.acknowledge(value),
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.lock().device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.lock().driver_features_sel = value,
            VIRTIO_MMIO_QUEUE_SEL => self.lock().queue_sel = value,
            VIRTIO_MMIO_SHM_SEL => {}
            VIRTIO_MMIO_DRIVER_FEATURES => {
                let mut st = self.lock();
                let open = st.status & DRIVER != 0 && st.status & FEATURES_OK == 0;
                let shift = match st.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => {
                        drop(st);
                        self.ignore("driver features beyond bit 63", offset);
                        return;
                    }
                };
                if open {
                    st.driver_features = (st.driver_features & !(0xffff_ffff << shift))
                        | (u64::from(value) << shift);
                } else {
                    drop(st);
                    self.ignore("driver features write outside negotiation", offset);
                }
            }
            VIRTIO_MMIO_STATUS => {
                let mut st = self.lock();
                self.write_status(&mut st, value);
            }
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_READY
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_register(reg, value),
            _ if offset == QUEUE_RESET => self.ignore("QueueReset write", offset),
            _ => self.ignore("write to a read-only or undefined register", offset),
        }
    }

    fn write_queue_register(&self, reg: u32, value: u32) {
        let mut guard = self.lock();
        let st = &mut *guard;
        let open = Self::queue_config_open(st);
        let sel = st.queue_sel as usize;
        let Some(slot) = st.queues.get_mut(sel).filter(|_| open) else {
            drop(guard);
            self.ignore(
                "queue register write while closed or for a missing queue",
                reg.into(),
            );
            return;
        };
        let q = &mut slot.queue;
        if reg == VIRTIO_MMIO_QUEUE_READY {
            match value {
                0 => q.set_ready(false),
                1 => q.set_ready(true),
                _ => {
                    drop(guard);
                    self.ignore("QueueReady value other than 0 or 1", reg.into());
                }
            }
            return;
        }
        if q.ready() {
            drop(guard);
            self.ignore("configuration write to a ready queue", reg.into());
            return;
        }
        let low = |old: u64| (old & !0xffff_ffff) | u64::from(value);
        let high = |old: u64| (old & 0xffff_ffff) | (u64::from(value) << 32);
        let result = match reg {
            VIRTIO_MMIO_QUEUE_NUM => match u16::try_from(value) {
                Ok(size) => q.try_set_size(size),
                Err(_) => Err(virtio_queue::Error::InvalidSize),
            },
            VIRTIO_MMIO_QUEUE_DESC_LOW => {
                q.try_set_desc_table_address(GuestAddress(low(q.desc_table())))
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                q.try_set_desc_table_address(GuestAddress(high(q.desc_table())))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                q.try_set_avail_ring_address(GuestAddress(low(q.avail_ring())))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                q.try_set_avail_ring_address(GuestAddress(high(q.avail_ring())))
            }
            VIRTIO_MMIO_QUEUE_USED_LOW => {
                q.try_set_used_ring_address(GuestAddress(low(q.used_ring())))
            }
            _ => q.try_set_used_ring_address(GuestAddress(high(q.used_ring()))),
        };
        if let Err(e) = result {
            slot.misconfigured = true;
            drop(guard);
            self.ignore(
                &format!("invalid queue {sel} configuration ({e}) {value:#x}"),
                reg.into(),
            );
        }
    }

    fn guest_notify(&self, value: u32) {
        self.counters.notifies.fetch_add(1, Ordering::Relaxed);
        match self.notify.get(value as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    log::debug!("virtio-mmio: cannot signal queue {value}: {e}");
                }
            }
            None => self.ignore("notification of a missing queue", QUEUE_NOTIFY_OFFSET),
        }
    }
}

/// The first of `queue`'s rings that does not lie wholly in `mem`, by name: the
/// checks of `Queue::is_valid` (virtio 1.2 §2.7: 16-byte descriptors; 6 bytes of
/// header and event index around 2-byte available and 8-byte used elements), without
/// its logging.
fn ring_outside(queue: &Queue, mem: &GuestMemoryMmap) -> Option<&'static str> {
    let size = u64::from(queue.size());
    [
        (queue.desc_table(), 16 * size, "descriptor table"),
        (queue.avail_ring(), 6 + 2 * size, "available ring"),
        (queue.used_ring(), 6 + 8 * size, "used ring"),
    ]
    .into_iter()
    .find(|&(addr, len, _)| {
        usize::try_from(len).map_or(true, |len| !mem.check_range(GuestAddress(addr), len))
    })
    .map(|(_, _, name)| name)
}

fn status_value(st: &MmioState) -> u8 {
    if st.needs_reset {
        st.status | NEEDS_RESET
    } else {
        st.status
    }
}

impl BusDevice for VirtioMmio {
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        data.fill(0);
        let Ok(dword) = <&mut [u8; 4]>::try_from(data) else {
            self.counters.bad_width.fetch_add(1, Ordering::Relaxed);
            log::debug!("virtio-mmio: ignored read of bad width at offset {offset:#x}");
            return;
        };
        if !offset.is_multiple_of(4) {
            self.counters.bad_width.fetch_add(1, Ordering::Relaxed);
            log::debug!("virtio-mmio: ignored unaligned read at offset {offset:#x}");
            return;
        }
        match self.read_register(offset) {
            Some(v) => *dword = v.to_le_bytes(),
            None => self.ignore("read of a write-only or undefined register", offset),
        }
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let (Ok(dword), 0) = (<[u8; 4]>::try_from(data), offset % 4) else {
            self.counters.bad_width.fetch_add(1, Ordering::Relaxed);
            log::debug!(
                "virtio-mmio: ignored {}-byte write at offset {offset:#x}",
                data.len()
            );
            return;
        };
        self.write_register(offset, u32::from_le_bytes(dword));
    }
}

impl fmt::Debug for VirtioMmio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtioMmio")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status())
            .field("interrupt", &self.interrupt)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;
    use virtio_bindings::virtio_mmio::*;
    use virtio_queue::QueueOwnedT;

    use super::*;
    use crate::virtio::fixtures::*;

    const DEVICE_TYPE: u32 = 42;
    const DEV_FEATURE_A: u64 = 1 << 3;
    const DEV_FEATURE_HIGH: u64 = 1 << 40;
    const CONFIG: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Behaviour {
        CompleteAll,
        LeaveMore,
        Fail,
    }

    /// A two-queue device that completes every chain with length 0, or fails.
    #[derive(Debug)]
    struct TestDevice {
        behaviour: Mutex<Behaviour>,
        reject_feature_a: bool,
        activated: Mutex<Option<u64>>,
        resets: Mutex<u32>,
        config_writes: Mutex<Vec<(u64, Vec<u8>)>>,
        processed: Mutex<Vec<usize>>,
    }

    impl TestDevice {
        fn new() -> TestDevice {
            TestDevice {
                behaviour: Mutex::new(Behaviour::CompleteAll),
                reject_feature_a: false,
                activated: Mutex::new(None),
                resets: Mutex::new(0),
                config_writes: Mutex::new(Vec::new()),
                processed: Mutex::new(Vec::new()),
            }
        }
    }

    impl VirtioDevice for TestDevice {
        fn device_type(&self) -> u32 {
            DEVICE_TYPE
        }
        fn features(&self) -> u64 {
            DEV_FEATURE_A | DEV_FEATURE_HIGH
        }
        fn accepts_features(&self, acked: u64) -> bool {
            !(self.reject_feature_a && acked & DEV_FEATURE_A != 0)
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256, 16]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = usize::try_from(offset + i as u64)
                    .ok()
                    .and_then(|o| CONFIG.get(o))
                    .copied()
                    .unwrap_or(0);
            }
        }
        fn write_config(&self, offset: u64, data: &[u8]) {
            self.config_writes
                .lock()
                .unwrap()
                .push((offset, data.to_vec()));
        }
        fn config_generation(&self) -> u32 {
            7
        }
        fn activate(
            &self,
            acked_features: u64,
            _interrupt: Arc<VirtioInterrupt>,
        ) -> Result<(), VirtioDeviceError> {
            *self.activated.lock().unwrap() = Some(acked_features);
            Ok(())
        }
        fn process_queue(
            &self,
            index: usize,
            queue: &mut Queue,
            mem: &GuestMemoryMmap,
        ) -> Result<QueueProgress, VirtioDeviceError> {
            self.processed.lock().unwrap().push(index);
            let behaviour = *self.behaviour.lock().unwrap();
            if behaviour == Behaviour::Fail {
                return Err(VirtioDeviceError::NoSuchQueue { index: 99 });
            }
            let mut completed = 0;
            loop {
                let chain = queue.iter(mem).map_err(VirtioDeviceError::Queue)?.next();
                let Some(chain) = chain else { break };
                queue
                    .add_used(mem, chain.head_index(), 0)
                    .map_err(VirtioDeviceError::Queue)?;
                completed += 1;
            }
            Ok(QueueProgress {
                completed,
                more_pending: behaviour == Behaviour::LeaveMore,
            })
        }
        fn reset(&self) {
            *self.resets.lock().unwrap() += 1;
            *self.activated.lock().unwrap() = None;
        }
    }

    fn transport_with(dev: TestDevice) -> (Arc<TestDevice>, VirtioMmio, Arc<CountingIrq>) {
        let dev = Arc::new(dev);
        let irq = Arc::new(CountingIrq::default());
        let mmio = VirtioMmio::new(dev.clone(), irq.clone()).unwrap();
        (dev, mmio, irq)
    }

    fn transport() -> (Arc<TestDevice>, VirtioMmio, Arc<CountingIrq>) {
        transport_with(TestDevice::new())
    }

    const ALL_FEATURES: u64 = TRANSPORT_FEATURES | DEV_FEATURE_A | DEV_FEATURE_HIGH;

    /// Writes the status with S_DRIVER_OK, after ACKNOWLEDGE, DRIVER and
    /// FEATURES_OK.
    fn set_driver_ok(mmio: &VirtioMmio) {
        write32(
            mmio,
            VIRTIO_MMIO_STATUS,
            S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
    }

    /// Programs queue 0 with 16 entries and rings at 0x1000, 0x2000 and
    /// 0x3000, except that `high` (one ring's high address register) gets
    /// 0x10, which puts that ring outside guest memory; marks it ready.
    fn set_up_queue_0_with_a_ring_outside(mmio: &VirtioMmio, high: u32) {
        write32(mmio, VIRTIO_MMIO_QUEUE_SEL, 0);
        write32(mmio, VIRTIO_MMIO_QUEUE_NUM, 16);
        write32(mmio, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
        write32(mmio, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000);
        write32(mmio, VIRTIO_MMIO_QUEUE_USED_LOW, 0x3000);
        write32(mmio, high, 0x10);
        write32(mmio, VIRTIO_MMIO_QUEUE_READY, 1);
    }

    /// Negotiates all features, sets up queue 0 and sets S_DRIVER_OK.
    fn activate<'m>(mmio: &VirtioMmio, mem: &'m GuestMemoryMmap) -> TestQueue<&'m GuestMemoryMmap> {
        assert_ne!(negotiate(mmio, ALL_FEATURES) & S_FEATURES_OK, 0);
        let q = new_queue(mem);
        q.setup(mmio, 0);
        set_driver_ok(mmio);
        q
    }

    #[test]
    fn identification_registers() {
        let (_, mmio, _) = transport();
        assert_eq!(read32(&mmio, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(read32(&mmio, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(read32(&mmio, VIRTIO_MMIO_DEVICE_ID), DEVICE_TYPE);
        assert_eq!(read32(&mmio, VIRTIO_MMIO_VENDOR_ID), 0);
        assert_eq!(read32(&mmio, VIRTIO_MMIO_CONFIG_GENERATION), 7);
        assert_eq!(read32(&mmio, VIRTIO_MMIO_STATUS), 0);
        write32(&mmio, VIRTIO_MMIO_SHM_SEL, 0);
        assert_eq!(
            read32(&mmio, VIRTIO_MMIO_SHM_LEN_LOW),
            u32::MAX,
            "no region: length -1"
        );
        assert_eq!(read32(&mmio, VIRTIO_MMIO_SHM_LEN_HIGH), u32::MAX);
        assert_eq!(mmio.num_queues(), 2);
        assert_eq!(mmio.stats(), MmioStats::default());
    }

    #[test]
    fn device_features_include_version_1_in_the_high_word() {
        let (_, mmio, _) = transport();
        assert_eq!(device_features(&mmio), ALL_FEATURES);
        write32(&mmio, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            read32(&mmio, VIRTIO_MMIO_DEVICE_FEATURES),
            1 | (1 << 8),
            "bits 32 and 40"
        );
        write32(&mmio, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
        assert_eq!(read32(&mmio, VIRTIO_MMIO_DEVICE_FEATURES), 0);
    }

    #[test]
    fn full_handshake_activates_the_device() {
        let (dev, mmio, _) = transport();
        let mem = guest_memory();
        let q = activate(&mmio, &mem);
        assert_eq!(
            u32::from(mmio.status()),
            S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
        );
        assert_eq!(mmio.acked_features(), ALL_FEATURES);
        assert_eq!(*dev.activated.lock().unwrap(), Some(ALL_FEATURES));
        // The queue registers read back what was written.
        write32(&mmio, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(read32(&mmio, VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
        assert_eq!(read32(&mmio, VIRTIO_MMIO_QUEUE_NUM), u32::from(QUEUE_SIZE));
        assert_eq!(read32(&mmio, VIRTIO_MMIO_QUEUE_READY), 1);
        assert_eq!(
            u64::from(read32(&mmio, VIRTIO_MMIO_QUEUE_AVAIL_LOW)),
            q.avail_addr()
        );
        assert_eq!(
            u64::from(read32(&mmio, VIRTIO_MMIO_QUEUE_USED_LOW)),
            q.used_addr()
        );
        write32(&mmio, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(read32(&mmio, VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
        assert_eq!(read32(&mmio, VIRTIO_MMIO_QUEUE_READY), 0);
        write32(&mmio, VIRTIO_MMIO_QUEUE_SEL, 2);
        assert_eq!(
            read32(&mmio, VIRTIO_MMIO_QUEUE_NUM_MAX),
            0,
            "queue 2 does not exist"
        );
    }

    #[test]
    fn features_ok_needs_version_1_and_offered_bits_only() {
        let (_, mmio, _) = transport();
        let status = negotiate(&mmio, DEV_FEATURE_A);
        assert_eq!(
            status,
            S_ACK | S_DRIVER,
            "no VERSION_1: S_FEATURES_OK stays clear"
        );
        assert_eq!(mmio.acked_features(), 0);

        let status = negotiate(&mmio, TRANSPORT_FEATURES | (1 << 5));
        assert_eq!(status, S_ACK | S_DRIVER, "bit 5 was not offered");

        let status = negotiate(&mmio, TRANSPORT_FEATURES | DEV_FEATURE_HIGH);
        assert_eq!(status, S_ACK | S_DRIVER | S_FEATURES_OK, "a subset is fine");
        assert_eq!(mmio.acked_features(), TRANSPORT_FEATURES | DEV_FEATURE_HIGH);

        // After S_FEATURES_OK, feature writes are ignored.
        write32(&mmio, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        write32(&mmio, VIRTIO_MMIO_DRIVER_FEATURES, DEV_FEATURE_A as u32);
        assert_eq!(mmio.acked_features(), TRANSPORT_FEATURES | DEV_FEATURE_HIGH);
        assert!(mmio.stats().ignored >= 1);
    }

    #[test]
    fn device_can_refuse_a_feature_combination() {
        let (_, mmio, _) = transport_with(TestDevice {
            reject_feature_a: true,
            ..TestDevice::new()
        });
        assert_eq!(negotiate(&mmio, ALL_FEATURES), S_ACK | S_DRIVER);
        assert_eq!(
            negotiate(&mmio, TRANSPORT_FEATURES),
            S_ACK | S_DRIVER | S_FEATURES_OK
        );
    }

    #[test]
    fn status_state_machine_refuses_out_of_order_writes() {
        let (dev, mmio, _) = transport();
        write32(&mmio, VIRTIO_MMIO_STATUS, S_DRIVER);
        assert_eq!(mmio.status(), 0, "S_DRIVER before ACKNOWLEDGE");
        write32(&mmio, VIRTIO_MMIO_STATUS, S_ACK);
        write32(&mmio, VIRTIO_MMIO_STATUS, S_ACK | S_DRIVER | S_DRIVER_OK);
        assert_eq!(
            u32::from(mmio.status()),
            S_ACK,
            "S_DRIVER_OK before S_FEATURES_OK"
        );
        write32(&mmio, VIRTIO_MMIO_STATUS, S_ACK | S_DRIVER);
        write32(&mmio, VIRTIO_MMIO_STATUS, S_ACK);
        assert_eq!(
            u32::from(mmio.status()),
            S_ACK | S_DRIVER,
            "bits cannot be cleared"
        );
        write32(&mmio, VIRTIO_MMIO_STATUS, S_ACK | S_DRIVER | 0x40);
        assert_eq!(
            u32::from(mmio.status()),
            S_ACK | S_DRIVER,
            "NEEDS_RESET is the device's"
        );
        write32(&mmio, VIRTIO_MMIO_STATUS, S_ACK | S_DRIVER | 0x10);
        assert_eq!(u32::from(mmio.status()), S_ACK | S_DRIVER, "undefined bit");
        write32(&mmio, VIRTIO_MMIO_STATUS, 0x1_0000 | S_ACK | S_DRIVER);
        assert_eq!(u32::from(mmio.status()), S_ACK | S_DRIVER, "bits above 7");
        write32(&mmio, VIRTIO_MMIO_STATUS, S_ACK | S_DRIVER | 0x80);
        assert_eq!(
            u32::from(mmio.status()),
            S_ACK | S_DRIVER | 0x80,
            "FAILED is allowed"
        );
        assert!(dev.activated.lock().unwrap().is_none());
        assert_eq!(
            mmio.stats().ignored,
            5,
            "the NEEDS_RESET write-back is a no-op"
        );
    }

    #[test]
    fn queue_registers_are_only_writable_between_features_ok_and_driver_ok() {
        let (_, mmio, _) = transport();
        write32(&mmio, VIRTIO_MMIO_QUEUE_SEL, 0);
        write32(&mmio, VIRTIO_MMIO_QUEUE_NUM, 16);
        assert_eq!(
            read32(&mmio, VIRTIO_MMIO_QUEUE_NUM),
            256,
            "before S_FEATURES_OK"
        );
        negotiate(&mmio, ALL_FEATURES);
        write32(&mmio, VIRTIO_MMIO_QUEUE_SEL, 0);
        write32(&mmio, VIRTIO_MMIO_QUEUE_NUM, 16);
        assert_eq!(read32(&mmio, VIRTIO_MMIO_QUEUE_NUM), 16);
        write32(&mmio, VIRTIO_MMIO_QUEUE_READY, 1);
        write32(&mmio, VIRTIO_MMIO_QUEUE_NUM, 8);
        assert_eq!(read32(&mmio, VIRTIO_MMIO_QUEUE_NUM), 16, "queue is ready");
        write32(&mmio, VIRTIO_MMIO_QUEUE_READY, 2);
        assert_eq!(
            read32(&mmio, VIRTIO_MMIO_QUEUE_READY),
            1,
            "only 0 and 1 are values"
        );
        write32(&mmio, VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(read32(&mmio, VIRTIO_MMIO_QUEUE_READY), 0);
        set_driver_ok(&mmio);
        write32(&mmio, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(
            read32(&mmio, VIRTIO_MMIO_QUEUE_READY),
            0,
            "after S_DRIVER_OK"
        );
        write32(&mmio, VIRTIO_MMIO_QUEUE_SEL, 5);
        write32(&mmio, VIRTIO_MMIO_QUEUE_NUM, 8);
        assert_eq!(read32(&mmio, VIRTIO_MMIO_QUEUE_NUM), 0);
    }

    #[test]
    fn reset_clears_status_queues_and_interrupts() {
        let (dev, mmio, irq) = transport();
        let mem = guest_memory();
        let mut q = activate(&mmio, &mem);
        q.push(&[(0x8000, 16, false)]);
        mmio.process_queue(0, &mem).unwrap();
        assert_eq!(mmio.interrupt_status(), 1);
        assert_eq!(irq.count(), 1);

        write32(&mmio, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(mmio.status(), 0);
        assert_eq!(mmio.acked_features(), 0);
        assert_eq!(read32(&mmio, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        write32(&mmio, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(read32(&mmio, VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(
            read32(&mmio, VIRTIO_MMIO_QUEUE_NUM),
            256,
            "size back to maximum"
        );
        assert_eq!(
            *dev.resets.lock().unwrap(),
            2,
            "the handshake reset, then this one"
        );
        assert!(dev.activated.lock().unwrap().is_none());
    }

    #[test]
    fn completed_chains_raise_a_used_buffer_interrupt_until_acknowledged() {
        let (dev, mmio, irq) = transport();
        let mem = guest_memory();
        let mut q = activate(&mmio, &mem);
        let h1 = q.push(&[(0x8000, 16, false)]);
        let h2 = q.push(&[(0x8100, 16, true)]);
        let outcome = mmio.process_queue(0, &mem).unwrap();
        assert_eq!(
            outcome,
            QueueOutcome {
                completed: 2,
                needs_reset: false
            }
        );
        assert_eq!(q.used_idx(), 2);
        assert_eq!(q.used(0).0, u32::from(h1));
        assert_eq!(q.used(1).0, u32::from(h2));
        assert_eq!(irq.count(), 1, "one interrupt per call");
        assert_eq!(
            read32(&mmio, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING
        );
        write32(&mmio, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(read32(&mmio, VIRTIO_MMIO_INTERRUPT_STATUS), 0);

        let outcome = mmio.process_queue(0, &mem).unwrap();
        assert_eq!(outcome.completed, 0);
        assert_eq!(irq.count(), 1, "nothing completed, no interrupt");
        assert_eq!(*dev.processed.lock().unwrap(), vec![0, 0]);
    }

    #[test]
    fn nothing_is_processed_before_driver_ok_or_on_a_queue_that_is_not_ready() {
        let (dev, mmio, irq) = transport();
        let mem = guest_memory();
        negotiate(&mmio, ALL_FEATURES);
        let mut q = new_queue(&mem);
        q.setup(&mmio, 0);
        q.push(&[(0x8000, 16, false)]);
        assert_eq!(
            mmio.process_queue(0, &mem).unwrap(),
            QueueOutcome::default()
        );
        set_driver_ok(&mmio);
        assert_eq!(
            mmio.process_queue(1, &mem).unwrap(),
            QueueOutcome::default()
        );
        assert!(dev.processed.lock().unwrap().is_empty());
        assert_eq!(irq.count(), 0);
        assert!(matches!(
            mmio.process_queue(2, &mem),
            Err(MmioError::NoSuchQueue { index: 2 })
        ));
        assert_eq!(mmio.process_queue(0, &mem).unwrap().completed, 1);
    }

    #[test]
    fn queue_notify_signals_the_queue_eventfd() {
        let (_, mmio, _) = transport();
        write32(&mmio, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        write32(&mmio, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_eq!(mmio.queue_notify_event(1).unwrap().read().unwrap(), 2);
        assert!(
            mmio.queue_notify_event(0).unwrap().read().is_err(),
            "queue 0 untouched"
        );
        write32(&mmio, VIRTIO_MMIO_QUEUE_NOTIFY, 9);
        assert_eq!(mmio.stats().notifies, 3);
        assert_eq!(mmio.stats().ignored, 1, "queue 9 does not exist");
        assert!(mmio.queue_notify_event(2).is_none());
        assert_eq!(QUEUE_NOTIFY_OFFSET, 0x50);
    }

    #[test]
    fn leftover_work_re_signals_the_eventfd() {
        let (dev, mmio, _) = transport();
        let mem = guest_memory();
        let mut q = activate(&mmio, &mem);
        *dev.behaviour.lock().unwrap() = Behaviour::LeaveMore;
        q.push(&[(0x8000, 16, false)]);
        mmio.process_queue(0, &mem).unwrap();
        assert_eq!(mmio.queue_notify_event(0).unwrap().read().unwrap(), 1);
    }

    #[test]
    fn device_error_sets_needs_reset_and_raises_a_config_interrupt() {
        let (dev, mmio, irq) = transport();
        let mem = guest_memory();
        let mut q = activate(&mmio, &mem);
        *dev.behaviour.lock().unwrap() = Behaviour::Fail;
        q.push(&[(0x8000, 16, false)]);
        let outcome = mmio.process_queue(0, &mem).unwrap();
        assert!(outcome.needs_reset);
        assert_eq!(u32::from(mmio.status()) & 0x40, 0x40);
        assert_eq!(read32(&mmio, VIRTIO_MMIO_STATUS) & 0x40, 0x40);
        assert_eq!(
            read32(&mmio, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_CONFIG
        );
        assert_eq!(irq.count(), 1);
        assert_eq!(mmio.stats().broken, 1);

        // Broken: nothing is processed until a reset.
        *dev.behaviour.lock().unwrap() = Behaviour::CompleteAll;
        assert_eq!(mmio.stats().refused_while_broken, 0);
        assert!(mmio.process_queue(0, &mem).unwrap().needs_reset);
        assert_eq!(dev.processed.lock().unwrap().len(), 1);
        assert_eq!(mmio.stats().refused_while_broken, 1);
        assert_eq!(
            mmio.stats().broken,
            1,
            "a refused call is no new transition"
        );
        // Writing back the status with NEEDS_RESET does not change anything.
        let status = read32(&mmio, VIRTIO_MMIO_STATUS);
        write32(&mmio, VIRTIO_MMIO_STATUS, status);
        assert_eq!(read32(&mmio, VIRTIO_MMIO_STATUS), status);

        let _q = activate(&mmio, &mem);
        assert_eq!(
            read32(&mmio, VIRTIO_MMIO_STATUS) & 0x40,
            0,
            "reset repaired it"
        );
    }

    #[test]
    fn invalid_queue_configuration_breaks_the_device_when_processed() {
        let (dev, mmio, _) = transport();
        let mem = guest_memory();
        negotiate(&mmio, ALL_FEATURES);
        let q = new_queue(&mem);
        q.setup(&mmio, 0);
        write32(&mmio, VIRTIO_MMIO_QUEUE_SEL, 1);
        write32(&mmio, VIRTIO_MMIO_QUEUE_NUM, 3);
        write32(&mmio, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1001);
        write32(&mmio, VIRTIO_MMIO_QUEUE_READY, 1);
        set_driver_ok(&mmio);
        assert!(mmio.process_queue(1, &mem).unwrap().needs_reset);
        assert!(
            dev.processed.lock().unwrap().is_empty(),
            "the device never saw it"
        );
    }

    #[test]
    fn rings_outside_guest_memory_break_the_device() {
        let (dev, mmio, _) = transport();
        let mem = guest_memory();
        negotiate(&mmio, ALL_FEATURES);
        set_up_queue_0_with_a_ring_outside(&mmio, VIRTIO_MMIO_QUEUE_USED_HIGH);
        set_driver_ok(&mmio);
        assert!(mmio.process_queue(0, &mem).unwrap().needs_reset);
        assert!(dev.processed.lock().unwrap().is_empty());
    }

    /// A driver that breaks the device, resets it and breaks it again without end gets
    /// one warning in all (the rest is at debug level): nothing the transport or the
    /// queue library logs on its behalf is a line per round.
    #[test]
    fn breaking_the_device_again_and_again_warns_once() {
        let (dev, mmio, _) = transport();
        let mem = guest_memory();
        let outside = [
            (VIRTIO_MMIO_QUEUE_DESC_HIGH, "descriptor table"),
            (VIRTIO_MMIO_QUEUE_AVAIL_HIGH, "available ring"),
            (VIRTIO_MMIO_QUEUE_USED_HIGH, "used ring"),
        ];
        let rounds = 20;
        let ((), logs) = capture_logs(|| {
            for round in 0..rounds {
                write32(&mmio, VIRTIO_MMIO_STATUS, 0);
                negotiate(&mmio, ALL_FEATURES);
                set_up_queue_0_with_a_ring_outside(&mmio, outside[round % 3].0);
                set_driver_ok(&mmio);
                for _ in 0..5 {
                    assert!(mmio.process_queue(0, &mem).unwrap().needs_reset);
                }
            }
        });
        assert!(dev.processed.lock().unwrap().is_empty());
        let stats = mmio.stats();
        assert_eq!(stats.broken, rounds as u64);
        assert_eq!(stats.refused_while_broken, 4 * rounds as u64);
        assert_eq!(warnings(&logs), 1, "{logs:#?}");
        for (_, ring) in outside {
            assert!(
                logs.iter()
                    .any(|(_, m)| m.contains(&format!("queue {ring} is outside guest memory"))),
                "{ring}: {logs:#?}"
            );
        }
    }

    #[test]
    fn wrong_width_register_accesses_are_ignored_and_counted() {
        let (_, mmio, _) = transport();
        for len in [1usize, 2, 3, 8] {
            let mut data = vec![0xaa; len];
            mmio.read(0, 0, &mut data);
            assert!(
                data.iter().all(|&b| b == 0),
                "{len}-byte read of MagicValue"
            );
        }
        let mut data = [0xaa; 4];
        mmio.read(0, 2, &mut data);
        assert_eq!(data, [0; 4], "unaligned read");
        mmio.write(0, VIRTIO_MMIO_STATUS.into(), &[1]);
        mmio.write(0, VIRTIO_MMIO_STATUS.into(), &[1, 0, 0, 0, 0, 0, 0, 0]);
        mmio.write(0, u64::from(VIRTIO_MMIO_STATUS) + 1, &[1, 0, 0, 0]);
        assert_eq!(mmio.status(), 0);
        assert_eq!(mmio.stats().bad_width, 8);
        // Write-only and undefined registers read 0; read-only ones ignore writes.
        assert_eq!(read32(&mmio, VIRTIO_MMIO_QUEUE_NOTIFY), 0);
        assert_eq!(read32(&mmio, 0x28), 0);
        write32(&mmio, VIRTIO_MMIO_MAGIC_VALUE, 0);
        assert_eq!(read32(&mmio, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(mmio.stats().ignored, 3);
    }

    #[test]
    fn config_space_goes_to_the_device_at_any_width() {
        let (dev, mmio, _) = transport();
        let mut data = [0u8; 3];
        mmio.read(0, 0x101, &mut data);
        assert_eq!(data, [2, 3, 4]);
        let mut wide = [0xaa; 8];
        mmio.read(0, 0x104, &mut wide);
        assert_eq!(wide, [5, 6, 7, 8, 0, 0, 0, 0]);
        mmio.read(0, u64::MAX, &mut wide);
        assert_eq!(wide, [0; 8]);
        mmio.write(0, 0x102, &[9, 9]);
        assert_eq!(*dev.config_writes.lock().unwrap(), vec![(2, vec![9, 9])]);
        assert_eq!(mmio.stats().bad_width, 0);
    }

    proptest! {
        /// Random register traffic, interleaved with queue processing, never panics and
        /// never activates the device without a valid negotiation.
        #[test]
        fn random_register_accesses_never_panic(
            ops in prop::collection::vec(
                (0u8..4,
                 prop_oneof![(0u64..0x40).prop_map(|r| r * 4), 0u64..0x200, any::<u64>()],
                 prop_oneof![Just(4usize), 0usize..=9],
                 prop_oneof![0u32..16, any::<u32>()]),
                0..200,
            ),
        ) {
            let (dev, mmio, _) = transport();
            let mem = guest_memory();
            let _q = new_queue(&mem);
            for (op, offset, len, value) in ops {
                match op {
                    0 => {
                        let mut data = vec![0u8; len];
                        mmio.read(0, offset, &mut data);
                    }
                    1 | 2 => {
                        let bytes = value.to_le_bytes();
                        let data: Vec<u8> = bytes.iter().copied().cycle().take(len).collect();
                        mmio.write(0, offset, &data);
                    }
                    _ => {
                        let _ = mmio.process_queue((value % 3) as usize, &mem);
                    }
                }
                let status = mmio.status();
                if let Some(acked) = *dev.activated.lock().unwrap() {
                    prop_assert_ne!(u32::from(status) & S_DRIVER_OK, 0);
                    prop_assert_eq!(acked & TRANSPORT_FEATURES, TRANSPORT_FEATURES);
                    prop_assert_eq!(acked & !ALL_FEATURES, 0);
                }
                prop_assert!(mmio.interrupt_status() <= 3);
            }
        }
    }
}
