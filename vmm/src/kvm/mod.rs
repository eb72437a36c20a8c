//! Everything that talks to KVM for the VM and its vCPUs: opening
//! `/dev/kvm`, the VM object with its memory slots, irqfds and ioeventfds,
//! the vCPU threads that run `KVM_RUN` and dispatch each exit (port I/O and
//! MMIO through the RCU-published buses of `device_manager`), getting a vCPU
//! out of `KVM_RUN`, its power-on state for a reset, KVM's own counters, and
//! what to do on hosts whose KVM emulates guest kernel code.
//!
//! * [`dev_kvm`]: opening `/dev/kvm` and checking the API version and the
//!   capabilities the VMM needs.
//! * [`vm`]: the KVM VM object: in-kernel irqchip and PIT, memory slots,
//!   irqfds, ioeventfds.
//! * [`vcpu`]: vCPU threads: the run loop, exit handling (`handle_exit`:
//!   port I/O and MMIO exits land here), pause / resume / stop / reset.
//! * [`kick`]: the signal that gets a vCPU thread out of `KVM_RUN` without
//!   losing a kick.
//! * [`vcpu_state`]: a vCPU's power-on state, captured before its first
//!   `KVM_RUN` and put back on a reset.
//! * `kvm_stats` (tests only): KVM's binary statistics of a vCPU (`KVM_GET_STATS_FD`).
//! * [`emulation`]: `KVM_EXIT_INTERNAL_ERROR`, explained (and `int3`
//!   completed).
//! * [`triple_fault`]: the vCPU's state at a triple fault, logged with the
//!   reset it causes.
//! * [`guest_pagewalk`]: a guest linear address to a guest-physical one, by
//!   walking the guest's page tables (to show the bytes at a failing RIP).
//! * [`host`]: what kind of KVM this host has (hardware or emulation only)
//!   and the kernel arguments that follow from it.

pub(crate) mod dev_kvm;
pub(crate) mod emulation;
pub(crate) mod guest_pagewalk;
pub(crate) mod host;
pub(crate) mod kick;
#[cfg(any(test, feature = "test-utils"))]
pub(crate) mod kvm_stats;
pub(crate) mod triple_fault;
pub(crate) mod vcpu;
pub(crate) mod vcpu_state;
pub(crate) mod vm;
