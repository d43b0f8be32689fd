//! The resync: copiers that bring the secondary up to date (every cluster,
//! or the dirty ones) while the guest runs, windows pipelined on an NBD link.

use super::{ForwardTarget, Primary};
use crate::block::{BlockDev, BlockDevExt, Extent, ExtentKind, Result as BlockResult};
use crate::nbd;
use crate::replication::intent::IntentToken;
use crate::replication::{Event, Progress, ReplicationError};
use crate::sync::{CondvarExt, MutexExt, RwLockExt};
use log::{info, warn};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use vm_memory::VolatileSlice;

/// Largest piece a resync copies in one I/O.
pub(super) const RESYNC_WINDOW: u64 = 2 << 20;

/// Parallel resync copiers (local reads overlap).
pub(super) const RESYNC_THREADS: usize = 4;

/// Windows each copier keeps in flight on an NBD link.
pub(super) const RESYNC_DEPTH: usize = 8;

/// Where a resync is: the next offset (full) or cluster (dirty), and how far
/// the local disk is known to hold data from there.
#[derive(Default)]
pub(super) struct Cursor {
    pos: u64,
    data_until: u64,
}

/// A resync window sent, its reply not yet awaited.
pub(super) struct InFlightWindow<'a> {
    off: u64,
    len: u64,
    write: nbd::SubmittedWrite,
    remote: ForwardTarget,
    _intent: Option<IntentToken<'a>>,
}

#[derive(Default)]
pub(super) struct ResyncState {
    active: bool,
    threads: Vec<JoinHandle<()>>,
}

impl Primary {
    pub(super) fn spawn_resync(self: &Arc<Self>, full: bool) -> Result<(), ReplicationError> {
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
    pub(super) fn next_window(
        &self,
        full: bool,
        cursor: &Mutex<Cursor>,
    ) -> Option<(u64, u64, bool)> {
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
    pub(super) fn resync_worker(&self, full: bool, cursor: &Mutex<Cursor>) {
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
    pub(super) fn send_window(
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
    pub(super) fn finish_window(&self, full: bool, w: InFlightWindow<'_>, buf: &mut [u8]) -> bool {
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

    pub(super) fn count_resynced(&self, len: u64) {
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
    pub(super) fn note_guest_write(&self, first: u64, last: u64) {
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
    pub(super) fn copy_window(
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

    pub(super) fn resync_finished(&self, full: bool) {
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
    pub(super) fn wait_resync(&self) {
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
}
