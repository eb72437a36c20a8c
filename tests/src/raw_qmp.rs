//! A QMP client over a raw socket, for tests that need to control exactly
//! what is sent (the `qemu.qmp` Python client is used where a real client's
//! behaviour is the point), and waiting for a child process to end.

use serde_json::Value;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// A negotiated connection: the stream to write to and a reader of its lines.
pub type RawQmp = (UnixStream, BufReader<UnixStream>);

/// Connects to the QMP socket at `sock` (retrying for up to 60 s while the
/// VMM starts), reads the greeting and negotiates capabilities. Replies are
/// waited for at most 30 s. Panics if any of that fails.
pub fn connect(sock: &Path) -> RawQmp {
    let end = Instant::now() + Duration::from_secs(60);
    let s = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(_) if Instant::now() < end => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("cannot connect to QMP: {e}"),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("a read timeout on a unix socket");
    let mut r = BufReader::new(s.try_clone().expect("a second handle on the socket"));
    let mut line = String::new();
    r.read_line(&mut line).expect("the QMP greeting");
    assert!(line.contains("QMP"), "{line}");
    let mut w = s.try_clone().expect("a second handle on the socket");
    w.write_all(br#"{"execute":"qmp_capabilities"}"#)
        .expect("sending qmp_capabilities");
    // Events may come before the reply (the VM runs): skip them.
    loop {
        line.clear();
        r.read_line(&mut line).expect("the qmp_capabilities reply");
        if !line.contains("\"event\"") {
            break;
        }
    }
    assert!(line.contains("return"), "{line}");
    (s, r)
}

/// Sends `cmd` (a JSON command) and returns the reply, skipping events.
pub fn execute(c: &mut RawQmp, cmd: &str) -> Value {
    c.0.write_all(cmd.as_bytes())
        .expect("sending a QMP command");
    loop {
        let mut line = String::new();
        c.1.read_line(&mut line)
            .expect("QMP did not answer within 30 s");
        let v: Value = serde_json::from_str(&line).expect("a JSON reply");
        if v.get("event").is_none() {
            return v;
        }
    }
}

/// Sends `cmd` and returns its `return` value; panics on an error reply.
pub fn execute_ok(c: &mut RawQmp, cmd: Value) -> Value {
    let r = execute(c, &cmd.to_string());
    assert!(r.get("error").is_none(), "{cmd} -> {r}");
    r["return"].clone()
}

/// Reads messages until an event named `name` comes, for at most `limit`;
/// returns its `data` and every message read on the way. Replies are
/// waited for at most 30 s again afterwards, as [`connect`] sets.
pub fn wait_event(c: &mut RawQmp, name: &str, limit: Duration) -> (Value, Vec<Value>) {
    let end = Instant::now() + limit;
    let mut seen = Vec::new();
    c.1.get_ref()
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("a read timeout on a unix socket");
    let mut line = String::new();
    while Instant::now() < end {
        match c.1.read_line(&mut line) {
            Ok(0) => panic!("QMP closed while waiting for {name}; seen {seen:?}"),
            Ok(_) => {
                let v: Value =
                    serde_json::from_str(&line).expect("a read timeout on a unix socket");
                line.clear();
                if v["event"] == name {
                    c.1.get_ref()
                        .set_read_timeout(Some(Duration::from_secs(30)))
                        .expect("a read timeout on a unix socket");
                    return (v["data"].clone(), seen);
                }
                seen.push(v);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("reading QMP: {e}"),
        }
    }
    panic!("no {name} within {limit:?}; seen {seen:?}");
}

/// Waits up to `limit` for `child` to end; kills and reaps it and returns
/// `None` if it did not.
pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if let Some(s) = child.try_wait().expect("waiting for the child") {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}
