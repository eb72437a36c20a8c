//! Guest console output never blocks the VMM: the `vmm` binary runs a tiny
//! PVH "kernel" that writes COM1 in a loop while its stdout is a pipe nobody
//! reads. QMP keeps answering, SIGTERM ends the VMM with its usual status,
//! the reports are written, and the lost output is counted.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code.

use serde_json::Value;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tests::raw_qmp;

const VMM: &str = env!("CARGO_BIN_EXE_vmm");

fn scratch(name: &str) -> PathBuf {
    tests::scratch_dir(&format!("console-{name}"))
}

/// Where the tiny kernel is loaded and entered.
const LOAD: u64 = 0x10_0000;

/// A minimal ELF "kernel" with a PVH entry note: entered in 32-bit protected
/// mode at [`LOAD`], it writes 63 'A's and a newline to COM1, forever.
fn flood_kernel(dir: &Path) -> PathBuf {
    #[rustfmt::skip]
    let code: &[u8] = &[
        0x66, 0xba, 0xf8, 0x03,       // mov dx, 0x3f8
        0xb9, 0x3f, 0, 0, 0,          // 2: mov ecx, 63
        0xb0, 0x41,                   // mov al, 'A'
        0xee,                         // 1: out dx, al
        0xe2, 0xfd,                   // loop 1b
        0xb0, 0x0a,                   // mov al, '\n'
        0xee,                         // out dx, al
        0xeb, 0xf1,                   // jmp 2b
    ];
    let phoff = 64u64;
    let note_off = phoff + 2 * 56;
    let mut note = Vec::new();
    for v in [4u32, 4, 18] {
        // namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY
        note.extend_from_slice(&v.to_le_bytes());
    }
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(LOAD as u32).to_le_bytes());
    let code_off = note_off + note.len() as u64;

    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01");
    elf.extend_from_slice(&[0; 9]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD.to_le_bytes()); // e_entry
    elf.extend_from_slice(&phoff.to_le_bytes());
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for v in [64u16, 56, 2, 0, 0, 0] {
        // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
        elf.extend_from_slice(&v.to_le_bytes());
    }
    let phdr = |elf: &mut Vec<u8>,
                kind: u32,
                flags: u32,
                off: u64,
                addr: u64,
                size: u64,
                mem: u64,
                align: u64| {
        elf.extend_from_slice(&kind.to_le_bytes());
        elf.extend_from_slice(&flags.to_le_bytes());
        for v in [off, addr, addr, size, mem, align] {
            elf.extend_from_slice(&v.to_le_bytes());
        }
    };
    let len = code.len() as u64;
    phdr(&mut elf, 1, 5, code_off, LOAD, len, len + 0x1000, 0x1000); // PT_LOAD
    phdr(
        &mut elf,
        4,
        4,
        note_off,
        0,
        note.len() as u64,
        note.len() as u64,
        4,
    ); // PT_NOTE
    elf.extend_from_slice(&note);
    elf.extend_from_slice(code);
    let p = dir.join("flood.elf");
    std::fs::write(&p, elf).unwrap();
    p
}

/// Kills the VMM if the test fails before it ended.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Bytes waiting in a pipe.
fn queued(fd: &impl AsRawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to `n`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(rc, 0);
    usize::try_from(n).unwrap()
}

#[test]
fn a_stdout_nobody_reads_does_not_stop_qmp_or_sigterm() {
    tests::require_kvm();
    let d = scratch("stuck-stdout");
    let kernel = flood_kernel(&d);
    let sock = d.join("qmp.sock");
    let stats = d.join("rcu.json");
    let metrics = d.join("metrics.json");
    // stdout: a pipe nobody reads; its read end stays open, so a blocking
    // write would wait forever rather than fail.
    let (reader, writer) = std::io::pipe().unwrap();
    // SAFETY: F_GETPIPE_SZ only reads the pipe's size.
    let capacity =
        usize::try_from(unsafe { libc::fcntl(writer.as_raw_fd(), libc::F_GETPIPE_SZ) }).unwrap();
    let mut vmm = KillOnDrop(
        Command::new(VMM)
            .args(["--kernel", kernel.to_str().unwrap()])
            .args(["--memory", "64M", "--quiet"])
            .args(["--qmp", sock.to_str().unwrap()])
            .args(["--rcu-stats", stats.to_str().unwrap()])
            .args(["--metrics", metrics.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut err_pipe = vmm.0.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let mut c = raw_qmp::connect(&sock);

    // The guest fills the pipe (partly filled pages keep it from holding
    // exactly `capacity` bytes).
    let end = Instant::now() + Duration::from_secs(120);
    while queued(&reader) < capacity / 2 {
        assert!(
            Instant::now() < end,
            "the guest did not fill stdout in 120 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The guest goes on printing into a full pipe; QMP keeps answering.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        let r = raw_qmp::execute(&mut c, r#"{"execute":"query-status"}"#);
        assert_eq!(r["return"]["status"], "running", "{r}");
        let r = raw_qmp::execute(&mut c, r#"{"execute":"x-query-rcu"}"#);
        assert!(r["return"].get("grace_periods").is_some(), "{r}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(vmm.0.try_wait().unwrap().is_none(), "the VMM ended");

    // SIGTERM: an orderly end, as with a stdout that drains.
    // SAFETY: kill(2) with the child's pid.
    unsafe { libc::kill(vmm.0.id() as i32, libc::SIGTERM) };
    let status = raw_qmp::wait_exit(&mut vmm.0, Duration::from_secs(30));
    let err = if status.is_some() {
        err_reader.join().unwrap()
    } else {
        String::from("(the VMM was killed)")
    };
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "SIGTERM did not end the VMM within 30 s ({status:?}):\n{err}"
    );
    assert!(err.contains("vmm: terminating on signal 15"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains("did not exit"), "{err}");
    // The reports: pending RCU callbacks all ran (grace periods ended), and
    // the dropped output is counted.
    let s: Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
    assert_eq!(s["callbacks_run"], s["call_rcu"], "{s}");
    let m: Value = serde_json::from_slice(&std::fs::read(&metrics).unwrap()).unwrap();
    let written = m["console_bytes"].as_u64().unwrap();
    let dropped = m["console_bytes_dropped"].as_u64().unwrap();
    assert!(dropped > 0, "{m}");
    assert!(written >= capacity as u64, "{m}");
    assert!(
        err.contains(&format!(
            "vmm: {dropped} of {} bytes of guest console output were dropped",
            written + dropped
        )),
        "{err}"
    );
    drop(reader);
}
