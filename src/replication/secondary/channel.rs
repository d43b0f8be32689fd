//! The secondary VM's asynchronous channel: one per queue, driven by the queue
//! worker alone, so the guest's queue depth reaches the secondary disk through
//! active ▸ hidden ▸ disk without a thread per request.
//!
//! A request takes the same holds as on the synchronous path
//! ([`Secondary::guest_needs_hold`]), but none of them blocks the worker:
//!
//! 1. A pass of the gate, counted in this channel's [`HeldPasses`]: start,
//!    checkpoint and stop wait for it; while they hold the gate closed the
//!    request waits here and the reopening rings the doorbell.
//! 2. Its clusters shared ([`RangeLocks::try_shared`]), so copy-before-write
//!    cannot copy and overwrite a cluster between the allocation check and the
//!    disk read; a busy cluster leaves the doorbell with its holder.
//! 3. What lies only on the disk (a read of clusters neither overlay holds; a
//!    write or zeroing during failover that neither holds) goes to the disk's
//!    own channel (io_uring), the holds kept until it completes. Stage `done`
//!    needs no holds at all: every request goes to the disk's channel.
//!
//! Steps that stay synchronous on the worker, and why they are short: whatever
//! touches an overlay (the active disk's writes, reads of clusters in active or
//! hidden): overlays are sparse files on the page cache, so these are memory
//! copies; a read that spans overlay and disk reads its disk part inline too;
//! and a guest flush while running, which does nothing (overlays are volatile).
//!
//! [`RangeLocks::try_shared`]: crate::block::RangeLocks::try_shared

use super::io::{not_started, GuestOp, Zeroes};
use super::Secondary;
use crate::block::channel::{
    add_ops_by_starting, iov_slices, Doorbell, IoChannel, IoCompletion, Kind, QueuedOp as Op,
    StartsOps,
};
use crate::block::{check_range, OwnedRangeGuard, Result as BlockResult};
use crate::replication::gate::{HeldPass, HeldPasses};
use crate::replication::Stage;
use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A request on the disk's channel, with the holds it keeps until then.
struct Req {
    id: u64,
    // Dropped (released) when the request completes.
    _range: Option<OwnedRangeGuard>,
    _pass: Option<HeldPass>,
}

/// The secondary guest's channel for one queue. See the module documentation.
pub(crate) struct SecondaryChannel {
    // Declared first so it drops first: dropping an io_uring channel waits for
    // the kernel to finish with the buffers, and only then may the holds go.
    disk: Box<dyn IoChannel>,
    s: Arc<Secondary>,
    bell: Arc<Doorbell>,
    passes: Arc<HeldPasses>,
    reqs: Vec<Option<Req>>,
    free: Vec<usize>,
    /// Not started: the gate was closed or a cluster busy.
    waiting: VecDeque<Op>,
    done: Vec<IoCompletion>,
    disk_done: Vec<IoCompletion>,
    active: usize,
}

// SAFETY: the raw iovecs point into guest memory that the caller keeps mapped
// until the completion (the `add_*` contract); the channel is used by one
// worker thread at a time, behind its queue's mutex.
unsafe impl Send for SecondaryChannel {}

impl SecondaryChannel {
    /// A channel over `s` whose disk requests go to `disk`, the secondary
    /// disk's own channel.
    pub(super) fn new(s: Arc<Secondary>, disk: Box<dyn IoChannel>) -> std::io::Result<Self> {
        Ok(SecondaryChannel {
            bell: Arc::new(Doorbell::on_eventfd(disk.notify_fd())?),
            passes: s.gate.register_held(),
            disk,
            s,
            reqs: Vec::new(),
            free: Vec::new(),
            waiting: VecDeque::new(),
            done: Vec::new(),
            disk_done: Vec::new(),
            active: 0,
        })
    }

    fn complete(&mut self, id: u64, result: BlockResult<()>) {
        self.done.push(IoCompletion { id, result });
    }

    /// Starts `op`, or hands it back when the gate or a cluster is in the way.
    fn try_start(&mut self, op: Op) -> Option<Op> {
        // Done is final and the overlays are empty: no gate, no locks.
        if self.s.stage() == Stage::Done {
            self.start_on_disk(op, None, None);
            return None;
        }
        if op.kind != Kind::Flush {
            if let Err(e) = check_range(op.offset, op.len, self.s.disk.size()) {
                self.complete(op.id, Err(e));
                return None;
            }
        }
        let Some(pass) = self.passes.try_enter(&self.bell) else {
            return Some(op);
        };
        // Stable while the pass is held: stages change with the gate closed.
        let stage = self.s.stage();
        let kind = match op.kind {
            Kind::Read => GuestOp::Read,
            Kind::Write => GuestOp::Write,
            Kind::Discard | Kind::Zeroes { .. } => GuestOp::Zeroes,
            Kind::Flush => {
                match stage {
                    // Overlays are volatile by design: nothing to make durable.
                    Stage::Running => self.complete(op.id, Ok(())),
                    _ => self.start_on_disk(op, Some(pass), None),
                }
                return None;
            }
        };
        let range = if self.s.guest_needs_hold(stage, kind, op.offset, op.len) {
            match self
                .s
                .locks
                .try_shared(op.offset, op.len.max(1), &self.bell)
            {
                Some(g) => Some(g),
                None => return Some(op),
            }
        } else {
            None
        };
        match stage {
            Stage::None | Stage::Fenced => {
                self.complete(op.id, Err(not_started()));
                return None;
            }
            Stage::Done => {
                self.start_on_disk(op, Some(pass), range);
                return None;
            }
            Stage::Failover | Stage::FailoverFailed => {
                // The commit paces itself while guests are active.
                self.s.guest_ops.fetch_add(1, Ordering::Relaxed);
            }
            Stage::Running => {}
        }
        // Running, a write or a zeroing goes to the active disk; otherwise
        // what neither overlay holds lives on the disk alone.
        let disk_only = (kind == GuestOp::Read || stage != Stage::Running) && {
            let (above, run) = self.s.chain.allocated_above(op.offset, op.len);
            !above && run >= op.len
        };
        if disk_only {
            self.start_on_disk(op, Some(pass), range);
        } else {
            let result = self.run_held(stage, &op);
            drop(range);
            drop(pass);
            self.complete(op.id, result);
        }
        None
    }

    /// Runs `op` through the stack on this thread, the holds taken.
    fn run_held(&self, stage: Stage, op: &Op) -> BlockResult<()> {
        let s = &self.s;
        match op.kind {
            Kind::Read => {
                // SAFETY: the `add_read` contract keeps the buffers mapped and
                // unwritten by others until the completion is returned; the
                // slices end with this call.
                s.guest_read_held(stage, op.offset, &unsafe { iov_slices(&op.iovs) })
            }
            // SAFETY: as above (`add_write`).
            Kind::Write => s.guest_write_held(stage, op.offset, &unsafe { iov_slices(&op.iovs) }),
            Kind::Discard => s.guest_zeroes_held(stage, op.offset, op.len, Zeroes::Discard),
            Kind::Zeroes { unmap } => {
                s.guest_zeroes_held(stage, op.offset, op.len, Zeroes::WriteZeroes { unmap })
            }
            Kind::Flush => s.guest_flush(),
        }
    }

    /// Starts `op` on the disk's channel, keeping the holds until it completes.
    fn start_on_disk(&mut self, op: Op, pass: Option<HeldPass>, range: Option<OwnedRangeGuard>) {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.reqs.push(None);
            self.reqs.len() - 1
        });
        let ch = &mut self.disk;
        let id = slot as u64;
        match op.kind {
            // SAFETY: the iovecs come from our caller under the same contract
            // (valid until the completion is returned), and the disk's
            // completion always precedes ours.
            Kind::Read => unsafe { ch.add_read(id, op.offset, &op.iovs) },
            // SAFETY: as above.
            Kind::Write => unsafe { ch.add_write(id, op.offset, &op.iovs) },
            Kind::Flush => ch.add_flush(id),
            Kind::Discard => ch.add_discard(id, op.offset, op.len),
            Kind::Zeroes { unmap } => ch.add_write_zeroes(id, op.offset, op.len, unmap),
        }
        self.reqs[slot] = Some(Req {
            id: op.id,
            _range: range,
            _pass: pass,
        });
        self.active += 1;
    }
}

impl StartsOps for SecondaryChannel {
    fn start(&mut self, op: Op) -> Option<Op> {
        self.try_start(op)
    }

    fn held_back(&mut self) -> &mut VecDeque<Op> {
        &mut self.waiting
    }
}

impl IoChannel for SecondaryChannel {
    add_ops_by_starting!();

    fn submit(&mut self) {
        if self.bell.is_rung() {
            self.retry_held_back();
        }
        self.disk.submit();
    }

    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        // The disk's poll clears the shared eventfd before the doorbell's flag
        // is taken, so a ring in between is seen now or wakes the worker
        // again, never lost.
        self.disk.poll(&mut self.disk_done);
        self.bell.take();
        let mut finished = std::mem::take(&mut self.disk_done);
        for c in finished.drain(..) {
            let slot = usize::try_from(c.id).unwrap_or(usize::MAX);
            // Dropping the request releases its holds (which may ring others).
            if let Some(req) = self.reqs.get_mut(slot).and_then(Option::take) {
                self.free.push(slot);
                self.active -= 1;
                self.complete(req.id, c.result);
            }
        }
        self.disk_done = finished;
        self.retry_held_back();
        // What the retries started.
        self.disk.submit();
        let n = self.done.len();
        out.append(&mut self.done);
        n
    }

    fn has_completions(&mut self) -> bool {
        !self.done.is_empty() || self.bell.is_rung() || self.disk.has_completions()
    }

    fn in_flight(&self) -> usize {
        self.active + self.waiting.len() + self.done.len()
    }

    fn notify_fd(&self) -> RawFd {
        self.disk.notify_fd()
    }

    fn name(&self) -> &'static str {
        "secondary channel (overlays inline, disk on io_uring)"
    }
}
