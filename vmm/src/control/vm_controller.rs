//! What QMP commands do to the VM: the control side's implementation of
//! [`VmOps`], on the control thread.

use crate::cli::config::OnReset;
use crate::control::event_loop::{QmpStop, StopReason, StopSlot, set_stop};
use crate::kvm::vcpu::{ANSWER_DEADLINE, VcpuHandle, pause_all};
use crate::memory::hotplug_device::Hotplug;
use crate::qmp::{CpuInfo, MemoryDeviceInfo, QmpError, RunState, VmOps};
use devices::Ged;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// The VM as QMP sees it.
pub(crate) struct VmController {
    /// The vCPUs, set once they run (QMP starts listening before).
    pub vcpus: Arc<OnceLock<Arc<[VcpuHandle]>>>,
    state: RunState,
    ged: Arc<Ged>,
    stop: StopSlot,
    hotplug: Vec<Arc<Hotplug>>,
    base_memory: u64,
    rcu_report: Box<dyn Fn() -> serde_json::Value + Send>,
    on_reset: OnReset,
    /// Set while `stop` has the VM paused (read by the machine's reset).
    paused: Arc<AtomicBool>,
}

impl std::fmt::Debug for VmController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmController")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl VmController {
    /// A controller; `rcu_report` produces `x-query-rcu`'s answer.
    pub(crate) fn new(
        vcpus: Arc<OnceLock<Arc<[VcpuHandle]>>>,
        ged: Arc<Ged>,
        stop: StopSlot,
        hotplug: Vec<Arc<Hotplug>>,
        base_memory: u64,
        rcu_report: Box<dyn Fn() -> serde_json::Value + Send>,
    ) -> Self {
        Self {
            vcpus,
            state: RunState::Running,
            ged,
            stop,
            hotplug,
            base_memory,
            rcu_report,
            on_reset: OnReset::Exit,
            paused: Arc::new(AtomicBool::new(false)),
        }
    }

    /// What `system_reset` does (`--on-reset`; [`OnReset::Exit`] unless
    /// set), and the flag this controller keeps set while a client has the
    /// VM paused (a reset leaves a paused VM paused).
    pub(crate) fn with_reset(mut self, on_reset: OnReset, paused: Arc<AtomicBool>) -> Self {
        self.on_reset = on_reset;
        self.paused = paused;
        self
    }

    fn device(&self, id: &str) -> Option<&Arc<Hotplug>> {
        self.hotplug.iter().find(|h| h.id == id)
    }

    fn each_vcpu(&self, f: impl Fn(&VcpuHandle)) {
        if let Some(v) = self.vcpus.get() {
            v.iter().for_each(f);
        }
    }
}

impl VmOps for VmController {
    fn run_state(&self) -> RunState {
        if self
            .stop
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some()
        {
            RunState::Shutdown
        } else {
            self.state
        }
    }

    /// Pauses every vCPU, waiting at most [`ANSWER_DEADLINE`] for them to
    /// park; if one does not, the VM is left running and the error names it.
    fn stop(&mut self) -> Result<(), QmpError> {
        if let Some(v) = self.vcpus.get() {
            pause_all(v, ANSWER_DEADLINE).map_err(|e| {
                log::warn!("QMP stop: {e}");
                QmpError::generic(format!("{e}; the VM keeps running"))
            })?;
        }
        self.state = RunState::Paused;
        self.paused.store(true, Ordering::Release);
        Ok(())
    }

    fn cont(&mut self) -> Result<(), QmpError> {
        self.paused.store(false, Ordering::Release);
        self.each_vcpu(VcpuHandle::resume);
        self.state = RunState::Running;
        Ok(())
    }

    fn system_powerdown(&mut self) -> Result<(), QmpError> {
        self.ged
            .power_button()
            .map_err(|e| QmpError::generic(format!("cannot press the power button: {e}")))
    }

    /// Asks the control loop to reset the machine: it reboots the guest in
    /// place (`--on-reset restart`, then sends `RESET`) or ends the VM.
    fn system_reset(&mut self) -> Result<(), QmpError> {
        set_stop(&self.stop, StopReason::Qmp(QmpStop::SystemReset));
        Ok(())
    }

    fn reboots_on_reset(&self) -> bool {
        self.on_reset == OnReset::Restart
    }

    fn quit(&mut self) {
        set_stop(&self.stop, StopReason::Qmp(QmpStop::Quit));
    }

    fn cpus(&self) -> Vec<CpuInfo> {
        self.vcpus.get().map_or_else(Vec::new, |v| {
            v.iter()
                .map(|c| CpuInfo {
                    index: c.index(),
                    thread_id: c.thread_id(),
                })
                .collect()
        })
    }

    fn base_memory(&self) -> u64 {
        self.base_memory
    }

    fn memory_devices(&self) -> Vec<MemoryDeviceInfo> {
        self.hotplug
            .iter()
            .map(|h| {
                let i = h.vmem.info();
                MemoryDeviceInfo {
                    id: h.id.clone(),
                    memaddr: i.addr,
                    requested_size: i.requested_size,
                    size: i.plugged_size,
                    max_size: i.region_size,
                    block_size: i.block_size,
                    node: u32::from(i.node_id),
                    memdev: format!("/objects/{}-memdev", h.id),
                }
            })
            .collect()
    }

    fn set_requested_size(&mut self, id: &str, size: u64) -> Result<(), QmpError> {
        match self.device(id) {
            Some(h) => {
                let set = h.vmem.set_requested_size(size);
                // Also after an interrupt failure: the new size is set.
                h.resize_changed();
                set.map_err(|e| QmpError::generic(e.to_string()))
            }
            _ => Err(QmpError::device_not_found(format!(
                "Device '{id}' not found"
            ))),
        }
    }

    fn stall_timeout_ms(&self, id: &str) -> Option<u64> {
        self.device(id)
            .map(|h| u64::try_from(h.vmem.stall_timeout().as_millis()).unwrap_or(u64::MAX))
    }

    fn set_stall_timeout(&mut self, id: &str, ms: u64) -> Result<(), QmpError> {
        match self.device(id) {
            Some(h) => {
                h.vmem
                    .set_stall_timeout(std::time::Duration::from_millis(ms));
                h.resize_changed();
                Ok(())
            }
            _ => Err(QmpError::device_not_found(format!(
                "Device '{id}' not found"
            ))),
        }
    }

    fn rcu_stats(&self) -> serde_json::Value {
        (self.rcu_report)()
    }

    /// The first device's state at the top level (as with one device),
    /// plus member `devices`: every device's state, in order, each with its
    /// `id`.
    fn hotplug_state(&self) -> serde_json::Value {
        let Some(first) = self.hotplug.first() else {
            return serde_json::Value::Null;
        };
        let mut v = first.state_json();
        if let serde_json::Value::Object(m) = &mut v {
            let all: Vec<serde_json::Value> = self.hotplug.iter().map(|h| h.state_json()).collect();
            m.insert("devices".into(), serde_json::Value::from(all));
        }
        v
    }
}
