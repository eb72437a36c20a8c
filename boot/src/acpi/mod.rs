//! ACPI tables: RSDP → XSDT → {FADT → DSDT, MADT}, written into the ACPI area.
//!
//! The platform is "hardware-reduced" ACPI: no PM1 blocks, no SCI, no fixed power
//! button. Power-off goes through the FADT sleep control register (`_S5_`), reset through
//! the FADT reset register, and a power-button press through a GED device whose
//! interrupt makes the guest read an event register and notify a `PNP0C0C` button.
//! Everything device-specific (ports, MMIO addresses, IRQs, which legacy devices exist)
//! comes in through [`AcpiConfig`]; this module only encodes it.
//!
//! The tables are laid out from [`RSDP_START`] in the order RSDP, XSDT, FADT, MADT,
//! DSDT and, with NUMA nodes ([`AcpiConfig::numa`]), SRAT, each 16-byte aligned, and
//! must end below [`ACPI_END`]. Without NUMA nodes there is no SRAT.

mod dsdt;
mod fadt;
mod madt;
mod srat;

pub use srat::{AFFINITY_ENABLED, MEMORY_HOT_PLUGGABLE, NumaAcpi};

use acpi_tables::Aml;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::address_plan::{
    self, ACPI_END, COM1_IRQ, GED_MMIO_BASE, I8042_KBD_IRQ, RESET_PORT, RESET_VALUE, RSDP_START,
    SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT,
};

/// OEM ID in every table header.
pub const OEM_ID: [u8; 6] = *b"MINVMM";
/// OEM revision in every table header.
pub const OEM_REVISION: u32 = 1;
/// Most vCPUs the MADT can describe with 8-bit APIC IDs (0..=254; 255 is broadcast).
pub const MAX_CPUS: u32 = 255;

/// A virtio-mmio device to describe in the DSDT (`LNRO0005`, named `VR00`, `VR01`...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioAcpi {
    /// MMIO base address (below 4 GiB).
    pub base: u64,
    /// Size of its register window.
    pub size: u64,
    /// Its GSI (IOAPIC pin), edge-triggered, active high.
    pub irq: u32,
}

/// The Generic Event Device: an interrupt plus a one-byte event register.
///
/// On its interrupt the guest reads the byte at `base` once; if
/// [`address_plan::GED_EVENT_POWER_BUTTON`] is set it notifies the power button (0x80, "button
/// pressed"), which Linux turns into an orderly power-off. The device decides whether a
/// read clears the register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GedAcpi {
    /// Address of the event register (below 4 GiB).
    pub base: u64,
    /// Its GSI (IOAPIC pin), edge-triggered, active high.
    pub irq: u32,
}

impl GedAcpi {
    /// The GED at the layout's [`GED_MMIO_BASE`] with interrupt `irq`.
    pub fn new(irq: u32) -> Self {
        GedAcpi {
            base: GED_MMIO_BASE,
            irq,
        }
    }
}

/// Everything the ACPI tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs; vCPU `i` gets ACPI processor UID `i` and APIC ID `i`.
    pub num_cpus: u32,
    /// I/O port of the sleep control register (written to power off).
    pub sleep_control_port: u16,
    /// I/O port of the sleep status register.
    pub sleep_status_port: u16,
    /// I/O port of the reset register.
    pub reset_port: u16,
    /// Value to write to the reset register to reset.
    pub reset_value: u8,
    /// A 16550 UART at COM1 (port 0x3f8, IRQ 4) exists.
    pub com1: bool,
    /// An i8042 controller (ports 0x60/0x64, IRQ 1) exists; also sets the FADT "8042" flag.
    pub i8042: bool,
    /// A CMOS RTC exists; if not, the FADT says so and the guest does not probe ports 0x70/0x71.
    pub cmos_rtc: bool,
    /// virtio-mmio devices, in order (`VR00` is the first).
    pub virtio_mmio: Vec<VirtioMmioAcpi>,
    /// The GED power-button device, if any.
    pub ged: Option<GedAcpi>,
    /// NUMA nodes to describe in an SRAT; `None`: no SRAT.
    pub numa: Option<NumaAcpi>,
}

impl AcpiConfig {
    /// A configuration for `num_cpus` vCPUs with the layout's default ports, COM1 and an
    /// i8042, no RTC, no virtio devices and no GED.
    pub fn new(num_cpus: u32) -> Self {
        AcpiConfig {
            num_cpus,
            sleep_control_port: SLEEP_CONTROL_PORT,
            sleep_status_port: SLEEP_STATUS_PORT,
            reset_port: RESET_PORT,
            reset_value: RESET_VALUE,
            com1: true,
            i8042: true,
            cmos_rtc: false,
            virtio_mmio: Vec::new(),
            ged: None,
            numa: None,
        }
    }
}

/// Errors building or writing the ACPI tables.
#[derive(Debug, Error)]
pub enum AcpiError {
    /// The vCPU count is zero or above [`MAX_CPUS`].
    #[error("cannot describe {0} vCPUs in the MADT (1..=255)")]
    CpuCount(u32),
    /// More virtio-mmio devices than the naming scheme (and layout) allows.
    #[error("{count} virtio-mmio devices, at most {max} fit the DSDT")]
    TooManyDevices {
        /// Requested devices.
        count: usize,
        /// The limit.
        max: u32,
    },
    /// A device address or size does not fit the 32-bit descriptor used for it.
    #[error("device at {base:#x} (size {size:#x}) does not fit below 4 GiB")]
    AddressAbove4G {
        /// The base.
        base: u64,
        /// The size.
        size: u64,
    },
    /// An interrupt is outside the IOAPIC's pins.
    #[error("IRQ {0} is not an IOAPIC pin (0..=23)")]
    Irq(u32),
    /// The tables do not fit in the ACPI area.
    #[error("ACPI tables need {size} bytes, the area has {room}")]
    TooBig {
        /// Bytes needed.
        size: u64,
        /// Bytes available.
        room: u64,
    },
    /// Writing the tables to guest memory failed.
    #[error("cannot write the ACPI tables to guest memory")]
    Write(#[source] GuestMemoryError),
}

/// The tables, serialized and placed, ready to be copied to guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    /// Guest address of `bytes[0]` (the RSDP).
    pub base: GuestAddress,
    /// All tables, with their alignment padding.
    pub bytes: Vec<u8>,
    /// Where the RSDP is (what the zero page and PVH start info point at).
    pub rsdp: GuestAddress,
    /// Where the XSDT is.
    pub xsdt: GuestAddress,
    /// Where the FADT is.
    pub fadt: GuestAddress,
    /// Where the MADT is.
    pub madt: GuestAddress,
    /// Where the DSDT is.
    pub dsdt: GuestAddress,
    /// Where the SRAT is, if there is one.
    pub srat: Option<GuestAddress>,
}

/// Alignment of each table in the area.
const TABLE_ALIGN: u64 = 16;

/// Builds all tables for `cfg`, placed from [`RSDP_START`].
pub fn build_acpi_tables(cfg: &AcpiConfig) -> Result<AcpiTables, AcpiError> {
    let madt = madt::build(cfg)?;
    let dsdt = dsdt::build(cfg)?;

    let next = |addr: u64, len: usize| {
        address_plan::align_up(addr + len as u64, TABLE_ALIGN).unwrap_or(u64::MAX)
    };
    let rsdp_addr = RSDP_START;
    let xsdt_addr = next(rsdp_addr, Rsdp::len());
    let srat = cfg.numa.as_ref().map(|n| srat::build(cfg.num_cpus, n));
    let xsdt_len = 36 + if srat.is_some() { 3 } else { 2 } * 8;
    let fadt_addr = next(xsdt_addr, xsdt_len);
    let madt_addr = next(fadt_addr, fadt::FADT_LEN);
    let dsdt_addr = next(madt_addr, madt.len());
    let fadt = fadt::build(cfg, dsdt_addr);
    let mut end = dsdt_addr + dsdt.len() as u64;
    let srat_addr = srat.as_ref().map(|t| {
        let at = next(dsdt_addr, dsdt.len());
        end = at + t.len() as u64;
        at
    });
    if end > ACPI_END {
        return Err(AcpiError::TooBig {
            size: end - RSDP_START,
            room: ACPI_END - RSDP_START,
        });
    }

    let mut xsdt = XSDT::new(OEM_ID, *b"MVMMXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    if let Some(a) = srat_addr {
        xsdt.add_entry(a);
    }
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);

    // Lossless: `end` is below ACPI_END (1 MiB).
    let mut bytes = vec![0u8; (end - RSDP_START) as usize];
    let mut place = |addr: u64, table: &[u8]| {
        let off = (addr - RSDP_START) as usize;
        if let Some(dst) = bytes.get_mut(off..off + table.len()) {
            dst.copy_from_slice(table);
        }
    };
    place(rsdp_addr, &aml_bytes(&rsdp));
    let xsdt_bytes = aml_bytes(&xsdt);
    debug_assert_eq!(xsdt_bytes.len(), xsdt_len);
    place(xsdt_addr, &xsdt_bytes);
    place(fadt_addr, &fadt);
    place(madt_addr, &madt);
    place(dsdt_addr, &dsdt);
    if let (Some(a), Some(t)) = (srat_addr, &srat) {
        place(a, t);
    }

    Ok(AcpiTables {
        base: GuestAddress(RSDP_START),
        bytes,
        rsdp: GuestAddress(rsdp_addr),
        xsdt: GuestAddress(xsdt_addr),
        fadt: GuestAddress(fadt_addr),
        madt: GuestAddress(madt_addr),
        dsdt: GuestAddress(dsdt_addr),
        srat: srat_addr.map(GuestAddress),
    })
}

/// Copies `tables` into guest memory.
pub fn write_acpi_tables<M: GuestMemoryBackend>(
    mem: &M,
    tables: &AcpiTables,
) -> Result<(), AcpiError> {
    mem.write_slice(&tables.bytes, tables.base)
        .map_err(AcpiError::Write)
}

/// Builds the tables for `cfg`, writes them into `mem` and returns the RSDP's address.
pub fn create_acpi_tables<M: GuestMemoryBackend>(
    mem: &M,
    cfg: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    let tables = build_acpi_tables(cfg)?;
    write_acpi_tables(mem, &tables)?;
    Ok(tables.rsdp)
}

fn aml_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// Checks a 32-bit address range for a 32-bit resource descriptor.
fn below_4g(base: u64, size: u64) -> Result<(u32, u32), AcpiError> {
    let err = || AcpiError::AddressAbove4G { base, size };
    let end = base.checked_add(size).ok_or_else(err)?;
    if end > 1 << 32 {
        return Err(err());
    }
    Ok((
        u32::try_from(base).map_err(|_| err())?,
        u32::try_from(size).map_err(|_| err())?,
    ))
}

/// Checks that `irq` is a pin of KVM's IOAPIC.
fn ioapic_pin(irq: u32) -> Result<u32, AcpiError> {
    if irq < address_plan::IOAPIC_PINS {
        Ok(irq)
    } else {
        Err(AcpiError::Irq(irq))
    }
}

/// ISA IRQs the legacy devices of `cfg` use.
fn isa_irqs(cfg: &AcpiConfig) -> Vec<u32> {
    let mut irqs = Vec::new();
    if cfg.i8042 {
        irqs.push(I8042_KBD_IRQ);
    }
    if cfg.com1 {
        irqs.push(COM1_IRQ);
    }
    irqs
}

#[allow(clippy::unwrap_used)]
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    /// Sum of all bytes, which is 0 for a table with a correct checksum.
    pub(crate) fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    pub(crate) fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    pub(crate) fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// The table (by its header's length) at guest address `addr` in `t`.
    pub(crate) fn table_at(t: &AcpiTables, addr: u64) -> &[u8] {
        let off = (addr - t.base.0) as usize;
        let len = u32_at(&t.bytes, off + 4) as usize;
        &t.bytes[off..off + len]
    }

    pub(crate) fn full_config() -> AcpiConfig {
        let mut cfg = AcpiConfig::new(4);
        cfg.virtio_mmio = (0..3)
            .map(|i| VirtioMmioAcpi {
                base: address_plan::virtio_mmio_base(i).unwrap(),
                size: 0x1000,
                irq: 6 + i,
            })
            .collect();
        cfg.ged = Some(GedAcpi::new(5));
        cfg
    }

    #[test]
    fn rsdp_points_at_xsdt_and_is_checksummed() {
        let t = build_acpi_tables(&full_config()).unwrap();
        assert_eq!(t.rsdp, GuestAddress(0xe_0000));
        let rsdp = &t.bytes[..36];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
        assert_eq!(sum(&rsdp[..20]), 0, "v1 checksum");
        assert_eq!(sum(rsdp), 0, "extended checksum");
        assert_eq!(u32_at(rsdp, 20), 36);
        assert_eq!(u64_at(rsdp, 24), t.xsdt.0);
    }

    #[test]
    fn every_table_has_a_valid_header_and_checksum() {
        let t = build_acpi_tables(&full_config()).unwrap();
        for (addr, sig) in [
            (t.xsdt, b"XSDT"),
            (t.fadt, b"FACP"),
            (t.madt, b"APIC"),
            (t.dsdt, b"DSDT"),
        ] {
            let table = table_at(&t, addr.0);
            assert_eq!(&table[..4], sig);
            assert_eq!(sum(table), 0, "{} checksum", String::from_utf8_lossy(sig));
            assert_eq!(&table[10..16], &OEM_ID);
            assert_eq!(addr.0 % 16, 0);
        }
    }

    #[test]
    fn xsdt_points_at_fadt_and_madt_and_fadt_at_dsdt() {
        let t = build_acpi_tables(&full_config()).unwrap();
        let xsdt = table_at(&t, t.xsdt.0);
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        assert_eq!(entries, vec![t.fadt.0, t.madt.0]);
        let fadt = table_at(&t, t.fadt.0);
        assert_eq!(u64_at(fadt, 140), t.dsdt.0, "X_DSDT");
        // Every table is reachable from the RSDP: XSDT entries plus the FADT's DSDT.
        let reachable = [t.xsdt.0, entries[0], entries[1], u64_at(fadt, 140)];
        assert_eq!(reachable, [t.xsdt.0, t.fadt.0, t.madt.0, t.dsdt.0]);
    }

    #[test]
    fn tables_fit_and_do_not_overlap() {
        let t = build_acpi_tables(&full_config()).unwrap();
        let mut spans = vec![(t.rsdp.0, 36u64)];
        for a in [t.xsdt, t.fadt, t.madt, t.dsdt] {
            spans.push((a.0, table_at(&t, a.0).len() as u64));
        }
        for w in spans.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0);
        }
        let last = spans.last().unwrap();
        assert_eq!(last.0 + last.1, t.base.0 + t.bytes.len() as u64);
        assert!(last.0 + last.1 <= ACPI_END);
    }

    #[test]
    fn without_numa_there_is_no_srat_and_with_it_the_xsdt_points_at_it() {
        let t = build_acpi_tables(&full_config()).unwrap();
        assert_eq!(t.srat, None);
        let mut cfg = full_config();
        cfg.numa = Some(NumaAcpi {
            ram: vec![address_plan::GuestRange {
                start: 0,
                size: 512 << 20,
            }],
            hotplug: vec![(
                address_plan::GuestRange {
                    start: 4 << 30,
                    size: 1 << 30,
                },
                1,
            )],
        });
        let n = build_acpi_tables(&cfg).unwrap();
        let srat = n.srat.expect("an SRAT");
        let xsdt = table_at(&n, n.xsdt.0);
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        assert_eq!(entries, vec![n.fadt.0, n.madt.0, srat.0]);
        let table = table_at(&n, srat.0);
        assert_eq!(&table[..4], b"SRAT");
        assert_eq!(sum(table), 0);
        assert_eq!(srat.0 % 16, 0);
        assert!(srat.0 >= n.dsdt.0 + table_at(&n, n.dsdt.0).len() as u64);
        assert_eq!(srat.0 + table.len() as u64, n.base.0 + n.bytes.len() as u64);
        // The other tables are the same bytes as without NUMA (apart from the
        // XSDT and the FADT, which point at moved tables).
        assert_eq!(table_at(&n, n.madt.0), table_at(&t, t.madt.0));
        assert_eq!(table_at(&n, n.dsdt.0), table_at(&t, t.dsdt.0));
    }

    #[test]
    fn largest_configuration_fits() {
        let mut cfg = AcpiConfig::new(MAX_CPUS);
        cfg.virtio_mmio = (0..address_plan::VIRTIO_MMIO_MAX_DEVICES)
            .map(|i| VirtioMmioAcpi {
                base: address_plan::virtio_mmio_base(i).unwrap(),
                size: 0x1000,
                irq: 5 + i % 19,
            })
            .collect();
        cfg.ged = Some(GedAcpi::new(5));
        let t = build_acpi_tables(&cfg).unwrap();
        assert_eq!(sum(table_at(&t, t.dsdt.0)), 0);
        assert_eq!(sum(table_at(&t, t.madt.0)), 0);
    }

    #[test]
    fn invalid_configurations_are_rejected() {
        assert!(matches!(
            build_acpi_tables(&AcpiConfig::new(0)),
            Err(AcpiError::CpuCount(0))
        ));
        assert!(matches!(
            build_acpi_tables(&AcpiConfig::new(256)),
            Err(AcpiError::CpuCount(256))
        ));
        let mut cfg = AcpiConfig::new(1);
        cfg.virtio_mmio = vec![VirtioMmioAcpi {
            base: 1 << 32,
            size: 0x1000,
            irq: 5,
        }];
        assert!(matches!(
            build_acpi_tables(&cfg),
            Err(AcpiError::AddressAbove4G { .. })
        ));
        cfg.virtio_mmio = vec![VirtioMmioAcpi {
            base: 0xd000_0000,
            size: 0x1000,
            irq: 24,
        }];
        assert!(matches!(build_acpi_tables(&cfg), Err(AcpiError::Irq(24))));
        cfg.virtio_mmio = vec![
            VirtioMmioAcpi {
                base: 0xd000_0000,
                size: 0x1000,
                irq: 5
            };
            address_plan::VIRTIO_MMIO_MAX_DEVICES as usize + 1
        ];
        assert!(matches!(
            build_acpi_tables(&cfg),
            Err(AcpiError::TooManyDevices { .. })
        ));
        let mut cfg = AcpiConfig::new(1);
        cfg.ged = Some(GedAcpi {
            base: 0xd000_0000,
            irq: 99,
        });
        assert!(matches!(build_acpi_tables(&cfg), Err(AcpiError::Irq(99))));
    }

    #[test]
    fn create_writes_tables_into_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let cfg = full_config();
        let rsdp = create_acpi_tables(&mem, &cfg).unwrap();
        assert_eq!(rsdp, GuestAddress(RSDP_START));
        let t = build_acpi_tables(&cfg).unwrap();
        let mut back = vec![0u8; t.bytes.len()];
        mem.read_slice(&mut back, t.base).unwrap();
        assert_eq!(back, t.bytes);
    }

    #[test]
    fn writing_past_memory_fails() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0xe_0000)]).unwrap();
        assert!(matches!(
            create_acpi_tables(&mem, &AcpiConfig::new(1)),
            Err(AcpiError::Write(_))
        ));
    }
}
