//! The primary forwarding over a real NBD connection (colo-blk's own server on
//! a raw image), where a guest write is sent to the secondary before the local
//! write and its reply awaited after it: same-cluster writes from many threads
//! and a racing resync must still leave both disks equal, and writes racing the
//! loss of the secondary must each either reach it or be left for a dirty resync.

mod nbd_util;

use colo_blk::block::{BlockDevExt, RawFile, RawFileOptions, SharedDev};
use colo_blk::nbd::{Client, ClientOptions, NbdAddr, NbdUri, Server, ServerOptions};
use colo_blk::replication::{
    ForwardTarget, Primary, PrimaryControl, Replication, ReplicationError, SyncMode,
};
use colo_blk_testkit::XorShift;
use nbd_util::Served;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const SIZE: u64 = 8 << 20;
const CLUSTER: u64 = 64 << 10;
/// Writes land in the first 16 clusters only, so threads keep colliding.
const HOT: u64 = 16 * CLUSTER;

struct Setup {
    secondary: Served,
    primary: Arc<Primary>,
    ctl: PrimaryControl,
    local: PathBuf,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let secondary = Served::raw(SIZE);
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("primary.img");
    let dev = RawFile::create(&local, SIZE).unwrap();
    // Data everywhere but one hole, so a full resync copies both kinds.
    let mut rng = XorShift::new(7);
    for at in (0..SIZE - 4 * CLUSTER).step_by(CLUSTER as usize) {
        let bytes: Vec<u8> = (0..CLUSTER).map(|_| rng.next() as u8).collect();
        dev.write_at(at, &bytes).unwrap();
    }
    let uri = NbdUri::parse(&secondary.uri()).unwrap();
    let primary = Primary::with_target(
        Arc::new(dev) as SharedDev,
        Box::new(move || {
            let client = Client::connect_to(&uri, ClientOptions::default())
                .map_err(|e| colo_blk::block::BlockError::connect(uri.to_string(), e))?;
            Ok(ForwardTarget::nbd(Arc::new(client)))
        }),
        CLUSTER,
        Arc::new(|_| {}),
    );
    Setup {
        secondary,
        ctl: PrimaryControl(Arc::clone(&primary)),
        primary,
        local,
        _dir: dir,
    }
}

/// Threads writing overlapping, cluster-crossing ranges of the hot area until
/// `stop` (or, with `until_error`, until a forwarding error is recorded, so
/// that no later write re-marks the clusters of the writes that failed);
/// every write must succeed.
fn writers(
    primary: &Arc<Primary>,
    stop: &Arc<AtomicBool>,
    until_error: bool,
) -> Vec<std::thread::JoinHandle<usize>> {
    (0..4u64)
        .map(|t| {
            let p = Arc::clone(primary);
            let stop = Arc::clone(stop);
            std::thread::spawn(move || {
                let ctl = PrimaryControl(Arc::clone(&p));
                let mut rng = XorShift::new(t + 1);
                let mut n = 0;
                loop {
                    let failed = until_error && ctl.get_error().is_err();
                    if failed || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let len = (rng.next() % 64 + 1) * 512;
                    let off = (rng.next() % ((HOT - len) / 512)) * 512;
                    let byte = (rng.next() % 255 + 1) as u8;
                    p.write_at(off, &vec![byte; len as usize])
                        .expect("a guest write failed");
                    n += 1;
                }
                n
            })
        })
        .collect()
}

fn run_writers_for(
    primary: &Arc<Primary>,
    millis: u64,
    until_error: bool,
    during: impl FnOnce(),
) -> usize {
    let stop = Arc::new(AtomicBool::new(false));
    let threads = writers(primary, &stop, until_error);
    std::thread::sleep(std::time::Duration::from_millis(millis / 2));
    during();
    std::thread::sleep(std::time::Duration::from_millis(millis / 2));
    stop.store(true, Ordering::Relaxed);
    threads.into_iter().map(|t| t.join().unwrap()).sum()
}

fn assert_same(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(x.len(), y.len());
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!(
            "disks differ first at byte {i} (cluster {}): {} vs {}",
            i as u64 / CLUSTER,
            x[i],
            y[i]
        );
    }
}

#[test]
fn colliding_writes_from_many_threads_and_a_racing_full_resync_leave_both_disks_equal() {
    let s = setup();
    let mut started = Ok(());
    let writes = run_writers_for(&s.primary, 400, false, || {
        started = s
            .ctl
            .start(colo_blk::replication::Mode::Primary, SyncMode::Full);
    });
    started.unwrap();
    assert!(writes > 0);
    s.ctl.checkpoint().unwrap();
    s.ctl.get_error().unwrap();
    assert_same(&s.local, &s.secondary.image);

    // Forwarding alone (no resync running) keeps them equal too.
    run_writers_for(&s.primary, 200, false, || {});
    s.ctl.checkpoint().unwrap();
    assert_same(&s.local, &s.secondary.image);
}

#[test]
fn writes_racing_the_loss_of_the_secondary_all_succeed_and_dirty_resync_restores_equality() {
    let mut s = setup();
    s.ctl
        .start(colo_blk::replication::Mode::Primary, SyncMode::Full)
        .unwrap();
    s.ctl.checkpoint().unwrap();
    assert_same(&s.local, &s.secondary.image);

    let server = s.secondary.server.take().unwrap();
    run_writers_for(&s.primary, 300, true, move || server.shutdown());
    assert!(matches!(
        s.ctl.get_error(),
        Err(ReplicationError::Failed(_))
    ));
    let dirty = s.ctl.status().dirty_clusters.unwrap();
    assert!(
        dirty > 0 && dirty <= HOT / CLUSTER,
        "{dirty} dirty clusters"
    );

    // The secondary comes back on the same image; only the dirty clusters move.
    s.ctl.stop(true).unwrap();
    let dev = RawFile::open(&s.secondary.image, &RawFileOptions::default()).unwrap();
    let server = Server::start(
        &NbdAddr::Unix(s.secondary.socket.clone()),
        Arc::new(dev),
        ServerOptions::default(),
    )
    .unwrap();
    s.secondary.server = Some(server);
    s.ctl
        .start(colo_blk::replication::Mode::Primary, SyncMode::Dirty)
        .unwrap();
    s.ctl.checkpoint().unwrap();
    s.ctl.get_error().unwrap();
    assert_eq!(s.ctl.status().resync.unwrap().total, dirty * CLUSTER);
    assert_same(&s.local, &s.secondary.image);
}
