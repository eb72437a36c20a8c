//! What happens when a filtered thread makes a system call its filter
//! refuses: the filter traps (`SECCOMP_RET_TRAP`) instead of killing, and
//! this module's `SIGSYS` handler prints one line naming the thread and the
//! call, then ends the process with `SIGSYS`, as the kernel's kill would
//! have (shell status 159, a core dump where the limits allow one):
//!
//! ```text
//! vmm: seccomp: thread vcpu0 made a forbidden system call 57 (fork); ending with SIGSYS
//! ```
//!
//! The handler is async-signal-safe: it reads the call's number from the
//! signal's `siginfo`, the thread's name with `prctl(PR_GET_NAME)` (a system
//! call; every filter allows it), formats into a buffer on its stack, writes
//! it to stderr with one `write(2)` (not through the logger: no lock, no
//! allocation), and sends itself `SIGSYS` with `tgkill` (every filter allows
//! exactly that signal to this process). It is installed with
//! `SA_RESETHAND`, so that signal finds the default action and ends the
//! process when the handler returns. Should the `tgkill` be refused too (a
//! forked child, whose pid the filter does not name), the second trap
//! finds `SIGSYS` blocked and the kernel ends the process the same way.

use std::io;

/// Offset of `si_syscall` in an x86-64 `siginfo_t` for `SIGSYS`: after
/// `si_signo`, `si_errno`, `si_code` (and padding to 16), and the 8-byte
/// `si_call_addr` (`<asm-generic/siginfo.h>`).
const SI_SYSCALL_OFFSET: usize = 24;

/// Installs the handler for the whole process. Call it before any filter
/// is applied; later calls reinstall it (harmless).
pub(crate) fn install() -> io::Result<()> {
    // SAFETY: a zeroed sigaction is valid (empty mask, no flags).
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
    // SAFETY: installs an async-signal-safe handler; `action` is valid.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A line built on the stack, without allocating.
struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let room = self.buf.len() - self.len;
        let n = bytes.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, n: i64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let negative = n < 0;
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if negative {
            self.push(b"-");
        }
        self.push(&digits[i..]);
    }
}

/// The message for a refused call `nr` on the thread named `thread`.
fn message(thread: &[u8], nr: i64) -> Line {
    let mut line = Line {
        buf: [0; 160],
        len: 0,
    };
    line.push(b"vmm: seccomp: thread ");
    line.push(thread);
    line.push(b" made a forbidden system call ");
    line.push_number(nr);
    line.push(b" (");
    line.push(
        super::syscall_names::syscall_name(nr)
            .unwrap_or("unknown")
            .as_bytes(),
    );
    line.push(b"); ending with SIGSYS\n");
    line
}

/// The calling thread's name (at most 15 bytes), or `?`.
fn thread_name(buf: &mut [u8; 16]) -> &[u8] {
    // SAFETY: PR_GET_NAME writes at most 16 bytes (NUL included) to `buf`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_prctl,
            libc::PR_GET_NAME,
            buf.as_mut_ptr(),
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        return b"?";
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    &buf[..len]
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let nr = if info.is_null() {
        -1
    } else {
        // `si_syscall` is an int at this offset (module docs); the kernel
        // passes a full siginfo_t for a SIGSYS from seccomp, so the
        // offset stays inside it.
        let field = info
            .cast::<u8>()
            .wrapping_add(SI_SYSCALL_OFFSET)
            .cast::<i32>();
        // SAFETY: `field` points inside the kernel's siginfo_t (above).
        i64::from(unsafe { field.read_unaligned() })
    };
    let mut name = [0u8; 16];
    let line = message(thread_name(&mut name), nr);
    // SAFETY: writes our stack buffer to stderr; errors are ignored (there
    // is nothing else to tell).
    unsafe { libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len) };
    // SAFETY: getpid only returns an id.
    let pid = unsafe { libc::syscall(libc::SYS_getpid) };
    // SAFETY: gettid only returns an id.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    // SAFETY: sends SIGSYS to this very thread; with the handler reset
    // (SA_RESETHAND) it ends the process once this handler returns.
    unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGSYS) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_thread_number_and_call() {
        let l = message(b"vcpu0", 57);
        assert_eq!(
            std::str::from_utf8(&l.buf[..l.len]).unwrap(),
            "vmm: seccomp: thread vcpu0 made a forbidden system call 57 (fork); ending with SIGSYS\n"
        );
        let l = message(b"x", 99_999);
        assert!(
            std::str::from_utf8(&l.buf[..l.len])
                .unwrap()
                .contains("call 99999 (unknown)")
        );
        let l = message(b"x", -1);
        assert!(
            std::str::from_utf8(&l.buf[..l.len])
                .unwrap()
                .contains("call -1 (unknown)")
        );
    }
}
