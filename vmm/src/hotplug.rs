//! The virtio-mem device of a VM: its transport on the MMIO bus, its KVM
//! interrupt and queue-notification eventfds, and the control-thread event
//! source that processes its requests and reports the outcome of resizes.
//!
//! Resize outcomes (module `devices::virtio::mem_progress`): the worker
//! polls the device after each batch of guest requests, after each
//! `requested-size` or stall-timeout write (the QMP side signals
//! [`Hotplug::resize_changed`]), and when its timerfd reaches the stall
//! deadline, so a stall is found at its deadline even if the guest sends
//! nothing, and a completion as soon as the request that completes it is
//! processed.

use crate::device_manager::{DeviceError, DeviceManager, FIRST_VIRTIO_GSI};
use crate::guest_memory::SharedMemory;
use crate::memory_backing::MemoryBacking;
use crate::memory_manager::{FIRST_HOTPLUG_KVM_SLOT, MemoryManager, SLOT_SIZE};
use crate::qmp::Timestamp;
use crate::vm::{Vm, VmError};
use devices::BusRange;
use devices::virtio::{
    DriverView, QUEUE_NOTIFY_OFFSET, ResizeEvent, ResizeReport, VIRTIO_MEM_DEFAULT_BLOCK_SIZE,
    VIRTIO_MMIO_WINDOW_SIZE, VirtioMem, VirtioMemConfig, VirtioMmio,
};
use event_manager::{EventOps, Events, MutEventSubscriber};
use serde_json::{Value, json};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use thiserror::Error;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::timerfd::TimerFd;

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
    /// The eventfd that signals resize changes could not be created.
    #[error("cannot create the resize eventfd")]
    EventFd(#[source] std::io::Error),
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
    /// Signalled when the requested size or the stall timeout changed: the
    /// worker polls the resize outcome.
    resize_changed: EventFd,
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
        let resize_changed = EventFd::new(EFD_NONBLOCK).map_err(HotplugSetupError::EventFd)?;
        Ok(Self {
            manager,
            vmem,
            transport,
            mmio_base,
            gsi,
            resize_changed,
        })
    }

    /// Tells the worker that the requested size or the stall timeout
    /// changed, so it reports a resize that is already done and re-arms the
    /// stall deadline. Call it after
    /// [`VirtioMem::set_requested_size`] and
    /// [`VirtioMem::set_stall_timeout`]; never blocks.
    pub fn resize_changed(&self) {
        // The counter saturates only after 2^64 - 2 writes without a read;
        // the worker then still finds it readable.
        if let Err(e) = self.resize_changed.write(1) {
            log::warn!("cannot signal the virtio-mem resize change: {e}");
        }
    }

    /// What the transport says about the guest's driver.
    pub fn driver_view(&self) -> DriverView {
        DriverView::from_status(self.transport.status())
    }

    /// The resize outcome as `x-query-hotplug` shows it (member `resize`).
    pub fn resize_json(&self) -> Value {
        let view = self.driver_view();
        let r = self.vmem.resize_status(Instant::now(), view);
        let ts = |t: Option<SystemTime>| {
            t.map_or(Value::Null, |t| Timestamp::from_system_time(t).to_json())
        };
        json!({
            "id": VMEM_ID,
            "state": r.state.name(),
            "requested-size": r.requested_size,
            "size": r.plugged_size,
            "stall-timeout": duration_ms(r.stall_timeout),
            "last-request": ts(r.last_request),
            "last-progress": ts(r.last_progress),
            "stalled-since": ts(r.stalled_since),
            "stall-reason": r.stall_reason.as_ref().map(|s| s.name()),
            "stall-message": r.stall_reason.as_ref().map(|s| s.message()),
            "plugged-ranges": crate::qmp::ranges_json(&r.plugged_ranges),
            "driver-ok": view.driver_ok,
            "needs-reset": view.needs_reset,
        })
    }

    /// `x-query-hotplug`'s answer: the memory manager's state with the
    /// resize outcome as member `resize`.
    pub fn state_json(&self) -> Value {
        let mut v = self.manager.state_json();
        if let Value::Object(m) = &mut v {
            m.insert("resize".into(), self.resize_json());
        }
        v
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

/// Milliseconds of `d`, saturated.
fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The QMP event of a resize report from device [`VMEM_ID`].
pub fn resize_event(report: &ResizeReport, stall_timeout: Duration) -> crate::qmp::QmpEvent {
    use crate::qmp::QmpEvent;
    match &report.event {
        ResizeEvent::Done => QmpEvent::MemoryDeviceResizeDone {
            id: VMEM_ID.to_string(),
            size: report.plugged_size,
            requested_size: report.requested_size,
        },
        ResizeEvent::Stalled(reason) => QmpEvent::MemoryDeviceResizeStalled {
            id: VMEM_ID.to_string(),
            size: report.plugged_size,
            requested_size: report.requested_size,
            reason: reason.name(),
            message: reason.message(),
            plugged_ranges: report.plugged_ranges.clone(),
            stall_timeout_ms: duration_ms(stall_timeout),
        },
    }
}

/// What the worker calls with each resize outcome.
pub type ResizeHandler = Box<dyn FnMut(&ResizeReport) + Send>;

/// Processes virtio-mem requests on the control thread when the guest
/// notifies the queue, reports plugged-size changes, and reports resize
/// outcomes (see the module documentation).
pub struct HotplugWorker {
    hotplug: Arc<Hotplug>,
    memory: SharedMemory,
    on_size_change: Box<dyn FnMut(u64) + Send>,
    on_resize: Option<ResizeHandler>,
    /// Fires at the stall deadline; `None` if it could not be created
    /// (stalls are then found only when something else wakes the worker).
    stall_timer: Option<TimerFd>,
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
        let stall_timer = TimerFd::new()
            .map_err(|e| log::error!("virtio-mem: no stall timer ({e}): stalls are found late"))
            .ok();
        Self {
            hotplug,
            memory,
            on_size_change,
            on_resize: None,
            stall_timer,
        }
    }

    /// Calls `handler` with each resize outcome (a done resize, a stall).
    pub fn on_resize(mut self, handler: ResizeHandler) -> Self {
        self.on_resize = Some(handler);
        self
    }

    /// Reports the resize event due now, if any, and arms the stall timer
    /// for the next deadline (or disarms it).
    fn poll_resize(&mut self) {
        let now = Instant::now();
        let poll = self
            .hotplug
            .vmem
            .resize_poll(now, self.hotplug.driver_view());
        if let Some(report) = &poll.report {
            match &report.event {
                ResizeEvent::Done => {
                    log::info!("virtio-mem: resize to {:#x} done", report.requested_size)
                }
                ResizeEvent::Stalled(reason) => log::info!(
                    "virtio-mem: resize to {:#x} stalled at {:#x}: {}",
                    report.requested_size,
                    report.plugged_size,
                    reason.message()
                ),
            }
            if let Some(f) = self.on_resize.as_mut() {
                f(report);
            }
        }
        let Some(timer) = self.stall_timer.as_mut() else {
            return;
        };
        let armed = match poll.next_deadline {
            // At least 1 ns: a zero value would disarm the timer.
            Some(at) => timer.reset(
                at.saturating_duration_since(now)
                    .max(Duration::from_nanos(1)),
                None,
            ),
            None => timer.clear(),
        };
        if let Err(e) = armed {
            log::warn!("virtio-mem: cannot set the stall timer: {e}");
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
        self.poll_resize();
    }
}

impl MutEventSubscriber for HotplugWorker {
    fn init(&mut self, ops: &mut EventOps) {
        if let Some(evt) = self.hotplug.transport.queue_notify_event(0)
            && let Err(e) = ops.add(Events::new(evt, EventSet::IN))
        {
            log::error!("cannot watch virtio-mem notifications: {e}");
        }
        if let Err(e) = ops.add(Events::new(&self.hotplug.resize_changed, EventSet::IN)) {
            log::error!("cannot watch virtio-mem resize changes: {e}");
        }
        if let Some(t) = &self.stall_timer
            && let Err(e) = ops.add(Events::new(t, EventSet::IN))
        {
            log::error!("cannot watch the virtio-mem stall timer: {e}");
        }
        // A requested size set before the loop runs has its deadline too.
        self.poll_resize();
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if let Some(evt) = self.hotplug.transport.queue_notify_event(0)
            && fd == evt.as_raw_fd()
        {
            let _ = evt.read();
            self.process();
        } else if fd == self.hotplug.resize_changed.as_raw_fd() {
            let _ = self.hotplug.resize_changed.read();
            self.poll_resize();
        } else if self
            .stall_timer
            .as_ref()
            .is_some_and(|t| fd == t.as_raw_fd())
        {
            // Not read (the timerfd blocks): poll_resize re-arms or clears
            // it, which makes it unreadable again.
            self.poll_resize();
        }
    }
}
