//! The benchmark workloads and the closed-loop runner that measures them.

use super::client::{BenchClient, Done};
use super::BenchError;
use std::time::{Duration, Instant};

/// One fixed-depth access pattern.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// Name used in reports (`randread-4k-qd1`, ...).
    pub name: &'static str,
    /// Bytes per request.
    pub block: usize,
    /// Requests kept in flight.
    pub depth: usize,
    /// Writes (else reads).
    pub write: bool,
    /// Random offsets (else sequential, wrapping at the end of the disk).
    pub random: bool,
}

/// Every workload, in the order they run: sequential writes first, so that
/// reads never hit unallocated (and artificially fast) ranges.
pub const ALL: [Workload; 6] = [
    Workload {
        name: "seqwrite-1m-qd8",
        block: 1 << 20,
        depth: 8,
        write: true,
        random: false,
    },
    Workload {
        name: "seqread-1m-qd8",
        block: 1 << 20,
        depth: 8,
        write: false,
        random: false,
    },
    Workload {
        name: "randread-4k-qd1",
        block: 4096,
        depth: 1,
        write: false,
        random: true,
    },
    Workload {
        name: "randwrite-4k-qd1",
        block: 4096,
        depth: 1,
        write: true,
        random: true,
    },
    Workload {
        name: "randread-4k-qd32",
        block: 4096,
        depth: 32,
        write: false,
        random: true,
    },
    Workload {
        name: "randwrite-4k-qd32",
        block: 4096,
        depth: 32,
        write: true,
        random: true,
    },
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

/// Runs `w` for `duration` on `client` (a closed loop: every completion is
/// replaced by a new request until time is up).
pub fn run(
    client: &mut BenchClient,
    w: Workload,
    duration: Duration,
) -> Result<Outcome, BenchError> {
    let blocks = client.capacity / w.block as u64;
    if blocks < w.depth as u64 {
        return Err(BenchError::TooSmall(client.capacity));
    }
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ w.block as u64 ^ (w.depth as u64) << 32;
    let mut seq = 0u64;
    let mut next_offset = || {
        let block = if w.random {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % blocks
        } else {
            seq = (seq + 1) % blocks;
            seq
        };
        block * w.block as u64
    };

    let mut started = vec![Instant::now(); w.depth];
    let mut latencies: Vec<u32> = Vec::with_capacity(1 << 16);
    let mut done: Vec<Done> = Vec::with_capacity(super::client::BATCH);
    let t0 = Instant::now();
    for (slot, start) in started.iter_mut().enumerate() {
        *start = Instant::now();
        client.submit(w.write, next_offset(), w.block, slot);
    }
    let mut in_flight = w.depth;
    let mut ops = 0u64;
    while in_flight > 0 {
        client.reap(&mut done)?;
        let now = Instant::now();
        let more = now.duration_since(t0) < duration;
        for d in &done {
            if d.ret < 0 {
                return Err(BenchError::Request(w.name, -d.ret));
            }
            let lat = now.duration_since(started[d.slot]);
            latencies.push(u32::try_from(lat.as_nanos()).unwrap_or(u32::MAX));
            ops += 1;
            if more {
                started[d.slot] = now;
                client.submit(w.write, next_offset(), w.block, d.slot);
            } else {
                in_flight -= 1;
            }
        }
    }
    let elapsed = t0.elapsed();
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
    })
}
