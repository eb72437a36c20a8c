//! Interrupt lines that devices raise without knowing how the VMM delivers them.
//!
//! The VMM hands each device an [`Interrupt`]; in production it is an [`EventFd`]
//! registered with KVM as an irqfd, so raising the line is one `write(2)` and the
//! in-kernel interrupt controller injects the interrupt. Devices trigger the line once per
//! event (edge style); they never wait for the guest to acknowledge it.

use std::io;

use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

/// Errors raising an interrupt line.
#[derive(Debug, Error)]
pub enum InterruptError {
    /// Writing to the line's eventfd failed.
    #[error("cannot signal the interrupt eventfd")]
    EventFd(#[source] io::Error),
}

/// An interrupt line a device can raise.
///
/// `trigger` may be called from any thread, including several at once. Implementations
/// must not block for long: devices call it on vCPU threads, sometimes while holding
/// their own state lock.
pub trait Interrupt: Send + Sync {
    /// Raises the line once (an edge). Returns an error if the event could not be
    /// delivered to whoever injects the interrupt.
    fn trigger(&self) -> Result<(), InterruptError>;
}

/// Raises the line by adding 1 to the eventfd counter (what a KVM irqfd listens for).
///
/// Never blocks on an eventfd created with `EFD_NONBLOCK`; a blocking eventfd blocks only
/// if its counter is about to overflow (2^64 - 2 undrained triggers).
impl Interrupt for EventFd {
    fn trigger(&self) -> Result<(), InterruptError> {
        self.write(1).map_err(InterruptError::EventFd)
    }
}

/// Adapts an [`Interrupt`] to the trigger trait of the `vm-superio` devices.
pub(crate) struct SuperioTrigger(pub(crate) std::sync::Arc<dyn Interrupt>);

impl vm_superio::Trigger for SuperioTrigger {
    type E = InterruptError;

    fn trigger(&self) -> Result<(), InterruptError> {
        self.0.trigger()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::sync::Arc;

    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;

    #[test]
    fn eventfd_trigger_adds_one_per_call() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        Interrupt::trigger(&evt).unwrap();
        Interrupt::trigger(&evt).unwrap();
        assert_eq!(evt.read().unwrap(), 2);
        assert_eq!(
            evt.read().unwrap_err().kind(),
            io::ErrorKind::WouldBlock,
            "nothing left after the read"
        );
    }

    #[test]
    fn superio_adapter_forwards() {
        let evt = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let adapter = SuperioTrigger(evt.clone());
        vm_superio::Trigger::trigger(&adapter).unwrap();
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn full_eventfd_reports_an_error_instead_of_blocking() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        // The counter's maximum is 2^64 - 2; one more write would block, so it fails.
        evt.write(u64::MAX - 1).unwrap();
        let err = Interrupt::trigger(&evt).unwrap_err();
        let InterruptError::EventFd(io) = err;
        assert_eq!(io.kind(), io::ErrorKind::WouldBlock);
        assert!(evt.as_raw_fd() >= 0);
    }
}
