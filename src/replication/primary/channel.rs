//! The primary's asynchronous channel: one per queue, driven by the queue
//! worker alone, so a guest write waiting for the secondary's reply costs a
//! slot in a table, not a thread.
//!
//! A write goes through the same steps as on the threaded path
//! ([`Primary::replicate_under`], [`Primary::forward_write`]), but none of
//! them blocks the worker:
//!
//! 1. The fence admits it, or parks it ([`Fence::park`]) until the tooling
//!    releases the fence, or fails it.
//! 2. It takes a view of the link under a *try* of the shared `link` lock and
//!    counts itself in `link_users` until it completes; `start`/`stop` wait
//!    for that count under the exclusive lock, so a write either reaches the
//!    secondary or marks its clusters dirty, exactly as when the shared lock
//!    was held across the write.
//! 3. Forwarding, it takes its clusters with [`RangeLocks::try_exclusive`]
//!    and keeps the guard until both copies answered, so the secondary sees
//!    same-cluster writes in the local disk's order.
//! 4. It sends the NBD request (the reply reader rings this channel's
//!    doorbell) and starts the local write meanwhile: on the local io_uring
//!    channel when the disk has one (`--direct`), else inline (page cache).
//!
//! Whatever is in the way (a link switch, a busy cluster) leaves the doorbell
//! with the holder and the request waits in `waiting`, retried on every pass.
//!
//! The write-intent bitmap's sync is off the worker too: bits not yet durable
//! are asked of the primary's syncer thread, which makes a batch durable with
//! one `fdatasync` and rings; the write waits in `waiting` meanwhile.
//!
//! Steps that stay synchronous on the worker, and why they are short: a
//! local write or flush on a disk
//! without io_uring (a page-cache copy, or the `fdatasync` a guest flush asks
//! for); a write-zeroes to a server without WRITE_ZEROES; and, on a secondary
//! that is not an NBD client (tests, in-process pairs), the whole forward.
//! The NBD send itself blocks only while the connection's window is full,
//! which the reply reader frees.
//!
//! [`Fence::park`]: super::super::fence::Fence::park
//! [`RangeLocks::try_exclusive`]: crate::block::RangeLocks::try_exclusive

use super::{ForwardTarget, Primary};
use crate::block::channel::{
    add_ops_by_starting, iov_slices, Doorbell, IoChannel, IoCompletion, Kind, QueuedOp as Op,
    StartsOps,
};
use crate::block::{check_range, BlockDev, BlockError, OwnedRangeGuard, Result as BlockResult};
use crate::nbd;
use crate::replication::fence::Admit;
use crate::sync::MutexExt;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, TryLockError};
use vm_memory::VolatileSlice;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

/// One half of a request: the local disk's, or the secondary's.
enum Part {
    /// Not part of this request.
    Absent,
    Pending,
    /// The secondary's reply is due on this connection.
    Remote(nbd::Started),
    Done(BlockResult<()>),
}

impl Part {
    fn is_done(&self) -> bool {
        match self {
            Part::Absent | Part::Done(_) => true,
            Part::Pending => false,
            Part::Remote(s) => s.is_done(),
        }
    }

    fn into_result(self) -> BlockResult<()> {
        match self {
            Part::Absent | Part::Pending => Ok(()),
            Part::Remote(s) => s.finish(),
            Part::Done(r) => r,
        }
    }
}

/// The primary's `link_users` count, held by a request until it completes.
struct LinkUse(Arc<Primary>);

impl Drop for LinkUse {
    fn drop(&mut self) {
        self.0.link_users.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A write-intent mark held by a request until it completes.
struct IntentUse(Arc<Primary>, usize);

impl Drop for IntentUse {
    fn drop(&mut self) {
        if let Some(wi) = self.0.intent.get() {
            wi.release(self.1);
        }
    }
}

/// A request in flight.
struct Req {
    op: Op,
    local: Part,
    remote: Part,
    /// The request was forwarded (its remote part decides about dirtiness).
    forwarded: bool,
    // Released in this order once both parts are done.
    intent: Option<IntentUse>,
    range: Option<OwnedRangeGuard>,
    link: Option<LinkUse>,
}

/// The primary's channel for one queue. See the module documentation.
pub struct PrimaryChannel {
    p: Arc<Primary>,
    // Declared before the table so it drops first: dropping an io_uring
    // channel waits for the kernel to finish with the buffers.
    local: Option<Box<dyn IoChannel>>,
    /// The completion eventfd when there is no local channel to share.
    event: Option<EventFd>,
    bell: Arc<Doorbell>,
    reqs: Vec<Option<Req>>,
    free: Vec<usize>,
    /// Not started: a link switch or a busy cluster was in the way.
    waiting: VecDeque<Op>,
    /// Held by the fence until it is released.
    parked: Vec<u64>,
    done: Vec<IoCompletion>,
    local_done: Vec<IoCompletion>,
    active: usize,
}

// SAFETY: the raw iovecs point into guest memory that the caller keeps mapped
// until the completion (the `add_*` contract); the channel is used by one
// worker thread at a time, behind its queue's mutex.
unsafe impl Send for PrimaryChannel {}

impl PrimaryChannel {
    /// A channel over `p`, with the local disk's own channel when it has one.
    pub(super) fn new(p: Arc<Primary>, depth: u32) -> std::io::Result<Self> {
        let (local, event) = match p.local.open_channel(depth).transpose()? {
            Some(ch) => (Some(ch), None),
            None => (None, Some(EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?)),
        };
        // Remote completions ring the same eventfd as local ones.
        let fd = match (&local, &event) {
            (Some(ch), _) => ch.notify_fd(),
            (None, ev) => ev.as_ref().map_or(-1, |e| e.as_raw_fd()),
        };
        Ok(PrimaryChannel {
            bell: Arc::new(Doorbell::on_eventfd(fd)?),
            p,
            local,
            event,
            reqs: Vec::new(),
            free: Vec::new(),
            waiting: VecDeque::new(),
            parked: Vec::new(),
            done: Vec::new(),
            local_done: Vec::new(),
            active: 0,
        })
    }

    fn complete(&mut self, id: u64, result: BlockResult<()>) {
        self.done.push(IoCompletion { id, result });
    }

    fn slot(&mut self) -> usize {
        self.free.pop().unwrap_or_else(|| {
            self.reqs.push(None);
            self.reqs.len() - 1
        })
    }

    /// Starts `op`, or hands it back when something is in the way.
    fn try_start(&mut self, op: Op) -> Option<Op> {
        match op.kind {
            Kind::Read => {
                let slot = self.slot();
                let local = self.start_local(slot, &op);
                self.insert(slot, op, local, Part::Absent, false, None, None, None);
                None
            }
            Kind::Flush => self.start_flush(op),
            _ => self.start_write(op),
        }
    }

    fn start_flush(&mut self, op: Op) -> Option<Op> {
        let Some((link, target)) = self.view_link() else {
            return Some(op);
        };
        let slot = self.slot();
        let local = self.start_local(slot, &op);
        let remote = match target {
            None => Part::Absent,
            Some(t) => match &t.nbd {
                Some(client) => Part::Remote(client.start_flush(&self.bell)),
                None => Part::Done(t.dev.flush()),
            },
        };
        self.insert(slot, op, local, remote, false, None, None, Some(link));
        None
    }

    fn start_write(&mut self, op: Op) -> Option<Op> {
        match self.p.fence.admit_write() {
            Admit::Proceed => {}
            Admit::Hold => {
                self.park(op.id);
                return None;
            }
            Admit::Fail(e) => {
                self.complete(op.id, Err(e));
                return None;
            }
        }
        if self.p.local.read_only() {
            self.complete(op.id, Err(BlockError::ReadOnly));
            return None;
        }
        if let Err(e) = check_range(op.offset, op.len, self.p.local.size()) {
            self.complete(op.id, Err(e));
            return None;
        }
        let Some((link, target)) = self.view_link() else {
            return Some(op);
        };
        let (first, last) = self.p.clusters(op.offset, op.len);
        let Some(target) = target else {
            // A fence trips before forwarding is switched off: a write that
            // finds forwarding off finds the fence too, and asks it again.
            if self.p.fence.is_fenced() {
                drop(link);
                return self.start_write(op);
            }
            let intent = match self.mark_intent(first, last, false) {
                Ok(Some(i)) => i,
                Ok(None) => return Some(op),
                Err(e) => {
                    self.complete(op.id, Err(e));
                    return None;
                }
            };
            let slot = self.slot();
            let local = self.start_local(slot, &op);
            self.insert(
                slot,
                op,
                local,
                Part::Absent,
                false,
                intent,
                None,
                Some(link),
            );
            return None;
        };
        let Some(range) = self
            .p
            .locks
            .try_exclusive(op.offset, op.len.max(1), &self.bell)
        else {
            return Some(op);
        };
        let intent = match self.mark_intent(first, last, true) {
            Ok(Some(i)) => i,
            // The cluster lock and the link view go with `range` and `link`.
            Ok(None) => return Some(op),
            Err(e) => {
                self.complete(op.id, Err(e));
                return None;
            }
        };
        self.p.note_guest_write(first, last);
        let slot = self.slot();
        let (local, remote) = match &target.nbd {
            Some(client) => {
                // Sent first: the local write runs while the secondary works.
                let remote = self.start_remote(client, &target, &op);
                (self.start_local(slot, &op), remote)
            }
            None => {
                // The threaded path's order: local, then the secondary.
                let local = self.run_sync(None, &op);
                let remote = match local {
                    Ok(()) => self.run_sync(Some(target.dev.as_ref()), &op),
                    Err(_) => Ok(()),
                };
                (Part::Done(local), Part::Done(remote))
            }
        };
        self.insert(
            slot,
            op,
            local,
            remote,
            true,
            intent,
            Some(range),
            Some(link),
        );
        None
    }

    #[allow(clippy::too_many_arguments)]
    fn insert(
        &mut self,
        slot: usize,
        op: Op,
        local: Part,
        remote: Part,
        forwarded: bool,
        intent: Option<IntentUse>,
        range: Option<OwnedRangeGuard>,
        link: Option<LinkUse>,
    ) {
        let req = Req {
            op,
            local,
            remote,
            forwarded,
            intent,
            range,
            link,
        };
        if req.local.is_done() && req.remote.is_done() {
            // Done inline (page cache, a failed send): nothing will ring.
            self.free.push(slot);
            return self.finish(req);
        }
        self.reqs[slot] = Some(req);
        self.active += 1;
    }

    fn park(&mut self, id: u64) {
        self.p.fence.park(&self.bell);
        self.parked.push(id);
    }

    /// The write-intent mark: `Ok(Some(..))` to go on, `Ok(None)` when the
    /// syncer has been asked for the bits (wait for the doorbell).
    #[allow(clippy::option_option)]
    fn mark_intent(
        &self,
        first: u64,
        last: u64,
        forwarding: bool,
    ) -> BlockResult<Option<Option<IntentUse>>> {
        Ok(self
            .p
            .mark_intent_async(first, last, forwarding, &self.bell)?
            .map(|t| t.map(|t| IntentUse(self.p.clone(), t.detach()))))
    }

    /// The link as a request sees it for its whole life, or `None` while a
    /// `start`/`stop` switches it (the doorbell rings when it is done).
    fn view_link(&self) -> Option<(LinkUse, Option<ForwardTarget>)> {
        let p = &self.p;
        let guard = match p.link.try_read() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => {
                p.link_bells.lock_or_recover().add(&self.bell);
                // The switch may have ended before the bell was left.
                match p.link.try_read() {
                    Ok(g) => g,
                    Err(TryLockError::Poisoned(e)) => e.into_inner(),
                    Err(TryLockError::WouldBlock) => return None,
                }
            }
        };
        // Counted before the shared lock is let go: a switch that takes the
        // exclusive lock next sees this request.
        p.link_users.fetch_add(1, Ordering::AcqRel);
        let target = p.forwarding(&guard).cloned();
        drop(guard);
        Some((LinkUse(p.clone()), target))
    }

    /// The guest buffers of `op` as slices.
    fn slices(op: &Op) -> Vec<VolatileSlice<'_>> {
        // SAFETY: the `add_read`/`add_write` contract keeps this memory
        // mapped, and nothing else writes it (reads), until the completion is
        // returned; the slices do not outlive the request.
        unsafe { iov_slices(&op.iovs) }
    }

    /// Runs `op` on the local disk, or (`remote`) on a secondary that is
    /// not an NBD client, and waits.
    fn run_sync(&self, remote: Option<&dyn BlockDev>, op: &Op) -> BlockResult<()> {
        let dev = remote.unwrap_or(self.p.local.as_ref());
        match op.kind {
            Kind::Read => dev.read_vectored(op.offset, &Self::slices(op)),
            Kind::Write => dev.write_vectored(op.offset, &Self::slices(op)),
            Kind::Flush => dev.flush(),
            // The local discard reads back as zeroes: the secondary matches
            // it exactly.
            Kind::Discard if remote.is_some() => dev.write_zeroes(op.offset, op.len, true),
            Kind::Discard => dev.discard(op.offset, op.len),
            Kind::Zeroes { unmap } => dev.write_zeroes(op.offset, op.len, unmap),
        }
    }

    /// Starts `op` on the local disk: on its channel, or inline.
    fn start_local(&mut self, slot: usize, op: &Op) -> Part {
        let Some(ch) = self.local.as_mut() else {
            return Part::Done(self.run_sync(None, op));
        };
        let id = slot as u64;
        match op.kind {
            // SAFETY: the iovecs come from our caller under the same contract
            // (valid until the completion is returned), and the local
            // completion always precedes ours.
            Kind::Read => unsafe { ch.add_read(id, op.offset, &op.iovs) },
            // SAFETY: as above.
            Kind::Write => unsafe { ch.add_write(id, op.offset, &op.iovs) },
            Kind::Flush => ch.add_flush(id),
            Kind::Discard => ch.add_discard(id, op.offset, op.len),
            Kind::Zeroes { unmap } => ch.add_write_zeroes(id, op.offset, op.len, unmap),
        }
        Part::Pending
    }

    /// Sends `op` to the secondary over NBD.
    fn start_remote(&self, client: &nbd::Client, target: &ForwardTarget, op: &Op) -> Part {
        let started = match op.kind {
            Kind::Write => Some(client.start_write(op.offset, &Self::slices(op), &self.bell)),
            Kind::Discard => client.start_write_zeroes(op.offset, op.len, true, &self.bell),
            Kind::Zeroes { unmap } => {
                client.start_write_zeroes(op.offset, op.len, unmap, &self.bell)
            }
            // Never forwarded.
            Kind::Read | Kind::Flush => return Part::Absent,
        };
        match started {
            Some(Ok(s)) => Part::Remote(s),
            Some(Err(e)) => Part::Done(Err(e)),
            // No WRITE_ZEROES on the server: zeroes sent as data, waited for.
            None => Part::Done(self.run_sync(Some(target.dev.as_ref()), op)),
        }
    }

    /// Retires every request whose parts are both done.
    fn retire(&mut self) {
        for slot in 0..self.reqs.len() {
            let ready = self.reqs[slot]
                .as_ref()
                .is_some_and(|r| r.local.is_done() && r.remote.is_done());
            if !ready {
                continue;
            }
            let Some(req) = self.reqs[slot].take() else {
                continue;
            };
            self.free.push(slot);
            self.active -= 1;
            self.finish(req);
        }
    }

    /// What a request's two outcomes mean for the guest and for the pair.
    fn finish(&mut self, req: Req) {
        let Req {
            op,
            local,
            remote,
            forwarded,
            intent,
            range,
            link,
        } = req;
        let local = local.into_result();
        let remote = remote.into_result();
        let p = self.p.clone();
        let mut fenced = false;
        match op.kind {
            Kind::Read => {}
            Kind::Flush => {
                if let Err(e) = &remote {
                    p.forward_failed("flush", e);
                }
            }
            _ => {
                let (first, last) = p.clusters(op.offset, op.len);
                let n = last - first + 1;
                if !forwarded {
                    if p.baseline.load(Ordering::Acquire) {
                        p.dirty.set_range(first, n);
                    }
                } else {
                    match &remote {
                        Err(e) => {
                            p.dirty.set_range(first, n);
                            fenced = p.forward_failed(op.kind.name(), e);
                        }
                        Ok(()) => {
                            if op.kind == Kind::Write {
                                crate::stats::replication().forwarded(op.len);
                            }
                            if let Err(e) = &local {
                                // The secondary has bytes the local disk may
                                // lack: forwarding stops and the range is left
                                // for a dirty resync.
                                p.forward_failed("write applied on the secondary only", e);
                                p.dirty.set_range(first, n);
                            }
                        }
                    }
                }
            }
        }
        // Dirtiness is recorded before the link view is given up (a switch
        // waiting for it then sees it).
        drop(intent);
        drop(range);
        drop(link);
        if fenced {
            // Not acknowledged: held or failed as the fence's policy says.
            match p.fence.admit_write() {
                Admit::Hold => return self.park(op.id),
                Admit::Fail(e) => return self.complete(op.id, Err(e)),
                Admit::Proceed => {}
            }
        }
        self.complete(op.id, local);
    }

    /// Fails the parked writes once the fence is released.
    fn unpark(&mut self) {
        if self.parked.is_empty() || !self.p.fence.is_released() {
            return;
        }
        for id in std::mem::take(&mut self.parked) {
            let e = self.p.fence.unpark();
            self.complete(id, Err(e));
        }
    }
}

impl StartsOps for PrimaryChannel {
    fn start(&mut self, op: Op) -> Option<Op> {
        self.try_start(op)
    }

    fn held_back(&mut self) -> &mut VecDeque<Op> {
        &mut self.waiting
    }
}

impl IoChannel for PrimaryChannel {
    add_ops_by_starting!();

    fn submit(&mut self) {
        if self.bell.is_rung() {
            self.retry_held_back();
        }
        if let Some(ch) = self.local.as_mut() {
            ch.submit();
        }
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        // The eventfd is read before the doorbell's flag is taken, so a ring
        // in between is seen now or wakes the worker again, never lost.
        if let Some(ev) = &self.event {
            let _ = ev.read();
        }
        if let Some(ch) = self.local.as_mut() {
            ch.poll(&mut self.local_done);
        }
        self.bell.take();
        for c in self.local_done.drain(..) {
            let slot = usize::try_from(c.id).unwrap_or(usize::MAX);
            if let Some(Some(req)) = self.reqs.get_mut(slot) {
                req.local = Part::Done(c.result);
            }
        }
        self.retire();
        self.unpark();
        self.retry_held_back();
        if let Some(ch) = self.local.as_mut() {
            // What the retries started.
            ch.submit();
        }
        let n = self.done.len();
        out.append(&mut self.done);
        n
    }

    fn has_completions(&mut self) -> bool {
        !self.done.is_empty()
            || self.bell.is_rung()
            || self.local.as_mut().is_some_and(|ch| ch.has_completions())
    }

    fn in_flight(&self) -> usize {
        self.active + self.waiting.len() + self.parked.len() + self.done.len()
    }

    fn name(&self) -> &'static str {
        match self.local {
            Some(_) => "primary channel (NBD forward, local io_uring)",
            None => "primary channel (NBD forward, local writes inline)",
        }
    }

    fn notify_fd(&self) -> RawFd {
        match (&self.local, &self.event) {
            (Some(ch), _) => ch.notify_fd(),
            (None, Some(ev)) => ev.as_raw_fd(),
            (None, None) => -1,
        }
    }
}

impl Drop for PrimaryChannel {
    fn drop(&mut self) {
        // Held writes are no longer held once their queue is gone.
        for _ in self.parked.drain(..) {
            let _ = self.p.fence.unpark();
        }
    }
}
