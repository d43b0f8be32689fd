//! The behaviour of QEMU's tests/unit/test-replication.c (secondary side), in
//! Rust, on real files: a 64 MiB secondary disk pre-filled with 0x11, active and
//! hidden overlay files, the guest view as the secondary VM and the primary view
//! as the NBD-fed writer. Bytes are compared for equality (QEMU's test uses
//! `memcmp(...) <= 0`, which cannot tell 0x11 from 0x22).

use colo_blk::block::testing::{Gate, Intercept};
use colo_blk::block::{BlockDev, BlockDevExt, BlockError, Overlay, RawFile, SharedDev};
use colo_blk::replication::{
    no_events, Event, EventSink, Mode, Replication, ReplicationError, Secondary, Stage, SyncMode,
    DEFAULT_CLUSTER_SIZE,
};
use std::sync::{Arc, Mutex};
use vm_memory::VolatileSlice;

const IMG_SIZE: u64 = 64 << 20;
const HALF: u64 = IMG_SIZE / 2;

struct Setup {
    _dir: tempfile::TempDir,
    disk_path: std::path::PathBuf,
    node: Arc<Secondary>,
    guest: SharedDev,
    primary: SharedDev,
}

fn open_disk(path: &std::path::Path) -> SharedDev {
    Arc::new(RawFile::create(path, IMG_SIZE).unwrap())
}

fn setup_with(events: EventSink, wrap: impl FnOnce(SharedDev) -> SharedDev) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let disk_path = dir.path().join("s_local_disk");
    let disk = open_disk(&disk_path);
    fill(&disk, 0, IMG_SIZE, 0x11);
    let active = Arc::new(Overlay::create(&dir.path().join("s_active_disk"), IMG_SIZE).unwrap());
    let hidden = Arc::new(Overlay::create(&dir.path().join("s_hidden_disk"), IMG_SIZE).unwrap());
    let node = Secondary::new(wrap(disk), active, hidden, DEFAULT_CLUSTER_SIZE, events).unwrap();
    Setup {
        _dir: dir,
        disk_path,
        guest: node.guest(),
        primary: node.primary(),
        node,
    }
}

fn setup() -> Setup {
    setup_with(no_events(), |d| d)
}

const CHUNK: u64 = 1 << 20;

fn fill(dev: &SharedDev, offset: u64, len: u64, byte: u8) {
    let buf = vec![byte; CHUNK as usize];
    let mut pos = offset;
    while pos < offset + len {
        let n = (offset + len - pos).min(CHUNK);
        dev.write_at(pos, &buf[..n as usize]).unwrap();
        pos += n;
    }
}

/// Asserts every byte of the range reads as `byte`, naming the first that does not.
fn expect(dev: &dyn BlockDev, offset: u64, len: u64, byte: u8) {
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = offset;
    while pos < offset + len {
        let n = (offset + len - pos).min(CHUNK) as usize;
        dev.read_vectored(pos, &[VolatileSlice::from(&mut buf[..n])])
            .unwrap();
        if let Some(i) = buf[..n].iter().position(|&b| b != byte) {
            panic!(
                "byte at {} is {:#04x}, expected {:#04x}",
                pos + i as u64,
                buf[i],
                byte
            );
        }
        pos += n as u64;
    }
}

/// The scenario every secondary test shares: primary writes 0x22 to the second
/// half, the guest still reads 0x11 there, the guest writes 0x33 to the first half.
fn primary_22_guest_33(s: &Setup) {
    fill(&s.primary, HALF, HALF, 0x22);
    expect(&*s.guest, HALF, HALF, 0x11);
    fill(&s.guest, 0, HALF, 0x33);
    expect(&*s.guest, 0, HALF, 0x33);
}

fn failover(s: &Setup) {
    s.node.stop(true).unwrap();
    s.node.wait_commit();
    assert_eq!(s.node.stage(), Stage::Done);
}

#[test]
fn guest_read_is_refused_before_start() {
    let s = setup();
    let mut buf = vec![0u8; 4096];
    for off in [0, HALF, IMG_SIZE - 4096] {
        let err = s.guest.read_at(off, &mut buf).unwrap_err();
        assert!(matches!(err, BlockError::Refused(_)), "{err}");
        assert_eq!(err.errno(), libc::EPERM);
    }
    let mut whole = vec![0u8; IMG_SIZE as usize];
    assert!(s.guest.read_at(0, &mut whole).is_err());
}

#[test]
fn guest_write_is_refused_before_start_and_changes_nothing() {
    let s = setup();
    assert!(matches!(
        s.guest.write_at(0, &vec![0u8; IMG_SIZE as usize]),
        Err(BlockError::Refused(_))
    ));
    assert!(s.guest.discard(0, 4096).is_err());
    // A flush changes no data, so it passes down to the disk, as in QEMU.
    s.guest.flush().unwrap();
    expect(&*s.node.disk().clone(), 0, IMG_SIZE, 0x11);
}

#[test]
fn primary_writes_before_start_go_straight_to_the_disk() {
    let s = setup();
    fill(&s.primary, 0, 8192, 0x44);
    expect(&**s.node.disk(), 0, 8192, 0x44);
    assert!(s.node.hidden().is_empty());
    s.node.start(Mode::Secondary, SyncMode::None).unwrap();
    expect(&*s.guest, 0, 8192, 0x44);
}

#[test]
fn start_then_guest_sees_disk_not_later_primary_writes_and_its_own_writes() {
    let s = setup();
    s.node.start(Mode::Secondary, SyncMode::Full).unwrap();
    assert_eq!(s.node.stage(), Stage::Running);
    expect(&*s.guest, 0, IMG_SIZE, 0x11);
    primary_22_guest_33(&s);
    // The disk has the primary's data; hidden has the old contents.
    expect(&**s.node.disk(), HALF, HALF, 0x22);
    assert_eq!(s.node.hidden().allocated_bytes(), HALF);
    assert_eq!(s.node.active().allocated_bytes(), HALF);
    failover(&s);
}

#[test]
fn failover_commit_leaves_disk_equal_to_what_the_guest_saw() {
    let s = setup();
    s.node.start(Mode::Secondary, SyncMode::Full).unwrap();
    primary_22_guest_33(&s);
    failover(&s);
    expect(&*s.guest, 0, HALF, 0x33);
    // The primary's uncheckpointed 0x22 is rolled back by the commit of hidden.
    expect(&*s.guest, HALF, HALF, 0x11);
    // The file itself, opened anew, holds the same bytes.
    let file = open_disk(&s.disk_path);
    expect(&*file, 0, HALF, 0x33);
    expect(&*file, HALF, HALF, 0x11);
    assert!(s.node.active().is_empty() && s.node.hidden().is_empty());
    // Fencing: the old primary can no longer write.
    assert!(matches!(
        s.primary.write_at(0, &[0u8; 512]),
        Err(BlockError::Refused(_))
    ));
    // The guest carries on, on the disk directly.
    fill(&s.guest, 4096, 4096, 0x55);
    expect(&*file, 4096, 4096, 0x55);
}

#[test]
fn after_failover_start_checkpoint_and_stop_are_accepted_no_ops() {
    let s = setup();
    s.node.start(Mode::Secondary, SyncMode::Full).unwrap();
    primary_22_guest_33(&s);
    failover(&s);
    // As in QEMU's continuous_replication test: even a primary-mode start.
    s.node.start(Mode::Primary, SyncMode::Full).unwrap();
    s.node.checkpoint().unwrap();
    s.node.stop(true).unwrap();
    s.node.stop(false).unwrap();
    assert_eq!(s.node.stage(), Stage::Done);
    expect(&*s.guest, 0, HALF, 0x33);
    expect(&*s.guest, HALF, HALF, 0x11);
}

#[test]
fn checkpoint_makes_primary_writes_visible_and_drops_guest_writes() {
    let s = setup();
    s.node.start(Mode::Secondary, SyncMode::Full).unwrap();
    fill(&s.primary, HALF, HALF, 0x22);
    expect(&*s.guest, HALF, HALF, 0x11);
    fill(&s.guest, 0, 4096, 0x33);
    s.node.checkpoint().unwrap();
    expect(&*s.guest, HALF, HALF, 0x22);
    // At a checkpoint the secondary VM is replaced by the primary's state: its
    // own writes since the last checkpoint are gone with it.
    expect(&*s.guest, 0, 4096, 0x11);
    assert!(s.node.active().is_empty() && s.node.hidden().is_empty());
    // The overlays' space is released (in the background, after the checkpoint).
    s.node.wait_released();
    for name in ["s_active_disk", "s_hidden_disk"] {
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(s._dir.path().join(name))
            .unwrap()
            .blocks();
        assert!(blocks * 512 < 1 << 20, "{name} still holds {blocks} blocks");
    }
    // Copy-before-write starts over: the next primary write is hidden again.
    fill(&s.primary, HALF, 65536, 0x66);
    expect(&*s.guest, HALF, 65536, 0x22);
    failover(&s);
    expect(&*s.guest, HALF, 65536, 0x22);
}

#[test]
fn plain_stop_checkpoints_and_serves_the_disk() {
    let s = setup();
    s.node.start(Mode::Secondary, SyncMode::Full).unwrap();
    primary_22_guest_33(&s);
    s.node.stop(false).unwrap();
    assert_eq!(s.node.stage(), Stage::Done);
    expect(&*s.guest, 0, HALF, 0x11);
    expect(&*s.guest, HALF, HALF, 0x22);
    assert!(s.node.active().is_empty() && s.node.hidden().is_empty());
}

#[test]
fn start_is_refused_twice_with_wrong_mode_or_mismatched_lengths() {
    let s = setup();
    assert!(matches!(
        s.node.start(Mode::Primary, SyncMode::Full),
        Err(ReplicationError::ModeMismatch { .. })
    ));
    assert_eq!(s.node.stage(), Stage::None);
    s.node.start(Mode::Secondary, SyncMode::Full).unwrap();
    assert!(matches!(
        s.node.start(Mode::Secondary, SyncMode::Full),
        Err(ReplicationError::AlreadyStarted)
    ));
    failover(&s);

    let dir = tempfile::tempdir().unwrap();
    let disk = open_disk(&dir.path().join("d"));
    let active = Arc::new(Overlay::create(&dir.path().join("a"), IMG_SIZE).unwrap());
    let hidden = Arc::new(Overlay::create(&dir.path().join("h"), IMG_SIZE - 4096).unwrap());
    let node = Secondary::new(disk, active, hidden, DEFAULT_CLUSTER_SIZE, no_events()).unwrap();
    assert!(matches!(
        node.start(Mode::Secondary, SyncMode::Full),
        Err(ReplicationError::LengthMismatch)
    ));
    assert_eq!(node.stage(), Stage::None);
}

#[test]
fn checkpoint_and_stop_before_start_are_refused() {
    let s = setup();
    assert!(matches!(
        s.node.checkpoint(),
        Err(ReplicationError::NotRunning)
    ));
    assert!(matches!(
        s.node.stop(false),
        Err(ReplicationError::NotRunning)
    ));
    assert!(matches!(
        s.node.stop(true),
        Err(ReplicationError::NotRunning)
    ));
}

#[test]
fn get_error_in_every_stage_and_events_in_order() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink: EventSink = {
        let events = events.clone();
        Arc::new(move |e| events.lock().unwrap().push(e))
    };
    // The disk's write-type requests wait while the gate is closed: keeps
    // the commit in stage failover for as long as the test needs.
    let gate = Arc::new(Gate::closed());
    gate.open();
    let g = gate.clone();
    let s = setup_with(sink, |d| {
        Arc::new(Intercept::new(d, move |op, _, _| {
            if op.is_write_type() {
                g.pass();
            }
            Ok(())
        }))
    });

    assert!(matches!(
        s.node.get_error(),
        Err(ReplicationError::NotRunning)
    ));
    s.node.start(Mode::Secondary, SyncMode::Full).unwrap();
    s.node.get_error().unwrap();
    primary_22_guest_33(&s);

    gate.close();
    s.node.stop(true).unwrap();
    assert_eq!(s.node.stage(), Stage::Failover);
    s.node.get_error().unwrap();
    assert_eq!(s.node.status().stage, Stage::Failover);
    // The guest keeps reading during the commit (these clusters are not the one
    // the commit is writing: it starts at offset 0).
    expect(&*s.guest, IMG_SIZE - CHUNK, CHUNK, 0x11);
    // Control commands are accepted no-ops meanwhile.
    s.node.checkpoint().unwrap();
    s.node.start(Mode::Secondary, SyncMode::Full).unwrap();
    gate.open();
    s.node.wait_commit();
    assert_eq!(s.node.stage(), Stage::Done);
    s.node.get_error().unwrap();
    let st = s.node.status();
    assert_eq!(st.mode, Mode::Secondary);
    let progress = st.commit.unwrap();
    assert_eq!(progress.done, progress.total);
    assert_eq!(progress.total, IMG_SIZE);

    let events = events.lock().unwrap();
    let stages: Vec<Stage> = events
        .iter()
        .filter_map(|e| match e {
            Event::StageChanged { stage, mode } => {
                assert_eq!(*mode, Mode::Secondary);
                Some(*stage)
            }
            _ => None,
        })
        .collect();
    assert_eq!(stages, vec![Stage::Running, Stage::Failover, Stage::Done]);
    assert!(events.iter().any(
        |e| matches!(e, Event::CommitProgress(p) if p.done == p.total && p.total == IMG_SIZE)
    ));
    assert!(!events.iter().any(|e| matches!(e, Event::Error { .. })));
}
