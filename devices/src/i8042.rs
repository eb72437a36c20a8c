//! The i8042 keyboard controller, reduced to what a VMM needs: the CPU reset command.
//!
//! Writing `0xfe` to the command port (0x64) pulses the CPU reset line; Linux does this
//! for `reboot=k`, the one reset that works on every host (docs/hosts.md). The device is
//! `vm_superio::I8042Device`; the reset goes to an [`ExitSink`] as
//! [`ExitRequest::Reset`].

use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};

use vm_superio::I8042Device;

use crate::bus::{BusDevice, BusRange};
use crate::exit::{ExitRequest, ExitSink};

/// The i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// The i8042 command (write) and status (read) port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The command that pulses the CPU reset line.
pub const I8042_CMD_RESET_CPU: u8 = 0xfe;

/// Turns the controller's reset pulse into an exit request.
struct ResetLine(Arc<ExitSink>);

impl vm_superio::Trigger for ResetLine {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        self.0.request(ExitRequest::Reset);
        Ok(())
    }
}

/// An i8042 controller that only implements the CPU reset command.
///
/// Register it at the two one-port ranges of [`I8042::bus_ranges`] (ports 0x60 and 0x64,
/// leaving 0x61 to the PC speaker). It tells the ports apart by absolute port number
/// (`base + offset`). Reads of the data and status ports return 0 (no data, controller
/// ready), so Linux's `kb_wait` before the reset command never spins; any other port
/// reads 0xff. Writes other than `0xfe` to the command port are ignored. A multi-byte
/// access is handled one byte per consecutive port.
pub struct I8042 {
    device: Mutex<I8042Device<ResetLine>>,
}

impl I8042 {
    /// Creates the controller; a reset command calls `exit.request(ExitRequest::Reset)`.
    pub fn new(exit: Arc<ExitSink>) -> I8042 {
        I8042 {
            device: Mutex::new(I8042Device::new(ResetLine(exit))),
        }
    }

    /// The port-I/O ranges to register the controller at: port 0x60 and port 0x64.
    pub const fn bus_ranges() -> [BusRange; 2] {
        [
            BusRange::port(I8042_DATA_PORT),
            BusRange::port(I8042_COMMAND_PORT),
        ]
    }
}

/// The `vm-superio` register offset for byte `i` of an access, if it hits one of the ports.
fn superio_offset(base: u64, offset: u64, i: usize) -> Option<u8> {
    let port = base
        .checked_add(offset)?
        .checked_add(u64::try_from(i).ok()?)?;
    match port {
        p if p == u64::from(I8042_DATA_PORT) => Some(0),
        p if p == u64::from(I8042_COMMAND_PORT) => Some(4),
        _ => None,
    }
}

impl BusDevice for I8042 {
    fn read(&self, base: u64, offset: u64, data: &mut [u8]) {
        let mut device = self.device.lock().unwrap_or_else(PoisonError::into_inner);
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = superio_offset(base, offset, i).map_or(0xff, |o| device.read(o));
        }
    }

    fn write(&self, base: u64, offset: u64, data: &[u8]) {
        let mut device = self.device.lock().unwrap_or_else(PoisonError::into_inner);
        for (i, &value) in data.iter().enumerate() {
            match superio_offset(base, offset, i) {
                Some(o) => match device.write(o, value) {
                    Ok(()) => {}
                    Err(never) => match never {},
                },
                None => log::debug!("i8042: ignored write {value:#x} outside ports 0x60/0x64"),
            }
        }
    }
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042").finish_non_exhaustive()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::bus::Bus;

    fn setup() -> (Arc<ExitSink>, Bus) {
        let exit = Arc::new(ExitSink::new().unwrap());
        let dev: Arc<dyn BusDevice> = Arc::new(I8042::new(exit.clone()));
        let mut b = Bus::builder();
        for r in I8042::bus_ranges() {
            b.add(r, dev.clone()).unwrap();
        }
        (exit, b.build())
    }

    #[test]
    fn reset_command_requests_reset() {
        let (exit, bus) = setup();
        let mut status = [0xaa];
        assert!(bus.dispatch_read(0x64, &mut status));
        assert_eq!(status[0] & 0x02, 0, "input buffer empty: kb_wait proceeds");
        assert!(bus.dispatch_write(0x64, &[I8042_CMD_RESET_CPU]));
        assert_eq!(exit.first(), Some(ExitRequest::Reset));
        assert_eq!(exit.event_fd().read().unwrap(), 1);
    }

    #[test]
    fn other_writes_do_not_reset() {
        let (exit, bus) = setup();
        assert!(bus.dispatch_write(0x64, &[0xfd]));
        assert!(bus.dispatch_write(0x64, &[0x00]));
        assert!(
            bus.dispatch_write(0x60, &[0xfe]),
            "0xfe on the data port is a keyboard byte"
        );
        assert!(!bus.dispatch_write(0x61, &[0xfe]), "port 0x61 is not ours");
        assert!(
            !bus.dispatch_write(0x64, &[0xfe, 0x00]),
            "a straddling access is rejected"
        );
        assert_eq!(exit.first(), None);
        assert_eq!(exit.count(ExitRequest::Reset), 0);
    }

    #[test]
    fn direct_wide_access_goes_byte_by_byte() {
        let exit = Arc::new(ExitSink::new().unwrap());
        let dev = I8042::new(exit.clone());
        let mut data = [0u8; 6];
        dev.read(0x60, 0, &mut data);
        assert_eq!(data, [0, 0xff, 0xff, 0xff, 0, 0xff]);
        dev.write(0x60, 0, &[0, 0, 0, 0, 0xfe]);
        assert_eq!(exit.first(), Some(ExitRequest::Reset));
        dev.write(u64::MAX, 1, &[0xfe]); // overflowing port: ignored, no panic
        assert_eq!(exit.count(ExitRequest::Reset), 1);
    }

    proptest! {
        #[test]
        fn random_accesses_never_panic(
            ops in prop::collection::vec(
                (any::<bool>(), prop_oneof![Just(0x60u64), Just(0x64u64), any::<u64>()],
                 prop_oneof![0u64..8, any::<u64>()], prop::collection::vec(any::<u8>(), 0..=16)),
                0..64,
            ),
        ) {
            let exit = Arc::new(ExitSink::new().unwrap());
            let dev = I8042::new(exit.clone());
            let mut expect_reset = false;
            for (is_write, base, offset, mut data) in ops {
                if is_write {
                    for (i, &v) in data.iter().enumerate() {
                        let port = base.checked_add(offset).and_then(|p| p.checked_add(i as u64));
                        expect_reset |= port == Some(0x64) && v == 0xfe;
                    }
                    dev.write(base, offset, &data);
                } else {
                    dev.read(base, offset, &mut data);
                }
            }
            prop_assert_eq!(exit.first().is_some(), expect_reset);
        }
    }
}
