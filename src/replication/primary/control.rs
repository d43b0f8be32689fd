//! The control surface: `start` (reach the secondary, switch forwarding on,
//! start the resync), `checkpoint`, `stop`, `get-error` and the status.

use super::{ForwardTarget, Primary};
use crate::replication::{
    Event, Failure, Mode, Progress, Replication, ReplicationError, Stage, Status, SyncMode,
};
use crate::sync::{MutexExt, RwLockExt};
use log::info;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

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

impl Primary {
    /// Starts replication; `self` must be the `Arc` the daemon holds.
    ///
    /// Slow work (reaching the secondary, waiting for an old resync) runs with
    /// no lock held that `query-replication` needs; `starting` keeps a second
    /// `start` out meanwhile.
    pub(super) fn start_replication(
        self: &Arc<Self>,
        sync: SyncMode,
    ) -> Result<(), ReplicationError> {
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
    pub(super) fn connect_within_deadline(
        self: &Arc<Self>,
    ) -> Result<ForwardTarget, ReplicationError> {
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

    pub(super) fn start_unlocked(self: &Arc<Self>, sync: SyncMode) -> Result<(), ReplicationError> {
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
