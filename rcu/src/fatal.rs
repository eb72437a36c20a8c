//! Ending the process on a broken RCU invariant, from any context.
//!
//! Used where carrying on could free memory a reader still uses: a thread
//! exiting inside a read section, a callback leaving the call_rcu thread
//! inside one, nesting overflow. It may run in a thread-exit destructor or a
//! signal handler, so it only uses `write(2)` and `abort`.

/// Writes `parts` to stderr with raw `write(2)` calls, then aborts.
#[cold]
#[inline(never)]
pub(crate) fn abort_with(parts: &[&[u8]]) -> ! {
    for part in parts {
        write_all(part);
    }
    std::process::abort();
}

/// Writes `buf` to stderr, retrying on short writes and `EINTR`; gives up
/// silently on other errors (the process is about to abort anyway).
fn write_all(mut buf: &[u8]) {
    while !buf.is_empty() {
        // SAFETY: `buf` is a valid readable region of `buf.len()` bytes for
        // the duration of the call; fd 2 being closed only makes it fail.
        let n = unsafe { libc::write(2, buf.as_ptr().cast(), buf.len()) };
        if n > 0 {
            buf = &buf[n.unsigned_abs().min(buf.len())..];
        } else if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        } else {
            return;
        }
    }
}
