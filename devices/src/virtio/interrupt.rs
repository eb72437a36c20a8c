//! The interrupt status a virtio transport shows the driver, and the line that announces
//! it.
//!
//! A [`VirtioInterrupt`] holds the two event bits of the virtio-mmio `InterruptStatus`
//! register (used buffer, configuration change) and the [`Interrupt`] line the VMM wired
//! to the device. The transport owns it and hands a clone of the `Arc` to the device when
//! the driver activates it, so the device can announce configuration changes (for example
//! a new requested size) from any thread without taking the transport's lock.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

use crate::interrupt::{Interrupt, InterruptError};

/// Which event an interrupt announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VirtioInterruptKind {
    /// The device put buffers in a used ring (`InterruptStatus` bit 0).
    UsedBuffer,
    /// The device configuration changed, or the device needs a reset
    /// (`InterruptStatus` bit 1).
    ConfigChange,
}

impl VirtioInterruptKind {
    /// The `InterruptStatus` bit of this event.
    pub const fn status_bit(self) -> u32 {
        match self {
            VirtioInterruptKind::UsedBuffer => VIRTIO_MMIO_INT_VRING,
            VirtioInterruptKind::ConfigChange => VIRTIO_MMIO_INT_CONFIG,
        }
    }
}

/// Interrupt status bits plus the line that announces them.
///
/// Lock-free: every method is a few atomic operations and at most one
/// [`Interrupt::trigger`]. Any thread may call any method at any time.
pub struct VirtioInterrupt {
    status: AtomicU32,
    line: Arc<dyn Interrupt>,
}

impl VirtioInterrupt {
    /// Creates an interrupt with no pending event that raises `line`.
    pub fn new(line: Arc<dyn Interrupt>) -> VirtioInterrupt {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            line,
        }
    }

    /// Records `kind` in the status and then raises the line once (edge style).
    ///
    /// The bit is visible to a status read that follows the trigger. The line is raised
    /// even if the bit was already set, so an event is never lost to a driver that read
    /// the status just before. If raising the line fails, the bit stays set (the driver
    /// sees it on its next interrupt) and the error is returned.
    pub fn signal(&self, kind: VirtioInterruptKind) -> Result<(), InterruptError> {
        self.status.fetch_or(kind.status_bit(), Ordering::SeqCst);
        self.line.trigger()
    }

    /// The pending event bits, as the driver reads them from `InterruptStatus`.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears the bits set in `bits` (an `InterruptACK` write); other bits stay.
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears every pending bit (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

impl fmt::Debug for VirtioInterrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtioInterrupt")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    use super::*;

    #[test]
    fn signal_sets_the_bit_and_raises_the_line_each_time() {
        let evt = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let irq = VirtioInterrupt::new(evt.clone());
        irq.signal(VirtioInterruptKind::UsedBuffer).unwrap();
        irq.signal(VirtioInterruptKind::UsedBuffer).unwrap();
        assert_eq!(irq.status(), 1);
        assert_eq!(evt.read().unwrap(), 2, "raised once per signal");
        irq.signal(VirtioInterruptKind::ConfigChange).unwrap();
        assert_eq!(irq.status(), 3);
    }

    #[test]
    fn acknowledge_clears_only_the_written_bits() {
        let evt = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let irq = VirtioInterrupt::new(evt);
        irq.signal(VirtioInterruptKind::UsedBuffer).unwrap();
        irq.signal(VirtioInterruptKind::ConfigChange).unwrap();
        irq.acknowledge(VIRTIO_MMIO_INT_VRING | 0xf0);
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_CONFIG);
        irq.clear();
        assert_eq!(irq.status(), 0);
    }

    #[test]
    fn failing_line_keeps_the_bit() {
        struct Broken;
        impl Interrupt for Broken {
            fn trigger(&self) -> Result<(), InterruptError> {
                Err(InterruptError::EventFd(std::io::Error::from_raw_os_error(
                    libc::EBADF,
                )))
            }
        }
        let irq = VirtioInterrupt::new(Arc::new(Broken));
        assert!(irq.signal(VirtioInterruptKind::ConfigChange).is_err());
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_CONFIG);
    }
}
