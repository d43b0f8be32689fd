//! The failover commit against a guest that holds the cluster it wants: the
//! commit waits for the holder without making other guest requests to that
//! cluster queue behind it.

use super::Secondary;
use crate::block::{
    BlockDev, BlockDevExt, Extent, MemDev, Overlay, Result, SharedDev, DEFAULT_GRANULE,
};
use crate::replication::{no_events, Mode, Replication, Stage, SyncMode};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vm_memory::VolatileSlice;

const SIZE: u64 = 1 << 20;
const CLUSTER: u64 = 64 << 10;
/// A guard against hanging, not a measurement.
const HANG: Duration = Duration::from_secs(20);

#[derive(Default, Clone, Copy)]
struct Hold {
    armed: bool,
    entered: bool,
    released: bool,
}

const READ: usize = 0;
const WRITE: usize = 1;

/// A disk whose next read, or next write, once armed, stops until released.
struct HoldDisk {
    inner: MemDev,
    holds: Mutex<[Hold; 2]>,
    cv: Condvar,
}

impl HoldDisk {
    fn arm(&self, op: usize) {
        self.holds.lock().unwrap()[op] = Hold {
            armed: true,
            ..Hold::default()
        };
    }

    fn maybe_hold(&self, op: usize) {
        let mut h = self.holds.lock().unwrap();
        if !h[op].armed {
            return;
        }
        h[op].armed = false;
        h[op].entered = true;
        self.cv.notify_all();
        while !h[op].released {
            h = self.cv.wait(h).unwrap();
        }
    }

    fn wait_entered(&self, op: usize) {
        let deadline = Instant::now() + HANG;
        let mut h = self.holds.lock().unwrap();
        while !h[op].entered {
            assert!(Instant::now() < deadline, "the held request never started");
            h = self.cv.wait_timeout(h, HANG).unwrap().0;
        }
    }

    fn release(&self, op: usize) {
        self.holds.lock().unwrap()[op].released = true;
        self.cv.notify_all();
    }
}

impl BlockDev for HoldDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_vectored(&self, o: u64, b: &[VolatileSlice<'_>]) -> Result<()> {
        self.maybe_hold(READ);
        self.inner.read_vectored(o, b)
    }
    fn write_vectored(&self, o: u64, b: &[VolatileSlice<'_>]) -> Result<()> {
        self.maybe_hold(WRITE);
        self.inner.write_vectored(o, b)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn discard(&self, o: u64, l: u64) -> Result<()> {
        self.inner.discard(o, l)
    }
    fn write_zeroes(&self, o: u64, l: u64, u: bool) -> Result<()> {
        self.inner.write_zeroes(o, l, u)
    }
    fn block_status(&self, o: u64, l: u64) -> Result<Extent> {
        self.inner.block_status(o, l)
    }
}

/// Runs `f` on a thread and waits for it up to [`HANG`]: `Some` if it ended.
fn finishes<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(HANG).ok()
}

#[test]
fn commit_waiting_for_a_busy_cluster_does_not_hold_up_other_guest_requests_to_it() {
    let disk = Arc::new(HoldDisk {
        inner: MemDev::filled(SIZE, 0x11),
        holds: Mutex::new([Hold::default(); 2]),
        cv: Condvar::new(),
    });
    let overlay =
        || Arc::new(Overlay::with_store(Arc::new(MemDev::new(SIZE)), DEFAULT_GRANULE).unwrap());
    let node = Secondary::new(disk.clone(), overlay(), overlay(), CLUSTER, no_events()).unwrap();
    node.start(Mode::Secondary, SyncMode::None).unwrap();
    let guest: SharedDev = node.guest();
    guest.write_at(0, &[0x33u8; 4096]).unwrap();
    guest.write_at(CLUSTER, &[0x33u8; 4096]).unwrap();
    // The commit stops inside its copy of cluster 0.
    disk.arm(WRITE);
    node.stop(true).unwrap();
    disk.wait_entered(WRITE);
    // A guest read of the disk part of cluster 1 stops inside the disk, holding
    // cluster 1 shared: the commit will not be able to drop cluster 1 yet.
    disk.arm(READ);
    let held_guest = guest.clone();
    let held = std::thread::spawn(move || {
        let mut b = vec![0u8; 4096];
        held_guest.read_at(CLUSTER + 8192, &mut b).unwrap();
        b
    });
    disk.wait_entered(READ);
    disk.release(WRITE);
    // Wait (bounded) until the commit has found cluster 1 busy.
    let deadline = Instant::now() + HANG;
    while node.busy_tries.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the commit never tried cluster 1"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Another guest request to cluster 1 goes through while the commit waits.
    let other = guest.clone();
    let seen = finishes(move || {
        let mut b = vec![0u8; 8192];
        other.read_at(CLUSTER, &mut b).unwrap();
        other.write_at(CLUSTER + 16384, &[0x44u8; 4096]).unwrap();
        b
    })
    .expect("a guest request to the cluster queued behind the waiting commit");
    assert!(seen[..4096].iter().all(|&b| b == 0x33));
    assert!(seen[4096..].iter().all(|&b| b == 0x11));
    assert_eq!(node.stage(), Stage::Failover, "commit ended under a holder");
    assert!(node.active().is_allocated(CLUSTER));
    disk.release(READ);
    assert!(held.join().unwrap().iter().all(|&b| b == 0x11));
    node.wait_commit();
    assert_eq!(node.stage(), Stage::Done);
    let d = disk.inner.snapshot();
    let at = |o: u64, l: u64| &d[o as usize..(o + l) as usize];
    assert!(at(0, 4096).iter().all(|&b| b == 0x33));
    assert!(at(CLUSTER, 4096).iter().all(|&b| b == 0x33));
    assert!(at(CLUSTER + 16384, 4096).iter().all(|&b| b == 0x44));
    assert!(at(4096, CLUSTER - 4096).iter().all(|&b| b == 0x11));
    assert!(at(CLUSTER + 4096, 12288).iter().all(|&b| b == 0x11));
    assert!(at(CLUSTER + 20480, SIZE - CLUSTER - 20480)
        .iter()
        .all(|&b| b == 0x11));
}
