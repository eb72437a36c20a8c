//! How a report (`--rcu-stats`, `--rcu-plot`, `--metrics`) reaches the
//! path the user named, without following a link someone else planted.
//!
//! * **Nothing, a regular file, or a symbolic link** at the path: the report
//!   goes to a new temporary file in the same directory, created with
//!   `O_CREAT|O_EXCL|O_NOFOLLOW` under an unpredictable name (retried if the
//!   name is taken), synced, then renamed over the path. Nothing existing
//!   is ever opened for writing: a link planted at a temporary name makes
//!   the creation fail and another name is drawn; a link at the final path
//!   is replaced by the report (the link, never the file it points to). A
//!   failure leaves the old file or none, never a truncated one, and no
//!   temporary file.
//! * **A character device or a FIFO** at the path (`/dev/null`, a named
//!   pipe), or **a link to the process's own stdout or stderr**
//!   (`/dev/stdout`, `/proc/self/fd/1`, `/dev/fd/2`): written in place,
//!   opened without creating or truncating (`O_WRONLY|O_APPEND|O_NOCTTY`),
//!   so the link stays a link and a redirected stdout gets the report after
//!   what it already holds.
//!
//! Runs on the control thread after the VM ended, under its seccomp filter,
//! which allows exactly these two ways of opening a file for writing.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Temporary names tried before giving up (each one is random: a clash
/// means someone races us, or is very unlucky).
const TEMP_ATTEMPTS: usize = 16;

/// Writes `bytes` to `path` as the [module docs](self) describe. Blocks on
/// the file system (and on a FIFO until someone reads). Errors carry the
/// system's reason; the caller adds which report and where.
pub(crate) fn write_report(path: &Path, bytes: &[u8]) -> io::Result<()> {
    if writes_in_place(path)? {
        let mut f = OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_NOCTTY)
            .open(path)?;
        return f.write_all(bytes);
    }
    let (tmp, mut f) = create_temp(path)?;
    let result = (|| {
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Whether `path` is a special file written in place rather than replaced.
fn writes_in_place(path: &Path) -> io::Result<bool> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let kind = meta.file_type();
    if kind.is_char_device() || kind.is_fifo() {
        return Ok(true);
    }
    if !kind.is_symlink() {
        return Ok(false);
    }
    // A link: followed only to our own stdout or stderr.
    let Ok(target) = std::fs::metadata(path) else {
        return Ok(false);
    };
    Ok([libc::STDOUT_FILENO, libc::STDERR_FILENO]
        .into_iter()
        .any(|fd| fd_identity(fd) == Some((target.dev(), target.ino()))))
}

/// Device and inode of what descriptor `fd` refers to, if it is open.
fn fd_identity(fd: libc::c_int) -> Option<(u64, u64)> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a whole `stat` into `st` when it succeeds; a
    // closed `fd` makes it fail, which we report as `None`.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: fstat succeeded, so `st` is initialised.
    let st = unsafe { st.assume_init() };
    Some((st.st_dev, st.st_ino))
}

/// Creates a new file next to `path` under a random name, refusing to open
/// anything that already exists (a link included).
fn create_temp(path: &Path) -> io::Result<(PathBuf, File)> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    let mut last = io::Error::from(io::ErrorKind::AlreadyExists);
    for _ in 0..TEMP_ATTEMPTS {
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{:016x}.tmp", random_u64()?));
        let tmp = path.with_file_name(tmp_name);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// 64 bits from the kernel's random source.
fn random_u64() -> io::Result<u64> {
    let mut buf = [0u8; 8];
    // SAFETY: getrandom writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != buf.len() as isize {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from_ne_bytes(buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-report-file-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn entries(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn creates_and_replaces_a_regular_file_leaving_no_temporary() {
        let d = scratch("regular");
        let p = d.join("stats.json");
        write_report(&p, b"one").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        write_report(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(entries(&d), ["stats.json"]);
    }

    #[test]
    fn a_link_at_the_final_name_is_replaced_not_followed() {
        let d = scratch("final-link");
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let p = d.join("stats.json");
        symlink(&victim, &p).unwrap();
        write_report(&p, b"report").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(!std::fs::symlink_metadata(&p).unwrap().is_symlink());
        assert_eq!(std::fs::read(&p).unwrap(), b"report");
    }

    #[test]
    fn links_at_the_old_temporary_names_are_not_followed() {
        // The names the old code used (`<stem>.tmp.<pid>`), planted.
        let d = scratch("temp-link");
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let p = d.join("stats.json");
        symlink(&victim, d.join(format!("stats.tmp.{}", std::process::id()))).unwrap();
        write_report(&p, b"report").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(&p).unwrap(), b"report");
    }

    #[test]
    fn a_fifo_is_written_in_place() {
        let d = scratch("fifo");
        let p = d.join("pipe");
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: `c` is a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let reader = {
            let p = p.clone();
            std::thread::spawn(move || std::fs::read(p).unwrap())
        };
        write_report(&p, b"through the pipe").unwrap();
        assert_eq!(reader.join().unwrap(), b"through the pipe");
        assert!(std::fs::symlink_metadata(&p).unwrap().file_type().is_fifo());
        assert_eq!(entries(&d), ["pipe"]);
    }

    #[test]
    fn dev_null_is_written_in_place_and_a_missing_directory_fails() {
        write_report(Path::new("/dev/null"), b"nothing").unwrap();
        assert!(
            std::fs::metadata("/dev/null")
                .unwrap()
                .file_type()
                .is_char_device()
        );
        let d = scratch("missing");
        assert!(write_report(&d.join("no/such/dir/x.json"), b"x").is_err());
    }
}
