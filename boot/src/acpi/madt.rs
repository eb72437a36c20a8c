//! The MADT ("APIC"): one local APIC per vCPU, KVM's IOAPIC, and ISA interrupt overrides.
//!
//! KVM's default GSI routing (used with its in-kernel irqchip when the VMM installs no
//! routing of its own) sends ISA IRQ `n` to IOAPIC pin `n`, so every override is the
//! identity. As Cloud Hypervisor does for COM1, we still list the ISA IRQs our legacy
//! devices use, with explicit edge-triggered/active-high flags, so the guest does not
//! have to rely on bus defaults.

use acpi_tables::Aml;
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::sdt::Sdt;

use super::{AcpiConfig, AcpiError, MAX_CPUS, OEM_ID, OEM_REVISION, isa_irqs};
use crate::address_plan::{IOAPIC_START, LAPIC_START};

/// MADT revision of ACPI 6.x.
const MADT_REVISION: u8 = 5;
/// Length of the MADT header (standard header + local APIC address + flags).
const MADT_HEADER_LEN: u32 = 44;
/// Interrupt Source Override structure type and length.
const ISO_TYPE: u8 = 2;
const ISO_LEN: u8 = 10;
/// MPS INTI flags: active high (polarity 01), edge triggered (trigger mode 01).
pub const INTI_EDGE_ACTIVE_HIGH: u16 = 0b0101;
/// ID of the (only) IOAPIC; KVM's in-kernel IOAPIC starts with ID 0.
const IOAPIC_ID: u8 = 0;

/// The MADT for `cfg.num_cpus` vCPUs.
pub(super) fn build(cfg: &AcpiConfig) -> Result<Vec<u8>, AcpiError> {
    if cfg.num_cpus == 0 || cfg.num_cpus > MAX_CPUS {
        return Err(AcpiError::CpuCount(cfg.num_cpus));
    }
    let mut madt = Sdt::new(
        *b"APIC",
        MADT_HEADER_LEN,
        MADT_REVISION,
        OEM_ID,
        *b"MVMMAPIC",
        OEM_REVISION,
    );
    // Both constants are below 4 GiB.
    madt.write_u32(36, LAPIC_START as u32);
    // Flags: no PCAT_COMPAT; a hardware-reduced guest does not use the 8259s.
    madt.write_u32(40, 0);

    let mut body = Vec::new();
    for cpu in 0..cfg.num_cpus {
        // Lossless: num_cpus <= 255 was checked above, so cpu <= 254.
        let id = cpu as u8;
        ProcessorLocalApic::new(id, id, EnabledStatus::Enabled).to_aml_bytes(&mut body);
    }
    IoApic::new(IOAPIC_ID, IOAPIC_START as u32, 0).to_aml_bytes(&mut body);
    for irq in isa_irqs(cfg) {
        body.extend_from_slice(&interrupt_source_override(irq as u8, irq));
    }
    madt.append_slice(&body);
    Ok(madt.as_slice().to_vec())
}

/// An Interrupt Source Override: ISA IRQ `source` is GSI `gsi`, edge/active high.
fn interrupt_source_override(source: u8, gsi: u32) -> [u8; ISO_LEN as usize] {
    let mut s = [0u8; ISO_LEN as usize];
    s[0] = ISO_TYPE;
    s[1] = ISO_LEN;
    s[2] = 0; // bus: ISA
    s[3] = source;
    s[4..8].copy_from_slice(&gsi.to_le_bytes());
    s[8..10].copy_from_slice(&INTI_EDGE_ACTIVE_HIGH.to_le_bytes());
    s
}

#[allow(clippy::unwrap_used)]
#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi::tests::{sum, u32_at};

    /// Splits the MADT body into (type, bytes) structures.
    fn structures(m: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut off = 44;
        while off < m.len() {
            let len = m[off + 1] as usize;
            out.push((m[off], m[off..off + len].to_vec()));
            off += len;
        }
        assert_eq!(off, m.len(), "structures fill the table exactly");
        out
    }

    #[test]
    fn one_enabled_lapic_per_vcpu_with_apic_id_equal_to_index() {
        let m = build(&AcpiConfig::new(8)).unwrap();
        assert_eq!(&m[..4], b"APIC");
        assert_eq!(u32_at(&m, 4) as usize, m.len());
        assert_eq!(sum(&m), 0);
        assert_eq!(u32_at(&m, 36), 0xfee0_0000);
        let lapics: Vec<Vec<u8>> = structures(&m)
            .into_iter()
            .filter(|(t, _)| *t == 0)
            .map(|(_, b)| b)
            .collect();
        assert_eq!(lapics.len(), 8);
        for (i, l) in lapics.iter().enumerate() {
            assert_eq!(l.len(), 8);
            assert_eq!(l[2] as usize, i, "processor UID");
            assert_eq!(l[3] as usize, i, "APIC ID");
            assert_eq!(u32_at(l, 4), 1, "enabled");
        }
    }

    #[test]
    fn ioapic_and_overrides_are_present() {
        let m = build(&AcpiConfig::new(1)).unwrap();
        let s = structures(&m);
        let ioapics: Vec<&Vec<u8>> = s.iter().filter(|(t, _)| *t == 1).map(|(_, b)| b).collect();
        assert_eq!(ioapics.len(), 1);
        assert_eq!(u32_at(ioapics[0], 4), 0xfec0_0000, "IOAPIC address");
        assert_eq!(u32_at(ioapics[0], 8), 0, "GSI base");
        let isos: Vec<(u8, u32, u16)> = s
            .iter()
            .filter(|(t, _)| *t == 2)
            .map(|(_, b)| (b[3], u32_at(b, 4), u16::from_le_bytes([b[8], b[9]])))
            .collect();
        // i8042 keyboard (IRQ 1) and COM1 (IRQ 4), identity-mapped, edge/active high.
        assert_eq!(isos, vec![(1, 1, 0b0101), (4, 4, 0b0101)]);
    }

    #[test]
    fn no_legacy_devices_no_overrides() {
        let mut cfg = AcpiConfig::new(2);
        cfg.com1 = false;
        cfg.i8042 = false;
        let m = build(&cfg).unwrap();
        assert!(structures(&m).iter().all(|(t, _)| *t != 2));
    }

    #[test]
    fn maximum_vcpus_use_apic_ids_up_to_254() {
        let m = build(&AcpiConfig::new(MAX_CPUS)).unwrap();
        let last = structures(&m)
            .into_iter()
            .rfind(|(t, _)| *t == 0)
            .unwrap()
            .1;
        assert_eq!(last[3], 254);
        assert_eq!(sum(&m), 0);
    }
}
