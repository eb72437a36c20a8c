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
//! The mode is set to 0600 right after `bind`; until then the socket has
//! the mode the process umask gives it.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use thiserror::Error;

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
        remove_stale(path)?;
        let bind_err = |source| ListenerError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        let set_up = || -> io::Result<(u64, u64)> {
            fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
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

/// Clears the way for a new socket at `path`, or says why not.
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
