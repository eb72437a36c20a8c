//! A minimal stderr logger: `VMM_LOG=debug` (or info, warn, error, trace)
//! sets the level; the default is `warn`. Each call site prints at most
//! [`log_limit::BURST`](crate::log_limit::BURST) messages a second; the
//! rest are counted and the count printed with the next one.
//!
//! Everything the VMM prints on stderr goes through [`stderr_line`] or
//! [`stderr_text`], which never fail: a closed or broken stderr
//! (`vmm ... 2>&1 | head`) loses the text, never the VM.

use crate::log_limit::{Admit, LogLimiter};
use log::{Level, LevelFilter, Log, Metadata, Record};
use std::io::Write;

/// Writes one line (ARGS and a newline) to stderr, ignoring every error.
/// Unlike `eprintln!`, it never panics: a panic on a broken stderr would
/// run the panic hook, which prints again, and end the VMM abnormally.
/// Any thread may call it; lines from different threads are not interleaved.
pub fn stderr_line(args: std::fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args);
    let _ = err.write_all(b"\n");
}

/// Writes TEXT to stderr as it is, ignoring every error (see [`stderr_line`]).
pub fn stderr_text(text: &str) {
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

struct StderrLogger {
    limit: std::sync::OnceLock<LogLimiter>,
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
            if suppressed > 0 {
                stderr_line(format_args!(
                    "vmm: ({suppressed} more messages from {}:{} were not printed)",
                    site.0, site.1
                ));
            }
            let level = match r.level() {
                Level::Error => "error",
                Level::Warn => "warning",
                Level::Info => "info",
                Level::Debug => "debug",
                Level::Trace => "trace",
            };
            stderr_line(format_args!("vmm: {level}: {}", r.args()));
        }
    }
    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger {
    limit: std::sync::OnceLock::new(),
};

/// Installs the logger once; later calls do nothing.
pub fn init() {
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
