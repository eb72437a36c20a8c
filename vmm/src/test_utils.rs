//! The one door for code outside this crate that tests the VMM: the
//! integration tests (`vmm/tests/`), the benchmarks (`vmm/benches/`), the
//! `tests` crate and the fuzz targets (`fuzz/`). Built behind the
//! `test-utils` cargo feature (and for this crate's own unit tests), as
//! `devices` exports its `test_utils`; the `vmm` binary is built without it.
//!
//! Everything else in the crate is `pub(crate)`: an item no code of the
//! crate uses any more is reported as dead code by a build without the
//! feature. An item belongs here only while a test outside the crate uses
//! it; each group below names its users.
//!
//! The program's own API (`run`, `VmConfig`, `Args`, `HostKind`, the
//! logger...) is at the crate root, not here.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test doubles: failing loudly is the point.

mod fake_vm;

/// A [`VmOps`](crate::qmp::VmOps) that checks the calling rules the trait
/// documents and records what it was asked to do. Users: the QMP unit tests
/// (`qmp/commands.rs`, `qmp/server.rs`, `qmp/fuzz_api.rs`), the QMP server
/// integration test (`vmm/tests/qmp_server.rs`) and the `qmp` fuzz target.
pub use fake_vm::FakeVm;

/// A whole VM run in the test's process, without or with a kernel. Users:
/// the `tests` crate (`tests/src/bare_vm.rs`, `tests/src/guest_driver.rs`,
/// every test in `tests/tests/`).
pub use crate::cli::config::{HotplugDeviceConfig, OnReset};
pub use crate::control::event_loop::{QmpStop, StopReason};
pub use crate::machine::{HardwareSpec, Machine, RunOptions, RunOutcome};
pub use crate::seccomp::SeccompMode;

/// Guest memory and memory hot-plug: the published map a test reads guest
/// memory through, the virtio-mem device, and the slot arithmetic tests
/// check KVM's slots and the process's mappings against. Users: the `tests`
/// crate (`bare_vm.rs`, `guest_driver.rs`, `hostile_guest/`,
/// `hotplug_concurrency.rs`, `log_flood.rs`, `stderr_full.rs`),
/// `vmm/tests/bad_input.rs`, `vmm/tests/several_devices.rs` and
/// `vmm/benches/hotplug.rs`.
pub use crate::memory::guest_memory::SharedGuestMap;
pub use crate::memory::hotplug_device::{Hotplug, VMEM_ID};
pub use crate::memory::memory_manager::{FIRST_HOTPLUG_KVM_SLOT, MAX_RETIRED_SLOTS, SLOT_SIZE};

/// KVM's statistics of a vCPU, which tests read to see which exits a guest
/// caused. Users: `tests/tests/kvm_mechanics.rs`,
/// `tests/tests/grace_period_exits.rs`.
pub use crate::kvm::kvm_stats::KvmStats;

/// Whether the calling vCPU thread has been kicked out of the guest (a
/// pause or reset is pending). User: `tests/tests/reset_in_place.rs` (a
/// device that holds an MMIO read until the reset it asked for reaches its
/// vCPU).
pub use crate::kvm::kick::this_vcpu_was_kicked;

/// The label of a bus replacement in the RCU lifetime record. User:
/// `tests/tests/kvm_mechanics.rs`.
pub use crate::device_manager::BUS_LABEL;

/// The guest console output buffer's size. User:
/// `tests/tests/stuck_output.rs`.
pub mod console_output {
    pub use crate::control::console_output::CAPACITY;
}

/// The per-call-site log budget. User: `tests/tests/stderr_full.rs`.
pub mod log_limit {
    pub use crate::cli::log_limit::BURST;
}

/// What the stderr logger dropped. User: `tests/tests/stderr_full.rs`.
pub mod logger {
    pub use crate::cli::logger::dropped_lines;
}

/// The QMP server and what its tests need: the server and the types its
/// [`VmOps`](crate::qmp::VmOps) speaks (users: `vmm/tests/qmp_server.rs`), and the
/// fuzz targets' entry points into its input path (users: `fuzz/src/qmp.rs`).
pub mod qmp {
    pub use crate::qmp::fuzz_api;
    pub use crate::qmp::{
        CpuInfo, MAX_CLIENTS, MAX_MESSAGE_SIZE, MemoryDeviceInfo, QmpError, QmpServer,
        command_names,
    };
}
