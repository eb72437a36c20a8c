//! Virtio devices: the virtio-mmio transport and the virtio-mem device model.
//!
//! - [`mmio`]: [`VirtioMmio`], a [`BusDevice`](crate::BusDevice) for one 4 KiB
//!   virtio-mmio window (modern interface, `Version` 2). It owns registers, feature
//!   negotiation, device status and the virtqueues, and drives a [`VirtioDevice`].
//! - [`device`]: the [`VirtioDevice`] trait a device model implements.
//! - [`interrupt`]: [`VirtioInterrupt`], the `InterruptStatus` bits plus the line.
//! - [`mem`]: [`VirtioMem`], the memory device (ID 24), with its plugged-block bitmap
//!   (`mem_bitmap`), wire format ([`mem_request`]) and the [`MemoryBackend`] the VMM
//!   implements to map and unmap memory ([`mem_backend`]).
//! - [`chain`]: how a request's buffers are taken from a descriptor chain and checked.
//!
//! Threads: register accesses come from vCPU threads; queue processing is a plain call
//! ([`VirtioMmio::process_queue`]) the VMM's control thread makes when a queue's
//! notification eventfd fires, inside the RCU read section that keeps the guest memory
//! map it passes alive. No device has a thread of its own. Guest memory is touched only
//! through vm-memory's checked accessors on that map, and nothing a guest writes (to
//! registers or in descriptor chains) makes this code panic.
//!
//! A typical wiring:
//!
//! ```text
//! let vmem = Arc::new(VirtioMem::new(VirtioMemConfig::new(base, size), backend)?);
//! let mmio = Arc::new(VirtioMmio::new(vmem.clone(), irqfd)?);
//! bus.add(BusRange::new(mmio_base, VIRTIO_MMIO_WINDOW_SIZE)?, mmio.clone())?;
//! // KVM ioeventfd at mmio_base + QUEUE_NOTIFY_OFFSET, datamatch 0:
//! let notify = mmio.queue_notify_event(0).unwrap();
//! // control thread, when `notify` is readable:
//! notify.read()?;
//! let outcome = mmio.process_queue(0, &guest_memory)?;
//! if let Some(size) = vmem.take_size_change() { /* QMP MEMORY_DEVICE_SIZE_CHANGE */ }
//! ```

pub mod chain;
pub mod device;
pub mod interrupt;
pub mod mem;
pub mod mem_backend;
mod mem_bitmap;
pub mod mem_progress;
pub mod mem_request;
pub mod mmio;

#[cfg(test)]
pub(crate) mod fixtures;

pub use chain::ChainError;
pub use device::{QueueProgress, VirtioDevice, VirtioDeviceError};
pub use interrupt::{VirtioInterrupt, VirtioInterruptKind};
pub use mem::{
    ResizePoll, ResizeReport, ResizeStatus, ResponseCounts, VIRTIO_MEM_DEFAULT_BLOCK_SIZE,
    VIRTIO_MEM_F_ACPI_PXM, VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE, VirtioMem, VirtioMemConfig,
    VirtioMemError, VirtioMemInfo, VirtioMemStats,
};
pub use mem_backend::{MemoryBackend, MemoryBackendError};
pub use mem_progress::{DriverView, ResizeEvent, ResizeState, StallReason};
pub use mem_request::{BlockState, MemRequest, MemResponse};
pub use mmio::{
    MmioError, MmioStats, QUEUE_NOTIFY_OFFSET, QueueOutcome, VIRTIO_MMIO_WINDOW_SIZE, VirtioMmio,
};
