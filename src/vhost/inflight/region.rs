//! One queue's part of the inflight buffer: what is recorded when a head is taken
//! from the avail ring and when it goes into the used ring, and how a restarted
//! backend reads it back.

use super::mapping::Mapping;
use super::{DESC_LEN, HEADER_LEN};
use std::num::Wrapping;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::Arc;

/// The only layout version there is; 0 marks a buffer nobody initialised yet.
const VERSION: u16 = 1;

const VERSION_OFF: usize = 8;
const DESC_NUM_OFF: usize = 10;
const LAST_BATCH_HEAD_OFF: usize = 12;
const USED_IDX_OFF: usize = 14;
const INFLIGHT_OFF: usize = 0;
const NEXT_OFF: usize = 6;
const COUNTER_OFF: usize = 8;

/// What a ring start found in the region.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Recovery {
    /// Nothing recorded yet (a new buffer): the frontend's ring base stands.
    Fresh,
    /// The record does not describe this ring; it was reset, and the frontend's
    /// ring base stands (what a frontend without inflight tracking gets).
    Reset(String),
    /// The ring resumes at `next_avail`, after `resubmit` is served again, in
    /// the order the heads were first taken.
    Resume { next_avail: u16, resubmit: Vec<u16> },
}

/// One queue's inflight record.
pub(crate) struct QueueRegion {
    map: Arc<Mapping>,
    base: usize,
    desc_num: u16,
    /// The counter the next head taken gets.
    counter: u64,
}

impl QueueRegion {
    pub(super) fn new(map: Arc<Mapping>, base: usize, desc_num: u16) -> Self {
        QueueRegion {
            map,
            base,
            desc_num,
            counter: 1,
        }
    }

    fn desc_off(&self, head: u16) -> usize {
        self.base + HEADER_LEN + DESC_LEN * usize::from(head)
    }

    fn tracks(&self, head: u16) -> bool {
        head < self.desc_num
    }

    fn used_idx(&self) -> u16 {
        self.map.u16_at(self.base + USED_IDX_OFF).load(Acquire)
    }

    /// True when `head` is recorded as taken and not yet used.
    pub(crate) fn is_inflight(&self, head: u16) -> bool {
        self.tracks(head)
            && self
                .map
                .u8_at(self.desc_off(head) + INFLIGHT_OFF)
                .load(Acquire)
                != 0
    }

    fn counter_of(&self, head: u16) -> u64 {
        self.map
            .u64_at(self.desc_off(head) + COUNTER_OFF)
            .load(Relaxed)
    }

    /// `head` was taken from the avail ring. Recorded before the request runs:
    /// from here on a crash leaves it marked, and a successor serves it again.
    /// (A crash before this store leaves the avail entry to be taken again.)
    pub(crate) fn taken(&mut self, head: u16) {
        if !self.tracks(head) {
            return;
        }
        let off = self.desc_off(head);
        self.map
            .u64_at(off + COUNTER_OFF)
            .store(self.counter, Relaxed);
        self.counter += 1;
        // Release: the counter is in place before the entry counts as in flight.
        self.map.u8_at(off + INFLIGHT_OFF).store(1, Release);
    }

    /// `head` is about to go into the used ring: it becomes the last batch (of
    /// one), so that a successor finding the used index ahead of ours knows which
    /// entry's mark is stale.
    pub(crate) fn using(&mut self, head: u16) {
        if !self.tracks(head) {
            return;
        }
        let last = self.map.u16_at(self.base + LAST_BATCH_HEAD_OFF);
        self.map
            .u16_at(self.desc_off(head) + NEXT_OFF)
            .store(last.load(Relaxed), Relaxed);
        last.store(head, Release);
    }

    /// `head` is in the used ring and the used index is now `used_idx`. Only
    /// after the used index is published may the mark go: cleared before it, a
    /// crash in between would lose the request.
    pub(crate) fn used(&mut self, head: u16, used_idx: u16) {
        if self.tracks(head) {
            self.map
                .u8_at(self.desc_off(head) + INFLIGHT_OFF)
                .store(0, Release);
        }
        self.map
            .u16_at(self.base + USED_IDX_OFF)
            .store(used_idx, Release);
    }

    /// Forgets everything and records `used_idx` as the ring's used index.
    fn reset(&mut self, used_idx: u16) {
        for head in 0..self.desc_num {
            self.map
                .u8_at(self.desc_off(head) + INFLIGHT_OFF)
                .store(0, Relaxed);
        }
        self.map.u64_at(self.base).store(0, Relaxed);
        self.map
            .u16_at(self.base + DESC_NUM_OFF)
            .store(self.desc_num, Relaxed);
        self.map
            .u16_at(self.base + LAST_BATCH_HEAD_OFF)
            .store(0, Relaxed);
        self.map
            .u16_at(self.base + USED_IDX_OFF)
            .store(used_idx, Relaxed);
        self.map
            .u16_at(self.base + VERSION_OFF)
            .store(VERSION, Release);
        self.counter = 1;
    }

    /// Reads the record back when the ring (re)starts, before any head is taken.
    ///
    /// `used_idx` is the used ring's index in guest memory, `ring_size` the ring's
    /// size, and `used_head(i)` the head in used-ring slot `i` (mod the size), or
    /// `None` when the ring cannot be read.
    ///
    /// Heads the used ring holds past the recorded used index were published by a
    /// predecessor that died before clearing their marks: those marks are stale.
    /// They are found in the used ring itself rather than through
    /// `last_batch_head`, which means nothing unless the predecessor completed
    /// something: a buffer whose recorded used index was never brought in line
    /// with the ring (a fresh buffer on a ring whose used index is not 0, as after
    /// a migration) would otherwise clear the mark of whatever head 0 is (SPDK
    /// issue 3766). Here the recorded index is set to the ring's at every start,
    /// so past the first start a difference only ever covers heads this backend
    /// published.
    pub(crate) fn recover(
        &mut self,
        used_idx: u16,
        ring_size: u16,
        used_head: impl Fn(u16) -> Option<u16>,
    ) -> Recovery {
        let version = self.map.u16_at(self.base + VERSION_OFF).load(Acquire);
        if version == 0 {
            self.reset(used_idx);
            return Recovery::Fresh;
        }
        let desc_num = self.map.u16_at(self.base + DESC_NUM_OFF).load(Relaxed);
        if version != VERSION || desc_num != self.desc_num {
            self.reset(used_idx);
            return Recovery::Reset(format!(
                "version {version} with {desc_num} entries, expected version {VERSION} with {}",
                self.desc_num
            ));
        }
        let recorded = self.used_idx();
        let published = (Wrapping(used_idx) - Wrapping(recorded)).0;
        if published > ring_size {
            self.reset(used_idx);
            return Recovery::Reset(format!(
                "recorded used index {recorded} is {published} behind the ring's {used_idx}"
            ));
        }
        for k in 0..published {
            let slot = (Wrapping(recorded) + Wrapping(k)).0;
            let Some(head) = used_head(slot) else {
                self.reset(used_idx);
                return Recovery::Reset(format!("used ring slot {slot} unreadable"));
            };
            if self.tracks(head) {
                self.map
                    .u8_at(self.desc_off(head) + INFLIGHT_OFF)
                    .store(0, Release);
            }
        }
        self.map
            .u16_at(self.base + USED_IDX_OFF)
            .store(used_idx, Release);

        let mut heads: Vec<(u64, u16)> = Vec::new();
        let mut top = 0;
        for head in 0..self.desc_num {
            let counter = self.counter_of(head);
            top = top.max(counter);
            if !self.is_inflight(head) {
                continue;
            }
            if head >= ring_size {
                // Not a descriptor of this ring: nobody can be waiting for it.
                self.map
                    .u8_at(self.desc_off(head) + INFLIGHT_OFF)
                    .store(0, Release);
                continue;
            }
            heads.push((counter, head));
        }
        heads.sort_unstable();
        self.counter = top.saturating_add(1);
        // Every head taken is either in the used ring or still marked: the next
        // avail entry to take is the one after all of them.
        let next_avail = (Wrapping(used_idx) + Wrapping(heads.len() as u16)).0;
        Recovery::Resume {
            next_avail,
            resubmit: heads.into_iter().map(|(_, h)| h).collect(),
        }
    }
}

impl crate::virtio_blk::RingLog for QueueRegion {
    fn taken(&mut self, head: u16) {
        QueueRegion::taken(self, head);
    }

    fn add_used(
        &mut self,
        queue: &mut virtio_queue::Queue,
        mem: &crate::virtio_blk::GuestMem,
        head: u16,
        len: u32,
    ) -> Result<(), virtio_queue::Error> {
        use virtio_queue::QueueT;
        self.using(head);
        // virtio-queue writes the element, then publishes the new used index
        // with a release store: the mark is cleared only after that.
        queue.add_used(mem, head, len)?;
        self.used(head, queue.next_used());
        Ok(())
    }
}
