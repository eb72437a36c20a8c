//! The QMP server: the listening socket, every client connection and the
//! event queue, as one subscriber of the control thread's event loop.
//!
//! Everything happens on the control thread, inside
//! [`MutEventSubscriber::process`]: accepting clients, reading and running
//! their commands, delivering events. Sockets are non-blocking, so one
//! client never holds up another or the VM; module `connection` documents
//! the limits that bound what a client can make the server buffer.
//! Events the guest drives (`MEMORY_DEVICE_SIZE_CHANGE`) are rate-limited
//! per device as QEMU does (module `throttle`), with a timerfd in the same
//! loop delivering the held ones.

use super::commands;
use super::connection::{Connection, ReadStatus};
use super::error::QmpError;
use super::event::{EventQueue, EventSender, QmpEvent};
use super::json_splitter::Frame;
use super::listener::{ListenerError, SocketListener};
use super::protocol::{self, Timestamp};
use super::throttle::{EventThrottle, THROTTLE_PERIOD};
use super::vm_ops::VmOps;
use event_manager::{EventOps, Events, MutEventSubscriber};
use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

/// Connections beyond this many are accepted and closed at once.
pub const MAX_CLIENTS: usize = 64;

/// Connections accepted per wake-up of the listening socket.
const ACCEPT_BATCH: usize = 16;

/// A client that has not negotiated (`qmp_capabilities`) this long after it
/// connected is disconnected, so idle connections cannot hold the
/// [`MAX_CLIENTS`] places forever. (QEMU has no such deadline; ten seconds
/// is far more than any client library takes to answer the greeting.)
pub(crate) const NEGOTIATION_DEADLINE: Duration = Duration::from_secs(10);

/// How long the listening socket is left alone after `accept` failed for
/// a reason other than "nothing to accept" (out of descriptors: EMFILE,
/// ENFILE; out of memory): the pending connection stays queued, so watching
/// the socket meanwhile would wake the loop again at once, forever.
const ACCEPT_PAUSE: Duration = Duration::from_millis(250);

/// Errors starting the server.
#[derive(Debug, Error)]
pub enum ServerError {
    /// The socket file could not be created.
    #[error(transparent)]
    Listen(#[from] ListenerError),
    /// The event queue's eventfd could not be created.
    #[error("cannot create the QMP event queue")]
    EventQueue(#[source] io::Error),
    /// The event throttle's timerfd could not be created.
    #[error("cannot create the QMP event timer")]
    Timer(#[source] io::Error),
}

/// A QMP server on a unix socket, driven by the control thread's event loop.
///
/// Register it with the loop, keeping a handle for shutdown:
///
/// ```ignore
/// let qmp = Arc::new(Mutex::new(QmpServer::new(path, Box::new(ops))?));
/// let events = qmp.lock().unwrap().event_sender();
/// control_loop.add(qmp.clone());
/// // ... control_loop.run() ...
/// qmp.lock().unwrap().shutdown(Duration::from_millis(200));
/// ```
pub struct QmpServer {
    listener: Option<SocketListener>,
    clients: HashMap<RawFd, Connection>,
    vm: Box<dyn VmOps + Send>,
    events: Arc<EventQueue>,
    /// Connections whose output or state changed during this wake-up.
    dirty: BTreeSet<RawFd>,
    /// Guest-driven events held back by the rate limit.
    throttle: EventThrottle,
    /// Armed while the throttle holds a window open.
    timer: TimerFd,
    /// See [`NEGOTIATION_DEADLINE`].
    negotiation_deadline: Duration,
    /// While set, the listening socket is not watched (an accept failure);
    /// watched again from then on.
    accept_paused_until: Option<Instant>,
    /// Armed for the next negotiation deadline or the end of an accept
    /// pause, whichever comes first.
    housekeeping: TimerFd,
}

impl std::fmt::Debug for QmpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpServer")
            .field("path", &self.socket_path())
            .field("clients", &self.clients.len())
            .finish_non_exhaustive()
    }
}

impl QmpServer {
    /// Creates the socket at `path` (mode 0600; a stale socket is replaced,
    /// a live one or a non-socket is an error) and a server that acts on
    /// `vm`. Nothing is accepted until the server is added to an event loop.
    pub fn new(path: &Path, vm: Box<dyn VmOps + Send>) -> Result<Self, ServerError> {
        let events = EventQueue::new().map_err(ServerError::EventQueue)?;
        let timer = TimerFd::new().map_err(|e| ServerError::Timer(e.into()))?;
        let housekeeping = TimerFd::new().map_err(|e| ServerError::Timer(e.into()))?;
        let listener = SocketListener::bind(path)?;
        Ok(Self {
            listener: Some(listener),
            clients: HashMap::new(),
            vm,
            events,
            dirty: BTreeSet::new(),
            throttle: EventThrottle::new(THROTTLE_PERIOD),
            timer,
            negotiation_deadline: NEGOTIATION_DEADLINE,
            accept_paused_until: None,
            housekeeping,
        })
    }

    /// Replaces [`NEGOTIATION_DEADLINE`] for clients accepted from now on
    /// and those already waiting (tests use a short one). Call it before
    /// adding the server to a loop or between wake-ups.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn set_negotiation_deadline(&mut self, deadline: Duration) {
        self.negotiation_deadline = deadline;
    }

    /// A handle that emits events to every negotiated client; see
    /// [`EventSender`]. Valid for the server's whole life.
    pub fn event_sender(&self) -> EventSender {
        EventSender::new(self.events.clone())
    }

    /// The socket file's path, until [`shutdown`](Self::shutdown).
    pub fn socket_path(&self) -> Option<&Path> {
        self.listener.as_ref().map(SocketListener::path)
    }

    /// How many clients are connected.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    /// Ends the server: delivers queued events, waits up to `grace` for
    /// clients to take their pending output (replies and the final
    /// `SHUTDOWN` event), closes every connection and removes the socket
    /// file. Blocks the caller for at most `grace`. Call it after the event
    /// loop has stopped running (or after removing the server from it);
    /// later calls do nothing.
    pub fn shutdown(&mut self, grace: Duration) {
        if self.listener.is_none() {
            return;
        }
        self.deliver_queued_events(None);
        for (event, at) in self.throttle.drain_held() {
            self.broadcast(None, &event, at);
        }
        let deadline = Instant::now() + grace;
        for conn in self.clients.values_mut() {
            conn.flush_until(deadline);
        }
        self.clients.clear();
        self.dirty.clear();
        self.listener = None;
    }

    fn accept(&mut self, ops: &mut EventOps) {
        let Some(listener) = &self.listener else {
            return;
        };
        for _ in 0..ACCEPT_BATCH {
            let stream = match listener.listener().accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    log::warn!(
                        "QMP accept failed: {e}; not accepting for {} ms",
                        ACCEPT_PAUSE.as_millis()
                    );
                    self.pause_accepting(ops);
                    return;
                }
            };
            if self.clients.len() >= MAX_CLIENTS {
                log::warn!("QMP client refused: {MAX_CLIENTS} clients already connected");
                continue;
            }
            let mut conn = match Connection::new(stream) {
                Ok(conn) => conn,
                Err(e) => {
                    log::warn!("QMP client set-up failed: {e}");
                    continue;
                }
            };
            conn.flush();
            if conn.should_close() {
                continue;
            }
            let fd = conn.fd();
            let interest = conn.interest();
            match ops.add(Events::new_raw(fd, interest)) {
                Ok(()) => {
                    log::debug!("QMP client connected (fd {fd})");
                    conn.registered = interest;
                    self.clients.insert(fd, conn);
                }
                Err(e) => log::warn!("cannot watch QMP client: {e}"),
            }
        }
    }

    /// Stops watching the listening socket for [`ACCEPT_PAUSE`].
    fn pause_accepting(&mut self, ops: &mut EventOps) {
        if let Some(listener) = &self.listener {
            let _ = ops.remove(Events::empty_raw(listener.listener().as_raw_fd()));
            self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
        }
    }

    /// Watches the listening socket again.
    fn resume_accepting(&mut self, ops: &mut EventOps) {
        self.accept_paused_until = None;
        if let Some(listener) = &self.listener
            && let Err(e) = ops.add(Events::new_raw(
                listener.listener().as_raw_fd(),
                EventSet::IN,
            ))
        {
            log::error!("cannot watch the QMP socket again: {e}");
        }
    }

    /// Ends an accept pause that is over, and disconnects the clients whose
    /// negotiation deadline passed.
    fn housekeep(&mut self, ops: &mut EventOps) {
        let now = Instant::now();
        if self.accept_paused_until.is_some_and(|until| until <= now) {
            self.resume_accepting(ops);
        }
        for (fd, conn) in &mut self.clients {
            if !conn.negotiated && conn.accepted + self.negotiation_deadline <= now {
                log::info!(
                    "QMP client disconnected: no qmp_capabilities within {} s",
                    self.negotiation_deadline.as_secs_f32()
                );
                conn.mark_broken();
                self.dirty.insert(*fd);
            }
        }
    }

    /// Arms the housekeeping timer for the next negotiation deadline or
    /// the end of the accept pause, or disarms it.
    fn arm_housekeeping(&mut self) {
        let deadlines = self
            .clients
            .values()
            .filter(|c| !c.negotiated)
            .map(|c| c.accepted + self.negotiation_deadline);
        let next = deadlines.chain(self.accept_paused_until).min();
        let result = match next {
            Some(at) => self.housekeeping.reset(
                at.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
                None,
            ),
            None => self.housekeeping.clear(),
        };
        if let Err(e) = result {
            log::warn!("cannot set the QMP housekeeping timer: {e}");
        }
    }

    /// Reads from a client and runs what it sent.
    fn serve(&mut self, fd: RawFd, ready: EventSet) {
        let Some(mut conn) = self.clients.remove(&fd) else {
            return;
        };
        let status = conn.read();
        if ready.intersects(EventSet::HANG_UP | EventSet::ERROR) && status == ReadStatus::Idle {
            // Gone, and nothing more to read: nobody to answer.
            conn.mark_broken();
        }
        // Make room first: replies are held back while output is backed up.
        conn.flush();
        loop {
            while let Some(frame) = conn.next_frame() {
                self.handle_frame(&mut conn, frame);
            }
            conn.flush();
            if !conn.can_take_more() {
                break;
            }
        }
        self.clients.insert(fd, conn);
        self.dirty.insert(fd);
    }

    fn handle_frame(&mut self, conn: &mut Connection, frame: Frame) {
        let message = match frame_message(frame) {
            Ok(message) => message,
            Err(e) => {
                conn.queue(&protocol::encode(&protocol::response(None, Err(e))));
                return;
            }
        };
        let outcome = commands::execute(message, &mut conn.negotiated, self.vm.as_mut());
        let now = Timestamp::now();
        for event in &outcome.before {
            self.broadcast(Some(&mut *conn), event, now);
        }
        // Events the VM sent while the command ran come before its reply.
        self.deliver_queued_events(Some(&mut *conn));
        conn.queue(&protocol::encode(&outcome.reply));
        let now = Timestamp::now();
        for event in &outcome.after {
            self.broadcast(Some(&mut *conn), event, now);
        }
    }

    /// Queues `event` to every negotiated client, `current` (a client taken
    /// out of the table while it is served) included.
    fn broadcast(&mut self, current: Option<&mut Connection>, event: &QmpEvent, at: Timestamp) {
        let bytes = protocol::encode(&event.to_message(at));
        for (fd, conn) in &mut self.clients {
            if conn.negotiated {
                conn.queue(&bytes);
                self.dirty.insert(*fd);
            }
        }
        if let Some(conn) = current
            && conn.negotiated
        {
            conn.queue(&bytes);
        }
    }

    /// Delivers what senders queued, except what the rate limit holds.
    fn deliver_queued_events(&mut self, mut current: Option<&mut Connection>) {
        let now = Instant::now();
        for stamped in self.events.drain() {
            if let Some((event, at)) = self.throttle.offer(now, stamped) {
                self.broadcast(current.as_deref_mut(), &event, at);
            }
        }
        self.arm_timer(now);
    }

    /// Delivers the held events whose window has ended.
    fn deliver_held_events(&mut self) {
        let now = Instant::now();
        for (event, at) in self.throttle.due(now) {
            self.broadcast(None, &event, at);
        }
        self.arm_timer(now);
    }

    /// Arms the timer for the end of the earliest open window, or disarms
    /// it. Either way its expirations are reset, so epoll stops reporting
    /// it until it fires again; it is never read.
    fn arm_timer(&mut self, now: Instant) {
        let result = match self.throttle.next_deadline() {
            Some(ends) => self.timer.reset(
                ends.saturating_duration_since(now)
                    .max(Duration::from_millis(1)),
                None,
            ),
            None => self.timer.clear(),
        };
        if let Err(e) = result {
            log::warn!("cannot set the QMP event timer: {e}");
        }
    }

    /// Flushes the connections touched during this wake-up, drops the ones
    /// that are done, and updates what epoll watches for the others.
    fn settle(&mut self, ops: &mut EventOps) {
        for fd in std::mem::take(&mut self.dirty) {
            let Some(conn) = self.clients.get_mut(&fd) else {
                continue;
            };
            conn.flush();
            if conn.should_close() {
                log::debug!("QMP client disconnected (fd {fd})");
                let _ = ops.remove(Events::empty_raw(fd));
                self.clients.remove(&fd);
                continue;
            }
            let interest = conn.interest();
            if interest != conn.registered {
                match ops.modify(Events::new_raw(fd, interest)) {
                    Ok(()) => conn.registered = interest,
                    Err(e) => {
                        log::warn!("cannot update QMP client watch: {e}");
                        let _ = ops.remove(Events::empty_raw(fd));
                        self.clients.remove(&fd);
                    }
                }
            }
        }
    }
}

/// The JSON value a frame carries, or the error to answer it with (without
/// an `id`): input that is not JSON, or that the splitter refused.
pub(crate) fn frame_message(frame: Frame) -> Result<serde_json::Value, QmpError> {
    match frame {
        Frame::Message(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| QmpError::generic(format!("JSON parse error, {e}"))),
        Frame::Error(desc) | Frame::TooLarge(desc) => Err(QmpError::generic(desc)),
    }
}

impl MutEventSubscriber for QmpServer {
    fn init(&mut self, ops: &mut EventOps) {
        if let Some(listener) = &self.listener
            && let Err(e) = ops.add(Events::new_raw(
                listener.listener().as_raw_fd(),
                EventSet::IN,
            ))
        {
            log::error!("cannot watch the QMP socket: {e}");
        }
        if let Err(e) = ops.add(Events::new(self.events.wake_fd(), EventSet::IN)) {
            log::error!("cannot watch the QMP event queue: {e}");
        }
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            log::error!("cannot watch the QMP event timer: {e}");
        }
        if let Err(e) = ops.add(Events::new(&self.housekeeping, EventSet::IN)) {
            log::error!("cannot watch the QMP housekeeping timer: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let listener_fd = self.listener.as_ref().map(|l| l.listener().as_raw_fd());
        if Some(fd) == listener_fd {
            self.accept(ops);
        } else if fd == self.events.wake_fd().as_raw_fd() {
            self.deliver_queued_events(None);
        } else if fd == self.timer.as_raw_fd() {
            self.deliver_held_events();
        } else if fd == self.housekeeping.as_raw_fd() {
            self.housekeep(ops);
        } else if self.clients.contains_key(&fd) {
            self.serve(fd, events.event_set());
        } else {
            // Not ours any more (the server was shut down).
            let _ = ops.remove(Events::empty_raw(fd));
        }
        self.settle(ops);
        self.arm_housekeeping();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::FakeVm;
    use event_manager::{EventManager, SubscriberOps};
    use serde_json::{Value, json};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::PathBuf;
    use std::sync::Mutex;

    type Em = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

    struct Fixture {
        em: Em,
        server: Arc<Mutex<QmpServer>>,
        path: PathBuf,
    }

    impl Fixture {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("vmm-qmp-server-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("qmp.sock");
            let server = Arc::new(Mutex::new(
                QmpServer::new(&path, Box::new(FakeVm::new())).unwrap(),
            ));
            let mut em = Em::new().unwrap();
            em.add_subscriber(server.clone());
            Self { em, server, path }
        }

        /// Runs the loop until it has nothing to do for 20 ms.
        fn pump(&mut self) {
            while self.em.run_with_timeout(20).unwrap() > 0 {}
        }

        fn connect(&mut self) -> Client {
            let s = UnixStream::connect(&self.path).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            self.pump();
            let mut c = Client { s, buf: Vec::new() };
            let g = c.recv_all();
            assert_eq!(g.len(), 1);
            assert!(g[0].get("QMP").is_some());
            c
        }
    }

    struct Client {
        s: UnixStream,
        buf: Vec<u8>,
    }

    impl Client {
        fn send(&mut self, text: &str) {
            self.s.write_all(text.as_bytes()).unwrap();
        }

        /// Every complete line received so far.
        fn recv_all(&mut self) -> Vec<Value> {
            let mut chunk = [0u8; 65536];
            loop {
                match self.s.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                    Err(_) => break,
                }
            }
            let mut out = Vec::new();
            while let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..pos + 2).collect();
                out.push(serde_json::from_slice(&line[..pos]).unwrap());
            }
            out
        }
    }

    fn negotiate(f: &mut Fixture, c: &mut Client) {
        c.send(r#"{"execute":"qmp_capabilities"}"#);
        f.pump();
        assert_eq!(c.recv_all(), vec![json!({"return": {}})]);
    }

    #[test]
    fn test_commands_split_and_merged_get_replies_in_order() {
        let mut f = Fixture::new("order");
        let mut c = f.connect();
        c.send(r#"{"execute":"qmp_capabilities","id":1}{"execute":"query-st"#);
        f.pump();
        c.send(r#"atus","id":2}  {"execute":"nope","id":3}"#);
        f.pump();
        let replies = c.recv_all();
        assert_eq!(replies.len(), 3);
        assert_eq!(replies[0], json!({"return": {}, "id": 1}));
        assert_eq!(
            replies[1],
            json!({"return": {"running": true, "status": "running"}, "id": 2})
        );
        assert_eq!(replies[2]["id"], 3);
        assert_eq!(replies[2]["error"]["class"], "CommandNotFound");
    }

    #[test]
    fn test_parse_errors_have_no_id_and_connection_goes_on() {
        let mut f = Fixture::new("garbage");
        let mut c = f.connect();
        c.send("{\"execute\" \"x\", \"id\": 1}\n@@@\n[1]\n");
        f.pump();
        let replies = c.recv_all();
        assert_eq!(replies.len(), 3, "{replies:?}");
        for r in &replies {
            assert!(r.get("id").is_none());
            assert_eq!(r["error"]["class"], "GenericError");
        }
        let descs: Vec<&str> = replies
            .iter()
            .map(|r| r["error"]["desc"].as_str().unwrap())
            .collect();
        assert!(descs[0].starts_with("JSON parse error, "), "{}", descs[0]);
        assert_eq!(descs[1], "JSON parse error, stray '@'");
        assert_eq!(descs[2], "QMP input must be a JSON object");
        negotiate(&mut f, &mut c);
    }

    #[test]
    fn test_events_go_only_to_negotiated_clients() {
        let mut f = Fixture::new("events");
        let mut a = f.connect();
        let mut b = f.connect();
        negotiate(&mut f, &mut a);
        let tx = f.server.lock().unwrap().event_sender();
        tx.send(QmpEvent::MemoryDeviceSizeChange {
            id: "vmem0".into(),
            size: 1 << 30,
        });
        f.pump();
        let got = a.recv_all();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["event"], "MEMORY_DEVICE_SIZE_CHANGE");
        assert_eq!(got[0]["data"]["size"], 1u64 << 30);
        assert!(got[0]["timestamp"]["seconds"].as_u64().unwrap() > 0);
        assert!(b.recv_all().is_empty(), "not negotiated: no events");
    }

    /// A guest plugging in many small steps: the first size goes out at
    /// once, the rest are held and the last one arrives when the window
    /// ends, by the timer; other events are not held; at shutdown a held
    /// size is still delivered. (No timing is asserted: on a loaded machine
    /// a window may end within the burst, which only adds a delivery.)
    #[test]
    fn test_size_changes_are_rate_limited_per_device() {
        let mut f = Fixture::new("throttle");
        let mut c = f.connect();
        negotiate(&mut f, &mut c);
        let tx = f.server.lock().unwrap().event_sender();
        let size = |s: u64| QmpEvent::MemoryDeviceSizeChange {
            id: "vmem0".into(),
            size: s << 20,
        };
        let sizes = |v: &[Value]| -> Vec<u64> {
            v.iter()
                .filter(|e| e["event"] == "MEMORY_DEVICE_SIZE_CHANGE")
                .map(|e| e["data"]["size"].as_u64().unwrap() >> 20)
                .collect()
        };
        for s in 1..=50 {
            tx.send(size(s));
            if s % 10 == 0 {
                f.pump();
            }
        }
        tx.send(QmpEvent::Stop);
        let mut got = Vec::new();
        let t = Instant::now();
        while sizes(&got).last() != Some(&50) && t.elapsed() < Duration::from_secs(30) {
            f.pump();
            got.extend(c.recv_all());
        }
        let seen = sizes(&got);
        assert_eq!(seen.first(), Some(&1), "{got:?}");
        assert_eq!(seen.last(), Some(&50), "the last size never came: {got:?}");
        assert!(seen.len() < 10, "sizes were not held back: {seen:?}");
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
        assert!(got.iter().any(|e| e["event"] == "STOP"), "{got:?}");
        // The delivery of 50 reopened the window: 60 is normally held until
        // the end, and shutdown still delivers it.
        tx.send(size(60));
        f.pump();
        let mut tail = c.recv_all();
        f.server
            .lock()
            .unwrap()
            .shutdown(Duration::from_millis(200));
        tail.extend(c.recv_all());
        assert_eq!(sizes(&tail), [60]);
    }

    #[test]
    fn test_stop_event_precedes_reply_and_reaches_other_clients() {
        let mut f = Fixture::new("stop");
        let mut a = f.connect();
        let mut b = f.connect();
        negotiate(&mut f, &mut a);
        negotiate(&mut f, &mut b);
        a.send(r#"{"execute":"stop","id":"s"}"#);
        f.pump();
        let got = a.recv_all();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0]["event"], "STOP");
        assert!(got[0].get("data").is_none());
        assert_eq!(got[1], json!({"return": {}, "id": "s"}));
        let other = b.recv_all();
        assert_eq!(other.len(), 1);
        assert_eq!(other[0]["event"], "STOP");
    }

    #[test]
    fn test_quit_reply_then_shutdown_event_flushed_by_shutdown() {
        let mut f = Fixture::new("quit");
        let mut a = f.connect();
        negotiate(&mut f, &mut a);
        a.send(r#"{"execute":"quit"}"#);
        // Serve the command, then stop the loop at once as the VMM does.
        f.em.run_with_timeout(1000).unwrap();
        f.server
            .lock()
            .unwrap()
            .shutdown(Duration::from_millis(500));
        let got = a.recv_all();
        assert_eq!(got[0], json!({"return": {}}));
        assert_eq!(got[1]["event"], "SHUTDOWN");
        assert_eq!(
            got[1]["data"],
            json!({"guest": false, "reason": "host-qmp-quit"})
        );
        let mut rest = [0u8; 1];
        assert_eq!(a.s.read(&mut rest).unwrap(), 0, "closed after shutdown");
        assert!(!f.path.exists(), "socket file removed");
    }

    #[test]
    fn test_disconnected_clients_are_forgotten() {
        let mut f = Fixture::new("forget");
        let a = f.connect();
        let mut b = f.connect();
        assert_eq!(f.server.lock().unwrap().client_count(), 2);
        drop(a);
        b.send("{\"execute\": \"qmp_capab");
        drop(b);
        f.pump();
        assert_eq!(f.server.lock().unwrap().client_count(), 0);
    }

    #[test]
    fn test_clients_beyond_limit_are_closed() {
        let mut f = Fixture::new("limit");
        let mut clients: Vec<UnixStream> = Vec::new();
        for _ in 0..MAX_CLIENTS + 3 {
            clients.push(UnixStream::connect(&f.path).unwrap());
            f.pump();
        }
        assert_eq!(f.server.lock().unwrap().client_count(), MAX_CLIENTS);
        let mut last = clients.pop().unwrap();
        last.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(last.read(&mut buf).unwrap(), 0, "refused: closed at once");
    }
}
