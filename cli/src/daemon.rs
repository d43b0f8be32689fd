//! The `serve` process: open the disk → build the block stack for the mode →
//! start side services → run the vhost-user loop → shut down.
//!
//! Modes differ only in [`build_stack`]: each returns the [`SharedDev`] the
//! vhost layer serves. Side services (the QMP control socket, the secondary's
//! NBD server) live as long as the vhost loop and stop after it.

use crate::config::{Config, ModeConfig, PrimaryConfig, SecondaryConfig, TlsCreds};
use colo_blk::block::{
    BlockDev, BlockError, Overlay, Parallel, RawFile, RawFileOptions, SharedDev,
};
use colo_blk::control::{ControlContext, ControlError, ControlServer, EventHub, NbdExports};
use colo_blk::nbd;
use colo_blk::replication::{Connector, ForwardTarget, Primary, PrimaryControl};
use colo_blk::replication::{EventSink, Replication, ReplicationError, Secondary};
use colo_blk::stats::{self, DeviceStats, MetricsServer};
use colo_blk::vhost::{self, Resizer, ServeOptions, Shutdown, VhostError};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

/// Secondary guest requests kept in flight per queue on an O_DIRECT disk (pool
/// threads; the overlay path has no asynchronous channel yet).
const SECONDARY_DIRECT_DEPTH: usize = 32;
use thiserror::Error;

/// Why the daemon could not run or stopped with an error.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The disk image could not be opened or created.
    #[error("cannot open disk {path}: {source}")]
    OpenDisk {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An overlay file (active or hidden) could not be opened or created.
    #[error("cannot open overlay {path}: {source}")]
    Overlay {
        /// The overlay path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The replication node refused its configuration.
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    /// The NBD server could not be started.
    #[error("NBD server: {0}")]
    Nbd(#[from] nbd::NbdError),
    /// The control socket could not be served.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// Signal handling could not be set up.
    #[error("signal handling: {0}")]
    Signals(#[source] io::Error),
    /// TLS credentials could not be loaded.
    #[error(transparent)]
    Tls(#[from] colo_blk::tls::TlsError),
    /// The metrics endpoint could not be started.
    #[error(transparent)]
    Metrics(#[from] colo_blk::stats::StatsError),
    /// The vhost-user loop failed.
    #[error(transparent)]
    Vhost(#[from] VhostError),
}

/// Runs `colo-blk serve` until SIGINT/SIGTERM (or another shutdown request).
pub fn run(cfg: Config) -> Result<(), DaemonError> {
    // Before any other thread exists, so that every thread inherits the mask.
    let shutdown = Arc::new(Shutdown::new().map_err(DaemonError::Signals)?);
    signals::install(shutdown.clone()).map_err(DaemonError::Signals)?;

    let tls = load_tls(&cfg)?;
    let hub = EventHub::new();
    let disk = open_disk(&cfg)?;
    let stack = build_stack(&cfg, disk, counting_sink(hub.sink()), &tls)?;
    let stats = DeviceStats::new(usize::from(cfg.num_queues));
    // Online resize (block_resize) is for a plain disk only: a replicated one
    // would have to grow on both hosts at once; the control socket refuses it.
    let resizer = Arc::new(Resizer::new(stack.guest.clone(), cfg.logical_block_size));
    let resize = stack.replication.is_none().then(|| Arc::clone(&resizer));
    let services = SideServices::start(&cfg, &stack, &shutdown, hub, &tls, &stats, resize)?;
    let metrics = match &cfg.metrics {
        None => None,
        Some(addr) => Some(MetricsServer::spawn(addr, prometheus_render(&stats))?),
    };
    release_held_writes_on_shutdown(&stack, &shutdown);
    let mut opts = serve_options(&cfg);
    opts.stats = Some(stats);
    opts.resizer = Some(resizer);
    let result = vhost::serve(stack.guest.clone(), &opts, &shutdown);
    drop(metrics);
    services.stop();
    result.map_err(DaemonError::from)
}

/// Replication events also feed the replication counters (errors, resync and
/// commit bytes).
fn counting_sink(inner: EventSink) -> EventSink {
    Arc::new(move |ev| {
        stats::replication().observe(&ev);
        inner(ev)
    })
}

fn prometheus_render(stats: &Arc<DeviceStats>) -> stats::Render {
    let stats = Arc::clone(stats);
    Arc::new(move || stats::prometheus_text(&stats.per_queue(), &stats::replication().snapshot()))
}

/// A fenced primary may hold guest writes forever; the vhost loop drains
/// in-flight requests before it returns, so a stop request fails them first.
fn release_held_writes_on_shutdown(stack: &Stack, shutdown: &Arc<Shutdown>) {
    let Some(repl) = stack.replication.clone() else {
        return;
    };
    let shutdown = Arc::clone(shutdown);
    let spawned = std::thread::Builder::new()
        .name("release-held".into())
        .spawn(move || {
            while !shutdown.is_requested() {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            repl.release_held();
        });
    if let Err(e) = spawned {
        log::warn!(
            "no release-held thread ({e}): a fenced primary's SIGTERM may need a second one"
        );
    }
}

/// The loaded `--tls-creds-x509` / `--tls-creds-psk` credentials, per side.
#[derive(Default)]
struct LinkTls {
    server: Option<Arc<colo_blk::tls::ServerTls>>,
    client: Option<Arc<colo_blk::tls::ClientTls>>,
}

/// Loads the credentials at start (a bad setup fails here, before the guest
/// is served) and makes SIGHUP reload them for later handshakes.
fn load_tls(cfg: &Config) -> Result<LinkTls, DaemonError> {
    use colo_blk::tls::{ClientTls, ServerTls};
    let Some(t) = &cfg.tls else {
        return Ok(LinkTls::default());
    };
    let tls = match (&cfg.mode, &t.creds) {
        (ModeConfig::Secondary(_), TlsCreds::X509(dir)) => LinkTls {
            server: Some(Arc::new(ServerTls::load(dir, t.authz.clone())?)),
            client: None,
        },
        (ModeConfig::Secondary(_), TlsCreds::Psk { file, .. }) => LinkTls {
            server: Some(Arc::new(ServerTls::load_psk(file, t.authz.clone())?)),
            client: None,
        },
        (_, TlsCreds::X509(dir)) => LinkTls {
            server: None,
            client: Some(Arc::new(ClientTls::load(dir, t.hostname.as_deref())?)),
        },
        (_, TlsCreds::Psk { file, username }) => LinkTls {
            server: None,
            client: Some(Arc::new(ClientTls::load_psk(file, username)?)),
        },
    };
    let (server, client) = (tls.server.clone(), tls.client.clone());
    let dir = t.creds.path().to_path_buf();
    signals::on_reload(Box::new(move || {
        let r = match (&server, &client) {
            (Some(s), _) => s.reload(),
            (_, Some(c)) => c.reload(),
            _ => Ok(()),
        };
        match r {
            Ok(()) => log::info!(
                "SIGHUP: TLS credentials reloaded from {}; new connections use them",
                dir.display()
            ),
            Err(e) => log::error!("SIGHUP: {e}; keeping the previous credentials"),
        }
    }));
    Ok(tls)
}

/// What a mode builds: the node the guest is served, and what side services
/// need to reach.
struct Stack {
    /// Served to the guest over vhost-user.
    guest: SharedDev,
    /// The replication node, driven through the control socket.
    replication: Option<Arc<dyn Replication>>,
    /// Secondary: the node the primary's writes enter, served over NBD.
    nbd_export: Option<NbdExport>,
}

/// What the secondary's NBD server serves, where (from startup, or opened
/// later by `nbd-server-start`), and under which name.
struct NbdExport {
    listen: Option<nbd::NbdAddr>,
    name: String,
    dev: SharedDev,
    limits: nbd::ServerLimits,
}

fn open_disk(cfg: &Config) -> Result<Arc<RawFile>, DaemonError> {
    let opts = RawFileOptions {
        read_only: cfg.read_only,
        direct: cfg.direct,
        create_size: cfg.size,
        engine: cfg.io_engine,
    };
    let disk = RawFile::open(&cfg.disk, &opts).map_err(|source| DaemonError::OpenDisk {
        path: cfg.disk.clone(),
        source,
    })?;
    let lbs = u64::from(cfg.logical_block_size);
    if disk.size() % lbs != 0 {
        log::warn!(
            "{} is {} bytes, not a multiple of {lbs}: the last partial block is not served",
            cfg.disk.display(),
            disk.size()
        );
    }
    Ok(Arc::new(disk))
}

/// The block stack the guest sees, per mode.
fn build_stack(
    cfg: &Config,
    disk: Arc<RawFile>,
    events: EventSink,
    tls: &LinkTls,
) -> Result<Stack, DaemonError> {
    match &cfg.mode {
        ModeConfig::Plain => Ok(plain_stack(disk)),
        ModeConfig::Primary(p) => primary_stack(cfg, p, disk, events, tls.client.clone()),
        ModeConfig::Secondary(s) => secondary_stack(cfg, s, disk, events),
    }
}

fn plain_stack(disk: Arc<RawFile>) -> Stack {
    Stack {
        guest: disk,
        replication: None,
        nbd_export: None,
    }
}

/// The primary: the guest is served the local disk through the forwarding node.
/// The secondary is reached only at `replication-start` (it may not be up yet
/// when the primary VM boots), and again at every later start.
fn primary_stack(
    cfg: &Config,
    primary: &PrimaryConfig,
    disk: Arc<RawFile>,
    events: EventSink,
    tls: Option<Arc<colo_blk::tls::ClientTls>>,
) -> Result<Stack, DaemonError> {
    let uri = primary.secondary.clone();
    let timeout = primary.forward_timeout;
    log::info!("primary: will forward writes to {uri}");
    let connect: Connector = Box::new(move || {
        let opts = nbd::ClientOptions {
            request_timeout: timeout,
            tls: tls.clone(),
            ..nbd::ClientOptions::default()
        };
        let client = nbd::Client::connect_to(&uri, opts)
            .map_err(|e| BlockError::connect(uri.to_string(), e))?;
        Ok(ForwardTarget::nbd(Arc::new(client)))
    });
    let node = Primary::with_target(disk, connect, cfg.cluster_size, events);
    node.configure(
        primary.on_fenced,
        timeout.unwrap_or(colo_blk::replication::primary::DEFAULT_CONNECT_DEADLINE),
    );
    // The write-intent bitmap lives beside the image (IMAGE.colo-intent).
    let mut intent_path = cfg.disk.clone().into_os_string();
    intent_path.push(".colo-intent");
    let shift = cfg
        .cluster_size
        .max(colo_blk::replication::primary::INTENT_EXTENT)
        .next_power_of_two()
        .trailing_zeros();
    match colo_blk::replication::WriteIntent::open(intent_path.as_ref(), node.size(), shift) {
        Ok(wi) => node.attach_intent(wi),
        Err(e) => log::warn!("primary: {e}; without it a restart needs a full resync"),
    }
    Ok(Stack {
        guest: node.clone(),
        replication: Some(Arc::new(PrimaryControl(node))),
        nbd_export: None,
    })
}

/// The secondary: the guest is served active ▸ hidden ▸ disk; the NBD server
/// feeds the primary's writes into the node's primary side.
fn secondary_stack(
    cfg: &Config,
    secondary: &SecondaryConfig,
    disk: Arc<RawFile>,
    events: EventSink,
) -> Result<Stack, DaemonError> {
    let size = disk.size();
    let active = open_overlay(&secondary.active, size)?;
    let hidden = open_overlay(&secondary.hidden, size)?;
    let node = Secondary::new(disk, active, hidden, cfg.cluster_size, events)?;
    // With io_uring on the disk (O_DIRECT), the guest view opens a channel per
    // queue that keeps the guest's queue depth on the disk. Without one (an
    // O_DIRECT disk forced onto the synchronous engine), the guest's requests
    // run on the queue's pool so the disk still sees queue depth.
    let guest = if cfg.direct && !cfg.io_engine.uses_uring(true) {
        Arc::new(Parallel::new(node.guest(), SECONDARY_DIRECT_DEPTH)) as SharedDev
    } else {
        node.guest()
    };
    Ok(Stack {
        guest,
        nbd_export: Some(NbdExport {
            listen: secondary.nbd_listen.clone(),
            name: secondary.nbd_export.clone(),
            // On an O_DIRECT disk every primary write waits on the device (and
            // the first one to a cluster after a checkpoint reads and copies
            // it first): run them several at once, not inline on the reader.
            dev: if cfg.direct {
                Arc::new(Parallel::new(node.primary(), SECONDARY_DIRECT_DEPTH)) as SharedDev
            } else {
                node.primary()
            },
            limits: secondary.nbd_limits,
        }),
        replication: Some(node),
    })
}

/// Opens an overlay file (its contents are discarded: overlays only hold state
/// between checkpoints of a running pair), creating it at the disk's size when
/// missing.
fn open_overlay(path: &std::path::Path, size: u64) -> Result<Arc<Overlay>, DaemonError> {
    let overlay = if path.exists() {
        Overlay::open(path)
    } else {
        Overlay::create(path, size)
    };
    overlay
        .map(Arc::new)
        .map_err(|source| DaemonError::Overlay {
            path: path.to_path_buf(),
            source,
        })
}

/// The served disk's node name in `query-blockstats`: the NBD export name on
/// a secondary (QEMU setups call that node parent0), else the image's file
/// name.
fn node_name(cfg: &Config) -> String {
    match &cfg.mode {
        ModeConfig::Secondary(s) => s.nbd_export.clone(),
        _ => cfg
            .disk
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    }
}

fn serve_options(cfg: &Config) -> ServeOptions {
    ServeOptions {
        socket: cfg.socket.clone(),
        num_queues: cfg.num_queues,
        queue_size: cfg.queue_size,
        logical_block_size: cfg.logical_block_size,
        serial: cfg.serial.clone(),
        poll_us: cfg.poll_us,
        stats: None,
        resizer: None,
    }
}

/// Services that run beside the vhost loop (control socket, NBD server).
/// Dropping one stops it and removes its socket.
struct SideServices {
    control: Option<ControlServer>,
    nbd: Option<Arc<NbdExports>>,
}

impl SideServices {
    fn start(
        cfg: &Config,
        stack: &Stack,
        shutdown: &Arc<Shutdown>,
        hub: Arc<EventHub>,
        tls: &LinkTls,
        stats: &Arc<DeviceStats>,
        resize: Option<Arc<Resizer>>,
    ) -> Result<Self, DaemonError> {
        // One NBD export, opened by --nbd-listen now or by QEMU's
        // nbd-server-start + nbd-server-add later; QEMU setups name the disk
        // parent0, so that node name is accepted besides the export name.
        let nbd = match &stack.nbd_export {
            None => None,
            Some(export) => {
                let mut nodes = vec![export.name.clone()];
                if export.name != nbd::DEFAULT_EXPORT {
                    nodes.push(nbd::DEFAULT_EXPORT.to_string());
                }
                let opts = nbd::ServerOptions {
                    tls: tls.server.clone(),
                    ..Default::default()
                }
                .with_limits(export.limits);
                let exports = NbdExports::new(export.dev.clone(), nodes, opts);
                if cfg.nbd_insecure {
                    exports.allow_plain_network();
                }
                if let Some(listen) = &export.listen {
                    exports.start_now(listen.clone(), &export.name)?;
                }
                Some(exports)
            }
        };
        let control = match &cfg.control {
            None => None,
            Some(path) => {
                let shutdown = Arc::clone(shutdown);
                let ctx = ControlContext {
                    replication: stack.replication.clone(),
                    nbd: nbd.clone(),
                    hub,
                    on_quit: Arc::new(move || shutdown.request()),
                    stats: Some(Arc::clone(stats)),
                    node: node_name(cfg),
                    resize: resize.map(|r| r as Arc<dyn vhost::Resize>),
                };
                Some(ControlServer::spawn(path, ctx)?)
            }
        };
        Ok(SideServices { control, nbd })
    }

    fn stop(self) {
        // The NBD server first: after it returns no primary write is running.
        if let Some(exports) = &self.nbd {
            exports.shutdown();
        }
        drop(self.control);
    }
}

mod signals {
    //! SIGINT/SIGTERM become a [`Shutdown`] request, SIGHUP runs the reload
    //! hook (TLS credentials), both on a dedicated thread with `sigwait` so
    //! that no async-signal-safety rules apply.

    use super::Shutdown;
    use std::io;
    use std::sync::{Arc, OnceLock};

    type Reload = Box<dyn Fn() + Send + Sync>;
    static RELOAD: OnceLock<Reload> = OnceLock::new();

    /// Sets what SIGHUP does (once; later calls are ignored).
    pub(super) fn on_reload(f: Reload) {
        let _ = RELOAD.set(f);
    }

    pub(super) fn install(shutdown: Arc<Shutdown>) -> io::Result<()> {
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
        let set = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGHUP);
            set
        };
        // SAFETY: `set` is initialised; a null old-set pointer is allowed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        std::thread::Builder::new()
            .name("colo-blk-signals".into())
            .spawn(move || wait_loop(set, &shutdown))?;
        Ok(())
    }

    fn wait_loop(set: libc::sigset_t, shutdown: &Shutdown) {
        loop {
            let mut sig = 0;
            // SAFETY: `set` is initialised and `sig` is a valid out pointer.
            let rc = unsafe { libc::sigwait(&set, &mut sig) };
            if rc != 0 {
                continue;
            }
            if sig == libc::SIGHUP {
                match RELOAD.get() {
                    Some(reload) => reload(),
                    None => log::info!("SIGHUP: nothing to reload"),
                }
                continue;
            }
            let name = if sig == libc::SIGINT {
                "SIGINT"
            } else {
                "SIGTERM"
            };
            if shutdown.is_requested() {
                log::warn!("{name} again: exiting without waiting for in-flight requests");
                std::process::exit(1);
            }
            log::info!("{name}: finishing in-flight requests, then exiting");
            shutdown.request();
        }
    }
}
