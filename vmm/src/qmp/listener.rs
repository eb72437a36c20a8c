//! The server's socket file: a listening unix socket at a path the user
//! chose, readable and writable by its owner only, removed when the server
//! goes away.
//!
//! What may already be at the path:
//!
//! * nothing: the socket is created;
//! * a socket nobody listens on (left by a VMM that died): it is replaced;
//! * a socket someone listens on: start-up fails, the other VM keeps it;
//! * anything else (a regular file, a directory, a symbolic link): start-up
//!   fails and the file is left alone.
//!
//! The socket is bound under umask 0177, so it has mode 0600 from the
//! moment it appears: no `chmod` afterwards (which would follow a link put
//! in its place), and no window in which another user can connect. The
//! umask is process-wide: it is changed only for the `bind` call, at set-up,
//! when no other VMM thread creates files.
//!
//! Replacing a stale socket cannot remove a live one: the check (connect,
//! refused), the removal (only of the very inode that refused) and the
//! `bind` happen under an exclusive `flock` on the directory, which every
//! VMM binding in that directory takes; `bind` itself never replaces a
//! file. The lock is advisory: it orders VMMs, not arbitrary programs.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use thiserror::Error;

/// How long binding waits for another VMM to finish binding in the same
/// directory (it holds the lock for a few system calls).
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Errors creating the socket file.
#[derive(Debug, Error)]
pub enum ListenerError {
    /// Another process listens on the path.
    #[error("QMP socket {} is in use by another process", .0.display())]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("{} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    /// What is at the path could not be examined.
    #[error("cannot examine {}", .path.display())]
    Probe {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A stale socket could not be removed.
    #[error("cannot remove stale socket {}", .path.display())]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The socket could not be created or set up.
    #[error("cannot listen on {}", .path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A non-blocking listening socket that owns its socket file.
#[derive(Debug)]
pub(crate) struct SocketListener {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the file we created, so that drop removes only
    /// our own file.
    identity: (u64, u64),
}

impl SocketListener {
    /// Creates the socket at `path`; see the [module docs](self) for what
    /// happens to a file already there.
    pub(crate) fn bind(path: &Path) -> Result<Self, ListenerError> {
        let bind_err = |source| ListenerError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let _lock = lock_directory(path).map_err(bind_err)?;
        remove_stale(path)?;
        let listener = bind_owner_only(path).map_err(bind_err)?;
        let set_up = || -> io::Result<(u64, u64)> {
            listener.set_nonblocking(true)?;
            let meta = fs::symlink_metadata(path)?;
            Ok((meta.dev(), meta.ino()))
        };
        match set_up() {
            Ok(identity) => Ok(Self {
                listener,
                path: path.to_path_buf(),
                identity,
            }),
            Err(e) => {
                let _ = fs::remove_file(path);
                Err(bind_err(e))
            }
        }
    }

    /// The listening socket.
    pub(crate) fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// The socket file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketListener {
    fn drop(&mut self) {
        let ours = fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && (m.dev(), m.ino()) == self.identity);
        if ours && let Err(e) = fs::remove_file(&self.path) {
            log::warn!("cannot remove QMP socket {}: {e}", self.path.display());
        }
    }
}

/// Binds a listening socket at `path` with mode 0600 from the start (see
/// the [module docs](self)).
fn bind_owner_only(path: &Path) -> io::Result<UnixListener> {
    // SAFETY: umask only swaps the process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let result = UnixListener::bind(path);
    // SAFETY: as above; puts the caller's mask back.
    unsafe { libc::umask(old) };
    result
}

/// Takes the exclusive `flock` on the directory holding `path`, waiting up
/// to [`LOCK_WAIT`]; released when the returned descriptor is dropped.
fn lock_directory(path: &Path) -> io::Result<OwnedFd> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let fd: OwnedFd = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)?
        .into();
    let end = Instant::now() + LOCK_WAIT;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(fd);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::WouldBlock || Instant::now() >= end {
            return Err(e);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Clears the way for a new socket at `path`, or says why not. Call it
/// with the directory locked ([`lock_directory`]).
fn remove_stale(path: &Path) -> Result<(), ListenerError> {
    let probe_err = |source| ListenerError::Probe {
        path: path.to_path_buf(),
        source,
    };
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(probe_err(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ListenerError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ListenerError::InUse(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            // Only the file that refused: not one a program that ignores
            // the lock put there since.
            let same = fs::symlink_metadata(path).is_ok_and(|m| {
                m.file_type().is_socket() && m.ino() == meta.ino() && m.dev() == meta.dev()
            });
            if !same {
                return Err(ListenerError::InUse(path.to_path_buf()));
            }
            log::info!("replacing stale QMP socket {}", path.display());
            match fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(ListenerError::RemoveStale {
                    path: path.to_path_buf(),
                    source,
                }),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(probe_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("vmm-qmp-listener-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn test_bind_creates_owner_only_socket_and_drop_removes_it() {
        let d = scratch("create");
        let p = d.join("qmp.sock");
        let l = SocketListener::bind(&p).unwrap();
        let meta = fs::symlink_metadata(&p).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(l.path(), p);
        drop(l);
        assert!(!p.exists());
    }

    #[test]
    fn test_bind_replaces_stale_socket() {
        let d = scratch("stale");
        let p = d.join("qmp.sock");
        drop(UnixListener::bind(&p).unwrap()); // Leaves the file, nobody listens.
        assert!(p.exists());
        let l = SocketListener::bind(&p).unwrap();
        UnixStream::connect(&p).unwrap();
        drop(l);
    }

    #[test]
    fn test_bind_refuses_live_socket_and_leaves_it() {
        let d = scratch("live");
        let p = d.join("qmp.sock");
        let other = UnixListener::bind(&p).unwrap();
        let e = SocketListener::bind(&p).unwrap_err();
        assert!(matches!(e, ListenerError::InUse(_)), "{e}");
        assert!(e.to_string().contains("in use"), "{e}");
        UnixStream::connect(&p).expect("the other listener still works");
        drop(other);
    }

    #[test]
    fn test_bind_refuses_regular_file_and_keeps_it() {
        let d = scratch("file");
        let p = d.join("not-a-socket");
        fs::write(&p, b"precious").unwrap();
        let e = SocketListener::bind(&p).unwrap_err();
        assert!(matches!(e, ListenerError::NotASocket(_)), "{e}");
        assert_eq!(fs::read(&p).unwrap(), b"precious");
    }

    #[test]
    fn test_bind_refuses_symlink_to_socket() {
        let d = scratch("symlink");
        let target = d.join("real.sock");
        let _l = UnixListener::bind(&target).unwrap();
        let p = d.join("link.sock");
        std::os::unix::fs::symlink(&target, &p).unwrap();
        let e = SocketListener::bind(&p).unwrap_err();
        assert!(matches!(e, ListenerError::NotASocket(_)), "{e}");
    }

    /// Two binds racing for the same stale path: one wins and keeps a
    /// working socket; the other fails (before the lock, the loser could
    /// remove the winner's fresh socket as "stale").
    #[test]
    fn test_racing_binds_on_a_stale_socket_never_steal() {
        let d = scratch("race");
        let p = d.join("qmp.sock");
        for _ in 0..50 {
            drop(UnixListener::bind(&p).unwrap()); // Stale.
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
            let racers: Vec<_> = (0..2)
                .map(|_| {
                    let (p, b) = (p.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        b.wait();
                        SocketListener::bind(&p)
                    })
                })
                .collect();
            let results: Vec<_> = racers.into_iter().map(|t| t.join().unwrap()).collect();
            let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
            assert_eq!(winners.len(), 1, "{results:?}");
            let w = winners[0];
            let meta = fs::symlink_metadata(&p).unwrap();
            assert_eq!((meta.dev(), meta.ino()), w.identity);
            UnixStream::connect(&p).expect("the winner's socket works");
            assert!(
                results
                    .iter()
                    .any(|r| matches!(r, Err(ListenerError::InUse(_)))),
                "{results:?}"
            );
            drop(results);
            let _ = fs::remove_file(&p);
        }
    }

    #[test]
    fn test_bind_in_missing_directory_fails() {
        let d = scratch("missing");
        let e = SocketListener::bind(&d.join("no/such/dir/qmp.sock")).unwrap_err();
        assert!(matches!(e, ListenerError::Bind { .. }), "{e}");
    }

    #[test]
    fn test_drop_leaves_a_replacement_file_alone() {
        let d = scratch("replaced");
        let p = d.join("qmp.sock");
        let l = SocketListener::bind(&p).unwrap();
        fs::remove_file(&p).unwrap();
        fs::write(&p, b"someone else's").unwrap();
        drop(l);
        assert_eq!(fs::read(&p).unwrap(), b"someone else's");
    }
}
