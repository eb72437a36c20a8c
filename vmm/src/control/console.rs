//! The serial console on the terminal: stdin to COM1, with QEMU's escape
//! (Ctrl-A x quits, Ctrl-A Ctrl-A sends Ctrl-A) when stdin is a terminal in
//! raw mode.

use devices::Serial;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

const CTRL_A: u8 = 0x01;

/// What a chunk of terminal input means.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Decoded {
    /// Bytes for the guest.
    pub guest: Vec<u8>,
    /// The user asked to quit (Ctrl-A x).
    pub quit: bool,
}

/// Decodes QEMU-style escapes from terminal input.
#[derive(Debug, Default)]
pub(crate) struct EscapeDecoder {
    after_ctrl_a: bool,
}

impl EscapeDecoder {
    /// Splits `input` into guest bytes and escape commands.
    pub(crate) fn decode(&mut self, input: &[u8]) -> Decoded {
        let mut d = Decoded::default();
        for &b in input {
            if self.after_ctrl_a {
                self.after_ctrl_a = false;
                match b {
                    b'x' | b'X' => {
                        d.quit = true;
                        return d;
                    }
                    CTRL_A => d.guest.push(CTRL_A),
                    // Unknown escape: QEMU ignores it.
                    _ => {}
                }
            } else if b == CTRL_A {
                self.after_ctrl_a = true;
            } else {
                d.guest.push(b);
            }
        }
        d
    }
}

/// Puts the terminal on a file descriptor into raw mode and restores it when
/// dropped.
pub(crate) struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

impl std::fmt::Debug for RawTerminal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawTerminal").field("fd", &self.fd).finish()
    }
}

impl RawTerminal {
    /// Raw mode on stdin if it is a terminal; `None` otherwise.
    pub(crate) fn stdin() -> Option<Self> {
        let fd = std::io::stdin().as_raw_fd();
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: termios is plain old data; tcgetattr fills it.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid out-pointer for the terminal on `fd`.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only modifies the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so the guest's "\n" still returns the
        // carriage on the host terminal as the guest intends it ("\r\n").
        raw.c_oflag = saved.c_oflag;
        // SAFETY: `raw` is a valid termios for this terminal.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(Self { fd, saved })
    }
}

/// How [`read_available`] stopped.
#[derive(Debug)]
pub(crate) enum ReadEnd {
    /// Nothing more to read now (`EAGAIN`, or `poll` says not readable).
    Drained,
    /// The descriptor reached end of file.
    Eof,
    /// `limit` bytes were read; more may be waiting (the descriptor stays
    /// readable, so a level-triggered event loop comes back).
    Limit,
    /// The consumer asked to stop.
    Stopped,
    /// Reading failed.
    Failed(std::io::Error),
}

/// Reads everything waiting on `fd` now, in chunks of up to 4 KiB handed to
/// `consume`, until nothing is left (`EAGAIN`, or `poll` says it is not
/// readable), end of file, `limit` bytes, or `consume` returns `false`.
///
/// Reads straight from the descriptor: std's `Stdin` keeps a buffer of its
/// own, whose contents the descriptor no longer reports as readable, so an
/// event loop would see them only at the next keystroke. Reading until
/// nothing is left means one readiness event takes a whole burst (a paste
/// larger than a chunk, with a `Ctrl-A x` at its end, is seen at once).
/// `fd`'s flags are not changed (stdin is shared with the shell): a blocking
/// `fd` is read only while `poll` says it is readable, so this blocks only
/// if another process takes the input between the `poll` and the `read`.
pub(crate) fn read_available(
    fd: RawFd,
    limit: usize,
    mut consume: impl FnMut(&[u8]) -> bool,
) -> ReadEnd {
    let mut buf = [0u8; 4096];
    let mut total = 0usize;
    loop {
        if total >= limit {
            return ReadEnd::Limit;
        }
        let want = buf.len().min(limit - total);
        let n = match read_fd(fd, &mut buf[..want]) {
            Ok(0) => return ReadEnd::Eof,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return ReadEnd::Drained,
            Err(e) => return ReadEnd::Failed(e),
        };
        total += n;
        if !consume(&buf[..n]) {
            return ReadEnd::Stopped;
        }
        if !readable_now(fd) {
            return ReadEnd::Drained;
        }
    }
}

fn read_fd(fd: RawFd, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole
    // call; read(2) writes at most that many and keeps no pointer.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

/// Whether a read of `fd` would return at once (data, end of file or an
/// error waiting).
fn readable_now(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd for the whole call; timeout 0.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents != 0
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from the same terminal.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Input waiting for room in the guest's serial FIFO.
#[derive(Debug)]
pub(crate) struct ConsoleInput {
    serial: Arc<Serial>,
    pending: VecDeque<u8>,
    decoder: EscapeDecoder,
    /// Whether escapes are decoded (only for an interactive terminal).
    escapes: bool,
}

impl ConsoleInput {
    /// Input for `serial`; `escapes` enables Ctrl-A commands.
    pub(crate) fn new(serial: Arc<Serial>, escapes: bool) -> Self {
        Self {
            serial,
            pending: VecDeque::new(),
            decoder: EscapeDecoder::default(),
            escapes,
        }
    }

    /// Takes bytes read from stdin; returns `true` if the user asked to quit.
    pub(crate) fn input(&mut self, bytes: &[u8]) -> bool {
        let d = if self.escapes {
            self.decoder.decode(bytes)
        } else {
            Decoded {
                guest: bytes.to_vec(),
                quit: false,
            }
        };
        self.pending.extend(d.guest);
        self.flush();
        d.quit
    }

    /// Moves as much pending input as fits into the serial FIFO.
    pub(crate) fn flush(&mut self) {
        while !self.pending.is_empty() {
            let (a, _) = self.pending.as_slices();
            match self.serial.queue_input(a) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    self.pending.drain(..n);
                }
            }
        }
    }

    /// Bytes waiting for the guest.
    pub(crate) fn pending_len(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_a_x_quits_and_ctrl_a_ctrl_a_sends_one() {
        let mut d = EscapeDecoder::default();
        assert_eq!(
            d.decode(b"ab\x01\x01c"),
            Decoded {
                guest: b"ab\x01c".to_vec(),
                quit: false
            }
        );
        let r = d.decode(b"ls\x01");
        assert_eq!(r.guest, b"ls");
        let r = d.decode(b"x");
        assert!(r.quit);
        let r = d.decode(b"\x01zq");
        assert_eq!(r.guest, b"q");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod read_tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn read_available_takes_everything_waiting_and_stops_when_drained() {
        let (r, mut w) = std::io::pipe().unwrap();
        let data: Vec<u8> = (0..10 * 1024).map(|i| (i % 253) as u8).collect();
        w.write_all(&data).unwrap();
        let mut got = Vec::new();
        let end = read_available(r.as_raw_fd(), usize::MAX, |c| {
            got.extend_from_slice(c);
            true
        });
        assert!(matches!(end, ReadEnd::Drained), "{end:?}");
        assert_eq!(got, data);
        drop(w);
        assert!(matches!(
            read_available(r.as_raw_fd(), usize::MAX, |_| true),
            ReadEnd::Eof
        ));
    }

    #[test]
    fn read_available_honours_its_limit_and_the_consumer() {
        let (r, mut w) = std::io::pipe().unwrap();
        w.write_all(&[7u8; 9000]).unwrap();
        let mut n = 0;
        let end = read_available(r.as_raw_fd(), 5000, |c| {
            n += c.len();
            true
        });
        assert!(matches!(end, ReadEnd::Limit), "{end:?}");
        assert_eq!(n, 5000);
        let mut chunks = 0;
        let end = read_available(r.as_raw_fd(), usize::MAX, |_| {
            chunks += 1;
            false
        });
        assert!(matches!(end, ReadEnd::Stopped), "{end:?}");
        assert_eq!(chunks, 1);
    }
}
