//! Forwarding: every content-changing request applied locally and, while
//! the link is up, on the secondary, under the cluster lock; a failure marks
//! the clusters dirty, and a refusal fences this primary.

use super::{ForwardTarget, Link, Primary, Side};
use crate::block::channel::Waiters;
use crate::block::{BlockDev, BlockError, Result as BlockResult};
use crate::nbd;
use crate::replication::fence::OnFenced;
use crate::replication::{Event, Failure, Stage};
use crate::sync::{MutexExt, RwLockExt};
use log::warn;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, RwLockWriteGuard};
use std::time::Duration;
use vm_memory::VolatileSlice;

/// The link held alone by `start`/`stop`; channels that waited are rung
/// once it is let go.
pub(super) struct LinkSwitch<'a> {
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

impl Primary {
    /// A forwarded I/O failed: keep serving, stop forwarding, tell the tooling.
    /// An explicit refusal means the secondary took over: that fences this
    /// primary (returns true) instead of letting it carry on alone.
    pub(super) fn forward_failed(&self, what: &str, err: &BlockError) -> bool {
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
    pub(super) fn fenced(&self, what: &str, err: &BlockError) {
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
    pub(super) fn switch_link(&self) -> LinkSwitch<'_> {
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

    pub(super) fn forwarding<'a>(&self, link: &'a Link) -> Option<&'a ForwardTarget> {
        link.remote
            .as_ref()
            .filter(|_| self.healthy.load(Ordering::Acquire))
    }

    /// Applies a content-changing operation locally and, when forwarding, on the
    /// secondary; marks the clusters dirty when the secondary did not get it.
    pub(super) fn replicate(
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
    pub(super) fn replicate_under(
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
    pub(super) fn replicate_write(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_>],
    ) -> BlockResult<()> {
        self.fence.wait_admitted()?;
        // Held (or failed) with no lock held: control commands stay free.
        if self.forward_write(offset, bufs)? {
            return self.fence.wait_admitted();
        }
        Ok(())
    }

    /// The body of [`Primary::replicate_write`]; `Ok(true)`: fenced.
    pub(super) fn forward_write(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_>],
    ) -> BlockResult<bool> {
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
}
