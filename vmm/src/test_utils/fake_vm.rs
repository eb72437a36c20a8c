//! [`FakeVm`]: a VM for QMP tests that checks how it is called.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Value, json};

use crate::qmp::{CpuInfo, MemoryDeviceInfo, QmpError, RunState, VmOps};

/// The stall timeouts `set_stall_timeout` may be called with (ms): 100 ms to
/// one day, the device's limits.
const STALL_TIMEOUT_RANGE: std::ops::RangeInclusive<u64> = {
    use devices::virtio::mem_progress::{MAX_STALL_TIMEOUT, MIN_STALL_TIMEOUT};
    (MIN_STALL_TIMEOUT.as_millis() as u64)..=(MAX_STALL_TIMEOUT.as_millis() as u64)
};

/// A VM that keeps its state in plain fields, records every operation it is
/// asked to do, and panics when it is called against the [`VmOps`] calling
/// rules:
/// - `stop` only while `Running`, `cont` only while `Paused` or
///   `Prelaunch`;
/// - `set_requested_size` only for a listed device, with a size that is a
///   multiple of its block size and at most its region;
/// - `set_stall_timeout` only for a listed device, within 100 ms to a day.
///
/// State changes as a VM's would: `stop` pauses, `cont` resumes,
/// `system_reset` (which ends a VM that does not reboot on reset) and `quit`
/// go to `Shutdown` and set [`ended`](Self::ended). A refused operation
/// ([`fail`](Self::fail)) is recorded and changes nothing.
///
/// The fields are public so that a test sets up the case it needs (another
/// state, no devices, a refusal) and reads what happened.
#[derive(Debug)]
pub struct FakeVm {
    /// The run state `run_state` reports.
    pub state: RunState,
    /// What the VM was asked to do, in order: the operation's name, with its
    /// arguments for `set_requested_size` (`"set_requested_size vmem0
    /// 0x40000000"`) and `set_stall_timeout` (`"set_stall_timeout vmem0
    /// 1500"`). Refused operations are recorded too.
    pub calls: Vec<String>,
    /// The virtio-mem devices `memory_devices` lists.
    pub devices: Vec<MemoryDeviceInfo>,
    /// When set, every operation that can fail returns this error (and
    /// changes nothing).
    pub fail: Option<QmpError>,
    /// What `stall_timeout_ms` answers for a listed device.
    pub stall_timeout_ms: u64,
    /// What `cpus` answers.
    pub cpus: Vec<CpuInfo>,
    /// What `base_memory` answers.
    pub base_memory: u64,
    /// What `rcu_stats` answers.
    pub rcu_stats: Value,
    /// Whether the "guest" plugs what `set_requested_size` asks at once
    /// (the device's `size` follows `requested_size`).
    pub guest_plugs_at_once: bool,
    /// Set when the VM ends (`quit`, or `system_reset`): a test's event loop
    /// stops on it as the control loop would.
    pub ended: Arc<AtomicBool>,
}

impl FakeVm {
    /// A running VM with two vCPUs (thread ids 1000 and 1001), 512 MiB of
    /// boot memory, and one virtio-mem device `vmem0`: a 4 GiB region at
    /// 4 GiB in 2 MiB blocks with 128 MiB plugged and nothing requested.
    pub fn new() -> Self {
        Self {
            state: RunState::Running,
            calls: Vec::new(),
            devices: vec![MemoryDeviceInfo {
                id: "vmem0".into(),
                memaddr: 0x1_0000_0000,
                requested_size: 0,
                size: 0x800_0000,
                max_size: 0x1_0000_0000,
                block_size: 0x20_0000,
                node: 0,
                memdev: "/objects/mem0".into(),
            }],
            fail: None,
            stall_timeout_ms: 10_000,
            cpus: vec![
                CpuInfo {
                    index: 0,
                    thread_id: 1000,
                },
                CpuInfo {
                    index: 1,
                    thread_id: 1001,
                },
            ],
            base_memory: 512 << 20,
            rcu_stats: json!({"call_rcu": 42}),
            guest_plugs_at_once: false,
            ended: Arc::new(AtomicBool::new(false)),
        }
    }

    fn act(&mut self, what: String) -> Result<(), QmpError> {
        self.calls.push(what);
        match self.fail.clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn device(&self, op: &str, id: &str) -> &MemoryDeviceInfo {
        self.devices
            .iter()
            .find(|d| d.id == id)
            .unwrap_or_else(|| panic!("{op} for unknown device {id:?}"))
    }

    fn end(&mut self) {
        self.state = RunState::Shutdown;
        self.ended.store(true, Ordering::SeqCst);
    }
}

impl Default for FakeVm {
    fn default() -> Self {
        Self::new()
    }
}

impl VmOps for FakeVm {
    fn run_state(&self) -> RunState {
        self.state
    }

    fn stop(&mut self) -> Result<(), QmpError> {
        assert_eq!(
            self.state,
            RunState::Running,
            "stop called while not running"
        );
        self.act("stop".into())?;
        self.state = RunState::Paused;
        Ok(())
    }

    fn cont(&mut self) -> Result<(), QmpError> {
        assert!(
            matches!(self.state, RunState::Paused | RunState::Prelaunch),
            "cont called in state {:?}",
            self.state
        );
        self.act("cont".into())?;
        self.state = RunState::Running;
        Ok(())
    }

    fn system_powerdown(&mut self) -> Result<(), QmpError> {
        self.act("system_powerdown".into())
    }

    fn system_reset(&mut self) -> Result<(), QmpError> {
        self.act("system_reset".into())?;
        self.end();
        Ok(())
    }

    fn quit(&mut self) {
        self.calls.push("quit".into());
        self.end();
    }

    fn cpus(&self) -> Vec<CpuInfo> {
        self.cpus.clone()
    }

    fn base_memory(&self) -> u64 {
        self.base_memory
    }

    fn memory_devices(&self) -> Vec<MemoryDeviceInfo> {
        self.devices.clone()
    }

    fn set_requested_size(&mut self, id: &str, size: u64) -> Result<(), QmpError> {
        let device = self.device("set_requested_size", id);
        assert_eq!(size % device.block_size, 0, "unaligned size {size:#x}");
        assert!(size <= device.max_size, "size {size:#x} beyond the region");
        self.act(format!("set_requested_size {id} {size:#x}"))?;
        let at_once = self.guest_plugs_at_once;
        if let Some(d) = self.devices.iter_mut().find(|d| d.id == id) {
            d.requested_size = size;
            if at_once {
                d.size = size;
            }
        }
        Ok(())
    }

    fn stall_timeout_ms(&self, id: &str) -> Option<u64> {
        self.devices
            .iter()
            .any(|d| d.id == id)
            .then_some(self.stall_timeout_ms)
    }

    fn set_stall_timeout(&mut self, id: &str, ms: u64) -> Result<(), QmpError> {
        self.device("set_stall_timeout", id);
        assert!(
            STALL_TIMEOUT_RANGE.contains(&ms),
            "stall timeout {ms} ms out of range"
        );
        self.act(format!("set_stall_timeout {id} {ms}"))?;
        self.stall_timeout_ms = ms;
        Ok(())
    }

    fn rcu_stats(&self) -> Value {
        self.rcu_stats.clone()
    }
}
