//! vCPU threads: the run loop, exit dispatch through the RCU-published
//! buses, and pause / resume / stop requests.
//!
//! A vCPU thread reads the buses and the guest memory map inside RCU read
//! sections, in `Fenced` reader mode so grace periods never need to interrupt
//! it (see the `rcu` crate). Nothing on the exit path takes a lock shared with
//! other vCPUs: the bus tables are immutable and each device has its own lock.

use crate::kvm::emulation::{self, Outcome};
use crate::kvm::kick;
use crate::kvm::vcpu_state::VcpuState;
use crate::memory::guest_memory::SharedMemory;
use devices::{Bus, ExitRequest, ExitSink};
use kvm_ioctls::{VcpuExit, VcpuFd};
use rcu::RcuCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;
use thiserror::Error;

/// Errors starting a vCPU thread.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// The thread could not be created.
    #[error("cannot start the thread of vCPU {index}")]
    Spawn {
        /// Which vCPU.
        index: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What the VM's devices and buses look like to a vCPU.
#[derive(Clone, Debug)]
pub struct VcpuContext {
    /// The port-I/O bus.
    pub pio: Arc<RcuCell<Bus>>,
    /// The MMIO bus.
    pub mmio: Arc<RcuCell<Bus>>,
    /// The guest memory map.
    pub memory: SharedMemory,
    /// Where power-off and reset requests go (triple faults, system events).
    pub exit: Arc<ExitSink>,
    /// Where fatal vCPU errors go.
    pub fatal: Arc<FatalErrors>,
    /// Process-wide timing marks.
    pub marks: Arc<Marks>,
    /// The seccomp filter the thread applies to itself before its run
    /// loop; `None` runs it unfiltered.
    pub seccomp: Option<Arc<crate::seccomp::BpfProgram>>,
}

/// Fatal errors reported by vCPU threads to the control thread.
#[derive(Debug)]
pub struct FatalErrors {
    messages: Mutex<Vec<String>>,
    evt: vmm_sys_util::eventfd::EventFd,
}

impl FatalErrors {
    /// An empty list with its notification eventfd.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            messages: Mutex::new(Vec::new()),
            evt: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }
    /// Records `msg` and wakes the control thread. Never blocks for long.
    pub fn report(&self, msg: String) {
        self.messages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(msg);
        // A full counter (impossible in practice) still leaves it readable.
        let _ = self.evt.write(1);
    }
    /// The first error reported, if any.
    pub fn first(&self) -> Option<String> {
        self.messages
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .first()
            .cloned()
    }
    /// The eventfd the control thread watches.
    pub fn event_fd(&self) -> &vmm_sys_util::eventfd::EventFd {
        &self.evt
    }
}

/// Time marks the metrics report uses.
#[derive(Debug)]
pub struct Marks {
    /// When `main` started.
    pub start: Instant,
    /// Nanoseconds from `start` to the first `KVM_RUN` of any vCPU (0: none yet).
    pub first_run_ns: AtomicU64,
}

impl Marks {
    /// Marks taken from now.
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            first_run_ns: AtomicU64::new(0),
        }
    }
}

/// Exit counters of one vCPU.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct VcpuStats {
    /// Port-I/O exits.
    pub io: AtomicU64,
    /// MMIO exits.
    pub mmio: AtomicU64,
    /// Accesses no device claimed.
    pub unclaimed: AtomicU64,
    /// Returns from `KVM_RUN` because of a kick or signal.
    pub interrupted: AtomicU64,
    /// Other exits.
    pub other: AtomicU64,
    /// `int3` instructions completed for the emulator.
    pub int3_completed: AtomicU64,
    /// Nanoseconds spent outside `KVM_RUN` handling exits.
    pub handling_ns: AtomicU64,
    /// CPU time of the vCPU thread (guest time included), set when it ends.
    pub thread_cpu_ns: AtomicU64,
}

impl VcpuStats {
    /// All exits counted.
    pub fn exits(&self) -> u64 {
        self.io.load(Ordering::Relaxed)
            + self.mmio.load(Ordering::Relaxed)
            + self.interrupted.load(Ordering::Relaxed)
            + self.other.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    Running,
    Paused,
}

/// A machine reset asked of a parked vCPU ([`VcpuHandle::reset`]).
#[derive(Debug, Clone, PartialEq, Eq)]
enum ResetStep {
    /// Nothing asked.
    Idle,
    /// Put the power-on state back.
    Requested,
    /// Done, with the outcome.
    Done(Result<(), String>),
}

/// Requests to a vCPU thread and its acknowledgements.
#[derive(Debug)]
struct Control {
    /// Set to leave `KVM_RUN` and look at `state`/`stop`.
    pending: AtomicBool,
    stop: AtomicBool,
    state: Mutex<(RunState, bool /* parked */)>,
    reset: Mutex<ResetStep>,
    cv: Condvar,
}

/// The control thread's handle on a running vCPU. Shareable: every method
/// takes `&self`.
#[derive(Debug)]
pub struct VcpuHandle {
    index: u32,
    control: Arc<Control>,
    stats: Arc<VcpuStats>,
    thread: Mutex<Option<JoinHandle<()>>>,
    tid: Arc<std::sync::atomic::AtomicI64>,
    /// A stop gave up on the thread: never wait for it again.
    abandoned: AtomicBool,
}

enum Next {
    Continue,
    /// The guest reset: park until the control thread decides.
    Park,
    Stop,
}

impl VcpuHandle {
    /// Starts vCPU `index` on its own thread. A guest reset (triple fault,
    /// reset system event) parks it, as [`pause`](Self::pause) would; it
    /// cannot be [`reset`](Self::reset).
    pub fn spawn(index: u32, vcpu: VcpuFd, ctx: VcpuContext) -> Result<Self, VcpuError> {
        Self::spawn_resettable(index, vcpu, ctx, None)
    }

    /// As [`spawn`](Self::spawn), keeping `power_on` (the state captured
    /// before the vCPU's first run) for [`reset`](Self::reset).
    pub fn spawn_resettable(
        index: u32,
        vcpu: VcpuFd,
        ctx: VcpuContext,
        power_on: Option<VcpuState>,
    ) -> Result<Self, VcpuError> {
        let control = Arc::new(Control {
            pending: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            state: Mutex::new((RunState::Running, false)),
            reset: Mutex::new(ResetStep::Idle),
            cv: Condvar::new(),
        });
        let stats = Arc::new(VcpuStats::default());
        let tid = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let (c, s, t) = (Arc::clone(&control), Arc::clone(&stats), Arc::clone(&tid));
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                t.store(i64::from(unsafe { libc::gettid() }), Ordering::Release);
                run(index, vcpu, ctx, &c, &s, power_on.as_ref())
            })
            .map_err(|source| VcpuError::Spawn { index, source })?;
        Ok(Self {
            index,
            control,
            stats,
            thread: Mutex::new(Some(thread)),
            tid,
            abandoned: AtomicBool::new(false),
        })
    }

    /// This vCPU's index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Exit counters.
    pub fn stats(&self) -> &VcpuStats {
        &self.stats
    }

    /// Exit counters, shared.
    pub fn stats_arc(&self) -> Arc<VcpuStats> {
        Arc::clone(&self.stats)
    }

    /// The host thread id of the vCPU thread (0 until it started).
    pub fn thread_id(&self) -> i64 {
        self.tid.load(Ordering::Acquire)
    }

    fn kick(&self) {
        self.control.pending.store(true, Ordering::SeqCst);
        if let Some(t) = lock(&self.thread).as_ref() {
            kick::kick(t);
        }
    }

    /// Asks the vCPU to pause and kicks it out of `KVM_RUN`; does not wait
    /// (see [`wait_parked`](Self::wait_parked)).
    pub fn request_pause(&self) {
        lock(&self.control.state).0 = RunState::Paused;
        self.kick();
    }

    /// Waits until the vCPU is parked (out of `KVM_RUN`, waiting to resume)
    /// or its thread ended, re-kicking it every 10 ms, but not past
    /// `deadline`. Returns `false` if it did not park by then: it is still
    /// running guest code or, if a device access blocks, stuck in it. The
    /// pause request stays (it parks when it gets back) until the caller
    /// [`resume`](Self::resume)s it, as [`pause_all`] does.
    pub fn wait_parked(&self, deadline: Instant) -> bool {
        let mut st = lock(&self.control.state);
        while !st.1 && !self.finished() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = match self
                .control
                .cv
                .wait_timeout(st, left.min(std::time::Duration::from_millis(10)))
            {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
            if !st.1 {
                // The kick may have raced with the thread entering the
                // pause check; kicks are idempotent.
                self.kick();
            }
        }
        true
    }

    /// Asks the vCPU to pause and waits until it is out of `KVM_RUN`, at
    /// most until `deadline`; returns whether it parked (see
    /// [`wait_parked`](Self::wait_parked)).
    pub fn pause(&self, deadline: Instant) -> bool {
        self.request_pause();
        self.wait_parked(deadline)
    }

    /// Whether the vCPU is asked to stay paused (by [`pause`](Self::pause)
    /// or because the guest reset); it may still be on its way out of
    /// `KVM_RUN`.
    pub fn is_paused(&self) -> bool {
        lock(&self.control.state).0 == RunState::Paused
    }

    /// Puts the vCPU back in its power-on state (the state given to
    /// [`spawn_resettable`](Self::spawn_resettable)); it stays paused.
    /// Call it only while the vCPU is parked (after [`pause_all`]); waits
    /// for the vCPU thread to do it, at most until `deadline`.
    pub fn reset(&self, deadline: Instant) -> Result<(), String> {
        let index = self.index;
        {
            let st = lock(&self.control.state);
            if !st.1 {
                return Err(format!("vCPU {index} is not paused"));
            }
        }
        *lock(&self.control.reset) = ResetStep::Requested;
        // Wake the parked thread (it checks the reset request first).
        {
            let _st = lock(&self.control.state);
            self.control.cv.notify_all();
        }
        let mut st = lock(&self.control.state);
        loop {
            {
                let mut step = lock(&self.control.reset);
                if let ResetStep::Done(r) = &*step {
                    let r = r.clone();
                    *step = ResetStep::Idle;
                    return r;
                }
            }
            if self.finished() {
                return Err(format!("vCPU {index} ended before it was reset"));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                *lock(&self.control.reset) = ResetStep::Idle;
                return Err(format!(
                    "vCPU {index} did not reset within {} s",
                    ANSWER_DEADLINE.as_secs()
                ));
            }
            st = match self
                .control
                .cv
                .wait_timeout(st, left.min(std::time::Duration::from_millis(10)))
            {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) {
        let mut st = lock(&self.control.state);
        st.0 = RunState::Running;
        self.control.cv.notify_all();
    }

    /// Whether the thread has ended.
    pub fn finished(&self) -> bool {
        lock(&self.thread)
            .as_ref()
            .is_none_or(JoinHandle::is_finished)
    }

    /// Asks the vCPU thread to end and kicks it; does not wait (see
    /// [`wait_stopped`](Self::wait_stopped)).
    pub fn request_stop(&self) {
        self.control.stop.store(true, Ordering::SeqCst);
        self.resume();
        self.kick();
    }

    /// Waits for the thread to end, kicking it every millisecond, and joins
    /// it; gives up at `deadline` and returns `false` (the thread is then
    /// left running, stuck where it is, and never waited for again: the
    /// caller must not free what it may still use, such as guest memory).
    pub fn wait_stopped(&self, deadline: Instant) -> bool {
        let mut slot = lock(&self.thread);
        let Some(t) = slot.as_ref() else {
            return true;
        };
        if self.abandoned.load(Ordering::Relaxed) {
            return false;
        }
        while !t.is_finished() {
            if Instant::now() >= deadline {
                self.abandoned.store(true, Ordering::Relaxed);
                return false;
            }
            kick::kick(t);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if let Some(t) = slot.take() {
            let _ = t.join();
        }
        true
    }

    /// Stops the vCPU thread and waits for it to end, at most until
    /// `deadline`; returns whether it ended (see
    /// [`wait_stopped`](Self::wait_stopped)).
    pub fn stop(&self, deadline: Instant) -> bool {
        self.request_stop();
        self.wait_stopped(deadline)
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        if self.abandoned.load(Ordering::Relaxed) {
            return;
        }
        if !self.stop(Instant::now() + ANSWER_DEADLINE) {
            log::error!(
                "vCPU {} did not exit within {} s; leaving its thread behind",
                self.index,
                ANSWER_DEADLINE.as_secs()
            );
        }
    }
}

/// How long `pause`, `stop` and the end of a run wait for vCPUs to answer.
pub const ANSWER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Some vCPUs did not answer a request in time.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("vCPU {} did not {what} within {} s", list(.indexes), .within.as_secs())]
pub struct NotAnswering {
    /// The vCPUs that did not answer, by index.
    pub indexes: Vec<u32>,
    /// What they were asked ("pause", "exit").
    pub what: &'static str,
    /// How long they were given.
    pub within: std::time::Duration,
}

fn list(indexes: &[u32]) -> String {
    indexes
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Pauses every vCPU, all asked at once, waiting at most `within` in all.
/// If some did not park, every vCPU is resumed (the VM is left running, as
/// before) and the laggards are named in the error.
pub fn pause_all(vcpus: &[VcpuHandle], within: std::time::Duration) -> Result<(), NotAnswering> {
    let deadline = Instant::now() + within;
    vcpus.iter().for_each(VcpuHandle::request_pause);
    let indexes: Vec<u32> = vcpus
        .iter()
        .filter(|v| !v.wait_parked(deadline))
        .map(VcpuHandle::index)
        .collect();
    if indexes.is_empty() {
        return Ok(());
    }
    vcpus.iter().for_each(VcpuHandle::resume);
    Err(NotAnswering {
        indexes,
        what: "pause",
        within,
    })
}

/// Stops every vCPU, all asked at once, waiting at most `within` in all.
/// The error names the vCPUs whose threads did not end (left behind, see
/// [`VcpuHandle::wait_stopped`]).
pub fn stop_all(vcpus: &[VcpuHandle], within: std::time::Duration) -> Result<(), NotAnswering> {
    let deadline = Instant::now() + within;
    vcpus.iter().for_each(VcpuHandle::request_stop);
    let indexes: Vec<u32> = vcpus
        .iter()
        .filter(|v| !v.wait_stopped(deadline))
        .map(VcpuHandle::index)
        .collect();
    if indexes.is_empty() {
        Ok(())
    } else {
        Err(NotAnswering {
            indexes,
            what: "exit",
            within,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn run(
    index: u32,
    mut vcpu: VcpuFd,
    ctx: VcpuContext,
    control: &Control,
    stats: &VcpuStats,
    power_on: Option<&VcpuState>,
) {
    // Before anything the guest can influence runs on this thread.
    if let Some(filter) = &ctx.seccomp
        && let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadKind::Vcpu, filter)
    {
        ctx.fatal
            .report(format!("vCPU {index}: {}", crate::error_chain(&e)));
        return;
    }
    // vCPU threads must never be interrupted by RCU grace periods.
    rcu::set_reader_mode(rcu::ReaderMode::Fenced);
    let immediate_exit: *mut u8 = &mut vcpu.get_kvm_run().immediate_exit;
    // SAFETY: the pointer is into this vCPU's kvm_run mapping, which lives as
    // long as `vcpu`; it is cleared below before `vcpu` is dropped.
    unsafe { kick::set_thread_vcpu(immediate_exit) };
    // A panic here is a bug in the VMM (never a guest's doing): stop the VM
    // with a message instead of leaving it running without this vCPU.
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_loop(index, &mut vcpu, &ctx, control, stats, power_on);
    }));
    if let Err(p) = ran {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string());
        ctx.fatal
            .report(format!("vCPU {index}: internal error (a VMM bug): {what}"));
    }
    kick::clear_thread_vcpu();
    stats
        .thread_cpu_ns
        .store(thread_cpu_ns(), Ordering::Relaxed);
}

/// CPU time used by the calling thread.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

fn run_loop(
    index: u32,
    vcpu: &mut VcpuFd,
    ctx: &VcpuContext,
    control: &Control,
    stats: &VcpuStats,
    power_on: Option<&VcpuState>,
) {
    let mut first = true;
    loop {
        if control.pending.swap(false, Ordering::SeqCst) || control.stop.load(Ordering::SeqCst) {
            if control.stop.load(Ordering::SeqCst) {
                return;
            }
            if wait_while_paused(control, vcpu, power_on) {
                return;
            }
        }
        if first {
            first = false;
            let ns = u64::try_from(ctx.marks.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
            let _ = ctx.marks.first_run_ns.compare_exchange(
                0,
                ns,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        let result = vcpu.run();
        let t = Instant::now();
        let next = match result {
            Ok(exit) => handle_exit(index, exit, ctx, stats),
            Err(e) => match e.errno() {
                libc::EINTR => {
                    stats.interrupted.fetch_add(1, Ordering::Relaxed);
                    Ok(Next::Continue)
                }
                libc::EAGAIN => Ok(Next::Continue),
                libc::EFAULT => Err(NeedsVcpu::Fatal(format!(
                    "vCPU {index}: KVM_RUN failed: {e}: the guest accessed memory the host \
                     does not back for it (such as a write to an unplugged hot-plug block)"
                ))),
                _ => Err(NeedsVcpu::Fatal(format!(
                    "vCPU {index}: KVM_RUN failed: {e}"
                ))),
            },
        };
        // Clear a kick's immediate exit before the next KVM_RUN (requests
        // are re-checked at the top of the loop first).
        vcpu.set_kvm_immediate_exit(0);
        let next = match next {
            Err(NeedsVcpu::InternalError) => {
                let g = rcu::read_lock();
                match emulation::handle_internal_error(vcpu, index, ctx.memory.read(&g)) {
                    Outcome::Completed => {
                        stats.int3_completed.fetch_add(1, Ordering::Relaxed);
                        Next::Continue
                    }
                    Outcome::Fatal(msg) => {
                        ctx.fatal.report(msg);
                        Next::Stop
                    }
                }
            }
            Err(NeedsVcpu::Fatal(msg)) => {
                ctx.fatal.report(msg);
                Next::Stop
            }
            Ok(n) => n,
        };
        stats.handling_ns.fetch_add(
            u64::try_from(t.elapsed().as_nanos()).unwrap_or(0),
            Ordering::Relaxed,
        );
        match next {
            Next::Stop => return,
            Next::Park => {
                // Parked like a pause: the control thread resets the
                // machine (or ends it) and resumes it.
                lock(&control.state).0 = RunState::Paused;
                control.pending.store(true, Ordering::SeqCst);
            }
            Next::Continue => {}
        }
    }
}

/// Blocks while the vCPU is paused, putting its power-on state back when
/// the control thread asks ([`VcpuHandle::reset`]); returns `true` if it
/// must stop.
fn wait_while_paused(control: &Control, vcpu: &VcpuFd, power_on: Option<&VcpuState>) -> bool {
    let mut st = lock(&control.state);
    while st.0 == RunState::Paused && !control.stop.load(Ordering::SeqCst) {
        st.1 = true;
        {
            let mut reset = lock(&control.reset);
            if *reset == ResetStep::Requested {
                let outcome = match power_on {
                    Some(s) => s.restore(vcpu).map_err(|e| crate::error_chain(&e)),
                    None => Err("no power-on state was kept".to_string()),
                };
                *reset = ResetStep::Done(outcome);
            }
        }
        control.cv.notify_all();
        st = match control.cv.wait(st) {
            Ok(g) => g,
            Err(e) => e.into_inner(),
        };
    }
    st.1 = false;
    control.stop.load(Ordering::SeqCst)
}

/// Exits that need the vCPU itself (not just the exit data) to handle.
enum NeedsVcpu {
    InternalError,
    Fatal(String),
}

impl From<String> for NeedsVcpu {
    fn from(s: String) -> Self {
        NeedsVcpu::Fatal(s)
    }
}

fn handle_exit(
    index: u32,
    exit: VcpuExit<'_>,
    ctx: &VcpuContext,
    stats: &VcpuStats,
) -> Result<Next, NeedsVcpu> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            stats.io.fetch_add(1, Ordering::Relaxed);
            let g = rcu::read_lock();
            if !ctx.pio.read(&g).dispatch_read(u64::from(port), data) {
                stats.unclaimed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Next::Continue)
        }
        VcpuExit::IoOut(port, data) => {
            stats.io.fetch_add(1, Ordering::Relaxed);
            let g = rcu::read_lock();
            if !ctx.pio.read(&g).dispatch_write(u64::from(port), data) {
                stats.unclaimed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Next::Continue)
        }
        VcpuExit::MmioRead(addr, data) => {
            stats.mmio.fetch_add(1, Ordering::Relaxed);
            let g = rcu::read_lock();
            if !ctx.mmio.read(&g).dispatch_read(addr, data) {
                stats.unclaimed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Next::Continue)
        }
        VcpuExit::MmioWrite(addr, data) => {
            stats.mmio.fetch_add(1, Ordering::Relaxed);
            let g = rcu::read_lock();
            if !ctx.mmio.read(&g).dispatch_write(addr, data) {
                stats.unclaimed.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Next::Continue)
        }
        VcpuExit::Shutdown => {
            // Triple fault: a reset. The control thread reboots the
            // machine or ends it (`--on-reset`).
            stats.other.fetch_add(1, Ordering::Relaxed);
            ctx.exit.request(ExitRequest::Reset);
            Ok(Next::Park)
        }
        VcpuExit::SystemEvent(kind, _) => {
            stats.other.fetch_add(1, Ordering::Relaxed);
            match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                    ctx.exit.request(ExitRequest::PowerOff);
                }
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                    ctx.exit.request(ExitRequest::Reset);
                    return Ok(Next::Park);
                }
                other => {
                    return Err(format!("vCPU {index}: guest system event {other} (crash)").into());
                }
            }
            Ok(Next::Stop)
        }
        VcpuExit::Hlt => {
            stats.other.fetch_add(1, Ordering::Relaxed);
            Ok(Next::Continue)
        }
        VcpuExit::Intr => {
            stats.interrupted.fetch_add(1, Ordering::Relaxed);
            Ok(Next::Continue)
        }
        VcpuExit::IoapicEoi(_) => {
            stats.other.fetch_add(1, Ordering::Relaxed);
            Ok(Next::Continue)
        }
        VcpuExit::InternalError => {
            stats.other.fetch_add(1, Ordering::Relaxed);
            Err(NeedsVcpu::InternalError)
        }
        VcpuExit::FailEntry(reason, cpu) => Err(format!(
            "vCPU {index}: KVM could not enter the guest (hardware entry failure reason {reason:#x} on host CPU {cpu})"
        )
        .into()),
        other => Err(format!("vCPU {index}: unexpected exit from KVM_RUN: {other:?}").into()),
    }
}
