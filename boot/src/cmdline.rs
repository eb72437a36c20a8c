//! The kernel command line: the user's part plus what the VMM appends, size-checked.
//!
//! The user's string may carry init arguments after ` -- `; parts the VMM appends are
//! kernel arguments and go before that separator, so the kernel (not init) sees them.

use linux_loader::cmdline::{Cmdline, Error as LinuxCmdlineError};
use linux_loader::loader::{Error as LoadError, load_cmdline};
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::address_plan::{CMDLINE_MAX_SIZE, CMDLINE_START};

/// Errors building or placing the command line.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CmdlineError {
    /// The command line (with its NUL) is longer than the limit.
    #[error("kernel command line needs {size} bytes, the limit is {max}")]
    TooLong {
        /// Bytes needed including the NUL (at least; counted up to the part that failed).
        size: usize,
        /// The limit including the NUL.
        max: usize,
    },
    /// A part is not a valid command line string (non-printable ASCII, unbalanced quotes).
    #[error("invalid kernel command line {part:?}")]
    Invalid {
        /// The offending part.
        part: String,
        /// What is wrong with it.
        #[source]
        source: LinuxCmdlineError,
    },
    /// Copying the command line into guest memory failed.
    #[error("cannot write the kernel command line to guest memory")]
    Write(#[source] LoadError),
}

/// Builds the command line from the user's part and the VMM's `appended` parts, within
/// [`CMDLINE_MAX_SIZE`] bytes including the terminating NUL.
pub fn build_cmdline(user: &str, appended: &[&str]) -> Result<Cmdline, CmdlineError> {
    let max = CMDLINE_MAX_SIZE;
    let needed = |extra: &[&str]| user.len() + extra.iter().map(|p| p.len() + 1).sum::<usize>() + 1;
    // `Cmdline::try_from` does not check characters itself.
    if !user.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return Err(CmdlineError::Invalid {
            part: user.to_string(),
            source: LinuxCmdlineError::InvalidAscii,
        });
    }
    let mut cmdline = Cmdline::try_from(user, max).map_err(|e| match e {
        // try_from reports a string longer than the capacity as InvalidCapacity.
        LinuxCmdlineError::TooLarge | LinuxCmdlineError::InvalidCapacity => CmdlineError::TooLong {
            size: needed(&[]),
            max,
        },
        other => CmdlineError::Invalid {
            part: user.to_string(),
            source: other,
        },
    })?;
    for (i, part) in appended.iter().enumerate() {
        if part.trim().is_empty() {
            continue;
        }
        cmdline.insert_str(part).map_err(|e| match e {
            LinuxCmdlineError::TooLarge => CmdlineError::TooLong {
                size: needed(appended.get(..=i).unwrap_or(appended)),
                max,
            },
            other => CmdlineError::Invalid {
                part: (*part).to_string(),
                source: other,
            },
        })?;
    }
    Ok(cmdline)
}

/// The command line as the bytes the kernel reads, including the terminating NUL.
pub fn cmdline_bytes(cmdline: &Cmdline) -> Result<Vec<u8>, CmdlineError> {
    cmdline
        .as_cstring()
        .map(|c| c.into_bytes_with_nul())
        .map_err(|source| CmdlineError::Invalid {
            part: String::new(),
            source,
        })
}

/// Writes the command line at [`CMDLINE_START`] and returns its address and its size
/// including the NUL. Fails if it is longer than `max` bytes (the kernel's own limit).
pub fn write_cmdline<M: GuestMemoryBackend>(
    mem: &M,
    cmdline: &Cmdline,
    max: usize,
) -> Result<(GuestAddress, usize), CmdlineError> {
    let size = cmdline_bytes(cmdline)?.len();
    let max = max.min(CMDLINE_MAX_SIZE);
    if size > max {
        return Err(CmdlineError::TooLong { size, max });
    }
    let addr = GuestAddress(CMDLINE_START);
    load_cmdline(mem, addr, cmdline).map_err(CmdlineError::Write)?;
    Ok((addr, size))
}

#[allow(clippy::unwrap_used)]
#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    fn text(c: &Cmdline) -> String {
        c.as_cstring().unwrap().into_string().unwrap()
    }

    #[test]
    fn appended_parts_follow_the_user_part() {
        let c = build_cmdline("console=ttyS0 quiet", &["panic=-1", "reboot=k"]).unwrap();
        assert_eq!(text(&c), "console=ttyS0 quiet panic=-1 reboot=k");
    }

    #[test]
    fn appended_parts_go_before_init_arguments() {
        let c = build_cmdline("console=ttyS0 -- --verbose", &["panic=-1"]).unwrap();
        assert_eq!(text(&c), "console=ttyS0 panic=-1 -- --verbose");
    }

    #[test]
    fn empty_user_part_is_fine() {
        let c = build_cmdline("", &["memhp_default_state=online_movable", " "]).unwrap();
        assert_eq!(text(&c), "memhp_default_state=online_movable");
    }

    #[test]
    fn too_long_user_part_reports_size_and_limit() {
        let user = "a".repeat(CMDLINE_MAX_SIZE);
        assert_eq!(
            build_cmdline(&user, &[]).unwrap_err(),
            CmdlineError::TooLong {
                size: CMDLINE_MAX_SIZE + 1,
                max: CMDLINE_MAX_SIZE
            }
        );
    }

    #[test]
    fn appended_part_that_overflows_is_reported() {
        let user = "a".repeat(CMDLINE_MAX_SIZE - 10);
        let err = build_cmdline(&user, &["panic=-1", "reboot=k"]).unwrap_err();
        // "panic=-1" fills the line exactly (user + ' ' + 8 bytes + NUL); "reboot=k" is
        // the part that does not fit.
        assert_eq!(
            err,
            CmdlineError::TooLong {
                size: CMDLINE_MAX_SIZE + 9,
                max: CMDLINE_MAX_SIZE
            }
        );
        let c = build_cmdline(&user, &["panic=-1"]).unwrap();
        assert_eq!(cmdline_bytes(&c).unwrap().len(), CMDLINE_MAX_SIZE);
    }

    #[test]
    fn non_ascii_is_invalid() {
        assert!(matches!(
            build_cmdline("console=ttyS0", &["x=\u{e9}"]),
            Err(CmdlineError::Invalid { part, .. }) if part == "x=\u{e9}"
        ));
        assert!(matches!(
            build_cmdline("a\nb", &[]),
            Err(CmdlineError::Invalid { .. })
        ));
    }

    #[test]
    fn write_places_nul_terminated_bytes() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let c = build_cmdline("console=ttyS0", &["panic=-1"]).unwrap();
        let (addr, size) = write_cmdline(&mem, &c, CMDLINE_MAX_SIZE).unwrap();
        assert_eq!(addr, GuestAddress(CMDLINE_START));
        assert_eq!(size, "console=ttyS0 panic=-1".len() + 1);
        let mut buf = vec![0u8; size];
        mem.read_slice(&mut buf, addr).unwrap();
        assert_eq!(&buf, b"console=ttyS0 panic=-1\0");
    }

    #[test]
    fn write_enforces_the_kernel_limit() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let c = build_cmdline("console=ttyS0", &[]).unwrap();
        assert_eq!(
            write_cmdline(&mem, &c, 8).unwrap_err(),
            CmdlineError::TooLong { size: 14, max: 8 }
        );
    }
}
