//! What changed while the secondary did not get it: the dirty clusters and
//! the on-disk write-intent bitmap (marking before a write, the syncer that
//! makes queue channels' bits durable in batches, the lazy clearer).

use super::Primary;
use crate::block::{BlockError, Result as BlockResult};
use crate::replication::intent::{IntentToken, Marked, WriteIntent};
use crate::replication::ReplicationError;
use crate::sync::RwLockExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Makes the bits queue channels ask for durable, a batch per sync, for as
/// long as the primary lives.
pub(super) fn intent_syncer(me: Weak<Primary>) {
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
pub(super) fn intent_clearer(me: Weak<Primary>) {
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let Some(p) = me.upgrade() else {
            return;
        };
        p.clear_intent_once();
    }
}

impl Primary {
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
    pub(super) fn mark_intent_async(
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
            Ok(Marked::Now(t)) => Ok(Some(Some(t))),
            Ok(Marked::Later) => Ok(None),
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
    pub(super) fn intent_bits(&self, wi: &WriteIntent, first: u64, last: u64) -> (u64, u64) {
        let cs = self.cluster_shift;
        let ws = wi.shift();
        let byte = |c: u64| c.checked_shl(cs).unwrap_or(u64::MAX);
        let end = byte(last.saturating_add(1)).saturating_sub(1);
        (byte(first) >> ws, end >> ws)
    }

    /// The clusters that bits `bit..bit + n` cover, clamped to the disk.
    pub(super) fn bit_clusters(&self, wi: &WriteIntent, bit: u64, n: u64) -> (u64, u64) {
        let (cs, ws) = (self.cluster_shift, wi.shift());
        let byte = |b: u64| b.checked_shl(ws).unwrap_or(u64::MAX);
        let total = self.local.size().div_ceil(1 << cs);
        let c0 = (byte(bit) >> cs).min(total);
        let c1 = (byte(bit.saturating_add(n)) >> cs).clamp(c0, total);
        (c0, c1 - c0)
    }

    /// Records durably whether the secondary is a dirty-resync baseline.
    pub(super) fn persist_baseline(&self, baseline: bool) -> Result<(), ReplicationError> {
        self.baseline.store(baseline, Ordering::Release);
        match self.intent.get() {
            None => Ok(()),
            Some(wi) => wi
                .set_baseline(baseline, wi.shift(), self.local.size())
                .map_err(ReplicationError::Intent),
        }
    }

    /// One round of the lazy clearer: only while forwarding works.
    pub(super) fn clear_intent_once(&self) {
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
}
