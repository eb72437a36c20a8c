//! The control thread: one event loop for the console, device requests to
//! end the VM, fatal vCPU errors and termination signals (and, with the QMP
//! server, its clients).

use crate::control::console::{ConsoleInput, ReadEnd};
use crate::control::signals::SignalFd;
use crate::kvm::vcpu::FatalErrors;
use devices::{ExitRequest, ExitSink};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use thiserror::Error;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// Why the VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest powered off or reset.
    Guest(ExitRequest),
    /// The user quit (Ctrl-A x, QMP `quit`).
    Quit,
    /// A termination signal.
    Signal(libc::c_int),
    /// A vCPU hit an error it cannot recover from.
    Fatal(String),
    /// The run's time limit passed (tests).
    Timeout,
    /// A QMP client ended the VM (`quit`, or `system_reset`, which ends it
    /// as QEMU's `-no-reboot` does).
    Qmp(QmpStop),
}

/// Which QMP command ended the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QmpStop {
    /// `quit`.
    Quit,
    /// `system_reset`.
    SystemReset,
}

impl StopReason {
    /// A short description ("guest powered off", "signal 15", ...).
    pub fn describe(&self) -> String {
        match self {
            StopReason::Guest(ExitRequest::PowerOff) => "guest powered off".into(),
            StopReason::Guest(ExitRequest::Reset) => "guest reset".into(),
            StopReason::Quit => "user quit".into(),
            StopReason::Signal(s) => format!("signal {s}"),
            StopReason::Fatal(_) => "fatal error".into(),
            StopReason::Timeout => "time limit".into(),
            StopReason::Qmp(QmpStop::Quit) => "QMP quit".into(),
            StopReason::Qmp(QmpStop::SystemReset) => "QMP system_reset".into(),
        }
    }

    /// Whether this is a machine reset (by the guest or QMP
    /// `system_reset`), which `--on-reset restart` turns into a reboot.
    pub fn is_reset(&self) -> bool {
        matches!(
            self,
            StopReason::Guest(ExitRequest::Reset) | StopReason::Qmp(QmpStop::SystemReset)
        )
    }

    /// The process exit status for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            StopReason::Fatal(_) | StopReason::Timeout => 1,
            _ => 0,
        }
    }
}

/// Errors of the event loop itself.
#[derive(Debug, Error)]
pub enum ControlError {
    /// The event manager failed.
    #[error("control thread event loop failed")]
    EventLoop(#[source] event_manager::Error),
}

/// The shared "VM should stop" slot the subscribers fill.
pub(crate) type StopSlot = Arc<Mutex<Option<StopReason>>>;

/// Records `reason` unless a reason to stop was recorded already; a
/// recorded reset ([`StopReason::is_reset`]) gives way to any other reason.
/// With `--on-reset restart` a reset does not end the VM: a `quit`, signal
/// or fatal error handled in the same loop round after it must not be
/// lost when the machine reboots.
pub(crate) fn set_stop(slot: &StopSlot, reason: StopReason) {
    let mut s = slot
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let replace = match &*s {
        None => true,
        Some(old) => old.is_reset() && !reason.is_reset(),
    };
    if replace {
        *s = Some(reason);
    }
}

/// Watches device exit requests, fatal errors and signals.
#[derive(Debug)]
pub(crate) struct Lifecycle {
    exit: Arc<ExitSink>,
    fatal: Arc<FatalErrors>,
    signals: SignalFd,
    stop: StopSlot,
}

impl Lifecycle {
    /// A watcher that records the first reason to stop in `stop`.
    pub(crate) fn new(
        exit: Arc<ExitSink>,
        fatal: Arc<FatalErrors>,
        signals: SignalFd,
        stop: StopSlot,
    ) -> Self {
        Self {
            exit,
            fatal,
            signals,
            stop,
        }
    }
}

impl MutEventSubscriber for Lifecycle {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [
            self.exit.event_fd().as_raw_fd(),
            self.fatal.event_fd().as_raw_fd(),
            self.signals.as_raw_fd(),
        ] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("cannot watch a lifecycle event: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.fatal.event_fd().as_raw_fd() {
            let _ = self.fatal.event_fd().read();
            if let Some(msg) = self.fatal.first() {
                set_stop(&self.stop, StopReason::Fatal(msg));
            }
        } else if fd == self.exit.event_fd().as_raw_fd() {
            let _ = self.exit.event_fd().read();
            if let Some(req) = self.exit.first() {
                set_stop(&self.stop, StopReason::Guest(req));
            }
        } else if fd == self.signals.as_raw_fd()
            && let Some(sig) = self.signals.read()
        {
            set_stop(&self.stop, StopReason::Signal(sig));
        }
    }
}

/// Feeds stdin to the guest's serial port.
#[derive(Debug)]
pub(crate) struct Console {
    input: ConsoleInput,
    drained: EventFd,
    stdin_open: bool,
    stdin_watched: bool,
    stop: StopSlot,
    /// Where input comes from: stdin, or another descriptor in tests.
    fd: std::os::fd::RawFd,
}

/// Pending input above which stdin is not read until the guest catches up.
const MAX_PENDING: usize = 64 * 1024;

impl Console {
    /// A console for `input` reading stdin; `drained` fires when the guest
    /// emptied the FIFO.
    pub(crate) fn new(input: ConsoleInput, drained: EventFd, stop: StopSlot) -> Self {
        Self::with_input_fd(input, drained, stop, libc::STDIN_FILENO)
    }

    /// As [`new`](Self::new), reading `fd` instead of stdin (which must stay
    /// open as long as this console is in an event loop).
    pub(crate) fn with_input_fd(
        input: ConsoleInput,
        drained: EventFd,
        stop: StopSlot,
        fd: std::os::fd::RawFd,
    ) -> Self {
        Self {
            input,
            drained,
            stdin_open: true,
            stdin_watched: false,
            stop,
            fd,
        }
    }

    fn watch_stdin(&mut self, ops: &mut EventOps, on: bool) {
        let ev = Events::new_raw(self.fd, EventSet::IN);
        if on && !self.stdin_watched && self.stdin_open {
            match ops.add(ev) {
                Ok(()) => self.stdin_watched = true,
                Err(e) => {
                    // Regular files and /dev/null cannot be polled: the guest
                    // then gets no console input.
                    log::debug!("stdin not usable as console input: {e}");
                    self.stdin_open = false;
                }
            }
        } else if !on && self.stdin_watched {
            let _ = ops.remove(ev);
            self.stdin_watched = false;
        }
    }
}

impl MutEventSubscriber for Console {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.drained, EventSet::IN)) {
            log::error!("cannot watch the serial input FIFO: {e}");
        }
        self.watch_stdin(ops, true);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.drained.as_raw_fd() {
            let _ = self.drained.read();
            self.input.flush();
        } else if events.fd() == self.fd {
            let room = MAX_PENDING.saturating_sub(self.input.pending_len());
            let input = &mut self.input;
            let mut quit = false;
            match crate::control::console::read_available(self.fd, room.max(1), |chunk| {
                quit = input.input(chunk);
                !quit
            }) {
                ReadEnd::Drained | ReadEnd::Limit | ReadEnd::Stopped => {}
                ReadEnd::Eof => {
                    self.watch_stdin(ops, false);
                    self.stdin_open = false;
                }
                ReadEnd::Failed(e) => {
                    log::warn!("console input closed: {e}");
                    self.watch_stdin(ops, false);
                    self.stdin_open = false;
                }
            }
            if quit {
                set_stop(&self.stop, StopReason::Quit);
            }
        }
        let full = self.input.pending_len() > MAX_PENDING;
        self.watch_stdin(ops, !full);
    }
}

/// The control thread's event loop.
pub(crate) struct ControlLoop {
    em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    stop: StopSlot,
    deadline: Option<std::time::Instant>,
    tick: Option<Tick>,
}

/// Periodic work of the control thread: called on every loop round with
/// the time; returns how long the loop may wait before calling it again.
pub(crate) type Tick = Box<dyn FnMut(std::time::Instant) -> std::time::Duration + Send>;

impl std::fmt::Debug for ControlLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlLoop").finish_non_exhaustive()
    }
}

impl ControlLoop {
    /// An empty loop with its stop slot.
    pub(crate) fn new(stop: StopSlot) -> Result<Self, ControlError> {
        Ok(Self {
            em: EventManager::new().map_err(ControlError::EventLoop)?,
            stop,
            deadline: None,
            tick: None,
        })
    }

    /// Adds an event source.
    pub(crate) fn add(&mut self, s: Arc<Mutex<dyn MutEventSubscriber + Send>>) {
        self.em.add_subscriber(s);
    }

    /// Calls `tick` on every round of the loop (see [`Tick`]).
    pub(crate) fn set_tick(&mut self, tick: Tick) {
        self.tick = Some(tick);
    }

    /// Makes [`run`](Self::run) return [`StopReason::Timeout`] at `when`.
    pub(crate) fn set_deadline(&mut self, when: std::time::Instant) {
        self.deadline = Some(when);
    }

    /// Runs until a subscriber records a reason to stop, and returns it.
    pub(crate) fn run(&mut self) -> Result<StopReason, ControlError> {
        loop {
            if self
                .deadline
                .is_some_and(|d| std::time::Instant::now() >= d)
            {
                set_stop(&self.stop, StopReason::Timeout);
            }
            if let Some(r) = self
                .stop
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
            {
                return Ok(r);
            }
            let now = std::time::Instant::now();
            let mut wait = std::time::Duration::from_secs(1);
            if let Some(t) = self.tick.as_mut() {
                wait = wait.min(t(now));
            }
            if let Some(d) = self.deadline {
                wait = wait.min(d.saturating_duration_since(now));
            }
            let wait_ms = wait.as_millis().clamp(1, 1000) as i32;
            match self.em.run_with_timeout(wait_ms) {
                Ok(_) => {}
                Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EINTR => {}
                Err(e) => return Err(ControlError::EventLoop(e)),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A reset recorded first does not hide a quit recorded after it in
    /// the same loop round (the reboot would otherwise drop the quit); any
    /// other first reason still wins.
    #[test]
    fn a_reset_gives_way_to_a_later_reason_to_stop() {
        let slot: StopSlot = Arc::new(Mutex::new(None));
        set_stop(&slot, StopReason::Guest(ExitRequest::Reset));
        set_stop(&slot, StopReason::Qmp(QmpStop::SystemReset));
        assert_eq!(
            *slot.lock().unwrap(),
            Some(StopReason::Guest(ExitRequest::Reset))
        );
        set_stop(&slot, StopReason::Qmp(QmpStop::Quit));
        assert_eq!(*slot.lock().unwrap(), Some(StopReason::Qmp(QmpStop::Quit)));
        set_stop(&slot, StopReason::Signal(15));
        set_stop(&slot, StopReason::Guest(ExitRequest::Reset));
        assert_eq!(*slot.lock().unwrap(), Some(StopReason::Qmp(QmpStop::Quit)));
    }
    use devices::Serial;
    use std::io::Write;

    /// A burst larger than one read chunk, with `Ctrl-A x` at its end, is
    /// taken in one readiness event: the quit is seen at once, not at the
    /// next keystroke.
    #[test]
    fn one_readiness_event_takes_a_whole_burst_of_console_input() {
        let (r, mut w) = std::io::pipe().unwrap();
        let irq = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let serial = Arc::new(Serial::new(irq, Box::new(std::io::sink()), None));
        let stop: StopSlot = Arc::new(Mutex::new(None));
        let console = Console::with_input_fd(
            ConsoleInput::new(Arc::clone(&serial), true),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            Arc::clone(&stop),
            r.as_raw_fd(),
        );
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        em.add_subscriber(Arc::new(Mutex::new(console)));
        let mut burst = vec![b'a'; 10 * 1024];
        burst.extend_from_slice(b"\x01x");
        w.write_all(&burst).unwrap();
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1, "one event");
        assert_eq!(*stop.lock().unwrap(), Some(StopReason::Quit));
        // All of it was read: the pipe is empty.
        let mut p = libc::pollfd {
            fd: r.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, timeout 0.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 0) }, 0);
        // The guest's share went to the serial FIFO as far as it fits.
        assert_eq!(serial.input_capacity(), 0);
    }
}
