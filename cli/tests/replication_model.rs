//! Randomized model test of the secondary node: guest threads read and write, a
//! primary thread writes, a controller checkpoints and finally fails over, all
//! concurrently; every guest read is checked against the model "state at the last
//! checkpoint + the guest's writes since", and after failover the secondary disk
//! must equal the model byte for byte.
//!
//! The seed is printed first (shown when the test fails); set COLO_MODEL_SEED to
//! replay one. Thread interleavings still vary from run to run: the seed fixes
//! each thread's sequence of operations, not the schedule.
//!
//! How the model stays exact under concurrency:
//! * guest requests lock the model units (2 KiB, smaller than the 4 KiB overlay
//!   granule so that requests of two threads still meet inside one granule) they
//!   touch for the duration of the device request: overlapping guest requests
//!   are serialised by the test, neighbouring ones are not;
//! * as in COLO, writers (guest and primary) are paused around a checkpoint and
//!   the failover; guest readers are not, so a read may straddle a checkpoint and
//!   must then equal, whole, either the state before or the state after it.

use colo_blk::block::testing::memory_overlay;
use colo_blk::block::{BlockError, MemDev, SharedDev, DEFAULT_GRANULE};
use colo_blk::replication::{no_events, Mode, Replication, Secondary, Stage, SyncMode};
use colo_blk_testkit::XorShift;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use vm_memory::VolatileSlice;

const DISK: u64 = 8 << 20;
const UNIT: u64 = 2048;
const SECTOR: u64 = 512;

/// A sector-aligned range, mostly small, sometimes spanning several clusters.
fn random_range(rng: &mut XorShift) -> (u64, u64) {
    let sectors = match rng.below(10) {
        0 => 1 + rng.below(256),
        1..=3 => 8 * (1 + rng.below(4)),
        _ => 1 + rng.below(16),
    };
    let len = sectors * SECTOR;
    let off = rng.below((DISK - len) / SECTOR + 1) * SECTOR;
    (off, len)
}

struct Model {
    /// What the guest must see, per unit.
    guest: Vec<RwLock<Vec<u8>>>,
    /// What the primary has written (the secondary disk's contents outside the
    /// replication node's bookkeeping).
    primary: Mutex<Vec<u8>>,
    /// Writers hold it shared; the controller takes it to pause them.
    pause: RwLock<()>,
    /// Odd while a checkpoint is in progress.
    generation: AtomicU64,
    /// The state after the last checkpoint, tagged with its (odd) generation.
    post: Mutex<(u64, Arc<[u8]>)>,
    failed_over: AtomicBool,
    guest_ops: AtomicU64,
    /// Guest threads that ended (normally or by panicking).
    guests_ended: AtomicU64,
    straddled: AtomicU64,
}

impl Model {
    fn new(initial: &[u8]) -> Self {
        Model {
            guest: initial
                .chunks(UNIT as usize)
                .map(|c| RwLock::new(c.to_vec()))
                .collect(),
            primary: Mutex::new(initial.to_vec()),
            pause: RwLock::new(()),
            generation: AtomicU64::new(0),
            post: Mutex::new((u64::MAX, Arc::from(Vec::new()))),
            failed_over: AtomicBool::new(false),
            guest_ops: AtomicU64::new(0),
            guests_ended: AtomicU64::new(0),
            straddled: AtomicU64::new(0),
        }
    }

    fn units(off: u64, len: u64) -> std::ops::RangeInclusive<usize> {
        (off / UNIT) as usize..=((off + len - 1) / UNIT) as usize
    }

    fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(DISK as usize);
        for u in &self.guest {
            out.extend_from_slice(&u.read().unwrap());
        }
        out
    }
}

fn guest_write(model: &Model, guest: &SharedDev, rng: &mut XorShift, zeroes: bool) {
    let (off, len) = random_range(rng);
    let mut data = vec![0u8; len as usize];
    if !zeroes {
        rng.fill(&mut data);
    }
    let _writer = model.pause.read().unwrap();
    let mut units: Vec<_> = Model::units(off, len)
        .map(|u| model.guest[u].write().unwrap())
        .collect();
    let res = if zeroes {
        if rng.below(2) == 0 {
            guest.discard(off, len)
        } else {
            guest.write_zeroes(off, len, rng.below(2) == 0)
        }
    } else {
        guest.write_vectored(off, &[VolatileSlice::from(data.as_mut_slice())])
    };
    if let Err(e) = res {
        panic!("guest write {off}+{len} failed: {e}");
    }
    let first = Model::units(off, len).start() * UNIT as usize;
    for (i, unit) in units.iter_mut().enumerate() {
        let base = first + i * UNIT as usize;
        for (j, b) in unit.iter_mut().enumerate() {
            let at = (base + j) as u64;
            if at >= off && at < off + len {
                *b = data[(at - off) as usize];
            }
        }
    }
}

fn guest_read(model: &Model, guest: &SharedDev, rng: &mut XorShift) {
    let (off, len) = random_range(rng);
    let mut got = vec![0u8; len as usize];
    let mut expected = vec![0u8; len as usize];
    let g0 = model.generation.load(Ordering::SeqCst);
    {
        let units: Vec<_> = Model::units(off, len)
            .map(|u| model.guest[u].read().unwrap())
            .collect();
        // Split the read over two buffers to exercise vectored splitting.
        let cut = (rng.below(len / SECTOR) * SECTOR) as usize;
        let (a, b) = got.split_at_mut(cut);
        if let Err(e) = guest.read_vectored(off, &[VolatileSlice::from(a), VolatileSlice::from(b)])
        {
            panic!("guest read {off}+{len} failed: {e}");
        }
        let first = Model::units(off, len).start() * UNIT as usize;
        for (i, unit) in units.iter().enumerate() {
            let base = first + i * UNIT as usize;
            for (j, &b) in unit.iter().enumerate() {
                let at = (base + j) as u64;
                if at >= off && at < off + len {
                    expected[(at - off) as usize] = b;
                }
            }
        }
    }
    let g1 = model.generation.load(Ordering::SeqCst);
    if got == expected {
        return;
    }
    // Straddled a checkpoint: the read must equal the state after it, whole.
    if g0 % 2 == 1 || g0 != g1 {
        let post = model.post.lock().unwrap().clone();
        if post.0 >= g0 && post.0 <= g1.max(g0) {
            let window = &post.1[off as usize..(off + len) as usize];
            if got == window {
                model.straddled.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
    }
    let bad = got
        .iter()
        .zip(&expected)
        .position(|(a, b)| a != b)
        .unwrap_or(0);
    panic!(
        "guest read {off}+{len}: byte at {} is {:#04x}, model says {:#04x} (generation {g0}..{g1})",
        off + bad as u64,
        got[bad],
        expected[bad]
    );
}

fn primary_write(model: &Model, primary: &SharedDev, rng: &mut XorShift) {
    let (off, len) = random_range(rng);
    let zeroes = rng.below(8) == 0;
    let mut data = vec![0u8; len as usize];
    if !zeroes {
        rng.fill(&mut data);
    }
    let _writer = model.pause.read().unwrap();
    let mut disk = model.primary.lock().unwrap();
    let res = if zeroes {
        primary.write_zeroes(off, len, false)
    } else {
        primary.write_vectored(off, &[VolatileSlice::from(data.as_mut_slice())])
    };
    if model.failed_over.load(Ordering::SeqCst) {
        assert!(
            matches!(res, Err(BlockError::Refused(_))),
            "primary write after failover not fenced: {res:?}"
        );
        return;
    }
    if let Err(e) = res {
        panic!("primary write {off}+{len} failed: {e}");
    }
    disk[off as usize..(off + len) as usize].copy_from_slice(&data);
}

/// Pauses the writers and checkpoints; the guest's view becomes the primary's.
fn checkpoint(model: &Model, node: &Secondary) {
    let _paused = model.pause.write().unwrap();
    let post: Arc<[u8]> = Arc::from(model.primary.lock().unwrap().clone());
    let g = model.generation.fetch_add(1, Ordering::SeqCst) + 1;
    *model.post.lock().unwrap() = (g, post.clone());
    node.checkpoint().unwrap();
    let mut all: Vec<_> = model.guest.iter().map(|u| u.write().unwrap()).collect();
    for (i, unit) in all.iter_mut().enumerate() {
        let at = i * UNIT as usize;
        let n = unit.len();
        unit.copy_from_slice(&post[at..at + n]);
    }
    drop(all);
    model.generation.fetch_add(1, Ordering::SeqCst);
}

/// Counts a guest thread as ended even when it panics, so that the controller
/// stops waiting for its work.
struct Ended<'a>(&'a AtomicU64);

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Waits until the guests have done `ops` operations or have all ended.
fn wait_for_guest_ops(model: &Model, ops: u64, guests: u64) {
    while model.guest_ops.load(Ordering::SeqCst) < ops
        && model.guests_ended.load(Ordering::SeqCst) < guests
    {
        std::thread::sleep(std::time::Duration::from_micros(500));
    }
}

struct Config {
    cluster: u64,
    guests: u64,
    ops_per_guest: u64,
    checkpoints: u64,
}

fn run(seed: u64, cfg: &Config) {
    println!(
        "model seed {seed:#x} (COLO_MODEL_SEED to replay), cluster {}",
        cfg.cluster
    );
    let mut rng = XorShift::new(seed);
    let mut initial = vec![0u8; DISK as usize];
    rng.fill(&mut initial);
    let disk = Arc::new(MemDev::new(DISK));
    let (active, hidden) = (memory_overlay(DISK), memory_overlay(DISK));
    let node = Secondary::new(
        disk.clone(),
        active.clone(),
        hidden.clone(),
        cfg.cluster,
        no_events(),
    )
    .unwrap();
    let (guest, primary) = (node.guest(), node.primary());
    // Initial sync: stage none, the primary's writes go straight to the disk.
    for (i, chunk) in initial.chunks(1 << 20).enumerate() {
        let mut c = chunk.to_vec();
        primary
            .write_vectored(
                i as u64 * (1 << 20),
                &[VolatileSlice::from(c.as_mut_slice())],
            )
            .unwrap();
    }
    let model = Arc::new(Model::new(&initial));
    node.start(Mode::Secondary, SyncMode::None).unwrap();

    let done = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for t in 0..cfg.guests {
        let (model, guest) = (model.clone(), guest.clone());
        let mut rng = XorShift::new(seed ^ (0x1000 + t).wrapping_mul(0x9e37_79b9));
        let ops = cfg.ops_per_guest;
        threads.push(std::thread::spawn(move || {
            let _ended = Ended(&model.guests_ended);
            for _ in 0..ops {
                match rng.below(20) {
                    0..=8 => guest_read(&model, &guest, &mut rng),
                    9..=17 => guest_write(&model, &guest, &mut rng, false),
                    18 => guest_write(&model, &guest, &mut rng, true),
                    _ => guest.flush().unwrap(),
                }
                model.guest_ops.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let primary_thread = {
        let (model, primary, done) = (model.clone(), primary.clone(), done.clone());
        let mut rng = XorShift::new(seed ^ 0xabcd_ef01);
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !done.load(Ordering::SeqCst) && n < 200_000 {
                primary_write(&model, &primary, &mut rng);
                n += 1;
                if n % 4 == 0 {
                    std::thread::yield_now();
                }
            }
            n
        })
    };

    // Controller: checkpoints spread over the first 70% of the guests' work, then
    // the failover, while guests keep going through the commit.
    let total = cfg.guests * cfg.ops_per_guest;
    let mut checkpoints = 0;
    while checkpoints < cfg.checkpoints {
        let due = total * 7 / 10 * (checkpoints + 1) / (cfg.checkpoints + 1);
        wait_for_guest_ops(&model, due, cfg.guests);
        checkpoint(&model, &node);
        checkpoints += 1;
    }
    wait_for_guest_ops(&model, total * 7 / 10, cfg.guests);
    let dirty = active.allocated_bytes() + hidden.allocated_bytes();
    {
        let _paused = model.pause.write().unwrap();
        node.stop(true).unwrap();
        model.failed_over.store(true, Ordering::SeqCst);
    }
    for t in threads {
        if let Err(e) = t.join() {
            std::panic::resume_unwind(e);
        }
    }
    done.store(true, Ordering::SeqCst);
    let primary_writes = match primary_thread.join() {
        Ok(n) => n,
        Err(e) => std::panic::resume_unwind(e),
    };
    node.wait_commit();
    assert_eq!(node.stage(), Stage::Done);
    node.get_error().unwrap();
    let want = model.snapshot();
    let have = disk.snapshot();
    if let Some(i) = have.iter().zip(&want).position(|(a, b)| a != b) {
        panic!(
            "after failover the disk differs from the guest's view at {i}: {:#04x} vs {:#04x}",
            have[i], want[i]
        );
    }
    assert!(active.is_empty() && hidden.is_empty());
    println!(
        "{} guest ops, {primary_writes} primary writes, {checkpoints} checkpoints, \
         {dirty} bytes dirty at failover, {} reads straddled a checkpoint",
        total,
        model.straddled.load(Ordering::SeqCst)
    );
}

fn seed() -> u64 {
    std::env::var("COLO_MODEL_SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or(0xc01d_b10c)
}

#[test]
fn guest_view_matches_model_through_checkpoints_and_failover() {
    run(
        seed(),
        &Config {
            cluster: 64 << 10,
            guests: 3,
            ops_per_guest: 2500,
            checkpoints: 8,
        },
    );
}

#[test]
fn guest_view_matches_model_with_granule_sized_clusters() {
    run(
        seed() ^ 0x5eed,
        &Config {
            cluster: DEFAULT_GRANULE,
            guests: 2,
            ops_per_guest: 2000,
            checkpoints: 5,
        },
    );
}
