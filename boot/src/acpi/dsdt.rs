//! The DSDT: AML describing the devices the guest cannot discover by itself.
//!
//! ```text
//! \_SB_.COM1  PNP0501   16550 UART, I/O 0x3f8..0x3ff, IRQ 4         (if configured)
//! \_SB_.PS2_  PNP0303   i8042, I/O 0x60 and 0x64, IRQ 1              (if configured)
//! \_SB_.VRnn  LNRO0005  virtio-mmio device nn (hex), MMIO + IRQ      (one per device)
//! \_SB_.PWRB  PNP0C0C   power button (control method)                (with a GED)
//! \_SB_.GED_  ACPI0013  GED: _EVT reads the event byte, notifies PWRB (with a GED)
//! \_S5_       {5,5,0,0} soft-off: SLP_TYP 5 for the sleep control register
//! ```
//!
//! All device interrupts are described as edge-triggered, active high, exclusive: KVM's
//! irqfds inject edges.

use acpi_tables::aml::{
    self, And, Device, EISAName, Field, FieldAccessType, FieldEntry, FieldLockRule,
    FieldUpdateRule, If, Interrupt, Local, Memory32Fixed, Method, Name, Notify, OpRegion,
    OpRegionSpace, Package, Path, ResourceTemplate, Store,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::{Aml, AmlSink};

use super::{
    AcpiConfig, AcpiError, GedAcpi, OEM_ID, OEM_REVISION, VirtioMmioAcpi, below_4g, ioapic_pin,
};
use crate::address_plan::{
    COM1_IRQ, COM1_PORT, GED_EVENT_POWER_BUTTON, I8042_COMMAND_PORT, I8042_DATA_PORT,
    I8042_KBD_IRQ, S5_SLEEP_TYPE, VIRTIO_MMIO_MAX_DEVICES,
};

/// DSDT revision 2: AML integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;
/// `Notify` value for "power button pressed".
const NOTIFY_BUTTON_PRESSED: u8 = 0x80;

/// The DSDT for `cfg`.
pub(super) fn build(cfg: &AcpiConfig) -> Result<Vec<u8>, AcpiError> {
    if cfg.virtio_mmio.len() > VIRTIO_MMIO_MAX_DEVICES as usize {
        return Err(AcpiError::TooManyDevices {
            count: cfg.virtio_mmio.len(),
            max: VIRTIO_MMIO_MAX_DEVICES,
        });
    }
    let mut body: Vec<u8> = Vec::new();
    if cfg.com1 {
        com1(&mut body);
    }
    if cfg.i8042 {
        i8042(&mut body);
    }
    for (index, dev) in cfg.virtio_mmio.iter().enumerate() {
        virtio_mmio(&mut body, index, dev)?;
    }
    if let Some(ged) = &cfg.ged {
        power_button(&mut body);
        ged_device(&mut body, ged)?;
    }
    s5(&mut body);

    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        *b"MVMMDSDT",
        OEM_REVISION,
    );
    dsdt.append_slice(&body);
    Ok(dsdt.as_slice().to_vec())
}

fn edge_irq(irq: u32) -> Interrupt {
    Interrupt::new(true, true, false, false, irq)
}

fn com1(sink: &mut dyn AmlSink) {
    let irq = edge_irq(COM1_IRQ);
    let io = aml::IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let crs = ResourceTemplate::new(vec![&io, &irq]);
    Device::new(
        "_SB_.COM1".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_DDN".into(), &"COM1"),
            &Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(sink);
}

fn i8042(sink: &mut dyn AmlSink) {
    let data = aml::IO::new(I8042_DATA_PORT, I8042_DATA_PORT, 1, 1);
    let cmd = aml::IO::new(I8042_COMMAND_PORT, I8042_COMMAND_PORT, 1, 1);
    let irq = edge_irq(I8042_KBD_IRQ);
    let crs = ResourceTemplate::new(vec![&data, &cmd, &irq]);
    Device::new(
        "_SB_.PS2_".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0303")),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(sink);
}

fn virtio_mmio(
    sink: &mut dyn AmlSink,
    index: usize,
    dev: &VirtioMmioAcpi,
) -> Result<(), AcpiError> {
    let (base, size) = below_4g(dev.base, dev.size)?;
    let irq = edge_irq(ioapic_pin(dev.irq)?);
    let mem = Memory32Fixed::new(true, base, size);
    let crs = ResourceTemplate::new(vec![&mem, &irq]);
    // index < VIRTIO_MMIO_MAX_DEVICES (256), so two hex digits make a 4-character name.
    let name = format!("_SB_.VR{index:02X}");
    let uid = index as u64;
    Device::new(
        name.as_str().into(),
        vec![
            &Name::new("_HID".into(), &"LNRO0005"),
            &Name::new("_UID".into(), &uid),
            // Cache-coherent DMA.
            &Name::new("_CCA".into(), &aml::ONE),
            &Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(sink);
    Ok(())
}

fn power_button(sink: &mut dyn AmlSink) {
    Device::new(
        "_SB_.PWRB".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0C0C")),
            &Name::new("_UID".into(), &aml::ZERO),
        ],
    )
    .to_aml_bytes(sink);
}

fn ged_device(sink: &mut dyn AmlSink, ged: &GedAcpi) -> Result<(), AcpiError> {
    let (base, _) = below_4g(ged.base, 1)?;
    let irq = edge_irq(ioapic_pin(ged.irq)?);
    // Linux's GED driver rejects any _CRS entry that is not an interrupt, so the event
    // register is reached through an OperationRegion instead of a memory resource.
    let crs = ResourceTemplate::new(vec![&irq]);
    let region_base = u64::from(base);
    let region = OpRegion::new(
        "GDST".into(),
        OpRegionSpace::SystemMemory,
        &region_base,
        &aml::ONE,
    );
    let field = Field::new(
        "GDST".into(),
        FieldAccessType::Byte,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"GDAT", 8)],
    );
    let gdat = Path::new("GDAT");
    let read_events = Store::new(&Local(0), &gdat);
    let power_bit = GED_EVENT_POWER_BUTTON;
    let pressed = And::new(&aml::ZERO, &Local(0), &power_bit);
    let button = Path::new("\\_SB_.PWRB");
    let notify = Notify::new(&button, &NOTIFY_BUTTON_PRESSED);
    let on_power = If::new(&pressed, vec![&notify]);
    let evt = Method::new("_EVT".into(), 1, true, vec![&read_events, &on_power]);
    Device::new(
        "_SB_.GED_".into(),
        vec![
            &Name::new("_HID".into(), &"ACPI0013"),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_CRS".into(), &crs),
            &region,
            &field,
            &evt,
        ],
    )
    .to_aml_bytes(sink);
    Ok(())
}

fn s5(sink: &mut dyn AmlSink) {
    let slp_typ = S5_SLEEP_TYPE;
    Name::new(
        "_S5_".into(),
        &Package::new(vec![&slp_typ, &slp_typ, &aml::ZERO, &aml::ZERO]),
    )
    .to_aml_bytes(sink);
}

#[allow(clippy::unwrap_used)]
#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi::VirtioMmioAcpi;
    use crate::acpi::tests::{full_config, sum, u32_at};

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    fn count(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len()).filter(|w| *w == needle).count()
    }

    /// The compressed EISA ID of e.g. "PNP0501" as AML encodes it: a DWordConst (0x0c)
    /// holding three 5-bit letters and four hex digits, big-endian.
    fn eisa(id: &str) -> Vec<u8> {
        let b = id.as_bytes();
        let letters =
            (u32::from(b[0] - 0x40) << 10) | (u32::from(b[1] - 0x40) << 5) | u32::from(b[2] - 0x40);
        let digits = u32::from_str_radix(&id[3..], 16).unwrap();
        let value = (letters << 16) | digits;
        let mut v = vec![0x0c];
        v.extend_from_slice(&value.to_be_bytes());
        v
    }

    #[test]
    fn eisa_encoding_matches_the_spec_example() {
        // ACPI spec: EISAID("PNP0C0C") is 0x0C0CD041 stored little-endian.
        assert_eq!(eisa("PNP0C0C"), vec![0x0c, 0x41, 0xd0, 0x0c, 0x0c]);
    }

    #[test]
    fn dsdt_has_header_checksum_and_all_devices() {
        let d = build(&full_config()).unwrap();
        assert_eq!(&d[..4], b"DSDT");
        assert_eq!(u32_at(&d, 4) as usize, d.len());
        assert_eq!(d[8], 2);
        assert_eq!(sum(&d), 0);
        assert!(contains(&d, &eisa("PNP0501")), "COM1");
        assert!(contains(&d, &eisa("PNP0303")), "i8042");
        assert!(contains(&d, &eisa("PNP0C0C")), "power button");
        assert!(contains(&d, b"\x0dACPI0013\x00"), "GED HID string");
        assert_eq!(count(&d, b"\x0dLNRO0005\x00"), 3, "virtio-mmio HID strings");
        for name in [
            &b"VR00"[..],
            b"VR01",
            b"VR02",
            b"COM1",
            b"PS2_",
            b"PWRB",
            b"GED_",
            b"_EVT",
            b"_S5_",
        ] {
            assert!(contains(&d, name), "{}", String::from_utf8_lossy(name));
        }
    }

    #[test]
    fn com1_resources_are_port_3f8_and_irq_4() {
        let d = build(&AcpiConfig::new(1)).unwrap();
        // I/O descriptor: 0x47, decode16, min 0x3f8, max 0x3f8, align 1, length 8.
        assert!(contains(
            &d,
            &[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]
        ));
        // Extended interrupt descriptor: consumer, edge, active high, exclusive, IRQ 4.
        assert!(contains(&d, &[0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0, 0, 0]));
        // i8042 ports 0x60 and 0x64.
        assert!(contains(
            &d,
            &[0x47, 0x01, 0x60, 0x00, 0x60, 0x00, 0x01, 0x01]
        ));
        assert!(contains(
            &d,
            &[0x47, 0x01, 0x64, 0x00, 0x64, 0x00, 0x01, 0x01]
        ));
    }

    #[test]
    fn virtio_mmio_resources_match_the_config() {
        let mut cfg = AcpiConfig::new(1);
        cfg.virtio_mmio = vec![VirtioMmioAcpi {
            base: 0xd000_1000,
            size: 0x200,
            irq: 9,
        }];
        let d = build(&cfg).unwrap();
        // Memory32Fixed: 0x86, length 9, read-write, base, size.
        let mut m = vec![0x86, 0x09, 0x00, 0x01];
        m.extend_from_slice(&0xd000_1000u32.to_le_bytes());
        m.extend_from_slice(&0x200u32.to_le_bytes());
        assert!(contains(&d, &m));
        assert!(contains(&d, &[0x89, 0x06, 0x00, 0x03, 0x01, 0x09, 0, 0, 0]));
    }

    #[test]
    fn ged_reads_its_register_and_notifies_the_power_button() {
        let mut cfg = AcpiConfig::new(1);
        cfg.ged = Some(GedAcpi {
            base: 0xd000_0000,
            irq: 5,
        });
        let d = build(&cfg).unwrap();
        // OperationRegion(GDST, SystemMemory, 0xd0000000, One).
        let mut region = vec![0x5b, 0x80];
        region.extend_from_slice(b"GDST");
        region.extend_from_slice(&[0x00, 0x0c]);
        region.extend_from_slice(&0xd000_0000u32.to_le_bytes());
        region.push(0x01);
        assert!(contains(&d, &region));
        // Notify(\_SB_.PWRB, 0x80).
        let mut notify = vec![0x86, b'\\', 0x2e];
        notify.extend_from_slice(b"_SB_PWRB");
        notify.extend_from_slice(&[0x0a, 0x80]);
        assert!(contains(&d, &notify));
        // GED interrupt 5, and no memory descriptor in its _CRS.
        assert!(contains(&d, &[0x89, 0x06, 0x00, 0x03, 0x01, 0x05, 0, 0, 0]));
        assert!(!contains(&d, &[0x86, 0x09, 0x00]));
    }

    #[test]
    fn s5_package_holds_the_sleep_type() {
        let d = build(&AcpiConfig::new(1)).unwrap();
        // Name(_S5_, Package(4) {5, 5, Zero, Zero}).
        let mut s5 = vec![0x08];
        s5.extend_from_slice(b"_S5_");
        s5.extend_from_slice(&[0x12, 0x08, 0x04, 0x0a, 0x05, 0x0a, 0x05, 0x00, 0x00]);
        assert!(contains(&d, &s5));
    }

    #[test]
    fn without_ged_there_is_no_power_button() {
        let d = build(&AcpiConfig::new(1)).unwrap();
        assert!(!contains(&d, b"PWRB"));
        assert!(!contains(&d, b"ACPI0013"));
    }
}
