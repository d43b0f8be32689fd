//! The control socket: accepts QMP clients, runs their commands, fans out events.

use super::framing::{Frame, Framer};
use super::protocol::{error_reply, event_json, greeting, After, Session};
use super::ControlError;
use crate::replication::{EventSink, Replication};
use crate::unix_socket::{self, SocketFile};
use log::{info, warn};
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Longest QMP message accepted; longer ones are answered with an error.
const MAX_MESSAGE: usize = 1 << 20;

/// Delivers replication events to every negotiated client.
#[derive(Default)]
pub struct EventHub {
    clients: Mutex<Vec<(u64, Sender<Value>)>>,
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

    fn publish(&self, msg: Value) {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        // A client whose writer has gone is dropped here.
        clients.retain(|(_, tx)| tx.send(msg.clone()).is_ok());
    }

    fn add(&self, id: u64, tx: Sender<Value>) {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients.push((id, tx));
    }

    fn remove(&self, id: u64) {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients.retain(|(cid, _)| *cid != id);
    }
}

/// What the server needs from the daemon.
#[derive(Clone)]
pub struct ControlContext {
    /// The replication node, if the daemon runs in a replication mode.
    pub replication: Option<Arc<dyn Replication>>,
    /// Where events come from.
    pub hub: Arc<EventHub>,
    /// Called after `quit` was answered: starts the daemon's orderly shutdown.
    pub on_quit: Arc<dyn Fn() + Send + Sync>,
}

/// A listening control socket; dropping it stops accepting and removes the file.
pub struct ControlServer {
    /// Removes the socket path when the server is dropped.
    _file: SocketFile,
    /// The same listening socket as the acceptor's: shutting it down wakes
    /// accept() even when the path is gone (a connect would then fail).
    waker: UnixListener,
    stopping: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Binds `path` (mode 0600) and serves clients on background threads.
    /// The path appears only once it accepts connections, already private.
    pub fn spawn(path: &Path, ctx: ControlContext) -> Result<Self, ControlError> {
        let (listener, file) = unix_socket::bind(path, Some(0o600))?;
        let waker = listener.try_clone().map_err(ControlError::Io)?;
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&stopping);
        let acceptor = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(listener, ctx, stop))
            .map_err(ControlError::Thread)?;
        info!("control socket listening on {}", path.display());
        Ok(ControlServer {
            _file: file,
            waker,
            stopping,
            acceptor: Some(acceptor),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the blocking accept() so the thread sees the flag: on Linux,
        // shutdown() of a listening unix socket makes accept() fail at once.
        // SAFETY: shutdown only reads its integer arguments; the fd is owned
        // by `self.waker`, alive for this call.
        unsafe { libc::shutdown(self.waker.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        // Dropping `file` removes the socket.
    }
}

fn accept_loop(listener: UnixListener, ctx: ControlContext, stopping: Arc<AtomicBool>) {
    let next_id = AtomicU64::new(1);
    for conn in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            break;
        }
        match conn {
            Ok(stream) => {
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                let ctx = ctx.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("control-{id}"))
                    .spawn(move || serve_client(id, stream, ctx));
                if let Err(e) = spawned {
                    warn!("control: cannot start a client thread: {e}");
                }
            }
            Err(e) => warn!("control: accept failed: {e}"),
        }
    }
}

fn serve_client(id: u64, stream: UnixStream, ctx: ControlContext) {
    info!("control: client {id} connected");
    let (tx, rx) = channel::<Value>();
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
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
    let quit = read_commands(id, stream, &ctx, &tx);
    ctx.hub.remove(id);
    drop(tx);
    let _ = writer_thread.join();
    info!("control: client {id} disconnected");
    if quit {
        info!("control: quit requested by client {id}");
        (ctx.on_quit)();
    }
}

/// Reads and answers commands until EOF or `quit`; true when `quit` was asked.
fn read_commands(
    id: u64,
    mut stream: UnixStream,
    ctx: &ControlContext,
    tx: &Sender<Value>,
) -> bool {
    let mut session = Session::default();
    let mut framer = Framer::new(MAX_MESSAGE);
    let mut frames = Vec::new();
    let mut buf = [0u8; 4096];
    let mut registered = false;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        framer.push(&buf[..n], &mut frames);
        for frame in frames.drain(..) {
            let (reply, after) = match frame {
                Frame::Json(text) => session.handle(&text, ctx.replication.as_deref()),
                Frame::Garbage(_) => (
                    error_reply("JSON parse error, invalid input", None),
                    After::Continue,
                ),
            };
            let negotiated_now = !registered && reply.get("return").is_some();
            if tx.send(reply).is_err() {
                return false;
            }
            if negotiated_now {
                // The first successful reply is qmp_capabilities: from now on the
                // client is in command mode and receives events.
                ctx.hub.add(id, tx.clone());
                registered = true;
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
            hub: Arc::clone(&hub),
            on_quit: Arc::new(move || {
                q.fetch_add(1, Ordering::SeqCst);
            }),
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
            hub,
            on_quit: Arc::new(|| {}),
        };
        assert!(matches!(
            ControlServer::spawn(&path, ctx),
            Err(ControlError::Socket(unix_socket::UnixSocketError::InUse(_)))
        ));
    }
}
