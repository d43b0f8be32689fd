//! The failover commit: moves active ▸ hidden into the secondary disk while the
//! secondary VM keeps running, then serves the disk directly.
//!
//! One pass in disk order, one cluster at a time, each held exclusively: every
//! granule that active or hidden holds is copied (top-most layer wins) to the disk,
//! then dropped from both overlays. It needs one pass only because, during
//! failover, guest writes follow the split policy: a granule neither overlay holds
//! is written to the disk, so the set of granules the overlays hold never grows,
//! and a cluster the pass has left behind is never dirtied again.

use super::{Secondary, Stage};
use crate::block::Result;
use crate::replication::{Event, Progress};
use std::sync::Arc;
use vm_memory::VolatileSlice;

/// Progress events per commit, at most (plus the first and the last).
const PROGRESS_EVENTS: u64 = 32;

impl Secondary {
    /// Body of the commit thread.
    pub(super) fn run_commit(self: Arc<Self>) {
        if let Err(e) = self.commit_all() {
            self.record_error(format!("failover commit failed: {e}"));
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

    fn commit_all(&self) -> Result<()> {
        let total = self.dirty_clusters();
        let step = (total / PROGRESS_EVENTS).max(1);
        self.progress(0, total);
        let mut buf = Vec::new();
        let mut done = 0;
        let mut pos = 0;
        while let Some(next) = self.next_dirty(pos) {
            let (start, len) = self.cluster_at(next);
            {
                let _held = self.locks.exclusive(start, len);
                self.commit_cluster(start, len, &mut buf)?;
            }
            pos = start + len;
            done += 1;
            if done % step == 0 && done < total {
                self.progress(done, total);
            }
        }
        self.disk.flush()?;
        {
            let _closed = self.gate.close();
            // Nothing should be left (see the module documentation); if anything
            // is, move it now, with all I/O held off.
            let mut pos = 0;
            while let Some(next) = self.next_dirty(pos) {
                let (start, len) = self.cluster_at(next);
                log::warn!("replication: commit found {start} dirty again; moving it quiesced");
                self.commit_cluster(start, len, &mut buf)?;
                pos = start + len;
            }
            self.disk.flush()?;
            self.empty_overlays();
            *super::locked(&self.error) = None;
            self.set_stage(Stage::Done);
        }
        self.release_in_background();
        self.progress(total.max(done), total.max(done));
        self.announce(Stage::Done);
        Ok(())
    }

    /// Copies what the overlays hold of `start..start + len` to the disk, then
    /// drops it from the overlays. Runs with the cluster held exclusively (or the
    /// gate closed).
    fn commit_cluster(&self, start: u64, len: u64, buf: &mut Vec<u8>) -> Result<()> {
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
        self.active.unallocate(start, len)?;
        self.hidden.unallocate(start, len)?;
        Ok(())
    }
}
