//! How devices tell the VMM that the guest asked to power off or reset.
//!
//! Devices hold an `Arc<ExitSink>` and call [`ExitSink::request`]; the VMM's control loop
//! watches [`ExitSink::event_fd`] and, once it becomes readable, reads
//! [`ExitSink::first`] to decide what to do. Devices know nothing else about the VMM.

use std::io;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use thiserror::Error;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Errors creating an [`ExitSink`].
#[derive(Debug, Error)]
pub enum ExitError {
    /// The notification eventfd could not be created.
    #[error("cannot create the exit eventfd")]
    EventFd(#[source] io::Error),
}

/// What the guest asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitRequest {
    /// Power off (ACPI S5, ...).
    PowerOff,
    /// Reset the machine (i8042 pulse, ACPI reset register, ...).
    Reset,
}

impl ExitRequest {
    const fn code(self) -> u8 {
        match self {
            ExitRequest::PowerOff => 1,
            ExitRequest::Reset => 2,
        }
    }

    const fn from_code(code: u8) -> Option<ExitRequest> {
        match code {
            1 => Some(ExitRequest::PowerOff),
            2 => Some(ExitRequest::Reset),
            _ => None,
        }
    }
}

/// Records the guest's power-off and reset requests and wakes the VMM on the first.
///
/// Guarantees:
/// - [`request`](ExitSink::request) may be called from any thread (vCPU threads, the
///   control thread), concurrently; it takes no lock, allocates nothing and never
///   blocks.
/// - The first request wins: [`first`](ExitSink::first) returns it forever after, and
///   later requests only increase [`count`](ExitSink::count).
/// - The eventfd is written exactly once, after the first request is recorded, so a
///   thread that sees it readable and then calls `first` gets `Some`.
#[derive(Debug)]
pub struct ExitSink {
    first: AtomicU8,
    power_off: AtomicU64,
    reset: AtomicU64,
    evt: EventFd,
}

impl ExitSink {
    /// Creates a sink with no request recorded and a fresh non-blocking eventfd.
    pub fn new() -> Result<ExitSink, ExitError> {
        Ok(ExitSink {
            first: AtomicU8::new(0),
            power_off: AtomicU64::new(0),
            reset: AtomicU64::new(0),
            evt: EventFd::new(EFD_NONBLOCK).map_err(ExitError::EventFd)?,
        })
    }

    /// Records `request`; returns `true` if it is the first request (the one that wins).
    ///
    /// Never blocks and never fails: if signalling the eventfd fails (it cannot in
    /// practice: it is non-blocking, written once and owned by the sink), the error is
    /// logged and the request stays recorded.
    pub fn request(&self, request: ExitRequest) -> bool {
        let counter = match request {
            ExitRequest::PowerOff => &self.power_off,
            ExitRequest::Reset => &self.reset,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let won = self
            .first
            .compare_exchange(0, request.code(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if won {
            log::info!("guest requested {request:?}");
            if let Err(e) = self.evt.write(1) {
                log::error!("cannot signal the exit request {request:?}: {e}");
            }
        } else {
            log::debug!("guest requested {request:?} after an earlier exit request");
        }
        won
    }

    /// The first request recorded, if any. Once `Some`, it never changes.
    pub fn first(&self) -> Option<ExitRequest> {
        ExitRequest::from_code(self.first.load(Ordering::Acquire))
    }

    /// How many times `request` was made, including the first.
    pub fn count(&self, request: ExitRequest) -> u64 {
        match request {
            ExitRequest::PowerOff => self.power_off.load(Ordering::Relaxed),
            ExitRequest::Reset => self.reset.load(Ordering::Relaxed),
        }
    }

    /// Forgets the recorded request, so that the next one wins and signals again; the
    /// counts are kept. For a machine reset that reboots in place: the VMM calls it on
    /// its control thread while no vCPU runs (a request made concurrently may be
    /// forgotten too). Drains the eventfd first, so it is readable again only after the
    /// next request.
    pub fn rearm(&self) {
        // Not signalled: EAGAIN (non-blocking), nothing to drain.
        let _ = self.evt.read();
        self.first.store(0, Ordering::Release);
    }

    /// The eventfd that becomes readable once the first request is recorded. The VMM
    /// watches it (for example with epoll); reading it is optional, and it is never
    /// written again.
    pub fn event_fd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn first_request_wins_and_signals_once() {
        let sink = ExitSink::new().unwrap();
        assert_eq!(sink.first(), None);
        assert!(
            sink.event_fd().read().is_err(),
            "not readable before a request"
        );

        assert!(sink.request(ExitRequest::Reset));
        assert!(!sink.request(ExitRequest::PowerOff));
        assert!(!sink.request(ExitRequest::Reset));

        assert_eq!(sink.first(), Some(ExitRequest::Reset));
        assert_eq!(sink.count(ExitRequest::Reset), 2);
        assert_eq!(sink.count(ExitRequest::PowerOff), 1);
        assert_eq!(sink.event_fd().read().unwrap(), 1, "signalled exactly once");
    }

    #[test]
    fn rearm_lets_the_next_request_win_and_signal_again() {
        let sink = ExitSink::new().unwrap();
        assert!(sink.request(ExitRequest::Reset));
        sink.rearm();
        assert_eq!(sink.first(), None);
        assert!(sink.event_fd().read().is_err(), "drained by rearm");
        assert!(sink.request(ExitRequest::PowerOff));
        assert_eq!(sink.first(), Some(ExitRequest::PowerOff));
        assert_eq!(sink.event_fd().read().unwrap(), 1, "signalled again");
        assert_eq!(sink.count(ExitRequest::Reset), 1, "counts are kept");
    }

    #[test]
    fn concurrent_requests_have_exactly_one_winner() {
        let sink = Arc::new(ExitSink::new().unwrap());
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let sink = sink.clone();
                std::thread::spawn(move || {
                    let req = if i % 2 == 0 {
                        ExitRequest::PowerOff
                    } else {
                        ExitRequest::Reset
                    };
                    (0..100).filter(|_| sink.request(req)).count()
                })
            })
            .collect();
        let wins: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(wins, 1);
        assert!(sink.first().is_some());
        assert_eq!(
            sink.count(ExitRequest::PowerOff) + sink.count(ExitRequest::Reset),
            800
        );
        assert_eq!(sink.event_fd().read().unwrap(), 1);
    }
}
