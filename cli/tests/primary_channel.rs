//! The primary's per-queue asynchronous channel, driven as a queue worker
//! drives it (add, submit, poll on its eventfd) against colo-blk's NBD server
//! on a device that holds writes at a gate: one queue keeps many forwarded
//! writes in flight at once, same-cluster writes reach the secondary in the
//! local order, a `stop` waits for the writes in flight, and a fenced write
//! is held, not acknowledged.

mod nbd_util;

use colo_blk::block::channel::{IoChannel, IoCompletion};
use colo_blk::block::testing::{Gate, Intercept, Op};
use colo_blk::block::{BlockDev, BlockDevExt, BlockError, MemDev, Refusal};
use colo_blk::nbd::{Client, ClientOptions, NbdUri, ServerOptions};
use colo_blk::replication::{ForwardTarget, Primary, PrimaryControl, Replication, SyncMode};
use nbd_util::Served;
use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZE: u64 = 4 << 20;
const CLUSTER: u64 = 64 << 10;

struct Pair {
    /// The secondary's disk: writes wait at this gate (bounded), counted
    /// while they wait...
    gate: Arc<Gate>,
    /// ...and with this set, every write is refused as a failed-over
    /// secondary refuses a fenced primary.
    refuse: Arc<AtomicBool>,
    secondary: Served,
    local: Arc<MemDev>,
    primary: Arc<Primary>,
    ctl: PrimaryControl,
}

fn pair() -> Pair {
    let gate = Arc::new(Gate::closed());
    let refuse = Arc::new(AtomicBool::new(false));
    let opts = ServerOptions {
        workers_per_connection: 32,
        ..ServerOptions::default()
    };
    let (g, r) = (gate.clone(), refuse.clone());
    let secondary = Served::with(SIZE, opts, move |d| {
        Arc::new(
            Intercept::new(d, move |op, _, _| {
                if op == Op::Write {
                    if r.load(Ordering::SeqCst) {
                        return Err(BlockError::Refused(Refusal::TakenOver));
                    }
                    g.pass();
                }
                Ok(())
            })
            // The server then runs writes on its workers, not inline.
            .with_concurrent_writes(32),
        )
    });
    let uri = NbdUri::parse(&secondary.uri()).unwrap();
    let local = Arc::new(MemDev::new(SIZE));
    let primary = Primary::with_target(
        local.clone(),
        Box::new(move || {
            let client = Client::connect_to(&uri, ClientOptions::default())
                .map_err(|e| BlockError::connect(uri.to_string(), e))?;
            Ok(ForwardTarget::nbd(Arc::new(client)))
        }),
        CLUSTER,
        Arc::new(|_| {}),
    );
    let ctl = PrimaryControl(primary.clone());
    ctl.start(colo_blk::replication::Mode::Primary, SyncMode::None)
        .unwrap();
    Pair {
        gate,
        refuse,
        secondary,
        local,
        primary,
        ctl,
    }
}

/// Buffers that outlive the operations pointing into them.
struct Bufs(Vec<Vec<u8>>);

impl Bufs {
    fn add(&mut self, ch: &mut dyn IoChannel, id: u64, offset: u64, byte: u8, len: usize) {
        self.0.push(vec![byte; len]);
        let b = self.0.last_mut().unwrap();
        let iov = libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        };
        // SAFETY: the buffer lives in `self` (its heap block never moves)
        // until the test has reaped every completion.
        unsafe { ch.add_write(id, offset, &[iov]) };
    }
}

fn wait_readable(fd: RawFd, ms: i32) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}

/// Runs the channel as a worker would until `want` completions or `limit`,
/// and returns what completed.
fn drive(ch: &mut dyn IoChannel, want: usize, limit: Duration) -> Vec<IoCompletion> {
    let mut out = Vec::new();
    let deadline = Instant::now() + limit;
    while out.len() < want && Instant::now() < deadline {
        ch.submit();
        if ch.has_completions() {
            ch.poll(&mut out);
        } else {
            wait_readable(ch.notify_fd(), 10);
        }
    }
    out
}

/// Until `want` completions (bounded).
fn reap(ch: &mut dyn IoChannel, want: usize) -> Vec<IoCompletion> {
    drive(ch, want, Duration::from_secs(20))
}

/// What completes within `for_ms`.
fn reap_for(ch: &mut dyn IoChannel, for_ms: u64) -> Vec<IoCompletion> {
    drive(ch, usize::MAX, Duration::from_millis(for_ms))
}

fn channel(p: &Pair) -> Box<dyn IoChannel> {
    p.primary
        .open_channel(128)
        .expect("a primary always has a channel")
        .unwrap()
}

fn secondary_bytes(p: &Pair, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    std::fs::File::open(&p.secondary.image)
        .and_then(|f| f.read_exact_at(&mut v, offset))
        .unwrap();
    v
}

#[test]
fn one_queue_keeps_many_forwarded_writes_in_flight_on_one_thread() {
    let p = pair();
    let mut ch = channel(&p);
    let mut bufs = Bufs(Vec::new());
    for i in 0..24u64 {
        bufs.add(ch.as_mut(), i, i * CLUSTER, i as u8 + 1, 4096);
    }
    ch.submit();
    // All 24 reach the secondary's disk at once, though nothing but this
    // thread drives the channel and none has completed.
    assert_eq!(
        p.gate.wait_for(24, Duration::from_secs(20)),
        24,
        "writes in flight at the secondary"
    );
    assert_eq!(ch.in_flight(), 24);
    p.gate.open();
    let done = reap(ch.as_mut(), 24);
    assert_eq!(done.len(), 24);
    assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
    for i in 0..24u64 {
        let mut local = vec![0u8; 4096];
        p.local.read_at(i * CLUSTER, &mut local).unwrap();
        assert_eq!(local, vec![i as u8 + 1; 4096]);
        assert_eq!(secondary_bytes(&p, i * CLUSTER, 4096), local);
    }
}

#[test]
fn a_second_write_to_a_cluster_in_flight_waits_and_both_copies_end_equal() {
    let p = pair();
    let mut ch = channel(&p);
    let mut bufs = Bufs(Vec::new());
    bufs.add(ch.as_mut(), 1, 0, 0xaa, 8192);
    ch.submit();
    assert_eq!(p.gate.wait_for(1, Duration::from_secs(20)), 1);
    // Same cluster, overlapping bytes: held back in the channel, not sent.
    bufs.add(ch.as_mut(), 2, 4096, 0xbb, 8192);
    ch.submit();
    assert!(reap_for(ch.as_mut(), 100).is_empty());
    assert_eq!(p.gate.waiting(), 1);
    assert_eq!(ch.in_flight(), 2);
    p.gate.open();
    let done = reap(ch.as_mut(), 2);
    assert_eq!(done.iter().map(|c| c.id).collect::<Vec<_>>(), [1, 2]);
    assert!(done.iter().all(|c| c.result.is_ok()));
    assert_eq!(p.gate.most_waiting(), 1);
    let mut local = vec![0u8; 12288];
    p.local.read_at(0, &mut local).unwrap();
    let mut want = vec![0xaa; 4096];
    want.extend([0xbb; 8192]);
    assert_eq!(local, want);
    assert_eq!(secondary_bytes(&p, 0, 12288), want);
}

#[test]
fn stop_waits_for_the_write_in_flight_and_later_writes_stay_local_and_dirty() {
    let p = pair();
    let mut ch = channel(&p);
    let mut bufs = Bufs(Vec::new());
    bufs.add(ch.as_mut(), 1, 0, 0x11, 4096);
    ch.submit();
    assert_eq!(p.gate.wait_for(1, Duration::from_secs(20)), 1);
    let stopped = Arc::new(AtomicBool::new(false));
    let stopper = {
        let (primary, stopped) = (p.primary.clone(), stopped.clone());
        std::thread::spawn(move || {
            PrimaryControl(primary).stop(false).unwrap();
            stopped.store(true, Ordering::SeqCst);
        })
    };
    // While the switch waits, a new write waits too (it would not know
    // whether it is forwarded).
    std::thread::sleep(Duration::from_millis(50));
    bufs.add(ch.as_mut(), 2, 8 * CLUSTER, 0x22, 4096);
    assert!(reap_for(ch.as_mut(), 100).is_empty());
    assert!(!stopped.load(Ordering::SeqCst), "stop returned mid-write");
    p.gate.open();
    let done = reap(ch.as_mut(), 2);
    assert_eq!(done.len(), 2);
    assert!(done.iter().all(|c| c.result.is_ok()));
    stopper.join().unwrap();
    // The first reached the secondary; the second only the local disk.
    assert_eq!(secondary_bytes(&p, 0, 4096), vec![0x11; 4096]);
    assert_eq!(secondary_bytes(&p, 8 * CLUSTER, 4096), vec![0u8; 4096]);
    let mut local = vec![0u8; 4096];
    p.local.read_at(8 * CLUSTER, &mut local).unwrap();
    assert_eq!(local, vec![0x22; 4096]);
    drop(p.secondary);
}

#[test]
fn a_write_the_secondary_refuses_is_held_until_released_then_fails() {
    let p = pair();
    p.refuse.store(true, Ordering::SeqCst);
    p.gate.open();
    let mut ch = channel(&p);
    let mut bufs = Bufs(Vec::new());
    bufs.add(ch.as_mut(), 1, 0, 0x33, 4096);
    bufs.add(ch.as_mut(), 2, 4 * CLUSTER, 0x44, 4096);
    // Neither is acknowledged: the first is refused and held, the second is
    // held by the fence (or refused and held too).
    assert!(reap_for(ch.as_mut(), 300).is_empty());
    assert_eq!(p.ctl.status().stage.to_string(), "fenced");
    assert_eq!(p.ctl.status().fence.unwrap().held_writes, 2);
    bufs.add(ch.as_mut(), 3, 5 * CLUSTER, 0x55, 4096);
    assert!(reap_for(ch.as_mut(), 50).is_empty());
    assert_eq!(ch.in_flight(), 3);
    p.ctl.release_held();
    let done = reap(ch.as_mut(), 3);
    assert_eq!(done.len(), 3);
    assert!(done.iter().all(|c| c.result.is_err()), "{done:?}");
    assert_eq!(p.ctl.status().fence.unwrap().held_writes, 0);
    // The third never touched the local disk.
    let mut local = vec![0u8; 4096];
    p.local.read_at(5 * CLUSTER, &mut local).unwrap();
    assert_eq!(local, vec![0u8; 4096]);
}
