//! The guest's console output on its way to stdout: a bounded buffer that
//! vCPU threads append to and the control thread drains.
//!
//! The serial device writes guest output while its vCPU holds the UART lock
//! and sits inside an RCU read section. A write to stdout there would block
//! the vCPU, and with it every grace period, whenever stdout stops draining
//! (a pipe nobody reads, a stuck terminal). So the vCPU side only copies
//! bytes into this buffer: it never blocks on I/O and makes at most one
//! system call, a non-blocking `eventfd` write, and only when the buffer goes
//! from empty to non-empty (the control thread is then asleep or about to
//! look). When the buffer is full, the bytes that do not fit are dropped and
//! counted ([`ConsoleOutput::dropped`]): losing console output is better
//! than stopping the guest.
//!
//! The control thread takes the buffered bytes out with
//! [`ConsoleOutput::peek`] and [`ConsoleOutput::consume`] and writes them
//! without blocking (see [`crate::control::stdout_writer`]).

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use vmm_sys_util::eventfd::EventFd;

/// Bytes of guest output held while stdout does not keep up: 256 KiB, four
/// times a Linux pipe's default capacity. At the guest's fastest (one port
/// write per byte, about 150 KB/s on an emulation-only host, a few MB/s with
/// hardware virtualization) that covers a reader pausing for a fraction of a
/// second to a couple of seconds; past that, output is dropped and counted.
pub const CAPACITY: usize = 256 * 1024;

/// The shared buffer. Cloning the [`Arc`] shares it.
#[derive(Debug)]
pub struct ConsoleOutput {
    buf: Mutex<VecDeque<u8>>,
    capacity: usize,
    wake: EventFd,
    accepted: AtomicU64,
    dropped: AtomicU64,
}

impl ConsoleOutput {
    /// An empty buffer of [`CAPACITY`] bytes with its (non-blocking) wake-up
    /// eventfd.
    pub fn new() -> std::io::Result<Arc<Self>> {
        Self::with_capacity(CAPACITY)
    }

    /// An empty buffer holding at most `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            buf: Mutex::new(VecDeque::with_capacity(capacity.min(64 * 1024))),
            capacity,
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            accepted: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }))
    }

    /// Appends as much of `bytes` as fits and drops (and counts) the rest.
    ///
    /// Never blocks on I/O: takes the buffer's mutex for a copy (the control
    /// thread holds it only to copy out or discard), and writes the wake-up
    /// eventfd, non-blocking, only if the buffer was empty. Any thread may
    /// call it, including from inside an RCU read section.
    pub fn append(&self, bytes: &[u8]) {
        let was_empty;
        let taken;
        {
            let mut buf = self.lock();
            was_empty = buf.is_empty();
            taken = bytes.len().min(self.capacity.saturating_sub(buf.len()));
            buf.extend(bytes.iter().take(taken));
        }
        self.accepted.fetch_add(taken as u64, Ordering::Relaxed);
        self.add_dropped(bytes.len() - taken);
        if was_empty && taken > 0 {
            // EAGAIN (counter full) still leaves the eventfd readable.
            let _ = self.wake.write(1);
        }
    }

    /// Copies up to `out.len()` of the oldest buffered bytes into `out`
    /// without removing them; returns how many. Control thread.
    pub fn peek(&self, out: &mut [u8]) -> usize {
        let buf = self.lock();
        let (a, b) = buf.as_slices();
        let n = out.len().min(buf.len());
        let from_a = n.min(a.len());
        out[..from_a].copy_from_slice(&a[..from_a]);
        out[from_a..n].copy_from_slice(&b[..n - from_a]);
        n
    }

    /// Removes the `n` oldest bytes (written out). Control thread.
    pub fn consume(&self, n: usize) {
        let mut buf = self.lock();
        let n = n.min(buf.len());
        buf.drain(..n);
    }

    /// Drops everything buffered and counts it as dropped (the output cannot
    /// be written). Returns how many bytes were dropped.
    pub fn discard(&self) -> usize {
        let n = {
            let mut buf = self.lock();
            let n = buf.len();
            buf.clear();
            n
        };
        self.add_dropped(n);
        n
    }

    /// Bytes waiting to be written.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is waiting to be written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes accepted into the buffer since creation.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Bytes of guest output lost since creation: refused because the buffer
    /// was full, or discarded because stdout failed or did not drain by the
    /// end of the run.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Counts `n` more bytes as lost (by whoever could not write them).
    pub fn add_dropped(&self, n: usize) {
        if n > 0 {
            self.dropped.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// The eventfd signalled when the buffer goes from empty to non-empty.
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// A [`Write`] handle for the serial device.
    pub fn sink(self: &Arc<Self>) -> ConsoleSink {
        ConsoleSink(Arc::clone(self))
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<u8>> {
        // Every update is a whole VecDeque operation: a panic elsewhere
        // leaves it consistent.
        self.buf.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The serial device's output sink: [`ConsoleOutput::append`] behind
/// [`Write`]. Writes always succeed (bytes that do not fit are counted as
/// dropped, not reported as errors, so the device logs nothing on the vCPU
/// path); `flush` does nothing.
#[derive(Debug, Clone)]
pub struct ConsoleSink(Arc<ConsoleOutput>);

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn drain(c: &ConsoleOutput) -> Vec<u8> {
        let mut out = vec![0u8; c.len()];
        let n = c.peek(&mut out);
        c.consume(n);
        out.truncate(n);
        out
    }

    #[test]
    fn bytes_come_out_in_order_across_the_wrap() {
        let c = ConsoleOutput::with_capacity(8).unwrap();
        c.append(b"abcdef");
        let mut two = [0u8; 2];
        assert_eq!(c.peek(&mut two), 2);
        assert_eq!(&two, b"ab");
        c.consume(4);
        c.append(b"ghij");
        assert_eq!(drain(&c), b"efghij");
        assert_eq!((c.accepted(), c.dropped()), (10, 0));
        assert!(c.is_empty());
    }

    #[test]
    fn a_full_buffer_drops_and_counts_what_does_not_fit() {
        let c = ConsoleOutput::with_capacity(4).unwrap();
        let mut sink = c.sink();
        // The sink never reports an error to the device.
        assert_eq!(sink.write(b"123456").unwrap(), 6);
        sink.write_all(b"78").unwrap();
        assert_eq!((c.accepted(), c.dropped()), (4, 4));
        assert_eq!(drain(&c), b"1234");
        c.append(b"xy");
        assert_eq!(c.discard(), 2);
        assert_eq!(c.dropped(), 6);
    }

    #[test]
    fn the_eventfd_fires_only_when_output_arrives_in_an_empty_buffer() {
        let c = ConsoleOutput::with_capacity(4).unwrap();
        assert!(c.wake_fd().read().is_err(), "nothing signalled yet");
        c.append(b"a");
        c.append(b"b");
        assert_eq!(
            c.wake_fd().read().unwrap(),
            1,
            "one wake-up for two appends"
        );
        c.append(b"cdef"); // "ef" dropped: no wake-up for a non-empty buffer
        assert!(c.wake_fd().read().is_err());
        drain(&c);
        c.append(b"");
        assert!(c.wake_fd().read().is_err(), "nothing appended, no wake-up");
        c.append(b"g");
        assert_eq!(c.wake_fd().read().unwrap(), 1);
    }
}
