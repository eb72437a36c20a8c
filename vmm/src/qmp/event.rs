//! QMP events: what they carry, and the [`EventSender`] through which the
//! VM side emits them to every negotiated client.

use super::protocol::Timestamp;
use serde_json::{Map, Value, json};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Why the VM shut down or reset (QEMU's `ShutdownCause`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownCause {
    /// An error outside the guest ended it.
    HostError,
    /// The QMP `quit` command.
    HostQmpQuit,
    /// The QMP `system_reset` command.
    HostQmpSystemReset,
    /// A termination signal.
    HostSignal,
    /// The user, from the console (Ctrl-A x).
    HostUi,
    /// The guest powered off (ACPI or other hardware means).
    GuestShutdown,
    /// The guest reset, which ends the VM here.
    GuestReset,
    /// The guest panicked.
    #[cfg_attr(
        not(any(test, feature = "test-utils")),
        expect(
            dead_code,
            reason = "QEMU's vocabulary, kept whole: this VMM does not report it (yet)"
        )
    )]
    GuestPanic,
}

impl ShutdownCause {
    /// The QEMU name.
    pub fn as_str(self) -> &'static str {
        match self {
            ShutdownCause::HostError => "host-error",
            ShutdownCause::HostQmpQuit => "host-qmp-quit",
            ShutdownCause::HostQmpSystemReset => "host-qmp-system-reset",
            ShutdownCause::HostSignal => "host-signal",
            ShutdownCause::HostUi => "host-ui",
            ShutdownCause::GuestShutdown => "guest-shutdown",
            ShutdownCause::GuestReset => "guest-reset",
            ShutdownCause::GuestPanic => "guest-panic",
        }
    }

    /// Whether the guest asked for it (the events' `guest` member).
    pub fn by_guest(self) -> bool {
        matches!(
            self,
            ShutdownCause::GuestShutdown | ShutdownCause::GuestReset | ShutdownCause::GuestPanic
        )
    }
}

/// An event, with QEMU's names and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpEvent {
    /// `SHUTDOWN {guest, reason}`: the VM is about to end.
    Shutdown(ShutdownCause),
    /// `RESET {guest, reason}`: the VM was reset.
    Reset(ShutdownCause),
    /// `POWERDOWN`: the ACPI power button was pressed.
    Powerdown,
    /// `STOP`: the vCPUs were paused.
    Stop,
    /// `RESUME`: the vCPUs run again.
    Resume,
    /// `MEMORY_DEVICE_SIZE_CHANGE {id, size, qom-path}`: the guest changed
    /// how much of a virtio-mem device it has plugged.
    MemoryDeviceSizeChange {
        /// The device id (`vmem0`).
        id: String,
        /// The plugged size now, in bytes.
        size: u64,
    },
    /// Extension `X_MEMORY_DEVICE_RESIZE_DONE {id, qom-path, size,
    /// requested-size}`: after a `requested-size` write, the plugged size
    /// reached the requested size (once per write).
    MemoryDeviceResizeDone {
        /// The device id.
        id: String,
        /// The plugged size, in bytes (equal to `requested_size`).
        size: u64,
        /// The requested size, in bytes.
        requested_size: u64,
    },
    /// Extension `X_MEMORY_DEVICE_RESIZE_STALLED {id, qom-path, size,
    /// requested-size, reason, message, plugged-ranges, stall-timeout}`: the
    /// plugged size has not got closer to the requested size for the stall
    /// timeout (once per stall).
    MemoryDeviceResizeStalled {
        /// The device id.
        id: String,
        /// The plugged size, in bytes.
        size: u64,
        /// The requested size, in bytes.
        requested_size: u64,
        /// `no-driver`, `device-needs-reset`, `host-busy` or
        /// `guest-no-progress`.
        reason: &'static str,
        /// The reason for people.
        message: String,
        /// When the guest should unplug: the ranges still plugged, as
        /// `(guest address, length)`; empty otherwise.
        plugged_ranges: Vec<(u64, u64)>,
        /// The stall timeout, in milliseconds.
        stall_timeout_ms: u64,
    },
}

impl QmpEvent {
    /// The event name.
    pub fn name(&self) -> &'static str {
        match self {
            QmpEvent::Shutdown(_) => "SHUTDOWN",
            QmpEvent::Reset(_) => "RESET",
            QmpEvent::Powerdown => "POWERDOWN",
            QmpEvent::Stop => "STOP",
            QmpEvent::Resume => "RESUME",
            QmpEvent::MemoryDeviceSizeChange { .. } => "MEMORY_DEVICE_SIZE_CHANGE",
            QmpEvent::MemoryDeviceResizeDone { .. } => "X_MEMORY_DEVICE_RESIZE_DONE",
            QmpEvent::MemoryDeviceResizeStalled { .. } => "X_MEMORY_DEVICE_RESIZE_STALLED",
        }
    }

    /// The `data` member, `None` for events without data (QEMU then omits
    /// the member).
    pub fn data(&self) -> Option<Value> {
        match self {
            QmpEvent::Shutdown(cause) | QmpEvent::Reset(cause) => {
                Some(json!({"guest": cause.by_guest(), "reason": cause.as_str()}))
            }
            QmpEvent::Powerdown | QmpEvent::Stop | QmpEvent::Resume => None,
            QmpEvent::MemoryDeviceSizeChange { id, size } => Some(json!({
                "id": id,
                "size": size,
                "qom-path": super::qom::device_path(id),
            })),
            QmpEvent::MemoryDeviceResizeDone {
                id,
                size,
                requested_size,
            } => Some(json!({
                "id": id,
                "qom-path": super::qom::device_path(id),
                "size": size,
                "requested-size": requested_size,
            })),
            QmpEvent::MemoryDeviceResizeStalled {
                id,
                size,
                requested_size,
                reason,
                message,
                plugged_ranges,
                stall_timeout_ms,
            } => Some(json!({
                "id": id,
                "qom-path": super::qom::device_path(id),
                "size": size,
                "requested-size": requested_size,
                "reason": reason,
                "message": message,
                "plugged-ranges": ranges_json(plugged_ranges),
                "stall-timeout": stall_timeout_ms,
            })),
        }
    }

    /// The whole message: `{"event", "data"?, "timestamp"}`.
    pub(crate) fn to_message(&self, at: Timestamp) -> Value {
        let mut m = Map::new();
        m.insert("event".into(), Value::from(self.name()));
        if let Some(data) = self.data() {
            m.insert("data".into(), data);
        }
        m.insert("timestamp".into(), at.to_json());
        Value::Object(m)
    }
}

/// Guest-physical ranges as `[{"addr": A, "size": S}, ...]`.
pub(crate) fn ranges_json(ranges: &[(u64, u64)]) -> Value {
    ranges
        .iter()
        .map(|&(addr, size)| json!({"addr": addr, "size": size}))
        .collect()
}

/// Events queued and not yet delivered beyond this are dropped (oldest
/// first), so a stalled control loop cannot make senders grow memory.
pub(crate) const MAX_QUEUED_EVENTS: usize = 1024;

/// The queue between [`EventSender`]s and the server, with the eventfd that
/// wakes the server's event loop.
#[derive(Debug)]
pub(crate) struct EventQueue {
    events: Mutex<VecDeque<(QmpEvent, Timestamp)>>,
    wake: EventFd,
}

impl EventQueue {
    pub(crate) fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            events: Mutex::new(VecDeque::new()),
            wake: EventFd::new(EFD_NONBLOCK)?,
        }))
    }

    /// The eventfd that becomes readable when events are queued.
    pub(crate) fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    fn push(&self, event: QmpEvent) {
        let at = Timestamp::now();
        {
            let mut q = self.events.lock().unwrap_or_else(PoisonError::into_inner);
            if q.len() >= MAX_QUEUED_EVENTS {
                log::warn!("QMP event queue full, dropping the oldest event");
                q.pop_front();
            }
            q.push_back((event, at));
        }
        // The counter only saturates after 2^64 - 2 writes without a read;
        // an error here leaves the event queued for the next wake-up.
        if let Err(e) = self.wake.write(1) {
            log::warn!("cannot wake the QMP server: {e}");
        }
    }

    /// Takes every queued event, in the order they were sent.
    pub(crate) fn drain(&self) -> Vec<(QmpEvent, Timestamp)> {
        let _ = self.wake.read();
        let mut q = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        q.drain(..).collect()
    }
}

/// Emits events to every client that has completed capabilities
/// negotiation. Cheap to clone; usable from any thread.
///
/// An event is stamped when [`send`](Self::send) is called and delivered by
/// the server's event loop in send order; clients that connect or negotiate
/// later do not get it.
#[derive(Debug, Clone)]
pub struct EventSender {
    queue: Arc<EventQueue>,
}

impl EventSender {
    pub(crate) fn new(queue: Arc<EventQueue>) -> Self {
        Self { queue }
    }

    /// Queues `event` for delivery. Never blocks on clients.
    pub fn send(&self, event: QmpEvent) {
        self.queue.push(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_shutdown_data_matches_qemu() {
        assert_eq!(
            QmpEvent::Shutdown(ShutdownCause::HostQmpQuit).data(),
            Some(json!({"guest": false, "reason": "host-qmp-quit"}))
        );
        assert_eq!(
            QmpEvent::Shutdown(ShutdownCause::GuestShutdown).data(),
            Some(json!({"guest": true, "reason": "guest-shutdown"}))
        );
        assert_eq!(
            QmpEvent::Reset(ShutdownCause::GuestReset).data(),
            Some(json!({"guest": true, "reason": "guest-reset"}))
        );
    }

    #[test]
    fn test_cause_names_and_guest_flag() {
        let all = [
            (ShutdownCause::HostError, "host-error", false),
            (ShutdownCause::HostQmpQuit, "host-qmp-quit", false),
            (
                ShutdownCause::HostQmpSystemReset,
                "host-qmp-system-reset",
                false,
            ),
            (ShutdownCause::HostSignal, "host-signal", false),
            (ShutdownCause::HostUi, "host-ui", false),
            (ShutdownCause::GuestShutdown, "guest-shutdown", true),
            (ShutdownCause::GuestReset, "guest-reset", true),
            (ShutdownCause::GuestPanic, "guest-panic", true),
        ];
        for (cause, name, guest) in all {
            assert_eq!(cause.as_str(), name);
            assert_eq!(cause.by_guest(), guest);
        }
    }

    #[test]
    fn test_event_without_data_omits_member() {
        let at = Timestamp {
            seconds: 5,
            microseconds: 6,
        };
        assert_eq!(
            QmpEvent::Stop.to_message(at),
            json!({"event": "STOP", "timestamp": {"seconds": 5, "microseconds": 6}})
        );
        for e in [QmpEvent::Powerdown, QmpEvent::Resume] {
            assert!(e.to_message(at).get("data").is_none());
        }
    }

    #[test]
    fn test_memory_device_size_change_message() {
        let at = Timestamp {
            seconds: 1,
            microseconds: 2,
        };
        let e = QmpEvent::MemoryDeviceSizeChange {
            id: "vmem0".into(),
            size: 1 << 30,
        };
        assert_eq!(
            e.to_message(at),
            json!({
                "event": "MEMORY_DEVICE_SIZE_CHANGE",
                "data": {"id": "vmem0", "size": 1u64 << 30, "qom-path": "/machine/peripheral/vmem0"},
                "timestamp": {"seconds": 1, "microseconds": 2}
            })
        );
    }

    #[test]
    fn test_resize_extension_messages() {
        let at = Timestamp {
            seconds: 1,
            microseconds: 2,
        };
        let done = QmpEvent::MemoryDeviceResizeDone {
            id: "vmem0".into(),
            size: 1 << 28,
            requested_size: 1 << 28,
        };
        assert_eq!(
            done.to_message(at),
            json!({
                "event": "X_MEMORY_DEVICE_RESIZE_DONE",
                "data": {"id": "vmem0", "qom-path": "/machine/peripheral/vmem0",
                         "size": 1u64 << 28, "requested-size": 1u64 << 28},
                "timestamp": {"seconds": 1, "microseconds": 2}
            })
        );
        let stalled = QmpEvent::MemoryDeviceResizeStalled {
            id: "vmem0".into(),
            size: 6 << 20,
            requested_size: 0,
            reason: "guest-no-progress",
            message: "m".into(),
            plugged_ranges: vec![(0x1_0000_0000, 2 << 20), (0x1_0080_0000, 4 << 20)],
            stall_timeout_ms: 1500,
        };
        assert_eq!(
            stalled.data(),
            Some(json!({
                "id": "vmem0", "qom-path": "/machine/peripheral/vmem0",
                "size": 6u64 << 20, "requested-size": 0, "reason": "guest-no-progress",
                "message": "m",
                "plugged-ranges": [{"addr": 0x1_0000_0000u64, "size": 2u64 << 20},
                                   {"addr": 0x1_0080_0000u64, "size": 4u64 << 20}],
                "stall-timeout": 1500
            }))
        );
        assert_eq!(stalled.name(), "X_MEMORY_DEVICE_RESIZE_STALLED");
    }

    #[test]
    fn test_sender_queues_in_order_and_wakes() {
        let q = EventQueue::new().unwrap();
        let tx = EventSender::new(q.clone());
        tx.send(QmpEvent::Stop);
        tx.clone().send(QmpEvent::Resume);
        assert_eq!(q.wake_fd().read().unwrap(), 2);
        let names: Vec<&str> = q.drain().iter().map(|(e, _)| e.name()).collect();
        assert_eq!(names, ["STOP", "RESUME"]);
        assert!(q.drain().is_empty());
    }

    #[test]
    fn test_sender_from_another_thread() {
        let q = EventQueue::new().unwrap();
        let tx = EventSender::new(q.clone());
        std::thread::spawn(move || tx.send(QmpEvent::Powerdown))
            .join()
            .unwrap();
        assert_eq!(q.drain().len(), 1);
    }

    #[test]
    fn test_queue_drops_oldest_beyond_limit() {
        let q = EventQueue::new().unwrap();
        let tx = EventSender::new(q.clone());
        tx.send(QmpEvent::Stop);
        for _ in 0..MAX_QUEUED_EVENTS {
            tx.send(QmpEvent::Resume);
        }
        let events = q.drain();
        assert_eq!(events.len(), MAX_QUEUED_EVENTS);
        assert!(events.iter().all(|(e, _)| *e == QmpEvent::Resume));
    }
}
