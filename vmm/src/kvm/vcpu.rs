//! vCPU threads: the run loop, exit dispatch through the RCU-published
//! buses, and pause / resume / stop requests.
//!
//! A vCPU thread reads the buses and the guest memory map inside RCU read
//! sections, in `Fenced` reader mode so grace periods never need to interrupt
//! it (see the `rcu` crate). Nothing on the exit path takes a lock shared with
//! other vCPUs: the bus tables are immutable and each device has its own lock.

use crate::kvm::emulation::{self, Outcome};
use crate::kvm::kick;
use crate::kvm::triple_fault;
use crate::kvm::vcpu_state::VcpuState;
use crate::memory::guest_memory::SharedGuestMap;
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
pub(crate) struct VcpuContext {
    /// The port-I/O bus.
    pub pio: Arc<RcuCell<Bus>>,
    /// The MMIO bus.
    pub mmio: Arc<RcuCell<Bus>>,
    /// The guest memory map.
    pub memory: SharedGuestMap,
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

/// Where a vCPU thread is in its life, as its handle sees it. Every
/// transition is made under [`Control::inner`]'s lock and announced on
/// [`Control::cv`]:
///
/// ```text
///            request_pause               the thread is out of KVM_RUN
///  Running ────────────────▶ Pausing ──────────────────────────────▶ Parked
///     ▲ ▲                       │                                    │ │ reset: the thread puts
///     │ └──────── resume ───────┘                                    │ │ its power-on state back
///     └───────────────────────────── resume ─────────────────────────┘ ◀┘ and stays Parked
///  Running ── the guest resets (triple fault, reset event) ──▶ Pausing (then Parked)
///  any state but Exited ── request_stop ──▶ Stopping ── the thread ends ──▶ Exited
///  any state ── the thread ends (power-off, fatal error, panic) ──▶ Exited
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VcpuRunState {
    /// In `KVM_RUN`, or on its way in or out of it.
    Running,
    /// Asked to park; it parks at its next pass through the top of its loop.
    Pausing,
    /// Out of `KVM_RUN`, waiting on [`Control::cv`] for a resume, a reset
    /// or a stop.
    Parked,
    /// Asked to end; it ends at its next pass through the top of its loop
    /// (at once if parked).
    Stopping,
    /// The thread's run function returned (it may still be unwinding its
    /// thread-locals; joining it does not wait on the guest).
    Exited,
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

/// The part of [`Control`] under its lock.
#[derive(Debug)]
struct Inner {
    state: VcpuRunState,
    reset: ResetStep,
}

/// Requests to a vCPU thread and its answers.
#[derive(Debug)]
struct Control {
    /// Set, before the kick, whenever `inner.state` asks the thread to leave
    /// `KVM_RUN`; the thread clears it at the top of its loop and then
    /// looks at the state. A kick that lands before `KVM_RUN` makes it
    /// return at once (`immediate_exit`), so one kick per request is enough.
    pending: AtomicBool,
    inner: Mutex<Inner>,
    cv: Condvar,
}

impl Control {
    /// Moves to `to` and wakes every waiter.
    fn set(&self, inner: &mut Inner, to: VcpuRunState) {
        inner.state = to;
        self.cv.notify_all();
    }

    /// Waits on the condition variable until `done` holds or `deadline`
    /// passes; returns the guard and whether `done` held.
    fn wait_until<'a>(
        &self,
        mut g: std::sync::MutexGuard<'a, Inner>,
        deadline: Instant,
        mut done: impl FnMut(&mut Inner) -> bool,
    ) -> (std::sync::MutexGuard<'a, Inner>, bool) {
        loop {
            if done(&mut g) {
                return (g, true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (g, false);
            }
            g = match self.cv.wait_timeout(g, left) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }
}

/// Marks the vCPU [`VcpuRunState::Exited`] when its thread's run function
/// ends, however it ends (return, early error or panic).
struct ExitedOnDrop(Arc<Control>);

impl Drop for ExitedOnDrop {
    fn drop(&mut self) {
        let mut g = lock(&self.0.inner);
        self.0.set(&mut g, VcpuRunState::Exited);
    }
}

/// The control thread's handle on a running vCPU. Shareable: every method
/// takes `&self`.
#[derive(Debug)]
pub(crate) struct VcpuHandle {
    index: u32,
    control: Arc<Control>,
    stats: Arc<VcpuStats>,
    thread: Mutex<Option<JoinHandle<()>>>,
    tid: Arc<std::sync::atomic::AtomicI64>,
    /// A stop gave up on the thread: never wait for it again.
    abandoned: AtomicBool,
}

impl VcpuHandle {
    /// Starts vCPU `index` on its own thread, keeping `power_on` (the state
    /// captured before the vCPU's first run) for [`reset`](Self::reset). A
    /// guest reset (triple fault, reset system event) parks it, as
    /// [`request_pause`](Self::request_pause) would; without `power_on` it
    /// cannot be reset.
    pub(crate) fn spawn(
        index: u32,
        vcpu: VcpuFd,
        ctx: VcpuContext,
        power_on: Option<VcpuState>,
    ) -> Result<Self, VcpuError> {
        let control = Arc::new(Control {
            pending: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                state: VcpuRunState::Running,
                reset: ResetStep::Idle,
            }),
            cv: Condvar::new(),
        });
        let stats = Arc::new(VcpuStats::default());
        let tid = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let (c, s, t) = (Arc::clone(&control), Arc::clone(&stats), Arc::clone(&tid));
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let _exited = ExitedOnDrop(Arc::clone(&c));
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
    pub(crate) fn index(&self) -> u32 {
        self.index
    }

    /// Exit counters, shared.
    pub(crate) fn stats_arc(&self) -> Arc<VcpuStats> {
        Arc::clone(&self.stats)
    }

    /// The host thread id of the vCPU thread (0 until it started).
    pub(crate) fn thread_id(&self) -> i64 {
        self.tid.load(Ordering::Acquire)
    }

    /// Makes the thread look at its state: `pending` first, then the signal
    /// that takes it out of `KVM_RUN`.
    fn kick(&self) {
        self.control.pending.store(true, Ordering::SeqCst);
        if let Some(t) = lock(&self.thread).as_ref() {
            kick::kick(t);
        }
    }

    /// Asks the vCPU to pause and kicks it out of `KVM_RUN`; does not wait
    /// (see [`wait_parked`](Self::wait_parked)). No effect on a vCPU that is
    /// stopping or has ended.
    pub(crate) fn request_pause(&self) {
        {
            let mut g = lock(&self.control.inner);
            if g.state == VcpuRunState::Running {
                self.control.set(&mut g, VcpuRunState::Pausing);
            }
        }
        self.kick();
    }

    /// Waits until the vCPU is parked (out of `KVM_RUN`, waiting to resume)
    /// or its thread ended, but not past `deadline`. Returns `false` if it
    /// did not park by then: it is still running guest code or, if a device
    /// access blocks, stuck in it. The pause request stays (it parks when it
    /// gets back) until the caller [`resume`](Self::resume)s it, as
    /// [`pause_all`] does.
    pub(crate) fn wait_parked(&self, deadline: Instant) -> bool {
        let g = lock(&self.control.inner);
        let (_g, parked) = self.control.wait_until(g, deadline, |i| {
            matches!(i.state, VcpuRunState::Parked | VcpuRunState::Exited)
        });
        parked
    }

    /// Puts the vCPU back in its power-on state (the state given to
    /// [`spawn`](Self::spawn)); it stays paused.
    /// Call it only while the vCPU is parked (after [`pause_all`]); waits
    /// for the vCPU thread to do it, at most until `deadline`.
    pub(crate) fn reset(&self, deadline: Instant) -> Result<(), String> {
        let index = self.index;
        let mut g = lock(&self.control.inner);
        if g.state != VcpuRunState::Parked {
            return Err(format!("vCPU {index} is not paused"));
        }
        g.reset = ResetStep::Requested;
        self.control.cv.notify_all();
        let (mut g, answered) = self.control.wait_until(g, deadline, |i| {
            matches!(i.reset, ResetStep::Done(_)) || i.state == VcpuRunState::Exited
        });
        match std::mem::replace(&mut g.reset, ResetStep::Idle) {
            ResetStep::Done(r) => r,
            _ if g.state == VcpuRunState::Exited => {
                Err(format!("vCPU {index} ended before it was reset"))
            }
            _ => {
                debug_assert!(!answered);
                Err(format!(
                    "vCPU {index} did not reset within {} s",
                    ANSWER_DEADLINE.as_secs()
                ))
            }
        }
    }

    /// Lets a paused vCPU run again (no effect on one that is stopping or
    /// has ended).
    pub(crate) fn resume(&self) {
        let mut g = lock(&self.control.inner);
        if matches!(g.state, VcpuRunState::Pausing | VcpuRunState::Parked) {
            self.control.set(&mut g, VcpuRunState::Running);
        }
    }

    /// Asks the vCPU thread to end and kicks it (a parked one is woken);
    /// does not wait (see [`wait_stopped`](Self::wait_stopped)).
    pub(crate) fn request_stop(&self) {
        {
            let mut g = lock(&self.control.inner);
            if g.state != VcpuRunState::Exited {
                self.control.set(&mut g, VcpuRunState::Stopping);
            }
        }
        self.kick();
    }

    /// Waits for the thread to end and joins it; gives up at `deadline` and
    /// returns `false` (the thread is then left running, stuck where it is,
    /// and never waited for again: the caller must not free what it may
    /// still use, such as guest memory).
    pub(crate) fn wait_stopped(&self, deadline: Instant) -> bool {
        if self.abandoned.load(Ordering::Relaxed) {
            return false;
        }
        let g = lock(&self.control.inner);
        let (g, exited) = self
            .control
            .wait_until(g, deadline, |i| i.state == VcpuRunState::Exited);
        drop(g);
        if !exited {
            self.abandoned.store(true, Ordering::Relaxed);
            return false;
        }
        // The run function has returned: what is left is the thread's own
        // teardown, which does not wait on the guest.
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
        true
    }

    /// Stops the vCPU thread and waits for it to end, at most until
    /// `deadline`; returns whether it ended (see
    /// [`wait_stopped`](Self::wait_stopped)).
    pub(crate) fn stop(&self, deadline: Instant) -> bool {
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
pub(crate) const ANSWER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Some vCPUs did not answer a request in time.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("vCPU {} did not {what} within {} s", list(.indexes), .within.as_secs())]
pub(crate) struct NotAnswering {
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
pub(crate) fn pause_all(
    vcpus: &[VcpuHandle],
    within: std::time::Duration,
) -> Result<(), NotAnswering> {
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
pub(crate) fn stop_all(
    vcpus: &[VcpuHandle],
    within: std::time::Duration,
) -> Result<(), NotAnswering> {
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

/// What an exit asks of the vCPU thread once it is handled.
enum ExitAction {
    /// Enter the guest again.
    Resume,
    /// The guest reset: park until the control thread resets the machine
    /// (or ends it).
    Park,
    /// The guest powered off: end the thread.
    Stop,
    /// Stop the VM with this message (the thread ends).
    Fatal(String),
}

/// How far handling an exit got while the exit data borrowed the vCPU.
enum Handled {
    /// Handled; the thread does this next.
    Done(ExitAction),
    /// KVM could not emulate an instruction: the emulation fallback needs
    /// the vCPU itself (its registers), so it runs after the exit data is
    /// dropped.
    NeedsEmulation,
    /// A triple fault: the guest resets. Its state is logged first, which
    /// needs the vCPU itself.
    TripleFault,
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
    // Set while the last exit was port I/O or MMIO: KVM finishes such an
    // instruction (stores what a read returned, moves RIP past it) only at
    // the start of the next KVM_RUN. Before the thread parks (and so before
    // a reset puts the power-on state back) or ends, it gives KVM that
    // KVM_RUN with immediate_exit set, which finishes the instruction and
    // runs no further guest code (KVM's API documentation, KVM_EXIT_IO and
    // KVM_EXIT_MMIO). Without it, the first KVM_RUN after a reset finished
    // the old guest's read on top of the restored registers and resumed
    // after it.
    let mut io_unfinished = false;
    loop {
        if io_unfinished && control.pending.load(Ordering::SeqCst) {
            vcpu.set_kvm_immediate_exit(1);
        } else if control.pending.swap(false, Ordering::SeqCst)
            && !answer_requests(control, vcpu, power_on)
        {
            return;
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
        io_unfinished = matches!(
            result,
            Ok(VcpuExit::IoIn(..)
                | VcpuExit::IoOut(..)
                | VcpuExit::MmioRead(..)
                | VcpuExit::MmioWrite(..))
        );
        let handled = match result {
            Ok(exit) => handle_exit(index, exit, ctx, stats),
            Err(e) => Handled::Done(match e.errno() {
                libc::EINTR => {
                    stats.interrupted.fetch_add(1, Ordering::Relaxed);
                    ExitAction::Resume
                }
                libc::EAGAIN => ExitAction::Resume,
                libc::EFAULT => ExitAction::Fatal(format!(
                    "vCPU {index}: KVM_RUN failed: {e}: the guest accessed memory the host \
                     does not back for it (such as a write to an unplugged hot-plug block)"
                )),
                _ => ExitAction::Fatal(format!("vCPU {index}: KVM_RUN failed: {e}")),
            }),
        };
        // Clear a kick's immediate exit before the next KVM_RUN (requests
        // are re-checked at the top of the loop first).
        vcpu.set_kvm_immediate_exit(0);
        let action = match handled {
            Handled::Done(action) => action,
            Handled::NeedsEmulation => {
                let g = rcu::read_lock();
                match emulation::handle_internal_error(vcpu, index, ctx.memory.read(&g)) {
                    Outcome::Completed => {
                        stats.int3_completed.fetch_add(1, Ordering::Relaxed);
                        ExitAction::Resume
                    }
                    Outcome::Fatal(msg) => ExitAction::Fatal(msg),
                }
            }
            Handled::TripleFault => {
                // Said apart from a reset the guest asks for, which a
                // device logs; the state is the only trace a surprise
                // reset leaves.
                let g = rcu::read_lock();
                log::info!(
                    "vCPU {index}: triple fault: the guest resets; {}",
                    triple_fault::describe(vcpu, ctx.memory.read(&g))
                );
                drop(g);
                ctx.exit.request(ExitRequest::Reset);
                ExitAction::Park
            }
        };
        stats.handling_ns.fetch_add(
            u64::try_from(t.elapsed().as_nanos()).unwrap_or(0),
            Ordering::Relaxed,
        );
        match action {
            ExitAction::Resume => {}
            ExitAction::Park => {
                // Parked like a pause (Running -> Pausing): the control
                // thread resets the machine (or ends it) and resumes it.
                let mut g = lock(&control.inner);
                if g.state == VcpuRunState::Running {
                    control.set(&mut g, VcpuRunState::Pausing);
                }
                control.pending.store(true, Ordering::SeqCst);
            }
            ExitAction::Stop => return,
            ExitAction::Fatal(msg) => {
                ctx.fatal.report(msg);
                return;
            }
        }
    }
}

/// Answers what the control thread asked (the thread saw `pending`): parks
/// while paused (Pausing -> Parked), putting the power-on state back when a
/// reset is asked; returns `false` if the thread must end.
fn answer_requests(control: &Control, vcpu: &VcpuFd, power_on: Option<&VcpuState>) -> bool {
    let mut g = lock(&control.inner);
    loop {
        match g.state {
            VcpuRunState::Running => return true,
            VcpuRunState::Stopping | VcpuRunState::Exited => return false,
            VcpuRunState::Pausing | VcpuRunState::Parked => {
                if g.reset == ResetStep::Requested {
                    g.reset = ResetStep::Done(match power_on {
                        Some(s) => s.restore(vcpu).map_err(|e| crate::error_chain(&e)),
                        None => Err("no power-on state was kept".to_string()),
                    });
                }
                control.set(&mut g, VcpuRunState::Parked);
                g = match control.cv.wait(g) {
                    Ok(g) => g,
                    Err(e) => e.into_inner(),
                };
            }
        }
    }
}

/// A guest access to a bus, as the exit gives it.
enum BusAccess<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

/// Hands an I/O or MMIO access to the device the bus maps `addr` to, inside
/// a read section; counts it in `kind` (and in `unclaimed` if no device
/// claims it: reads of unclaimed addresses return what the bus fills in).
fn dispatch(
    bus: &RcuCell<Bus>,
    kind: &AtomicU64,
    stats: &VcpuStats,
    addr: u64,
    access: BusAccess<'_>,
) -> Handled {
    kind.fetch_add(1, Ordering::Relaxed);
    let g = rcu::read_lock();
    let bus = bus.read(&g);
    let claimed = match access {
        BusAccess::Read(data) => bus.dispatch_read(addr, data),
        BusAccess::Write(data) => bus.dispatch_write(addr, data),
    };
    if !claimed {
        stats.unclaimed.fetch_add(1, Ordering::Relaxed);
    }
    Handled::Done(ExitAction::Resume)
}

fn handle_exit(index: u32, exit: VcpuExit<'_>, ctx: &VcpuContext, stats: &VcpuStats) -> Handled {
    let done = Handled::Done;
    match exit {
        VcpuExit::IoIn(port, data) => dispatch(
            &ctx.pio,
            &stats.io,
            stats,
            u64::from(port),
            BusAccess::Read(data),
        ),
        VcpuExit::IoOut(port, data) => dispatch(
            &ctx.pio,
            &stats.io,
            stats,
            u64::from(port),
            BusAccess::Write(data),
        ),
        VcpuExit::MmioRead(addr, data) => {
            dispatch(&ctx.mmio, &stats.mmio, stats, addr, BusAccess::Read(data))
        }
        VcpuExit::MmioWrite(addr, data) => {
            dispatch(&ctx.mmio, &stats.mmio, stats, addr, BusAccess::Write(data))
        }
        VcpuExit::Shutdown => {
            // Triple fault: a reset. The control thread reboots the
            // machine or ends it (`--on-reset`).
            stats.other.fetch_add(1, Ordering::Relaxed);
            Handled::TripleFault
        }
        VcpuExit::SystemEvent(kind, _) => {
            stats.other.fetch_add(1, Ordering::Relaxed);
            done(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                    ctx.exit.request(ExitRequest::PowerOff);
                    ExitAction::Stop
                }
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                    ctx.exit.request(ExitRequest::Reset);
                    ExitAction::Park
                }
                other => {
                    ExitAction::Fatal(format!("vCPU {index}: guest system event {other} (crash)"))
                }
            })
        }
        VcpuExit::Hlt | VcpuExit::IoapicEoi(_) => {
            stats.other.fetch_add(1, Ordering::Relaxed);
            done(ExitAction::Resume)
        }
        VcpuExit::Intr => {
            stats.interrupted.fetch_add(1, Ordering::Relaxed);
            done(ExitAction::Resume)
        }
        VcpuExit::InternalError => {
            stats.other.fetch_add(1, Ordering::Relaxed);
            Handled::NeedsEmulation
        }
        VcpuExit::FailEntry(reason, cpu) => done(ExitAction::Fatal(format!(
            "vCPU {index}: KVM could not enter the guest (hardware entry failure reason {reason:#x} on host CPU {cpu})"
        ))),
        other => done(ExitAction::Fatal(format!(
            "vCPU {index}: unexpected exit from KVM_RUN: {other:?}"
        ))),
    }
}
