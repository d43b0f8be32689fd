//! The control socket: accepts QMP clients, runs their commands, fans out events.
//!
//! Memory is bounded per client and in all, as QEMU's monitor bounds it: each
//! client has one output queue of [`OUTPUT_QUEUE`] messages shared by replies
//! and events. A reply waits for room, so a client that does not read its
//! replies stops being read (its commands wait in its own socket buffer); an
//! event never waits (it comes from a replication thread), so a client whose
//! queue is full when an event arrives is disconnected, with a log line, rather
//! than buffered without bound. At most [`MAX_CLIENTS`] clients are served at
//! once; one message is at most [`MAX_MESSAGE`] bytes.

use super::exports::NbdExports;
use super::framing::{Frame, Framer};
use super::protocol::{error_reply, event_json, greeting, After, ColoHistory, Session, Targets};
use super::ControlError;
use crate::acceptor::{Acceptor, Event};
use crate::replication::{EventSink, Replication};
use crate::stats::DeviceStats;
use crate::sync::MutexExt;
use crate::unix_socket::{self, SocketFile};
use crate::vhost::Resize;
use log::{info, warn};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::Shutdown as SocketShutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

/// Longest QMP message accepted; longer ones are answered with an error.
pub const MAX_MESSAGE: usize = 1 << 20;

/// Messages (replies and events) queued for one client before its commands
/// stop being read, or, for an event, before it is disconnected.
pub const OUTPUT_QUEUE: usize = 64;

/// Clients served at once; more are closed at accept (with a log line).
pub const MAX_CLIENTS: usize = 16;

struct Subscriber {
    id: u64,
    tx: SyncSender<Value>,
    /// To disconnect the client when its queue overflows.
    stream: UnixStream,
}

/// Delivers replication events to every negotiated client.
#[derive(Default)]
pub struct EventHub {
    clients: Mutex<Vec<Subscriber>>,
}

impl EventHub {
    /// A hub with no clients yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// An [`EventSink`] for a replication node that publishes through this hub.
    /// Events are also logged, so they are visible without a QMP client.
    pub fn sink(self: &Arc<Self>) -> EventSink {
        let hub = Arc::clone(self);
        Arc::new(move |ev| {
            info!("event: {ev:?}");
            hub.publish(event_json(&ev));
        })
    }

    /// Queues `msg` for every client; never blocks.
    fn publish(&self, msg: Value) {
        let mut clients = self.clients.lock_or_recover();
        clients.retain(|c| match c.tx.try_send(msg.clone()) {
            Ok(()) => true,
            Err(TrySendError::Disconnected(_)) => false,
            Err(TrySendError::Full(_)) => {
                warn!(
                    "control: client {} does not read its output ({OUTPUT_QUEUE} messages \
                     queued); disconnecting it instead of queueing events without bound",
                    c.id
                );
                let _ = c.stream.shutdown(SocketShutdown::Both);
                false
            }
        });
    }

    fn add(&self, sub: Subscriber) {
        let mut clients = self.clients.lock_or_recover();
        clients.push(sub);
    }

    fn remove(&self, id: u64) {
        let mut clients = self.clients.lock_or_recover();
        clients.retain(|c| c.id != id);
    }
}

/// What the server needs from the daemon.
#[derive(Clone)]
pub struct ControlContext {
    /// The replication node, if the daemon runs in a replication mode.
    pub replication: Option<Arc<dyn Replication>>,
    /// The NBD export QEMU's `nbd-server-*` commands open and close (secondary).
    pub nbd: Option<Arc<NbdExports>>,
    /// Where events come from.
    pub hub: Arc<EventHub>,
    /// Called after `quit` was answered: starts the daemon's orderly shutdown.
    pub on_quit: Arc<dyn Fn() + Send + Sync>,
    /// The served disk's request counters (`query-blockstats`).
    pub stats: Option<Arc<DeviceStats>>,
    /// The served disk's node name.
    pub node: String,
    /// Grows the served disk online (`block_resize`); `None` in a replication
    /// mode, where resizing is refused.
    pub resize: Option<Arc<dyn Resize>>,
}

/// A listening control socket; dropping it stops accepting and removes the file.
pub struct ControlServer {
    /// Declared first: stopped (and the listener closed) before the path goes.
    _acceptor: Acceptor,
    /// Removes the socket path when the server is dropped.
    _file: SocketFile,
}

impl ControlServer {
    /// Binds `path` (mode 0600) and serves clients on background threads.
    /// The path appears only once it accepts connections, already private.
    pub fn spawn(path: &Path, ctx: ControlContext) -> Result<Self, ControlError> {
        let (listener, file) = unix_socket::bind(path, Some(0o600))?;
        let next_id = AtomicU64::new(1);
        let shared = Arc::new(Shared {
            ctx,
            colo: ColoHistory::default(),
            clients: AtomicUsize::new(0),
        });
        let acceptor = Acceptor::spawn("control", listener, None, move |event| {
            if let Event::Accepted(stream) = event {
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                admit(id, stream, &shared);
            }
            None
        })
        .map_err(ControlError::Thread)?;
        info!("control socket listening on {}", path.display());
        Ok(ControlServer {
            _acceptor: acceptor,
            _file: file,
        })
    }
}

/// Shared by every client of one socket.
struct Shared {
    ctx: ControlContext,
    colo: ColoHistory,
    clients: AtomicUsize,
}

/// Serves client `id` on a thread of its own, unless [`MAX_CLIENTS`] are
/// connected already (it is then closed at once).
fn admit(id: u64, stream: UnixStream, shared: &Arc<Shared>) {
    if shared.clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
        shared.clients.fetch_sub(1, Ordering::AcqRel);
        warn!("control: {MAX_CLIENTS} clients connected; closing client {id}");
        return;
    }
    let sh = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name(format!("control-{id}"))
        .spawn(move || {
            serve_client(id, stream, &sh);
            sh.clients.fetch_sub(1, Ordering::AcqRel);
        });
    if let Err(e) = spawned {
        shared.clients.fetch_sub(1, Ordering::AcqRel);
        warn!("control: cannot start a client thread: {e}");
    }
}

fn serve_client(id: u64, stream: UnixStream, shared: &Shared) {
    info!("control: client {id} connected");
    let (tx, rx) = sync_channel::<Value>(OUTPUT_QUEUE);
    let (mut writer, hub_handle) = match (stream.try_clone(), stream.try_clone()) {
        (Ok(w), Ok(h)) => (w, h),
        (Err(e), _) | (_, Err(e)) => {
            warn!("control: client {id}: {e}");
            return;
        }
    };
    // Replies and events share one writer so their bytes never interleave.
    let writer_thread = std::thread::spawn(move || {
        for msg in rx {
            let mut line = msg.to_string().into_bytes();
            line.extend_from_slice(b"\r\n");
            if writer.write_all(&line).is_err() {
                break;
            }
        }
    });
    let _ = tx.send(greeting());
    let quit = read_commands(id, stream, hub_handle, shared, &tx);
    shared.ctx.hub.remove(id);
    drop(tx);
    let _ = writer_thread.join();
    info!("control: client {id} disconnected");
    if quit {
        info!("control: quit requested by client {id}");
        (shared.ctx.on_quit)();
    }
}

/// Reads and answers commands until EOF or `quit`; true when `quit` was asked.
fn read_commands(
    id: u64,
    mut stream: UnixStream,
    hub_handle: UnixStream,
    shared: &Shared,
    tx: &SyncSender<Value>,
) -> bool {
    let ctx = &shared.ctx;
    let targets = Targets {
        replication: ctx.replication.as_deref(),
        nbd: ctx.nbd.as_deref(),
        colo: Some(&shared.colo),
        stats: ctx.stats.as_deref(),
        node: &ctx.node,
        resize: ctx.resize.as_deref(),
    };
    let mut session = Session::default();
    let mut framer = Framer::new(MAX_MESSAGE);
    let mut frames = Vec::new();
    let mut buf = [0u8; 4096];
    let mut hub_handle = Some(hub_handle);
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        framer.push(&buf[..n], &mut frames);
        for frame in frames.drain(..) {
            let (reply, after) = match frame {
                Frame::Json(text) => session.handle(&text, targets),
                Frame::Garbage(g) if g.len() >= MAX_MESSAGE => (
                    error_reply(
                        format!("JSON parse error, message longer than {MAX_MESSAGE} bytes"),
                        None,
                    ),
                    After::Continue,
                ),
                Frame::Garbage(_) => (
                    error_reply("JSON parse error, invalid input", None),
                    After::Continue,
                ),
            };
            let negotiated_now = hub_handle.is_some() && reply.get("return").is_some();
            // Waits while the client's output queue is full: a client that
            // does not read is not read either.
            if tx.send(reply).is_err() {
                return false;
            }
            if negotiated_now {
                // The first successful reply is qmp_capabilities: from now on the
                // client is in command mode and receives events.
                if let Some(stream) = hub_handle.take() {
                    ctx.hub.add(Subscriber {
                        id,
                        tx: tx.clone(),
                        stream,
                    });
                }
            }
            if after == After::Quit {
                return true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::client::QmpClient;
    use crate::control::fake::Fake;
    use crate::replication::{Event, Mode, Stage};
    use serde_json::json;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    use std::path::PathBuf;
    use std::sync::atomic::AtomicUsize;

    fn server(dir: &Path) -> (ControlServer, Arc<EventHub>, Arc<AtomicUsize>, PathBuf) {
        let path = dir.join("ctl.sock");
        let hub = EventHub::new();
        let quits = Arc::new(AtomicUsize::new(0));
        let q = Arc::clone(&quits);
        let ctx = ControlContext {
            replication: Some(Arc::new(Fake::default())),
            nbd: None,
            hub: Arc::clone(&hub),
            on_quit: Arc::new(move || {
                q.fetch_add(1, Ordering::SeqCst);
            }),
            stats: None,
            node: String::new(),
            resize: None,
        };
        (ControlServer::spawn(&path, ctx).unwrap(), hub, quits, path)
    }

    #[test]
    fn socket_is_private_and_removed_when_the_server_stops() {
        let dir = tempfile::tempdir().unwrap();
        let (srv, _, _, path) = server(dir.path());
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        drop(srv);
        assert!(!path.exists());
    }

    #[test]
    fn clients_in_turn_run_commands_and_receive_events() {
        let dir = tempfile::tempdir().unwrap();
        let (_srv, hub, _, path) = server(dir.path());
        for _ in 0..3 {
            let mut c = QmpClient::connect(&path, Some(std::time::Duration::from_secs(5))).unwrap();
            let st = c.execute("query-replication", json!({})).unwrap();
            assert_eq!(st["stage"], "running");
            (hub.sink())(Event::StageChanged {
                mode: Mode::Secondary,
                stage: Stage::Done,
            });
            // The event is queued before this reply, so it is read first.
            c.execute("query-version", json!({})).unwrap();
            let evs = c.take_events();
            assert_eq!(evs.len(), 1, "{evs:?}");
            assert_eq!(evs[0]["event"], "REPLICATION_STAGE_CHANGED");
            assert_eq!(evs[0]["data"]["stage"], "done");
        }
    }

    #[test]
    fn malformed_json_is_answered_and_the_connection_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (_srv, _, _, path) = server(dir.path());
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        s.write_all(b"{\"execute\":\"qmp_capabilities\"}\nnot json\n{\"execute\": }{\"execute\":\"query-replication\",\"id\":9}")
            .unwrap();
        let mut framer = Framer::new(1 << 20);
        let mut frames = Vec::new();
        let mut buf = [0u8; 4096];
        while frames.len() < 5 {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "server closed the connection");
            framer.push(&buf[..n], &mut frames);
        }
        let msgs: Vec<Value> = frames
            .iter()
            .map(|f| match f {
                Frame::Json(t) => serde_json::from_slice(t).unwrap(),
                Frame::Garbage(g) => panic!("garbage {g:?}"),
            })
            .collect();
        assert!(msgs[0].get("QMP").is_some());
        assert_eq!(msgs[1], json!({"return": {}}));
        assert_eq!(msgs[2]["error"]["class"], "GenericError");
        assert_eq!(msgs[3]["error"]["class"], "GenericError");
        assert_eq!(msgs[4]["id"], 9);
        assert_eq!(msgs[4]["return"]["mode"], "secondary");
    }

    #[test]
    fn events_for_a_client_that_never_reads_are_bounded_by_disconnecting_it() {
        let dir = tempfile::tempdir().unwrap();
        let (_srv, hub, _, path) = server(dir.path());
        let mut s = UnixStream::connect(&path).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        s.write_all(b"{\"execute\":\"qmp_capabilities\"}").unwrap();
        // Wait until the client is subscribed (its negotiation answered).
        let mut framer = Framer::new(1 << 20);
        let mut frames = Vec::new();
        let mut buf = [0u8; 4096];
        while frames.len() < 2 {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0);
            framer.push(&buf[..n], &mut frames);
        }
        // Far more events than the socket buffers and the queue hold; the
        // hub must neither block nor keep them all.
        let sink = hub.sink();
        for _ in 0..20_000 {
            sink(Event::StageChanged {
                mode: Mode::Secondary,
                stage: Stage::Running,
            });
        }
        let subscribed = hub.clients.lock().unwrap().len();
        assert_eq!(subscribed, 0, "the backed-up client was dropped");
        // Whatever was queued before the cut arrives, then EOF.
        let mut events = 0usize;
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            frames.clear();
            framer.push(&buf[..n], &mut frames);
            events += frames.len();
        }
        assert!(events < 20_000, "{events} events delivered");
    }

    #[test]
    fn stopping_does_not_hang_when_the_socket_path_was_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (srv, _, _, path) = server(dir.path());
        std::fs::remove_file(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(srv);
            let _ = tx.send(());
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the control server stopped although its path was gone");
    }

    #[test]
    fn quit_is_answered_then_triggers_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let (_srv, _, quits, path) = server(dir.path());
        let mut c = QmpClient::connect(&path, Some(std::time::Duration::from_secs(5))).unwrap();
        assert_eq!(c.execute("quit", json!({})).unwrap(), json!({}));
        for _ in 0..500 {
            if quits.load(Ordering::SeqCst) == 1 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("quit callback never ran");
    }

    #[test]
    fn a_second_daemon_on_a_live_socket_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_srv, hub, _, path) = server(dir.path());
        let ctx = ControlContext {
            replication: None,
            nbd: None,
            hub,
            on_quit: Arc::new(|| {}),
            stats: None,
            node: String::new(),
            resize: None,
        };
        assert!(matches!(
            ControlServer::spawn(&path, ctx),
            Err(ControlError::Socket(unix_socket::UnixSocketError::InUse(_)))
        ));
    }
}
