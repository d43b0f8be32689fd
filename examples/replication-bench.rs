//! Benchmarks of the secondary replication node at the library level (no vhost,
//! no NBD), on real files:
//!
//! * checkpoint time with 256 MiB of dirty overlays (contiguous and scattered);
//! * the primary's write stream through copy-before-write vs straight to the file;
//! * guest 4k random reads/writes through the node vs straight to the file.
//!
//! `cargo run --release --example replication-bench -- [DIR] [OVERLAY_DIR] [SECTIONS]`:
//! the disk goes to DIR (default: the system temp dir), the overlays to
//! OVERLAY_DIR (default /dev/shm when it exists); SECTIONS is a comma list of
//! checkpoint, primary, guest (default: all). Reports ratios; absolute
//! numbers depend on the machine and its page cache.

use colo_blk::block::{BlockDev, Overlay, RawFile, SharedDev};
use colo_blk::replication::{
    no_events, Mode, Replication, Secondary, SyncMode, DEFAULT_CLUSTER_SIZE,
};
use colo_blk_testkit::XorShift;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::VolatileSlice;

const MIB: u64 = 1 << 20;
const DISK: u64 = 1024 * MIB;

fn raw(path: &Path, size: u64) -> Arc<RawFile> {
    Arc::new(RawFile::create(path, size).expect("open disk"))
}

fn fill(dev: &dyn BlockDev, byte: u8) {
    let mut buf = vec![byte; 4 * MIB as usize];
    let mut pos = 0;
    while pos < dev.size() {
        dev.write_vectored(pos, &[VolatileSlice::from(buf.as_mut_slice())])
            .expect("fill");
        pos += buf.len() as u64;
    }
}

struct Bed {
    disk: Arc<RawFile>,
    node: Arc<Secondary>,
}

fn bed(dir: &Path, ovdir: &Path, tag: &str) -> Bed {
    let disk = raw(&dir.join(format!("bench-{tag}.img")), DISK);
    fill(&*disk, 0x11);
    let active =
        Arc::new(Overlay::create(&ovdir.join(format!("bench-{tag}.active")), DISK).unwrap());
    let hidden =
        Arc::new(Overlay::create(&ovdir.join(format!("bench-{tag}.hidden")), DISK).unwrap());
    let node = Secondary::new(
        disk.clone(),
        active,
        hidden,
        DEFAULT_CLUSTER_SIZE,
        no_events(),
    )
    .unwrap();
    node.start(Mode::Secondary, SyncMode::None).unwrap();
    Bed { disk, node }
}

/// Ops per second of `op(i)` run for about `secs` on `threads` threads.
fn rate(threads: u64, secs: f64, op: impl Fn(u64, &mut XorShift, &mut [u8]) + Sync) -> f64 {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let total: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let op = &op;
                s.spawn(move || {
                    let mut rng = XorShift::new(0x9e37_79b9_7f4a_7c15 ^ (t + 1));
                    let mut buf = vec![0x5au8; 64 << 10];
                    let mut n = 0;
                    while Instant::now() < deadline {
                        op(t, &mut rng, &mut buf);
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    total as f64 / start.elapsed().as_secs_f64()
}

fn checkpoint_bench(dir: &Path, ovdir: &Path) {
    println!(
        "## checkpoint with 256 MiB dirty (128 MiB active + 128 MiB hidden), overlays in {}",
        ovdir.display()
    );
    let b = bed(dir, ovdir, "ckpt");
    let guest = b.node.guest();
    let primary = b.node.primary();
    for (name, scattered) in [("contiguous", false), ("scattered 4k", true)] {
        let mut times = Vec::new();
        for round in 0..3 {
            let mut rng = XorShift::new(42 + round);
            let mut buf = vec![0x33u8; if scattered { 4096 } else { 4 * MIB as usize }];
            if scattered {
                // 32768 scattered granules in active, hidden filled by CBW of
                // 2048 scattered 64k clusters.
                while b.node.active().allocated_bytes() < 128 * MIB {
                    let off = rng.next() % (DISK / 4096) * 4096;
                    guest
                        .write_vectored(off, &[VolatileSlice::from(buf.as_mut_slice())])
                        .unwrap();
                }
                while b.node.hidden().allocated_bytes() < 128 * MIB {
                    let off = rng.next() % (DISK / 4096) * 4096;
                    primary
                        .write_vectored(off, &[VolatileSlice::from(buf.as_mut_slice())])
                        .unwrap();
                }
            } else {
                for i in 0..32 {
                    let mut off = i * 4 * MIB;
                    guest
                        .write_vectored(off, &[VolatileSlice::from(buf.as_mut_slice())])
                        .unwrap();
                    off += 512 * MIB;
                    primary
                        .write_vectored(off, &[VolatileSlice::from(buf.as_mut_slice())])
                        .unwrap();
                }
            }
            let dirty = b.node.active().allocated_bytes() + b.node.hidden().allocated_bytes();
            let t = Instant::now();
            b.node.checkpoint().unwrap();
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            let t = Instant::now();
            b.node.wait_released();
            let release_ms = t.elapsed().as_secs_f64() * 1000.0;
            times.push(ms);
            println!(
                "  {name:13} round {round}: {} MiB dirty, checkpoint {ms:.2} ms, space released {release_ms:.0} ms later",
                dirty / MIB
            );
        }
        times.sort_by(f64::total_cmp);
        println!(
            "RESULT checkpoint-256m-{} median_ms={:.2}",
            name.replace(' ', "-"),
            times[1]
        );
    }
    b.node.stop(false).unwrap();
    b.node.wait_released();
}

fn primary_bench(dir: &Path, ovdir: &Path) {
    println!("## primary write stream: through copy-before-write vs straight to the file");
    let b = bed(dir, ovdir, "cbw");
    let plain: SharedDev = raw(&dir.join("bench-cbw-plain.img"), DISK);
    fill(&*plain, 0x11);
    let primary = b.node.primary();
    let secs = 2.0;
    for (name, len) in [("4k random", 4096u64), ("64k random", 65536)] {
        let op = |dev: SharedDev| {
            move |_t: u64, rng: &mut XorShift, buf: &mut [u8]| {
                let off = rng.next() % (DISK / len) * len;
                dev.write_vectored(off, &[VolatileSlice::from(&mut buf[..len as usize])])
                    .unwrap();
            }
        };
        let base = rate(1, secs, op(plain.clone()));
        // Right after a checkpoint: every first write to a cluster copies it.
        b.node.checkpoint().unwrap();
        b.node.wait_released();
        let first = rate(1, secs, op(primary.clone()));
        // Clusters already copied in this interval: the fast path.
        b.node.checkpoint().unwrap();
        b.node.wait_released();
        let mut buf = vec![0u8; 4 * MIB as usize];
        let mut pos = 0;
        while pos < DISK {
            primary
                .write_vectored(pos, &[VolatileSlice::from(buf.as_mut_slice())])
                .unwrap();
            pos += buf.len() as u64;
        }
        let copied = rate(1, secs, op(primary.clone()));
        println!(
            "  {name:10}: plain {base:.0}/s, CBW first-touch {first:.0}/s ({:.2}x), CBW already-copied {copied:.0}/s ({:.2}x)",
            first / base,
            copied / base
        );
        println!(
            "RESULT primary-write-{} plain_iops={base:.0} cbw_first_ratio={:.3} cbw_copied_ratio={:.3}",
            name.replace(' ', "-"),
            first / base,
            copied / base
        );
    }
    b.node.stop(false).unwrap();
    b.node.wait_released();
}

fn guest_bench(dir: &Path, ovdir: &Path) {
    println!(
        "## guest 4k random I/O, 2 threads: through the secondary node vs straight to the file"
    );
    let b = bed(dir, ovdir, "guest");
    let guest = b.node.guest();
    let plain: SharedDev = b.disk.clone();
    let secs = 2.0;
    let read = |dev: SharedDev| {
        move |_t: u64, rng: &mut XorShift, buf: &mut [u8]| {
            let off = rng.next() % (DISK / 4096) * 4096;
            dev.read_vectored(off, &[VolatileSlice::from(&mut buf[..4096])])
                .unwrap();
        }
    };
    let write = |dev: SharedDev| {
        move |_t: u64, rng: &mut XorShift, buf: &mut [u8]| {
            let off = rng.next() % (DISK / 4096) * 4096;
            dev.write_vectored(off, &[VolatileSlice::from(&mut buf[..4096])])
                .unwrap();
        }
    };
    let base_r = rate(2, secs, read(plain.clone()));
    let node_r = rate(2, secs, read(guest.clone()));
    println!(
        "  randread  clean overlays: plain {base_r:.0}/s, secondary {node_r:.0}/s ({:.2}x)",
        node_r / base_r
    );
    let base_w = rate(2, secs, write(plain.clone()));
    let node_w = rate(2, secs, write(guest.clone()));
    println!(
        "  randwrite (into active):  plain {base_w:.0}/s, secondary {node_w:.0}/s ({:.2}x)",
        node_w / base_w
    );
    let node_r_dirty = rate(2, secs, read(guest.clone()));
    println!(
        "  randread  after the writes ({} MiB in active): secondary {node_r_dirty:.0}/s ({:.2}x)",
        b.node.active().allocated_bytes() / MIB,
        node_r_dirty / base_r
    );
    println!(
        "RESULT guest-lib randread_ratio={:.3} randwrite_ratio={:.3} randread_dirty_ratio={:.3}",
        node_r / base_r,
        node_w / base_w,
        node_r_dirty / base_r
    );
    b.node.stop(false).unwrap();
    b.node.wait_released();
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let ovdir = args.next().map(PathBuf::from).unwrap_or_else(|| {
        let shm = PathBuf::from("/dev/shm");
        if shm.is_dir() {
            shm
        } else {
            dir.clone()
        }
    });
    let work = tempfile::tempdir_in(&dir).expect("temp dir");
    let ovwork = tempfile::tempdir_in(&ovdir).expect("overlay temp dir");
    let only = args
        .next()
        .unwrap_or_else(|| "checkpoint,primary,guest".into());
    let run = |name: &str| only.split(',').any(|s| s == name);
    if run("checkpoint") {
        checkpoint_bench(work.path(), ovwork.path());
    }
    if run("primary") {
        primary_bench(work.path(), ovwork.path());
    }
    if run("guest") {
        guest_bench(work.path(), ovwork.path());
    }
}
