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
use crate::kvm::vm::{Vm, VmError};
use crate::memory::guest_memory::SharedGuestMap;
use crate::memory::memory_backing::MemoryBacking;
use crate::memory::memory_manager::{FIRST_HOTPLUG_KVM_SLOT, MemoryManager, SLOT_SIZE};
use crate::qmp::Timestamp;
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

/// The QMP id of the first virtio-mem device unless `id=` names it.
#[cfg(any(test, feature = "test-utils"))]
pub const VMEM_ID: &str = "vmem0";

/// Where and how one virtio-mem device is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HotplugPlacement {
    /// Its position among the devices: its virtio-mmio window and GSI.
    pub index: u32,
    /// Its QMP id.
    pub id: String,
    /// Start of its region (a multiple of [`SLOT_SIZE`]).
    pub base: u64,
    /// Size of its region (a non-zero multiple of [`SLOT_SIZE`]).
    pub size: u64,
    /// How the region is backed.
    pub backing: MemoryBacking,
    /// Its NUMA node (ACPI proximity domain), if the guest is told about
    /// nodes (an SRAT): offered to the guest with `VIRTIO_MEM_F_ACPI_PXM`.
    pub node: Option<u16>,
    /// KVM memory slot number of its first 128 MiB slot; the region uses
    /// `size / SLOT_SIZE` numbers from there.
    pub first_kvm_slot: u32,
}

/// Checks that hot-plug `regions` (ascending) fit KVM: their slots, counted
/// from [`FIRST_HOTPLUG_KVM_SLOT`], within `memslot_limit`
/// (`KVM_CAP_NR_MEMSLOTS`), and their end within `phys_bits` of
/// guest-physical address (CPUID 0x8000_0008 EAX\[7:0\] as KVM reports it;
/// `None`: not reported, not checked).
pub(crate) fn check_regions(
    regions: &[boot::address_plan::GuestRange],
    memslot_limit: u64,
    phys_bits: Option<u32>,
) -> Result<(), HotplugSetupError> {
    let total: u64 = regions.iter().map(|r| r.size).sum();
    let needed = u64::from(FIRST_HOTPLUG_KVM_SLOT) + total.div_ceil(SLOT_SIZE);
    if needed > memslot_limit {
        return Err(HotplugSetupError::TooManySlots {
            size_mib: total >> 20,
            slot_mib: SLOT_SIZE >> 20,
            needed,
            limit: memslot_limit,
        });
    }
    let (Some(bits), Some(last)) = (phys_bits, regions.last()) else {
        return Ok(());
    };
    let limit = 1u64.checked_shl(bits).unwrap_or(u64::MAX);
    if last.end() > limit {
        return Err(HotplugSetupError::BeyondAddressWidth {
            total_mib: total >> 20,
            start: regions.first().map_or(0, |r| r.start),
            end: last.end(),
            bits,
            limit_gib: limit >> 30,
        });
    }
    Ok(())
}

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
    Backing(#[source] crate::memory::memory_backing::BackingError),
    /// No MMIO window left for the device.
    #[error("no virtio-mmio window available")]
    NoWindow,
    /// The eventfd that signals resize changes could not be created.
    #[error("cannot create the resize eventfd")]
    EventFd(#[source] std::io::Error),
    /// The regions end beyond the guest-physical address width.
    #[error(
        "{total_mib} MiB of hot-plug memory at {start:#x}..{end:#x} does not fit below the \
         {limit_gib} GiB guest-physical address limit ({bits} address bits, CPUID \
         0x8000_0008 as KVM reports it)"
    )]
    BeyondAddressWidth {
        /// All regions together, in MiB.
        total_mib: u64,
        /// Start of the first region.
        start: u64,
        /// End (exclusive) of the last region.
        end: u64,
        /// The guest-physical address width.
        bits: u32,
        /// `2^bits` in GiB.
        limit_gib: u64,
    },
    /// The regions need more KVM memory slots than KVM allows.
    #[error(
        "a {size_mib} MiB hot-plug region needs {needed} KVM memory slots (one per \
         {slot_mib} MiB after the first {FIRST_HOTPLUG_KVM_SLOT}), but KVM allows {limit}"
    )]
    TooManySlots {
        /// Region size in MiB (all regions together).
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
    /// Its QMP id.
    pub id: String,
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
    /// Creates virtio-mem as `p` places it, puts its transport in
    /// virtio-mmio window `p.index` with GSI [`FIRST_VIRTIO_GSI`]` +
    /// p.index`, and wires its interrupt and queue notification into KVM.
    /// The region is backed as `p.backing` says, once the host is checked to
    /// provide it. The caller checks the KVM budget of all regions first
    /// ([`check_regions`]).
    pub fn new(
        vm: &Arc<Vm>,
        memory: &SharedGuestMap,
        devices: &DeviceManager,
        p: HotplugPlacement,
    ) -> Result<Self, HotplugSetupError> {
        let (base, size) = (p.base, p.size);
        if size == 0 || size % SLOT_SIZE != 0 || base % SLOT_SIZE != 0 {
            return Err(HotplugSetupError::Region { base, size });
        }
        let needed = u64::from(p.first_kvm_slot) + size / SLOT_SIZE;
        let limit = vm.memslot_limit() as u64;
        if needed > limit {
            return Err(HotplugSetupError::TooManySlots {
                size_mib: size >> 20,
                slot_mib: SLOT_SIZE >> 20,
                needed,
                limit,
            });
        }
        p.backing.check_host().map_err(HotplugSetupError::Backing)?;
        let manager = Arc::new(
            MemoryManager::new(
                Arc::clone(vm),
                Arc::clone(memory),
                base,
                size,
                VIRTIO_MEM_DEFAULT_BLOCK_SIZE,
                p.backing,
            )
            .with_first_kvm_slot(p.first_kvm_slot),
        );
        let config = VirtioMemConfig {
            node_id: p.node.unwrap_or(0),
            acpi_pxm: p.node.is_some(),
            ..VirtioMemConfig::new(base, size)
        };
        let vmem =
            Arc::new(VirtioMem::new(config, manager.clone()).map_err(HotplugSetupError::Device)?);
        let gsi = FIRST_VIRTIO_GSI + p.index;
        let irq = Arc::new(vm.irq_eventfd(gsi)?);
        let transport =
            Arc::new(VirtioMmio::new(vmem.clone(), irq).map_err(HotplugSetupError::Transport)?);
        let mmio_base =
            boot::address_plan::virtio_mmio_base(p.index).ok_or(HotplugSetupError::NoWindow)?;
        if let Some(evt) = transport.queue_notify_event(0) {
            vm.register_mmio_ioeventfd(evt, mmio_base + QUEUE_NOTIFY_OFFSET)?;
        }
        let range = BusRange::new(mmio_base, VIRTIO_MMIO_WINDOW_SIZE)
            .map_err(|e| HotplugSetupError::Devices(DeviceError::Bus(e)))?;
        devices.add_mmio(range, transport.clone())?;
        let resize_changed = EventFd::new(EFD_NONBLOCK).map_err(HotplugSetupError::EventFd)?;
        Ok(Self {
            id: p.id,
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
            "id": self.id,
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

    /// This device's part of `x-query-hotplug`: its id, the memory
    /// manager's state, and the resize outcome as member `resize`.
    pub fn state_json(&self) -> Value {
        let mut v = self.manager.state_json();
        if let Value::Object(m) = &mut v {
            m.insert("id".into(), Value::from(self.id.as_str()));
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

/// The QMP event of a resize report from device `id`.
pub(crate) fn resize_event(
    id: &str,
    report: &ResizeReport,
    stall_timeout: Duration,
) -> crate::qmp::QmpEvent {
    use crate::qmp::QmpEvent;
    match &report.event {
        ResizeEvent::Done => QmpEvent::MemoryDeviceResizeDone {
            id: id.to_string(),
            size: report.plugged_size,
            requested_size: report.requested_size,
        },
        ResizeEvent::Stalled(reason) => QmpEvent::MemoryDeviceResizeStalled {
            id: id.to_string(),
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
pub(crate) type ResizeHandler = Box<dyn FnMut(&ResizeReport) + Send>;

/// Processes virtio-mem requests on the control thread when the guest
/// notifies the queue, reports plugged-size changes, and reports resize
/// outcomes (see the module documentation).
pub(crate) struct HotplugWorker {
    hotplug: Arc<Hotplug>,
    memory: SharedGuestMap,
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
    pub(crate) fn new(
        hotplug: Arc<Hotplug>,
        memory: SharedGuestMap,
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
    pub(crate) fn on_resize(mut self, handler: ResizeHandler) -> Self {
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
                ResizeEvent::Done => log::info!(
                    "virtio-mem {}: resize to {:#x} done",
                    self.hotplug.id,
                    report.requested_size
                ),
                ResizeEvent::Stalled(reason) => log::info!(
                    "virtio-mem {}: resize to {:#x} stalled at {:#x}: {}",
                    self.hotplug.id,
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

#[cfg(test)]
mod tests {
    use super::*;
    use boot::address_plan::GuestRange;

    const GIB: u64 = 1 << 30;

    /// The address width KVM reports on this host.
    fn kvm_phys_bits() -> u32 {
        let kvm = kvm_ioctls::Kvm::new().expect("these tests need /dev/kvm");
        let cpuid = boot::cpu::cpuid::supported_cpuid(&kvm).unwrap();
        boot::cpu::cpuid::phys_addr_bits(cpuid.as_slice()).expect("KVM reports 0x8000_0008")
    }

    #[test]
    fn regions_up_to_the_address_width_fit_and_beyond_it_are_refused() {
        let bits = kvm_phys_bits();
        let top = 1u64 << bits;
        // Two regions, the second ending exactly at 2^bits: fits.
        let fit = [
            GuestRange {
                start: 4 * GIB,
                size: GIB,
            },
            GuestRange {
                start: top - 2 * GIB,
                size: 2 * GIB,
            },
        ];
        check_regions(&fit, u64::MAX, Some(bits)).unwrap();
        // One 128 MiB slot more: refused, naming sizes and the limit.
        let beyond = [
            fit[0],
            GuestRange {
                start: top - 2 * GIB,
                size: 2 * GIB + SLOT_SIZE,
            },
        ];
        let e = check_regions(&beyond, u64::MAX, Some(bits)).unwrap_err();
        assert!(matches!(e, HotplugSetupError::BeyondAddressWidth { .. }));
        assert_eq!(
            e.to_string(),
            format!(
                "3200 MiB of hot-plug memory at {:#x}..{:#x} does not fit below the {} GiB \
                 guest-physical address limit ({bits} address bits, CPUID 0x8000_0008 as KVM \
                 reports it)",
                4 * GIB,
                top + SLOT_SIZE,
                top >> 30
            )
        );
    }

    #[test]
    fn the_memslot_budget_covers_the_sum_of_all_regions() {
        let two = [
            GuestRange {
                start: 4 * GIB,
                size: GIB,
            },
            GuestRange {
                start: 5 * GIB,
                size: GIB,
            },
        ];
        // 16 slots below the first hot-plug one, then 8 + 8 slots of 128 MiB.
        let needed = u64::from(FIRST_HOTPLUG_KVM_SLOT) + 16;
        check_regions(&two, needed, None).unwrap();
        let e = check_regions(&two, needed - 1, None).unwrap_err();
        assert!(
            matches!(e, HotplugSetupError::TooManySlots { needed: n, size_mib: 2048, .. } if n == needed),
            "{e}"
        );
        // Each region alone would fit.
        check_regions(&two[..1], needed - 1, None).unwrap();
    }
}
