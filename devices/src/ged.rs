//! An ACPI Generic Event Device (GED, `ACPI0013`) that delivers the power button.
//!
//! The device is one MMIO page. Its first byte is the event register that the DSDT's
//! `_EVT` method reads: bit 0 is the power button. [`Ged::power_button`] sets the bit and
//! raises the GED interrupt; the guest's read returns the pending events and clears them,
//! and `_EVT` then notifies the power button device (`PNP0C0C`), which makes Linux shut
//! down.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use thiserror::Error;

use crate::bus::BusDevice;
use crate::interrupt::{Interrupt, InterruptError};

/// Size of the GED's MMIO window: one page.
pub const GED_MMIO_SIZE: u64 = 0x1000;
/// Offset of the 8-bit event register in the window.
pub const GED_EVENT_REGISTER_OFFSET: u64 = 0;
/// Event bit: the power button was pressed.
pub const GED_EVENT_POWER_BUTTON: u8 = 1 << 0;

/// Errors of the GED.
#[derive(Debug, Error)]
pub enum GedError {
    /// The event is pending but the GED interrupt could not be raised.
    #[error("cannot raise the GED interrupt")]
    Interrupt(#[source] InterruptError),
}

/// The Generic Event Device.
///
/// Guest reads of the byte at [`GED_EVENT_REGISTER_OFFSET`] (as the first byte of an
/// access of any width) return the pending events and clear them atomically, so each
/// event is delivered to exactly one read. Every other byte of the page reads as 0, and
/// writes anywhere are ignored (logged at debug level). Lock-free: the pending events are
/// one atomic byte.
pub struct Ged {
    events: AtomicU8,
    interrupt: Arc<dyn Interrupt>,
}

impl Ged {
    /// Creates a GED with no pending event that raises `interrupt` on events.
    pub fn new(interrupt: Arc<dyn Interrupt>) -> Ged {
        Ged {
            events: AtomicU8::new(0),
            interrupt,
        }
    }

    /// Presses the power button: sets [`GED_EVENT_POWER_BUTTON`] and raises the
    /// interrupt once. Any thread may call it (the control thread does, for QMP
    /// `system_powerdown`); it never blocks. If raising the interrupt fails the event
    /// stays pending and the error is returned.
    pub fn power_button(&self) -> Result<(), GedError> {
        self.events
            .fetch_or(GED_EVENT_POWER_BUTTON, Ordering::AcqRel);
        self.interrupt.trigger().map_err(GedError::Interrupt)
    }

    /// The events not yet read by the guest (does not clear them).
    pub fn pending(&self) -> u8 {
        self.events.load(Ordering::Acquire)
    }

    /// Back to the power-on state: no pending event (a power button pressed before a
    /// machine reset is not seen by the rebooted guest, as on QEMU).
    pub fn reset(&self) {
        self.events.store(0, Ordering::Release);
    }
}

impl BusDevice for Ged {
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == GED_EVENT_REGISTER_OFFSET
            && let Some(first) = data.first_mut()
        {
            *first = self.events.swap(0, Ordering::AcqRel);
        }
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        log::debug!(
            "ged: ignored write of {} bytes at offset {offset:#x}",
            data.len()
        );
    }
}

impl fmt::Debug for Ged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ged")
            .field("pending", &self.pending())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io;

    use proptest::prelude::*;
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    use super::*;
    use crate::bus::{Bus, BusRange};

    const GED_BASE: u64 = 0xfed0_0000;

    fn setup() -> (Arc<Ged>, Arc<EventFd>, Bus) {
        let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let ged = Arc::new(Ged::new(irq.clone()));
        let bus = Bus::default()
            .with_device(BusRange::new(GED_BASE, GED_MMIO_SIZE).unwrap(), ged.clone())
            .unwrap();
        (ged, irq, bus)
    }

    #[test]
    fn power_button_sets_the_bit_and_a_read_clears_it() {
        let (ged, irq, bus) = setup();
        let mut ev = [0xaa];
        assert!(bus.dispatch_read(GED_BASE, &mut ev));
        assert_eq!(ev, [0], "nothing pending initially");

        ged.power_button().unwrap();
        assert_eq!(irq.read().unwrap(), 1, "the interrupt was raised once");
        assert_eq!(ged.pending(), GED_EVENT_POWER_BUTTON);

        assert!(bus.dispatch_read(GED_BASE, &mut ev));
        assert_eq!(ev, [GED_EVENT_POWER_BUTTON]);
        assert!(bus.dispatch_read(GED_BASE, &mut ev));
        assert_eq!(ev, [0], "the read cleared the event");
        assert_eq!(ged.pending(), 0);
    }

    #[test]
    fn wide_read_returns_events_in_the_low_byte() {
        let (ged, _irq, bus) = setup();
        ged.power_button().unwrap();
        let mut dword = [0xaa; 4];
        assert!(bus.dispatch_read(GED_BASE, &mut dword));
        assert_eq!(u32::from_le_bytes(dword), 1);
    }

    #[test]
    fn other_offsets_and_writes_do_not_touch_events() {
        let (ged, _irq, bus) = setup();
        ged.power_button().unwrap();
        let mut data = [0xaa; 8];
        assert!(bus.dispatch_read(GED_BASE + 1, &mut data));
        assert_eq!(data, [0; 8]);
        assert!(bus.dispatch_read(GED_BASE + GED_MMIO_SIZE - 8, &mut data));
        assert_eq!(data, [0; 8]);
        assert!(bus.dispatch_write(GED_BASE, &[0]));
        assert_eq!(ged.pending(), GED_EVENT_POWER_BUTTON);
        assert!(
            bus.dispatch_read(GED_BASE, &mut []),
            "an empty read is harmless"
        );
        assert_eq!(ged.pending(), GED_EVENT_POWER_BUTTON);
    }

    #[test]
    fn failed_interrupt_keeps_the_event_pending() {
        struct Broken;
        impl Interrupt for Broken {
            fn trigger(&self) -> Result<(), InterruptError> {
                Err(InterruptError::EventFd(io::Error::from_raw_os_error(
                    libc::EBADF,
                )))
            }
        }
        let ged = Ged::new(Arc::new(Broken));
        assert!(matches!(ged.power_button(), Err(GedError::Interrupt(_))));
        assert_eq!(ged.pending(), GED_EVENT_POWER_BUTTON);
    }

    proptest! {
        #[test]
        fn random_accesses_never_panic(
            ops in prop::collection::vec(
                (0u8..3, prop_oneof![0u64..16, 0u64..GED_MMIO_SIZE, any::<u64>()],
                 prop::collection::vec(any::<u8>(), 0..=16)),
                0..64,
            ),
        ) {
            let irq = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
            let ged = Ged::new(irq);
            let mut pending = 0u8;
            for (op, offset, mut data) in ops {
                match op {
                    0 => {
                        ged.power_button().unwrap();
                        pending |= GED_EVENT_POWER_BUTTON;
                    }
                    1 => ged.write(GED_BASE, offset, &data),
                    _ => {
                        ged.read(GED_BASE, offset, &mut data);
                        if offset == 0 && !data.is_empty() {
                            prop_assert_eq!(data[0], pending);
                            pending = 0;
                            prop_assert!(data[1..].iter().all(|&b| b == 0));
                        } else {
                            prop_assert!(data.iter().all(|&b| b == 0));
                        }
                    }
                }
                prop_assert_eq!(ged.pending(), pending);
            }
        }
    }
}
