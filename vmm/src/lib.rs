//! A KVM virtual machine monitor for x86-64 Linux guests whose guest memory
//! map and device buses are published to vCPU threads through RCU.
//!
//! [`run`] is the whole program: build the `Machine` from a [`VmConfig`],
//! run it until the guest powers off, resets, or the user or a signal ends it,
//! then write the reports. The pieces:
//!
//! * `machine`: the assembled VM (`Machine`): built from the
//!   configuration, run until it ends, taken down in order.
//! * `power_on`: the power-on image (RAM as loaded, irqchip and PIT) a
//!   reset (`--on-reset restart`) puts back.
//! * `device_manager`: the devices, their interrupts, and the
//!   RCU-published port-I/O and MMIO buses (replaced copy-on-write by
//!   `add_mmio` / `add_pio`) that guest accesses are dispatched through.
//! * `kvm`: everything that talks to KVM:
//!   * `kvm::dev_kvm`: opening `/dev/kvm`, checking its capabilities.
//!   * `kvm::vm`: the VM object: irqchip, PIT, memory slots, irqfds,
//!     ioeventfds.
//!   * `kvm::vcpu`: vCPU threads; an MMIO or port-I/O exit is handled in
//!     its `handle_exit`, which dispatches it to the buses inside an RCU
//!     read section.
//!   * `kvm::kick`: getting a vCPU thread out of `KVM_RUN`.
//!   * `kvm::vcpu_state`: a vCPU's power-on state, put back on a reset.
//!   * `kvm::kvm_stats`: KVM's binary statistics of a vCPU.
//!   * `kvm::emulation`: `KVM_EXIT_INTERNAL_ERROR`, explained.
//!   * `kvm::guest_pagewalk`: guest page-table walks (the bytes at a
//!     failing RIP).
//!   * `kvm::host`: hardware or emulation-only KVM, and what that means
//!     for guests.
//! * `memory`: guest memory and memory hot-plug:
//!   * `memory::guest_memory`: guest RAM and the RCU-published guest
//!     memory map.
//!   * `memory::memory_manager`: the hot-plug slots; the map is swapped in
//!     `MemoryManager::publish`, retired slots unmapped after a grace
//!     period.
//!   * `memory::memory_backing`: how hot-plugged memory is backed.
//!   * `memory::hotplug_device`: a virtio-mem device wired to the VM, and
//!     the control-thread worker that processes its requests.
//! * `control`: the control thread:
//!   * `control::event_loop`: its event loop, and why the VM stopped.
//!   * `control::vm_controller`: where a QMP command acts on the VM (the
//!     control side's `qmp::VmOps`).
//!   * `control::console`: the serial console on the terminal.
//!   * `control::console_output`: guest console output, buffered by
//!     vCPUs.
//!   * `control::stdout_writer`: that output written to stdout by the
//!     control thread without blocking.
//!   * `control::signals`: termination signals through a signalfd.
//! * `qmp`: the QMP socket: framing, connections, QEMU's errors; a
//!   command lands in `qmp/commands.rs`, which parses it and calls
//!   `qmp::VmOps`.
//! * `report`: what is recorded during the VM's life and written at exit:
//!   * `report::rcu_lifetime`: the RCU lifetime record.
//!   * `report::rcu_plot`: its SVG plot.
//!   * `report::metrics`: the VMM's own costs.
//!   * `report::output`: the JSON reports and the table on stderr.
//!   * `report::report_file`: writing a report file without following
//!     planted links.
//! * `cli`: the command line and stderr:
//!   * `cli::config`: the command line, parsed and checked.
//!   * `cli::size`: sizes as users write them.
//!   * `cli::kernel_cmdline`: what the VMM appends to the kernel command
//!     line.
//!   * `cli::logger`: the stderr logger; `cli::logger::stderr_line`.
//!   * `cli::log_limit`: the per-call-site log budget.
//! * `seccomp`: the system calls each kind of thread may make once the
//!   VM is set up (one filter per thread kind in `seccomp/`).
//! * `test_utils` (feature `test-utils`): the one public door for tests
//!   outside the crate: a `VmOps` that checks how it is called, and the
//!   internals those tests drive (the machine, guest memory, QMP).
//!
//! Only the program's API is public: [`run`], [`VmConfig`] and [`Args`],
//! [`HostKind`], the [`logger`], [`block_termination`] and
//! [`error_chain`]. The modules above are private to the crate, so a build
//! without `test-utils` reports any item nothing uses.
//!
//! # Rule: no blocking I/O inside an RCU read section
//!
//! vCPU threads dispatch every exit inside a read section, and the control
//! thread reads the memory map inside one. A section that blocks holds up
//! every grace period: retired memory slots are never unmapped, and
//! whatever waits for a grace period hangs. So nothing that runs inside a
//! read section may write to stdout, stderr, a pipe or a socket, or wait
//! for another thread without a bound. Guest console output goes into a
//! bounded buffer (`control::console_output`) that the control thread drains to a
//! non-blocking stdout (`control::stdout_writer`); when stdout stops draining, the
//! output is dropped and counted, never waited for. Requests to vCPUs
//! (`stop`, pause, the end of a run) wait at most
//! `kvm::vcpu::ANSWER_DEADLINE` and name the vCPUs that did not answer.

#![deny(missing_docs)]
// `pub` marks what leaves the crate (the program's API here, the tests' in
// `test_utils`); everything else is `pub(crate)`. Checked with the feature on,
// when `test_utils` makes its items reachable.
#![cfg_attr(feature = "test-utils", warn(unreachable_pub))]
// The items `test_utils` re-exports keep the docs written for readers of the
// crate, which link to its private items.
#![cfg_attr(feature = "test-utils", allow(rustdoc::private_intra_doc_links))]

mod cli;
mod control;
mod device_manager;
mod kvm;
mod machine;
mod memory;
mod power_on;
mod qmp;
mod report;
mod seccomp;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

// The program's API: what the `vmm` binary (`main.rs`) uses.
pub use cli::config::{Args, ConfigError, VmConfig};
pub use kvm::host::HostKind;
pub use machine::MachineError;

/// The stderr logger: the binary installs it first ([`init`](logger::init)) and writes its
/// own messages through [`stderr_line`](logger::stderr_line), which never blocks for long and
/// never fails.
pub mod logger {
    pub use crate::cli::logger::{init, stderr_line};
}

pub use control::signals::block_termination;

use machine::Machine;
use std::time::Instant;

/// Formats an error and its chain of causes on one line: `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        // Some layers are transparent wrappers that repeat their cause.
        if !s.ends_with(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = c.source();
    }
    s
}

/// Runs a VM to its end. Returns the process exit status: 0 when the guest
/// powered off or reset or the user quit, 1 on a fatal guest error. Set-up
/// errors are returned as `Err`.
pub fn run(config: VmConfig, start: Instant) -> Result<i32, MachineError> {
    // This thread becomes the control thread. No thread of the VMM reads in
    // membarrier mode, so grace periods never interrupt running vCPUs.
    rcu::set_reader_mode(rcu::ReaderMode::Fenced);
    let mut machine = Machine::build(&config, start)?;
    // Said once, after set-up succeeded (errors stay on one line).
    if let Some(notice) = machine.host().notice() {
        cli::logger::stderr_line(format_args!("{notice}"));
    }
    let outcome = machine.run(machine::RunOptions {
        console: true,
        timeout: None,
        qmp: config.qmp.clone(),
        seccomp: if config.seccomp {
            seccomp::SeccompMode::AllThreads
        } else {
            seccomp::SeccompMode::Off
        },
        console_out: None,
        on_reset: config.on_reset,
    })?;
    let cfg = config;
    let mut status = outcome.reason.exit_code();
    match &outcome.reason {
        control::event_loop::StopReason::Fatal(msg) => {
            cli::logger::stderr_line(format_args!("vmm: {msg}"))
        }
        control::event_loop::StopReason::Signal(sig) => {
            cli::logger::stderr_line(format_args!("vmm: terminating on signal {sig}"))
        }
        control::event_loop::StopReason::Timeout => {
            cli::logger::stderr_line(format_args!("vmm: time limit reached"))
        }
        _ => {}
    }

    if outcome.console_bytes_dropped > 0 {
        cli::logger::stderr_line(format_args!(
            "vmm: {} of {} bytes of guest console output were dropped (stdout did not keep up or failed)",
            outcome.console_bytes_dropped,
            outcome.console_bytes + outcome.console_bytes_dropped,
        ));
    }

    // Every callback queued during the VM's life has run once this returns.
    // Not with a vCPU left behind: it may be inside a read section for good,
    // and no grace period would end.
    let stuck = !outcome.stuck_vcpus.is_empty();
    if stuck {
        cli::logger::stderr_line(format_args!(
            "vmm: not waiting for pending RCU callbacks: a vCPU did not exit"
        ));
    } else {
        rcu::drain_call_rcu();
    }
    let lifetime = outcome
        .lifetime
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .report(Instant::now());
    if let Some(path) = &cfg.rcu_stats
        && let Err(e) = report::output::write_json("RCU statistics", path, &lifetime)
    {
        cli::logger::stderr_line(format_args!("vmm: {}", error_chain(&e)));
        status = status.max(1);
    }
    if let Some(path) = &cfg.rcu_plot
        && let Err(e) = report::rcu_plot::write_plot(path, &lifetime)
    {
        cli::logger::stderr_line(format_args!(
            "vmm: cannot write the RCU plot: {}",
            error_chain(&e)
        ));
        status = status.max(1);
    }
    if let Some(path) = &cfg.metrics {
        let g = rcu::read_lock();
        let m = report::metrics::Metrics::collect(
            machine.marks(),
            &outcome.vcpu_stats,
            machine.memory.read(&g),
        )
        .with_console(outcome.console_bytes, outcome.console_bytes_dropped);
        drop(g);
        if let Err(e) = report::output::write_json("metrics", path, &m) {
            cli::logger::stderr_line(format_args!("vmm: {}", error_chain(&e)));
            status = status.max(1);
        }
    }
    if !cfg.quiet {
        cli::logger::stderr_text(&report::output::lifetime_table(&lifetime));
    }
    if stuck {
        // A vCPU thread left behind may still use guest memory and its
        // devices: never unmap or free them; the process ends right after.
        std::mem::forget(machine);
    }
    Ok(status)
}
