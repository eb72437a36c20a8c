//! Emulated devices of the VMM and the buses that dispatch guest accesses to them.
//!
//! - [`bus`]: immutable, sorted address-range tables ([`Bus`]) for port I/O and MMIO,
//!   and the [`BusDevice`] trait every device implements. The VMM publishes buses
//!   copy-on-write; to this crate a bus is just an immutable value.
//! - [`serial`]: COM1, a 16550A UART ([`Serial`]).
//! - [`i8042`]: the keyboard controller's CPU reset command ([`I8042`]).
//! - [`acpi_pm`]: ACPI hardware-reduced sleep and reset registers ([`AcpiPm`]).
//! - [`ged`]: the ACPI Generic Event Device with the power button ([`Ged`]).
//! - [`exit`]: how devices report power-off and reset requests ([`ExitSink`]).
//! - [`interrupt`]: the interrupt lines devices raise ([`Interrupt`]).
//! - [`virtio`]: the virtio-mmio transport ([`VirtioMmio`]) and the virtio-mem device
//!   ([`VirtioMem`]), whose memory work goes through a [`MemoryBackend`] the VMM provides.
//! - `test_utils` (feature `test-utils`): test doubles for the crate's users, a
//!   driver-side virtqueue and a contract-checking [`MemoryBackend`].
//!
//! This crate knows nothing of KVM, QMP or RCU. Devices are called on vCPU threads,
//! concurrently; each keeps its own fine-grained synchronisation and none takes a lock
//! shared with other devices. No guest-controlled address, offset, length or value makes
//! a device panic.
//!
//! What unimplemented locations read as:
//! - An access no device claims, or one that runs past the end of a device's range, is
//!   answered by the [`Bus`]: reads return all-ones (`0xff` bytes), as an undriven x86
//!   I/O or PCI bus does; writes are dropped. Both are counted.
//! - Port-I/O devices ([`Serial`], [`I8042`], [`AcpiPm`]) split a wide access into one
//!   byte per consecutive port, as the ISA bus does. Ports that exist but hold no state
//!   read as 0; bytes outside the device's ports read as `0xff`.
//! - MMIO devices ([`Ged`], [`VirtioMmio`]) read as 0 wherever no register is defined in
//!   their window, and ignore writes there.

pub mod acpi_pm;
pub mod bus;
pub mod exit;
pub mod ged;
pub mod i8042;
pub mod interrupt;
pub mod serial;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
pub mod virtio;

pub use acpi_pm::{AcpiPm, AcpiPmConfig};
pub use bus::{Bus, BusBuilder, BusDevice, BusError, BusRange, BusTarget, UnclaimedAccesses};
pub use exit::{ExitError, ExitRequest, ExitSink};
pub use ged::{Ged, GedError};
pub use i8042::I8042;
pub use interrupt::{Interrupt, InterruptError};
pub use serial::{Serial, SerialError, SerialStats};
pub use virtio::{
    MemoryBackend, MemoryBackendError, MmioError, QueueOutcome, VirtioDevice, VirtioMem,
    VirtioMemConfig, VirtioMemError, VirtioMemInfo, VirtioMmio,
};

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    use super::*;

    const GED_BASE: u64 = 0xfed0_0000;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn shared_types_are_send_and_sync() {
        assert_send_sync::<Bus>();
        assert_send_sync::<ExitSink>();
        assert_send_sync::<Serial>();
        assert_send_sync::<I8042>();
        assert_send_sync::<AcpiPm>();
        assert_send_sync::<Ged>();
        assert_send_sync::<VirtioMmio>();
        assert_send_sync::<VirtioMem>();
    }

    /// The machine's two buses with every device of this crate on them.
    fn machine() -> (Bus, Bus, Arc<ExitSink>) {
        let exit = Arc::new(ExitSink::new().unwrap());
        let irq: Arc<dyn Interrupt> = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let mut pio = Bus::builder();
        pio.add(
            serial::COM1_RANGE,
            Arc::new(Serial::new(irq.clone(), Box::new(std::io::sink()), None)),
        )
        .unwrap();
        let i8042: Arc<dyn BusDevice> = Arc::new(I8042::new(exit.clone()));
        for r in I8042::bus_ranges() {
            pio.add(r, i8042.clone()).unwrap();
        }
        let pm = Arc::new(AcpiPm::new(AcpiPmConfig::default(), exit.clone()));
        for r in pm.bus_ranges() {
            pio.add(r, pm.clone()).unwrap();
        }
        let mmio = Bus::default()
            .with_device(
                BusRange::new(GED_BASE, ged::GED_MMIO_SIZE).unwrap(),
                Arc::new(Ged::new(irq)),
            )
            .unwrap();
        (pio.build(), mmio, exit)
    }

    proptest! {
        /// Random port-I/O and MMIO accesses near and away from the devices never panic,
        /// and every access is either handled or counted as unclaimed.
        #[test]
        fn random_dispatch_never_panics(
            ops in prop::collection::vec(
                (any::<bool>(), any::<bool>(),
                 prop_oneof![0x3f0u64..0x410, 0x5f8u64..0x608, 0x58u64..0x68,
                             GED_BASE - 8..GED_BASE + 0x1008, any::<u64>()],
                 prop::collection::vec(any::<u8>(), 0..=16)),
                0..128,
            ),
        ) {
            let (pio, mmio, _exit) = machine();
            let mut misses = 0u64;
            for (is_mmio, is_write, addr, mut data) in ops {
                let bus = if is_mmio { &mmio } else { &pio };
                let handled = if is_write {
                    bus.dispatch_write(addr, &data)
                } else {
                    bus.dispatch_read(addr, &mut data)
                };
                prop_assert_eq!(handled, bus.lookup(addr, data.len()).is_ok());
                if !handled {
                    misses += 1;
                    if !is_write {
                        prop_assert!(data.iter().all(|&b| b == 0xff));
                    }
                }
            }
            let counted = [pio.unclaimed(), mmio.unclaimed()]
                .iter()
                .map(|u| u.reads + u.writes)
                .sum::<u64>();
            prop_assert_eq!(counted, misses);
        }
    }
}
