//! `membarrier(2)` with `MEMBARRIER_CMD_PRIVATE_EXPEDITED`: a full memory
//! barrier executed on every CPU currently running a thread of this process.
//!
//! Registration happens once per process. When the kernel lacks the command,
//! or registration fails, [`Membarrier::available`] is `false` and every reader
//! uses real fences instead (see the crate documentation).

use std::sync::atomic::{AtomicU8, Ordering};

const MEMBARRIER_CMD_QUERY: libc::c_int = 0;
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

/// Not yet probed.
const UNKNOWN: u8 = 0;
const AVAILABLE: u8 = 1;
const UNAVAILABLE: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);

/// Set the environment variable of this name (to anything) to make the
/// process behave as if the kernel had no membarrier: all readers then use
/// fences. Read once, at the first registration of a reader.
pub const DISABLE_ENV: &str = "RCU_NO_MEMBARRIER";

fn sys_membarrier(cmd: libc::c_int) -> libc::c_long {
    // SAFETY: membarrier takes two integer arguments and touches no memory of
    // ours; every command used here is valid on any kernel (unknown ones fail
    // with EINVAL, which callers handle).
    unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0 as libc::c_uint) }
}

/// Probes and registers once; returns whether the expedited private barrier
/// may be used from now on. Thread-safe; later calls are one atomic load.
pub(crate) fn init() -> bool {
    match STATE.load(Ordering::Acquire) {
        AVAILABLE => return true,
        UNAVAILABLE => return false,
        _ => {}
    }
    let ok = std::env::var_os(DISABLE_ENV).is_none() && {
        let supported = sys_membarrier(MEMBARRIER_CMD_QUERY);
        supported >= 0
            && (supported & libc::c_long::from(MEMBARRIER_CMD_PRIVATE_EXPEDITED)) != 0
            && sys_membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0
    };
    // Racing initialisers compute the same answer; registering twice is
    // harmless.
    STATE.store(if ok { AVAILABLE } else { UNAVAILABLE }, Ordering::Release);
    ok
}

/// Executes the process-wide barrier. Returns `false` if the syscall failed
/// (the caller then falls back to a local fence, which is only sufficient if
/// no reader relies on the barrier; `init` guarantees that cannot happen
/// after a successful registration, so a failure here is reported upward).
pub(crate) fn barrier() -> bool {
    sys_membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0
}
