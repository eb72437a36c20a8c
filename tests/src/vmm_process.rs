//! Running the `vmm` binary as a user would, with a time limit, and looking
//! at what it and the guest printed.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The result of one run.
#[derive(Debug)]
pub struct VmmRun {
    /// Exit status (`None` if it was killed at the time limit).
    pub status: Option<ExitStatus>,
    /// What the guest printed on the serial console.
    pub stdout: String,
    /// What the VMM printed.
    pub stderr: String,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl VmmRun {
    /// The exit code, or a panic explaining the run did not end by itself.
    pub fn code(&self) -> i32 {
        match self.status {
            Some(s) => s
                .code()
                .unwrap_or_else(|| panic!("vmm died of a signal: {s:?}\n{self}")),
            None => panic!("vmm did not finish in time\n{self}"),
        }
    }
}

impl std::fmt::Display for VmmRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tail: Vec<&str> = self.stdout.lines().rev().take(40).collect();
        writeln!(f, "--- vmm stderr ---\n{}", self.stderr)?;
        writeln!(f, "--- guest console (last 40 lines) ---")?;
        for l in tail.iter().rev() {
            writeln!(f, "{l}")?;
        }
        Ok(())
    }
}

/// Runs `bin args...`, feeding `stdin` (then closing it), killing it after
/// `limit`.
pub fn run(bin: &Path, args: &[&str], stdin: &[u8], limit: Duration) -> VmmRun {
    run_as(bin, args, stdin, limit, None)
}

/// As [`run`], with `prefix` (for example `["setpriv", "--reuid", "nobody",
/// ...]`) prepended to the command.
pub fn run_as(
    bin: &Path,
    args: &[&str],
    stdin: &[u8],
    limit: Duration,
    prefix: Option<&[&str]>,
) -> VmmRun {
    let mut cmd = match prefix {
        Some(p) => {
            let mut c = Command::new(p[0]);
            c.args(&p[1..]).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let start = Instant::now();
    let mut child = cmd
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vmm");
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        let _ = tx.send((true, s));
    });
    std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        let _ = tx2.send((false, s));
    });
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = start.elapsed();
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        if let Ok((is_out, s)) = rx.recv_timeout(Duration::from_secs(10)) {
            if is_out {
                stdout = s;
            } else {
                stderr = s;
            }
        }
    }
    VmmRun {
        status,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        elapsed,
    }
}

/// An interactive run: the test reads the console as it comes and writes
/// to it (for guests with a shell).
#[derive(Debug)]
pub struct Session {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    out_rx: mpsc::Receiver<Vec<u8>>,
    /// Everything the guest printed so far.
    pub console: String,
    start: Instant,
}

impl Session {
    /// Starts `bin args...` with piped stdin/stdout (stderr inherited).
    pub fn start(bin: &Path, args: &[&str]) -> Self {
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start vmm");
        let stdin = child.stdin.take();
        let mut out = child.stdout.take().expect("stdout");
        let (tx, out_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match out.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Self {
            child,
            stdin,
            out_rx,
            console: String::new(),
            start: Instant::now(),
        }
    }

    /// Waits until the console shows `needle`; returns whether it did
    /// within `limit`.
    pub fn wait_for(&mut self, needle: &str, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while !self.console.contains(needle) {
            let Some(left) = end.checked_duration_since(Instant::now()) else {
                return false;
            };
            match self
                .out_rx
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(b) => self.console.push_str(&String::from_utf8_lossy(&b)),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return self.console.contains(needle),
            }
        }
        true
    }

    /// Types `text` on the console.
    pub fn send(&mut self, text: &str) {
        if let Some(i) = self.stdin.as_mut() {
            let _ = i.write_all(text.as_bytes());
            let _ = i.flush();
        }
    }

    /// Waits up to `limit` for the VMM to exit; returns its status and how
    /// long the wait took. Kills it if it does not exit.
    pub fn wait_exit(&mut self, limit: Duration) -> (Option<ExitStatus>, Duration) {
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Ok(Some(s)) = self.child.try_wait() {
                return (Some(s), t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        (None, t.elapsed())
    }

    /// Time since start.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `vmm` child process and the scratch directory that holds its files (QMP
/// socket, console, reports). Dropping it kills and reaps the process, so a
/// failing test leaves no VMM running, and removes the directory.
#[derive(Debug)]
pub struct ScratchVmm {
    /// The process.
    pub child: Child,
    /// Its directory (see [`crate::scratch_dir`]).
    pub dir: PathBuf,
}

impl Drop for ScratchVmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `vmm` started in the background with stdin closed and its stdout (the
/// guest console) and stderr each read whole by a thread, for tests that
/// drive it over QMP meanwhile.
#[derive(Debug)]
pub struct Captured {
    /// The process.
    pub child: std::process::Child,
    console: std::thread::JoinHandle<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Captured {
    /// Spawns `cmd` (its stdin, stdout and stderr are set here).
    pub fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vmm");
        let read_all = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = r.read_to_string(&mut s);
                s
            })
        };
        let console = read_all(Box::new(child.stdout.take().expect("stdout")));
        let stderr = read_all(Box::new(child.stderr.take().expect("stderr")));
        Self {
            child,
            console,
            stderr,
        }
    }

    /// Waits up to `limit` for the process to end (killing it if it does
    /// not) and returns its status (`None`: killed), console and stderr.
    pub fn finish(mut self, limit: Duration) -> (Option<ExitStatus>, String, String) {
        let status = crate::raw_qmp::wait_exit(&mut self.child, limit);
        let console = self.console.join().expect("the console reader");
        let stderr = self.stderr.join().expect("the stderr reader");
        (status, console, stderr)
    }
}
