//! The secondary side of COLO block replication, as a node of the block stack.
//!
//! ```text
//!   guest() ──> [gate] ──> active ▸ hidden ▸ secondary disk      (Chain)
//!                                              ▲ copy-before-write
//!   primary() ─> [gate] ──────────────────────> secondary disk
//! ```
//!
//! [`Secondary`] owns the stack and the stage machine of ARCHITECTURE.md and hands out
//! two views of it: [`Secondary::guest`], what the vhost worker serves to the
//! secondary VM, and [`Secondary::primary`], what the NBD server serves to the
//! primary.
//!
//! Concurrency, without a lock around the disk:
//! * every request passes a sharded in-flight [gate](super::gate); start,
//!   checkpoint and stop close it to quiesce guest and primary I/O;
//! * per-cluster [range locks](crate::block::RangeLocks): a guest request holds its
//!   clusters shared while it reads below the active disk; copy-before-write holds
//!   them exclusive from the copy until the primary's write has landed, so a
//!   guest read never looks at hidden before the copy and at the secondary disk
//!   after the write; the failover commit copies a cluster holding nothing and
//!   holds it exclusive only to drop it from the overlays, once it knows no
//!   guest wrote to it meanwhile, so no guest write racing it is lost and no
//!   guest request waits for the copy (see `commit`).

mod channel;
#[cfg(test)]
mod channel_tests;
mod commit;
mod commit_stats;
#[cfg(test)]
mod commit_tests;
mod io;
mod lock_wait;
mod pace;

use super::gate::Gate;
use super::{
    Event, EventSink, Failure, Mode, Progress, Replication, ReplicationError, Stage, Status,
    SyncMode,
};
use crate::block::{Bitmap, Chain, Overlay, RangeGuard, RangeLocks, SharedDev, DEFAULT_STRIPES};
use crate::sync::MutexExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;

/// Default copy-before-write cluster size (QEMU's backup job default).
pub const DEFAULT_CLUSTER_SIZE: u64 = 64 * 1024;

fn stage_code(s: Stage) -> u8 {
    match s {
        Stage::None => 0,
        Stage::Running => 1,
        Stage::Failover => 2,
        Stage::FailoverFailed => 3,
        Stage::Done => 4,
        // A secondary is never fenced; kept distinct all the same.
        Stage::Fenced => 5,
    }
}

fn stage_from(c: u8) -> Stage {
    match c {
        1 => Stage::Running,
        2 => Stage::Failover,
        3 => Stage::FailoverFailed,
        4 => Stage::Done,
        5 => Stage::Fenced,
        _ => Stage::None,
    }
}

#[derive(Default)]
struct CommitState {
    progress: Option<Progress>,
    thread: Option<JoinHandle<()>>,
}

/// The secondary replication node. See the module documentation.
pub struct Secondary {
    me: Weak<Secondary>,
    disk: SharedDev,
    active: Arc<Overlay>,
    hidden: Arc<Overlay>,
    chain: Chain,
    cluster: u64,
    /// Clusters copied to hidden since the last checkpoint.
    copied: Bitmap,
    /// During failover: clusters whose overlay data a guest changed since the
    /// commit last cleared the bit (see `commit`).
    rewritten: Bitmap,
    locks: Arc<RangeLocks>,
    gate: Gate,
    stage: AtomicU8,
    /// Serialises control commands with each other.
    control: Mutex<()>,
    error: Mutex<Option<Failure>>,
    commit: Mutex<CommitState>,
    /// A background thread is releasing emptied overlay space.
    releasing: AtomicBool,
    events: EventSink,
    /// Guest requests served during failover: the commit rests between
    /// bursts only while this moves.
    guest_ops: AtomicU64,
    /// The longest wait of a guest request for a cluster lock during failover.
    guest_lock_wait_ns: AtomicU64,
    /// Tests: tries of a cluster lock by the commit that found it busy.
    #[cfg(test)]
    busy_tries: AtomicU64,
}

impl std::fmt::Debug for Secondary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secondary")
            .field("stage", &self.stage())
            .field("cluster", &self.cluster)
            .field("active", &self.active)
            .field("hidden", &self.hidden)
            .finish()
    }
}

impl Secondary {
    /// Builds the node over the secondary `disk` with the `active` and `hidden`
    /// overlays. `cluster_size` is the copy-before-write unit: a power of two, at
    /// least the overlays' granule. The node starts in stage `none`: guest I/O is
    /// refused, primary writes go straight to the disk (initial sync).
    pub fn new(
        disk: SharedDev,
        active: Arc<Overlay>,
        hidden: Arc<Overlay>,
        cluster_size: u64,
        events: EventSink,
    ) -> Result<Arc<Self>, ReplicationError> {
        let granule = active.granule().max(hidden.granule());
        if !cluster_size.is_power_of_two() || cluster_size < granule {
            return Err(ReplicationError::ClusterSize {
                size: cluster_size,
                granule,
            });
        }
        let clusters = disk.size().div_ceil(cluster_size);
        let chain = Chain::new(vec![active.clone(), hidden.clone()], disk.clone());
        Ok(Arc::new_cyclic(|me| Secondary {
            me: me.clone(),
            disk,
            active,
            hidden,
            chain,
            cluster: cluster_size,
            copied: Bitmap::new(clusters),
            rewritten: Bitmap::new(clusters),
            locks: Arc::new(RangeLocks::new(cluster_size, DEFAULT_STRIPES)),
            gate: Gate::new(),
            stage: AtomicU8::new(stage_code(Stage::None)),
            control: Mutex::new(()),
            error: Mutex::new(None),
            commit: Mutex::new(CommitState::default()),
            releasing: AtomicBool::new(false),
            events,
            guest_ops: AtomicU64::new(0),
            guest_lock_wait_ns: AtomicU64::new(0),
            #[cfg(test)]
            busy_tries: AtomicU64::new(0),
        }))
    }

    /// What the secondary VM sees (served by the vhost worker): before start,
    /// refused; while running, active ▸ hidden ▸ secondary disk; after failover, the
    /// secondary disk.
    pub fn guest(self: &Arc<Self>) -> SharedDev {
        Arc::new(io::GuestView(self.clone()))
    }

    /// What the primary writes to (served by the NBD server): reads the secondary
    /// disk; writes straight to it in stage `none` (initial sync), with
    /// copy-before-write while running, refused after failover or stop (fencing).
    pub fn primary(self: &Arc<Self>) -> SharedDev {
        Arc::new(io::PrimaryView(self.clone()))
    }

    /// The current stage.
    pub fn stage(&self) -> Stage {
        stage_from(self.stage.load(Ordering::Acquire))
    }

    /// The copy-before-write cluster size.
    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }

    /// The active overlay (the secondary VM's writes since the last checkpoint).
    pub fn active(&self) -> &Arc<Overlay> {
        &self.active
    }

    /// The hidden overlay (old contents of clusters the primary overwrote).
    pub fn hidden(&self) -> &Arc<Overlay> {
        &self.hidden
    }

    /// The secondary disk.
    pub fn disk(&self) -> &SharedDev {
        &self.disk
    }

    /// Guest requests served during failover so far.
    fn guest_ops(&self) -> u64 {
        self.guest_ops.load(Ordering::Relaxed)
    }

    /// A guest request's shared hold on its clusters during failover. The
    /// request is counted (the commit paces itself while guests are active)
    /// and its wait for the lock timed: the commit logs the longest, the one
    /// wait for the commit a guest request can have in this process.
    fn failover_shared(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        self.guest_ops.fetch_add(1, Ordering::Relaxed);
        let t = std::time::Instant::now();
        let held = self.locks.shared(offset, len);
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        // Read first: most waits are not the longest, and a load does not
        // bounce the cache line between the serving threads.
        if ns > self.guest_lock_wait_ns.load(Ordering::Relaxed) {
            self.guest_lock_wait_ns.fetch_max(ns, Ordering::Relaxed);
        }
        held
    }

    /// Waits for a failover commit started by `stop(failover)` to end (stage
    /// `done` or `failover-failed`). Returns at once when none runs.
    pub fn wait_commit(&self) {
        let handle = self.commit.lock_or_recover().thread.take();
        if let Some(h) = handle {
            if h.join().is_err() {
                log::error!("replication: the commit thread panicked");
            }
        }
    }

    fn set_stage(&self, stage: Stage) {
        self.stage.store(stage_code(stage), Ordering::Release);
    }

    fn announce(&self, stage: Stage) {
        log::info!("replication (secondary): stage {stage}");
        (self.events)(Event::StageChanged {
            mode: Mode::Secondary,
            stage,
        });
    }

    /// Keeps a failure for get-error and `query-replication`, and emits it.
    fn record_error(&self, failure: Failure) {
        let message = failure.to_string();
        log::error!("replication (secondary): {message}");
        *self.error.lock_or_recover() = Some(failure);
        (self.events)(Event::Error {
            mode: Mode::Secondary,
            message,
        });
    }

    fn set_progress(&self, p: Progress) {
        self.commit.lock_or_recover().progress = Some(p);
    }

    /// Empties both overlays and forgets which clusters were copied. The gate
    /// must be closed. Only bitmaps change here; the space is released by
    /// [`Secondary::release_in_background`] once the gate is open again.
    fn empty_overlays(&self) {
        let started = std::time::Instant::now();
        let a = self.active.make_empty_deferred();
        let h = self.hidden.make_empty_deferred();
        self.copied.clear_all();
        log::debug!(
            "replication (secondary): checkpoint emptied {} + {} bytes in {:?}",
            a.bytes,
            h.bytes,
            started.elapsed()
        );
    }

    /// Releases the space of emptied overlay runs on a background thread (one at
    /// a time; it loops until nothing is pending).
    fn release_in_background(&self) {
        let pending =
            || self.active.pending_release_bytes() + self.hidden.pending_release_bytes() > 0;
        if !pending() || self.releasing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(me) = self.me.upgrade() else {
            self.releasing.store(false, Ordering::Release);
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("colo-release".into())
            .spawn(move || loop {
                let t = std::time::Instant::now();
                let bytes = me.active.release_pending() + me.hidden.release_pending();
                log::debug!(
                    "replication (secondary): released {bytes} bytes in {:?}",
                    t.elapsed()
                );
                me.releasing.store(false, Ordering::Release);
                let more =
                    me.active.pending_release_bytes() + me.hidden.pending_release_bytes() > 0;
                if !more || me.releasing.swap(true, Ordering::AcqRel) {
                    return;
                }
            });
        if let Err(e) = spawned {
            log::warn!("replication (secondary): no release thread ({e}); releasing inline");
            self.active.release_pending();
            self.hidden.release_pending();
            self.releasing.store(false, Ordering::Release);
        }
    }

    /// Waits until the space of emptied overlay runs is released (tests, benches).
    pub fn wait_released(&self) {
        while self.releasing.load(Ordering::Acquire)
            || self.active.pending_release_bytes() + self.hidden.pending_release_bytes() > 0
        {
            if !self.releasing.load(Ordering::Acquire) {
                self.release_in_background();
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

impl Replication for Secondary {
    fn mode(&self) -> Mode {
        Mode::Secondary
    }

    fn start(&self, mode: Mode, _sync: SyncMode) -> Result<(), ReplicationError> {
        let _control = self.control.lock_or_recover();
        match self.stage() {
            // A promoted secondary has nothing left to replicate.
            Stage::Failover | Stage::Done => return Ok(()),
            Stage::None | Stage::Fenced => {}
            Stage::Running | Stage::FailoverFailed => return Err(ReplicationError::AlreadyStarted),
        }
        if mode != Mode::Secondary {
            return Err(ReplicationError::ModeMismatch {
                expected: Mode::Secondary,
                got: mode,
            });
        }
        if !self.chain.sizes_match() {
            return Err(ReplicationError::LengthMismatch);
        }
        {
            let _closed = self.gate.close();
            self.set_stage(Stage::Running);
            *self.error.lock_or_recover() = None;
            self.empty_overlays();
        }
        self.release_in_background();
        self.announce(Stage::Running);
        Ok(())
    }

    fn checkpoint(&self) -> Result<(), ReplicationError> {
        let _control = self.control.lock_or_recover();
        match self.stage() {
            Stage::Failover | Stage::Done => Ok(()),
            Stage::None | Stage::Fenced => Err(ReplicationError::NotRunning),
            Stage::FailoverFailed => Err(ReplicationError::FailoverFailed),
            Stage::Running => {
                {
                    let _closed = self.gate.close();
                    self.empty_overlays();
                }
                self.release_in_background();
                Ok(())
            }
        }
    }

    fn stop(&self, failover: bool) -> Result<(), ReplicationError> {
        let _control = self.control.lock_or_recover();
        match self.stage() {
            Stage::Failover | Stage::Done => return Ok(()),
            Stage::Running => {}
            Stage::None | Stage::Fenced | Stage::FailoverFailed => {
                return Err(ReplicationError::NotRunning)
            }
        }
        if !failover {
            {
                let _closed = self.gate.close();
                self.empty_overlays();
                self.set_stage(Stage::Done);
            }
            self.release_in_background();
            self.announce(Stage::Done);
            return Ok(());
        }
        let Some(me) = self.me.upgrade() else {
            return Err(ReplicationError::Closing);
        };
        {
            // Drains in-flight primary writes: none may land once the commit runs.
            let _closed = self.gate.close();
            self.set_stage(Stage::Failover);
            self.set_progress(Progress::default());
        }
        self.announce(Stage::Failover);
        let spawned = std::thread::Builder::new()
            .name("colo-commit".into())
            .spawn(move || me.run_commit());
        match spawned {
            Ok(handle) => {
                self.commit.lock_or_recover().thread = Some(handle);
                Ok(())
            }
            Err(e) => {
                let failure = Failure::caused_by("cannot start the failover commit", e);
                self.record_error(failure.clone());
                self.set_stage(Stage::FailoverFailed);
                self.announce(Stage::FailoverFailed);
                Err(failure.into())
            }
        }
    }

    fn get_error(&self) -> Result<(), ReplicationError> {
        if self.stage() == Stage::None {
            return Err(ReplicationError::NotRunning);
        }
        match self.error.lock_or_recover().clone() {
            Some(failure) => Err(failure.into()),
            None => Ok(()),
        }
    }

    fn status(&self) -> Status {
        Status {
            mode: Mode::Secondary,
            stage: self.stage(),
            error: self
                .error
                .lock_or_recover()
                .as_ref()
                .map(Failure::to_string),
            resync: None,
            commit: self.commit.lock_or_recover().progress,
            dirty_clusters: None,
            fence: None,
        }
    }
}
