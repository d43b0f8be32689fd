//! A backend killed with requests in flight on its io_uring-style channel, some
//! of them completed out of order, and its successor given the same inflight
//! buffer: every request the guest submitted completes exactly once.

use super::engine_tests::{
    add_requests, add_requests_at, data_addr, guest_memory, held_device, reads, ready_vring,
    status, used_idx, Held, QSIZE,
};
use super::inflight::{self, InflightBuffer};
use super::queue_io::QueueIo;
use super::vring::Vring;
use super::worker::serve;
use crate::virtio_blk::{GuestMem, VirtioBlk};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Arc, Mutex};
use vhost::vhost_user::message::VhostUserInflight;
use vhost_user_backend::VringT;
use virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// One incarnation of the backend: its node, queue and vring.
struct Backend {
    shared: Arc<Mutex<Held>>,
    device: Arc<VirtioBlk>,
    io: QueueIo,
    vring: Vring,
    _kick: EventFd,
}

/// Starts a backend on the guest's ring as a reconnecting frontend does:
/// SET_INFLIGHT_FD, the ring rewound to `base`, then the kick fd.
fn start(
    atomic: &vm_memory::GuestMemoryAtomic<GuestMem>,
    vq: &MockSplitQueue<GuestMem>,
    buffer: (&File, &VhostUserInflight),
    base: u16,
) -> Backend {
    let (shared, device) = held_device();
    let io = QueueIo::new(device.clone(), 0, QSIZE, 0).unwrap();
    let region = InflightBuffer::open(buffer.1, buffer.0, 1, usize::from(QSIZE))
        .unwrap()
        .queue(0);
    io.set_inflight(region);
    let vring = ready_vring(atomic, vq);
    vring.set_queue_next_avail(base);
    vring.set_queue_next_used(base);
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    // SAFETY: dup returns a new fd that the File then owns exclusively.
    let dup = unsafe { File::from_raw_fd(libc::dup(kick.as_raw_fd())) };
    vring.set_kick(Some(dup));
    Backend {
        shared,
        device,
        io,
        vring,
        _kick: kick,
    }
}

/// The requests (by index) a backend's node holds, in the order it got them.
fn held_requests(b: &Backend, mem: &GuestMem, n: u16) -> Vec<u16> {
    let held = b.shared.lock().unwrap();
    held.pending
        .iter()
        .map(|(_, bufs)| {
            let ptr = bufs[0].0;
            (0..n)
                .find(|&i| {
                    mem.get_host_address(GuestAddress(data_addr(i))).unwrap() as usize == ptr
                })
                .expect("a buffer of one of the requests")
        })
        .collect()
}

/// The heads in the used ring, in ring order.
fn used_heads(mem: &GuestMem, vq: &MockSplitQueue<GuestMem>) -> Vec<u16> {
    (0..used_idx(mem, vq))
        .map(|k| vq.used().ring().ref_at(usize::from(k)).unwrap().load().id() as u16)
        .collect()
}

#[test]
fn out_of_order_completions_stay_exact_across_a_backend_crash() {
    let atomic = guest_memory();
    let guard = atomic.memory();
    let mem: &GuestMem = &guard;
    let vq = MockSplitQueue::new(mem, QSIZE);
    let ask = VhostUserInflight::new(0, 0, 1, QSIZE);
    let (msg, file) = inflight::create(&ask, 1, usize::from(QSIZE)).unwrap();

    // Eight reads in flight at once; the node finishes 1, 4 and 6 (channel
    // slots are given in submission order), then the backend is killed.
    add_requests(mem, &vq, &reads(8));
    let first = start(&atomic, &vq, (&file, &msg), 0);
    serve(&first.vring, &atomic, &first.device, &first.io);
    assert_eq!(first.shared.lock().unwrap().pending.len(), 8);
    first.shared.lock().unwrap().release_ids = vec![1, 4, 6];
    serve(&first.vring, &atomic, &first.device, &first.io);
    assert_eq!(
        used_heads(mem, &vq),
        vec![3, 12, 18],
        "heads of requests 1, 4, 6"
    );
    drop(first);

    // QEMU rewinds the ring to its used index (3): replaying avail entries
    // 3..8 from there would complete 4 and 6 twice and never 0 and 2.
    let second = start(&atomic, &vq, (&file, &msg), 3);
    serve(&second.vring, &atomic, &second.device, &second.io);
    assert_eq!(
        held_requests(&second, mem, 8),
        vec![0, 2, 3, 5, 7],
        "exactly the unfinished ones, in the order the guest submitted them"
    );

    // The avail ring resumes after the last request taken: the guest's next
    // one is taken once, and nothing else.
    add_requests_at(mem, &vq, 8, &reads(9)[8..]);
    serve(&second.vring, &atomic, &second.device, &second.io);
    assert_eq!(held_requests(&second, mem, 9), vec![0, 2, 3, 5, 7, 8]);

    second.shared.lock().unwrap().release = true;
    serve(&second.vring, &atomic, &second.device, &second.io);
    let mut heads = used_heads(mem, &vq);
    assert_eq!(heads.len(), 9, "one completion per request");
    heads.sort_unstable();
    assert_eq!(heads, (0..9).map(|i| 3 * i).collect::<Vec<_>>());
    for i in 0..9 {
        assert_eq!(status(mem, i), VIRTIO_BLK_S_OK as u8, "request {i}");
    }
}

#[test]
fn a_buffer_sent_while_the_ring_runs_takes_over_only_at_the_next_start() {
    let atomic = guest_memory();
    let guard = atomic.memory();
    let mem: &GuestMem = &guard;
    let vq = MockSplitQueue::new(mem, QSIZE);
    let ask = VhostUserInflight::new(0, 0, 1, QSIZE);
    let (msg, file) = inflight::create(&ask, 1, usize::from(QSIZE)).unwrap();
    let peek = || {
        InflightBuffer::open(&msg, &file, 1, usize::from(QSIZE))
            .unwrap()
            .queue(0)
            .unwrap()
    };

    // Started without a buffer, two requests in flight that nothing records.
    let b = start(&atomic, &vq, (&file, &msg), 0);
    b.io.set_inflight(None);
    let mut st = b.io.lock();
    st.inflight = None;
    st.inflight_next = None;
    drop(st);
    add_requests(mem, &vq, &reads(2));
    serve(&b.vring, &atomic, &b.device, &b.io);

    // The buffer arrives now: were it used at once, a crash would have a
    // successor resume at used + 1 with request 0 and 1 forgotten.
    b.io.set_inflight(Some(peek()));
    add_requests_at(mem, &vq, 2, &reads(3)[2..]);
    serve(&b.vring, &atomic, &b.device, &b.io);
    assert_eq!(b.shared.lock().unwrap().pending.len(), 3);
    assert!(
        !peek().is_inflight(6),
        "request 2 recorded under a running ring"
    );

    // At the next start it tracks.
    drop(b);
    let b = start(&atomic, &vq, (&file, &msg), 0);
    serve(&b.vring, &atomic, &b.device, &b.io);
    assert!(peek().is_inflight(0), "tracked from the start on");
}
