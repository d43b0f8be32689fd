//! The NBD server: serves one [`SharedDev`] under one export name.
//!
//! One accept thread; per connection, one thread for the handshake that then
//! becomes the request reader, plus a small pool of worker threads that run the
//! requests against the device and send the replies (out of order). Bounded:
//! a maximum number of connections, of in-flight requests and of in-flight
//! payload bytes per connection.
//!
//! [`Server::shutdown`] stops accepting, disconnects every client, waits for the
//! requests already running, and removes the Unix socket file; after it returns
//! no server thread touches the device.

mod handshake;
mod inbuf;
mod pool;
mod transmission;

use super::stream::{Listener, Stream};
use super::uri::NbdAddr;
use super::NbdError;
use crate::block::SharedDev;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Export name used when none is configured (QEMU COLO's convention).
pub const DEFAULT_EXPORT: &str = "parent0";

/// Largest READ or WRITE payload accepted (the protocol's interoperable maximum).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// How a [`Server`] behaves. `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Export name clients must ask for ("" also selects it, as the default
    /// export). Default `parent0`.
    pub export_name: String,
    /// Free text shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// Worker threads per connection (requests running at once). Default 4.
    pub workers_per_connection: usize,
    /// Requests queued per connection beyond the running ones. Default 64.
    pub queue_depth: usize,
    /// Payload bytes (READ and WRITE) in flight per connection. Default 64 MiB.
    pub max_in_flight_bytes: u64,
    /// Connections served at once; more are closed at accept. Default 64.
    pub max_connections: usize,
    /// A client must finish negotiating within this time. Default 30 s.
    pub handshake_timeout: Duration,
    /// TLS credentials: when set, TLS is required (every option before
    /// NBD_OPT_STARTTLS is refused with NBD_REP_ERR_TLS_REQD). Default none.
    pub tls: Option<Arc<crate::tls::ServerTls>>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            export_name: DEFAULT_EXPORT.to_string(),
            description: "colo-blk".to_string(),
            workers_per_connection: 4,
            queue_depth: 64,
            max_in_flight_bytes: 64 << 20,
            max_connections: 64,
            handshake_timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

/// A running NBD server. Dropping it shuts it down.
pub struct Server {
    inner: Arc<Inner>,
    addr: NbdAddr,
    waker: UnixStream,
    accept: Option<JoinHandle<()>>,
}

/// State shared by the accept thread and the connection threads.
struct Inner {
    dev: SharedDev,
    opts: ServerOptions,
    stopping: AtomicBool,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, ConnEntry>>,
}

struct ConnEntry {
    stream: Stream,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds `listen` (`unix:PATH` or `tcp:HOST:PORT`) and starts serving `dev`.
    pub fn start(
        listen: &NbdAddr,
        dev: SharedDev,
        opts: ServerOptions,
    ) -> Result<Server, NbdError> {
        if opts.workers_per_connection == 0 || opts.max_in_flight_bytes < u64::from(MAX_PAYLOAD) {
            return Err(NbdError::Protocol(
                "server options: need at least one worker and 32 MiB in-flight budget".into(),
            ));
        }
        let listener = Listener::bind(listen)?;
        let addr = listener.local_addr()?;
        let (waker, wake_rx) = UnixStream::pair()?;
        let inner = Arc::new(Inner {
            dev,
            opts,
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            conns: Mutex::new(HashMap::new()),
        });
        let accept = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("nbd-accept".into())
                .spawn(move || accept_loop(&inner, listener, wake_rx))?
        };
        log::info!(
            "nbd: serving export {:?} ({} bytes) on {addr}{}",
            inner.opts.export_name,
            inner.dev.size(),
            if inner.opts.tls.is_some() {
                ", TLS required"
            } else {
                ""
            }
        );
        Ok(Server {
            inner,
            addr,
            waker,
            accept: Some(accept),
        })
    }

    /// The address the server listens on (the real port for `tcp:HOST:0`).
    pub fn local_addr(&self) -> &NbdAddr {
        &self.addr
    }

    /// The export name clients connect to.
    pub fn export_name(&self) -> &str {
        &self.inner.opts.export_name
    }

    /// Connections currently open.
    pub fn connections(&self) -> usize {
        lock(&self.inner.conns).len()
    }

    /// Stops serving: closes the listener (removing a Unix socket file),
    /// disconnects every client, and waits until no request is running.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.inner.stopping.store(true, Ordering::SeqCst);
        // The accept thread polls this socket; a failed write means it is gone.
        let _ = (&self.waker).write_all(&[1]);
        if accept.join().is_err() {
            log::error!("nbd: accept thread panicked");
        }
        let entries: Vec<ConnEntry> = lock(&self.inner.conns).drain().map(|(_, e)| e).collect();
        for e in &entries {
            e.stream.shutdown();
        }
        for mut e in entries {
            if let Some(t) = e.thread.take() {
                if t.join().is_err() {
                    log::error!("nbd: connection thread panicked");
                }
            }
        }
        log::info!("nbd: server on {} stopped", self.addr);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking connection thread must not take the whole server down.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits for connections or the wake-up byte; the listener is dropped (and
/// its socket file removed) when this returns.
fn accept_loop(inner: &Arc<Inner>, listener: Listener, mut wake: UnixStream) {
    let mut fds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: fds is a valid array of two pollfd for the whole call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("nbd: poll on listener failed: {err}; no longer accepting");
            return;
        }
        if fds[1].revents != 0 || inner.stopping.load(Ordering::SeqCst) {
            let _ = wake.read(&mut [0u8; 1]);
            return;
        }
        if fds[0].revents == 0 {
            continue;
        }
        match listener.accept() {
            Ok(stream) => admit(inner, stream),
            Err(e) => {
                log::warn!("nbd: accept failed: {e}");
                // EMFILE and friends: do not spin on a listener that stays ready.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn admit(inner: &Arc<Inner>, stream: Stream) {
    let peer = stream.peer();
    let mut conns = lock(&inner.conns);
    if conns.len() >= inner.opts.max_connections {
        log::warn!(
            "nbd: refusing {peer}: already {} connections",
            inner.opts.max_connections
        );
        return;
    }
    let control = match stream.try_clone() {
        Ok(c) => c,
        Err(e) => {
            log::warn!("nbd: refusing {peer}: {e}");
            return;
        }
    };
    let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
    let thread = {
        let inner = inner.clone();
        std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                serve_connection(&inner, stream, id);
                lock(&inner.conns).remove(&id);
            })
    };
    match thread {
        Ok(t) => {
            conns.insert(
                id,
                ConnEntry {
                    stream: control,
                    thread: Some(t),
                },
            );
        }
        Err(e) => log::warn!("nbd: refusing {peer}: cannot start a thread: {e}"),
    }
}

fn serve_connection(inner: &Inner, stream: Stream, id: u64) {
    let peer = format!("#{id} ({})", stream.peer());
    log::info!("nbd: connection {peer} opened");
    let control = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            log::warn!("nbd: connection {peer}: {e}");
            return;
        }
    };
    let (negotiated, stream) = match handshake::negotiate(inner, stream, &peer) {
        Ok(Some(n)) => n,
        Ok(None) => {
            log::info!("nbd: connection {peer} ended during negotiation");
            control.shutdown();
            return;
        }
        Err(e) => {
            log::warn!("nbd: connection {peer}: negotiation failed: {e}");
            control.shutdown();
            return;
        }
    };
    if inner.stopping.load(Ordering::SeqCst) {
        stream.shutdown();
        return;
    }
    transmission::serve(inner, stream, negotiated, &peer);
    log::info!("nbd: connection {peer} closed");
}
