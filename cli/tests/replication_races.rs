//! The two races DESIGN.md §1 says to design out, each forced deterministically
//! by holding one request of the secondary disk at a known point:
//! * a guest read that decided to read the secondary disk must not see a primary
//!   write (and its copy-before-write) that starts after it;
//! * a guest write racing the failover commit of its cluster must not be lost;
//!   and the commit's copy of a cluster must not hold up guest requests to it.
//!
//! Correct code gives the asserted result whatever the timing; the short waits
//! only give broken code the chance to show itself.

use colo_blk::block::{
    BlockDev, BlockDevExt, Extent, MemDev, Overlay, Result, SharedDev, DEFAULT_GRANULE,
};
use colo_blk::replication::{no_events, Mode, Replication, Secondary, Stage, SyncMode};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use vm_memory::VolatileSlice;

const SIZE: u64 = 4 << 20;
const CLUSTER: u64 = 64 << 10;
/// How long a request that must go through may take before the test calls
/// it stuck (a guard against hanging, not a measurement).
const HANG_MS: u64 = 20_000;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

#[derive(Default)]
struct HoldState {
    armed: Option<Op>,
    entered: bool,
    released: bool,
}

/// Wraps a disk; when armed, the next request of one kind stops until released.
struct HoldOne {
    inner: Arc<MemDev>,
    state: Mutex<HoldState>,
    cv: Condvar,
}

impl HoldOne {
    fn new(inner: Arc<MemDev>) -> Arc<Self> {
        Arc::new(HoldOne {
            inner,
            state: Mutex::new(HoldState::default()),
            cv: Condvar::new(),
        })
    }

    fn arm(&self, op: Op) {
        *self.state.lock().unwrap() = HoldState {
            armed: Some(op),
            ..Default::default()
        };
    }

    fn maybe_hold(&self, op: Op) {
        let mut s = self.state.lock().unwrap();
        if s.armed != Some(op) {
            return;
        }
        s.armed = None;
        s.entered = true;
        self.cv.notify_all();
        while !s.released {
            s = self.cv.wait(s).unwrap();
        }
    }

    fn wait_entered(&self) {
        let mut s = self.state.lock().unwrap();
        while !s.entered {
            s = self.cv.wait(s).unwrap();
        }
    }

    fn release(&self) {
        self.state.lock().unwrap().released = true;
        self.cv.notify_all();
    }
}

impl BlockDev for HoldOne {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_vectored(&self, o: u64, b: &[VolatileSlice<'_>]) -> Result<()> {
        self.maybe_hold(Op::Read);
        self.inner.read_vectored(o, b)
    }
    fn write_vectored(&self, o: u64, b: &[VolatileSlice<'_>]) -> Result<()> {
        self.maybe_hold(Op::Write);
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

struct Setup {
    mem: Arc<MemDev>,
    hold: Arc<HoldOne>,
    node: Arc<Secondary>,
    guest: SharedDev,
    primary: SharedDev,
}

fn setup() -> Setup {
    let mem = Arc::new(MemDev::filled(SIZE, 0x11));
    let hold = HoldOne::new(mem.clone());
    let overlay =
        || Arc::new(Overlay::with_store(Arc::new(MemDev::new(SIZE)), DEFAULT_GRANULE).unwrap());
    let node = Secondary::new(hold.clone(), overlay(), overlay(), CLUSTER, no_events()).unwrap();
    node.start(Mode::Secondary, SyncMode::None).unwrap();
    Setup {
        mem,
        hold,
        guest: node.guest(),
        primary: node.primary(),
        node,
    }
}

/// Runs `f` on a thread; returns whether it finished within `ms`, and its handle.
fn spawn_and_wait<T: Send + 'static>(
    ms: u64,
    f: impl FnOnce() -> T + Send + 'static,
) -> (bool, std::thread::JoinHandle<T>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let r = f();
        let _ = tx.send(());
        r
    });
    let finished = rx.recv_timeout(Duration::from_millis(ms)).is_ok();
    (finished, h)
}

#[test]
fn guest_read_of_the_disk_never_sees_a_primary_write_that_started_after_it() {
    let s = setup();
    s.hold.arm(Op::Read);
    // The guest read finds nothing in active or hidden and goes to the disk,
    // where it stops.
    let guest = s.guest.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 8192];
        guest.read_at(CLUSTER + 4096, &mut buf).unwrap();
        buf
    });
    s.hold.wait_entered();
    // The primary now overwrites that cluster (copy-before-write, then the write).
    let primary = s.primary.clone();
    let (finished, writer) = spawn_and_wait(200, move || {
        primary
            .write_at(CLUSTER, &vec![0x22u8; CLUSTER as usize])
            .unwrap()
    });
    assert!(
        !finished,
        "the primary write to a cluster a guest is reading did not wait"
    );
    s.hold.release();
    let seen = reader.join().unwrap();
    writer.join().unwrap();
    assert!(
        seen.iter().all(|&b| b == 0x11),
        "guest read saw the primary's write"
    );
    // And the guest keeps seeing the old data until the next checkpoint.
    let mut again = vec![0u8; 8192];
    s.guest.read_at(CLUSTER + 4096, &mut again).unwrap();
    assert!(again.iter().all(|&b| b == 0x11));
    s.node.checkpoint().unwrap();
    s.guest.read_at(CLUSTER + 4096, &mut again).unwrap();
    assert!(again.iter().all(|&b| b == 0x22));
}

#[test]
fn guest_write_racing_the_commit_of_its_cluster_is_not_lost() {
    let s = setup();
    // Dirty three clusters in active: the commit will move them in order.
    s.guest
        .write_at(0, &vec![0x33u8; 3 * CLUSTER as usize])
        .unwrap();
    // Stop the commit inside its first write to the disk (cluster 0).
    s.hold.arm(Op::Write);
    s.node.stop(true).unwrap();
    s.hold.wait_entered();
    assert_eq!(s.node.stage(), Stage::Failover);
    // The guest rewrites part of the cluster being committed, and of a later
    // one. The commit copies holding nothing, so the writes go through at
    // once (into active); the commit sees cluster 0 rewritten and copies it
    // again.
    let guest = s.guest.clone();
    let (finished, writer) = spawn_and_wait(HANG_MS, move || {
        guest.write_at(4096, &[0x44u8; 4096]).unwrap();
        guest.write_at(2 * CLUSTER + 512, &[0x55u8; 1024]).unwrap();
    });
    assert!(
        finished,
        "a guest write to the cluster being copied waited for the copy"
    );
    s.hold.release();
    writer.join().unwrap();
    s.node.wait_commit();
    assert_eq!(s.node.stage(), Stage::Done);
    let disk = s.mem.snapshot();
    let at = |o: u64, l: u64| &disk[o as usize..(o + l) as usize];
    assert!(at(0, 4096).iter().all(|&b| b == 0x33));
    assert!(
        at(4096, 4096).iter().all(|&b| b == 0x44),
        "guest write lost"
    );
    assert!(at(8192, 2 * CLUSTER + 512 - 8192)
        .iter()
        .all(|&b| b == 0x33));
    assert!(
        at(2 * CLUSTER + 512, 1024).iter().all(|&b| b == 0x55),
        "guest write lost"
    );
    assert!(at(2 * CLUSTER + 1536, CLUSTER - 1536)
        .iter()
        .all(|&b| b == 0x33));
    assert!(at(3 * CLUSTER, SIZE - 3 * CLUSTER)
        .iter()
        .all(|&b| b == 0x11));
}

#[test]
fn guest_writes_during_failover_to_clean_clusters_go_to_the_disk() {
    let s = setup();
    s.guest
        .write_at(0, &vec![0x33u8; CLUSTER as usize])
        .unwrap();
    s.hold.arm(Op::Write);
    s.node.stop(true).unwrap();
    s.hold.wait_entered();
    // A clean cluster far from the one being committed: no waiting, straight to
    // the disk, nothing allocated in active.
    s.guest.write_at(SIZE - CLUSTER, &[0x66u8; 4096]).unwrap();
    assert!(!s.node.active().is_allocated(SIZE - CLUSTER));
    s.hold.release();
    s.node.wait_commit();
    let disk = s.mem.snapshot();
    assert!(
        disk[(SIZE - CLUSTER) as usize..(SIZE - CLUSTER + 4096) as usize]
            .iter()
            .all(|&b| b == 0x66)
    );
}

#[test]
fn guest_requests_to_the_cluster_being_copied_are_served_during_the_copy() {
    let s = setup();
    // Cluster 1: the primary overwrote it after the checkpoint (hidden holds
    // the old 0x11); cluster 0: the guest wrote it (active).
    s.primary
        .write_at(CLUSTER, &vec![0x22u8; CLUSTER as usize])
        .unwrap();
    s.guest
        .write_at(0, &vec![0x33u8; CLUSTER as usize])
        .unwrap();
    // Stop the commit inside its copy of cluster 0 to the disk.
    s.hold.arm(Op::Write);
    s.node.stop(true).unwrap();
    s.hold.wait_entered();
    let guest = s.guest.clone();
    let (finished, requests) = spawn_and_wait(HANG_MS, move || {
        let mut seen = vec![0u8; CLUSTER as usize];
        guest.read_at(0, &mut seen).unwrap();
        guest.write_at(8192, &[0x44u8; 4096]).unwrap();
        let mut again = vec![0u8; 4096];
        guest.read_at(8192, &mut again).unwrap();
        let mut old = vec![0u8; 4096];
        guest.read_at(CLUSTER, &mut old).unwrap();
        (seen, again, old)
    });
    assert!(
        finished,
        "guest requests to the cluster being copied waited for the copy"
    );
    let (seen, again, old) = requests.join().unwrap();
    assert!(seen.iter().all(|&b| b == 0x33), "guest read of active");
    assert!(again.iter().all(|&b| b == 0x44), "guest read its own write");
    assert!(
        old.iter().all(|&b| b == 0x11),
        "guest saw the primary's write"
    );
    s.hold.release();
    s.node.wait_commit();
    assert_eq!(s.node.stage(), Stage::Done);
    let disk = s.mem.snapshot();
    let at = |o: u64, l: u64| &disk[o as usize..(o + l) as usize];
    assert!(at(0, 8192).iter().all(|&b| b == 0x33));
    assert!(
        at(8192, 4096).iter().all(|&b| b == 0x44),
        "guest write during the copy lost"
    );
    assert!(at(12288, CLUSTER - 12288).iter().all(|&b| b == 0x33));
    assert!(
        at(CLUSTER, CLUSTER).iter().all(|&b| b == 0x11),
        "primary write after the checkpoint not rolled back"
    );
}
