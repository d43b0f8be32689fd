//! The asynchronous path through a queue worker: requests go to the node's
//! channel all at once, complete out of order, fail one by one, and a stopping
//! queue waits for them.

use super::queue_io::QueueIo;
use super::vring::Vring;
use super::worker::serve;
use crate::block::channel::{Engine, IoChannel, IoCompletion};
use crate::block::{BlockDev, BlockDevExt, BlockError, Extent, ExtentKind, RawFile, Result};
use crate::virtio_blk::{Geometry, GuestMem, VirtioBlk};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::{Arc, Mutex};
use vhost_user_backend::VringT;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, VolatileSlice,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub(super) const QSIZE: u16 = 128;
pub(super) const DISK: u64 = 1 << 20;

pub(super) fn guest_memory() -> GuestMemoryAtomic<GuestMem> {
    GuestMemoryAtomic::new(GuestMem::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap())
}

pub(super) fn ready_vring(
    atomic: &GuestMemoryAtomic<GuestMem>,
    vq: &MockSplitQueue<GuestMem>,
) -> Vring {
    let vring = Vring::new(atomic.clone(), QSIZE).unwrap();
    vring.set_queue_size(QSIZE);
    vring
        .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
        .unwrap();
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    vring
}

/// One request of the test: type, sector, data length (or a range list).
#[derive(Clone, Copy)]
pub(super) struct Req {
    pub(super) kind: u32,
    pub(super) sector: u64,
    pub(super) len: u32,
}

pub(super) fn hdr_addr(i: u16) -> u64 {
    0x10_0000 + u64::from(i) * 0x100
}

pub(super) fn data_addr(i: u16) -> u64 {
    0x20_0000 + u64::from(i) * 0x1_0000
}

pub(super) fn status(mem: &GuestMem, i: u16) -> u8 {
    mem.read_obj::<u8>(GuestAddress(hdr_addr(i) + 0x80))
        .unwrap()
}

/// Appends requests as chains header ▸ data ▸ status, request `i` using
/// descriptors `3i..3i+3` and its own header and data areas.
pub(super) fn add_requests(mem: &GuestMem, vq: &MockSplitQueue<GuestMem>, reqs: &[Req]) {
    add_requests_at(mem, vq, 0, reqs);
}

/// [`add_requests`] numbering the requests from `first`.
pub(super) fn add_requests_at(
    mem: &GuestMem,
    vq: &MockSplitQueue<GuestMem>,
    first: u16,
    reqs: &[Req],
) {
    let mut descs = Vec::new();
    for (k, r) in reqs.iter().enumerate() {
        let i = first + k as u16;
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&r.kind.to_le_bytes());
        h[8..].copy_from_slice(&r.sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr_addr(i))).unwrap();
        mem.write_obj(0xeeu8, GuestAddress(hdr_addr(i) + 0x80))
            .unwrap();
        let d = |a, l, f: u32, n| RawDescriptor::from(SplitDescriptor::new(a, l, f as u16, n));
        let data_flags = if r.kind == VIRTIO_BLK_T_IN || r.kind == VIRTIO_BLK_T_FLUSH {
            VRING_DESC_F_WRITE | VRING_DESC_F_NEXT
        } else {
            VRING_DESC_F_NEXT
        };
        descs.push(d(hdr_addr(i), 16, VRING_DESC_F_NEXT, 3 * i + 1));
        // A flush carries a writable payload the device ignores, so that
        // every request is three descriptors long.
        let len = if r.kind == VIRTIO_BLK_T_FLUSH {
            16
        } else {
            r.len
        };
        descs.push(d(data_addr(i), len, data_flags, 3 * i + 2));
        descs.push(d(hdr_addr(i) + 0x80, 1, VRING_DESC_F_WRITE, 0));
    }
    vq.add_desc_chains(&descs, 3 * first).unwrap();
}

/// What the held channel has been given.
#[derive(Default)]
pub(super) struct Held {
    /// (id, read buffers) of operations not yet completed.
    pub(super) pending: Vec<(u64, Vec<(usize, usize)>)>,
    pub(super) most_in_flight: usize,
    pub(super) release: bool,
    /// Operations to complete at the next poll while `release` is false.
    pub(super) release_ids: Vec<u64>,
    /// Complete one operation per poll (a disk that finishes them one by
    /// one), instead of all of them.
    pub(super) one_per_poll: bool,
    /// The channel asks for lone requests to run on the node's synchronous
    /// path, which then takes writes (and counts them) instead of failing.
    pub(super) inline_when_lone: bool,
    /// Operations the channel was given.
    pub(super) channel_ops: usize,
    /// Writes the node's synchronous path took.
    pub(super) sync_writes: usize,
    /// Times the worker asked whether completions are waiting (each turn of
    /// a polling worker asks once).
    pub(super) completion_checks: usize,
}

/// A channel that holds every operation until the test releases it, and
/// records how many it held at once. Reads fill their buffers with 0x5a.
struct HeldChannel {
    shared: Arc<Mutex<Held>>,
    done: Vec<IoCompletion>,
    event: EventFd,
}

impl HeldChannel {
    fn hold(&mut self, id: u64, bufs: Vec<(usize, usize)>) {
        let mut h = self.shared.lock().unwrap();
        h.channel_ops += 1;
        h.pending.push((id, bufs));
        h.most_in_flight = h.most_in_flight.max(h.pending.len());
    }
}

impl IoChannel for HeldChannel {
    unsafe fn add_read(&mut self, id: u64, _offset: u64, iovs: &[libc::iovec]) {
        let bufs = iovs
            .iter()
            .map(|v| (v.iov_base as usize, v.iov_len))
            .collect();
        self.hold(id, bufs);
    }
    unsafe fn add_write(&mut self, id: u64, _offset: u64, _iovs: &[libc::iovec]) {
        self.hold(id, Vec::new());
    }
    fn add_flush(&mut self, id: u64) {
        self.hold(id, Vec::new());
    }
    fn add_discard(&mut self, id: u64, _offset: u64, _len: u64) {
        self.hold(id, Vec::new());
    }
    fn add_write_zeroes(&mut self, id: u64, _offset: u64, _len: u64, _unmap: bool) {
        self.hold(id, Vec::new());
    }
    fn submit(&mut self) {}
    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        let mut h = self.shared.lock().unwrap();
        let chosen = std::mem::take(&mut h.release_ids);
        for id in chosen {
            if let Some(at) = h.pending.iter().position(|(p, _)| *p == id) {
                h.pending.remove(at);
                self.done.push(IoCompletion { id, result: Ok(()) });
            }
        }
        if h.release {
            let keep = if h.one_per_poll {
                h.pending.len().saturating_sub(1)
            } else {
                0
            };
            // Completes in reverse order: the used ring must not care.
            while h.pending.len() > keep {
                let Some((id, bufs)) = h.pending.pop() else {
                    break;
                };
                for (ptr, len) in bufs {
                    // SAFETY: the worker keeps the guest buffers mapped until
                    // this completion is returned.
                    unsafe { std::ptr::write_bytes(ptr as *mut u8, 0x5a, len) };
                }
                self.done.push(IoCompletion { id, result: Ok(()) });
            }
        }
        let n = self.done.len();
        out.append(&mut self.done);
        n
    }
    fn has_completions(&mut self) -> bool {
        let mut h = self.shared.lock().unwrap();
        h.completion_checks += 1;
        (h.release && !h.pending.is_empty()) || !h.release_ids.is_empty()
    }
    fn in_flight(&self) -> usize {
        self.shared.lock().unwrap().pending.len()
    }
    fn notify_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }
    fn inline_when_lone(&self) -> bool {
        self.shared.lock().unwrap().inline_when_lone
    }
}

/// A node whose only I/O path is a [`HeldChannel`] (and, when the channel
/// asks for lone requests inline, a counting synchronous write).
pub(super) struct HeldDisk {
    pub(super) shared: Arc<Mutex<Held>>,
}

impl BlockDev for HeldDisk {
    fn size(&self) -> u64 {
        DISK
    }
    fn read_vectored(&self, _: u64, _: &[VolatileSlice<'_>]) -> Result<()> {
        Err(BlockError::Unsupported("synchronous read"))
    }
    fn write_vectored(&self, _: u64, _: &[VolatileSlice<'_>]) -> Result<()> {
        let mut h = self.shared.lock().unwrap();
        if !h.inline_when_lone {
            return Err(BlockError::Unsupported("synchronous write"));
        }
        h.sync_writes += 1;
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Err(BlockError::Unsupported("synchronous flush"))
    }
    fn discard(&self, _: u64, _: u64) -> Result<()> {
        Err(BlockError::Unsupported("synchronous discard"))
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<()> {
        Err(BlockError::Unsupported("synchronous write-zeroes"))
    }
    fn block_status(&self, _: u64, len: u64) -> Result<Extent> {
        Ok(Extent {
            len,
            kind: ExtentKind::Data,
        })
    }
    fn open_channel(&self, _depth: u32) -> Option<std::io::Result<Box<dyn IoChannel>>> {
        Some(Ok(Box::new(HeldChannel {
            shared: self.shared.clone(),
            done: Vec::new(),
            event: EventFd::new(EFD_NONBLOCK).unwrap(),
        })))
    }
}

/// A device on a [`HeldDisk`] (one queue of [`QSIZE`]), and what its channel
/// holds.
pub(super) fn held_device() -> (Arc<Mutex<Held>>, Arc<VirtioBlk>) {
    let shared = Arc::new(Mutex::new(Held::default()));
    let node = Arc::new(HeldDisk {
        shared: shared.clone(),
    });
    let device = Arc::new(VirtioBlk::new(
        node,
        Geometry::new(DISK, 512, QSIZE, 1, false),
        "",
    ));
    (shared, device)
}

pub(super) fn reads(n: u16) -> Vec<Req> {
    (0..n)
        .map(|i| Req {
            kind: VIRTIO_BLK_T_IN,
            sector: u64::from(i) * 8,
            len: 4096,
        })
        .collect()
}

pub(super) fn used_idx(mem: &GuestMem, vq: &MockSplitQueue<GuestMem>) -> u16 {
    mem.read_obj::<u16>(vq.used_addr().unchecked_add(2))
        .unwrap()
}

#[test]
fn the_guests_queue_depth_reaches_the_node() {
    let (shared, device) = held_device();
    let io = QueueIo::new(device.clone(), 0, QSIZE, 0).unwrap();
    assert!(io.channel_name().is_some());
    let atomic = guest_memory();
    let guard = atomic.memory();
    let mem: &GuestMem = &guard;
    let vq = MockSplitQueue::new(mem, QSIZE);
    let vring = ready_vring(&atomic, &vq);

    add_requests(mem, &vq, &reads(32));
    serve(&vring, &atomic, &device, &io);
    assert_eq!(shared.lock().unwrap().most_in_flight, 32, "all 32 at once");
    assert_eq!(used_idx(mem, &vq), 0, "none completed yet");

    shared.lock().unwrap().release = true;
    serve(&vring, &atomic, &device, &io);
    assert_eq!(used_idx(mem, &vq), 32);
    for i in 0..32 {
        assert_eq!(status(mem, i), VIRTIO_BLK_S_OK as u8);
        let mut data = [0u8; 4096];
        mem.read_slice(&mut data, GuestAddress(data_addr(i)))
            .unwrap();
        assert!(data.iter().all(|&b| b == 0x5a), "request {i} filled");
    }
}

#[test]
fn a_stopping_queue_waits_for_requests_in_flight_on_the_channel() {
    let (shared, device) = held_device();
    let io = Arc::new(QueueIo::new(device.clone(), 0, QSIZE, 0).unwrap());
    let atomic = guest_memory();
    let guard = atomic.memory();
    let mem: &GuestMem = &guard;
    let vq = MockSplitQueue::new(mem, QSIZE);
    let vring = ready_vring(&atomic, &vq);
    add_requests(mem, &vq, &reads(4));
    serve(&vring, &atomic, &device, &io);

    // GET_VRING_BASE: the queue is stopped, then the backend waits.
    vring.set_queue_ready(false);
    let (tx, stopped) = std::sync::mpsc::channel();
    let waiter = {
        let io = io.clone();
        std::thread::spawn(move || {
            io.wait_idle();
            tx.send(()).unwrap();
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(
        stopped.try_recv().is_err(),
        "returned with 4 requests running"
    );
    shared.lock().unwrap().release = true;
    // The worker still retires completions on a stopped queue.
    serve(&vring, &atomic, &device, &io);
    waiter.join().unwrap();
    stopped.try_recv().unwrap();
    assert_eq!(used_idx(mem, &vq), 4, "every request is in the used ring");
}

/// Serves until `n` requests are in the used ring, waiting on the queue's
/// completion eventfds in between (bounded: 500 waits of at most 10 s).
fn serve_until(
    vring: &Vring,
    atomic: &GuestMemoryAtomic<GuestMem>,
    device: &VirtioBlk,
    io: &QueueIo,
    vq: &MockSplitQueue<GuestMem>,
    n: u16,
) {
    let guard = atomic.memory();
    let mem: &GuestMem = &guard;
    serve(vring, atomic, device, io);
    for _ in 0..500 {
        if used_idx(mem, vq) >= n {
            return;
        }
        let mut fds: Vec<libc::pollfd> = io
            .notify_fds()
            .into_iter()
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: a valid array of pollfds for the duration of the call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 10_000) };
        serve(vring, atomic, device, io);
    }
    panic!("requests did not complete: used {}", used_idx(mem, vq));
}

/// A device on `file` driven through io_uring.
fn uring_device(file: std::fs::File, read_only: bool) -> (Arc<VirtioBlk>, Arc<RawFile>) {
    let raw = Arc::new(
        RawFile::from_file(file, read_only)
            .unwrap()
            .with_engine(Engine::Uring),
    );
    let device = Arc::new(VirtioBlk::new(
        raw.clone(),
        Geometry::new(raw.size(), 512, QSIZE, 1, read_only),
        "",
    ));
    (device, raw)
}

#[test]
fn an_io_uring_error_fails_only_its_request() {
    // The node believes it is writable, but its descriptor is read-only: the
    // kernel fails the write in its completion (EBADF).
    let tmp = tempfile::NamedTempFile::new().unwrap();
    tmp.as_file().set_len(DISK).unwrap();
    let ro = std::fs::File::open(tmp.path()).unwrap();
    let (device, _) = uring_device(ro, false);
    let io = QueueIo::new(device.clone(), 0, QSIZE, 0).unwrap();
    assert!(io.channel_name().is_some());
    let atomic = guest_memory();
    let guard = atomic.memory();
    let mem: &GuestMem = &guard;
    let vq = MockSplitQueue::new(mem, QSIZE);
    let vring = ready_vring(&atomic, &vq);
    let mut reqs = reads(3);
    reqs[1].kind = VIRTIO_BLK_T_OUT;
    add_requests(mem, &vq, &reqs);
    serve_until(&vring, &atomic, &device, &io, &vq, 3);
    assert_eq!(status(mem, 0), VIRTIO_BLK_S_OK as u8);
    assert_eq!(status(mem, 1), VIRTIO_BLK_S_IOERR as u8, "the write failed");
    assert_eq!(status(mem, 2), VIRTIO_BLK_S_OK as u8);
}

#[test]
fn a_short_read_at_a_shrunk_end_is_finished_with_zeroes() {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), vec![0xab; DISK as usize]).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(tmp.path())
        .unwrap();
    let (device, _) = uring_device(file, false);
    // Shrunk underneath the node: the kernel returns 2048 bytes of the last
    // 4096, then end of file.
    tmp.as_file().set_len(DISK - 2048).unwrap();
    let io = QueueIo::new(device.clone(), 0, QSIZE, 0).unwrap();
    let atomic = guest_memory();
    let guard = atomic.memory();
    let mem: &GuestMem = &guard;
    let vq = MockSplitQueue::new(mem, QSIZE);
    let vring = ready_vring(&atomic, &vq);
    mem.write_slice(&[0x11; 4096], GuestAddress(data_addr(0)))
        .unwrap();
    add_requests(
        mem,
        &vq,
        &[Req {
            kind: VIRTIO_BLK_T_IN,
            sector: (DISK - 4096) / 512,
            len: 4096,
        }],
    );
    serve_until(&vring, &atomic, &device, &io, &vq, 1);
    assert_eq!(status(mem, 0), VIRTIO_BLK_S_OK as u8);
    let mut data = [0u8; 4096];
    mem.read_slice(&mut data, GuestAddress(data_addr(0)))
        .unwrap();
    assert!(
        data[..2048].iter().all(|&b| b == 0xab),
        "bytes the file has"
    );
    assert!(
        data[2048..].iter().all(|&b| b == 0),
        "the rest reads as zeroes"
    );
}

#[test]
fn writes_flushes_discards_and_zeroes_land_through_io_uring() {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), vec![0xcd; DISK as usize]).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(tmp.path())
        .unwrap();
    let (device, raw) = uring_device(file, false);
    let io = QueueIo::new(device.clone(), 0, QSIZE, 0).unwrap();
    let atomic = guest_memory();
    let guard = atomic.memory();
    let mem: &GuestMem = &guard;
    let vq = MockSplitQueue::new(mem, QSIZE);
    let vring = ready_vring(&atomic, &vq);

    // Request 0 writes 64 KiB of 0x77 at 0; 1 flushes; 2 discards 8 KiB at
    // 128 KiB; 3 zeroes 4 KiB at 256 KiB.
    mem.write_slice(&[0x77; 65536], GuestAddress(data_addr(0)))
        .unwrap();
    let seg = |sector: u64, sectors: u32| {
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s
    };
    mem.write_slice(&seg(256, 16), GuestAddress(data_addr(2)))
        .unwrap();
    mem.write_slice(&seg(512, 8), GuestAddress(data_addr(3)))
        .unwrap();
    let reqs = [
        Req {
            kind: VIRTIO_BLK_T_OUT,
            sector: 0,
            len: 65536,
        },
        Req {
            kind: VIRTIO_BLK_T_FLUSH,
            sector: 0,
            len: 0,
        },
        Req {
            kind: VIRTIO_BLK_T_DISCARD,
            sector: 0,
            len: 16,
        },
        Req {
            kind: VIRTIO_BLK_T_WRITE_ZEROES,
            sector: 0,
            len: 16,
        },
    ];
    add_requests(mem, &vq, &reqs);
    serve_until(&vring, &atomic, &device, &io, &vq, 4);
    for i in 0..4 {
        assert_eq!(status(mem, i), VIRTIO_BLK_S_OK as u8, "request {i}");
    }
    let mut back = vec![0u8; 65536];
    raw.read_at(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0x77), "write on disk");
    let mut z = vec![1u8; 8192];
    raw.read_at(128 << 10, &mut z).unwrap();
    assert!(z.iter().all(|&b| b == 0), "discarded range reads zeroes");
    raw.read_at(256 << 10, &mut z[..4096]).unwrap();
    assert!(
        z[..4096].iter().all(|&b| b == 0),
        "zeroed range reads zeroes"
    );
    raw.read_at((256 << 10) + 4096, &mut z[..4096]).unwrap();
    assert!(z[..4096].iter().all(|&b| b == 0xcd), "next to it untouched");
}

#[test]
fn a_pass_with_work_every_turn_ends_and_kicks_its_ring() {
    let (shared, device) = held_device();
    let io = QueueIo::new(device.clone(), 0, QSIZE, 0).unwrap();
    let atomic = guest_memory();
    let guard = atomic.memory();
    let mem: &GuestMem = &guard;
    let vq = MockSplitQueue::new(mem, QSIZE);
    let vring = ready_vring(&atomic, &vq);
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    // SAFETY: dup returns a new fd that the File then owns exclusively.
    let dup = unsafe { std::fs::File::from_raw_fd(libc::dup(kick.as_raw_fd())) };
    vring.set_kick(Some(dup));
    assert_eq!(kick.read().unwrap(), 1, "the start's own kick");

    // 40 reads in flight, then a disk that finishes one per poll: every turn
    // of the pass has work, for longer than a pass may run (as under a guest
    // that never lets the queue run dry).
    add_requests(mem, &vq, &reads(40));
    serve(&vring, &atomic, &device, &io);
    assert_eq!(kick.read().ok(), None, "the pass ran dry and went to sleep");
    {
        let mut h = shared.lock().unwrap();
        h.release = true;
        h.one_per_poll = true;
    }
    serve(&vring, &atomic, &device, &io);
    let done = used_idx(mem, &vq);
    assert!(done < 40, "one pass reaped all {done} one by one");
    assert!(done > 0);
    assert_eq!(kick.read().unwrap(), 1, "the pass kicked its ring to go on");
    // The passes that follow finish the rest.
    for _ in 0..40 {
        if used_idx(mem, &vq) == 40 {
            break;
        }
        serve(&vring, &atomic, &device, &io);
    }
    assert_eq!(used_idx(mem, &vq), 40);
}

#[test]
fn a_write_alone_on_its_queue_runs_on_the_worker_once_the_queue_is_at_depth_one() {
    use crate::virtio_blk::LONE_STREAK;

    let (shared, device) = held_device();
    {
        let mut h = shared.lock().unwrap();
        h.inline_when_lone = true;
        h.release = true;
    }
    let io = QueueIo::new(device.clone(), 0, QSIZE, 0).unwrap();
    let atomic = guest_memory();
    let guard = atomic.memory();
    let mem: &GuestMem = &guard;
    let vq = MockSplitQueue::new(mem, QSIZE);
    let vring = ready_vring(&atomic, &vq);
    let write = |i: u16| Req {
        kind: VIRTIO_BLK_T_OUT,
        sector: u64::from(i) * 8,
        len: 4096,
    };

    // A guest at depth one: each write waits for the last to complete.
    let streak = LONE_STREAK as u16;
    for i in 0..=streak {
        add_requests_at(mem, &vq, i, &[write(i)]);
        serve(&vring, &atomic, &device, &io);
        assert_eq!(used_idx(mem, &vq), i + 1, "write {i} completed");
        assert_eq!(status(mem, i), VIRTIO_BLK_S_OK as u8);
    }
    {
        let h = shared.lock().unwrap();
        assert_eq!(
            h.channel_ops, LONE_STREAK as usize,
            "the streak on the channel"
        );
        assert_eq!(
            h.sync_writes, 1,
            "then the next one alone ran on the worker"
        );
    }

    // Two at once: neither waits for the other on the worker.
    let next = streak + 1;
    add_requests_at(mem, &vq, next, &[write(next), write(next + 1)]);
    serve(&vring, &atomic, &device, &io);
    assert_eq!(used_idx(mem, &vq), next + 2);
    let h = shared.lock().unwrap();
    assert_eq!(h.channel_ops, LONE_STREAK as usize + 2);
    assert_eq!(h.sync_writes, 1);
    assert_eq!(h.most_in_flight, 2, "both on the channel at once");
}

#[test]
fn a_polling_worker_polls_for_the_guest_and_sleeps_while_the_disk_works() {
    // A window far longer than a pass: whether serve() polled shows in how
    // often it looked for completions, and in how long it took.
    const WINDOW: std::time::Duration = std::time::Duration::from_millis(100);
    let (shared, device) = held_device();
    let io = QueueIo::new(device.clone(), 0, QSIZE, WINDOW.as_micros() as u32).unwrap();
    io.lock().poller.open_fully();
    let atomic = guest_memory();
    let guard = atomic.memory();
    let mem: &GuestMem = &guard;
    let vq = MockSplitQueue::new(mem, QSIZE);
    let vring = ready_vring(&atomic, &vq);

    // Four reads in flight on the disk: the pass submits them and ends, no
    // polling (a completion wakes the worker anyway).
    add_requests(mem, &vq, &reads(4));
    serve(&vring, &atomic, &device, &io);
    let checks = std::mem::take(&mut shared.lock().unwrap().completion_checks);
    assert!(checks <= 2, "looked {checks} times: it polled the disk");

    // They complete: with nothing in flight, the next event can only be the
    // guest's, and the worker polls for it for the whole window.
    shared.lock().unwrap().release = true;
    let start = std::time::Instant::now();
    serve(&vring, &atomic, &device, &io);
    assert_eq!(used_idx(mem, &vq), 4);
    assert!(start.elapsed() >= WINDOW, "gave up before the window ended");
    let checks = shared.lock().unwrap().completion_checks;
    assert!(checks > 2, "looked only {checks} times while polling");
}
