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

mod channel;

pub use channel::PrimaryChannel;

use super::fence::{Fence, OnFenced};
use super::intent::{IntentToken, WriteIntent};
use super::{
    Event, EventSink, Failure, Mode, Progress, Replication, ReplicationError, Stage, Status,
    SyncMode,
};
use crate::block::channel::{IoChannel, Waiters};
use crate::block::{
    Bitmap, BlockDev, BlockDevExt, BlockError, Extent, ExtentKind, RangeLocks,
    Result as BlockResult, SharedDev, DEFAULT_STRIPES,
};
use crate::nbd;
use crate::sync::{CondvarExt, MutexExt, RwLockExt};
use log::{info, warn};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock, RwLockWriteGuard, Weak};
use std::thread::JoinHandle;
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

/// Largest piece a resync copies in one I/O.
const RESYNC_WINDOW: u64 = 2 << 20;
/// Parallel resync copiers (local reads overlap).
const RESYNC_THREADS: usize = 4;
/// Windows each copier keeps in flight on an NBD link.
const RESYNC_DEPTH: usize = 8;

/// Where a resync is: the next offset (full) or cluster (dirty), and how far
/// the local disk is known to hold data from there.
#[derive(Default)]
struct Cursor {
    pos: u64,
    data_until: u64,
}

/// A resync window sent, its reply not yet awaited.
struct InFlightWindow<'a> {
    off: u64,
    len: u64,
    write: nbd::SubmittedWrite,
    remote: ForwardTarget,
    _intent: Option<IntentToken<'a>>,
}

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

#[derive(Default)]
struct ResyncState {
    active: bool,
    threads: Vec<JoinHandle<()>>,
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

    /// Keeps `intent` as this disk's write-intent bitmap: when it says the
    /// secondary was in sync, its set clusters become the dirty set (so a
    /// restarted primary can `start --sync dirty`). Starts the lazy clearer.
    pub fn attach_intent(self: &Arc<Self>, intent: WriteIntent) {
        if intent.loaded_baseline() {
            intent.for_each_set(|bit, n| {
                let (c0, nc) = self.bit_clusters(&intent, bit, n);
                self.dirty.set_range(c0, nc);
            });
            self.baseline.store(true, Ordering::Release);
        }
        if self.intent.set(intent).is_err() {
            log::warn!("primary: a write-intent bitmap is attached already");
            return;
        }
        let me = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("intent-clear".into())
            .spawn(move || intent_clearer(me));
        if let Err(e) = spawned {
            log::warn!("primary: no write-intent clearer ({e}): bits stay set until restart");
        }
        let me = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("intent-sync".into())
            .spawn(move || intent_syncer(me));
        if let Err(e) = spawned {
            log::warn!("primary: no write-intent syncer ({e}): writes mark one by one");
            if let Some(wi) = self.intent.get() {
                wi.no_syncer();
            }
        }
    }

    /// [`Primary::mark_intent`] for a queue channel: `Ok(None)` when the
    /// bits are asked of the syncer (retry once `bell` rings).
    fn mark_intent_async(
        &self,
        first: u64,
        last: u64,
        forwarding: bool,
        bell: &Arc<crate::block::channel::Doorbell>,
    ) -> BlockResult<Option<Option<IntentToken<'_>>>> {
        let Some(wi) = self.intent.get() else {
            return Ok(Some(None));
        };
        if !forwarding && !self.baseline.load(Ordering::Acquire) {
            return Ok(Some(None));
        }
        let (first, last) = self.intent_bits(wi, first, last);
        match wi.mark_or_request(first, last, bell) {
            Ok(super::intent::Marked::Now(t)) => Ok(Some(Some(t))),
            Ok(super::intent::Marked::Later) => Ok(None),
            Err(e) => Err(BlockError::io(
                "write-intent",
                first,
                std::io::Error::other(e),
            )),
        }
    }

    /// Marks clusters `first..=last` in the write-intent bitmap before a write
    /// to them starts (locally or on the secondary). Nothing to do without a
    /// bitmap, or while neither forwarding nor tracking a baseline.
    pub fn mark_intent(
        &self,
        first: u64,
        last: u64,
        forwarding: bool,
    ) -> BlockResult<Option<IntentToken<'_>>> {
        let Some(wi) = self.intent.get() else {
            return Ok(None);
        };
        if !forwarding && !self.baseline.load(Ordering::Acquire) {
            return Ok(None);
        }
        let (first, last) = self.intent_bits(wi, first, last);
        wi.mark(first, last)
            .map(Some)
            .map_err(|e| BlockError::io("write-intent", first, std::io::Error::other(e)))
    }

    /// The bitmap bits that cover clusters `first..=last` (a bit may cover
    /// many clusters: see [`INTENT_EXTENT`]).
    fn intent_bits(&self, wi: &WriteIntent, first: u64, last: u64) -> (u64, u64) {
        let cs = self.cluster_shift;
        let ws = wi.shift();
        let byte = |c: u64| c.checked_shl(cs).unwrap_or(u64::MAX);
        let end = byte(last.saturating_add(1)).saturating_sub(1);
        (byte(first) >> ws, end >> ws)
    }

    /// The clusters that bits `bit..bit + n` cover, clamped to the disk.
    fn bit_clusters(&self, wi: &WriteIntent, bit: u64, n: u64) -> (u64, u64) {
        let (cs, ws) = (self.cluster_shift, wi.shift());
        let byte = |b: u64| b.checked_shl(ws).unwrap_or(u64::MAX);
        let total = self.local.size().div_ceil(1 << cs);
        let c0 = (byte(bit) >> cs).min(total);
        let c1 = (byte(bit.saturating_add(n)) >> cs).clamp(c0, total);
        (c0, c1 - c0)
    }

    /// Records durably whether the secondary is a dirty-resync baseline.
    fn persist_baseline(&self, baseline: bool) -> Result<(), ReplicationError> {
        self.baseline.store(baseline, Ordering::Release);
        match self.intent.get() {
            None => Ok(()),
            Some(wi) => wi
                .set_baseline(baseline, wi.shift(), self.local.size())
                .map_err(ReplicationError::Intent),
        }
    }

    /// One round of the lazy clearer: only while forwarding works.
    fn clear_intent_once(&self) {
        let Some(wi) = self.intent.get() else {
            return;
        };
        let remote = {
            let link = self.link.read_or_recover();
            match self.forwarding(&link) {
                Some(r) => r.clone(),
                None => return,
            }
        };
        let flushed = || self.local.flush().is_ok() && remote.dev.flush().is_ok();
        // A bit is kept while any of its clusters is dirty.
        let keep = |bit: u64| {
            let (c0, n) = self.bit_clusters(wi, bit, 1);
            n > 0 && self.dirty.run(c0, n) != (false, n)
        };
        if let Err(e) = wi.clear_lazily(keep, flushed) {
            log::warn!("primary: {e}");
        }
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

    /// A forwarded I/O failed: keep serving, stop forwarding, tell the tooling.
    /// An explicit refusal means the secondary took over: that fences this
    /// primary (returns true) instead of letting it carry on alone.
    fn forward_failed(&self, what: &str, err: &BlockError) -> bool {
        if matches!(err, BlockError::Refused(_)) {
            self.fenced(what, err);
            return true;
        }
        if self.healthy.swap(false, Ordering::AcqRel) {
            let failure = Failure::caused_by(
                format!("forwarding to the secondary failed ({what})"),
                err.clone(),
            );
            warn!("primary: {failure}; carrying on alone, tracking dirty clusters");
            self.resync_cancel.store(true, Ordering::Release);
            self.record(failure);
        }
        false
    }

    /// The secondary refused a forwarded I/O: it has failed over. The fence
    /// is tripped before forwarding is switched off, so a write that finds
    /// forwarding off also finds the fence (see [`Primary::replicate_under`]).
    fn fenced(&self, what: &str, err: &BlockError) {
        let reason = format!("the secondary refused a forwarded {what}: {err}");
        if !self.fence.trip(&reason) {
            return;
        }
        self.healthy.store(false, Ordering::Release);
        self.resync_cancel.store(true, Ordering::Release);
        let policy = self.fence.policy();
        let failure = Failure::caused_by(
            format!(
                "fenced (guest writes are {} from now on): the secondary refused a forwarded {what}",
                match policy {
                    OnFenced::Hold => "held",
                    OnFenced::Error => "failed",
                }
            ),
            err.clone(),
        );
        log::error!("primary: {failure}");
        self.set_stage(Stage::Fenced);
        (self.events)(Event::Fenced { policy, reason });
        self.record(failure);
    }

    /// The link, alone, once no channel request still uses its old state.
    /// Channels that find it switching wait and are rung when this ends.
    fn switch_link(&self) -> LinkSwitch<'_> {
        let guard = self.link.write_or_recover();
        // Completions need no lock this thread holds (queue workers never
        // wait on `link`), so this ends; bounded by the NBD request timeout
        // when the secondary hangs, as a threaded write would be.
        while self.link_users.load(Ordering::Acquire) > 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
        LinkSwitch {
            guard: Some(guard),
            bells: &self.link_bells,
        }
    }

    fn forwarding<'a>(&self, link: &'a Link) -> Option<&'a ForwardTarget> {
        link.remote
            .as_ref()
            .filter(|_| self.healthy.load(Ordering::Acquire))
    }

    /// Applies a content-changing operation locally and, when forwarding, on the
    /// secondary; marks the clusters dirty when the secondary did not get it.
    fn replicate(
        &self,
        what: &'static str,
        offset: u64,
        len: u64,
        op: impl Fn(&dyn BlockDev, Side) -> BlockResult<()>,
    ) -> BlockResult<()> {
        self.fence.wait_admitted()?;
        let fenced = {
            let link = self.link.read_or_recover();
            self.replicate_under(&link, what, offset, len, op)?
        };
        // Held (or failed) with no lock held: control commands stay free.
        if fenced {
            return self.fence.wait_admitted();
        }
        Ok(())
    }

    /// [`Primary::replicate`] with the `link` lock already held (shared).
    /// `Ok(true)`: fenced, the operation must not be acknowledged.
    fn replicate_under(
        &self,
        link: &Link,
        what: &'static str,
        offset: u64,
        len: u64,
        op: impl Fn(&dyn BlockDev, Side) -> BlockResult<()>,
    ) -> BlockResult<bool> {
        let (first, last) = self.clusters(offset, len);
        match self.forwarding(link) {
            Some(remote) => {
                let _g = self.locks.exclusive(offset, len.max(1));
                self.note_guest_write(first, last);
                let _intent = self.mark_intent(first, last, true)?;
                op(self.local.as_ref(), Side::Local)?;
                if let Err(e) = op(remote.dev.as_ref(), Side::Remote) {
                    self.dirty.set_range(first, last - first + 1);
                    return Ok(self.forward_failed(what, &e));
                }
            }
            None => {
                // Forwarding may have been switched off by a fence after this
                // write was admitted; the fence is set first, so it shows here.
                if self.fence.is_fenced() {
                    return Ok(true);
                }
                let _intent = self.mark_intent(first, last, false)?;
                op(self.local.as_ref(), Side::Local)?;
                if self.baseline.load(Ordering::Acquire) {
                    self.dirty.set_range(first, last - first + 1);
                }
            }
        }
        Ok(false)
    }

    /// A guest write. Over NBD: send it, write the local disk meanwhile, then
    /// wait for the reply, all under the cluster lock, so the secondary applies
    /// same-cluster writes (and resync copies) in the local disk's order.
    fn replicate_write(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> BlockResult<()> {
        self.fence.wait_admitted()?;
        // Held (or failed) with no lock held: control commands stay free.
        if self.forward_write(offset, bufs)? {
            return self.fence.wait_admitted();
        }
        Ok(())
    }

    /// The body of [`Primary::replicate_write`]; `Ok(true)`: fenced.
    fn forward_write(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> BlockResult<bool> {
        let len = crate::block::iov_len(bufs);
        let link = self.link.read_or_recover();
        let Some(client) = self.forwarding(&link).and_then(|t| t.nbd.as_ref()) else {
            return self.replicate_under(&link, "write", offset, len, |d, _| {
                d.write_vectored(offset, bufs)
            });
        };
        // What the local disk would refuse must never reach the secondary.
        if self.local.read_only() {
            return Err(BlockError::ReadOnly);
        }
        crate::block::check_range(offset, len, self.local.size())?;
        let (first, last) = self.clusters(offset, len);
        let _g = self.locks.exclusive(offset, len.max(1));
        self.note_guest_write(first, last);
        let _intent = self.mark_intent(first, last, true)?;
        let sent = client.submit_write(offset, bufs);
        let local = self.local.write_vectored(offset, bufs);
        match sent.and_then(nbd::SubmittedWrite::wait) {
            Err(e) => {
                self.dirty.set_range(first, last - first + 1);
                if self.forward_failed("write", &e) {
                    return Ok(true);
                }
            }
            Ok(()) => {
                crate::stats::replication().forwarded(len);
                if let Err(e) = &local {
                    // The secondary has bytes the local disk may lack: the
                    // copies differ, so forwarding stops and the range is
                    // left for a dirty resync.
                    self.forward_failed("write applied on the secondary only", e);
                    self.dirty.set_range(first, last - first + 1);
                }
            }
        }
        local.map(|()| false)
    }

    fn spawn_resync(self: &Arc<Self>, full: bool) -> Result<(), ReplicationError> {
        let total = if full {
            self.local.size()
        } else {
            (self.dirty.count() << self.cluster_shift).min(self.local.size())
        };
        self.resync_bytes.store(0, Ordering::Release);
        self.resync_total.store(total, Ordering::Release);
        self.resync_cancel.store(false, Ordering::Release);
        let cursor = Arc::new(Mutex::new(Cursor::default()));
        self.resync.lock_or_recover().active = true;
        info!(
            "primary: {} resync of {total} bytes started",
            if full { "full" } else { "dirty" }
        );
        (self.events)(Event::ResyncProgress(Progress { done: 0, total }));
        let running = Arc::new(AtomicU64::new(RESYNC_THREADS as u64));
        let mut threads = Vec::with_capacity(RESYNC_THREADS);
        let mut spawn_error = None;
        for i in 0..RESYNC_THREADS {
            let me = Arc::clone(self);
            let cursor = Arc::clone(&cursor);
            let counter = Arc::clone(&running);
            let spawned = std::thread::Builder::new()
                .name(format!("resync-{i}"))
                .spawn(move || {
                    me.resync_worker(full, &cursor);
                    if counter.fetch_sub(1, Ordering::AcqRel) == 1 {
                        me.resync_finished(full);
                    }
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    // Account for the copiers that will never run.
                    let missing = (RESYNC_THREADS - i) as u64;
                    if running.fetch_sub(missing, Ordering::AcqRel) == missing {
                        self.resync_finished(full);
                    }
                    spawn_error = Some(e);
                    break;
                }
            }
        }
        self.resync.lock_or_recover().threads.extend(threads);
        match spawn_error {
            None => Ok(()),
            Some(source) => Err(ReplicationError::Thread {
                what: "resync",
                source,
            }),
        }
    }

    /// Hands out the next window to copy: `(offset, len, known_data)`.
    ///
    /// A full resync asks the local disk for its extents once per extent, not
    /// once per window: finding where data ends walks the whole extent (on
    /// tmpfs, every page up to the next hole), which made per-window queries
    /// quadratic. Only "data" is trusted from the cache: data read under the
    /// cluster lock is right whatever happened since; a hole is checked again
    /// under the lock. Dirty windows are copied as data (a hole reads zeroes).
    fn next_window(&self, full: bool, cursor: &Mutex<Cursor>) -> Option<(u64, u64, bool)> {
        let mut cur = cursor.lock_or_recover();
        let size = self.local.size();
        if full {
            let off = cur.pos;
            if off >= size {
                return None;
            }
            if off >= cur.data_until {
                // Holes and errors: the window checks under its lock.
                if let Ok(Extent {
                    len,
                    kind: ExtentKind::Data,
                }) = self.local.block_status(off, size - off)
                {
                    cur.data_until = off + len.max(1);
                }
            }
            let known_data = off < cur.data_until;
            let mut len = (RESYNC_WINDOW - off % RESYNC_WINDOW).min(size - off);
            if known_data {
                len = len.min(cur.data_until - off);
            }
            cur.pos = off + len;
            return Some((off, len, known_data));
        }
        let pos = &mut cur.pos;
        let first = self.dirty.next_set(*pos)?;
        let max = (RESYNC_WINDOW >> self.cluster_shift).max(1);
        let (_, run) = self.dirty.run(first, max);
        let last = first + run.max(1) - 1;
        *pos = last + 1;
        let off = first << self.cluster_shift;
        let end = ((last + 1) << self.cluster_shift).min(size);
        Some((off, end - off, true))
    }

    /// One resync copier. Over NBD, a window that is all data is read and
    /// sent under its cluster lock, and its reply awaited later, with up to
    /// [`RESYNC_DEPTH`] windows in flight: the copy runs at the link's speed,
    /// not one round trip per window. A guest write to a window in flight
    /// (see [`Primary::note_guest_write`]) could be reordered with it on the
    /// server, so such a window is copied again, synchronously, once its
    /// reply is in. Other windows (holes, a non-NBD target) are copied
    /// synchronously under the lock, as the guest writes are.
    fn resync_worker(&self, full: bool, cursor: &Mutex<Cursor>) {
        let mut buf = vec![0u8; RESYNC_WINDOW as usize];
        let mut pending: VecDeque<InFlightWindow> = VecDeque::new();
        let mut failed = false;
        while !failed {
            if self.resync_cancel.load(Ordering::Acquire) {
                break;
            }
            if pending.len() >= RESYNC_DEPTH {
                let w = pending.pop_front().expect("non-empty");
                failed = !self.finish_window(full, w, &mut buf);
                continue;
            }
            let Some((off, len, known_data)) = self.next_window(full, cursor) else {
                break;
            };
            let remote = {
                let link = self.link.read_or_recover();
                match self.forwarding(&link) {
                    Some(r) => r.clone(),
                    None => break,
                }
            };
            let (first, last) = self.clusters(off, len);
            let n = last - first + 1;
            let guard = self.locks.exclusive(off, len);
            let intent = match self.mark_intent(first, last, true) {
                Ok(t) => t,
                Err(e) => {
                    self.forward_failed("resync", &e);
                    failed = true;
                    continue;
                }
            };
            if !full {
                self.dirty.clear_range(first, n);
            }
            let sent = match &remote.nbd {
                Some(client) => self.send_window(client, off, len, known_data, &mut buf),
                None => Ok(None),
            };
            let result = match sent {
                Ok(Some(write)) => {
                    self.resync_windows.fetch_add(1, Ordering::AcqRel);
                    self.resync_inflight.set_range(first, n);
                    self.resync_raced.clear_range(first, n);
                    drop(guard);
                    pending.push_back(InFlightWindow {
                        off,
                        len,
                        write,
                        remote,
                        _intent: intent,
                    });
                    continue;
                }
                Ok(None) => self.copy_window(remote.dev.as_ref(), off, len, &mut buf),
                Err(e) => Err(e),
            };
            drop(guard);
            drop(intent);
            match result {
                Ok(()) => self.count_resynced(len),
                Err(e) => {
                    if !full {
                        self.dirty.set_range(first, n);
                    }
                    self.forward_failed("resync", &e);
                    failed = true;
                }
            }
        }
        // Every window sent is accounted for, also after a failure or a stop.
        while let Some(w) = pending.pop_front() {
            if failed {
                let (first, last) = self.clusters(w.off, w.len);
                self.resync_inflight.clear_range(first, last - first + 1);
                self.resync_windows.fetch_sub(1, Ordering::AcqRel);
                if !full {
                    self.dirty.set_range(first, last - first + 1);
                }
                continue;
            }
            failed = !self.finish_window(full, w, &mut buf);
        }
    }

    /// Reads `[off, off + len)` and sends it when it is all data; `None`
    /// when it holds holes or zeroes (copied synchronously instead).
    fn send_window(
        &self,
        client: &nbd::Client,
        off: u64,
        len: u64,
        known_data: bool,
        buf: &mut [u8],
    ) -> BlockResult<Option<nbd::SubmittedWrite>> {
        if !known_data {
            let Extent { len: n, kind } = self.local.block_status(off, len)?;
            if kind != ExtentKind::Data || n < len {
                return Ok(None);
            }
        }
        let piece = &mut buf[..len as usize];
        self.local.read_at(off, piece)?;
        client
            .submit_write(off, &[VolatileSlice::from(piece)])
            .map(Some)
    }

    /// Waits for a window's reply; copies it again if a guest write raced it.
    /// False when the copy failed (forwarding is then off).
    fn finish_window(&self, full: bool, w: InFlightWindow<'_>, buf: &mut [u8]) -> bool {
        let (first, last) = self.clusters(w.off, w.len);
        let n = last - first + 1;
        let mut result = w.write.wait();
        if result.is_ok() && self.resync_raced.run(first, n) != (false, n) {
            let _g = self.locks.exclusive(w.off, w.len);
            result = self.copy_window(w.remote.dev.as_ref(), w.off, w.len, buf);
        }
        self.resync_inflight.clear_range(first, n);
        self.resync_windows.fetch_sub(1, Ordering::AcqRel);
        match result {
            Ok(()) => {
                self.count_resynced(w.len);
                true
            }
            Err(e) => {
                if !full {
                    self.dirty.set_range(first, n);
                }
                self.forward_failed("resync", &e);
                false
            }
        }
    }

    fn count_resynced(&self, len: u64) {
        let done = self.resync_bytes.fetch_add(len, Ordering::AcqRel) + len;
        let total = self.resync_total.load(Ordering::Acquire);
        let step = (total / 10).max(1);
        if done / step != (done - len) / step {
            (self.events)(Event::ResyncProgress(Progress { done, total }));
        }
    }

    /// Called by a forwarded guest write, under its cluster lock: when a
    /// resync window over those clusters is in flight, it must be copied
    /// again once its reply is in (the server may apply the two in either
    /// order). One atomic load while no resync runs.
    fn note_guest_write(&self, first: u64, last: u64) {
        if self.resync_windows.load(Ordering::Acquire) == 0 {
            return;
        }
        let n = last - first + 1;
        if self.resync_inflight.run(first, n) != (false, n) {
            self.resync_raced.set_range(first, n);
        }
    }

    /// Copies `[off, off + len)` to the remote: data as data, holes as zeroes
    /// (cheap on the wire, and right even if the secondary held old bytes).
    fn copy_window(
        &self,
        remote: &dyn BlockDev,
        off: u64,
        len: u64,
        buf: &mut [u8],
    ) -> BlockResult<()> {
        let mut pos = off;
        while pos < off + len {
            let Extent { len: n, kind } = self.local.block_status(pos, off + len - pos)?;
            let n = n.clamp(1, off + len - pos);
            match kind {
                ExtentKind::Hole | ExtentKind::Zero => remote.write_zeroes(pos, n, true)?,
                ExtentKind::Data => {
                    let piece = &mut buf[..n as usize];
                    self.local.read_at(pos, piece)?;
                    remote.write_vectored(pos, &[VolatileSlice::from(piece)])?;
                }
            }
            pos += n;
        }
        Ok(())
    }

    fn resync_finished(&self, full: bool) {
        let done = self.resync_bytes.load(Ordering::Acquire);
        let total = self.resync_total.load(Ordering::Acquire);
        let ok =
            self.healthy.load(Ordering::Acquire) && !self.resync_cancel.load(Ordering::Acquire);
        if ok {
            if full {
                if let Err(e) = self.persist_baseline(true) {
                    warn!("primary: {e}; a restart will need a full resync");
                }
            }
            info!("primary: resync complete, {done} bytes copied; forwarding synchronously");
        } else {
            warn!("primary: resync stopped after {done} of {total} bytes");
        }
        (self.events)(Event::ResyncProgress(Progress { done, total }));
        let mut st = self.resync.lock_or_recover();
        st.active = false;
        self.resync_done.notify_all();
    }

    /// Waits for a running resync to end; joins its threads.
    fn wait_resync(&self) {
        let mut st = self.resync.lock_or_recover();
        while st.active {
            st = self.resync_done.wait_or_recover(st);
        }
        let threads = std::mem::take(&mut st.threads);
        drop(st);
        for t in threads {
            let _ = t.join();
        }
    }

    /// Starts replication; `self` must be the `Arc` the daemon holds.
    ///
    /// Slow work (reaching the secondary, waiting for an old resync) runs with
    /// no lock held that `query-replication` needs; `starting` keeps a second
    /// `start` out meanwhile.
    fn start_replication(self: &Arc<Self>, sync: SyncMode) -> Result<(), ReplicationError> {
        {
            let stage = self.stage.lock_or_recover();
            match *stage {
                Stage::None | Stage::Done => {}
                Stage::Fenced => return Err(ReplicationError::Fenced),
                _ => return Err(ReplicationError::AlreadyStarted),
            }
            if sync == SyncMode::Dirty && !self.baseline.load(Ordering::Acquire) {
                return Err(ReplicationError::NoBaseline);
            }
            if self.starting.swap(true, Ordering::AcqRel) {
                return Err(ReplicationError::StartInProgress);
            }
        }
        let result = self.start_unlocked(sync);
        self.starting.store(false, Ordering::Release);
        result
    }

    /// Reaches the secondary within the connect deadline. The connector runs
    /// on its own thread: whatever it blocks in (TCP connect to a dropped
    /// link, a negotiation with a stopped server), `start` answers in time; a
    /// connection that completes after the deadline is dropped.
    fn connect_within_deadline(self: &Arc<Self>) -> Result<ForwardTarget, ReplicationError> {
        let deadline = Duration::from_millis(self.connect_deadline_ms.load(Ordering::Acquire));
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("connect".into())
            .spawn(move || {
                // The receiver may be gone (deadline passed): nothing to do.
                let _ = tx.send((me.connect)());
            })
            .map_err(|source| ReplicationError::Thread {
                what: "the connect thread",
                source,
            })?;
        match rx.recv_timeout(deadline) {
            Ok(Ok(remote)) => Ok(remote),
            Ok(Err(e)) => Err(ReplicationError::Unreachable(e)),
            Err(_) => Err(ReplicationError::ConnectTimeout(deadline)),
        }
    }

    fn start_unlocked(self: &Arc<Self>, sync: SyncMode) -> Result<(), ReplicationError> {
        let remote = self.connect_within_deadline()?;
        if remote.dev.size() != self.local.size() {
            return Err(ReplicationError::SizeMismatch {
                secondary: remote.dev.size(),
                primary: self.local.size(),
            });
        }
        self.wait_resync();
        if sync != SyncMode::Dirty {
            // Durable before anything is copied: a crash during a full copy
            // must not leave a bitmap that claims a baseline.
            self.persist_baseline(sync == SyncMode::None)?;
        }
        // The link before the stage, as a failing write takes them.
        let mut link = self.switch_link();
        let mut stage = self.stage.lock_or_recover();
        if !matches!(*stage, Stage::None | Stage::Done) {
            // Fenced while connecting (a late refusal of an older link).
            return Err(ReplicationError::StageChanged(*stage));
        }
        link.remote = Some(remote);
        self.healthy.store(true, Ordering::Release);
        if sync != SyncMode::Dirty {
            // Full copies everything; none declares the disks equal.
            self.dirty.clear_all();
        }
        drop(link);
        *self.error.lock_or_recover() = None;
        *stage = Stage::Running;
        drop(stage);
        info!("primary: replication started (sync {sync:?})");
        (self.events)(Event::StageChanged {
            mode: Mode::Primary,
            stage: Stage::Running,
        });
        if sync != SyncMode::None {
            self.spawn_resync(sync == SyncMode::Full)?;
        }
        Ok(())
    }
}

/// The control surface needs `Arc<Primary>` to spawn resync threads.
pub struct PrimaryControl(pub Arc<Primary>);

impl Replication for PrimaryControl {
    fn mode(&self) -> Mode {
        Mode::Primary
    }

    fn start(&self, mode: Mode, sync: SyncMode) -> Result<(), ReplicationError> {
        if mode != Mode::Primary {
            return Err(ReplicationError::ModeMismatch {
                expected: Mode::Primary,
                got: mode,
            });
        }
        self.0.start_replication(sync)
    }

    fn checkpoint(&self) -> Result<(), ReplicationError> {
        let p = &self.0;
        match p.stage() {
            Stage::Running => {}
            Stage::Fenced => {
                return Err(p
                    .recorded_error()
                    .unwrap_or_else(|| Failure::new("fenced"))
                    .into())
            }
            _ => return Err(ReplicationError::NotRunning),
        }
        p.wait_resync();
        let link = p.link.read_or_recover();
        let Some(remote) = p.forwarding(&link) else {
            return Err(p
                .recorded_error()
                .unwrap_or_else(|| Failure::new("the secondary is not reachable"))
                .into());
        };
        // Every acknowledged write already reached the secondary (write-through);
        // the flush makes them durable there before the VM state is sent.
        if let Err(e) = remote.dev.flush() {
            p.forward_failed("checkpoint flush", &e);
            return Err(Failure::caused_by("checkpoint flush", e).into());
        }
        Ok(())
    }

    fn stop(&self, failover: bool) -> Result<(), ReplicationError> {
        let p = &self.0;
        match p.stage() {
            Stage::Running => {}
            Stage::Fenced => {
                // The tooling has decided about this side: held writes fail
                // now (so the VM can be shut down), and so does every later
                // one. The stage stays fenced: this disk is not the newest.
                info!("primary: stop while fenced: failing held guest writes");
                p.fence.release();
                return Ok(());
            }
            _ => return Err(ReplicationError::NotRunning),
        }
        p.resync_cancel.store(true, Ordering::Release);
        {
            let mut link = p.switch_link();
            link.remote = None;
            p.healthy.store(false, Ordering::Release);
        }
        p.wait_resync();
        info!(
            "primary: replication stopped{}",
            if failover {
                " (failover: carrying on alone)"
            } else {
                ""
            }
        );
        p.set_stage(Stage::Done);
        Ok(())
    }

    fn get_error(&self) -> Result<(), ReplicationError> {
        if self.0.stage() == Stage::None {
            return Err(ReplicationError::NotRunning);
        }
        match self.0.recorded_error() {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    fn status(&self) -> Status {
        let p = &self.0;
        let total = p.resync_total.load(Ordering::Acquire);
        Status {
            mode: Mode::Primary,
            stage: p.stage(),
            error: p.recorded_error().map(|f| f.to_string()),
            resync: (total > 0).then(|| Progress {
                done: p.resync_bytes.load(Ordering::Acquire),
                total,
            }),
            commit: None,
            dirty_clusters: Some(p.dirty.count()),
            fence: p.fence.status(),
        }
    }

    fn release_held(&self) {
        self.0.fence.release();
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

/// The link held alone by `start`/`stop`; channels that waited are rung
/// once it is let go.
struct LinkSwitch<'a> {
    guard: Option<RwLockWriteGuard<'a, Link>>,
    bells: &'a Mutex<Waiters>,
}

impl std::ops::Deref for LinkSwitch<'_> {
    type Target = Link;
    fn deref(&self) -> &Link {
        self.guard.as_ref().expect("held until drop")
    }
}

impl std::ops::DerefMut for LinkSwitch<'_> {
    fn deref_mut(&mut self) -> &mut Link {
        self.guard.as_mut().expect("held until drop")
    }
}

impl Drop for LinkSwitch<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        self.bells.lock_or_recover().ring_all();
    }
}

/// Makes the bits queue channels ask for durable, a batch per sync, for as
/// long as the primary lives.
fn intent_syncer(me: Weak<Primary>) {
    loop {
        let Some(p) = me.upgrade() else {
            return;
        };
        let Some(wi) = p.intent.get() else {
            return;
        };
        // Waits (a while) inside; the primary is not kept alive meanwhile
        // longer than that.
        wi.sync_asked(Duration::from_millis(500));
    }
}

/// Runs the write-intent bitmap's lazy clear about once a second for as long
/// as the primary lives.
fn intent_clearer(me: Weak<Primary>) {
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let Some(p) = me.upgrade() else {
            return;
        };
        p.clear_intent_once();
    }
}
