//! One client connection: its socket, its input split into messages, its
//! bounded output queue and its negotiation state.
//!
//! Nothing here blocks. Input is read in chunks of at most [`READ_CHUNK`]
//! bytes and split into messages one at a time; processing pauses while the
//! output queue holds more than [`OUTPUT_SOFT_LIMIT`] bytes (the client is
//! not reading its replies), and the socket is not read meanwhile, so a
//! client cannot make the server buffer more than about a chunk of input
//! plus one message ([`MAX_MESSAGE_SIZE`]). Events are queued regardless;
//! a client whose queue would exceed [`OUTPUT_HARD_LIMIT`] is dropped.

use super::json_splitter::{Frame, JsonSplitter};
use super::protocol;
use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;
use vmm_sys_util::epoll::EventSet;

/// The most bytes read from one client per wake-up.
pub(crate) const READ_CHUNK: usize = 64 * 1024;

/// A message that grows beyond this without completing is answered with an
/// error and the connection is closed.
pub const MAX_MESSAGE_SIZE: usize = 1 << 20;

/// Above this much queued output, the client's input is not processed.
pub(crate) const OUTPUT_SOFT_LIMIT: usize = 64 * 1024;

/// A client whose queued output would exceed this is dropped.
pub(crate) const OUTPUT_HARD_LIMIT: usize = 1 << 20;

/// One connected client.
#[derive(Debug)]
pub(crate) struct Connection {
    stream: UnixStream,
    splitter: JsonSplitter,
    input: Vec<u8>,
    consumed: usize,
    output: VecDeque<u8>,
    /// Whether `qmp_capabilities` succeeded on this connection.
    pub negotiated: bool,
    /// A fatal error was answered: no more input; close once flushed.
    closing: bool,
    /// The client shut its sending side: close once input is processed and
    /// output flushed.
    eof: bool,
    /// The socket failed or the client fell too far behind: close now.
    broken: bool,
    /// The epoll interest currently registered for the socket.
    pub registered: EventSet,
    /// When the connection was accepted (the negotiation deadline counts
    /// from here).
    pub accepted: Instant,
}

/// What reading from the socket gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadStatus {
    /// Bytes were read.
    Data,
    /// Nothing to read now (or unprocessed input is still buffered).
    Idle,
    /// The client closed its sending side.
    Eof,
}

impl Connection {
    /// Takes over a freshly accepted socket and queues the greeting.
    pub(crate) fn new(stream: UnixStream) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        let mut c = Self {
            stream,
            splitter: JsonSplitter::new(MAX_MESSAGE_SIZE),
            input: Vec::new(),
            consumed: 0,
            output: VecDeque::new(),
            negotiated: false,
            closing: false,
            eof: false,
            broken: false,
            registered: EventSet::empty(),
            accepted: Instant::now(),
        };
        c.queue(&protocol::encode(&protocol::greeting()));
        Ok(c)
    }

    /// The socket's file descriptor (the key the server files it under).
    pub(crate) fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    fn has_buffered_input(&self) -> bool {
        self.consumed < self.input.len()
    }

    /// Reads one chunk if all earlier input has been processed and the
    /// connection still takes input. A read error marks it broken.
    pub(crate) fn read(&mut self) -> ReadStatus {
        if self.closing || self.eof || self.broken || self.has_buffered_input() {
            return ReadStatus::Idle;
        }
        self.input.resize(READ_CHUNK, 0);
        self.consumed = 0;
        let result = (&self.stream).read(&mut self.input);
        match result {
            Ok(0) => {
                self.input.clear();
                self.eof = true;
                if self.splitter.in_message() {
                    log::debug!("QMP client disconnected in the middle of a message");
                }
                ReadStatus::Eof
            }
            Ok(n) => {
                self.input.truncate(n);
                ReadStatus::Data
            }
            Err(e) => {
                self.input.clear();
                if !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    log::debug!("QMP client read failed: {e}");
                    self.broken = true;
                }
                ReadStatus::Idle
            }
        }
    }

    /// The next message or input error from buffered input, unless output
    /// is backed up or the connection is closing.
    pub(crate) fn next_frame(&mut self) -> Option<Frame> {
        if self.closing || self.broken || self.output.len() > OUTPUT_SOFT_LIMIT {
            return None;
        }
        let pending = self.input.get(self.consumed..)?;
        if pending.is_empty() {
            return None;
        }
        let (used, frame) = self.splitter.feed(pending);
        self.consumed += used;
        if matches!(frame, Some(Frame::TooLarge(_))) {
            self.closing = true;
            self.input = Vec::new();
            self.consumed = 0;
        }
        frame
    }

    /// Queues `bytes` (one whole message). If the queue would exceed
    /// [`OUTPUT_HARD_LIMIT`], the connection is marked broken instead.
    pub(crate) fn queue(&mut self, bytes: &[u8]) {
        if self.broken {
            return;
        }
        if self.output.len() + bytes.len() > OUTPUT_HARD_LIMIT {
            log::warn!("QMP client is not reading its output; dropping it");
            self.broken = true;
            self.output.clear();
            return;
        }
        self.output.extend(bytes);
    }

    /// Writes as much queued output as the socket takes now. A write error
    /// marks the connection broken.
    pub(crate) fn flush(&mut self) {
        while !self.broken && !self.output.is_empty() {
            let (front, _) = self.output.as_slices();
            match send_nosignal(&self.stream, front) {
                Ok(0) => break,
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::debug!("QMP client write failed: {e}");
                    self.broken = true;
                    self.output.clear();
                }
            }
        }
        if self.output.is_empty() && self.output.capacity() > OUTPUT_SOFT_LIMIT {
            self.output.shrink_to(OUTPUT_SOFT_LIMIT);
        }
    }

    /// Whether buffered input can be processed now (it was held back by
    /// output that has since drained).
    pub(crate) fn can_take_more(&self) -> bool {
        self.has_buffered_input()
            && !self.closing
            && !self.broken
            && self.output.len() <= OUTPUT_SOFT_LIMIT
    }

    /// Whether output is waiting for the socket.
    pub(crate) fn has_output(&self) -> bool {
        !self.output.is_empty()
    }

    /// The epoll interest the connection needs now: readable while it takes
    /// input, writable while output waits.
    pub(crate) fn interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if !self.closing
            && !self.eof
            && !self.broken
            && !self.has_buffered_input()
            && self.output.len() <= OUTPUT_SOFT_LIMIT
        {
            set |= EventSet::IN;
        }
        if self.has_output() && !self.broken {
            set |= EventSet::OUT;
        }
        set
    }

    /// Whether the connection is done and should be dropped: broken, or
    /// finished and flushed.
    pub(crate) fn should_close(&self) -> bool {
        self.broken
            || (self.closing && !self.has_output())
            || (self.eof && !self.has_buffered_input() && !self.has_output())
    }

    /// Marks the connection broken (the peer hung up or errored).
    pub(crate) fn mark_broken(&mut self) {
        self.broken = true;
    }

    /// Writes queued output, waiting until `deadline` for the socket to take
    /// it. Used once, when the server shuts down.
    pub(crate) fn flush_until(&mut self, deadline: std::time::Instant) {
        while self.has_output() && !self.broken {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            self.flush();
            if self.has_output() {
                std::thread::sleep(left.min(std::time::Duration::from_millis(1)));
            }
        }
    }
}

/// `send(2)` with `MSG_NOSIGNAL`: a client that went away gives `EPIPE`, not
/// a `SIGPIPE` that would kill the VMM.
fn send_nosignal(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the whole
    // call and the descriptor is owned by `stream`, which outlives the call.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Connection::new(a).unwrap(), b)
    }

    fn read_all_now(peer: &mut UnixStream) -> Vec<u8> {
        peer.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match peer.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        out
    }

    #[test]
    fn test_new_connection_queues_greeting() {
        let (mut c, mut peer) = pair();
        assert!(c.has_output());
        assert_eq!(c.interest(), EventSet::IN | EventSet::OUT);
        c.flush();
        assert!(!c.has_output());
        assert_eq!(c.interest(), EventSet::IN);
        let got = read_all_now(&mut peer);
        assert!(got.ends_with(b"\r\n"));
        let v: serde_json::Value = serde_json::from_slice(&got).unwrap();
        assert_eq!(v, protocol::greeting());
    }

    #[test]
    fn test_read_and_split_messages_in_one_chunk() {
        let (mut c, mut peer) = pair();
        peer.write_all(b"{\"a\":1}{\"b\":2}").unwrap();
        assert_eq!(c.read(), ReadStatus::Data);
        assert_eq!(c.next_frame(), Some(Frame::Message(b"{\"a\":1}".to_vec())));
        assert_eq!(c.next_frame(), Some(Frame::Message(b"{\"b\":2}".to_vec())));
        assert_eq!(c.next_frame(), None);
        assert_eq!(c.read(), ReadStatus::Idle);
    }

    #[test]
    fn test_eof_mid_message_closes_cleanly() {
        let (mut c, mut peer) = pair();
        c.flush();
        let _ = read_all_now(&mut peer); // Unread data would make it a reset.
        peer.write_all(b"{\"execute\": \"sto").unwrap();
        drop(peer);
        assert_eq!(c.read(), ReadStatus::Data);
        assert_eq!(c.next_frame(), None);
        assert!(!c.should_close());
        assert_eq!(c.read(), ReadStatus::Eof);
        assert!(c.should_close());
    }

    #[test]
    fn test_backpressure_pauses_input_until_output_drains() {
        let (mut c, mut peer) = pair();
        c.flush();
        let _ = read_all_now(&mut peer);
        peer.write_all(b"{}{}").unwrap();
        assert_eq!(c.read(), ReadStatus::Data);
        assert!(c.next_frame().is_some());
        c.queue(&vec![b'x'; OUTPUT_SOFT_LIMIT + 1]);
        assert_eq!(c.next_frame(), None, "paused while output is backed up");
        assert!(!c.interest().contains(EventSet::IN));
        assert_eq!(c.read(), ReadStatus::Idle, "does not read more meanwhile");
        c.flush();
        let _ = read_all_now(&mut peer);
        c.flush();
        assert!(!c.has_output());
        assert_eq!(c.next_frame(), Some(Frame::Message(b"{}".to_vec())));
    }

    #[test]
    fn test_output_beyond_hard_limit_breaks_the_connection() {
        let (mut c, _peer) = pair();
        c.queue(&vec![b'x'; OUTPUT_HARD_LIMIT]);
        assert!(c.should_close());
        assert!(!c.has_output());
    }

    #[test]
    fn test_too_large_message_closes_after_reply_is_flushed() {
        let (mut c, mut peer) = pair();
        c.flush();
        let mut frames = Vec::new();
        let chunk = vec![b'a'; READ_CHUNK];
        peer.write_all(b"{\"execute\":\"").unwrap();
        peer.set_nonblocking(true).unwrap();
        // Feed the connection until the splitter gives up.
        loop {
            let _ = peer.write(&chunk);
            if c.read() == ReadStatus::Data {
                while let Some(f) = c.next_frame() {
                    frames.push(f);
                }
            }
            if !frames.is_empty() {
                break;
            }
        }
        assert!(matches!(frames.as_slice(), [Frame::TooLarge(_)]));
        assert_eq!(c.read(), ReadStatus::Idle, "no more input once closing");
        c.queue(b"error\r\n");
        assert!(!c.should_close(), "the error is sent first");
        c.flush();
        assert!(c.should_close());
    }

    #[test]
    fn test_write_to_closed_peer_breaks_without_signal() {
        let (mut c, peer) = pair();
        drop(peer);
        c.flush();
        assert!(c.should_close());
    }
}
