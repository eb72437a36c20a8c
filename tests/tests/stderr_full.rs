//! A stderr pipe that is full and never read does not block the VMM.
//!
//! The VM runs in this process with the VMM's own logger (`vmm::logger`, as
//! the `vmm` command installs it) at the default level; its stderr
//! (descriptor 2) is a pipe filled to the brim before the logger starts,
//! which nobody reads. A tiny guest (the `tests::guest_driver` runner at
//! CPL3 on vCPU 0) then breaks the virtio-mem device, which the transport
//! logs as a warning on the control thread, inside its RCU read section and
//! under the transport lock. The control thread must carry on: the guest
//! breaks and resets the device again and again (each break needs the
//! control thread), grace periods complete, and the VM powers off. The
//! records stderr did not take are dropped and counted, and once the pipe is
//! read the next record says how many.
//!
//! If the control thread blocks, a watchdog drains the pipe after
//! [`WATCHDOG`] so that the test fails instead of hanging.
//!
//! This file holds one test: descriptor 2 and the logger are process-wide.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use devices::ExitRequest;
use tests::bare_vm::TEST_MMIO;
use tests::guest_driver::{GuestDriver, Op, run_driven};
use tests::stderr_redirect::{StderrRedirect, default_log_level};
use tests::virtio_ops::{
    QUEUE_NOTIFY, break_device, first_read_then_watch_panics, run, runner_vm_with_virtio_mem, w32,
};
use vmm::test_utils::{Hotplug, StopReason};

const LIMIT: Duration = Duration::from_secs(600);
/// How long the guest driver waits for one batch.
const BATCH_WITHIN: Duration = Duration::from_secs(60);
/// When the watchdog gives up on the VMM and drains the pipe.
const WATCHDOG: Duration = Duration::from_secs(150);
/// Break-and-reset rounds while stderr is full.
const ROUNDS: u64 = 20;
/// Warnings the test itself logs through the VMM's logger while stderr is
/// full (from one call site: more would be held back by the rate limit).
const OWN_WARNINGS: u64 = vmm::test_utils::log_limit::BURST as u64;

/// The pipe's capacity, after asking for the smallest (one page).
fn shrink_pipe(fd: &impl AsRawFd) -> usize {
    // SAFETY: F_SETPIPE_SZ on a pipe descriptor this test owns; it changes
    // only that pipe's capacity.
    let size = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    assert!(
        size > 0,
        "F_SETPIPE_SZ: {}",
        std::io::Error::last_os_error()
    );
    size as usize
}

/// A pipe, both ends blocking: (read end, write end).
fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into `fds`, owned below.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: the read end, just created and owned by nothing else.
    let reader = unsafe { File::from_raw_fd(fds[0]) };
    // SAFETY: the write end, likewise.
    let writer = unsafe { File::from_raw_fd(fds[1]) };
    (reader, writer)
}

fn set_nonblocking(fd: &impl AsRawFd) {
    // SAFETY: F_GETFL on a descriptor this test owns; reads its flags.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    assert!(flags >= 0, "F_GETFL: {}", std::io::Error::last_os_error());
    // SAFETY: F_SETFL on the same descriptor (the read end of the test's
    // own pipe); only its O_NONBLOCK flag changes.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
    assert_eq!(rc, 0, "F_SETFL: {}", std::io::Error::last_os_error());
}

/// Everything readable in the pipe now (its read end is non-blocking).
fn read_available(reader: &mut File) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return out,
            Err(e) => panic!("reading the stderr pipe: {e}"),
        }
    }
}

/// A grace period ends (no read section is stuck), within a minute.
fn grace_period_ends() -> bool {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        rcu::synchronize_rcu();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(60)).is_ok()
}

fn drive(mut driver: GuestDriver, hp: &Hotplug) {
    driver.timeout = BATCH_WITHIN;
    first_read_then_watch_panics(&mut driver);
    for round in 0..ROUNDS {
        break_device(&mut driver, round, BATCH_WITHIN);
        assert!(
            grace_period_ends(),
            "round {round}: no grace period ended within a minute"
        );
    }
    assert_eq!(hp.transport.stats().broken, ROUNDS);
    run(&mut driver, "notify", &vec![w32(QUEUE_NOTIFY, 0); 4096]);
    // Records from any thread, the test's included, never wait.
    for i in 0..OWN_WARNINGS {
        log::warn!("stderr_full: test warning {i} while stderr is full");
    }
    run(
        &mut driver,
        "final write",
        &[Op::Write {
            addr: TEST_MMIO,
            width: 8,
            value: 0x600d,
        }],
    );
}

#[test]
fn a_full_stderr_pipe_nobody_reads_does_not_block_the_vmm() {
    default_log_level();
    tests::require_kvm();
    tests::panic_watch::install();
    let (mut reader, mut writer) = pipe();
    let capacity = shrink_pipe(&writer);
    writer.write_all(&vec![b'.'; capacity]).unwrap();

    let (mut vm, hp) = runner_vm_with_virtio_mem();

    let redirect = StderrRedirect::to(&writer);
    vmm::logger::init();

    // The watchdog: drains the pipe if the test has not finished by then.
    let drained = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut drain_end = reader.try_clone().unwrap();
    let drained2 = Arc::clone(&drained);
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(WATCHDOG).is_ok() {
            return;
        }
        drained2.store(true, Ordering::SeqCst);
        set_nonblocking(&drain_end);
        while done_rx.try_recv().is_err() {
            let _ = read_available(&mut drain_end);
            std::thread::sleep(Duration::from_millis(10));
        }
    });

    let hp2 = Arc::clone(&hp);
    let (outcome, driven) = run_driven(&mut vm, LIMIT, move |driver| drive(driver, &hp2));
    let _ = done_tx.send(());
    watchdog.join().unwrap();
    let dropped = vmm::test_utils::logger::dropped_lines();

    // Read the pipe, then log once more: the record says what was dropped.
    set_nonblocking(&reader);
    let before = read_available(&mut reader);
    log::warn!("stderr_full: stderr drained");
    let after = String::from_utf8_lossy(&read_available(&mut reader)).into_owned();
    drop(redirect);

    assert!(
        !drained.load(Ordering::SeqCst),
        "the VMM was stuck on its full stderr for {WATCHDOG:?} (the watchdog drained the pipe); \
         guest driver: {:?}",
        driven
            .as_ref()
            .err()
            .and_then(|p| p.downcast_ref::<String>())
    );
    if let Err(p) = driven {
        std::panic::resume_unwind(p);
    }
    assert_eq!(outcome.reason, StopReason::Guest(ExitRequest::PowerOff));
    assert_eq!(vm.machine.fatal_errors().first(), None);
    assert!(tests::panic_watch::panics().is_empty());

    // Nothing got into the full pipe; everything logged meanwhile was
    // dropped and counted: the device's warning and the test's own.
    assert_eq!(
        before,
        vec![b'.'; capacity],
        "the pipe held more than the filler"
    );
    assert!(dropped > OWN_WARNINGS, "only {dropped} records dropped");
    let lines: Vec<&str> = after.lines().collect();
    assert_eq!(
        lines,
        [
            format!("vmm: ({dropped} log lines were dropped: stderr was not taking output)"),
            "vmm: warning: stderr_full: stderr drained".to_string()
        ],
        "{after}"
    );
}
