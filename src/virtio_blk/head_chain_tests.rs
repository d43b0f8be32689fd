//! [`HeadChain`] walks a chain found by its head exactly as virtio-queue walks
//! the one the avail ring hands out: a resubmitted request must be the request
//! the guest submitted.

use super::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

const SIZE: u16 = 16;
const TABLE: u64 = 0x40_0000;

fn memory() -> GuestMem {
    GuestMem::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
}

/// (address, length, flags) of each descriptor of a chain, the comparable part.
type Shape = Vec<(u64, u32, u16)>;

fn shape(descs: impl Iterator<Item = Descriptor>) -> Shape {
    descs.map(|d| (d.addr().0, d.len(), d.flags())).collect()
}

/// Every chain the avail ring offers, walked both ways.
fn both_ways(mem: &GuestMem, vq: &MockSplitQueue<GuestMem>) -> Vec<(Shape, Shape)> {
    let mut q: Queue = vq.create_queue().unwrap();
    let mut out = Vec::new();
    while let Some(chain) = q.iter(mem).unwrap().next() {
        let by_head = HeadChain::new(mem, q.desc_table(), q.size(), chain.head_index());
        out.push((shape(chain), shape(by_head)));
    }
    out
}

#[test]
fn a_chain_found_by_its_head_is_the_one_the_avail_ring_gives() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, SIZE);
    let n = VRING_DESC_F_NEXT;
    let w = VRING_DESC_F_WRITE;
    // An indirect table of three, chained 0 -> 2 -> 1.
    for (i, d) in [
        desc(0x1000, 16, n, 2),
        desc(0x3000, 1, w, 0),
        desc(0x2000, 4096, n | w, 1),
    ]
    .into_iter()
    .enumerate()
    {
        mem.write_obj(d, GuestAddress(TABLE + 16 * i as u64))
            .unwrap();
    }
    vq.add_desc_chains(
        &[
            desc(0x5000, 16, n, 1),
            desc(0x6000, 512, n | w, 2),
            desc(0x7000, 1, w, 0),
            desc(TABLE, 48, VRING_DESC_F_INDIRECT, 0),
        ],
        0,
    )
    .unwrap();
    let walked = both_ways(&mem, &vq);
    assert_eq!(walked.len(), 2);
    for (by_ring, by_head) in &walked {
        assert_eq!(by_ring, by_head);
    }
    assert_eq!(walked[1].1.len(), 3, "the indirect table's three");
}

#[test]
fn a_looping_chain_ends_where_virtio_queue_ends_it() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, SIZE);
    // 5 -> 6 -> 5 -> ...: at most one table's worth of descriptors.
    vq.add_desc_chains(
        &[
            desc(0x1000, 16, VRING_DESC_F_NEXT, 6),
            desc(0x2000, 16, VRING_DESC_F_NEXT, 5),
        ],
        5,
    )
    .unwrap();
    let walked = both_ways(&mem, &vq);
    assert_eq!(walked.len(), 1);
    assert_eq!(walked[0].0, walked[0].1);
    assert_eq!(walked[0].1.len(), usize::from(SIZE));
}

#[test]
fn an_indirect_table_inside_one_ends_the_chain() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, SIZE);
    mem.write_obj(
        desc(TABLE, 16, VRING_DESC_F_INDIRECT, 0),
        GuestAddress(TABLE),
    )
    .unwrap();
    vq.add_desc_chains(&[desc(TABLE, 16, VRING_DESC_F_INDIRECT, 0)], 0)
        .unwrap();
    let walked = both_ways(&mem, &vq);
    assert_eq!(walked, vec![(vec![], vec![])]);
    // A head past the table is no chain at all.
    assert_eq!(
        HeadChain::new(&mem, vq.desc_table_addr().0, SIZE, SIZE).count(),
        0
    );
}
