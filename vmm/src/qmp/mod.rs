//! A QMP-compatible control socket: QEMU's monitor protocol
//! (`docs/interop/qmp-spec.rst`) on a unix socket, so QEMU tooling (the
//! `qemu.qmp` Python package, `qmp-shell`) can drive this VMM.
//!
//! # Using it
//!
//! The control side implements [`VmOps`], creates a [`QmpServer`] on the
//! socket path and adds it to the control thread's event loop (it is an
//! `event_manager` [`MutEventSubscriber`](event_manager::MutEventSubscriber)).
//! Events flow the other way through an [`EventSender`](event::EventSender); when the loop ends,
//! [`QmpServer::shutdown`] delivers the last replies and events and removes
//! the socket file.
//!
//! # The protocol
//!
//! * On connect the server sends the greeting
//!   `{"QMP": {"version": {...}, "capabilities": []}}`.
//! * Input is a stream of JSON values, not lines (module `json_splitter`
//!   documents framing, error recovery and limits). Every reply and event is one line of compact JSON ending in
//!   `\r\n`.
//! * Until `qmp_capabilities` succeeds, every other command is answered with
//!   `CommandNotFound` "Expecting capabilities negotiation with
//!   'qmp_capabilities'", and no events are sent.
//! * `{"execute": NAME, "arguments": {...}, "id": ANY}` is answered with
//!   `{"return": VALUE, "id": ...}` or
//!   `{"error": {"class": CLASS, "desc": DESC}, "id": ...}`; errors use
//!   QEMU's classes and wording. Input that is not valid JSON is answered
//!   without `id`.
//! * Events: `{"event": NAME, "data": {...}, "timestamp": {"seconds": S,
//!   "microseconds": U}}`, `data` omitted when empty.
//!
//! Commands, with QEMU's names, arguments and return shapes:
//! `qmp_capabilities`, `query-version`, `query-commands`, `query-status`,
//! `query-cpus-fast`, `query-memory-size-summary`, `query-memory-devices`,
//! `qom-get` / `qom-set` (virtio-mem devices, see module `qom`),
//! `stop`, `cont`, `system_powerdown`, `system_reset`, `quit`, and the
//! extensions `x-query-rcu` (the RCU statistics) and `x-query-hotplug`.
//! Extension events `X_MEMORY_DEVICE_RESIZE_DONE` and
//! `X_MEMORY_DEVICE_RESIZE_STALLED` and the property `x-stall-timeout`
//! report resize outcomes (`docs/qmp.md`).
//!
//! # Robustness
//!
//! Nothing a client sends can panic the VMM or stall it: sockets are
//! non-blocking, input and output are bounded per client (module
//! `connection`), malformed input gets an error reply
//! and the connection goes on, and only a message beyond
//! [`connection::MAX_MESSAGE_SIZE`] closes (that client's) connection. A client that
//! does not negotiate within [`NEGOTIATION_DEADLINE`](server::NEGOTIATION_DEADLINE) is disconnected, so
//! idle connections cannot hold the [`server::MAX_CLIENTS`] places; when `accept`
//! fails (out of descriptors), the socket is left alone for a moment
//! instead of waking the loop again at once.

mod args;
mod commands;
mod connection;
mod error;
mod event;
#[cfg(any(test, feature = "test-utils"))]
pub mod fuzz_api;
mod json_splitter;
mod listener;
mod protocol;
mod qom;
mod server;
mod throttle;
mod vm_ops;

#[cfg(any(test, feature = "test-utils"))]
pub use commands::command_names;
#[cfg(any(test, feature = "test-utils"))]
pub use connection::MAX_MESSAGE_SIZE;
pub use error::QmpError;
pub(crate) use event::ranges_json;
pub(crate) use event::{QmpEvent, ShutdownCause};
pub(crate) use protocol::Timestamp;
#[cfg(any(test, feature = "test-utils"))]
pub use server::MAX_CLIENTS;
pub use server::QmpServer;
pub(crate) use server::ServerError;
pub use vm_ops::{CpuInfo, MemoryDeviceInfo};
pub(crate) use vm_ops::{RunState, VmOps};
