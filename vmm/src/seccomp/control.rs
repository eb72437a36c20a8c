//! The control thread's allow-list, from the moment it enters its event loop
//! to the process's exit: the loop itself (console, signals, device
//! requests, QMP clients), memory hot-plug, stopping the vCPUs, and the
//! reports written at exit.
//!
//! Files are opened only after the VM ended (the JSON reports, the plot,
//! `/proc/self/stat` for the metrics); the socket, eventfds and signalfd
//! were all created during set-up, so `socket`, `bind`, `eventfd2` and
//! friends are not allowed.
//!
//! The path-based calls allowed after set-up, all for the reports
//! (`report_file`) and the QMP socket's removal at shutdown, and nothing
//! else: `openat` in three modes only (read-only; create-exclusive without
//! following links, for a report's temporary file; append without creating,
//! for a report written in place to a FIFO, a character device or our own
//! stdout), `rename` (temporary file into place), `unlink` (a failed
//! report's temporary file; the QMP socket, once it is checked to be ours),
//! `statx`/`newfstatat` (what is at a report's path; the socket's
//! identity). No `chmod`, `chown`, `link`, `symlink`, `mkdir`, `truncate`
//! or opening read-write.

use super::allow_list::{AllowList, arg_eq, arg_masked_eq};
use crate::kvm::kick::kick_signal;
use kvm_bindings::{KVMIO, kvm_irqchip, kvm_pit_state2, kvm_userspace_memory_region};
use seccompiler::BackendError;

/// VM ioctl request numbers, from the kernel's `linux/kvm.h`.
#[allow(missing_docs)]
mod request {
    use super::*;
    vmm_sys_util::ioctl_iow_nr!(
        KVM_SET_USER_MEMORY_REGION,
        KVMIO,
        0x46,
        kvm_userspace_memory_region
    );
    // The kernel defines KVM_SET_IRQCHIP with _IOR.
    vmm_sys_util::ioctl_ior_nr!(KVM_SET_IRQCHIP, KVMIO, 0x63, kvm_irqchip);
    vmm_sys_util::ioctl_iow_nr!(KVM_SET_PIT2, KVMIO, 0xa0, kvm_pit_state2);
}

/// The ioctls the control thread makes.
pub(crate) fn ioctls() -> [u64; 6] {
    [
        // Memory hot-plug adds and deletes memory slots.
        request::KVM_SET_USER_MEMORY_REGION(),
        // A machine reset with `--on-reset restart` puts the in-kernel
        // PIC, IOAPIC and PIT back in their power-on state (power_on.rs).
        request::KVM_SET_IRQCHIP(),
        request::KVM_SET_PIT2(),
        // QMP connections are made non-blocking when accepted.
        libc::FIONBIO,
        // The terminal is put back in its mode when the VM ends (and
        // `isatty` asks for it).
        libc::TCSETS,
        libc::TCGETS,
    ]
}

/// Adds the control thread's own calls to `list`; `pid` is the process id
/// (the only process it may signal).
pub(crate) fn allow(
    list: &mut AllowList,
    pid: u32,
    needs: super::FilterNeeds,
) -> Result<(), BackendError> {
    list.any(&[
        // The event loop and what it watches.
        libc::SYS_epoll_wait,
        // The console output's final flush waits for stdout to be writable
        // with a deadline (control/stdout_writer.rs), as does writing a stdout that
        // could not be reopened non-blocking; console input checks, timeout
        // 0, whether more is waiting (control/console.rs read_available).
        libc::SYS_poll,
        libc::SYS_epoll_ctl,
        libc::SYS_read,
        // QMP clients.
        libc::SYS_accept4,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        // Waiting for vCPUs to stop, giving QMP clients time to read.
        libc::SYS_clock_nanosleep,
        // The QMP server's event rate-limit timer.
        libc::SYS_timerfd_settime,
        // `pthread_kill` and report file names use it.
        libc::SYS_getpid,
        // Metrics: how much guest RAM is resident.
        libc::SYS_mincore,
        // Reports at exit (written to a new temporary file, synced and
        // renamed into place; see the module docs) and the QMP socket
        // removed at shutdown, after checking it is still ours.
        libc::SYS_fsync,
        libc::SYS_rename,
        libc::SYS_unlink,
        libc::SYS_statx,
        libc::SYS_newfstatat,
        // Process exit.
        libc::SYS_exit_group,
    ]);
    list.when_arg_in(libc::SYS_ioctl, 1, &ioctls())?;
    // Kicking a vCPU out of KVM_RUN: the kick signal, to a thread of this
    // process only.
    list.when(
        libc::SYS_tgkill,
        vec![arg_eq(0, u64::from(pid))?, arg_eq(2, kick_signal() as u64)?],
    )?;
    // Hot-plugged slots are named in /proc/PID/maps and left out of core
    // dumps; unplugged blocks are returned (MADV_DONTNEED, in the common
    // list); guest memory may ask for transparent huge pages.
    list.when(libc::SYS_prctl, vec![arg_eq(0, libc::PR_SET_VMA as u64)?])?;
    // `prealloc=on` populates plugged blocks before the guest is told.
    list.when_arg_in(
        libc::SYS_madvise,
        2,
        &[
            libc::MADV_HUGEPAGE as u64,
            libc::MADV_DONTDUMP as u64,
            libc::MADV_POPULATE_WRITE as u64,
        ],
    )?;
    if needs.memfd_backing {
        allow_memfd_backing(list)?;
    }
    // Files are opened three ways only (`report_file` for the reports):
    // read (/proc/self/stat and status for the metrics), created new under
    // a random name, never through a link (a report's temporary file), or
    // appended to without being created (a report written in place to a
    // FIFO, a character device or our own stdout). Never truncated, never
    // opened read-write.
    list.when_arg_in(
        libc::SYS_openat,
        2,
        &[
            (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
            (libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC)
                as u64,
            (libc::O_WRONLY | libc::O_APPEND | libc::O_NOCTTY | libc::O_CLOEXEC) as u64,
        ],
    )?;
    Ok(())
}

/// `backend=memfd` (module `memory_backing`): a slot's memfd is created,
/// sized and sealed when a plug first needs the slot, its ranges are mapped
/// over plugged blocks, and unplugged blocks are punched out of it. Only
/// these arguments: the memfd flags the VMM uses (with and without
/// hugetlb's 2 MiB pages), the seals it applies, shared non-executable
/// file mappings (the common list allows anonymous ones only), and the
/// punch-hole mode of `fallocate`, which never grows a file. `ftruncate`
/// is not restricted (it sizes a new memfd; the control thread opens no
/// file for writing after set-up, and report files are created new, so
/// there is nothing else for it to shrink).
fn allow_memfd_backing(list: &mut AllowList) -> Result<(), BackendError> {
    let base = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    list.when_arg_in(
        libc::SYS_memfd_create,
        1,
        &[
            u64::from(base),
            u64::from(base | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB),
        ],
    )?;
    list.any(&[libc::SYS_ftruncate]);
    list.when(
        libc::SYS_fcntl,
        vec![
            arg_eq(1, libc::F_ADD_SEALS as u64)?,
            arg_eq(2, crate::memory::memory_backing::MEMFD_SEALS as u64)?,
        ],
    )?;
    list.when(
        libc::SYS_mmap,
        vec![
            arg_masked_eq(2, libc::PROT_EXEC as u64, 0)?,
            arg_masked_eq(
                3,
                (libc::MAP_ANONYMOUS | libc::MAP_TYPE) as u64,
                libc::MAP_SHARED as u64,
            )?,
        ],
    )?;
    list.when(
        libc::SYS_fallocate,
        vec![arg_eq(
            1,
            (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u64,
        )?],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memslot_request_number_matches_the_kernel_header() {
        // _IOW(0xAE, 0x46, struct kvm_userspace_memory_region) (32 bytes).
        assert_eq!(request::KVM_SET_USER_MEMORY_REGION(), 0x4020_ae46);
        // _IOR(0xAE, 0x63, struct kvm_irqchip) (520 bytes),
        // _IOW(0xAE, 0xa0, struct kvm_pit_state2) (112 bytes).
        assert_eq!(request::KVM_SET_IRQCHIP(), 0x8208_ae63);
        assert_eq!(request::KVM_SET_PIT2(), 0x4070_aea0);
    }
}
