//! Requests in flight on an asynchronous [`IoChannel`]: the virtio-blk side of
//! the per-queue I/O engine.
//!
//! A validated request ([`Deferred`]) becomes one or more channel operations
//! (a discard list one per segment, a write-through write its write and then a
//! flush); when the last one completes, the status byte is written and the
//! request is ready for the used ring. The table is owned by one queue worker.

use super::chain::{slices, GuestMem};
use super::device::{Completion, Deferred, DeferredOp, Exec, Offload, VirtioBlk};
use super::lone::LoneRule;
use super::RequestError;
use crate::block::channel::{IoChannel, IoCompletion};
use crate::block::BlockError;
use std::os::fd::RawFd;
use std::sync::Arc;
use vm_memory::{GuestMemoryLoadGuard, VolatileSlice};

/// A request whose operations are in flight.
struct Pending {
    req: Deferred,
    /// Operations not yet completed.
    ops_left: u32,
    /// The first operation error; the request fails with it.
    error: Option<BlockError>,
    /// A flush still to issue once the data operations succeed.
    flush_after: bool,
    /// Bytes written to the guest on success (reads).
    data_len: u64,
}

/// The requests of one queue in flight on its channel.
pub struct AsyncQueue {
    // Declared first so it drops first: dropping the channel waits for the
    // kernel to finish with the buffers, which the pending requests' guest
    // memory maps keep valid until then.
    channel: Box<dyn IoChannel>,
    reqs: Vec<Option<Pending>>,
    free: Vec<u32>,
    in_flight: usize,
    iovs: Vec<libc::iovec>,
    reaped: Vec<IoCompletion>,
    lone: LoneRule,
}

// SAFETY: the iovec scratch vector only holds pointers between building them and
// handing them to the channel within one call; the queue is used by one worker
// thread at a time (behind its mutex).
unsafe impl Send for AsyncQueue {}

impl AsyncQueue {
    /// A table over `channel`.
    pub fn new(channel: Box<dyn IoChannel>) -> Self {
        AsyncQueue {
            channel,
            reqs: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            iovs: Vec::new(),
            reaped: Vec::new(),
            lone: LoneRule::default(),
        }
    }

    /// Requests started and not yet returned by [`reap`](Self::reap).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// What the channel is, for the log.
    pub fn channel_name(&self) -> &'static str {
        self.channel.name()
    }

    /// The channel's completion eventfd.
    pub fn notify_fd(&self) -> RawFd {
        self.channel.notify_fd()
    }

    /// True when [`reap`](Self::reap) has something to do.
    pub fn has_completions(&mut self) -> bool {
        self.channel.has_completions()
    }

    /// The [`submitter`](Self::submitter) for a worker turn that starts with
    /// `available` requests in the ring: it runs the first one synchronously
    /// when the lone-request rule (`lone.rs`) says so and the channel gains
    /// by it.
    pub fn turn_submitter<'a>(
        &'a mut self,
        device: &'a VirtioBlk,
        mem: &'a GuestMemoryLoadGuard<GuestMem>,
        done: &'a mut Vec<Completion>,
        available: u16,
    ) -> Submitter<'a> {
        let inline = self.lone.begin(available, self.in_flight) && self.channel.inline_when_lone();
        let mut sub = self.submitter(device, mem, done);
        sub.inline = inline;
        sub
    }

    /// The turn that [`turn_submitter`](Self::turn_submitter) served took
    /// `taken` requests from the ring.
    pub fn end_turn(&mut self, taken: u16) {
        self.lone.end(taken);
    }

    /// Hands the operations added since the last call to the storage.
    pub fn submit(&mut self) {
        self.channel.submit();
    }

    /// An [`Offload`] that starts every request on this queue's channel, for
    /// one pass of the worker; requests that finish at once (a buffer outside
    /// guest memory) go to `done`.
    pub fn submitter<'a>(
        &'a mut self,
        device: &'a VirtioBlk,
        mem: &'a GuestMemoryLoadGuard<GuestMem>,
        done: &'a mut Vec<Completion>,
    ) -> Submitter<'a> {
        Submitter {
            queue: self,
            device,
            mem,
            done,
            inline: false,
        }
    }

    fn start(&mut self, device: &VirtioBlk, req: Deferred, done: &mut Vec<Completion>) {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.reqs.push(None);
            (self.reqs.len() - 1) as u32
        });
        let id = u64::from(slot);
        let mut pending = Pending {
            ops_left: 1,
            error: None,
            flush_after: req.flush,
            data_len: 0,
            req,
        };
        let mem = Arc::clone(&pending.req.mem);
        let mut bufs: Vec<VolatileSlice<'_>> = Vec::new();
        let ranges = match &pending.req.op {
            DeferredOp::Read { ranges, .. } | DeferredOp::Write { ranges, .. } => Some(ranges),
            _ => None,
        };
        if let Some(ranges) = ranges {
            // Validated before the hand-off; only a memory-map change fails here.
            if let Err(e) = slices(&mem, ranges.iter().copied(), &mut bufs) {
                self.free.push(slot);
                if let Some(c) = device.finish(
                    &pending.req.mem,
                    pending.req.head,
                    pending.req.status_addr,
                    Err(e),
                    pending.req.stat,
                ) {
                    done.push(c);
                }
                return;
            }
            self.iovs.clear();
            self.iovs.extend(bufs.iter().map(|b| libc::iovec {
                iov_base: b.ptr_guard_mut().as_ptr().cast(),
                iov_len: b.len(),
            }));
        }
        match &pending.req.op {
            DeferredOp::Read { offset, len, .. } => {
                pending.data_len = *len;
                // SAFETY: the buffers are guest memory mapped by `mem`, an Arc
                // that `pending` holds until the completion is reaped (and the
                // channel, dropped first, waits for the kernel); the guest
                // handed them to the device until the request is in the used
                // ring.
                unsafe { self.channel.add_read(id, *offset, &self.iovs) };
            }
            DeferredOp::Write { offset, .. } => {
                // SAFETY: as for reads.
                unsafe { self.channel.add_write(id, *offset, &self.iovs) };
            }
            DeferredOp::Flush => self.channel.add_flush(id),
            DeferredOp::Ranges { zeroes, ranges } => {
                let live: Vec<_> = ranges.iter().filter(|r| r.len > 0).collect();
                pending.ops_left = live.len() as u32;
                for r in &live {
                    if *zeroes {
                        self.channel.add_write_zeroes(id, r.offset, r.len, r.unmap);
                    } else {
                        self.channel.add_discard(id, r.offset, r.len);
                    }
                }
                if live.is_empty() {
                    // Nothing to do but the flush, if any.
                    pending.ops_left = 1;
                    if pending.flush_after {
                        pending.flush_after = false;
                        self.channel.add_flush(id);
                    } else {
                        pending.ops_left = 0;
                    }
                }
            }
        }
        drop(bufs);
        self.in_flight += 1;
        if pending.ops_left == 0 {
            self.in_flight -= 1;
            self.free.push(slot);
            if let Some(c) = Self::complete(device, pending) {
                done.push(c);
            }
            return;
        }
        self.reqs[slot as usize] = Some(pending);
    }

    /// Moves every finished request to `out` (status byte written); returns
    /// how many.
    pub fn reap(&mut self, device: &VirtioBlk, out: &mut Vec<Completion>) -> usize {
        let before = out.len();
        let mut reaped = std::mem::take(&mut self.reaped);
        self.channel.poll(&mut reaped);
        let mut follow_ups = false;
        for c in reaped.drain(..) {
            let slot = c.id as usize;
            let Some(Some(p)) = self.reqs.get_mut(slot) else {
                log::error!("I/O channel completed unknown operation {}", c.id);
                continue;
            };
            p.ops_left -= 1;
            if let Err(e) = c.result {
                p.error.get_or_insert(e);
            }
            if p.ops_left > 0 {
                continue;
            }
            if p.error.is_none() && p.flush_after {
                p.flush_after = false;
                p.ops_left = 1;
                self.channel.add_flush(c.id);
                follow_ups = true;
                continue;
            }
            if let Some(p) = self.reqs[slot].take() {
                self.free.push(slot as u32);
                self.in_flight -= 1;
                if let Some(done) = Self::complete(device, p) {
                    out.push(done);
                }
            }
        }
        self.reaped = reaped;
        if follow_ups {
            self.channel.submit();
        }
        out.len() - before
    }

    fn complete(device: &VirtioBlk, p: Pending) -> Option<Completion> {
        let result = match p.error {
            None => Ok(Exec::Done(match p.req.op {
                DeferredOp::Read { .. } => p.data_len,
                _ => 0,
            })),
            Some(e) => Err(RequestError::Block(e)),
        };
        let head = p.req.head;
        Some(
            device
                .finish(&p.req.mem, head, p.req.status_addr, result, p.req.stat)
                .unwrap_or(Completion {
                    head,
                    used_len: 0,
                    stat: p.req.stat,
                }),
        )
    }
}

/// The [`Offload`] a worker uses during one pass when its queue has a channel.
pub struct Submitter<'a> {
    queue: &'a mut AsyncQueue,
    device: &'a VirtioBlk,
    mem: &'a GuestMemoryLoadGuard<GuestMem>,
    done: &'a mut Vec<Completion>,
    /// The first request asked about runs inline.
    inline: bool,
}

impl Offload for Submitter<'_> {
    fn memory(&self) -> Arc<GuestMem> {
        self.mem.clone().into_inner()
    }

    fn takes_writes(&self) -> bool {
        true
    }

    fn takes_all(&self) -> bool {
        true
    }

    fn run_inline(&mut self) -> bool {
        std::mem::take(&mut self.inline)
    }

    fn submit(&mut self, request: Deferred) {
        self.queue.start(self.device, request, self.done);
    }
}
