//! The NBD server: serves one [`SharedDev`] under one export name.
//!
//! One accept thread; per connection, one thread for the handshake that then
//! becomes the request reader, plus a small pool of worker threads that run the
//! requests against the device and send the replies (out of order). Bounded:
//! a maximum number of connections, of in-flight requests per connection, and
//! of payload bytes in flight per connection and for the whole server.
//!
//! Hostile peers: the whole negotiation has one deadline; when the slots are
//! full a newcomer waits in arrival order while a slow negotiator or an idle
//! connection is evicted for it (see `watch`); a client that stops reading
//! its replies is closed after the idle limit; the queued requests of a
//! client that left are dropped, not run.
//!
//! [`Server::shutdown`] stops accepting, disconnects every client, waits for the
//! requests already running, and removes the Unix socket file; after it returns
//! no server thread touches the device.

mod handshake;
mod inbuf;
mod pool;
mod transmission;
mod watch;

use super::stream::{Listener, Stream};
use super::uri::NbdAddr;
use super::{NbdError, DEFAULT_EXPORT, MAX_PAYLOAD};
use crate::acceptor::{Acceptor, Event};
use crate::block::SharedDev;
use crate::sync::MutexExt;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use watch::{Activity, Limits, Verdict};

/// How a [`Server`] behaves. `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Export name clients must ask for ("" also selects it, as the default
    /// export). Default `parent0`.
    pub export_name: String,
    /// Free text shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// Worker threads per connection (requests running at once). Default 4;
    /// raised to the device's [`BlockDev::concurrent_writes`] hint (at most
    /// 32), for a device whose every write waits on storage.
    ///
    /// [`BlockDev::concurrent_writes`]: crate::block::BlockDev::concurrent_writes
    pub workers_per_connection: usize,
    /// Requests queued per connection beyond the running ones. Default 64.
    pub queue_depth: usize,
    /// WRITE payload bytes in flight per connection. Default 64 MiB. (A
    /// READ holds at most 256 KiB per worker: it is sent in pieces.)
    pub max_in_flight_bytes: u64,
    /// WRITE payload bytes in flight for the whole server, all connections
    /// together. Default 256 MiB.
    pub max_memory: u64,
    /// Connections served at once. A newcomer beyond that waits (in arrival
    /// order, up to as many again) until a slot is freed by evicting a slow
    /// negotiator or an idle connection. Default 64.
    pub max_connections: usize,
    /// A client must finish the whole negotiation (TLS included) within this
    /// time after it was accepted, however it trickles bytes. Default 30 s.
    pub handshake_timeout: Duration,
    /// An established connection with nothing in flight for this long may be
    /// evicted to make room for another; a reply the client does not accept
    /// for this long, or a WRITE payload not complete after it, closes the
    /// connection. Default 60 s.
    pub idle_timeout: Duration,
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
            max_memory: 256 << 20,
            max_connections: 64,
            handshake_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            tls: None,
        }
    }
}

/// The limits a misbehaving client meets, as the command line sets them
/// (the fields of [`ServerOptions`] with the same names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// See [`ServerOptions::handshake_timeout`].
    pub handshake_timeout: Duration,
    /// See [`ServerOptions::idle_timeout`].
    pub idle_timeout: Duration,
    /// See [`ServerOptions::max_memory`].
    pub max_memory: u64,
}

impl Default for ServerLimits {
    fn default() -> Self {
        let o = ServerOptions::default();
        ServerLimits {
            handshake_timeout: o.handshake_timeout,
            idle_timeout: o.idle_timeout,
            max_memory: o.max_memory,
        }
    }
}

impl ServerOptions {
    /// These options with `limits` applied.
    pub fn with_limits(self, limits: ServerLimits) -> Self {
        ServerOptions {
            handshake_timeout: limits.handshake_timeout,
            idle_timeout: limits.idle_timeout,
            max_memory: limits.max_memory,
            ..self
        }
    }
}

/// A running NBD server. Dropping it shuts it down.
pub struct Server {
    inner: Arc<Inner>,
    addr: NbdAddr,
    /// Taken by the first stop.
    accept: Option<Acceptor>,
}

/// State shared by the accept thread and the connection threads.
struct Inner {
    dev: SharedDev,
    opts: ServerOptions,
    stopping: AtomicBool,
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, ConnEntry>>,
    /// Payload bytes in flight, all connections together.
    memory: pool::Budget,
    /// Payload buffers kept for reuse, all connections together.
    bufs: pool::BufPool,
    /// Clock origin of every connection's [`Activity`].
    epoch: Instant,
}

struct ConnEntry {
    stream: Stream,
    thread: Option<JoinHandle<()>>,
    activity: Arc<Activity>,
}

/// Accepted while every slot was taken; admitted in arrival order.
struct Waiting {
    stream: Stream,
    accepted: Instant,
}

/// Buffers kept for reuse, in bytes, across the server.
const POOL_BYTES: usize = 16 << 20;

impl Server {
    /// Binds `listen` (`unix:PATH` or `tcp:HOST:PORT`) and starts serving `dev`.
    pub fn start(
        listen: &NbdAddr,
        dev: SharedDev,
        opts: ServerOptions,
    ) -> Result<Server, NbdError> {
        if opts.workers_per_connection == 0
            || opts.max_in_flight_bytes < u64::from(MAX_PAYLOAD)
            || opts.max_memory < u64::from(MAX_PAYLOAD)
            || opts.max_connections == 0
        {
            return Err(NbdError::ServerOptions);
        }
        let listener = Listener::bind(listen)?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            dev,
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            conns: Mutex::new(HashMap::new()),
            memory: pool::Budget::new(opts.max_memory),
            bufs: pool::BufPool::new(POOL_BYTES),
            epoch: Instant::now(),
            opts,
        });
        let accept = accept_loop(&inner, listener)?;
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
        self.inner.conns.lock_or_recover().len()
    }

    /// Stops serving: closes the listener (removing a Unix socket file),
    /// disconnects every client, and waits until no request is running.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(mut accept) = self.accept.take() else {
            return;
        };
        self.inner.stopping.store(true, Ordering::SeqCst);
        // Joins the accept thread, which drops the listener (and removes a
        // Unix socket file).
        accept.stop();
        let entries: Vec<ConnEntry> = self
            .inner
            .conns
            .lock_or_recover()
            .drain()
            .map(|(_, e)| e)
            .collect();
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

/// Accepts connections until the server stops; the listener is dropped (and
/// its socket file removed) when the acceptor is stopped. Between events it
/// enforces the handshake deadline and admits waiting newcomers.
fn accept_loop(inner: &Arc<Inner>, listener: Listener) -> io::Result<Acceptor> {
    let limits = inner.limits();
    // Deadlines are enforced to within a tenth of the handshake deadline.
    let tick = (limits.handshake / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut waiting: VecDeque<Waiting> = VecDeque::new();
    let inner = Arc::clone(inner);
    Acceptor::spawn("nbd-accept", listener, Some(tick), move |event| {
        if let Event::Accepted(stream) = event {
            waiting.push_back(Waiting {
                stream,
                accepted: Instant::now(),
            });
        }
        inner.sweep(&limits, &mut waiting);
        Some(if waiting.is_empty() {
            tick
        } else {
            tick.min(Duration::from_millis(50))
        })
    })
}

impl Inner {
    fn limits(&self) -> Limits {
        let handshake = self.opts.handshake_timeout;
        Limits {
            handshake,
            idle: self.opts.idle_timeout,
            // A real client negotiates in milliseconds; a slow negotiator
            // is evictable after this.
            grace: (handshake / 2).min(Duration::from_secs(1)),
        }
    }

    /// Closes negotiations past the deadline, then admits waiting
    /// newcomers, evicting one connection for each when the slots are full.
    fn sweep(self: &Arc<Self>, limits: &Limits, waiting: &mut VecDeque<Waiting>) {
        let mut conns = self.conns.lock_or_recover();
        for (id, e) in conns.iter() {
            if e.activity.verdict(limits) == Verdict::Expired && e.activity.doom() {
                log::warn!(
                    "nbd: connection #{id} ({}) did not finish negotiating within {:?}; closing",
                    e.stream.peer(),
                    limits.handshake
                );
                e.stream.shutdown();
            }
        }
        // Newcomers waiting longer than the handshake deadline have had
        // their chance: that is the longest a client is kept out.
        while let Some(w) = waiting.front() {
            if w.accepted.elapsed() < limits.handshake {
                break;
            }
            log::warn!(
                "nbd: refusing {}: every slot stayed busy for {:?}",
                w.stream.peer(),
                limits.handshake
            );
            waiting.pop_front();
        }
        // More waiting than slots: the newest go (the flood, not the oldest).
        while waiting.len() > self.opts.max_connections {
            if let Some(w) = waiting.pop_back() {
                log::warn!(
                    "nbd: refusing {}: {} connections already waiting",
                    w.stream.peer(),
                    self.opts.max_connections
                );
            }
        }
        while !waiting.is_empty() {
            let live = conns.values().filter(|e| !e.activity.is_doomed()).count();
            if live < self.opts.max_connections {
                if let Some(w) = waiting.pop_front() {
                    self.admit(&mut conns, w);
                }
                continue;
            }
            let victim = watch::pick_victim(
                conns
                    .iter()
                    .map(|(id, e)| (*id, e.activity.verdict(limits))),
            );
            let Some(id) = victim else {
                // Everyone is working: the newcomers wait.
                break;
            };
            if let Some(e) = conns.get(&id) {
                let why = match e.activity.verdict(limits) {
                    Verdict::EvictNegotiating(age) => format!("still negotiating after {age:?}"),
                    Verdict::EvictIdle(idle) => format!("idle for {idle:?}"),
                    Verdict::Keep | Verdict::Expired => String::new(),
                };
                e.activity.doom();
                log::warn!(
                    "nbd: evicting connection #{id} ({}, {why}) to make room for a waiting client",
                    e.stream.peer()
                );
                e.stream.shutdown();
            }
        }
    }

    fn admit(self: &Arc<Self>, conns: &mut HashMap<u64, ConnEntry>, w: Waiting) {
        let Waiting { stream, accepted } = w;
        let peer = stream.peer();
        let control = match stream.try_clone() {
            Ok(c) => c,
            Err(e) => {
                log::warn!("nbd: refusing {peer}: {e}");
                return;
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity::new(self.epoch, accepted));
        let thread = {
            let inner = self.clone();
            let activity = activity.clone();
            std::thread::Builder::new()
                .name(format!("nbd-conn-{id}"))
                .spawn(move || {
                    serve_connection(&inner, stream, id, &activity);
                    inner.conns.lock_or_recover().remove(&id);
                })
        };
        match thread {
            Ok(t) => {
                conns.insert(
                    id,
                    ConnEntry {
                        stream: control,
                        thread: Some(t),
                        activity,
                    },
                );
            }
            Err(e) => log::warn!("nbd: refusing {peer}: cannot start a thread: {e}"),
        }
    }
}

fn serve_connection(inner: &Inner, stream: Stream, id: u64, activity: &Activity) {
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
    if inner.stopping.load(Ordering::SeqCst) || activity.is_doomed() {
        stream.shutdown();
        return;
    }
    activity.establish();
    transmission::serve(inner, stream, negotiated, &peer, activity);
    log::info!("nbd: connection {peer} closed");
}
