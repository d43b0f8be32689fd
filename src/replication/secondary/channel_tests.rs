//! The secondary guest's channel: the guest's queue depth reaches the disk,
//! and the holds it keeps across a request in flight still keep out
//! copy-before-write and the checkpoint's quiescing.

use super::channel::SecondaryChannel;
use super::Secondary;
use crate::block::channel::{iov_slices, IoChannel, IoCompletion, Kind};
use crate::block::{BlockDev, BlockDevExt, MemDev, Overlay, SharedDev, DEFAULT_GRANULE};
use crate::replication::{no_events, Mode, Replication, Stage, SyncMode};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const SIZE: u64 = 1 << 20;
const CLUSTER: u64 = 64 << 10;
/// A guard against hanging, not a measurement.
const HANG: Duration = Duration::from_secs(20);
/// Long enough for a thread that is not blocked to have finished.
const SETTLE: Duration = Duration::from_millis(100);

/// What the fake disk channel holds back until the test lets it go.
struct Held {
    open: bool,
    ops: Vec<(u64, Kind, u64, u64, Vec<libc::iovec>)>,
}

// SAFETY: the iovecs point into buffers the tests keep alive until completion.
unsafe impl Send for Held {}

/// A disk channel that runs its operations on a memory disk only once the
/// test opens it, so requests stay in flight as long as a test needs.
struct GatedChannel {
    dev: Arc<MemDev>,
    held: Arc<Mutex<Held>>,
    done: Vec<IoCompletion>,
    event: EventFd,
}

impl GatedChannel {
    fn run_released(&mut self) {
        let mut held = self.held.lock().unwrap();
        if !held.open {
            return;
        }
        for (id, kind, offset, len, iovs) in held.ops.drain(..) {
            // SAFETY: the test keeps the buffers alive until the completion.
            let bufs = unsafe { iov_slices(&iovs) };
            let result = match kind {
                Kind::Read => self.dev.read_vectored(offset, &bufs),
                Kind::Write => self.dev.write_vectored(offset, &bufs),
                Kind::Flush => self.dev.flush(),
                Kind::Discard => self.dev.discard(offset, len),
                Kind::Zeroes { unmap } => self.dev.write_zeroes(offset, len, unmap),
            };
            self.done.push(IoCompletion { id, result });
        }
    }

    fn hold(&mut self, id: u64, kind: Kind, offset: u64, len: u64, iovs: &[libc::iovec]) {
        let mut held = self.held.lock().unwrap();
        held.ops.push((id, kind, offset, len, iovs.to_vec()));
    }
}

impl IoChannel for GatedChannel {
    unsafe fn add_read(&mut self, id: u64, offset: u64, iovs: &[libc::iovec]) {
        let len = iovs.iter().map(|v| v.iov_len as u64).sum();
        self.hold(id, Kind::Read, offset, len, iovs);
    }
    unsafe fn add_write(&mut self, id: u64, offset: u64, iovs: &[libc::iovec]) {
        let len = iovs.iter().map(|v| v.iov_len as u64).sum();
        self.hold(id, Kind::Write, offset, len, iovs);
    }
    fn add_flush(&mut self, id: u64) {
        self.hold(id, Kind::Flush, 0, 0, &[]);
    }
    fn add_discard(&mut self, id: u64, offset: u64, len: u64) {
        self.hold(id, Kind::Discard, offset, len, &[]);
    }
    fn add_write_zeroes(&mut self, id: u64, offset: u64, len: u64, unmap: bool) {
        self.hold(id, Kind::Zeroes { unmap }, offset, len, &[]);
    }
    fn submit(&mut self) {}
    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize {
        let _ = self.event.read();
        self.run_released();
        let n = self.done.len();
        out.append(&mut self.done);
        n
    }
    fn has_completions(&mut self) -> bool {
        !self.done.is_empty() || self.held.lock().unwrap().open
    }
    fn in_flight(&self) -> usize {
        self.held.lock().unwrap().ops.len() + self.done.len()
    }
    fn notify_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }
}

/// A running secondary over a disk of 0x11, its guest channel, and the
/// handle that holds the channel's disk requests back.
struct Setup {
    node: Arc<Secondary>,
    ch: SecondaryChannel,
    held: Arc<Mutex<Held>>,
    disk: Arc<MemDev>,
}

fn setup() -> Setup {
    let disk = Arc::new(MemDev::filled(SIZE, 0x11));
    let overlay =
        || Arc::new(Overlay::with_store(Arc::new(MemDev::new(SIZE)), DEFAULT_GRANULE).unwrap());
    let node = Secondary::new(disk.clone(), overlay(), overlay(), CLUSTER, no_events()).unwrap();
    node.start(Mode::Secondary, SyncMode::None).unwrap();
    let held = Arc::new(Mutex::new(Held {
        open: false,
        ops: Vec::new(),
    }));
    let fake = GatedChannel {
        dev: disk.clone(),
        held: held.clone(),
        done: Vec::new(),
        event: EventFd::new(EFD_NONBLOCK).unwrap(),
    };
    let ch = SecondaryChannel::new(node.clone(), Box::new(fake)).unwrap();
    Setup {
        node,
        ch,
        held,
        disk,
    }
}

impl Setup {
    fn held_on_disk(&self) -> usize {
        self.held.lock().unwrap().ops.len()
    }

    fn open_disk(&self) {
        self.held.lock().unwrap().open = true;
    }

    /// Reads `buf.len()` bytes at `offset` through the channel as request `id`.
    fn read(&mut self, id: u64, offset: u64, buf: &mut [u8]) {
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: every test keeps `buf` alive and untouched until it has
        // polled this request's completion.
        unsafe { self.ch.add_read(id, offset, &[iov]) };
        self.ch.submit();
    }

    fn poll(&mut self) -> Vec<IoCompletion> {
        let mut out = Vec::new();
        self.ch.poll(&mut out);
        out
    }
}

/// Runs `f` on a thread; the receiver gets its result when it ends.
fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> mpsc::Receiver<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

#[test]
fn the_guest_queue_depth_reaches_the_disk_through_clean_overlays() {
    let mut t = setup();
    let mut bufs = vec![vec![0u8; 4096]; 32];
    for (i, b) in bufs.iter_mut().enumerate() {
        t.read(i as u64, i as u64 * 8192, b);
    }
    assert_eq!(
        t.held_on_disk(),
        32,
        "every read is in flight on the disk at once"
    );
    assert_eq!(t.ch.in_flight(), 32);
    t.open_disk();
    let done = t.poll();
    assert_eq!(done.len(), 32);
    assert!(done.iter().all(|c| c.result.is_ok()));
    assert!(bufs.iter().all(|b| b.iter().all(|&x| x == 0x11)));
    assert_eq!(t.ch.in_flight(), 0);
}

#[test]
fn a_read_of_a_cluster_in_hidden_is_served_from_hidden_not_the_disk() {
    let mut t = setup();
    // The primary overwrites cluster 0: its old contents go to hidden first.
    t.node.primary().write_at(0, &[0x22u8; 4096]).unwrap();
    let mut buf = vec![0u8; 8192];
    t.read(7, 0, &mut buf);
    assert_eq!(t.held_on_disk(), 0, "served from the overlays, inline");
    let done = t.poll();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].id, 7);
    assert!(buf.iter().all(|&x| x == 0x11), "the checkpoint's bytes");
    assert!(t.disk.snapshot()[..4096].iter().all(|&x| x == 0x22));
}

#[test]
fn copy_before_write_waits_for_a_disk_read_in_flight_on_its_cluster() {
    let mut t = setup();
    let mut buf = vec![0u8; 4096];
    t.read(1, CLUSTER + 4096, &mut buf);
    assert_eq!(t.held_on_disk(), 1);
    let primary: SharedDev = t.node.primary();
    let write = spawn(move || primary.write_at(CLUSTER, &[0x22u8; 8192]));
    std::thread::sleep(SETTLE);
    assert!(
        write.try_recv().is_err(),
        "the primary's write landed under a guest read in flight"
    );
    t.open_disk();
    let done = t.poll();
    assert_eq!((done.len(), done[0].id), (1, 1));
    assert!(buf.iter().all(|&x| x == 0x11), "the read saw the old bytes");
    write.recv_timeout(HANG).unwrap().unwrap();
    // From now on cluster 1 reads from hidden.
    let mut again = vec![0u8; 8192];
    t.read(2, CLUSTER, &mut again);
    assert_eq!(t.poll().len(), 1);
    assert!(again.iter().all(|&x| x == 0x11));
}

#[test]
fn a_checkpoint_waits_for_requests_in_flight() {
    let mut t = setup();
    let mut buf = vec![0u8; 4096];
    t.read(1, 0, &mut buf);
    let node = t.node.clone();
    let checkpoint = spawn(move || node.checkpoint());
    std::thread::sleep(SETTLE);
    assert!(
        checkpoint.try_recv().is_err(),
        "the checkpoint quiesced over a request in flight"
    );
    t.open_disk();
    assert_eq!(t.poll().len(), 1);
    checkpoint.recv_timeout(HANG).unwrap().unwrap();
}

#[test]
fn a_request_waits_while_the_gate_is_closed_and_starts_when_it_reopens() {
    let mut t = setup();
    t.open_disk();
    let node = t.node.clone();
    let closed = node.gate.close();
    let mut buf = vec![0u8; 4096];
    t.read(1, 0, &mut buf);
    assert!(t.poll().is_empty(), "started while the gate was closed");
    assert_eq!(t.ch.in_flight(), 1);
    drop(closed);
    assert!(t.ch.has_completions(), "the reopening rang the worker");
    let mut done = t.poll();
    if done.is_empty() {
        // Started by this poll's retry; completes on the next one.
        done = t.poll();
    }
    assert_eq!(done.len(), 1);
    assert!(buf.iter().all(|&x| x == 0x11));
}

#[test]
fn after_failover_every_request_goes_straight_to_the_disk() {
    let mut t = setup();
    t.node.stop(true).unwrap();
    t.node.wait_commit();
    assert_eq!(t.node.stage(), Stage::Done);
    let mut buf = vec![0u8; 4096];
    t.read(1, 0, &mut buf);
    let data = [0x33u8; 4096];
    let iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: `data` outlives the request, polled below.
    unsafe { t.ch.add_write(2, 8192, &[iov]) };
    t.ch.add_flush(3);
    t.ch.submit();
    assert_eq!(t.held_on_disk(), 3);
    t.open_disk();
    assert_eq!(t.poll().len(), 3);
    assert!(t.disk.snapshot()[8192..12288].iter().all(|&x| x == 0x33));
}
