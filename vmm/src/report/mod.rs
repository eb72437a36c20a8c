//! What the VMM records during the VM's life and writes when it ends: the
//! RCU lifetime record (the RCU core's counters over time, with markers at
//! boot, each plug and unplug, and the end), its SVG plot, the VMM's own
//! costs, and how each report reaches the path the user named.
//!
//! * [`rcu_lifetime`]: the RCU lifetime record of one VM, sampled by the
//!   control thread.
//! * [`rcu_plot`]: the record drawn as an SVG chart (`--rcu-plot`).
//! * [`metrics`]: the VMM's own costs: set-up time, CPU time outside
//!   `KVM_RUN`, exits, memory (`--metrics`).
//! * [`output`]: the reports written and printed at exit: JSON files
//!   (`--rcu-stats`, `--metrics`) and the table on stderr.
//! * [`report_file`]: writing a report file in place without following a
//!   link someone else planted.

pub(crate) mod metrics;
pub(crate) mod output;
pub(crate) mod rcu_lifetime;
pub(crate) mod rcu_plot;
pub(crate) mod report_file;
