//! vhost-user glue: the `VhostUserBackend` implementation, per-queue workers and
//! the reconnect loop.
//!
//! [`serve`] serves any [`SharedDev`]: a raw file for the plain backend, a
//! replication filter for COLO. It knows nothing of modes.

mod backend;
mod config_change;
#[cfg(test)]
mod engine_tests;
mod inflight;
mod offload;
mod poll;
mod queue_io;
mod resize;
#[cfg(test)]
mod restart_tests;
mod resume;
mod shutdown;
mod vring;
mod worker;

pub use resize::{Notice, Resize, ResizeError, Resized, Resizer, CONFIG_CHANGE_ANSWER_BOUND};
pub use shutdown::Shutdown;

use crate::acceptor::Wake;
use crate::block::{BlockError, SharedDev};
use crate::unix_socket::{self, UnixSocketError};
use crate::virtio_blk::{Geometry, GuestMem, VirtioBlk};
use backend::BlkBackend;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use thiserror::Error;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, VhostUserDaemon};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;

/// How the disk is presented to the frontend.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Path of the vhost-user socket to listen on.
    pub socket: PathBuf,
    /// Number of request queues (one worker thread each).
    pub num_queues: u16,
    /// Maximum size of each queue.
    pub queue_size: u16,
    /// Logical block size advertised to the guest (512 or 4096).
    pub logical_block_size: u32,
    /// Answer to GET_ID (at most 20 bytes are used).
    pub serial: String,
    /// Most microseconds a queue worker polls before it sleeps (0: never).
    pub poll_us: u32,
    /// Where completed requests are counted (kept across reconnects).
    pub stats: Option<Arc<crate::stats::DeviceStats>>,
    /// Grows the disk online (`block_resize`); shared with the control socket.
    /// `None`: [`serve`] makes its own, which nothing else reaches.
    pub resizer: Option<Arc<Resizer>>,
}

/// Why [`serve`] stopped with an error.
#[derive(Debug, Error)]
pub enum VhostError {
    /// The listening socket could not be created (path taken, too long, ...).
    #[error("cannot listen: {0}")]
    Listen(#[from] UnixSocketError),
    /// Waiting for a frontend failed.
    #[error("waiting for a frontend: {0}")]
    Poll(#[source] io::Error),
    /// Setting up a connection's queues (channels, pools) failed.
    #[error("vhost-user: {0}")]
    Queues(#[source] io::Error),
    /// Setting up the vhost-user daemon or accepting a connection failed
    /// (kept as is: the crate's error does not implement `Error`).
    #[error("vhost-user: {0}")]
    Daemon(vhost_user_backend::Error),
    /// A queue worker cannot watch its completions.
    #[error("vhost-user: queue {queue} completions: {source}")]
    Completions {
        /// The queue.
        queue: usize,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The final flush before exiting failed.
    #[error("final flush: {0}")]
    Flush(#[source] BlockError),
}

/// Serves `dev` on `opts.socket` until `shutdown` is requested.
///
/// The listening socket is created once; each frontend connection gets a fresh
/// vhost-user daemon (and fresh queue workers) while the disk stays open, so a
/// VMM that restarts simply reconnects. On shutdown the live connection is
/// closed, the workers finish the requests they hold, the disk is flushed and
/// the socket removed.
pub fn serve(dev: SharedDev, opts: &ServeOptions, shutdown: &Shutdown) -> Result<(), VhostError> {
    // The path appears only once it accepts: a VMM that waits for the file
    // and connects at once is never refused.
    let (listener, socket_file) = unix_socket::bind(&opts.socket, None)?;
    // Built from a bound listener, vhost's Listener does not unlink the path;
    // `socket_file` does.
    let mut listener = Listener::from(listener);
    let resizer = opts
        .resizer
        .clone()
        .unwrap_or_else(|| Arc::new(Resizer::new(dev.clone(), opts.logical_block_size)));
    let geometry = Geometry::new(
        dev.size(),
        opts.logical_block_size,
        opts.queue_size,
        opts.num_queues,
        dev.read_only(),
    );
    log::info!(
        "serving {} bytes{} on {} ({} queue(s) of {})",
        resizer.capacity().bytes(),
        if geometry.read_only { " read-only" } else { "" },
        opts.socket.display(),
        opts.num_queues,
        opts.queue_size
    );
    let result = accept_loop(&dev, &geometry, &resizer, opts, &mut listener, shutdown);
    let flushed = dev.flush().map_err(VhostError::Flush);
    drop(listener);
    drop(socket_file);
    result.and(flushed)
}

fn accept_loop(
    dev: &SharedDev,
    geometry: &Geometry,
    resizer: &Arc<Resizer>,
    opts: &ServeOptions,
    listener: &mut Listener,
    shutdown: &Shutdown,
) -> Result<(), VhostError> {
    while wait_for_frontend(listener, shutdown)? {
        let device = Arc::new(
            VirtioBlk::new(dev.clone(), geometry.clone(), &opts.serial)
                .with_capacity(resizer.capacity())
                .with_stats(opts.stats.clone()),
        );
        let mem = GuestMemoryAtomic::new(GuestMem::new());
        let backend = Arc::new(
            BlkBackend::new(
                device,
                mem.clone(),
                usize::from(opts.num_queues),
                usize::from(opts.queue_size),
                opts.poll_us,
                Arc::clone(resizer),
            )
            .map_err(VhostError::Queues)?,
        );
        let mut daemon = VhostUserDaemon::new("colo-blk-vhost".to_string(), backend.clone(), mem)
            .map_err(VhostError::Daemon)?;
        // Each queue worker also watches its channel's and pool's completions.
        for (q, handler) in daemon.get_epoll_handlers().iter().enumerate() {
            for fd in backend
                .queue(q)
                .map(|io| io.notify_fds())
                .unwrap_or_default()
            {
                handler
                    .register_listener(fd, EventSet::IN, backend.completion_event())
                    .map_err(|source| VhostError::Completions { queue: q, source })?;
            }
        }
        // Before the connection thread starts: it may attach a backend
        // request channel with its first messages.
        resizer.connected();
        if let Err(e) = daemon.start(listener) {
            resizer.disconnected();
            return Err(VhostError::Daemon(e));
        }
        log::info!("frontend connected");
        shutdown.attach(daemon.shutdown_handle());
        let ended = daemon.wait();
        shutdown.attach(None);
        // The connection thread is gone: no channel attaches any more, and a
        // resize waiting for this frontend's answer is released.
        resizer.disconnected();
        // Dropping the daemon stops and joins the queue workers, dropping the
        // backend then joins the I/O pools: every request picked up has
        // completed once this returns.
        drop(daemon);
        drop(backend);
        match ended {
            Ok(())
            | Err(DaemonError::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => log::info!("frontend disconnected"),
            Err(e) => log::warn!("connection ended: {e}"),
        }
        if shutdown.is_requested() {
            break;
        }
    }
    log::info!("shutting down");
    Ok(())
}

/// Blocks until a frontend is waiting to be accepted (true) or a shutdown was
/// requested (false).
fn wait_for_frontend(listener: &Listener, shutdown: &Shutdown) -> Result<bool, VhostError> {
    loop {
        match shutdown.wait_readable(listener.as_raw_fd()) {
            Ok(Wake::Ready) => return Ok(true),
            Ok(Wake::Stopped) => return Ok(false),
            Ok(Wake::TimedOut) => {}
            Err(e) => return Err(VhostError::Poll(e)),
        }
    }
}
