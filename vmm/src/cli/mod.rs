//! The VMM's command-line interface: the command line parsed and checked
//! into a [`VmConfig`](crate::VmConfig) before any KVM object exists, the
//! sizes users write, what the VMM adds to the guest's kernel command line,
//! and everything the VMM prints on stderr (the logger and its per-call-site
//! rate limit).
//!
//! * [`config`]: the command line ([`Args`](crate::Args)), parsed and
//!   checked, as plain data ([`VmConfig`](crate::VmConfig)).
//! * [`size`]: sizes as users write them (`512M`, `4G`).
//! * [`kernel_cmdline`]: what the VMM appends to the user's kernel command
//!   line.
//! * [`logger`]: the stderr logger (`VMM_LOG`) and [`logger::stderr_line`],
//!   which never blocks or fails.
//! * [`log_limit`]: the per-call-site budget for log messages.

pub(crate) mod config;
pub(crate) mod kernel_cmdline;
pub(crate) mod log_limit;
pub(crate) mod logger;
pub(crate) mod size;
