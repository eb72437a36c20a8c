//! What the QMP server needs from the VM: the [`VmOps`] trait the control
//! side implements (its documentation gives the calling rules), and the
//! plain data it returns.

use super::error::QmpError;

/// The VM's run state, reported by `query-status` with QEMU's `RunState`
/// names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Built, vCPUs not started yet (`prelaunch`).
    #[cfg_attr(
        not(any(test, feature = "test-utils")),
        expect(
            dead_code,
            reason = "QEMU's vocabulary: this VMM starts its vCPUs before the QMP socket opens; FakeVm uses it"
        )
    )]
    Prelaunch,
    /// vCPUs run guest code (`running`).
    Running,
    /// vCPUs are paused by `stop` (`paused`).
    Paused,
    /// The guest powered off or reset and the VM is ending (`shutdown`).
    Shutdown,
    /// A vCPU hit an error the VM cannot recover from (`internal-error`).
    #[cfg_attr(
        not(any(test, feature = "test-utils")),
        expect(
            dead_code,
            reason = "QEMU's vocabulary, kept whole: this VMM does not report it (yet)"
        )
    )]
    InternalError,
    /// The guest reported a panic (`guest-panicked`).
    #[cfg_attr(
        not(any(test, feature = "test-utils")),
        expect(
            dead_code,
            reason = "QEMU's vocabulary, kept whole: this VMM does not report it (yet)"
        )
    )]
    GuestPanicked,
}

impl RunState {
    /// The QEMU `RunState` name.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Prelaunch => "prelaunch",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Shutdown => "shutdown",
            RunState::InternalError => "internal-error",
            RunState::GuestPanicked => "guest-panicked",
        }
    }

    /// Whether `query-status` reports `"running": true`.
    pub fn is_running(self) -> bool {
        self == RunState::Running
    }

    /// States from which `cont` cannot resume the guest (QEMU's
    /// `runstate_needs_reset()`).
    pub fn needs_reset(self) -> bool {
        matches!(
            self,
            RunState::Shutdown | RunState::InternalError | RunState::GuestPanicked
        )
    }
}

/// One vCPU, as `query-cpus-fast` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuInfo {
    /// The vCPU index (0-based, also its APIC ID).
    pub index: u32,
    /// The host thread id (`gettid()`) of the thread that runs it.
    pub thread_id: i64,
}

/// One virtio-mem device, as `query-memory-devices` and `qom-get` report it.
/// All sizes and addresses are in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryDeviceInfo {
    /// The device id clients name it by (`vmem0`); its QOM path is
    /// `/machine/peripheral/<id>`.
    pub id: String,
    /// Guest-physical start of the device's region.
    pub memaddr: u64,
    /// The size the host asked the guest to plug.
    pub requested_size: u64,
    /// The size the guest has plugged now.
    pub size: u64,
    /// The size of the device's region: the most it can ever plug.
    pub max_size: u64,
    /// The plug granularity; `requested_size` is a multiple of it.
    pub block_size: u64,
    /// The NUMA node the memory belongs to.
    pub node: u32,
    /// The QOM path of the memory backend, e.g. `/objects/mem0`.
    pub memdev: String,
}

/// The VM as the QMP server drives it.
///
/// The server calls these methods on the control thread, one at a time,
/// while it handles a client's command (never from another thread, never
/// re-entrantly). A call blocks the control thread's event loop, so every
/// method should return promptly. An implementation must not call back into
/// the [`QmpServer`](super::QmpServer) (it is borrowed for the call); to
/// report something later it sends a [`QmpEvent`](super::QmpEvent) through
/// an [`EventSender`](super::event::EventSender), which is safe from any thread.
/// Events sent during a call reach clients before the command's reply.
///
/// Error descriptions are shown to QMP clients as they are: write them as a
/// sentence fragment without a trailing period, like QEMU's.
pub trait VmOps {
    /// The current run state.
    fn run_state(&self) -> RunState;

    /// Pauses every vCPU; returns once none runs guest code. Called by `stop`
    /// only while [`run_state`](Self::run_state) is `Running`; the server then
    /// sends the `STOP` event. Must not wait forever: an implementation whose
    /// vCPUs do not stop within a deadline leaves the VM running and returns
    /// an error naming them (the server sends no event then).
    fn stop(&mut self) -> Result<(), QmpError>;

    /// Resumes the vCPUs. Called by `cont` only while the state is `Paused`
    /// or `Prelaunch`; the server then sends the `RESUME` event.
    fn cont(&mut self) -> Result<(), QmpError>;

    /// Presses the ACPI power button (the guest may ignore it). The server
    /// then sends the `POWERDOWN` event.
    fn system_powerdown(&mut self) -> Result<(), QmpError>;

    /// Resets the machine. Unless [`reboots_on_reset`](Self::reboots_on_reset),
    /// this ends the VM (like QEMU's `-no-reboot`): the control loop should
    /// stop soon after, and the server sends `SHUTDOWN` with `guest: false,
    /// reason: host-qmp-system-reset`. Otherwise the guest reboots in place
    /// and the VMM sends `RESET` once it did.
    fn system_reset(&mut self) -> Result<(), QmpError>;

    /// Whether [`system_reset`](Self::system_reset) reboots the guest in
    /// place instead of ending the VM (`--on-reset restart`).
    fn reboots_on_reset(&self) -> bool {
        false
    }

    /// Ends the VM: the control loop should stop soon after. The server then
    /// sends `SHUTDOWN` with `guest: false, reason: host-qmp-quit`.
    fn quit(&mut self);

    /// Every vCPU, in index order.
    fn cpus(&self) -> Vec<CpuInfo>;

    /// The boot memory size (`--memory`).
    fn base_memory(&self) -> u64;

    /// Every virtio-mem device (empty without `--hotplug-memory`).
    fn memory_devices(&self) -> Vec<MemoryDeviceInfo>;

    /// Asks the guest to plug or unplug memory until device `id` holds
    /// `size` bytes; returns once the request is recorded (not when the guest
    /// has acted on it). The server calls it only for an `id` that
    /// [`memory_devices`](Self::memory_devices) lists and only with a `size`
    /// that is a multiple of the device's `block_size` and at most its
    /// `max_size`.
    fn set_requested_size(&mut self, id: &str, size: u64) -> Result<(), QmpError>;

    /// The stall timeout of device `id`'s resizes in milliseconds (the
    /// extension property `x-stall-timeout`), or `None` if the device has
    /// none.
    fn stall_timeout_ms(&self, id: &str) -> Option<u64> {
        let _ = id;
        None
    }

    /// Sets the stall timeout of device `id`'s resizes to `ms`
    /// milliseconds; it applies to the resize in progress. The server calls
    /// it only for an `id` that [`memory_devices`](Self::memory_devices)
    /// lists and with `ms` within the accepted range (100 ms to one day).
    fn set_stall_timeout(&mut self, id: &str, ms: u64) -> Result<(), QmpError> {
        let _ = (id, ms);
        Err(super::qom::not_found(super::qom::STALL_TIMEOUT))
    }

    /// The RCU statistics, returned as they are by `x-query-rcu`.
    fn rcu_stats(&self) -> serde_json::Value;

    /// The hot-plug memory manager's state (mapped slots with their host
    /// addresses and KVM slots, counters and timings, and the `resize`
    /// outcome), returned as it is by the extension `x-query-hotplug`.
    /// `null` without hot-plug memory.
    fn hotplug_state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_run_state_names_match_qemu() {
        let names: Vec<&str> = [
            RunState::Prelaunch,
            RunState::Running,
            RunState::Paused,
            RunState::Shutdown,
            RunState::InternalError,
            RunState::GuestPanicked,
        ]
        .iter()
        .map(|s| s.as_str())
        .collect();
        assert_eq!(
            names,
            [
                "prelaunch",
                "running",
                "paused",
                "shutdown",
                "internal-error",
                "guest-panicked"
            ]
        );
    }

    #[test]
    fn test_only_running_is_running() {
        assert!(RunState::Running.is_running());
        assert!(!RunState::Paused.is_running());
        assert!(!RunState::Prelaunch.is_running());
    }

    #[test]
    fn test_needs_reset_matches_qemu_states() {
        assert!(RunState::Shutdown.needs_reset());
        assert!(RunState::InternalError.needs_reset());
        assert!(RunState::GuestPanicked.needs_reset());
        assert!(!RunState::Paused.needs_reset());
        assert!(!RunState::Running.needs_reset());
    }
}
