//! The QMP server on a real unix socket, driven by its own event-loop
//! thread with a fake VM, talked to over raw sockets: several clients at
//! once, oversized and truncated input, connection churn, socket-file
//! handling. One `#[ignore]`d test drives it with QEMU's own Python client
//! (`qemu.qmp`) when `QMP_PYTHON` names a Python that has it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code.

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use vmm::test_utils::FakeVm;
use vmm::test_utils::qmp::{CpuInfo, MemoryDeviceInfo, QmpServer};

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    tests::scratch_dir(&format!("qmp-it-{name}"))
}

/// A QMP server on its own event-loop thread, as the control thread runs it.
#[derive(Debug)]
pub struct Harness {
    pub path: PathBuf,
    pub server: Arc<Mutex<QmpServer>>,
    pub quit: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Harness {
    /// Starts a server at `path`.
    pub fn start_at(path: &Path) -> Harness {
        // `quit` and `system_reset` end the server's loop; the "guest" plugs
        // what is requested at once.
        let vm = FakeVm {
            devices: vec![MemoryDeviceInfo {
                id: "vmem0".into(),
                memaddr: 0x1_0000_0000,
                requested_size: 0,
                size: 0,
                max_size: 1 << 30,
                block_size: 2 << 20,
                node: 0,
                memdev: "/objects/mem0".into(),
            }],
            cpus: (0..2)
                .map(|index| CpuInfo {
                    index,
                    thread_id: 4000 + i64::from(index),
                })
                .collect(),
            base_memory: 256 << 20,
            rcu_stats: json!({"call_rcu_calls": 7, "grace_periods": 3}),
            guest_plugs_at_once: true,
            ..FakeVm::new()
        };
        let quit = Arc::clone(&vm.ended);
        let server = Arc::new(Mutex::new(QmpServer::new(path, Box::new(vm)).unwrap()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let server = server.clone();
            let stop = stop.clone();
            let quit = quit.clone();
            std::thread::spawn(move || {
                let mut em =
                    EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
                em.add_subscriber(server.clone());
                while !stop.load(Ordering::SeqCst) && !quit.load(Ordering::SeqCst) {
                    em.run_with_timeout(20).unwrap();
                }
                server.lock().unwrap().shutdown(Duration::from_millis(500));
            })
        };
        Harness {
            path: path.to_path_buf(),
            server,
            quit,
            stop,
            thread: Some(thread),
        }
    }

    /// Starts a server in a fresh directory.
    pub fn start(name: &str) -> Harness {
        Self::start_at(&scratch(name).join("qmp.sock"))
    }

    /// Connected clients, as the server counts them.
    pub fn clients(&self) -> usize {
        self.server.lock().unwrap().client_count()
    }

    /// Waits up to 5 s for the server to count `n` clients.
    pub fn wait_clients(&self, n: usize) {
        for _ in 0..500 {
            if self.clients() == n {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(self.clients(), n);
    }

    /// Stops the loop and waits for the thread (which shuts the server down).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A raw-socket QMP client.
#[derive(Debug)]
pub struct Client {
    pub stream: UnixStream,
    reader: BufReader<UnixStream>,
    /// Events received while waiting for replies.
    pub events: Vec<Value>,
    pub greeting: Value,
}

impl Client {
    /// Connects and reads the greeting.
    pub fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut c = Client {
            stream,
            reader,
            events: Vec::new(),
            greeting: Value::Null,
        };
        c.greeting = c.recv().expect("greeting");
        c
    }

    /// Connects and negotiates.
    pub fn negotiated(path: &Path) -> Client {
        let mut c = Self::connect(path);
        assert_eq!(
            c.execute(json!({"execute": "qmp_capabilities"})),
            json!({"return": {}})
        );
        c
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// The next message; `None` at end of stream.
    pub fn recv(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => {
                assert!(line.ends_with("\r\n"), "QEMU-style line end: {line:?}");
                Some(serde_json::from_str(&line).unwrap())
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("QMP read failed: {e}"),
        }
    }

    /// The next message that is not an event (events are kept in
    /// [`events`](Self::events)).
    pub fn reply(&mut self) -> Value {
        loop {
            let m = self.recv().expect("a reply before end of stream");
            if m.get("event").is_some() {
                self.events.push(m);
            } else {
                return m;
            }
        }
    }

    /// Sends `message` (no newline, as `qemu.qmp` does) and returns the reply.
    pub fn execute(&mut self, message: Value) -> Value {
        self.send_raw(message.to_string().as_bytes());
        self.reply()
    }
}

/// Serialises the tests of this file: one of them counts the process's
/// file descriptors.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Open file descriptors of this process.
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn test_qmp_two_clients_at_once_keep_their_own_state() {
    let _serial = serial();
    let h = Harness::start("two");
    let mut a = Client::connect(&h.path);
    let mut b = Client::connect(&h.path);
    assert_eq!(a.greeting, b.greeting);
    assert_eq!(a.greeting["QMP"]["capabilities"], json!([]));
    a.execute(json!({"execute": "qmp_capabilities"}));
    // b has not negotiated: refused, a is unaffected.
    let r = b.execute(json!({"execute": "query-status", "id": "b1"}));
    assert_eq!(r["error"]["class"], "CommandNotFound");
    assert_eq!(r["id"], "b1");
    let r = a.execute(json!({"execute": "query-status", "id": "a1"}));
    assert_eq!(
        r,
        json!({"return": {"running": true, "status": "running"}, "id": "a1"})
    );
    b.execute(json!({"execute": "qmp_capabilities"}));
    // Interleaved halves of two commands from two clients.
    a.send_raw(br#"{"execute": "qom-set", "arguments": {"path": "vmem0", "#);
    b.send_raw(br#"{"execute": "qom-get", "#);
    a.send_raw(br#""property": "requested-size", "value": 536870912}, "id": 1}"#);
    assert_eq!(a.reply(), json!({"return": {}, "id": 1}));
    b.send_raw(
        br#""arguments": {"path": "/machine/peripheral/vmem0", "property": "requested-size"}, "id": 2}"#,
    );
    assert_eq!(b.reply(), json!({"return": 536870912, "id": 2}));
    // An event reaches both.
    let r = a.execute(json!({"execute": "stop"}));
    assert_eq!(r, json!({"return": {}}));
    assert_eq!(a.events.len(), 1);
    assert_eq!(a.events[0]["event"], "STOP");
    let ev = b.recv().unwrap();
    assert_eq!(ev["event"], "STOP");
    assert!(ev["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
}

#[test]
fn test_qmp_ten_mib_line_closes_only_that_connection() {
    let _serial = serial();
    let h = Harness::start("huge");
    let mut good = Client::negotiated(&h.path);
    let mut bad = Client::negotiated(&h.path);
    let mut writer = bad.stream.try_clone().unwrap();
    let flood = std::thread::spawn(move || {
        let mut line = b"{\"execute\": \"qmp_capabilities\", \"id\": \"".to_vec();
        line.resize(10 << 20, b'a');
        line.extend_from_slice(b"\"}\n");
        // The server closes the connection part-way: the write fails.
        writer.write_all(&line).is_ok()
    });
    // The other client is served while the flood goes on.
    for i in 0..20 {
        let r = good.execute(json!({"execute": "query-version", "id": i}));
        assert_eq!(r["id"], i);
        assert!(r["return"]["qemu"]["major"].is_u64());
    }
    let wrote_everything = flood.join().unwrap();
    assert!(!wrote_everything, "the server must not take 10 MiB");
    // The flooder gets the error (if the close did not discard it), then EOF.
    let mut got = Vec::new();
    while let Some(m) = bad.recv() {
        got.push(m);
    }
    eprintln!("flooder received {got:?}");
    assert!(got.len() <= 1, "{got:?}");
    if let Some(m) = got.first() {
        assert_eq!(
            m,
            &json!({"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}})
        );
    }
    h.wait_clients(1);
    let r = good.execute(json!({"execute": "query-status"}));
    assert_eq!(r["return"]["status"], "running");
}

#[test]
fn test_qmp_pipelined_client_that_reads_late_gets_every_reply() {
    let _serial = serial();
    let h = Harness::start("pipeline");
    let mut c = Client::negotiated(&h.path);
    // Far more reply bytes than the socket buffer and the server's output
    // limit hold: the server must pause and resume, not stall or drop.
    let n = 3000;
    let mut input = Vec::new();
    for i in 0..n {
        input.extend_from_slice(format!(r#"{{"execute":"query-commands","id":{i}}}"#).as_bytes());
    }
    let mut writer = c.stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || writer.write_all(&input).unwrap());
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..n {
        let r = c.reply();
        assert_eq!(r["id"], i);
        assert_eq!(
            r["return"].as_array().unwrap().len(),
            vmm::test_utils::qmp::command_names().count()
        );
    }
    sender.join().unwrap();
    let mut other = Client::negotiated(&h.path);
    assert!(other.execute(json!({"execute": "query-status"}))["return"].is_object());
}

#[test]
fn test_qmp_client_disconnecting_mid_message_is_cleaned_up() {
    let _serial = serial();
    let h = Harness::start("midmsg");
    let mut other = Client::negotiated(&h.path);
    {
        let mut c = Client::negotiated(&h.path);
        c.send_raw(br#"{"execute": "qom-set", "arguments": {"path": "vm"#);
        h.wait_clients(2);
    }
    h.wait_clients(1);
    let r = other.execute(json!({"execute": "query-memory-devices"}));
    assert_eq!(r["return"][0]["data"]["id"], "vmem0");
    assert_eq!(
        r["return"][0]["data"]["requested-size"], 0,
        "the half command did nothing"
    );
}

#[test]
fn test_qmp_hundred_connect_disconnect_cycles_leak_nothing() {
    let _serial = serial();
    let h = Harness::start("churn");
    let mut c = Client::negotiated(&h.path);
    c.execute(json!({"execute": "query-status"}));
    let fds_before = open_fds();
    for i in 0..100 {
        let mut c = Client::connect(&h.path);
        match i % 4 {
            0 => {}
            1 => {
                c.execute(json!({"execute": "qmp_capabilities"}));
            }
            2 => {
                c.execute(json!({"execute": "qmp_capabilities"}));
                c.execute(json!({"execute": "query-cpus-fast"}));
            }
            _ => c.send_raw(b"{\"execute\": [[[[\"unfinished"),
        }
    }
    h.wait_clients(1);
    // Client sockets of the test itself are closed too, so the process's
    // descriptor count is back where it was.
    assert_eq!(open_fds(), fds_before);
    let r = c.execute(json!({"execute": "query-cpus-fast"}));
    assert_eq!(r["return"][1]["thread-id"], 4001);
}

#[test]
fn test_qmp_stale_socket_is_replaced() {
    let _serial = serial();
    let dir = scratch("stale");
    let path = dir.join("qmp.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists(), "a dead VMM's socket file");
    let h = Harness::start_at(&path);
    let mut c = Client::negotiated(&h.path);
    assert!(c.execute(json!({"execute": "query-version"}))["return"].is_object());
}

#[test]
fn test_qmp_live_socket_is_an_error_and_keeps_working() {
    let _serial = serial();
    let h = Harness::start("live");
    let e = QmpServer::new(&h.path, Box::new(FakeVm::new())).unwrap_err();
    assert!(e.to_string().contains("in use"), "{e}");
    let mut c = Client::negotiated(&h.path);
    assert!(c.execute(json!({"execute": "query-version"}))["return"].is_object());
}

#[test]
fn test_qmp_regular_file_is_an_error_and_is_kept() {
    let _serial = serial();
    let path = scratch("regular").join("qmp.sock");
    std::fs::write(&path, b"not a socket").unwrap();
    let e = QmpServer::new(&path, Box::new(FakeVm::new())).unwrap_err();
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
}

#[test]
fn test_qmp_socket_is_owner_only_and_removed_at_shutdown() {
    let _serial = serial();
    use std::os::unix::fs::PermissionsExt;
    let mut h = Harness::start("mode");
    let mode = std::fs::metadata(&h.path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    h.stop();
    assert!(!h.path.exists());
}

#[test]
fn test_qmp_quit_replies_sends_shutdown_and_closes() {
    let _serial = serial();
    let h = Harness::start("quit");
    let mut watcher = Client::negotiated(&h.path);
    let mut c = Client::negotiated(&h.path);
    assert_eq!(
        c.execute(json!({"execute": "quit", "id": "bye"})),
        json!({"return": {}, "id": "bye"})
    );
    let ev = c.recv().unwrap();
    assert_eq!(ev["event"], "SHUTDOWN");
    assert_eq!(
        ev["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    assert_eq!(c.recv(), None, "closed when the VM ends");
    assert_eq!(watcher.recv().unwrap()["event"], "SHUTDOWN");
    assert_eq!(watcher.recv(), None);
    assert!(h.quit.load(Ordering::SeqCst));
}

/// Drives the server with QEMU's Python client. Run with
/// The Python is `tests::qmp_python()`: the venv `scripts/install-deps.sh`
/// makes, or `$QMP_PYTHON`.
#[test]
fn test_qmp_with_python_qemu_qmp_client() {
    let _serial = serial();
    let python = tests::qmp_python();
    let h = Harness::start("python");
    let script = r#"
import asyncio, sys
from qemu.qmp import QMPClient, ExecuteError

async def main(path):
    qmp = QMPClient('vmm-test')
    await qmp.connect(path)
    assert qmp.greeting is not None
    v = await qmp.execute('query-version')
    assert 'qemu' in v and 'package' in v, v
    names = [c['name'] for c in await qmp.execute('query-commands')]
    assert 'x-query-rcu' in names and 'qom-set' in names, names
    assert (await qmp.execute('query-status'))['status'] == 'running'
    cpus = await qmp.execute('query-cpus-fast')
    assert [c['cpu-index'] for c in cpus] == [0, 1], cpus
    await qmp.execute('qom-set', {'path': '/machine/peripheral/vmem0',
                                  'property': 'requested-size', 'value': 1 << 29})
    assert await qmp.execute('qom-get', {'path': 'vmem0', 'property': 'requested-size'}) == 1 << 29
    s = await qmp.execute('query-memory-size-summary')
    assert s == {'base-memory': 256 << 20, 'plugged-memory': 1 << 29}, s
    try:
        await qmp.execute('qom-set', {'path': 'vmem0', 'property': 'requested-size', 'value': 12345})
        raise SystemExit('misaligned size accepted')
    except ExecuteError as e:
        assert e.error_class == 'GenericError', e
        assert 'multiples' in str(e), e
    try:
        await qmp.execute('qom-get', {'path': 'nope', 'property': 'size'})
        raise SystemExit('unknown device accepted')
    except ExecuteError as e:
        assert e.error_class == 'DeviceNotFound', e
    rcu = await qmp.execute('x-query-rcu')
    assert rcu['call_rcu_calls'] == 7, rcu
    with qmp.listener() as listener:
        await qmp.execute('stop')
        ev = await asyncio.wait_for(listener.get(), 5)
        assert ev['event'] == 'STOP', ev
        await qmp.execute('cont')
        ev = await asyncio.wait_for(listener.get(), 5)
        assert ev['event'] == 'RESUME', ev
        await qmp.execute('quit')
        ev = await asyncio.wait_for(listener.get(), 5)
        assert ev['event'] == 'SHUTDOWN' and ev['data']['reason'] == 'host-qmp-quit', ev
    # After 'quit' the server closes the stream, as QEMU does when it exits;
    # qemu.qmp reports that EOF from disconnect() if its reader saw it first.
    # QEMU's own python/qemu/machine/machine.py accepts it after a quit too.
    try:
        await qmp.disconnect()
    except EOFError:
        pass

def legacy(path):
    # The synchronous client qmp-shell is built on.
    from qemu.qmp.legacy import QEMUMonitorProtocol
    m = QEMUMonitorProtocol(path)
    m.connect(negotiate=True)
    assert m.cmd('query-status')['status'] == 'running'
    r = m.cmd_raw('qom-get', {'path': 'vmem0', 'property': 'block-size'})
    assert r == {'return': 2 << 20}, r
    m.close()

legacy(sys.argv[1])
asyncio.run(main(sys.argv[1]))
print('qemu.qmp client: OK')
"#;
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(&h.path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("qemu.qmp client: OK"), "{stdout}");
}

/// Clients that never negotiate fill every place, and are disconnected at
/// the negotiation deadline; then a new client connects and negotiates.
/// (Before the deadline existed, the 64 idle clients held their places
/// forever and every later client was refused.)
#[test]
fn test_qmp_clients_that_never_negotiate_are_disconnected_at_the_deadline() {
    let _serial = serial();
    let h = Harness::start("deadline");
    h.server
        .lock()
        .unwrap()
        .set_negotiation_deadline(Duration::from_secs(1));
    let mut idle: Vec<Client> = (0..vmm::test_utils::qmp::MAX_CLIENTS)
        .map(|_| Client::connect(&h.path))
        .collect();
    h.wait_clients(vmm::test_utils::qmp::MAX_CLIENTS);
    // Every idle client sees its connection end (no reply, end of stream).
    for c in &mut idle {
        c.stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        assert_eq!(c.recv(), None);
    }
    h.wait_clients(0);
    let mut c = Client::negotiated(&h.path);
    assert_eq!(
        c.execute(json!({"execute": "query-status"}))["return"]["status"],
        "running"
    );
    // A negotiated client outlives the deadline.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        c.execute(json!({"execute": "query-status"}))["return"]["status"],
        "running"
    );
}
