//! Failures: the failover commit failing part-way (injected I/O errors on the
//! secondary disk) and copy-before-write failing while running.

use colo_blk::block::testing::memory_overlay;
use colo_blk::block::{BlockDevExt, BlockError, MemDev, Overlay, SharedDev, DEFAULT_GRANULE};
use colo_blk::replication::{
    Event, EventSink, Mode, Replication, ReplicationError, Secondary, Stage, SyncMode,
};
use std::sync::{Arc, Mutex};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
const CLUSTER: u64 = 64 << 10;

struct Setup {
    disk: Arc<MemDev>,
    hidden_store: Arc<MemDev>,
    node: Arc<Secondary>,
    guest: SharedDev,
    primary: SharedDev,
    events: Arc<Mutex<Vec<Event>>>,
    /// What the guest must see.
    model: Vec<u8>,
}

impl Setup {
    fn new() -> Self {
        let disk = Arc::new(MemDev::filled(SIZE, 0x11));
        let hidden_store = Arc::new(MemDev::new(SIZE));
        let active = memory_overlay(SIZE);
        let hidden = Arc::new(Overlay::with_store(hidden_store.clone(), DEFAULT_GRANULE).unwrap());
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink: EventSink = {
            let events = events.clone();
            Arc::new(move |e| events.lock().unwrap().push(e))
        };
        let node = Secondary::new(disk.clone(), active, hidden, CLUSTER, sink).unwrap();
        node.start(Mode::Secondary, SyncMode::None).unwrap();
        Setup {
            disk,
            hidden_store,
            guest: node.guest(),
            primary: node.primary(),
            node,
            events,
            model: vec![0x11; SIZE as usize],
        }
    }

    fn guest_write(&mut self, off: u64, len: u64, byte: u8) {
        self.guest.write_at(off, &vec![byte; len as usize]).unwrap();
        self.model[off as usize..(off + len) as usize].fill(byte);
    }

    fn check_guest_view(&self) {
        let mut got = vec![0u8; SIZE as usize];
        self.guest.read_at(0, &mut got).unwrap();
        if let Some(i) = got.iter().zip(&self.model).position(|(a, b)| a != b) {
            panic!(
                "guest sees {:#04x} at {i}, wrote {:#04x}",
                got[i], self.model[i]
            );
        }
    }

    fn disk_at(&self, off: u64, len: u64) -> Vec<u8> {
        self.disk.snapshot()[off as usize..(off + len) as usize].to_vec()
    }
}

fn all(v: &[u8], byte: u8) -> bool {
    v.iter().all(|&b| b == byte)
}

#[test]
fn commit_failing_part_way_keeps_error_and_follows_split_policy_without_losing_writes() {
    let mut s = Setup::new();
    // The primary rewrites the second half: hidden keeps its 0x11.
    s.primary
        .write_at(8 * MIB, &vec![0x22u8; 8 * MIB as usize])
        .unwrap();
    s.guest_write(0, 4 * MIB, 0x33);
    s.guest_write(10 * MIB, 2 * MIB, 0x44);
    s.check_guest_view();

    // The disk fails every write from 9 MiB on: the commit gets through
    // 0..4 MiB (active) and 8..9 MiB (hidden), then fails.
    s.disk.fail_writes_from(Some(9 * MIB));
    s.node.stop(true).unwrap();
    s.node.wait_commit();
    assert_eq!(s.node.stage(), Stage::FailoverFailed);
    let err = s.node.get_error().unwrap_err();
    assert!(
        matches!(&err, ReplicationError::Failed(f) if f.to_string().contains("commit")),
        "{err}"
    );
    assert!(s.node.status().error.is_some());
    {
        let events = s.events.lock().unwrap();
        assert!(events.iter().any(|e| matches!(
            e,
            Event::Error {
                mode: Mode::Secondary,
                ..
            }
        )));
        assert!(events.iter().any(|e| matches!(
            e,
            Event::StageChanged {
                stage: Stage::FailoverFailed,
                ..
            }
        )));
    }
    // What was committed is on the disk and no longer in the overlays.
    assert!(all(&s.disk_at(0, 4 * MIB), 0x33));
    assert!(all(&s.disk_at(8 * MIB, MIB), 0x11));
    assert!(!s.node.active().is_allocated(0));
    assert!(!s.node.hidden().is_allocated(8 * MIB));
    // The rest is still held by the overlays, and the guest still sees it all.
    assert!(s.node.hidden().is_allocated(9 * MIB));
    s.check_guest_view();

    // Split policy. Nothing allocated above 4..8 MiB: straight to the disk.
    s.guest_write(5 * MIB, CLUSTER, 0x55);
    assert!(all(&s.disk_at(5 * MIB, CLUSTER), 0x55));
    assert!(!s.node.active().is_allocated(5 * MIB));
    // Allocated in hidden (the disk would fail there): to active, disk untouched.
    s.guest_write(13 * MIB, 4096, 0x66);
    assert!(s.node.active().is_allocated(13 * MIB));
    assert!(all(&s.disk_at(13 * MIB, 4096), 0x22));
    // Partial granule allocated in hidden: completed from hidden in active.
    s.guest_write(14 * MIB + 512, 1024, 0x77);
    // Allocated in active: stays in active.
    s.guest_write(10 * MIB + 100 * 512, 512, 0x88);
    assert!(all(&s.disk_at(10 * MIB, MIB), 0x22));
    // A run crossing from clean (to disk) into allocated (to active) works too.
    s.guest_write(9 * MIB - 4096, 8192, 0x99);
    assert!(all(&s.disk_at(9 * MIB - 4096, 4096), 0x99));
    assert!(s.node.active().is_allocated(9 * MIB));
    assert!(all(&s.disk_at(9 * MIB, 4096), 0x22));
    s.check_guest_view();

    // The node refuses to checkpoint (it would drop the guest's data) or to start
    // again, stop reports not running, and the old primary stays fenced.
    assert!(matches!(
        s.node.checkpoint(),
        Err(ReplicationError::FailoverFailed)
    ));
    assert!(matches!(
        s.node.stop(true),
        Err(ReplicationError::NotRunning)
    ));
    assert!(matches!(
        s.node.start(Mode::Secondary, SyncMode::None),
        Err(ReplicationError::AlreadyStarted)
    ));
    assert!(matches!(
        s.primary.write_at(0, &[0u8; 512]),
        Err(BlockError::Refused(_))
    ));
    assert!(s.node.get_error().is_err());
    s.check_guest_view();
}

#[test]
fn commit_failing_at_the_final_flush_is_failover_failed_with_data_intact() {
    let mut s = Setup::new();
    s.primary.write_at(0, &vec![0x22u8; MIB as usize]).unwrap();
    s.guest_write(2 * MIB, MIB, 0x33);
    s.disk.fail_flush(true);
    s.node.stop(true).unwrap();
    s.node.wait_commit();
    assert_eq!(s.node.stage(), Stage::FailoverFailed);
    assert!(s.node.get_error().is_err());
    // The data reached the disk; the guest view is whole.
    assert!(all(&s.disk_at(0, MIB), 0x11));
    assert!(all(&s.disk_at(2 * MIB, MIB), 0x33));
    s.check_guest_view();
}

#[test]
fn copy_before_write_failure_fails_the_primary_write_records_error_and_keeps_guest_view() {
    let mut s = Setup::new();
    s.guest_write(0, 4096, 0x33);
    // Hidden cannot take the copy: the primary's write must not reach the disk.
    s.hidden_store.fail_nth_write(1);
    let err = s
        .primary
        .write_at(MIB, &vec![0x22u8; CLUSTER as usize])
        .unwrap_err();
    // An I/O error of the copy-before-write step, with the hidden disk's
    // failure as its cause.
    assert!(
        matches!(&err, BlockError::Below { op: "copy-before-write", source, .. }
            if matches!(**source, BlockError::Io { .. })),
        "{err}"
    );
    assert_eq!(err.errno(), libc::EIO);
    assert!(all(&s.disk_at(MIB, CLUSTER), 0x11));
    assert_eq!(s.node.stage(), Stage::Running);
    assert!(matches!(
        s.node.get_error(),
        Err(ReplicationError::Failed(_))
    ));
    assert!(s
        .events
        .lock()
        .unwrap()
        .iter()
        .any(|e| matches!(e, Event::Error { .. })));
    // Reading the old data fails next: same outcome.
    s.disk.fail_nth_read(1);
    assert!(s.primary.write_at(2 * MIB, &[0x22u8; 4096]).is_err());
    assert!(all(&s.disk_at(2 * MIB, 4096), 0x11));
    s.check_guest_view();
    // Retried once the fault is gone, the write is copied and applied.
    s.primary
        .write_at(MIB, &vec![0x22u8; CLUSTER as usize])
        .unwrap();
    assert!(all(&s.disk_at(MIB, CLUSTER), 0x22));
    s.check_guest_view();
    // A successful failover clears the recorded error.
    s.node.stop(true).unwrap();
    s.node.wait_commit();
    assert_eq!(s.node.stage(), Stage::Done);
    s.node.get_error().unwrap();
    assert_eq!(s.disk.snapshot(), s.model);
}
