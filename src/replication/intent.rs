//! The primary's write-intent bitmap, on disk beside the image: one bit per
//! cluster that may differ between the two copies. A restarted primary loads
//! it and resyncs only those clusters (`start --sync dirty`), as md's
//! write-intent bitmap and DRBD's activity log let a restarted node do.
//!
//! Crash safety rests on one ordering: a cluster's bit is durable (written and
//! fdatasync'ed) before any write to it starts, locally or on the secondary
//! ([`WriteIntent::mark`]). Bits are cleared lazily
//! (`WriteIntent::clear_lazily`): only for clusters whose writes all
//! completed on both sides and were flushed on both, and that no write since
//! has touched. Losing a clear in a crash costs an extra copy, never a missed
//! one. The hot set of a busy guest stays set, so steady writes to it cost no
//! extra sync.
//!
//! A queue worker cannot wait for that sync with other requests in flight: it
//! asks for the bits ([`WriteIntent::mark_or_request`]) and retries the write
//! once the syncer thread (`WriteIntent::sync_asked`, run by the primary's `intent-sync` thread) has made every bit
//! asked for since its last round durable with one `fdatasync` and rung the
//! askers (group commit, as md plugs bitmap updates).
//!
//! Marks and clears are told apart by epochs: a mark counts itself in the
//! current epoch until its token drops; a clear first moves to a new epoch,
//! waits for the old one to drain, flushes, then clears what only older epochs
//! touched.
//!
//! File layout: a 4 KiB header (magic, version, cluster shift, disk size, a
//! "baseline" flag: the secondary was once equal to this disk), then the bits,
//! LSB first.

use crate::block::channel::{Doorbell, Waiters};
use crate::block::Bitmap;
use crate::sync::{CondvarExt, MutexExt, RwLockExt};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};
use thiserror::Error;

const MAGIC: &[u8; 8] = b"COLOWIB1";
const VERSION: u32 = 1;
const HEADER: u64 = 4096;

/// Why the bitmap file could not be used.
#[derive(Debug, Error)]
pub enum IntentError {
    /// Reading, writing or syncing the file failed.
    #[error("write-intent bitmap {path}: {source}")]
    Io {
        /// The bitmap file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A mark in flight; the cluster may be cleared only after it is dropped.
#[must_use = "the write must run while the token is held"]
pub struct IntentToken<'a> {
    counter: &'a AtomicU64,
    slot: usize,
}

impl IntentToken<'_> {
    /// Gives up the borrow for a request that outlives the caller's frame:
    /// the returned slot must be handed to [`WriteIntent::release`] once the
    /// write is done (until then the clusters stay marked).
    pub(crate) fn detach(self) -> usize {
        let slot = self.slot;
        std::mem::forget(self);
        slot
    }
}

impl Drop for IntentToken<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The on-disk write-intent bitmap. See the module documentation.
pub struct WriteIntent {
    path: PathBuf,
    file: File,
    /// Bits in the map; each covers `1 << shift` bytes of the disk.
    clusters: u64,
    shift: u32,
    /// What the file says (once synced).
    on_disk: Bitmap,
    /// Clusters marked per epoch slot.
    marked: [Bitmap; 2],
    in_flight: [AtomicU64; 2],
    epoch: AtomicU64,
    /// Marks share it; epoch switches and clears hold it alone.
    switch: RwLock<()>,
    /// Serialises file writes.
    io: Mutex<()>,
    loaded_baseline: bool,
    /// Bits asked for by workers, for the syncer.
    asked: Mutex<Asked>,
    asked_cv: Condvar,
}

/// What workers asked the syncer for since its last round.
#[derive(Default)]
struct Asked {
    ranges: Vec<(u64, u64)>,
    bells: Waiters,
    /// The last round failed: askers mark synchronously (and get the error).
    failed: bool,
}

/// The answer of [`WriteIntent::mark_or_request`].
pub enum Marked<'a> {
    /// Durable: the write may start, holding the token.
    Now(IntentToken<'a>),
    /// Asked for: retry once the doorbell rings.
    Later,
}

impl std::fmt::Debug for WriteIntent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteIntent")
            .field("path", &self.path)
            .field("set", &self.on_disk.count())
            .finish_non_exhaustive()
    }
}

impl WriteIntent {
    /// Opens (or creates) the bitmap for a disk of `size` bytes in clusters of
    /// `1 << cluster_shift`. A file for another geometry, or unreadable, is
    /// started afresh without a baseline (a full resync is then needed).
    pub fn open(path: &Path, size: u64, cluster_shift: u32) -> Result<Self, IntentError> {
        let err = |source| IntentError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(err)?;
        let clusters = size.div_ceil(1 << cluster_shift);
        let wi = WriteIntent {
            path: path.to_path_buf(),
            file,
            clusters,
            shift: cluster_shift,
            on_disk: Bitmap::new(clusters),
            marked: [Bitmap::new(clusters), Bitmap::new(clusters)],
            in_flight: [AtomicU64::new(0), AtomicU64::new(0)],
            epoch: AtomicU64::new(0),
            switch: RwLock::new(()),
            io: Mutex::new(()),
            loaded_baseline: false,
            asked: Mutex::new(Asked::default()),
            asked_cv: Condvar::new(),
        };
        let mut header = [0u8; 32];
        let valid = wi.file.read_exact_at(&mut header, 0).is_ok()
            && &header[..8] == MAGIC
            && u32::from_le_bytes(header[8..12].try_into().unwrap_or_default()) == VERSION
            && u32::from_le_bytes(header[12..16].try_into().unwrap_or_default()) == cluster_shift
            && u64::from_le_bytes(header[16..24].try_into().unwrap_or_default()) == size;
        if !valid {
            log::info!("{}: new write-intent bitmap", path.display());
            wi.write_header(cluster_shift, size, false)?;
            wi.write_bits(0, clusters)?;
            wi.sync()?;
            return Ok(wi);
        }
        let mut bytes = vec![0u8; clusters.div_ceil(8) as usize];
        wi.file.read_exact_at(&mut bytes, HEADER).map_err(err)?;
        for c in 0..clusters {
            if bytes[(c / 8) as usize] & (1 << (c % 8)) != 0 {
                wi.on_disk.set_range(c, 1);
            }
        }
        let baseline = header[24] == 1;
        log::info!(
            "{}: write-intent bitmap loaded, {} clusters may differ (baseline {baseline})",
            path.display(),
            wi.on_disk.count()
        );
        Ok(WriteIntent {
            loaded_baseline: baseline,
            ..wi
        })
    }

    /// True when the loaded file said the secondary was once in sync: its
    /// set bits are then exactly what a dirty resync must copy.
    pub fn loaded_baseline(&self) -> bool {
        self.loaded_baseline
    }

    /// Log2 of the bytes one bit covers.
    pub fn shift(&self) -> u32 {
        self.shift
    }

    /// Calls `f(first, count)` for every run of set bits.
    pub fn for_each_set(&self, f: impl FnMut(u64, u64)) {
        self.on_disk.for_each_run(f);
    }

    /// Clusters set.
    pub fn count(&self) -> u64 {
        self.on_disk.count()
    }

    /// Records durably whether the secondary is a baseline for dirty resyncs.
    pub fn set_baseline(
        &self,
        baseline: bool,
        cluster_shift: u32,
        size: u64,
    ) -> Result<(), IntentError> {
        let _io = self.io.lock_or_recover();
        self.write_header(cluster_shift, size, baseline)?;
        self.sync()
    }

    /// Marks clusters `first..=last` before a write to them starts: returns
    /// once their bits are durable. The write runs while the token is held.
    pub fn mark(&self, first: u64, last: u64) -> Result<IntentToken<'_>, IntentError> {
        let last = last.min(self.clusters.saturating_sub(1));
        let n = last.saturating_sub(first) + 1;
        let _shared = self.switch.read_or_recover();
        let slot = (self.epoch.load(Ordering::Acquire) & 1) as usize;
        self.in_flight[slot].fetch_add(1, Ordering::AcqRel);
        let token = IntentToken {
            counter: &self.in_flight[slot],
            slot,
        };
        self.marked[slot].set_range(first, n);
        if self.on_disk.run(first, n) != (true, n) {
            let _io = self.io.lock_or_recover();
            if self.on_disk.set_range(first, n) > 0 {
                self.write_bits(first, n)?;
                self.sync()?;
            }
        }
        Ok(token)
    }

    /// [`WriteIntent::mark`] for a caller that must not wait for a sync: the
    /// token when the bits are durable already, else the bits are asked of
    /// the syncer and `bell` rings once they are durable.
    pub fn mark_or_request(
        &self,
        first: u64,
        last: u64,
        bell: &Arc<Doorbell>,
    ) -> Result<Marked<'_>, IntentError> {
        let last = last.min(self.clusters.saturating_sub(1));
        let n = last.saturating_sub(first) + 1;
        if self.on_disk.run(first, n) == (true, n) {
            return self.mark(first, last).map(Marked::Now);
        }
        let mut asked = self.asked.lock_or_recover();
        if asked.failed {
            drop(asked);
            return self.mark(first, last).map(Marked::Now);
        }
        asked.ranges.push((first, n));
        asked.bells.add(bell);
        self.asked_cv.notify_one();
        Ok(Marked::Later)
    }

    /// One round of the syncer: waits up to `idle` for asks, makes them
    /// durable with one sync, rings the askers. Returns whether it did work.
    pub(crate) fn sync_asked(&self, idle: Duration) -> bool {
        let (ranges, mut bells) = {
            let mut asked = self.asked.lock_or_recover();
            if asked.ranges.is_empty() {
                asked = self.asked_cv.wait_timeout_or_recover(asked, idle).0;
            }
            if asked.ranges.is_empty() {
                return false;
            }
            (
                std::mem::take(&mut asked.ranges),
                std::mem::take(&mut asked.bells),
            )
        };
        let result = (|| {
            let _io = self.io.lock_or_recover();
            let mut changed = false;
            for &(first, n) in &ranges {
                if self.on_disk.set_range(first, n) > 0 {
                    self.write_bits(first, n)?;
                    changed = true;
                }
            }
            if changed {
                self.sync()?;
            }
            Ok::<(), IntentError>(())
        })();
        if let Err(e) = result {
            log::error!("primary: {e}; writes mark the bitmap one by one from now on");
            self.asked.lock_or_recover().failed = true;
        }
        bells.ring_all();
        true
    }

    /// No syncer will run: askers mark synchronously.
    pub(crate) fn no_syncer(&self) {
        self.asked.lock_or_recover().failed = true;
    }

    /// Ends a write whose token was [detached](IntentToken::detach).
    pub(crate) fn release(&self, slot: usize) {
        self.in_flight[slot & 1].fetch_sub(1, Ordering::AcqRel);
    }

    /// Clears the bits of clusters that only writes before the previous
    /// call touched, except those `keep` names (the secondary lacks them).
    /// `flush_both` must make every completed write durable on both copies.
    /// Skips (returns `Ok(false)`) when older writes are still in flight.
    pub(crate) fn clear_lazily(
        &self,
        keep: impl Fn(u64) -> bool,
        flush_both: impl FnOnce() -> bool,
    ) -> Result<bool, IntentError> {
        let old = {
            let _alone = self.switch.write_or_recover();
            let cur = (self.epoch.load(Ordering::Acquire) & 1) as usize;
            let next = 1 - cur;
            if self.in_flight[next].load(Ordering::Acquire) != 0 {
                return Ok(false);
            }
            self.marked[next].clear_all();
            self.epoch.fetch_add(1, Ordering::AcqRel);
            cur
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.in_flight[old].load(Ordering::Acquire) != 0 {
            if Instant::now() > deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if !flush_both() {
            return Ok(false);
        }
        let _alone = self.switch.write_or_recover();
        let _io = self.io.lock_or_recover();
        let current = &self.marked[1 - old];
        let mut changed = false;
        let mut runs = Vec::new();
        self.on_disk.for_each_run(|first, n| runs.push((first, n)));
        for (first, n) in runs {
            for c in first..first + n {
                if !current.get(c) && !keep(c) {
                    self.on_disk.clear_range(c, 1);
                    changed = true;
                }
            }
        }
        if changed {
            // Not synced: a lost clear only costs an extra copy.
            self.write_bits(0, self.clusters)?;
        }
        Ok(true)
    }

    fn io_err(&self, source: std::io::Error) -> IntentError {
        IntentError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn write_header(&self, shift: u32, size: u64, baseline: bool) -> Result<(), IntentError> {
        let mut h = vec![0u8; HEADER as usize];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&shift.to_le_bytes());
        h[16..24].copy_from_slice(&size.to_le_bytes());
        h[24] = u8::from(baseline);
        self.file.write_all_at(&h, 0).map_err(|e| self.io_err(e))
    }

    /// Writes the bytes holding bits `first..first + n` from `on_disk`.
    fn write_bits(&self, first: u64, n: u64) -> Result<(), IntentError> {
        let b0 = first / 8;
        let b1 = (first + n).div_ceil(8).min(self.clusters.div_ceil(8));
        let mut bytes = vec![0u8; (b1 - b0) as usize];
        for (i, byte) in bytes.iter_mut().enumerate() {
            let base = (b0 + i as u64) * 8;
            for bit in 0..8 {
                let c = base + bit;
                if c < self.clusters && self.on_disk.get(c) {
                    *byte |= 1 << bit;
                }
            }
        }
        self.file
            .write_all_at(&bytes, HEADER + b0)
            .map_err(|e| self.io_err(e))
    }

    fn sync(&self) -> Result<(), IntentError> {
        self.file.sync_data().map_err(|e| self.io_err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asked_bits_become_durable_in_one_round_and_ring_every_asker() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wib");
        let wi = WriteIntent::open(&path, 64 << 16, 16).unwrap();
        let ev = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let a = Arc::new(Doorbell::on_eventfd(ev.as_raw_fd()).unwrap());
        let b = Arc::new(Doorbell::on_eventfd(ev.as_raw_fd()).unwrap());
        assert!(matches!(
            wi.mark_or_request(3, 4, &a).unwrap(),
            Marked::Later
        ));
        assert!(matches!(
            wi.mark_or_request(9, 9, &b).unwrap(),
            Marked::Later
        ));
        assert!(!a.is_rung() && !b.is_rung());
        assert!(wi.sync_asked(Duration::ZERO));
        assert!(a.take() && b.take(), "both askers rung");
        // Durable: a crash now keeps them, and asking again is immediate.
        let reopened = WriteIntent::open(&path, 64 << 16, 16).unwrap();
        assert_eq!(reopened.count(), 3);
        assert!(matches!(
            wi.mark_or_request(3, 4, &a).unwrap(),
            Marked::Now(_)
        ));
        assert!(!wi.sync_asked(Duration::ZERO), "nothing left to sync");
    }

    #[test]
    fn marks_survive_reopen_and_lazy_clear_spares_recent_and_kept_clusters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wib");
        let wi = WriteIntent::open(&path, 64 << 16, 16).unwrap();
        wi.set_baseline(true, 16, 64 << 16).unwrap();
        drop(wi.mark(3, 5).unwrap());
        drop(wi.mark(40, 40).unwrap());
        let reopened = WriteIntent::open(&path, 64 << 16, 16).unwrap();
        assert!(reopened.loaded_baseline());
        assert_eq!(reopened.count(), 4);
        // Cluster 40 is written again while the clear flushes (after its
        // epoch switch), 4 is kept: both stay, 3 and 5 go.
        let keep = Bitmap::new(64);
        keep.set_range(4, 1);
        let cleared = reopened
            .clear_lazily(
                |c| keep.get(c),
                || {
                    drop(reopened.mark(40, 40).unwrap());
                    true
                },
            )
            .unwrap();
        assert!(cleared);
        let again = WriteIntent::open(&path, 64 << 16, 16).unwrap();
        let mut set = Vec::new();
        again.for_each_set(|f, n| set.push((f, n)));
        assert_eq!(set, vec![(4, 1), (40, 1)]);
        // Another geometry starts afresh, without a baseline.
        let other = WriteIntent::open(&path, 32 << 16, 16).unwrap();
        assert!(!other.loaded_baseline());
        assert_eq!(other.count(), 0);
    }
}
