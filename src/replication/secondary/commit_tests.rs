//! The failover commit against a guest that holds the cluster it wants: the
//! commit waits for the holder without making other guest requests to that
//! cluster queue behind it.

use super::Secondary;
use crate::block::testing::{memory_overlay, Hold, Op};
use crate::block::{BlockDevExt, MemDev, SharedDev};
use crate::replication::{no_events, Mode, Replication, Stage, SyncMode};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const SIZE: u64 = 1 << 20;
const CLUSTER: u64 = 64 << 10;
/// A guard against hanging, not a measurement.
const HANG: Duration = Duration::from_secs(20);

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
    // The disk's next read, or next write, once armed, stops until released.
    let mem = Arc::new(MemDev::filled(SIZE, 0x11));
    let disk = Arc::new(Hold::new());
    let held_disk = Arc::new(disk.wrap(mem.clone()));
    let (active, hidden) = (memory_overlay(SIZE), memory_overlay(SIZE));
    let node = Secondary::new(held_disk, active, hidden, CLUSTER, no_events()).unwrap();
    node.start(Mode::Secondary, SyncMode::None).unwrap();
    let guest: SharedDev = node.guest();
    guest.write_at(0, &[0x33u8; 4096]).unwrap();
    guest.write_at(CLUSTER, &[0x33u8; 4096]).unwrap();
    // The commit stops inside its copy of cluster 0.
    disk.arm(Op::Write);
    node.stop(true).unwrap();
    assert!(
        disk.wait_entered(Op::Write, HANG),
        "the held request never started"
    );
    // A guest read of the disk part of cluster 1 stops inside the disk, holding
    // cluster 1 shared: the commit will not be able to drop cluster 1 yet.
    disk.arm(Op::Read);
    let held_guest = guest.clone();
    let held = std::thread::spawn(move || {
        let mut b = vec![0u8; 4096];
        held_guest.read_at(CLUSTER + 8192, &mut b).unwrap();
        b
    });
    assert!(
        disk.wait_entered(Op::Read, HANG),
        "the held request never started"
    );
    disk.release(Op::Write);
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
    disk.release(Op::Read);
    assert!(held.join().unwrap().iter().all(|&b| b == 0x11));
    node.wait_commit();
    assert_eq!(node.stage(), Stage::Done);
    let d = mem.snapshot();
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
