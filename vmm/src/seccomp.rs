//! Seccomp filters: after set-up, each kind of VMM thread may make only the
//! system calls its job needs; any other call (or an allowed call with
//! arguments it never uses) traps, and the `SIGSYS` handler installed with
//! the filters prints the thread's name and the call's number and name on
//! stderr, then ends the whole process with `SIGSYS` (module `sigsys`). A
//! compromised or buggy thread cannot quietly do what the VMM never does,
//! and a call missing from a list is diagnosed from one line.
//!
//! Thread kinds and when their filters go on ([`ThreadKind`]):
//!
//! * **vCPU** threads apply theirs first thing, before their run loop.
//! * The **control** thread (the one that calls
//!   [`Machine::run`](crate::Machine::run)) applies its filter once the
//!   vCPU threads started, just before its event loop, and keeps it until
//!   the process exits, reports included.
//! * The **call_rcu** thread (the `rcu` crate's, started on first use)
//!   applies its filter itself, in an RCU callback queued before the vCPUs
//!   start; [`install_on_call_rcu_thread`] waits until it ran. The `rcu`
//!   crate needs no hook for this: a callback runs on that thread by
//!   definition.
//!
//! There are no device threads: virtio-mem requests are processed on the
//! control thread and every other device runs on the vCPU thread that
//! touched it.
//!
//! Set-up (opening the kernel and `/dev/kvm`, creating the VM, its vCPUs,
//! eventfds, the QMP socket and the threads) happens before any filter, so
//! `socket`, `bind`, `clone`, `execve`, KVM's creation ioctls and opening a
//! file for reading and writing are never allowed afterwards. Filters are
//! inherited by threads created later, which is why the call_rcu thread
//! must exist before the control thread filters itself.
//!
//! `--no-seccomp` ([`SeccompMode::Off`]) turns filtering off, for
//! debugging: a panic on a filtered thread prints its message, but with
//! `RUST_BACKTRACE` set, collecting the backtrace (which reads the
//! executable) then kills the process.

mod allow_list;
mod call_rcu;
mod common;
mod control;
mod sigsys;
mod syscall_names;
mod vcpu;

use allow_list::AllowList;
pub(crate) use seccompiler::BpfProgram;
use std::sync::{Arc, Mutex, PoisonError};
use thiserror::Error;

/// The kinds of threads the VMM runs after set-up, each with its own
/// allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread: `KVM_RUN` and exit handling.
    Vcpu,
    /// The control thread: event loop, QMP, hot-plug, reports at exit.
    Control,
    /// The `rcu` crate's call_rcu thread: grace periods and callbacks.
    CallRcu,
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Vcpu => "vCPU",
            Self::Control => "control",
            Self::CallRcu => "call_rcu",
        })
    }
}

/// Which threads of a run get filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// No filter (`--no-seccomp`; the library's default).
    #[default]
    Off,
    /// Only the vCPU threads the run starts: for tests, whose process
    /// also runs a test harness that must stay unfiltered.
    #[cfg(any(test, feature = "test-utils"))]
    VcpuThreads,
    /// Every thread: the vCPU threads, the calling thread (for the rest of
    /// the process's life) and the call_rcu thread (once per process).
    /// What the `vmm` command does unless `--no-seccomp` is given.
    AllThreads,
}

/// Errors building or installing a filter.
#[derive(Debug, Error)]
pub enum SeccompError {
    /// The allow-list does not compile (a programming error).
    #[error("cannot build the seccomp filter of the {0} threads")]
    Build(ThreadKind, #[source] seccompiler::BackendError),
    /// The kernel refused the filter (no seccomp support, for example).
    #[error("cannot install the seccomp filter of the {0} thread")]
    Install(ThreadKind, #[source] seccompiler::Error),
    /// glibc refused the malloc arena limit.
    #[error("cannot set the malloc arena limit")]
    Arenas,
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
    /// The call_rcu thread ran the queued callback but it did not report.
    #[error("the call_rcu thread did not report installing its seccomp filter")]
    CallRcuSilent,
}

/// What a VM's configuration adds to the filters; the default is a VM
/// that needs none of it, and gets the narrowest filters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct FilterNeeds {
    /// A hot-plug device is backed by memfds (`backend=memfd`): the control
    /// thread creates, sizes, seals, maps and punches them.
    pub memfd_backing: bool,
}

/// The compiled filter of thread kind `kind` for a VM that needs nothing
/// beyond the defaults ([`program_for`]).
pub(crate) fn program(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    program_for(kind, FilterNeeds::default())
}

/// The compiled filter of thread kind `kind` for a VM with `needs`. The
/// control filter allows signals to this process only, so compile it in
/// the process that uses it.
pub(crate) fn program_for(
    kind: ThreadKind,
    needs: FilterNeeds,
) -> Result<BpfProgram, SeccompError> {
    let build = |e| SeccompError::Build(kind, e);
    let mut list = AllowList::default();
    common::allow(&mut list).map_err(build)?;
    match kind {
        ThreadKind::Vcpu => vcpu::allow(&mut list),
        ThreadKind::Control => control::allow(&mut list, std::process::id(), needs),
        ThreadKind::CallRcu => call_rcu::allow(&mut list),
    }
    .map_err(build)?;
    list.compile().map_err(build)
}

/// Applies `program` (compiled for `kind`) to the calling thread, for the
/// rest of its life; threads it creates afterwards inherit it. Sets
/// `no_new_privs` first, as the kernel requires. Makes no allocation on
/// success.
pub(crate) fn apply(kind: ThreadKind, program: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(program).map_err(|e| SeccompError::Install(kind, e))
}

/// Has the call_rcu thread apply its own filter (starting the thread if it
/// has not started yet) and waits until it did. Once per process: later
/// calls return at once. Call it before any filter is on the calling
/// thread (it may create the call_rcu thread), outside RCU read sections
/// and not from an RCU callback (it waits for one).
pub(crate) fn install_on_call_rcu_thread() -> Result<(), SeccompError> {
    static INSTALLED: Mutex<bool> = Mutex::new(false);
    let mut installed = INSTALLED.lock().unwrap_or_else(PoisonError::into_inner);
    if *installed {
        return Ok(());
    }
    let program = program(ThreadKind::CallRcu)?;
    let (tx, rx) = std::sync::mpsc::channel();
    rcu::call_rcu_labeled("seccomp filter", move || {
        let _ = tx.send(apply(ThreadKind::CallRcu, &program));
    });
    // Every callback queued before this has run once it returns.
    rcu::drain_call_rcu();
    let result = rx.try_recv().unwrap_or(Err(SeccompError::CallRcuSilent));
    *installed = result.is_ok();
    result
}

/// What the process needs before any filter goes on: the SIGSYS handler
/// (module `sigsys`) and a fixed limit on glibc's malloc arenas.
///
/// Why the limit: glibc gives each new thread its own arena until there are
/// more than eight; the next thread's first allocation then computes the
/// limit (eight per CPU) by reading `/sys/devices/system/cpu/online`, an
/// `openat` that the vCPU and call_rcu filters refuse (found by
/// `glibc_allocator_works_under_every_filter_with_many_threads`: SIGSYS on
/// `openat`). A VMM with eight or more vCPUs would have died there. Setting
/// `M_ARENA_MAX` first makes glibc take the limit as given; it is the same
/// number glibc would compute (eight per online CPU). Everything else the
/// allocator does (arena heaps: anonymous mmap, mprotect, munmap, madvise;
/// large blocks: mmap, mremap, munmap; the main heap: brk) is in the common
/// list, which that test exercises on every kind.
fn prepare_process() -> Result<(), SeccompError> {
    sigsys::install().map_err(SeccompError::Handler)?;
    // SAFETY: sysconf only answers a question (it reads /sys here, before
    // any filter).
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.clamp(1, 1 << 16);
    let arenas = libc::c_int::try_from(cpus * 8).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt sets one allocator parameter; M_ARENA_MAX takes any
    // positive count.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) } != 1 {
        return Err(SeccompError::Arenas);
    }
    Ok(())
}

/// The filters of one [`Machine::run`](crate::Machine::run), compiled
/// before any of its threads start.
#[derive(Debug, Default)]
pub(crate) struct RunFilters {
    /// What each vCPU thread applies to itself before its run loop.
    pub vcpu: Option<Arc<BpfProgram>>,
    control: Option<BpfProgram>,
}

impl RunFilters {
    /// Installs the SIGSYS handler (unless `mode` is
    /// [`SeccompMode::Off`]) and compiles the filters `mode` asks for, for
    /// a VM with `needs`. With
    /// [`SeccompMode::AllThreads`] the call_rcu thread also gets its filter
    /// now ([`install_on_call_rcu_thread`]). Call it on the thread that will
    /// run the control loop, before the vCPU threads start.
    pub(crate) fn prepare(mode: SeccompMode, needs: FilterNeeds) -> Result<Self, SeccompError> {
        if mode != SeccompMode::Off {
            prepare_process()?;
        }
        Ok(match mode {
            SeccompMode::Off => Self::default(),
            #[cfg(any(test, feature = "test-utils"))]
            SeccompMode::VcpuThreads => Self {
                vcpu: Some(Arc::new(program(ThreadKind::Vcpu)?)),
                control: None,
            },
            SeccompMode::AllThreads => {
                let vcpu = Arc::new(program(ThreadKind::Vcpu)?);
                let control = program_for(ThreadKind::Control, needs)?;
                install_on_call_rcu_thread()?;
                Self {
                    vcpu: Some(vcpu),
                    control: Some(control),
                }
            }
        })
    }

    /// Applies the control filter, if the mode has one, to the calling
    /// thread for the rest of its life; does nothing on a thread that
    /// already has it (a later run on the same thread). Call it after the
    /// last thread the run creates has started, just before the control
    /// loop.
    pub(crate) fn enter_control(&self) -> Result<(), SeccompError> {
        thread_local! {
            static FILTERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        }
        match &self.control {
            Some(p) if !FILTERED.get() => {
                apply(ThreadKind::Control, p)?;
                FILTERED.set(true);
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How a forked child ended.
    #[derive(Debug, PartialEq, Eq)]
    enum Ended {
        Exited(i32),
        Killed(i32),
    }

    /// Forks; the child applies `program`, makes the raw system call(s) in
    /// `call` and exits 0 (with `exit`, which every list allows; 99 if the
    /// filter could not be applied). Returns how the child ended.
    fn in_filtered_child(program: &BpfProgram, call: fn()) -> Ended {
        PARENT.store(std::process::id(), std::sync::atomic::Ordering::SeqCst);
        // SAFETY: the child of this multi-threaded process only makes
        // async-signal-safe calls (setrlimit, prctl, seccomp, the raw
        // system calls of `call`, exit): no allocation, no lock.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: `no_core` is a valid rlimit. No core dump when killed.
            unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
            // SAFETY: SIGSYS's default action, whatever handler another
            // test installed: the child dies of it, silently.
            unsafe { libc::signal(libc::SIGSYS, libc::SIG_DFL) };
            let code: libc::c_long = if seccompiler::apply_filter(program).is_ok() {
                call();
                0
            } else {
                99
            };
            // SAFETY: ends the child's only thread, hence the child.
            unsafe { libc::syscall(libc::SYS_exit, code) };
            std::process::abort();
        }
        let mut status = 0;
        // SAFETY: `pid` is our child; `status` is a valid out-pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(rc, pid);
        if libc::WIFEXITED(status) {
            Ended::Exited(libc::WEXITSTATUS(status))
        } else {
            Ended::Killed(libc::WTERMSIG(status))
        }
    }

    /// What [`in_child`] does in the child besides running its body.
    struct ChildSetup {
        /// The name the child's thread takes (`prctl(PR_SET_NAME)`).
        name: &'static std::ffi::CStr,
        /// What [`RunFilters::prepare`] does to the process (SIGSYS handler,
        /// arena limit) is done before the filter.
        prepared: bool,
        /// The parent stops the child (SIGSTOP) and continues it (SIGCONT)
        /// while `call` runs.
        stop_and_continue: bool,
    }

    /// Like [`in_filtered_child`], with `setup`; the child's stderr is
    /// captured and returned with how it ended.
    fn in_child(program: &BpfProgram, setup: &ChildSetup, call: fn()) -> (Ended, String) {
        PARENT.store(std::process::id(), std::sync::atomic::Ordering::SeqCst);
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let (read_end, write_end) = (fds[0], fds[1]);
        // SAFETY: as in `in_filtered_child`: until `call`, the child only
        // makes async-signal-safe calls; `call` documents its own.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: `no_core` is a valid rlimit. No core dump when killed.
            unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
            // SAFETY: stderr becomes the pipe's write end.
            unsafe { libc::dup2(write_end, libc::STDERR_FILENO) };
            // SAFETY: `name` is a valid C string; the kernel copies 16 bytes.
            unsafe { libc::prctl(libc::PR_SET_NAME, setup.name.as_ptr()) };
            let installed = if setup.prepared {
                prepare_process().is_ok()
            } else {
                // SAFETY: SIGSYS's default action.
                unsafe { libc::signal(libc::SIGSYS, libc::SIG_DFL) };
                true
            };
            let code: libc::c_long = if installed && seccompiler::apply_filter(program).is_ok() {
                call();
                0
            } else {
                99
            };
            // SAFETY: ends the child's thread; with others still running,
            // `call` joined them, so this ends the child.
            unsafe { libc::syscall(libc::SYS_exit, code) };
            std::process::abort();
        }
        // SAFETY: the parent's copy of the write end.
        unsafe { libc::close(write_end) };
        if setup.stop_and_continue {
            for sig in [libc::SIGSTOP, libc::SIGCONT] {
                std::thread::sleep(std::time::Duration::from_millis(300));
                // SAFETY: signals our own child.
                unsafe { libc::kill(pid, sig) };
            }
        }
        let mut status = 0;
        // SAFETY: `pid` is our child; `status` is a valid out-pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(rc, pid);
        // SAFETY: we own the read end; File closes it.
        let mut pipe = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(read_end) };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut pipe, &mut err).unwrap();
        let ended = if libc::WIFEXITED(status) {
            Ended::Exited(libc::WEXITSTATUS(status))
        } else {
            Ended::Killed(libc::WTERMSIG(status))
        };
        (ended, err)
    }

    const ALL_KINDS: [ThreadKind; 3] = [ThreadKind::Vcpu, ThreadKind::Control, ThreadKind::CallRcu];

    #[test]
    fn a_forbidden_call_names_the_thread_and_the_call_then_ends_with_sigsys() {
        for (kind, name) in [
            (ThreadKind::Vcpu, c"vcpu0"),
            (ThreadKind::Control, c"vmm"),
            (ThreadKind::CallRcu, c"call_rcu"),
        ] {
            let p = program(kind).unwrap();
            let setup = ChildSetup {
                name,
                prepared: true,
                stop_and_continue: false,
            };
            let (ended, err) = in_child(&p, &setup, || {
                // SAFETY: a fork, if let through, exits at once.
                if unsafe { libc::syscall(libc::SYS_fork) } == 0 {
                    // SAFETY: ends the grandchild.
                    unsafe { libc::syscall(libc::SYS_exit, 0) };
                }
            });
            assert_eq!(ended, KILLED, "{kind}: {err}");
            let want = format!(
                "vmm: seccomp: thread {} made a forbidden system call {} (fork); ending with SIGSYS\n",
                name.to_str().unwrap(),
                libc::SYS_fork
            );
            assert_eq!(err, want, "{kind}");
        }
    }

    /// A timed futex wait (every kind: locks with timeouts, the call_rcu
    /// thread's lazy polls, RCU's waits) stopped and continued: the kernel
    /// resumes it with `restart_syscall`, which every filter must allow.
    #[test]
    fn a_stopped_and_continued_timed_wait_survives_on_every_thread_kind() {
        for kind in ALL_KINDS {
            let p = program(kind).unwrap();
            let setup = ChildSetup {
                name: c"waiter",
                prepared: true,
                stop_and_continue: true,
            };
            let (ended, err) = in_child(&p, &setup, futex_wait_a_second);
            assert_eq!(ended, ALLOWED, "{kind}: {err}");
        }
        // The control thread also sleeps (waiting for vCPUs to stop).
        let p = program(ThreadKind::Control).unwrap();
        let setup = ChildSetup {
            name: c"sleeper",
            prepared: true,
            stop_and_continue: true,
        };
        let (ended, err) = in_child(&p, &setup, || {
            let t = libc::timespec {
                tv_sec: 1,
                tv_nsec: 0,
            };
            // SAFETY: sleeps; `t` is a valid timespec.
            unsafe { libc::syscall(libc::SYS_clock_nanosleep, libc::CLOCK_MONOTONIC, 0, &t, 0) };
        });
        assert_eq!(ended, ALLOWED, "clock_nanosleep: {err}");
    }

    fn futex_wait_a_second() {
        let word = 0u32;
        let t = libc::timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        // SAFETY: waits on our own word (value 0, as expected) for up to a
        // second; nobody wakes it.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                &word,
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                0,
                &t,
                0,
                0,
            )
        };
    }

    /// `kind`'s filter plus what creating threads needs (`clone`, and what
    /// glibc's thread start calls): a child that creates threads after its
    /// filter went on, as the VMM's threads are filtered when they first
    /// allocate.
    fn program_with_threads(kind: ThreadKind) -> BpfProgram {
        let mut list = AllowList::default();
        common::allow(&mut list).unwrap();
        match kind {
            ThreadKind::Vcpu => vcpu::allow(&mut list),
            ThreadKind::Control => {
                control::allow(&mut list, std::process::id(), FilterNeeds::default())
            }
            ThreadKind::CallRcu => call_rcu::allow(&mut list),
        }
        .unwrap();
        list.any(&[
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_set_robust_list,
            libc::SYS_rseq,
        ]);
        list.compile().unwrap()
    }

    /// Threads, each allocating on its own arena, and more threads than
    /// glibc creates arenas for without asking how many CPUs there are.
    const ALLOCATING_THREADS: usize = 12;

    /// Allocates and frees blocks of many sizes: small ones from the arena
    /// (grown with mprotect or brk, trimmed with madvise or brk), large
    /// ones mapped and unmapped, a large block grown with mremap.
    fn allocate_and_free() {
        for size in [16usize, 4096, 100 << 10, 200 << 10, 1 << 20, 8 << 20] {
            // SAFETY: allocates a block of our own.
            let p = unsafe { libc::malloc(size) }.cast::<u8>();
            assert!(!p.is_null());
            // SAFETY: `p` has `size` bytes.
            unsafe { p.write_bytes(1, size) };
            // SAFETY: `p` came from malloc and is not used after this.
            let q = unsafe { libc::realloc(p.cast(), size * 2) }.cast::<u8>();
            assert!(!q.is_null());
            // SAFETY: `q` has `size * 2` bytes.
            unsafe { q.write_bytes(2, size * 2) };
            // SAFETY: `q` came from realloc, freed once.
            unsafe { libc::free(q.cast()) };
        }
        let mut blocks = [std::ptr::null_mut::<libc::c_void>(); 2048];
        for b in &mut blocks {
            // SAFETY: a 1000-byte block of our own.
            *b = unsafe { libc::malloc(1000) };
        }
        for b in blocks {
            // SAFETY: each block was allocated above, freed once.
            unsafe { libc::free(b) };
        }
    }

    extern "C" fn allocating_thread(_: *mut libc::c_void) -> *mut libc::c_void {
        allocate_and_free();
        std::ptr::null_mut()
    }

    /// Runs [`allocate_and_free`] on [`ALLOCATING_THREADS`] new threads at
    /// once (each first allocation creates an arena) and on this one, then
    /// trims the heap.
    fn allocate_on_many_threads() {
        let mut threads = [0 as libc::pthread_t; ALLOCATING_THREADS];
        for t in &mut threads {
            // SAFETY: default attributes; the thread runs a function that
            // takes no argument.
            let rc = unsafe {
                libc::pthread_create(t, std::ptr::null(), allocating_thread, std::ptr::null_mut())
            };
            assert_eq!(rc, 0);
        }
        allocate_and_free();
        for t in threads {
            // SAFETY: joins a thread created above, once.
            unsafe { libc::pthread_join(t, std::ptr::null_mut()) };
        }
        // SAFETY: returns free memory to the system.
        unsafe { libc::malloc_trim(0) };
    }

    /// glibc's allocator, exercised on every thread kind's filter: arenas
    /// created by threads' first allocations (mmap, mprotect, munmap), the
    /// arena limit computed once there are more than eight of them, large
    /// blocks (mmap, mremap, munmap) and trimming (madvise, brk).
    #[test]
    fn glibc_allocator_works_under_every_filter_with_many_threads() {
        for kind in ALL_KINDS {
            let p = program_with_threads(kind);
            let setup = ChildSetup {
                name: c"allocator",
                prepared: true,
                stop_and_continue: false,
            };
            let (ended, err) = in_child(&p, &setup, allocate_on_many_threads);
            assert_eq!(ended, ALLOWED, "{kind}: {err}");
        }
    }

    const ALLOWED: Ended = Ended::Exited(0);
    const KILLED: Ended = Ended::Killed(libc::SIGSYS);

    fn sys_socket() {
        // SAFETY: creates (at most) a socket in a child about to exit.
        unsafe { libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0) };
    }
    fn sys_open_read() {
        // SAFETY: the path is a valid C string; the file does not exist.
        unsafe {
            libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                c"/nonexistent-vmm-seccomp".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
    }
    fn sys_open_rdwr() {
        // SAFETY: as above.
        unsafe {
            libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                c"/nonexistent-vmm-seccomp".as_ptr(),
                libc::O_RDWR | libc::O_CLOEXEC,
            )
        };
    }
    fn ioctl_bad_fd(request: u64) {
        // SAFETY: fd -1: the call fails with EBADF if the filter lets it.
        unsafe { libc::syscall(libc::SYS_ioctl, -1, request, 0) };
    }
    fn sys_write_bad_fd() {
        // SAFETY: fd -1: fails with EBADF.
        unsafe { libc::syscall(libc::SYS_write, -1, c"x".as_ptr(), 1) };
    }
    fn mmap(prot: libc::c_int, flags: libc::c_int) {
        // SAFETY: a fresh anonymous (or failing, fd -1) mapping, unused.
        unsafe { libc::syscall(libc::SYS_mmap, 0, 4096, prot, flags, -1, 0) };
    }
    fn futex_wake(op: libc::c_int) {
        let word = 0u32;
        // SAFETY: `word` is a live u32; wake and PI commands on a word
        // nobody waits on return at once.
        unsafe { libc::syscall(libc::SYS_futex, &word, op, 1, 0, 0, 0) };
    }
    fn tgkill_parent(sig: libc::c_int) {
        // The filter was compiled in the parent: its pid is "this process".
        // Thread id 0 makes the call fail with EINVAL when let through.
        let parent = PARENT.load(std::sync::atomic::Ordering::SeqCst);
        // SAFETY: sends nothing (invalid thread id).
        unsafe { libc::syscall(libc::SYS_tgkill, parent, 0, sig) };
    }
    /// The test process's pid, stored before forking (the child may not
    /// ask for it: `getppid` is in no allow-list).
    static PARENT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    fn membarrier(cmd: u64) {
        // SAFETY: the child is not registered: fails with EPERM or returns
        // the supported commands; no memory is touched.
        unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0) };
    }

    #[test]
    fn vcpu_filter_allows_its_ioctls_and_kills_on_anything_else() {
        let p = program(ThreadKind::Vcpu).unwrap();
        assert_eq!(
            in_filtered_child(&p, || ioctl_bad_fd(0xae80)),
            ALLOWED,
            "KVM_RUN"
        );
        assert_eq!(in_filtered_child(&p, sys_write_bad_fd), ALLOWED);
        assert_eq!(
            in_filtered_child(&p, || mmap(
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS
            )),
            ALLOWED
        );
        assert_eq!(
            in_filtered_child(&p, || futex_wake(
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG
            )),
            ALLOWED
        );
        // KVM_CREATE_VM: not a vCPU ioctl.
        assert_eq!(in_filtered_child(&p, || ioctl_bad_fd(0xae01)), KILLED);
        // KVM_SET_USER_MEMORY_REGION: the control thread's, not a vCPU's.
        assert_eq!(in_filtered_child(&p, || ioctl_bad_fd(0x4020_ae46)), KILLED);
        assert_eq!(in_filtered_child(&p, sys_socket), KILLED);
        assert_eq!(in_filtered_child(&p, sys_open_read), KILLED);
        assert_eq!(
            in_filtered_child(&p, || mmap(
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS
            )),
            KILLED,
            "executable memory"
        );
        assert_eq!(
            in_filtered_child(&p, || mmap(libc::PROT_READ, libc::MAP_SHARED)),
            KILLED,
            "file mapping"
        );
        assert_eq!(
            in_filtered_child(&p, || futex_wake(libc::FUTEX_UNLOCK_PI)),
            KILLED,
            "PI futex"
        );
        assert_eq!(
            in_filtered_child(&p, || tgkill_parent(crate::kvm::kick::kick_signal())),
            KILLED
        );
    }

    #[test]
    fn vcpu_ioctl_list_is_what_the_filter_allows() {
        let p = program(ThreadKind::Vcpu).unwrap();
        // Each listed request passes, in a child of its own.
        let ended: Vec<Ended> = vcpu::ioctls()
            .iter()
            .map(|&r| {
                // fn pointers cannot capture: pass the request through a
                // static for the child to read.
                REQUEST.store(r, std::sync::atomic::Ordering::SeqCst);
                in_filtered_child(&p, || {
                    ioctl_bad_fd(REQUEST.load(std::sync::atomic::Ordering::SeqCst))
                })
            })
            .collect();
        assert!(ended.iter().all(|e| *e == ALLOWED), "{ended:?}");
    }
    static REQUEST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    #[test]
    fn control_filter_signals_only_its_own_process_and_opens_files_only_to_read_or_create() {
        let p = program(ThreadKind::Control).unwrap();
        assert_eq!(
            in_filtered_child(&p, || tgkill_parent(crate::kvm::kick::kick_signal())),
            ALLOWED
        );
        assert_eq!(
            in_filtered_child(&p, || tgkill_parent(libc::SIGKILL)),
            KILLED
        );
        assert_eq!(
            in_filtered_child(&p, || {
                // SAFETY: thread id 0: fails with EINVAL if let through.
                unsafe { libc::syscall(libc::SYS_tgkill, 1, 0, crate::kvm::kick::kick_signal()) };
            }),
            KILLED,
            "another process"
        );
        assert_eq!(in_filtered_child(&p, sys_open_read), ALLOWED);
        assert_eq!(in_filtered_child(&p, sys_open_rdwr), KILLED);
        assert_eq!(
            in_filtered_child(&p, || {
                // SAFETY: the path is a valid C string; creating it fails
                // (no such directory) if let through.
                unsafe {
                    libc::syscall(
                        libc::SYS_openat,
                        libc::AT_FDCWD,
                        c"/nonexistent-vmm-seccomp/x".as_ptr(),
                        libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
                        0o644,
                    )
                };
            }),
            KILLED,
            "creating by truncation follows links: reports never do it"
        );
        assert_eq!(in_filtered_child(&p, || ioctl_bad_fd(0x4020_ae46)), ALLOWED);
        assert_eq!(
            in_filtered_child(&p, || ioctl_bad_fd(0xae80)),
            KILLED,
            "KVM_RUN"
        );
        assert_eq!(in_filtered_child(&p, sys_socket), KILLED);
        assert_eq!(
            in_filtered_child(&p, || {
                // SAFETY: a fork of the child, if let through, exits at once.
                if unsafe { libc::syscall(libc::SYS_fork) } == 0 {
                    // SAFETY: ends the grandchild.
                    unsafe { libc::syscall(libc::SYS_exit, 0) };
                }
            }),
            KILLED,
            "no new process or thread after set-up"
        );
    }

    fn memfd_create(flags: libc::c_uint) {
        // SAFETY: the name is a valid C string; the memfd (if any) is
        // closed when the child exits.
        unsafe { libc::syscall(libc::SYS_memfd_create, c"x".as_ptr(), flags) };
    }
    fn fallocate_bad_fd(mode: libc::c_int) {
        // SAFETY: fd -1: fails with EBADF.
        unsafe { libc::syscall(libc::SYS_fallocate, -1, mode, 0, 4096) };
    }
    fn add_seals_bad_fd(seals: libc::c_int) {
        // SAFETY: fd -1: fails with EBADF.
        unsafe { libc::syscall(libc::SYS_fcntl, -1, libc::F_ADD_SEALS, seals) };
    }
    fn populate() {
        // SAFETY: address 0 is not mapped: fails with ENOMEM.
        unsafe { libc::syscall(libc::SYS_madvise, 0, 4096, libc::MADV_POPULATE_WRITE) };
    }

    #[test]
    fn control_filter_of_a_vm_without_memfd_backing_refuses_the_memfd_calls() {
        let p = program(ThreadKind::Control).unwrap();
        const BASE: libc::c_uint = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        assert_eq!(in_filtered_child(&p, || memfd_create(BASE)), KILLED);
        assert_eq!(
            in_filtered_child(&p, || fallocate_bad_fd(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            )),
            KILLED
        );
        assert_eq!(
            in_filtered_child(&p, || add_seals_bad_fd(
                crate::memory::memory_backing::MEMFD_SEALS
            )),
            KILLED
        );
        assert_eq!(
            in_filtered_child(&p, || mmap(
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE
            )),
            KILLED,
            "a shared file mapping"
        );
    }

    #[test]
    fn control_filter_allows_the_memfd_backing_calls_with_their_arguments_only() {
        const BASE: libc::c_uint = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        let memfd = FilterNeeds {
            memfd_backing: true,
        };
        let p = program_for(ThreadKind::Control, memfd).unwrap();
        assert_eq!(in_filtered_child(&p, || memfd_create(BASE)), ALLOWED);
        assert_eq!(
            in_filtered_child(&p, || memfd_create(
                libc::MFD_CLOEXEC
                    | libc::MFD_ALLOW_SEALING
                    | libc::MFD_HUGETLB
                    | libc::MFD_HUGE_2MB
            )),
            ALLOWED
        );
        assert_eq!(
            in_filtered_child(&p, || memfd_create(0)),
            KILLED,
            "a memfd without CLOEXEC"
        );
        assert_eq!(
            in_filtered_child(&p, || fallocate_bad_fd(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            )),
            ALLOWED
        );
        assert_eq!(
            in_filtered_child(&p, || fallocate_bad_fd(0)),
            KILLED,
            "allocating, not punching"
        );
        assert_eq!(
            in_filtered_child(&p, || add_seals_bad_fd(
                crate::memory::memory_backing::MEMFD_SEALS
            )),
            ALLOWED
        );
        assert_eq!(
            in_filtered_child(&p, || add_seals_bad_fd(libc::F_SEAL_WRITE)),
            KILLED
        );
        assert_eq!(
            in_filtered_child(&p, || mmap(
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE
            )),
            ALLOWED,
            "a shared file mapping (fd -1 here)"
        );
        assert_eq!(
            in_filtered_child(&p, || mmap(
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_SHARED
            )),
            KILLED,
            "executable file mapping"
        );
        assert_eq!(
            in_filtered_child(&p, || mmap(libc::PROT_READ, libc::MAP_PRIVATE)),
            KILLED,
            "private file mapping"
        );
        assert_eq!(in_filtered_child(&p, populate), ALLOWED);
        // Only the control thread plugs memory.
        let vcpu = program(ThreadKind::Vcpu).unwrap();
        assert_eq!(in_filtered_child(&vcpu, || memfd_create(BASE)), KILLED);
        assert_eq!(in_filtered_child(&vcpu, populate), KILLED);
        assert_eq!(
            in_filtered_child(&vcpu, || fallocate_bad_fd(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            )),
            KILLED
        );
    }

    #[test]
    fn call_rcu_filter_allows_only_the_expedited_barrier() {
        let p = program(ThreadKind::CallRcu).unwrap();
        assert_eq!(in_filtered_child(&p, || membarrier(1 << 3)), ALLOWED);
        assert_eq!(in_filtered_child(&p, || membarrier(0)), KILLED, "query");
        assert_eq!(in_filtered_child(&p, sys_write_bad_fd), ALLOWED);
        assert_eq!(in_filtered_child(&p, || ioctl_bad_fd(0xae80)), KILLED);
        assert_eq!(in_filtered_child(&p, sys_open_read), KILLED);
    }

    #[test]
    fn every_program_fits_and_off_compiles_nothing() {
        for kind in [ThreadKind::Vcpu, ThreadKind::Control, ThreadKind::CallRcu] {
            let p = program(kind).unwrap();
            assert!(!p.is_empty() && p.len() < 4096, "{kind}: {}", p.len());
        }
        let f = RunFilters::prepare(SeccompMode::Off, FilterNeeds::default()).unwrap();
        assert!(f.vcpu.is_none());
        f.enter_control().unwrap();
        let f = RunFilters::prepare(SeccompMode::VcpuThreads, FilterNeeds::default()).unwrap();
        assert!(f.vcpu.is_some());
        // No control filter in this mode: applying it is a no-op, and this
        // test thread stays unfiltered.
        f.enter_control().unwrap();
        // SAFETY: creates a socket, closed at once.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        assert!(fd >= 0);
        // SAFETY: `fd` is ours.
        unsafe { libc::close(fd) };
    }
}
