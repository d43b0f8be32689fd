//! A queue's first pass after its ring (re)started with an inflight buffer: read
//! the record back, resume the avail ring after the last request a predecessor
//! took, and serve again the ones it never completed.

use super::inflight::{QueueRegion, Recovery};
use crate::virtio_blk::{GuestMem, Offload, Scratch, VirtioBlk};
use std::sync::atomic::Ordering;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Bytes before the used ring's first element (`flags`, `idx`).
const USED_RING_HEADER: u64 = 4;
/// Bytes of one used-ring element (`id`, `len`).
const USED_ELEM: u64 = 8;

/// Recovers queue `q` from `region` and resubmits its requests through
/// `offload` (the queue's channel or pool, as for any request). Returns how many
/// of them completed at once (already in the used ring).
pub(super) fn resume<'m>(
    queue: &mut Queue,
    mem: &'m GuestMem,
    device: &VirtioBlk,
    q: usize,
    region: &mut QueueRegion,
    scratch: &mut Scratch<'m>,
    mut offload: Option<&mut dyn Offload>,
) -> usize {
    let size = queue.size();
    if size == 0 {
        return 0;
    }
    let used = match queue.used_idx(mem, Ordering::Acquire) {
        Ok(used) => used.0,
        Err(e) => {
            device.report_ring_error(q, "used index unreadable at start", e);
            return 0;
        }
    };
    let used_ring = queue.used_ring();
    let used_head = |slot: u16| {
        let off = USED_RING_HEADER + USED_ELEM * u64::from(slot % size);
        let id: u32 = mem
            .read_obj(GuestAddress(used_ring.checked_add(off)?))
            .ok()?;
        u16::try_from(id).ok()
    };
    match region.recover(used, size, used_head) {
        Recovery::Fresh => {
            log::info!("queue {q}: inflight tracking starts at used index {used}");
            0
        }
        Recovery::Reset(why) => {
            log::warn!(
                "queue {q}: inflight record reset ({why}); resuming at the frontend's avail index {}",
                queue.next_avail()
            );
            0
        }
        Recovery::Resume {
            next_avail,
            resubmit,
        } => {
            let base = queue.next_avail();
            queue.set_next_avail(next_avail);
            queue.set_next_used(used);
            log::info!(
                "queue {q}: resuming at avail index {next_avail} (frontend said {base}), used \
                 index {used}, {} request(s) to serve again",
                resubmit.len()
            );
            let mut done = 0;
            for head in resubmit {
                let offload = offload.as_mut().map(|o| &mut **o as &mut dyn Offload);
                if device.resubmit(queue, mem, head, scratch, offload, region) {
                    done += 1;
                }
            }
            done
        }
    }
}
