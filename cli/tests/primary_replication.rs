//! The primary replication node over real image files: write-through forwarding,
//! full and dirty resync racing guest writes, forwarding failure handling.

use colo_blk::block::testing::{Intercept, Op};
use colo_blk::block::{BlockDev, BlockDevExt, BlockError, RawFile, SharedDev};
use colo_blk::replication::{
    Event, Mode, Primary, PrimaryControl, Replication, ReplicationError, Stage, SyncMode,
};
use colo_blk_testkit::XorShift;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const SIZE: u64 = 16 << 20;
const CLUSTER: u64 = 64 << 10;

/// A secondary stand-in: a raw file that counts written bytes and can be made
/// to fail every request (a dead link).
struct Remote {
    file: Arc<RawFile>,
    dead: AtomicBool,
    written: AtomicU64,
    zeroed: AtomicU64,
}

impl Remote {
    fn new(path: &Path) -> Arc<Self> {
        Arc::new(Remote {
            file: Arc::new(raw(path)),
            dead: AtomicBool::new(false),
            written: AtomicU64::new(0),
            zeroed: AtomicU64::new(0),
        })
    }

    /// The file as the primary sees it: counted, failing once dead.
    fn dev(self: &Arc<Self>) -> SharedDev {
        let me = Arc::clone(self);
        Arc::new(Intercept::new(self.file.clone(), move |op, _, len| {
            if me.dead.load(Ordering::SeqCst) {
                return Err(BlockError::io(
                    "write",
                    0,
                    std::io::ErrorKind::BrokenPipe.into(),
                ));
            }
            match op {
                Op::Write => me.written.fetch_add(len, Ordering::SeqCst),
                Op::WriteZeroes => me.zeroed.fetch_add(len, Ordering::SeqCst),
                _ => 0,
            };
            Ok(())
        }))
    }
}

fn raw(path: &Path) -> RawFile {
    RawFile::create(path, SIZE).unwrap()
}

struct Pair {
    _dir: tempfile::TempDir,
    primary: Arc<Primary>,
    ctl: PrimaryControl,
    remote: Arc<Mutex<Arc<Remote>>>,
    events: Arc<Mutex<Vec<Event>>>,
    dir: std::path::PathBuf,
}

/// A primary whose connector hands out whatever `remote` currently holds.
fn pair() -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let local: SharedDev = Arc::new(raw(&path.join("primary.img")));
    let remote = Arc::new(Mutex::new(Remote::new(&path.join("secondary.img"))));
    let r = Arc::clone(&remote);
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = Arc::clone(&events);
    let primary = Primary::new(
        local,
        Box::new(move || Ok(r.lock().unwrap().dev())),
        CLUSTER,
        Arc::new(move |e| ev.lock().unwrap().push(e)),
    );
    Pair {
        _dir: dir,
        ctl: PrimaryControl(Arc::clone(&primary)),
        primary,
        remote,
        events,
        dir: path,
    }
}

fn random_writes(dev: &dyn BlockDev, seed: u64, count: usize) {
    let mut rng = XorShift::new(seed);
    for _ in 0..count {
        let len = (rng.next() % 64 + 1) * 512;
        let off = (rng.next() % ((SIZE - len) / 512)) * 512;
        let byte = (rng.next() % 255 + 1) as u8;
        dev.write_at(off, &vec![byte; len as usize]).unwrap();
    }
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
fn full_resync_racing_guest_writes_leaves_disks_equal_at_checkpoint() {
    let p = pair();
    // Old content on the secondary must be overwritten, holes included.
    p.remote
        .lock()
        .unwrap()
        .file
        .write_at(0, &vec![0xee; SIZE as usize])
        .unwrap();
    random_writes(p.primary.as_ref(), 1, 300);
    p.ctl.start(Mode::Primary, SyncMode::Full).unwrap();
    let writers: Vec<_> = (0..3)
        .map(|t| {
            let dev = Arc::clone(&p.primary);
            std::thread::spawn(move || random_writes(dev.as_ref(), 100 + t, 400))
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    p.ctl.checkpoint().unwrap();
    assert_eq!(p.ctl.status().stage, Stage::Running);
    p.ctl.get_error().unwrap();
    assert_same(&p.dir.join("primary.img"), &p.dir.join("secondary.img"));
    let resync = p.ctl.status().resync.unwrap();
    assert_eq!(resync.done, resync.total);
    assert_eq!(resync.total, SIZE);
}

#[test]
fn forwarding_failure_keeps_guest_writes_succeeding_and_dirty_resync_copies_only_changes() {
    let p = pair();
    p.ctl.start(Mode::Primary, SyncMode::None).unwrap();
    random_writes(p.primary.as_ref(), 7, 100);
    p.ctl.checkpoint().unwrap();
    assert_same(&p.dir.join("primary.img"), &p.dir.join("secondary.img"));

    // The secondary dies under load: every guest write still succeeds.
    p.remote.lock().unwrap().dead.store(true, Ordering::SeqCst);
    p.primary.write_at(0, &[1u8; 4096]).unwrap();
    p.primary
        .write_at(5 * CLUSTER + 100 * 512, &[2u8; 512])
        .unwrap();
    p.primary.write_at(9 * CLUSTER - 512, &[3u8; 1024]).unwrap(); // clusters 8 and 9
    let err = p.ctl.get_error().unwrap_err();
    assert!(
        matches!(err, ReplicationError::Failed(ref f) if f.to_string().contains("forwarding")),
        "{err}"
    );
    assert!(
        p.ctl.checkpoint().is_err(),
        "a barrier cannot pass without the secondary"
    );
    assert!(p.events.lock().unwrap().iter().any(|e| matches!(
        e,
        Event::Error {
            mode: Mode::Primary,
            ..
        }
    )));
    assert_eq!(p.ctl.status().dirty_clusters, Some(4));

    // A restarted secondary (same disk, link up again) gets only the changes.
    p.ctl.stop(false).unwrap();
    let fresh = Remote::new(&p.dir.join("secondary.img"));
    *p.remote.lock().unwrap() = Arc::clone(&fresh);
    p.ctl.start(Mode::Primary, SyncMode::Dirty).unwrap();
    p.ctl.checkpoint().unwrap();
    assert_same(&p.dir.join("primary.img"), &p.dir.join("secondary.img"));
    let copied = fresh.written.load(Ordering::SeqCst) + fresh.zeroed.load(Ordering::SeqCst);
    assert_eq!(
        copied,
        4 * CLUSTER,
        "dirty resync copies exactly the 4 changed clusters"
    );
    assert_eq!(p.ctl.status().dirty_clusters, Some(0));
    p.ctl.get_error().unwrap();
}

#[test]
fn control_commands_follow_the_stage_rules() {
    let p = pair();
    assert!(matches!(
        p.ctl.get_error(),
        Err(ReplicationError::NotRunning)
    ));
    assert!(matches!(
        p.ctl.checkpoint(),
        Err(ReplicationError::NotRunning)
    ));
    assert!(matches!(
        p.ctl.stop(false),
        Err(ReplicationError::NotRunning)
    ));
    assert!(matches!(
        p.ctl.start(Mode::Secondary, SyncMode::Full),
        Err(ReplicationError::ModeMismatch { .. })
    ));
    assert!(
        matches!(
            p.ctl.start(Mode::Primary, SyncMode::Dirty),
            Err(ReplicationError::NoBaseline)
        ),
        "dirty sync needs a baseline"
    );
    p.ctl.start(Mode::Primary, SyncMode::None).unwrap();
    assert!(matches!(
        p.ctl.start(Mode::Primary, SyncMode::None),
        Err(ReplicationError::AlreadyStarted)
    ));
    p.ctl.stop(true).unwrap();
    assert_eq!(p.ctl.status().stage, Stage::Done);
    // Writes after stop are local only and tracked for a later dirty sync.
    p.primary.write_at(0, &[9u8; 512]).unwrap();
    assert_eq!(p.ctl.status().dirty_clusters, Some(1));
    assert_eq!(p.remote.lock().unwrap().written.load(Ordering::SeqCst), 0);
    let stages: Vec<Stage> = p
        .events
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            Event::StageChanged { stage, .. } => Some(*stage),
            _ => None,
        })
        .collect();
    assert_eq!(stages, vec![Stage::Running, Stage::Done]);
}

#[test]
fn discard_and_write_zeroes_reach_the_secondary_as_zeroes() {
    let p = pair();
    p.primary
        .write_at(0, &vec![5u8; 4 * CLUSTER as usize])
        .unwrap();
    p.ctl.start(Mode::Primary, SyncMode::Full).unwrap();
    p.ctl.checkpoint().unwrap();
    p.primary.discard(0, CLUSTER).unwrap();
    p.primary.write_zeroes(2 * CLUSTER, CLUSTER, false).unwrap();
    p.ctl.checkpoint().unwrap();
    assert_same(&p.dir.join("primary.img"), &p.dir.join("secondary.img"));
    let mut b = vec![1u8; CLUSTER as usize];
    p.remote.lock().unwrap().file.read_at(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
}
