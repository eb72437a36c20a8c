//! The call_rcu thread's allow-list: waiting for work and for readers, the
//! grace period's barrier, and what the callbacks do, which is dropping
//! things: old guest memory maps (unmapping hot-unplugged slots, in the
//! common list) and old bus tables.

use super::allow_list::{AllowList, arg_eq};
use seccompiler::BackendError;

/// `MEMBARRIER_CMD_PRIVATE_EXPEDITED` from `linux/membarrier.h`.
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: u64 = 1 << 3;

/// Adds the call_rcu thread's own calls to `list`.
pub(crate) fn allow(list: &mut AllowList) -> Result<(), BackendError> {
    // A grace period issues the process-wide barrier when some registered
    // reader reads in membarrier mode (the VMM's threads read fenced, so
    // normally it never does). Registration happened in set-up; only the
    // barrier command itself is allowed.
    list.when(
        libc::SYS_membarrier,
        vec![arg_eq(0, MEMBARRIER_CMD_PRIVATE_EXPEDITED)?],
    )?;
    // The rest is in the common list: `futex` (its wake-up event or
    // semaphore, with timeouts for lazy polls, and the grace-period event),
    // `sched_yield` (spinning for readers), `munmap` and `madvise` (freed
    // maps), `close` (a freed object's descriptor), `write` (a panicking
    // callback's message).
    Ok(())
}
