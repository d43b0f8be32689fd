//! The benchmark workloads and the closed-loop runner that measures them.

use super::probe::Probe;
use super::BenchError;
use colo_blk_testkit::{Client, Done, Queue, XorShift};
use std::time::{Duration, Instant};

/// One fixed-depth access pattern.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// Name used in reports (`randread-4k-qd1`, ...).
    pub name: &'static str,
    /// Bytes per request.
    pub block: usize,
    /// Requests kept in flight per queue.
    pub depth: usize,
    /// Queues driven at once, one thread each (the device must offer them).
    pub queues: usize,
    /// Writes (else reads).
    pub write: bool,
    /// Random offsets (else sequential, wrapping at the end of the disk).
    pub random: bool,
    /// Run when no `--workloads` list is given.
    pub default: bool,
}

const fn wl(
    name: &'static str,
    block: usize,
    depth: usize,
    queues: usize,
    write: bool,
    random: bool,
    default: bool,
) -> Workload {
    Workload {
        name,
        block,
        depth,
        queues,
        write,
        random,
        default,
    }
}

/// Every workload, in the order they run: sequential writes first, so that
/// reads never hit unallocated (and artificially fast) ranges. The first six
/// are the default set (one queue, depth at most 32, any queue size); the
/// others need `--queue-size 256` or more (QD128) or a device with 2 queues,
/// or probe one engine choice (QD2: two requests that complete apart, which
/// must never be served one at a time).
pub const ALL: [Workload; 12] = [
    wl("seqwrite-1m-qd8", 1 << 20, 8, 1, true, false, true),
    wl("seqread-1m-qd8", 1 << 20, 8, 1, false, false, true),
    wl("randread-4k-qd1", 4096, 1, 1, false, true, true),
    wl("randwrite-4k-qd1", 4096, 1, 1, true, true, true),
    wl("randread-4k-qd32", 4096, 32, 1, false, true, true),
    wl("randwrite-4k-qd32", 4096, 32, 1, true, true, true),
    wl("randread-4k-qd128", 4096, 128, 1, false, true, false),
    wl("randwrite-4k-qd128", 4096, 128, 1, true, true, false),
    wl("randread-4k-2q-qd32", 4096, 32, 2, false, true, false),
    wl("randwrite-4k-2q-qd32", 4096, 32, 2, true, true, false),
    wl("randread-4k-qd2", 4096, 2, 1, false, true, false),
    wl("randwrite-4k-qd2", 4096, 2, 1, true, true, false),
];

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The workload.
    pub workload: Workload,
    /// Completed requests.
    pub ops: u64,
    /// Wall time of the measured interval.
    pub elapsed: Duration,
    /// Median completion latency.
    pub p50: Duration,
    /// 99th percentile completion latency.
    pub p99: Duration,
    /// CPU time the probed process used, as a fraction of one core.
    pub cpu: Option<f64>,
    /// Threads of the probed process, sampled half-way through the run.
    pub threads: Option<usize>,
}

impl Outcome {
    /// Requests per second.
    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    /// Megabytes (10^6 bytes) per second.
    pub fn mbps(&self) -> f64 {
        self.iops() * self.workload.block as f64 / 1e6
    }
}

/// Runs `w` for `duration` on `client`: on each of its `w.queues` queues (one
/// thread each) a closed loop replaces every completion by a new request until
/// time is up. With a probe, the process's CPU time over the run and its
/// thread count half-way through are reported too.
pub fn run(
    client: &mut Client,
    w: Workload,
    duration: Duration,
    probe: Option<&Probe>,
) -> Result<Outcome, BenchError> {
    let blocks = client.capacity / w.block as u64;
    if blocks < (w.depth * w.queues) as u64 {
        return Err(BenchError::TooSmall(client.capacity));
    }
    let queues = client
        .queues()
        .get_mut(..w.queues)
        .ok_or_else(|| BenchError::Usage(format!("{} needs {} queues", w.name, w.queues)))?;
    let cpu0 = probe.and_then(Probe::cpu_seconds);
    let t0 = Instant::now();
    let runs: Vec<Result<QueueRun, BenchError>> = if let [queue] = queues {
        vec![run_queue(queue, w, blocks, 0, duration, probe)]
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = queues
                .iter_mut()
                .enumerate()
                .map(|(i, queue)| {
                    let sampler = if i == 0 { probe } else { None };
                    s.spawn(move || run_queue(queue, w, blocks, i as u64, duration, sampler))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(Err(BenchError::Panicked)))
                .collect()
        })
    };
    let wall = t0.elapsed();
    let cpu = match (cpu0, probe.and_then(Probe::cpu_seconds)) {
        (Some(a), Some(b)) => Some((b - a) / wall.as_secs_f64()),
        _ => None,
    };
    let mut ops = 0;
    let mut elapsed = Duration::ZERO;
    let mut threads = None;
    let mut latencies = Vec::new();
    for r in runs {
        let r = r?;
        ops += r.ops;
        elapsed = elapsed.max(r.elapsed);
        threads = threads.or(r.threads);
        latencies.extend_from_slice(&r.latencies);
    }
    latencies.sort_unstable();
    let pct = |p: f64| {
        let i = ((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1));
        Duration::from_nanos(latencies.get(i).copied().unwrap_or(0).into())
    };
    Ok(Outcome {
        workload: w,
        ops,
        elapsed,
        p50: pct(0.50),
        p99: pct(0.99),
        cpu,
        threads,
    })
}

/// What one queue's loop measured.
struct QueueRun {
    ops: u64,
    elapsed: Duration,
    /// Completion latencies in nanoseconds, unsorted.
    latencies: Vec<u32>,
    threads: Option<usize>,
}

/// The closed loop on one queue. `index` varies the offsets between queues;
/// `sampler` (if any) counts the probed process's threads once, half-way.
fn run_queue(
    queue: &mut Queue,
    w: Workload,
    blocks: u64,
    index: u64,
    duration: Duration,
    sampler: Option<&Probe>,
) -> Result<QueueRun, BenchError> {
    let mut rng = XorShift::new(
        0x9e37_79b9_7f4a_7c15u64
            ^ w.block as u64
            ^ (w.depth as u64) << 32
            ^ index.wrapping_mul(0xd1b5_4a32_d192_ed03),
    );
    let mut seq = index * (blocks / w.queues as u64);
    let mut next_offset = || {
        let block = if w.random {
            rng.below(blocks)
        } else {
            seq = (seq + 1) % blocks;
            seq
        };
        block * w.block as u64
    };

    let mut started = vec![Instant::now(); w.depth];
    let mut latencies: Vec<u32> = Vec::with_capacity(1 << 16);
    let mut done: Vec<Done> = Vec::with_capacity(colo_blk_testkit::libblkio::BATCH);
    let mut threads = None;
    let half = duration / 2;
    let t0 = Instant::now();
    for (slot, start) in started.iter_mut().enumerate() {
        *start = Instant::now();
        queue.submit(w.write, next_offset(), w.block, slot);
    }
    let mut in_flight = w.depth;
    let mut ops = 0u64;
    while in_flight > 0 {
        queue
            .reap(&mut done)
            .map_err(|e| BenchError::Blkio("do_io", e))?;
        let now = Instant::now();
        let since = now.duration_since(t0);
        let more = since < duration;
        if let Some(p) = sampler.filter(|_| threads.is_none() && since >= half) {
            threads = p.threads();
        }
        for d in &done {
            if d.ret < 0 {
                return Err(BenchError::Request(w.name, -d.ret));
            }
            let lat = now.duration_since(started[d.slot]);
            latencies.push(u32::try_from(lat.as_nanos()).unwrap_or(u32::MAX));
            ops += 1;
            if more {
                started[d.slot] = now;
                queue.submit(w.write, next_offset(), w.block, d.slot);
            } else {
                in_flight -= 1;
            }
        }
    }
    Ok(QueueRun {
        ops,
        elapsed: t0.elapsed(),
        latencies,
        threads,
    })
}
