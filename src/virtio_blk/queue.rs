//! One pass over a virtqueue: every available chain is served and put in the used
//! ring. Notifying the driver is left to the caller, once per pass.

use super::chain::{GuestMem, HeadChain};
use super::device::{Offload, Scratch, VirtioBlk};
use super::RequestError;
use virtio_queue::{Queue, QueueOwnedT, QueueT};

/// Where a queue records which requests the device holds, at the two moments
/// that matter to a successor after a crash: a head taken from the avail ring,
/// and a head put in the used ring (vhost-user's inflight buffer).
pub trait RingLog {
    /// `head` was taken from the avail ring; its request has not started yet.
    fn taken(&mut self, head: u16);

    /// Puts `head` in the used ring with `len` bytes written, recording it
    /// around the write.
    fn add_used(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMem,
        head: u16,
        len: u32,
    ) -> Result<(), virtio_queue::Error>;
}

/// Records nothing: the used ring alone says what completed.
pub struct NoLog;

impl RingLog for NoLog {
    fn taken(&mut self, _head: u16) {}

    fn add_used(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMem,
        head: u16,
        len: u32,
    ) -> Result<(), virtio_queue::Error> {
        queue.add_used(mem, head, len)
    }
}

impl VirtioBlk {
    /// Serves every chain available on `queue`; returns how many were completed
    /// (put in the used ring). Large reads may go to `offload` instead, which
    /// completes them later.
    ///
    /// A broken ring (an available index too far ahead, a used ring outside guest
    /// memory) ends the pass with a rate-limited log line; the next kick retries.
    pub fn process_queue<'m>(
        &self,
        queue: &mut Queue,
        mem: &'m GuestMem,
        scratch: &mut Scratch<'m>,
        offload: Option<&mut dyn Offload>,
    ) -> usize {
        self.process_queue_logged(queue, mem, scratch, offload, &mut NoLog)
    }

    /// [`process_queue`](Self::process_queue), recording every head taken and
    /// used in `log`.
    pub fn process_queue_logged<'m>(
        &self,
        queue: &mut Queue,
        mem: &'m GuestMem,
        scratch: &mut Scratch<'m>,
        mut offload: Option<&mut dyn Offload>,
        log: &mut dyn RingLog,
    ) -> usize {
        let mut done = 0;
        loop {
            let chain = match queue.iter(mem) {
                Ok(mut avail) => avail.next(),
                Err(e) => {
                    self.report(queue.next_avail(), &RequestError::Queue(e));
                    break;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            log.taken(head);
            let reborrowed = offload.as_mut().map(|o| &mut **o as &mut dyn Offload);
            let Some(c) = self.handle_descs(mem, head, chain, scratch, reborrowed) else {
                continue;
            };
            if let Err(e) = log.add_used(queue, mem, c.head, c.used_len) {
                self.report(c.head, &RequestError::Queue(e));
                break;
            }
            self.account(scratch.queue, &c.stat);
            done += 1;
        }
        done
    }

    /// Serves again the request at `head`, which a predecessor took from the avail
    /// ring and never completed (its avail entry may be long overwritten): the
    /// chain is read from the descriptor table, and the request takes the normal
    /// path, through `offload` when there is one. Returns true when it completed
    /// at once (it is then in the used ring).
    pub fn resubmit<'m>(
        &self,
        queue: &mut Queue,
        mem: &'m GuestMem,
        head: u16,
        scratch: &mut Scratch<'m>,
        offload: Option<&mut dyn Offload>,
        log: &mut dyn RingLog,
    ) -> bool {
        let chain = HeadChain::new(mem, queue.desc_table(), queue.size(), head);
        let Some(c) = self.handle_descs(mem, head, chain, scratch, offload) else {
            return false;
        };
        if let Err(e) = log.add_used(queue, mem, c.head, c.used_len) {
            self.report(c.head, &RequestError::Queue(e));
            return false;
        }
        true
    }
}
