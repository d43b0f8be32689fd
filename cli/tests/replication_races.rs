//! The two races the secondary must design out (ARCHITECTURE.md, the secondary's
//! invariants), each forced deterministically
//! by holding one request of the secondary disk at a known point:
//! * a guest read that decided to read the secondary disk must not see a primary
//!   write (and its copy-before-write) that starts after it;
//! * a guest write racing the failover commit of its cluster must not be lost;
//!   and the commit's copy of a cluster must not hold up guest requests to it.
//!
//! Correct code gives the asserted result whatever the timing; the short waits
//! only give broken code the chance to show itself.

use colo_blk::block::testing::{memory_overlay, Hold, Op};
use colo_blk::block::{BlockDevExt, MemDev, SharedDev};
use colo_blk::replication::{no_events, Mode, Replication, Secondary, Stage, SyncMode};
use std::sync::Arc;
use std::time::Duration;

const SIZE: u64 = 4 << 20;
const CLUSTER: u64 = 64 << 10;
/// How long a request that must go through may take before the test calls
/// it stuck (a guard against hanging, not a measurement).
const HANG_MS: u64 = 20_000;
const HANG: Duration = Duration::from_millis(HANG_MS);

struct Setup {
    mem: Arc<MemDev>,
    /// When armed, the disk's next request of one kind stops until released.
    hold: Arc<Hold>,
    node: Arc<Secondary>,
    guest: SharedDev,
    primary: SharedDev,
}

fn setup() -> Setup {
    let mem = Arc::new(MemDev::filled(SIZE, 0x11));
    let hold = Arc::new(Hold::new());
    let disk = Arc::new(hold.wrap(mem.clone()));
    let (active, hidden) = (memory_overlay(SIZE), memory_overlay(SIZE));
    let node = Secondary::new(disk, active, hidden, CLUSTER, no_events()).unwrap();
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
    assert!(
        s.hold.wait_entered(Op::Read, HANG),
        "the held request never started"
    );
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
    s.hold.release(Op::Read);
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
    assert!(
        s.hold.wait_entered(Op::Write, HANG),
        "the held request never started"
    );
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
    s.hold.release(Op::Write);
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
    assert!(
        s.hold.wait_entered(Op::Write, HANG),
        "the held request never started"
    );
    // A clean cluster far from the one being committed: no waiting, straight to
    // the disk, nothing allocated in active.
    s.guest.write_at(SIZE - CLUSTER, &[0x66u8; 4096]).unwrap();
    assert!(!s.node.active().is_allocated(SIZE - CLUSTER));
    s.hold.release(Op::Write);
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
    assert!(
        s.hold.wait_entered(Op::Write, HANG),
        "the held request never started"
    );
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
    s.hold.release(Op::Write);
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
