//! A minimal stderr logger: `VMM_LOG=debug` (or info, warn, error, trace)
//! sets the level; the default is `warn`. Each call site prints at most
//! [`log_limit::BURST`](crate::cli::log_limit::BURST) messages a second; the
//! rest are counted and the count printed with the next one.
//!
//! Everything the VMM prints on stderr goes through [`stderr_line`] or
//! [`stderr_text`], which never fail: a closed or broken stderr
//! (`vmm ... 2>&1 | head`) loses the text, never the VM.
//!
//! Log records never wait for stderr either: when stderr is a pipe, a FIFO
//! or a terminal, [`init`] opens a description of it of its own, in
//! non-blocking mode, and each record is one `write` to it. A record that
//! stderr would not take at once (a full pipe nobody reads, a terminal
//! stopped with Ctrl-S) is dropped and counted (`dropped_lines`, for tests); the
//! next record written says how many were dropped. So a thread that logs
//! inside an RCU read section or under a device lock cannot block there.
//! A regular file is written directly (it never waits for a reader); a
//! stderr that cannot be reopened (a socket) is written in blocking mode.

use crate::cli::log_limit::{Admit, LogLimiter};
use log::{Level, LevelFilter, Log, Metadata, Record};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

/// Longest record written, newline included (longer ones are cut): a write
/// of at most `PIPE_BUF` bytes to a pipe is all or nothing.
const MAX_RECORD: usize = 4096;

/// Writes one line (ARGS and a newline) to stderr, ignoring every error.
/// Unlike `eprintln!`, it never panics: a panic on a broken stderr would
/// run the panic hook, which prints again, and end the VMM abnormally.
/// Any thread may call it; lines from different threads are not interleaved.
/// It waits while stderr does not take the line (a full pipe): it is for
/// set-up errors, the messages at exit and the panic hook; while the VM
/// runs, log through the `log` macros, which never wait.
pub fn stderr_line(args: std::fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args);
    let _ = err.write_all(b"\n");
}

/// Writes TEXT to stderr as it is, ignoring every error (see [`stderr_line`]).
pub(crate) fn stderr_text(text: &str) {
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// Where log records go (see the module doc).
struct RecordSink {
    /// Stderr reopened non-blocking, if it is a pipe, FIFO or terminal.
    nonblocking: Option<File>,
    /// Records dropped since the last one written.
    pending: AtomicU64,
    /// Records dropped since [`init`].
    total: AtomicU64,
    /// Keeps a drop notice and the record after it together.
    lock: Mutex<()>,
}

impl RecordSink {
    fn open() -> Self {
        Self::new(open_nonblocking_stderr())
    }

    fn new(nonblocking: Option<File>) -> Self {
        Self {
            nonblocking,
            pending: AtomicU64::new(0),
            total: AtomicU64::new(0),
            lock: Mutex::new(()),
        }
    }

    /// Writes `line` (which ends with a newline) without waiting.
    fn write(&self, line: &str) {
        let Some(file) = &self.nonblocking else {
            stderr_text(line);
            return;
        };
        let _g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let pending = self.pending.load(Ordering::Relaxed);
        if pending > 0 {
            let note =
                format!("vmm: ({pending} log lines were dropped: stderr was not taking output)\n");
            if !write_now(file, &note) {
                self.dropped();
                return;
            }
            self.pending.fetch_sub(pending, Ordering::Relaxed);
        }
        if !write_now(file, line) {
            self.dropped();
        }
    }

    fn dropped(&self) {
        self.pending.fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
    }
}

/// Opens stderr again, non-blocking, if it is a pipe, FIFO or terminal:
/// a description of our own, so the mode does not change for the other
/// processes sharing stderr (a shell's terminal).
fn open_nonblocking_stderr() -> Option<File> {
    const STDERR: &str = "/proc/self/fd/2";
    let kind = std::fs::metadata(STDERR).ok()?.file_type();
    if !(kind.is_fifo() || kind.is_char_device()) {
        return None;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(STDERR)
        .ok()
}

/// One `write` of `text` (at most [`MAX_RECORD`] bytes); false if it would
/// have blocked. Other errors (a broken pipe) lose the text like a success.
fn write_now(mut file: &File, text: &str) -> bool {
    !matches!(file.write(text.as_bytes()), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// `text` and a newline, cut to at most [`MAX_RECORD`] bytes.
fn record_line(text: String) -> String {
    let mut line = text;
    if line.len() >= MAX_RECORD {
        let mut end = MAX_RECORD - 1;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
    }
    line.push('\n');
    line
}

struct StderrLogger {
    limit: OnceLock<LogLimiter>,
    sink: OnceLock<RecordSink>,
}

impl Log for StderrLogger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &Record<'_>) {
        if self.enabled(r.metadata()) {
            let site = (
                r.file_static().or(r.module_path_static()).unwrap_or("?"),
                r.line().unwrap_or(0),
            );
            let suppressed = match self
                .limit
                .get_or_init(LogLimiter::new)
                .admit(site, std::time::Instant::now())
            {
                Admit::Suppress => return,
                Admit::Print { suppressed } => suppressed,
            };
            let sink = self.sink.get_or_init(RecordSink::open);
            if suppressed > 0 {
                sink.write(&record_line(format!(
                    "vmm: ({suppressed} more messages from {}:{} were not printed)",
                    site.0, site.1
                )));
            }
            let level = match r.level() {
                Level::Error => "error",
                Level::Warn => "warning",
                Level::Info => "info",
                Level::Debug => "debug",
                Level::Trace => "trace",
            };
            sink.write(&record_line(format!("vmm: {level}: {}", r.args())));
        }
    }
    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger {
    limit: OnceLock::new(),
    sink: OnceLock::new(),
};

/// Log records dropped because stderr would not take them at once, since
/// [`init`]. Any thread may call it.
#[cfg(any(test, feature = "test-utils"))]
pub fn dropped_lines() -> u64 {
    LOGGER
        .sink
        .get()
        .map_or(0, |s| s.total.load(Ordering::Relaxed))
}

/// Installs the logger once; later calls do nothing. Call it before the
/// seccomp filters are installed (it looks at stderr and may open it again,
/// see the module doc) and after stderr is what it will stay.
pub fn init() {
    LOGGER.sink.get_or_init(RecordSink::open);
    let level = match std::env::var("VMM_LOG").as_deref() {
        Ok("trace") => LevelFilter::Trace,
        Ok("debug") => LevelFilter::Debug,
        Ok("info") => LevelFilter::Info,
        Ok("error") => LevelFilter::Error,
        Ok("off") => LevelFilter::Off,
        _ => LevelFilter::Warn,
    };
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::FromRawFd;

    #[test]
    fn long_records_are_cut_to_one_pipe_write() {
        let line = record_line("é".repeat(MAX_RECORD));
        assert!(line.len() <= MAX_RECORD, "{}", line.len());
        assert!(line.ends_with("é\n"));
        assert_eq!(record_line("short".into()), "short\n");
    }

    /// A full pipe: records are dropped and counted without waiting; once it
    /// is read, the next record comes after a note of how many were dropped.
    #[test]
    fn records_stderr_would_not_take_are_dropped_and_counted() {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two new descriptors into `fds`, owned below.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        // SAFETY: the read end, just created and owned by nothing else.
        let mut reader = unsafe { File::from_raw_fd(fds[0]) };
        // SAFETY: the write end, likewise.
        let writer = unsafe { File::from_raw_fd(fds[1]) };
        let sink = RecordSink::new(Some(writer));
        // Fill the pipe with records (each written whole or not at all).
        let line = record_line("x".repeat(100));
        let mut written = 0usize;
        while sink.total.load(Ordering::Relaxed) == 0 {
            sink.write(&line);
            written += 1;
        }
        for _ in 0..999 {
            sink.write(&line);
        }
        assert_eq!(sink.total.load(Ordering::Relaxed), 1000);
        let mut buf = vec![0u8; (written - 1) * line.len()];
        reader.read_exact(&mut buf).unwrap();
        assert!(buf.chunks(line.len()).all(|c| c == line.as_bytes()));
        sink.write("after\n");
        let mut rest = vec![0u8; 256];
        let n = reader.read(&mut rest).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&rest[..n]),
            "vmm: (1000 log lines were dropped: stderr was not taking output)\nafter\n"
        );
        assert_eq!(sink.pending.load(Ordering::Relaxed), 0);
    }
}
