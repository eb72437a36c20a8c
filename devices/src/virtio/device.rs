//! What a virtio device model offers its transport.
//!
//! The transport ([`VirtioMmio`](super::VirtioMmio)) owns the register file, the feature
//! negotiation, the device status and the virtqueues; a [`VirtioDevice`] owns everything
//! device-specific: its ID and feature bits, its configuration space, and what a request
//! on one of its queues means. Queue processing is a plain method call made by the
//! transport on the thread that asked for it (the VMM's control thread); devices have no
//! threads of their own.

use std::sync::Arc;

use thiserror::Error;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::chain::ChainError;
use super::interrupt::VirtioInterrupt;

/// Why a device could not be activated or stopped processing a queue.
///
/// Every variant means the device is unusable until the driver resets it: the transport
/// sets `DEVICE_NEEDS_RESET` and announces a configuration change.
#[derive(Debug, Error)]
pub enum VirtioDeviceError {
    /// The driver put a malformed descriptor chain on a queue.
    #[error("malformed descriptor chain")]
    Chain(#[source] ChainError),
    /// The queue's rings could not be read or written.
    #[error("cannot access the virtqueue")]
    Queue(#[source] virtio_queue::Error),
    /// The transport asked for a queue the device does not have.
    #[error("the device has no queue {index}")]
    NoSuchQueue {
        /// The queue index asked for.
        index: usize,
    },
    /// Device-specific activation failure.
    #[error("cannot activate the device")]
    Activate(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// What one call of [`VirtioDevice::process_queue`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueProgress {
    /// Descriptor chains completed, that is, added to the used ring.
    pub completed: usize,
    /// The device stopped early (it bounds the work done per call) and the driver had
    /// made more chains available; the transport schedules another call.
    pub more_pending: bool,
}

/// A virtio device model driven by a transport.
///
/// All methods take `&self` and may be called from several threads: register accesses
/// arrive on vCPU threads, queue processing and VMM requests on the control thread. Each
/// device keeps its own lock for its own state. The transport calls into the device
/// while holding its own lock, so a device never calls back into its transport. No
/// method may panic, whatever the guest wrote.
pub trait VirtioDevice: Send + Sync {
    /// The virtio device ID (virtio 1.2 §5), for example 24 for a memory device.
    fn device_type(&self) -> u32;

    /// The device-specific feature bits offered to the driver. The transport adds the
    /// transport features it supports (`VIRTIO_F_VERSION_1`). Must not change.
    fn features(&self) -> u64;

    /// Whether the device can work with the features the driver accepted. Called when
    /// the driver sets `FEATURES_OK`, after the transport checked that `acked` is a subset
    /// of the offered features and contains `VIRTIO_F_VERSION_1`; returning `false`
    /// leaves `FEATURES_OK` clear. The default accepts every such subset.
    fn accepts_features(&self, acked: u64) -> bool {
        let _ = acked;
        true
    }

    /// The maximum size of each queue, in queue-index order; its length is the number
    /// of queues. Each size is a power of two no larger than 32768. Must not change.
    fn queue_max_sizes(&self) -> &[u16];

    /// Fills `data` with the configuration space bytes at `offset`. Bytes beyond the
    /// configuration space read as 0. Any `offset` and length are allowed.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Takes a driver write to the configuration space at `offset`. Any `offset` and
    /// length are allowed; read-only fields ignore the write.
    fn write_config(&self, offset: u64, data: &[u8]);

    /// The configuration generation: changes whenever the configuration space changes,
    /// so a driver reading a multi-word field can detect a torn read.
    fn config_generation(&self) -> u32;

    /// The driver set `DRIVER_OK` with `acked_features` negotiated. From now until
    /// [`reset`](VirtioDevice::reset), the device raises configuration-change interrupts
    /// through `interrupt` (used-buffer interrupts are the transport's business).
    fn activate(
        &self,
        acked_features: u64,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Result<(), VirtioDeviceError>;

    /// Processes the chains the driver made available on queue `index`.
    ///
    /// Called by the transport only while the device is active, the queue is ready and
    /// its rings lie in `mem`, with `mem` the guest memory map current for the caller
    /// (the VMM holds an RCU read section around the call). The device accesses guest
    /// memory only through `mem`, completes chains with `queue.add_used`, and leaves the
    /// used-buffer interrupt to the transport. An error means the device is broken:
    /// chains already completed stay completed, the failing chain is dropped, and the
    /// transport marks the device as needing a reset.
    fn process_queue(
        &self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueProgress, VirtioDeviceError>;

    /// The driver reset the device (wrote 0 to the status register): drop the interrupt
    /// handle and the negotiated features. What a reset does to device-specific state is
    /// the device's definition (a memory device keeps its plugged blocks).
    fn reset(&self);
}
