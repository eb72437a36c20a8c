//! Writing the guest's console output to stdout without ever blocking the
//! control thread: [`StdoutWriter`] chooses how to write to the descriptor,
//! [`ConsoleDrain`] moves [`ConsoleOutput`]'s bytes to it from the control
//! thread's event loop.
//!
//! # Why not `O_NONBLOCK` on fd 1
//!
//! Setting `O_NONBLOCK` on fd 1 changes the *open file description*, which
//! fd 1 shares with whoever else holds it: stderr after `2>&1` (our log
//! lines would then fail with `EAGAIN`), the shell that started us, a
//! terminal other programs write to. A crash before restoring the flag
//! leaves the shell with a non-blocking terminal. Instead, when fd 1 is a
//! pipe, FIFO or character device (a terminal), the VMM opens it again
//! through `/proc/self/fd/1` with `O_NONBLOCK`: a new open file description
//! of the same pipe or terminal that only the VMM uses. Regular files (and
//! block devices) are written through fd 1 itself: writing them never waits
//! on a reader. If the reopen fails (a socket, no `/proc`), the VMM writes
//! fd 1 only after `poll` says it is writable, at most `PIPE_BUF` bytes at a
//! time, which a pipe with a free slot takes without blocking (best effort:
//! another writer to the same pipe can still take the room first).
//!
//! When stdout does not take the bytes, the drain waits for `EPOLLOUT` in
//! the event loop; meanwhile the buffer fills and further guest output is
//! dropped and counted. A write error other than `EAGAIN` (`EPIPE` once the
//! reader left) ends console output for the run: the buffered and all later
//! bytes are dropped and counted, and the error is logged once.

use crate::control::console_output::ConsoleOutput;
use event_manager::{EventOps, Events, MutEventSubscriber};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm_sys_util::epoll::EventSet;

/// How long the end of a run waits for stdout to take the buffered output
/// before dropping it.
pub(crate) const FINAL_FLUSH: Duration = Duration::from_secs(2);

/// The largest write per round of the event loop, so a fast reader and a
/// fast guest cannot keep the control thread away from its other events.
const CHUNK: usize = 64 * 1024;

/// Outcome of one write attempt.
#[derive(Debug)]
pub(crate) enum WriteOutcome {
    /// This many leading bytes were written (at least one).
    Wrote(usize),
    /// stdout cannot take bytes now; wait for it to be writable.
    WouldBlock,
    /// stdout failed for good (for example `EPIPE`).
    Failed(std::io::Error),
}

/// How the VMM writes to its stdout (see the module doc).
#[derive(Debug)]
pub(crate) struct StdoutWriter {
    fd: OwnedFd,
    /// Writes go only where `poll` said there is room, `PIPE_BUF` at a time.
    gated: bool,
}

impl StdoutWriter {
    /// A writer for `fd` (normally 1). Call during set-up: it may open
    /// `/proc/self/fd/<fd>`. `fd` must stay open while this is called; the
    /// writer keeps its own descriptor (a duplicate or a reopen).
    pub(crate) fn new(fd: RawFd) -> std::io::Result<Self> {
        // SAFETY: `st` is plain data that fstat fills; fstat has no other
        // effect.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `&mut st` is a valid out-pointer.
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let kind = st.st_mode & libc::S_IFMT;
        if kind == libc::S_IFREG || kind == libc::S_IFBLK {
            return Ok(Self {
                fd: dup_cloexec(fd)?,
                gated: false,
            });
        }
        if kind == libc::S_IFIFO || kind == libc::S_IFCHR {
            match reopen_nonblocking(fd) {
                Ok(own) => {
                    return Ok(Self {
                        fd: own,
                        gated: false,
                    });
                }
                Err(e) => log::debug!("cannot reopen stdout non-blocking: {e}"),
            }
        }
        Ok(Self {
            fd: dup_cloexec(fd)?,
            gated: true,
        })
    }

    /// Writes a prefix of `data` if stdout can take it without blocking.
    pub(crate) fn write_some(&self, data: &[u8]) -> WriteOutcome {
        let data = if self.gated {
            if !self.writable_within(Duration::ZERO) {
                return WriteOutcome::WouldBlock;
            }
            &data[..data.len().min(libc::PIPE_BUF)]
        } else {
            data
        };
        if data.is_empty() {
            return WriteOutcome::Wrote(0);
        }
        loop {
            // SAFETY: `data` is valid for reads of `data.len()` bytes for
            // the whole call; write(2) keeps no pointer.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
            match usize::try_from(n) {
                Ok(0) => return WriteOutcome::WouldBlock,
                Ok(n) => return WriteOutcome::Wrote(n),
                Err(_) => {
                    let e = std::io::Error::last_os_error();
                    match e.kind() {
                        std::io::ErrorKind::Interrupted => {}
                        std::io::ErrorKind::WouldBlock => return WriteOutcome::WouldBlock,
                        _ => return WriteOutcome::Failed(e),
                    }
                }
            }
        }
    }

    /// Waits up to `timeout` for stdout to be writable; `true` if it is.
    pub(crate) fn writable_within(&self, timeout: Duration) -> bool {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `p` is one valid pollfd for the whole call.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        // POLLERR/POLLHUP also end the wait: the write then reports them.
        n > 0 && p.revents != 0
    }

    /// The descriptor the event loop waits on for `EPOLLOUT`.
    pub(crate) fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

fn dup_cloexec(fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC creates a new descriptor and touches no memory.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

fn reopen_nonblocking(fd: RawFd) -> std::io::Result<OwnedFd> {
    let path = std::ffi::CString::new(format!("/proc/self/fd/{fd}"))
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let flags = libc::O_WRONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY;
    // SAFETY: `path` is a NUL-terminated string valid for the call.
    let new = unsafe { libc::open(path.as_ptr(), flags) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// The control thread's side of [`ConsoleOutput`]: an event subscriber that
/// writes buffered guest output to a [`StdoutWriter`] whenever there is some
/// and stdout can take it, and never blocks.
#[derive(Debug)]
pub(crate) struct ConsoleDrain {
    output: Arc<ConsoleOutput>,
    /// `None`: there is no usable stdout; output is dropped and counted.
    writer: Option<StdoutWriter>,
    scratch: Vec<u8>,
    /// Watching the writer for `EPOLLOUT`.
    watching_out: bool,
    /// The writer cannot be watched (epoll refuses regular files and some
    /// character devices): write until done instead of waiting.
    unpollable: bool,
    /// stdout failed for good: output is dropped.
    failed: bool,
    /// Dropped count last logged.
    logged_dropped: u64,
}

impl ConsoleDrain {
    /// A drain from `output` to `writer`; with `None` (no usable stdout,
    /// for example fd 1 closed) every byte is dropped and counted.
    pub(crate) fn new(output: Arc<ConsoleOutput>, writer: Option<StdoutWriter>) -> Self {
        Self {
            output,
            failed: writer.is_none(),
            writer,
            scratch: vec![0; CHUNK],
            watching_out: false,
            unpollable: false,
            logged_dropped: 0,
        }
    }

    /// Writes what stdout takes now, at most a few chunks; returns whether
    /// bytes are left for later.
    fn pump(&mut self) -> bool {
        let rounds = if self.unpollable { usize::MAX } else { 4 };
        for _ in 0..rounds {
            if self.failed {
                self.output.discard();
                return false;
            }
            let Some(writer) = &self.writer else {
                self.failed = true;
                continue;
            };
            let n = self.output.peek(&mut self.scratch);
            if n == 0 {
                return false;
            }
            match writer.write_some(&self.scratch[..n]) {
                WriteOutcome::Wrote(k) => self.output.consume(k),
                WriteOutcome::WouldBlock => return true,
                WriteOutcome::Failed(e) => {
                    log::warn!("console output failed, dropping guest output from now on: {e}");
                    self.failed = true;
                }
            }
        }
        !self.output.is_empty()
    }

    fn watch_out(&mut self, ops: &mut EventOps, on: bool) {
        let Some(writer) = &self.writer else {
            return;
        };
        let ev = Events::new_raw(writer.as_raw_fd(), EventSet::OUT);
        if on && !self.watching_out && !self.unpollable {
            match ops.add(ev) {
                Ok(()) => self.watching_out = true,
                Err(e) => {
                    log::debug!("console output cannot be polled, writing it through: {e}");
                    self.unpollable = true;
                }
            }
        } else if !on && self.watching_out {
            let _ = ops.remove(ev);
            self.watching_out = false;
        }
    }

    fn log_drops(&mut self) {
        let dropped = self.output.dropped();
        if dropped > self.logged_dropped && self.logged_dropped == 0 && !self.failed {
            log::warn!("stdout is not keeping up: dropping guest console output");
        }
        self.logged_dropped = dropped;
    }

    /// Writes what is still buffered, waiting at most until `deadline` for
    /// stdout to take it; whatever is left then is dropped and counted.
    /// Call at the end of the run, once no vCPU writes any more. Returns how
    /// many bytes were dropped here.
    pub(crate) fn flush_until(&mut self, deadline: Instant) -> usize {
        while let (false, Some(writer)) = (self.failed, &self.writer) {
            let n = self.output.peek(&mut self.scratch);
            if n == 0 {
                break;
            }
            match writer.write_some(&self.scratch[..n]) {
                WriteOutcome::Wrote(k) => self.output.consume(k),
                WriteOutcome::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() || !writer.writable_within(left) {
                        break;
                    }
                }
                WriteOutcome::Failed(_) => break,
            }
        }
        self.output.discard()
    }
}

impl MutEventSubscriber for ConsoleDrain {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.output.wake_fd(), EventSet::IN)) {
            log::error!("cannot watch the console output buffer: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.output.wake_fd().as_raw_fd() {
            let _ = self.output.wake_fd().read();
        }
        let left = self.pump();
        self.watch_out(ops, left);
        if left && self.unpollable {
            // Could not watch it: write the rest through now.
            self.pump();
        }
        self.log_drops();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::Read;

    fn pipe() -> (std::io::PipeReader, std::io::PipeWriter) {
        std::io::pipe().unwrap()
    }

    fn pipe_capacity(w: &std::io::PipeWriter) -> usize {
        // SAFETY: F_GETPIPE_SZ only reads the pipe's size.
        let n = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ) };
        usize::try_from(n).unwrap()
    }

    fn is_nonblocking(fd: RawFd) -> bool {
        // SAFETY: F_GETFL only reads the descriptor's flags.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        fl & libc::O_NONBLOCK != 0
    }

    #[test]
    fn a_pipe_is_reopened_non_blocking_and_its_original_is_left_alone() {
        let (_r, w) = pipe();
        let writer = StdoutWriter::new(w.as_raw_fd()).unwrap();
        assert!(!writer.gated);
        assert!(is_nonblocking(writer.as_raw_fd()));
        assert!(
            !is_nonblocking(w.as_raw_fd()),
            "the shared description changed"
        );
    }

    #[test]
    fn a_full_pipe_never_blocks_and_a_drained_one_gets_everything_in_order() {
        let (mut r, w) = pipe();
        let cap = pipe_capacity(&w);
        let out = ConsoleOutput::with_capacity(cap * 2).unwrap();
        let mut drain = ConsoleDrain::new(
            Arc::clone(&out),
            Some(StdoutWriter::new(w.as_raw_fd()).unwrap()),
        );
        let data: Vec<u8> = (0..cap * 3).map(|i| (i % 251) as u8).collect();
        out.append(&data);
        assert_eq!(out.dropped() as usize, cap, "a third did not fit");
        // The pipe takes `cap` bytes; the rest stays buffered, without blocking.
        assert!(drain.pump());
        assert_eq!(out.len(), cap);
        let mut got = vec![0u8; cap];
        r.read_exact(&mut got).unwrap();
        assert!(!drain.pump());
        let mut rest = vec![0u8; cap];
        r.read_exact(&mut rest).unwrap();
        got.extend(rest);
        assert_eq!(got, data[..cap * 2]);
    }

    #[test]
    fn the_final_flush_gives_up_at_its_deadline_and_counts_the_rest() {
        let (_r, w) = pipe();
        let cap = pipe_capacity(&w);
        let out = ConsoleOutput::with_capacity(cap * 2).unwrap();
        let mut drain = ConsoleDrain::new(
            Arc::clone(&out),
            Some(StdoutWriter::new(w.as_raw_fd()).unwrap()),
        );
        out.append(&vec![b'x'; cap * 2]);
        let dropped = drain.flush_until(Instant::now() + Duration::from_millis(50));
        assert_eq!(dropped, cap);
        assert_eq!(out.dropped() as usize, cap);
        assert!(out.is_empty());
    }

    #[test]
    fn a_reader_gone_drops_output_for_the_rest_of_the_run() {
        let (r, w) = pipe();
        let out = ConsoleOutput::with_capacity(1024).unwrap();
        let mut drain = ConsoleDrain::new(
            Arc::clone(&out),
            Some(StdoutWriter::new(w.as_raw_fd()).unwrap()),
        );
        drop(r);
        out.append(b"lost");
        assert!(!drain.pump());
        assert!(drain.failed);
        out.append(b"also lost");
        assert!(!drain.pump());
        assert_eq!(out.dropped(), 13);
    }

    #[test]
    fn without_a_stdout_everything_is_dropped_and_counted() {
        let out = ConsoleOutput::with_capacity(1024).unwrap();
        let mut drain = ConsoleDrain::new(Arc::clone(&out), None);
        out.append(b"gone");
        assert!(!drain.pump());
        out.append(b"too");
        assert_eq!(drain.flush_until(Instant::now()), 3);
        assert_eq!(out.dropped(), 7);
    }

    #[test]
    fn a_regular_file_is_written_through_its_own_descriptor() {
        let path = std::env::temp_dir().join(format!("vmm-stdout-writer-{}", std::process::id()));
        let f = std::fs::File::create(&path).unwrap();
        let writer = StdoutWriter::new(f.as_raw_fd()).unwrap();
        assert!(!writer.gated);
        let out = ConsoleOutput::with_capacity(1024).unwrap();
        let mut drain = ConsoleDrain::new(Arc::clone(&out), Some(writer));
        out.append(b"hello\n");
        assert_eq!(drain.flush_until(Instant::now()), 0);
        drop(f);
        assert_eq!(std::fs::read(&path).unwrap(), b"hello\n");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_socket_is_written_only_when_poll_says_there_is_room() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let writer = StdoutWriter::new(a.as_raw_fd()).unwrap();
        assert!(writer.gated, "a socket cannot be reopened through /proc");
        let out = ConsoleOutput::with_capacity(8 * 1024 * 1024).unwrap();
        let mut drain = ConsoleDrain::new(Arc::clone(&out), Some(writer));
        out.append(&vec![b'y'; 8 * 1024 * 1024]);
        // Nobody reads the other end: the socket fills and the pump stops
        // instead of blocking.
        while drain.pump()
            && drain
                .writer
                .as_ref()
                .unwrap()
                .writable_within(Duration::ZERO)
        {}
        assert!(!out.is_empty());
    }
}
