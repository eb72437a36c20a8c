//! The virtio-mem device of a VM: its transport on the MMIO bus, its KVM
//! interrupt and queue-notification eventfds, and the control-thread event
//! source that processes its requests.

use crate::device_manager::{DeviceError, DeviceManager, FIRST_VIRTIO_GSI};
use crate::guest_memory::SharedMemory;
use crate::memory_backing::MemoryBacking;
use crate::memory_manager::{FIRST_HOTPLUG_KVM_SLOT, MemoryManager, SLOT_SIZE};
use crate::vm::{Vm, VmError};
use devices::BusRange;
use devices::virtio::{
    QUEUE_NOTIFY_OFFSET, VIRTIO_MEM_DEFAULT_BLOCK_SIZE, VIRTIO_MMIO_WINDOW_SIZE, VirtioMem,
    VirtioMemConfig, VirtioMmio,
};
use event_manager::{EventOps, Events, MutEventSubscriber};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use thiserror::Error;
use vmm_sys_util::epoll::EventSet;

/// The QMP id of the (only) virtio-mem device.
pub const VMEM_ID: &str = "vmem0";

/// Errors creating the hot-plug device.
#[derive(Debug, Error)]
pub enum HotplugSetupError {
    /// The device model rejected its configuration.
    #[error("cannot create the virtio-mem device")]
    Device(#[source] devices::virtio::VirtioMemError),
    /// The transport could not be created.
    #[error("cannot create the virtio-mmio transport")]
    Transport(#[source] devices::virtio::MmioError),
    /// KVM wiring failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Bus placement failed.
    #[error(transparent)]
    Devices(#[from] DeviceError),
    /// The region is not usable.
    #[error("hot-plug region {base:#x}+{size:#x} is not a multiple of {SLOT_SIZE:#x}")]
    Region {
        /// Start.
        base: u64,
        /// Size.
        size: u64,
    },
    /// The host cannot provide the backing asked for.
    #[error("hot-plug memory backing")]
    Backing(#[source] crate::memory_backing::BackingError),
    /// No MMIO window left for the device.
    #[error("no virtio-mmio window available")]
    NoWindow,
    /// The region needs more KVM memory slots than KVM allows.
    #[error(
        "a {size_mib} MiB hot-plug region needs {needed} KVM memory slots (one per \
         {slot_mib} MiB after the first {FIRST_HOTPLUG_KVM_SLOT}), but KVM allows {limit}"
    )]
    TooManySlots {
        /// Region size in MiB.
        size_mib: u64,
        /// Slot size in MiB.
        slot_mib: u64,
        /// Memory slots the region needs, counting those below the first hot-plug slot.
        needed: u64,
        /// `KVM_CAP_NR_MEMSLOTS`.
        limit: u64,
    },
}

/// The hot-plug device and its manager.
#[derive(Debug)]
pub struct Hotplug {
    /// Slots, memslots and map swaps.
    pub manager: Arc<MemoryManager>,
    /// The virtio-mem device model.
    pub vmem: Arc<VirtioMem>,
    /// Its virtio-mmio transport.
    pub transport: Arc<VirtioMmio>,
    /// Where the transport's registers are.
    pub mmio_base: u64,
    /// Its GSI.
    pub gsi: u32,
}

impl Hotplug {
    /// Creates virtio-mem over `[base, base + size)`, places its transport
    /// in the first virtio-mmio window and wires its interrupt and queue
    /// notification into KVM. The region is backed as `backing` says, once
    /// the host is checked to provide it.
    pub fn new(
        vm: &Arc<Vm>,
        memory: &SharedMemory,
        devices: &DeviceManager,
        base: u64,
        size: u64,
        backing: MemoryBacking,
    ) -> Result<Self, HotplugSetupError> {
        if size == 0 || size % SLOT_SIZE != 0 || base % SLOT_SIZE != 0 {
            return Err(HotplugSetupError::Region { base, size });
        }
        let needed = u64::from(FIRST_HOTPLUG_KVM_SLOT) + size / SLOT_SIZE;
        let limit = vm.memslot_limit() as u64;
        if needed > limit {
            return Err(HotplugSetupError::TooManySlots {
                size_mib: size >> 20,
                slot_mib: SLOT_SIZE >> 20,
                needed,
                limit,
            });
        }
        backing.check_host().map_err(HotplugSetupError::Backing)?;
        let manager = Arc::new(MemoryManager::new(
            Arc::clone(vm),
            Arc::clone(memory),
            base,
            size,
            VIRTIO_MEM_DEFAULT_BLOCK_SIZE,
            backing,
        ));
        let vmem = Arc::new(
            VirtioMem::new(VirtioMemConfig::new(base, size), manager.clone())
                .map_err(HotplugSetupError::Device)?,
        );
        let gsi = FIRST_VIRTIO_GSI;
        let irq = Arc::new(vm.irq_eventfd(gsi)?);
        let transport =
            Arc::new(VirtioMmio::new(vmem.clone(), irq).map_err(HotplugSetupError::Transport)?);
        let mmio_base = boot::layout::virtio_mmio_base(0).ok_or(HotplugSetupError::NoWindow)?;
        if let Some(evt) = transport.queue_notify_event(0) {
            vm.register_mmio_ioeventfd(evt, mmio_base + QUEUE_NOTIFY_OFFSET)?;
        }
        let range = BusRange::new(mmio_base, VIRTIO_MMIO_WINDOW_SIZE)
            .map_err(|e| HotplugSetupError::Devices(DeviceError::Bus(e)))?;
        devices.add_mmio(range, transport.clone())?;
        Ok(Self {
            manager,
            vmem,
            transport,
            mmio_base,
            gsi,
        })
    }

    /// The DSDT entry for the transport.
    pub fn acpi(&self) -> boot::acpi::VirtioMmioAcpi {
        boot::acpi::VirtioMmioAcpi {
            base: self.mmio_base,
            size: VIRTIO_MMIO_WINDOW_SIZE,
            irq: self.gsi,
        }
    }
}

/// Processes virtio-mem requests on the control thread when the guest
/// notifies the queue, and reports plugged-size changes.
pub struct HotplugWorker {
    hotplug: Arc<Hotplug>,
    memory: SharedMemory,
    on_size_change: Box<dyn FnMut(u64) + Send>,
}

impl std::fmt::Debug for HotplugWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotplugWorker").finish_non_exhaustive()
    }
}

impl HotplugWorker {
    /// A worker calling `on_size_change(new_plugged_size)` after requests
    /// changed the plugged size.
    pub fn new(
        hotplug: Arc<Hotplug>,
        memory: SharedMemory,
        on_size_change: Box<dyn FnMut(u64) + Send>,
    ) -> Self {
        Self {
            hotplug,
            memory,
            on_size_change,
        }
    }

    fn process(&mut self) {
        let g = rcu::read_lock();
        let map = self.memory.read(&g);
        match self.hotplug.transport.process_queue(0, map.memory()) {
            Ok(outcome) => {
                // The transport logged the transition to "needs reset"
                // once; a guest can notify the broken queue without end.
                if outcome.needs_reset {
                    log::debug!("virtio-mem: notification ignored: the device needs a reset");
                }
            }
            Err(e) => log::warn!("virtio-mem: queue processing failed: {e}"),
        }
        drop(g);
        if let Some(size) = self.hotplug.vmem.take_size_change() {
            (self.on_size_change)(size);
        }
    }
}

impl MutEventSubscriber for HotplugWorker {
    fn init(&mut self, ops: &mut EventOps) {
        if let Some(evt) = self.hotplug.transport.queue_notify_event(0)
            && let Err(e) = ops.add(Events::new(evt, EventSet::IN))
        {
            log::error!("cannot watch virtio-mem notifications: {e}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if let Some(evt) = self.hotplug.transport.queue_notify_event(0)
            && events.fd() == evt.as_raw_fd()
        {
            let _ = evt.read();
            self.process();
        }
    }
}
