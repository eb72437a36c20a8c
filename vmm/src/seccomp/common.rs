//! What every thread of the VMM needs after set-up, whatever its job: the
//! system calls Rust's standard library, glibc and the allocator make on
//! their own (memory, locks, time, signals, thread exit, resuming an
//! interrupted wait, aborting), and writing a message to stderr.

use super::allow_list::{AllowList, arg_eq, arg_masked_eq};
use seccompiler::BackendError;

/// The bits of a `futex` operation other than the two flags glibc and std
/// may add (private, realtime clock): the command, and any other flag.
const FUTEX_CMD_MASK: u64 = !(libc::FUTEX_PRIVATE_FLAG | libc::FUTEX_CLOCK_REALTIME) as u32 as u64;

/// Adds the calls every thread kind needs to `list`.
pub(crate) fn allow(list: &mut AllowList) -> Result<(), BackendError> {
    list.any(&[
        // The allocator: glibc's heap (brk), per-thread arenas and large
        // blocks (mmap, munmap, mremap); dropping guest memory maps.
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        // Logging and panic messages go to stderr; eventfds are written to
        // wake other threads. (Which descriptor is not checked: devices
        // create their eventfds in set-up and the set changes with them.)
        libc::SYS_write,
        // Dropping a descriptor (a vCPU's own fd when its thread ends, a
        // QMP connection, an object freed by an RCU callback).
        libc::SYS_close,
        // `Instant::now()` when the vDSO cannot answer; thread CPU clocks
        // (statistics) always make the call.
        libc::SYS_clock_gettime,
        // Spinning waits (the RCU grace period) yield.
        libc::SYS_sched_yield,
        // std's HashMap seeds its hasher per thread on first use.
        libc::SYS_getrandom,
        libc::SYS_gettid,
        // Returning from a signal handler (the vCPU kick).
        libc::SYS_rt_sigreturn,
        // glibc blocks signals around `pthread_kill` and while a thread
        // exits.
        libc::SYS_rt_sigprocmask,
        // A thread's end: Rust frees its alternate signal stack, glibc
        // returns its stack (madvise, below), then the thread exits.
        libc::SYS_sigaltstack,
        libc::SYS_exit,
        // The kernel resumes a timed wait that a stop signal interrupted
        // (`kill -STOP`/`-CONT`, a cgroup freeze, a debugger attaching)
        // with this call; without it the VMM would die of SIGSYS on the
        // next SIGCONT. Which of our waits restart this way (audited for
        // issue 12; the test
        // `a_stopped_and_continued_timed_wait_survives_on_every_thread_kind`
        // stops and continues them under each filter):
        // * futex waits with a timeout (FUTEX_WAIT, FUTEX_WAIT_BITSET): every
        //   kind: timed condition-variable and RCU event waits, the
        //   call_rcu thread's lazy polls. Untimed futex waits restart by
        //   re-executing `futex` itself (-ERESTARTSYS), not through here.
        // * clock_nanosleep (`std::thread::sleep`): the control thread
        //   (waiting for vCPUs to stop, QMP's shutdown grace).
        // * Not epoll_wait: it returns EINTR on a stop, never restarts;
        //   event_manager's loop treats EINTR as "no events" and goes on.
        // * Not KVM_RUN or blocking read/write: -ERESTARTSYS / EINTR
        //   (the vCPU loop handles the kick's EINTR itself).
        // Allowed on every thread, as Firecracker does: a wait nobody
        // audited yet may restart too.
        libc::SYS_restart_syscall,
        // A clean abort (a panic while panicking, an `rcu` invariant
        // broken): glibc's `abort()` sends SIGABRT to the calling thread
        // with tgkill(getpid(), gettid(), SIGABRT), allowed below.
        libc::SYS_getpid,
    ]);
    // glibc's abort, and the SIGSYS handler (module `sigsys`) ending the
    // process once it said which call was refused: a signal to a thread of
    // this process, and only these two.
    for sig in [libc::SIGABRT, libc::SIGSYS] {
        list.when(
            libc::SYS_tgkill,
            vec![
                arg_eq(0, u64::from(std::process::id()))?,
                arg_eq(2, sig as u64)?,
            ],
        )?;
    }
    // The SIGSYS handler reads the name of the thread it runs on.
    list.when(libc::SYS_prctl, vec![arg_eq(0, libc::PR_GET_NAME as u64)?])?;
    // Debug builds of std check that a descriptor is still open before
    // closing it (reads its flags; changes nothing).
    list.when(libc::SYS_fcntl, vec![arg_eq(1, libc::F_GETFD as u64)?])?;
    // Anonymous memory only, never executable: no file or device can be
    // mapped and no code can be made runnable after set-up.
    list.when(
        libc::SYS_mmap,
        vec![
            arg_masked_eq(2, libc::PROT_EXEC as u64, 0)?,
            arg_masked_eq(3, libc::MAP_ANONYMOUS as u64, libc::MAP_ANONYMOUS as u64)?,
        ],
    )?;
    // glibc grows a thread's heap with mprotect; never to executable.
    list.when(
        libc::SYS_mprotect,
        vec![arg_masked_eq(2, libc::PROT_EXEC as u64, 0)?],
    )?;
    // Returning freed memory (malloc trimming, exited threads' stacks,
    // unplugged guest memory).
    list.when(
        libc::SYS_madvise,
        vec![arg_eq(2, libc::MADV_DONTNEED as u64)?],
    )?;
    // Locks, condition variables, thread joins and the RCU wait events: the
    // plain wait and wake commands only (no PI or requeue operations).
    for cmd in [
        libc::FUTEX_WAIT,
        libc::FUTEX_WAKE,
        libc::FUTEX_WAIT_BITSET,
        libc::FUTEX_WAKE_BITSET,
    ] {
        list.when(
            libc::SYS_futex,
            vec![arg_masked_eq(1, FUTEX_CMD_MASK, cmd as u64)?],
        )?;
    }
    Ok(())
}
