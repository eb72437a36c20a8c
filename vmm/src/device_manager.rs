//! The VM's devices: creating them, wiring their interrupts to KVM, and the
//! RCU-published port-I/O and MMIO buses that dispatch guest accesses.

use crate::control::console_output::ConsoleOutput;
use crate::kvm::vm::{Vm, VmError};
use boot::address_plan;
use devices::{
    AcpiPm, AcpiPmConfig, Bus, BusDevice, BusError, BusRange, ExitSink, Ged, I8042, Interrupt,
    Serial,
};
use rcu::RcuCell;
use std::sync::Arc;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

/// Label under which bus replacements are counted in RCU statistics.
pub const BUS_LABEL: &str = "bus replace";

/// GSI of the GED (power button) interrupt.
pub(crate) const GED_GSI: u32 = address_plan::FIRST_DEVICE_GSI;
/// First GSI for virtio-mmio devices.
pub(crate) const FIRST_VIRTIO_GSI: u32 = address_plan::FIRST_DEVICE_GSI + 1;

/// Errors creating devices.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// An interrupt could not be wired.
    #[error("cannot wire a device interrupt")]
    Interrupt(#[source] VmError),
    /// A device's range clashes with another's.
    #[error("cannot place a device on the bus")]
    Bus(#[source] BusError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
}

/// The VM's devices and buses.
pub struct DeviceManager {
    /// Port-I/O bus, read by vCPUs under RCU.
    pub pio: Arc<RcuCell<Bus>>,
    /// MMIO bus, read by vCPUs under RCU.
    pub mmio: Arc<RcuCell<Bus>>,
    /// COM1.
    pub serial: Arc<Serial>,
    /// COM1's output on its way to stdout (see [`ConsoleOutput`]).
    pub console_output: Arc<ConsoleOutput>,
    /// Signalled when the guest has read the serial input FIFO empty.
    pub serial_drained: EventFd,
    /// The power button.
    pub ged: Arc<Ged>,
    /// Power-off / reset requests from devices and vCPUs.
    pub exit: Arc<ExitSink>,
}

impl std::fmt::Debug for DeviceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceManager").finish_non_exhaustive()
    }
}

impl DeviceManager {
    /// Creates COM1 (its output buffered in [`console_output`], which the
    /// control thread drains), the i8042, the ACPI sleep and reset registers
    /// and the GED, wires their interrupts, and publishes both buses.
    ///
    /// [`console_output`]: Self::console_output
    pub fn new(vm: &Vm) -> Result<Self, DeviceError> {
        let exit = Arc::new(ExitSink::new().map_err(|e| match e {
            devices::ExitError::EventFd(io) => DeviceError::EventFd(io),
        })?);

        let serial_irq: Arc<dyn Interrupt> = Arc::new(
            vm.irq_eventfd(address_plan::COM1_IRQ)
                .map_err(DeviceError::Interrupt)?,
        );
        let serial_drained = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        let console_output = ConsoleOutput::new().map_err(DeviceError::EventFd)?;
        let serial = Arc::new(Serial::new(
            serial_irq,
            Box::new(console_output.sink()),
            Some(serial_drained.try_clone().map_err(DeviceError::EventFd)?),
        ));
        let i8042: Arc<dyn BusDevice> = Arc::new(I8042::new(Arc::clone(&exit)));
        let pm = Arc::new(AcpiPm::new(AcpiPmConfig::default(), Arc::clone(&exit)));

        let mut pio = Bus::builder();
        pio.add(devices::serial::COM1_RANGE, serial.clone())
            .map_err(DeviceError::Bus)?;
        for r in I8042::bus_ranges() {
            pio.add(r, Arc::clone(&i8042)).map_err(DeviceError::Bus)?;
        }
        let pm_dev: Arc<dyn BusDevice> = pm.clone();
        for r in pm.bus_ranges() {
            pio.add(r, Arc::clone(&pm_dev)).map_err(DeviceError::Bus)?;
        }

        let ged_irq: Arc<dyn Interrupt> =
            Arc::new(vm.irq_eventfd(GED_GSI).map_err(DeviceError::Interrupt)?);
        let ged = Arc::new(Ged::new(ged_irq));
        let mut mmio = Bus::builder();
        let ged_range = BusRange::new(address_plan::GED_MMIO_BASE, address_plan::GED_MMIO_SIZE)
            .map_err(DeviceError::Bus)?;
        mmio.add(ged_range, ged.clone()).map_err(DeviceError::Bus)?;

        Ok(Self {
            pio: Arc::new(RcuCell::with_label(pio.build(), BUS_LABEL)),
            mmio: Arc::new(RcuCell::with_label(mmio.build(), BUS_LABEL)),
            serial,
            console_output,
            serial_drained,
            ged,
            exit,
        })
    }

    /// Adds `device` at `range` on the MMIO bus: publishes a new bus with it;
    /// the old table is freed after a grace period. Control thread only.
    #[track_caller]
    pub fn add_mmio(&self, range: BusRange, device: Arc<dyn BusDevice>) -> Result<(), DeviceError> {
        let g = rcu::read_lock();
        let next = self
            .mmio
            .read(&g)
            .with_device(range, device)
            .map_err(DeviceError::Bus)?;
        drop(g);
        self.mmio.replace(next);
        Ok(())
    }

    /// Adds `device` at `range` on the port-I/O bus, as [`add_mmio`]
    /// does on the MMIO bus.
    ///
    /// [`add_mmio`]: Self::add_mmio
    #[cfg(any(test, feature = "test-utils"))]
    #[track_caller]
    pub fn add_pio(&self, range: BusRange, device: Arc<dyn BusDevice>) -> Result<(), DeviceError> {
        let g = rcu::read_lock();
        let next = self
            .pio
            .read(&g)
            .with_device(range, device)
            .map_err(DeviceError::Bus)?;
        drop(g);
        self.pio.replace(next);
        Ok(())
    }

    /// The ACPI description of these devices.
    pub fn acpi_config(&self, cpus: u32) -> boot::acpi::AcpiConfig {
        let mut c = boot::acpi::AcpiConfig::new(cpus);
        c.ged = Some(boot::acpi::GedAcpi::new(GED_GSI));
        c
    }
}
