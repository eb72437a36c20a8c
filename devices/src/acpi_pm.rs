//! ACPI hardware-reduced power management: the sleep control, sleep status and reset
//! registers that the FADT points at.
//!
//! A write of SLP_EN with the S5 sleep type to the sleep control register powers the
//! machine off; the reset value written to the reset register resets it. Both become
//! [`ExitRequest`]s on an [`ExitSink`].

use std::sync::Arc;

use crate::bus::{BusDevice, BusRange};
use crate::exit::{ExitRequest, ExitSink};

/// SLP_EN: bit 5 of the sleep control register.
pub const SLEEP_CONTROL_SLP_EN: u8 = 1 << 5;
/// Shift of the 3-bit SLP_TYP field (bits 2-4) of the sleep control register.
pub const SLEEP_CONTROL_SLP_TYP_SHIFT: u8 = 2;
/// Mask of the SLP_TYP field, before shifting.
pub const SLEEP_CONTROL_SLP_TYP_MASK: u8 = 0x7;

/// Where the registers live and which values they act on.
///
/// The boot crate's FADT (`SLEEP_CONTROL_REG`, `SLEEP_STATUS_REG`, `RESET_REG`,
/// `RESET_VALUE`) and DSDT (`_S5_`) must describe the same values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiPmConfig {
    /// I/O port of the 8-bit sleep control register.
    pub sleep_control_port: u16,
    /// I/O port of the 8-bit sleep status register.
    pub sleep_status_port: u16,
    /// I/O port of the 8-bit reset register.
    pub reset_port: u16,
    /// The value whose write to the reset register resets the machine.
    pub reset_value: u8,
    /// The SLP_TYP value of S5 (soft off), as in the DSDT's `_S5_` package (0..=7).
    pub s5_sleep_type: u8,
}

impl Default for AcpiPmConfig {
    /// Ports 0x600 (sleep control), 0x601 (sleep status), 0x602 (reset), reset value
    /// 0x01, S5 sleep type 5.
    fn default() -> Self {
        AcpiPmConfig {
            sleep_control_port: 0x600,
            sleep_status_port: 0x601,
            reset_port: 0x602,
            reset_value: 0x01,
            s5_sleep_type: 5,
        }
    }
}

/// The ACPI sleep control, sleep status and reset registers.
///
/// Register it at the three one-port ranges of [`AcpiPm::bus_ranges`]; it tells the
/// registers apart by absolute port (`base + offset`), so a multi-byte access is handled
/// one byte per consecutive port. All three registers read as 0 (in particular the sleep
/// status register never reports WAK_STS); ports that are none of them read as 0xff.
/// Writes other than the power-off and reset values are ignored and logged at debug
/// level. Stateless apart from the exit sink: no lock.
#[derive(Debug)]
pub struct AcpiPm {
    config: AcpiPmConfig,
    exit: Arc<ExitSink>,
}

impl AcpiPm {
    /// Creates the registers described by `config`, reporting to `exit`.
    pub fn new(config: AcpiPmConfig, exit: Arc<ExitSink>) -> AcpiPm {
        AcpiPm { config, exit }
    }

    /// The configuration the device was created with.
    pub fn config(&self) -> &AcpiPmConfig {
        &self.config
    }

    /// The port-I/O ranges to register the device at: sleep control, sleep status and
    /// reset, one port each (they may coincide only if the configuration makes them).
    pub fn bus_ranges(&self) -> [BusRange; 3] {
        [
            BusRange::port(self.config.sleep_control_port),
            BusRange::port(self.config.sleep_status_port),
            BusRange::port(self.config.reset_port),
        ]
    }

    fn write_port(&self, port: u64, value: u8) {
        let c = &self.config;
        if port == u64::from(c.sleep_control_port) {
            let slp_typ = (value >> SLEEP_CONTROL_SLP_TYP_SHIFT) & SLEEP_CONTROL_SLP_TYP_MASK;
            if value & SLEEP_CONTROL_SLP_EN != 0 && slp_typ == c.s5_sleep_type {
                self.exit.request(ExitRequest::PowerOff);
                return;
            }
        }
        if port == u64::from(c.reset_port) && value == c.reset_value {
            self.exit.request(ExitRequest::Reset);
            return;
        }
        log::debug!("acpi pm: ignored write {value:#x} to port {port:#x}");
    }

    fn is_register(&self, port: u64) -> bool {
        let c = &self.config;
        [c.sleep_control_port, c.sleep_status_port, c.reset_port]
            .into_iter()
            .any(|p| u64::from(p) == port)
    }
}

/// Absolute port of byte `i` of an access, if it does not overflow.
fn port_of(base: u64, offset: u64, i: usize) -> Option<u64> {
    base.checked_add(offset)?
        .checked_add(u64::try_from(i).ok()?)
}

impl BusDevice for AcpiPm {
    fn read(&self, base: u64, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let known = port_of(base, offset, i).is_some_and(|p| self.is_register(p));
            *byte = if known { 0 } else { 0xff };
        }
    }

    fn write(&self, base: u64, offset: u64, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            if let Some(port) = port_of(base, offset, i) {
                self.write_port(port, value);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::bus::Bus;

    fn setup(config: AcpiPmConfig) -> (Arc<ExitSink>, Bus) {
        let exit = Arc::new(ExitSink::new().unwrap());
        let pm = Arc::new(AcpiPm::new(config, exit.clone()));
        let mut b = Bus::builder();
        for r in pm.bus_ranges() {
            b.add(r, pm.clone()).unwrap();
        }
        (exit, b.build())
    }

    #[test]
    fn s5_sleep_powers_off() {
        let (exit, bus) = setup(AcpiPmConfig::default());
        // SLP_TYP = 5 in bits 2-4, SLP_EN in bit 5: 0b0011_0100.
        assert!(bus.dispatch_write(0x600, &[0x34]));
        assert_eq!(exit.first(), Some(ExitRequest::PowerOff));
        assert_eq!(exit.event_fd().read().unwrap(), 1);
    }

    #[test]
    fn unrelated_bits_do_not_matter_for_s5() {
        let (exit, bus) = setup(AcpiPmConfig::default());
        assert!(bus.dispatch_write(0x600, &[0x34 | 0xc3]));
        assert_eq!(exit.first(), Some(ExitRequest::PowerOff));
    }

    #[test]
    fn reset_value_resets() {
        let (exit, bus) = setup(AcpiPmConfig::default());
        assert!(bus.dispatch_write(0x602, &[0x01]));
        assert_eq!(exit.first(), Some(ExitRequest::Reset));
    }

    #[test]
    fn other_values_are_ignored() {
        let (exit, bus) = setup(AcpiPmConfig::default());
        for (port, value) in [
            (0x600, 0x14), // S5 type without SLP_EN
            (0x600, 0x20), // SLP_EN with S0
            (0x600, 0x2c), // SLP_EN with S3
            (0x601, 0x34), // the S5 value on the status register
            (0x601, 0x80), // clearing WAK_STS
            (0x602, 0x02), // wrong reset value
            (0x600, 0x01), // the reset value on the sleep register
        ] {
            assert!(bus.dispatch_write(port, &[value]));
        }
        assert_eq!(exit.first(), None);
        let mut data = [0xaa];
        for port in [0x600, 0x601, 0x602] {
            assert!(bus.dispatch_read(port, &mut data));
            assert_eq!(data, [0]);
        }
        assert!(
            !bus.dispatch_write(0x600, &[0x34, 0]),
            "straddles into the status register"
        );
        assert_eq!(exit.first(), None);
    }

    #[test]
    fn configured_ports_and_values_are_honoured() {
        let config = AcpiPmConfig {
            sleep_control_port: 0x404,
            sleep_status_port: 0x405,
            reset_port: 0xcf9,
            reset_value: 0x06,
            s5_sleep_type: 7,
        };
        let (exit, bus) = setup(config);
        assert!(!bus.dispatch_write(0x600, &[0x34]));
        assert!(bus.dispatch_write(0x404, &[0x34]), "type 5 is not S5 here");
        assert!(bus.dispatch_write(0xcf9, &[0x01]));
        assert_eq!(exit.first(), None);
        assert!(bus.dispatch_write(0xcf9, &[0x06]));
        assert!(bus.dispatch_write(0x404, &[0x3c]));
        assert_eq!(
            exit.first(),
            Some(ExitRequest::Reset),
            "the first request wins"
        );
        assert_eq!(exit.count(ExitRequest::PowerOff), 1);
    }

    #[test]
    fn direct_wide_access_goes_byte_by_byte() {
        let exit = Arc::new(ExitSink::new().unwrap());
        let pm = AcpiPm::new(AcpiPmConfig::default(), exit.clone());
        let mut data = [0x55; 5];
        pm.read(0x5ff, 0, &mut data);
        assert_eq!(data, [0xff, 0, 0, 0, 0xff]);
        pm.write(0x600, 0, &[0x00, 0x00, 0x01]);
        assert_eq!(exit.first(), Some(ExitRequest::Reset));
    }

    proptest! {
        #[test]
        fn random_accesses_never_panic(
            ops in prop::collection::vec(
                (any::<bool>(), prop_oneof![Just(0x600u64), any::<u64>()],
                 prop_oneof![0u64..4, any::<u64>()], prop::collection::vec(any::<u8>(), 0..=16)),
                0..64,
            ),
        ) {
            let exit = Arc::new(ExitSink::new().unwrap());
            let pm = AcpiPm::new(AcpiPmConfig::default(), exit.clone());
            let mut expected = None;
            for (is_write, base, offset, mut data) in ops {
                if is_write {
                    for (i, &v) in data.iter().enumerate() {
                        let port = base.checked_add(offset).and_then(|p| p.checked_add(i as u64));
                        let req = match port {
                            Some(0x600) if v & 0x3c == 0x34 => Some(ExitRequest::PowerOff),
                            Some(0x602) if v == 1 => Some(ExitRequest::Reset),
                            _ => None,
                        };
                        expected = expected.or(req);
                    }
                    pm.write(base, offset, &data);
                } else {
                    pm.read(base, offset, &mut data);
                    prop_assert!(data.iter().all(|&b| b == 0 || b == 0xff));
                }
            }
            prop_assert_eq!(exit.first(), expected);
        }
    }
}
