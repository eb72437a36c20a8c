//! The FADT ("FACP"): a hardware-reduced ACPI 6.5 platform with sleep and reset registers.

use acpi_tables::Aml;
use acpi_tables::fadt::{FADT, FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};

use super::{AcpiConfig, OEM_ID, OEM_REVISION};

/// Length of the ACPI 6.x FADT.
pub(super) const FADT_LEN: usize = 276;

/// IA-PC boot architecture flag: the motherboard has an 8042 (keyboard controller).
pub const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
/// IA-PC boot architecture flag: do not probe for VGA.
pub const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
/// IA-PC boot architecture flag: MSIs must not be enabled (we have no PCI).
pub const IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED: u16 = 1 << 3;
/// IA-PC boot architecture flag: no CMOS RTC at ports 0x70/0x71.
pub const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// Hypervisor vendor identity field (FADT offset 268).
const HYPERVISOR_VENDOR: [u8; 8] = *b"MINIVMM\0";

/// The FADT for `cfg`, pointing at the DSDT at `dsdt_addr`.
pub(super) fn build(cfg: &AcpiConfig, dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, *b"MVMMFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed-feature buttons: the power button is a control-method device (PNP0C0C).
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    let mut boot_arch = IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED;
    if cfg.i8042 {
        boot_arch |= IAPC_BOOT_ARCH_8042;
    }
    if !cfg.cmos_rtc {
        boot_arch |= IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT;
    }
    b.iapc_boot_arch = boot_arch.into();
    b.reset_reg = io_port_reg(cfg.reset_port);
    b.reset_value = cfg.reset_value;
    b.sleep_control_reg = io_port_reg(cfg.sleep_control_port);
    b.sleep_status_reg = io_port_reg(cfg.sleep_status_port);
    b.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR).into();
    let fadt: FADT = b.finalize();
    let mut bytes = Vec::with_capacity(FADT_LEN);
    fadt.to_aml_bytes(&mut bytes);
    bytes
}

/// A byte-wide register in I/O port space.
fn io_port_reg(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

#[allow(clippy::unwrap_used)]
#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi::tests::{sum, u32_at, u64_at};

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes([b[off], b[off + 1]])
    }

    /// Decodes the 12-byte Generic Address Structure at `off`.
    fn gas_at(b: &[u8], off: usize) -> (u8, u8, u8, u8, u64) {
        (
            b[off],
            b[off + 1],
            b[off + 2],
            b[off + 3],
            u64_at(b, off + 4),
        )
    }

    #[test]
    fn fadt_is_hardware_reduced_acpi_6() {
        let f = build(&AcpiConfig::new(2), 0xe_1000);
        assert_eq!(f.len(), FADT_LEN);
        assert_eq!(&f[..4], b"FACP");
        assert_eq!(u32_at(&f, 4) as usize, FADT_LEN);
        assert_eq!(f[8], 6, "major revision");
        assert_eq!(f[131], 5, "minor revision");
        assert_eq!(sum(&f), 0);
        let flags = u32_at(&f, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_ne!(flags & (1 << 4), 0, "PWR_BUTTON is a control method");
        assert_eq!(u32_at(&f, 40), 0, "32-bit DSDT unused");
        assert_eq!(u64_at(&f, 140), 0xe_1000, "X_DSDT");
        assert_eq!(&f[268..276], b"MINIVMM\0");
    }

    #[test]
    fn fadt_registers_are_byte_io_ports() {
        let mut cfg = AcpiConfig::new(1);
        cfg.reset_port = 0x1234;
        cfg.reset_value = 0x42;
        let f = build(&cfg, 0);
        // RESET_REG at 116, SLEEP_CONTROL_REG at 244, SLEEP_STATUS_REG at 256:
        // (space 1 = SystemIO, 8 bits, offset 0, byte access, port).
        assert_eq!(gas_at(&f, 116), (1, 8, 0, 1, 0x1234));
        assert_eq!(f[128], 0x42, "RESET_VALUE");
        assert_eq!(gas_at(&f, 244), (1, 8, 0, 1, 0x600));
        assert_eq!(gas_at(&f, 256), (1, 8, 0, 1, 0x601));
    }

    #[test]
    fn boot_arch_flags_follow_the_config() {
        let mut cfg = AcpiConfig::new(1);
        let f = build(&cfg, 0);
        assert_eq!(u16_at(&f, 109), 0b10_1110, "8042, no VGA, no MSI, no RTC");
        cfg.i8042 = false;
        cfg.cmos_rtc = true;
        let f = build(&cfg, 0);
        assert_eq!(u16_at(&f, 109), 0b00_1100, "no VGA, no MSI");
    }
}
