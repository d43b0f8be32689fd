//! The failover commit: moves active ▸ hidden into the secondary disk while the
//! secondary VM keeps running, then serves the disk directly.
//!
//! One pass in disk order, one cluster at a time: every granule that active or
//! hidden holds is copied (top-most layer wins) to the disk, then dropped from
//! both overlays. It needs one pass only because, during failover, guest writes
//! follow the split policy: a granule neither overlay holds is written to the
//! disk, so the set of granules the overlays hold never grows, and a cluster the
//! pass has left behind is never dirtied again.
//!
//! The guest must not wait for the copy. A cluster is moved in three steps:
//! 1. *copy*, holding nothing: clear the cluster's `rewritten` bit, copy what
//!    the overlays hold to the disk. Writing the disk under granules an overlay
//!    holds is invisible (reads take those granules from the overlay, guest
//!    writes to them go to active), and only the commit drops granules, so no
//!    guest request looks at what is being written.
//! 2. *drop*, holding the cluster exclusively for a few atomic operations: if
//!    no guest wrote above the disk in the cluster since step 1 (a guest write
//!    to active sets `rewritten` after its data is there, before it lets go of
//!    its shared lock), the disk now holds what the guest sees: drop the
//!    granules from both bitmaps; otherwise go back to step 1. The lock is
//!    tried, not waited for ([`lock_wait`](super::lock_wait)): a waiting
//!    exclusive locker would queue new guest requests behind it.
//! 3. *release* the dropped granules' overlay space once the commit is done,
//!    on the background release thread. A hole punch holds the overlay file's
//!    inode lock, which a guest write to active needs during failover, and
//!    frees pages with voluntary preemption points inside it; after failover
//!    no guest request touches the overlays. (The overlays keep the space
//!    they had until then; the commit adds none.)
//!
//! A cluster a guest keeps rewriting is moved the old way after a few copies:
//! copied while held (one cluster's worth of I/O). Between clusters the commit
//! [paces](super::pace) itself against guest activity.

use super::commit_stats::CommitStats;
use super::lock_wait::{LockWaiter, Taken};
use super::pace::Pacer;
use super::{Secondary, Stage};
use crate::block::{BlockError, Result};
use crate::replication::{Event, Failure, Progress};
use crate::sync::MutexExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::VolatileSlice;

/// Progress events per commit, at most (plus the first and the last).
const PROGRESS_EVENTS: u64 = 32;

/// Copies of one cluster made holding nothing before it is copied held: a
/// guest rewriting the same cluster that often within one copy is hot enough
/// that waiting for it once is cheaper than chasing it.
const COPY_ATTEMPTS: u32 = 4;

impl Secondary {
    /// Body of the commit thread.
    pub(super) fn run_commit(self: Arc<Self>) {
        if let Err(e) = self.commit_all() {
            self.record_error(Failure::caused_by("failover commit failed", e));
            // Failover and failover-failed share one I/O policy, so the switch
            // needs no quiescing.
            self.set_stage(Stage::FailoverFailed);
            self.announce(Stage::FailoverFailed);
        }
    }

    fn next_dirty(&self, from: u64) -> Option<u64> {
        match (
            self.active.next_allocated(from),
            self.hidden.next_allocated(from),
        ) {
            (Some(a), Some(h)) => Some(a.min(h)),
            (a, h) => a.or(h),
        }
    }

    /// Start and length of the cluster holding `offset`.
    fn cluster_at(&self, offset: u64) -> (u64, u64) {
        let start = offset / self.cluster * self.cluster;
        (start, self.cluster.min(self.size_bytes() - start))
    }

    fn size_bytes(&self) -> u64 {
        self.disk.size()
    }

    fn dirty_clusters(&self) -> u64 {
        let mut n = 0;
        let mut pos = 0;
        while let Some(next) = self.next_dirty(pos) {
            let (start, len) = self.cluster_at(next);
            n += 1;
            pos = start + len;
        }
        n
    }

    fn progress(&self, done: u64, total: u64) {
        let p = Progress {
            done: done * self.cluster,
            total: total * self.cluster,
        };
        self.set_progress(p);
        (self.events)(Event::CommitProgress(p));
    }

    /// Marks the clusters of `offset..offset + len` rewritten: a guest changed
    /// what the overlays hold there during failover. Called after the change,
    /// with the range still held shared.
    pub(super) fn mark_rewritten(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let c0 = offset / self.cluster;
        let c1 = (offset + len - 1) / self.cluster;
        self.rewritten.set_range(c0, c1 - c0 + 1);
    }

    fn commit_all(&self) -> Result<()> {
        let total = self.dirty_clusters();
        let step = (total / PROGRESS_EVENTS).max(1);
        self.progress(0, total);
        let mut buf = Vec::new();
        let mut stats = CommitStats::new();
        self.guest_lock_wait_ns.store(0, Ordering::Relaxed);
        let mut done = 0;
        let mut pos = 0;
        let waiter = LockWaiter::new().map_err(|e| BlockError::io("commit doorbell", 0, e))?;
        let mut pacer = Pacer::new(self.guest_ops());
        while let Some(next) = self.next_dirty(pos) {
            let (start, len) = self.cluster_at(next);
            self.commit_cluster_live(start, len, &waiter, &mut buf, &mut stats)?;
            stats.rest.add(pacer.between(self.guest_ops()));
            stats.clusters += 1;
            pos = start + len;
            done += 1;
            if done % step == 0 && done < total {
                self.progress(done, total);
            }
        }
        let t = Instant::now();
        self.disk.flush()?;
        stats.flush.since(t);
        {
            let _closed = self.gate.close();
            let t = Instant::now();
            // Nothing should be left (see the module documentation); if anything
            // is, move it now, with all I/O held off.
            let mut pos = 0;
            while let Some(next) = self.next_dirty(pos) {
                let (start, len) = self.cluster_at(next);
                log::warn!("replication: commit found {start} dirty again; moving it quiesced");
                self.commit_cluster(start, len, &mut buf, &mut stats)?;
                pos = start + len;
            }
            self.disk.flush()?;
            self.empty_overlays();
            *self.error.lock_or_recover() = None;
            self.set_stage(Stage::Done);
            stats.quiesced.since(t);
        }
        stats.log(Duration::from_nanos(
            self.guest_lock_wait_ns.load(Ordering::Relaxed),
        ));
        self.release_in_background();
        self.progress(total.max(done), total.max(done));
        self.announce(Stage::Done);
        Ok(())
    }

    /// Moves one cluster while guests run (steps 1 and 2 of the module
    /// documentation).
    fn commit_cluster_live(
        &self,
        start: u64,
        len: u64,
        waiter: &LockWaiter,
        buf: &mut Vec<u8>,
        stats: &mut CommitStats,
    ) -> Result<()> {
        let c = start / self.cluster;
        for _ in 0..COPY_ATTEMPTS {
            self.rewritten.clear_range(c, 1);
            let t = Instant::now();
            self.copy_to_disk(start, len, buf)?;
            let t = stats.copy.since(t);
            let held = waiter.exclusive(&self.locks, start, len, || self.note_busy(stats));
            let t = stats.lock_wait.since(t);
            if let Taken::Waited(_) = held {
                stats.waited += 1;
            }
            if !self.rewritten.get(c) {
                self.drop_from_overlays(start, len)?;
                stats.held.since(t);
                return Ok(());
            }
            drop(held);
            stats.recopies += 1;
        }
        // A guest keeps rewriting it: copy it held, waiting like a request.
        stats.copies_held += 1;
        let t = Instant::now();
        let _held = self.locks.exclusive(start, len);
        let t = stats.lock_wait.since(t);
        self.copy_to_disk(start, len, buf)?;
        self.drop_from_overlays(start, len)?;
        stats.held.since(t);
        Ok(())
    }

    fn note_busy(&self, stats: &mut CommitStats) {
        stats.busy += 1;
        #[cfg(test)]
        self.busy_tries
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Copies what the overlays hold of `start..start + len` to the disk.
    fn copy_to_disk(&self, start: u64, len: u64, buf: &mut Vec<u8>) -> Result<()> {
        let end = start + len;
        let layers = self.chain.overlays();
        let mut pos = start;
        while pos < end {
            let (src, run) = self.chain.source(pos, end - pos);
            if let Some(layer) = layers.get(src) {
                buf.resize(run as usize, 0);
                let slice = [VolatileSlice::from(buf.as_mut_slice())];
                layer.read_allocated(pos, &slice)?;
                self.disk.write_vectored(pos, &slice)?;
            }
            pos += run;
        }
        Ok(())
    }

    /// Drops `start..start + len` from both overlays' bitmaps; their space stays
    /// pending release until the commit is done. Runs with the cluster held
    /// exclusively.
    fn drop_from_overlays(&self, start: u64, len: u64) -> Result<()> {
        self.active.unallocate_deferred(start, len)?;
        self.hidden.unallocate_deferred(start, len)?;
        Ok(())
    }

    /// Copies what the overlays hold of `start..start + len` to the disk, then
    /// drops it from the overlays and releases its space. Runs with the gate
    /// closed.
    fn commit_cluster(
        &self,
        start: u64,
        len: u64,
        buf: &mut Vec<u8>,
        stats: &mut CommitStats,
    ) -> Result<()> {
        let t = Instant::now();
        self.copy_to_disk(start, len, buf)?;
        let t = stats.copy.since(t);
        self.active.unallocate(start, len)?;
        self.hidden.unallocate(start, len)?;
        stats.release.since(t);
        Ok(())
    }
}
