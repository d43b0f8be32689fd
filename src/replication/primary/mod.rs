//! The primary side: serve the local disk, forward every write to the secondary
//! (write-through: the guest's write completes when both copies have it), record
//! forwarding failures without failing the guest, track what changed while not
//! forwarding, and resync the secondary (full or dirty) while the guest runs.
//!
//! Ordering rules that keep the two disks equal:
//! * A guest write and a resync copy of the same cluster hold that cluster's lock
//!   across the local and the remote I/O, so the remote sees them in the same
//!   order as the local disk did.
//! * Every guest write either reaches the remote or marks its clusters dirty. The
//!   `link` lock makes that exact: writes hold it shared for their whole
//!   duration; `start`/`stop` take it exclusively to switch forwarding on or off.
//! * Forwarding is switched on before the resync starts, so a write racing the
//!   copy is forwarded itself, and the copy of its cluster (taken under the
//!   cluster lock) reads the local disk after it: no convergence loop is needed.
//!
//! Over NBD a guest write is sent to the secondary first, then written locally
//! while the secondary handles it, then its reply is awaited (still under the
//! cluster lock): the local write costs no time on top of the round trip.
//!
//! One file per job: this one the node and its [`BlockDev`] face;
//! `forward.rs` the write path, the link switch and fencing; `resync.rs` the
//! copiers; `tracking.rs` the dirty clusters and the write-intent bitmap;
//! `control.rs` start, checkpoint, stop and the status ([`PrimaryControl`]);
//! `channel.rs` a queue worker's asynchronous channel ([`PrimaryChannel`]).

mod channel;
mod control;
mod forward;
mod resync;
mod tracking;

pub use channel::PrimaryChannel;
pub use control::PrimaryControl;
use resync::ResyncState;

use super::fence::{Fence, OnFenced};
use super::intent::WriteIntent;
use super::{Event, EventSink, Failure, Mode, Stage};
use crate::block::channel::{IoChannel, Waiters};
use crate::block::{
    Bitmap, BlockDev, Extent, RangeLocks, Result as BlockResult, SharedDev, DEFAULT_STRIPES,
};
use crate::nbd;
use crate::sync::{MutexExt, RwLockExt};
use log::info;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;
use vm_memory::VolatileSlice;

/// How a primary reaches its secondary: called at every `start` (so a
/// restarted secondary is picked up); the daemon's opens an NBD client.
pub type Connector = Box<dyn Fn() -> BlockResult<ForwardTarget> + Send + Sync>;

/// The secondary as the primary forwards to it: a block device, and, when it
/// is an NBD client, the same client for writes whose reply is awaited after
/// the local write (see the module notes).
#[derive(Clone)]
pub struct ForwardTarget {
    dev: SharedDev,
    nbd: Option<Arc<nbd::Client>>,
}

impl ForwardTarget {
    /// Any block device: every operation is synchronous.
    pub fn device(dev: SharedDev) -> Self {
        ForwardTarget { dev, nbd: None }
    }

    /// An NBD client: writes overlap the local write with the round trip.
    pub fn nbd(client: Arc<nbd::Client>) -> Self {
        ForwardTarget {
            dev: client.clone(),
            nbd: Some(client),
        }
    }
}

/// Guest writes worth keeping in flight at once on the threaded path (see
/// [`BlockDev::concurrent_writes`]), used only when a queue cannot have a
/// [`PrimaryChannel`]: each waits on a round trip to the secondary, and the
/// NBD client multiplexes them on one connection.
const CONCURRENT_WRITES: usize = 16;

/// Bytes one write-intent bit covers at least (DRBD's activity-log extent):
/// the first write to an extent after a clear costs a sync of the bitmap
/// file, so extents much larger than a cluster keep a random-write workload
/// from paying one per write; a restart resyncs whole extents.
pub const INTENT_EXTENT: u64 = 4 << 20;

/// How long `start` waits for the connection to the secondary (TCP connect
/// and NBD negotiation) unless [`Primary::configure`] says otherwise.
pub const DEFAULT_CONNECT_DEADLINE: Duration = Duration::from_secs(15);

/// Which copy an operation is applied to.
#[derive(Clone, Copy)]
enum Side {
    Local,
    Remote,
}

/// The forwarding target, switched under the `link` lock.
#[derive(Default)]
struct Link {
    remote: Option<ForwardTarget>,
}

/// A primary replication node; it is also the [`BlockDev`] the guest is served.
pub struct Primary {
    local: SharedDev,
    connect: Connector,
    cluster_shift: u32,
    locks: Arc<RangeLocks>,
    /// One bit per cluster changed while not forwarding.
    dirty: Bitmap,
    link: RwLock<Link>,
    /// Requests of queue channels that took a view of the link (under the
    /// shared lock, let go at once) and have not completed; a switch waits
    /// for none under the exclusive lock (see [`PrimaryChannel`]).
    link_users: AtomicUsize,
    /// Channels that found the link being switched.
    link_bells: Mutex<Waiters>,
    /// This primary, for the channels it opens.
    me: Weak<Primary>,
    /// False once a forwarded I/O failed; writes then mark clusters dirty.
    healthy: AtomicBool,
    /// True while the secondary is known equal to the local disk except for the
    /// dirty clusters; only then is dirty tracking (and `sync: dirty`) meaningful.
    baseline: AtomicBool,
    stage: Mutex<Stage>,
    error: Mutex<Option<Failure>>,
    resync: Mutex<ResyncState>,
    resync_done: Condvar,
    resync_cancel: AtomicBool,
    resync_bytes: AtomicU64,
    resync_total: AtomicU64,
    /// Clusters of resync windows sent and not yet answered.
    resync_inflight: Bitmap,
    /// Clusters a guest write touched while their window was in flight.
    resync_raced: Bitmap,
    /// Resync windows in flight (0: guest writes skip the race check).
    resync_windows: AtomicU64,
    /// Decides about guest writes once the secondary has fenced us.
    fence: Fence,
    /// A `start` is connecting (outside the stage lock).
    starting: AtomicBool,
    /// Connect deadline in milliseconds.
    connect_deadline_ms: AtomicU64,
    /// The on-disk write-intent bitmap, when the daemon keeps one.
    intent: OnceLock<WriteIntent>,
    events: EventSink,
}

impl Primary {
    /// A primary over `local` that reaches its secondary through `connect`
    /// (called at every `start`, so a restarted secondary is picked up).
    pub fn new(
        local: SharedDev,
        connect: impl Fn() -> BlockResult<SharedDev> + Send + Sync + 'static,
        cluster_size: u64,
        events: EventSink,
    ) -> Arc<Self> {
        let connect: Connector = Box::new(move || connect().map(ForwardTarget::device));
        Self::with_target(local, connect, cluster_size, events)
    }

    /// As [`Primary::new`], with a connector that may hand out an NBD client
    /// (whose writes then overlap the local write).
    pub fn with_target(
        local: SharedDev,
        connect: Connector,
        cluster_size: u64,
        events: EventSink,
    ) -> Arc<Self> {
        let cluster_size = cluster_size.max(512).next_power_of_two();
        let clusters = local.size().div_ceil(cluster_size);
        Arc::new_cyclic(|me| Primary {
            local,
            connect,
            cluster_shift: cluster_size.trailing_zeros(),
            locks: Arc::new(RangeLocks::new(cluster_size, DEFAULT_STRIPES)),
            dirty: Bitmap::new(clusters),
            link: RwLock::new(Link::default()),
            link_users: AtomicUsize::new(0),
            link_bells: Mutex::new(Waiters::default()),
            me: me.clone(),
            healthy: AtomicBool::new(false),
            baseline: AtomicBool::new(false),
            stage: Mutex::new(Stage::None),
            error: Mutex::new(None),
            resync: Mutex::new(ResyncState::default()),
            resync_done: Condvar::new(),
            resync_cancel: AtomicBool::new(false),
            resync_bytes: AtomicU64::new(0),
            resync_total: AtomicU64::new(0),
            resync_inflight: Bitmap::new(clusters),
            resync_raced: Bitmap::new(clusters),
            resync_windows: AtomicU64::new(0),
            fence: Fence::new(OnFenced::default()),
            starting: AtomicBool::new(false),
            connect_deadline_ms: AtomicU64::new(DEFAULT_CONNECT_DEADLINE.as_millis() as u64),
            intent: OnceLock::new(),
            events,
        })
    }

    /// Sets what guest writes do once fenced, and how long `start` may wait
    /// to reach the secondary. Call before the guest runs.
    pub fn configure(&self, on_fenced: OnFenced, connect_deadline: Duration) {
        self.fence.set_policy(on_fenced);
        let ms = u64::try_from(connect_deadline.as_millis()).unwrap_or(u64::MAX);
        self.connect_deadline_ms.store(ms.max(1), Ordering::Release);
    }

    /// The fencing state, for a write path that asks it directly.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_shift
    }

    /// Clusters touched by `[offset, offset + len)`, as (first, last).
    fn clusters(&self, offset: u64, len: u64) -> (u64, u64) {
        let last = offset.saturating_add(len.max(1) - 1);
        (offset >> self.cluster_shift, last >> self.cluster_shift)
    }

    fn stage(&self) -> Stage {
        *self.stage.lock_or_recover()
    }

    fn set_stage(&self, stage: Stage) {
        *self.stage.lock_or_recover() = stage;
        info!("primary: stage {stage}");
        (self.events)(Event::StageChanged {
            mode: Mode::Primary,
            stage,
        });
    }

    fn recorded_error(&self) -> Option<Failure> {
        self.error.lock_or_recover().clone()
    }

    /// Keeps `failure` for get-error and `query-replication`, and emits it.
    fn record(&self, failure: Failure) {
        let message = failure.to_string();
        *self.error.lock_or_recover() = Some(failure);
        (self.events)(Event::Error {
            mode: Mode::Primary,
            message,
        });
    }
}

impl BlockDev for Primary {
    fn size(&self) -> u64 {
        self.local.size()
    }

    fn read_only(&self) -> bool {
        self.local.read_only()
    }

    fn read_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> BlockResult<()> {
        self.local.read_vectored(offset, bufs)
    }

    fn write_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> BlockResult<()> {
        self.replicate_write(offset, bufs)
    }

    fn flush(&self) -> BlockResult<()> {
        self.local.flush()?;
        let link = self.link.read_or_recover();
        if let Some(remote) = self.forwarding(&link) {
            if let Err(e) = remote.dev.flush() {
                self.forward_failed("flush", &e);
            }
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        // The local discard reads back as zeroes; make the secondary match exactly.
        self.replicate("discard", offset, len, |d, side| match side {
            Side::Local => d.discard(offset, len),
            Side::Remote => d.write_zeroes(offset, len, true),
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> BlockResult<()> {
        self.replicate("write-zeroes", offset, len, |d, _| {
            d.write_zeroes(offset, len, unmap)
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        self.local.block_status(offset, len)
    }

    fn open_channel(&self, depth: u32) -> Option<std::io::Result<Box<dyn IoChannel>>> {
        let me = self.me.upgrade()?;
        Some(PrimaryChannel::new(me, depth).map(|c| Box::new(c) as Box<dyn IoChannel>))
    }

    fn concurrent_writes(&self) -> usize {
        // Asked once per frontend connection, so not only while forwarding:
        // with forwarding off the writes are merely local ones run beside the
        // queue worker. Same-cluster writes still serialise on the cluster
        // locks, which keeps both copies applying them in one order.
        CONCURRENT_WRITES
    }
}

impl std::fmt::Debug for Primary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Primary")
            .field("stage", &self.stage())
            .field("cluster_size", &self.cluster_size())
            .finish_non_exhaustive()
    }
}
