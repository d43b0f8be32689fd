//! Per-queue request counters of one served disk.
//!
//! Each queue has its own [`QueueStats`], aligned to its own cache lines and
//! written only by that queue's worker (relaxed atomics, no lock), so queues
//! never contend here; a reader (`query-blockstats`) sums them. The counters
//! live as long as the process: frontend reconnects keep counting.

use super::request::{Outcome, RequestStat};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Latency histogram boundaries in nanoseconds, in the shape of QEMU's
/// `block-latency-histogram-set` (bins = boundaries + 1; bin i counts
/// latencies in `[boundaries[i-1], boundaries[i])`).
pub const LATENCY_BOUNDARIES_NS: [u64; 11] = [
    10_000,
    50_000,
    100_000,
    500_000,
    1_000_000,
    5_000_000,
    10_000_000,
    50_000_000,
    100_000_000,
    500_000_000,
    1_000_000_000,
];
const BINS: usize = LATENCY_BOUNDARIES_NS.len() + 1;
/// Read, write, flush, discard.
pub(crate) const OPS: usize = 4;

/// Counters of one accounting class on one queue.
#[derive(Default)]
struct OpCounters {
    bytes: AtomicU64,
    ops: AtomicU64,
    failed: AtomicU64,
    invalid: AtomicU64,
    total_ns: AtomicU64,
    bins: [AtomicU64; BINS],
}

/// The counters of one queue. Two cache lines of padding on each side keep
/// a queue's counters off its neighbours' lines (adjacent-line prefetch).
#[repr(align(128))]
#[derive(Default)]
pub struct QueueStats {
    ops: [OpCounters; OPS],
    /// Nanoseconds since [`DeviceStats`] was created, at the last completion.
    last_ns: AtomicU64,
}

/// A consistent-enough copy of one class's counters (each field is read
/// atomically; fields may be from slightly different instants).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpSnapshot {
    /// Bytes of successful requests.
    pub bytes: u64,
    /// Successful requests.
    pub ops: u64,
    /// Requests whose I/O failed.
    pub failed: u64,
    /// Requests refused as invalid.
    pub invalid: u64,
    /// Sum of the latencies of successful and failed requests.
    pub total_ns: u64,
    /// Latency histogram over [`LATENCY_BOUNDARIES_NS`].
    pub bins: [u64; BINS],
}

impl OpSnapshot {
    fn add(&mut self, o: &OpSnapshot) {
        self.bytes += o.bytes;
        self.ops += o.ops;
        self.failed += o.failed;
        self.invalid += o.invalid;
        self.total_ns += o.total_ns;
        for (a, b) in self.bins.iter_mut().zip(o.bins.iter()) {
            *a += b;
        }
    }
}

/// Read, write, flush and discard counters of a queue (or of all queues).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueSnapshot {
    /// Indexed read, write, flush, discard.
    pub ops: [OpSnapshot; OPS],
    /// Nanoseconds since the stats were created, at the last completion
    /// (0: none yet).
    pub last_ns: u64,
}

impl QueueStats {
    /// Accounts one request that just entered the used ring.
    pub fn record(&self, s: &RequestStat, epoch: Instant) {
        let Some(i) = s.op.index() else { return };
        let c = &self.ops[i];
        let now = Instant::now();
        let latency = s
            .started
            .map(|t| now.saturating_duration_since(t).as_nanos() as u64);
        match s.outcome {
            Outcome::Ok => {
                c.ops.fetch_add(1, Ordering::Relaxed);
                c.bytes.fetch_add(s.bytes, Ordering::Relaxed);
            }
            Outcome::Failed => {
                c.failed.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Invalid => {
                // QEMU times neither invalid requests nor puts them in the
                // histogram: they did no I/O.
                c.invalid.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        if let Some(ns) = latency {
            c.total_ns.fetch_add(ns, Ordering::Relaxed);
            let bin = LATENCY_BOUNDARIES_NS.partition_point(|&b| b <= ns);
            c.bins[bin].fetch_add(1, Ordering::Relaxed);
        }
        let since = now.saturating_duration_since(epoch).as_nanos() as u64;
        self.last_ns.store(since.max(1), Ordering::Relaxed);
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> QueueSnapshot {
        let mut out = QueueSnapshot {
            last_ns: self.last_ns.load(Ordering::Relaxed),
            ..QueueSnapshot::default()
        };
        for (o, c) in out.ops.iter_mut().zip(self.ops.iter()) {
            o.bytes = c.bytes.load(Ordering::Relaxed);
            o.ops = c.ops.load(Ordering::Relaxed);
            o.failed = c.failed.load(Ordering::Relaxed);
            o.invalid = c.invalid.load(Ordering::Relaxed);
            o.total_ns = c.total_ns.load(Ordering::Relaxed);
            for (b, a) in o.bins.iter_mut().zip(c.bins.iter()) {
                *b = a.load(Ordering::Relaxed);
            }
        }
        out
    }
}

/// The counters of every queue of one disk.
pub struct DeviceStats {
    queues: Box<[QueueStats]>,
    epoch: Instant,
}

impl std::fmt::Debug for DeviceStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceStats")
            .field("queues", &self.queues.len())
            .finish()
    }
}

impl DeviceStats {
    /// Counters for `num_queues` queues, all zero.
    pub fn new(num_queues: usize) -> Arc<Self> {
        Arc::new(DeviceStats {
            queues: (0..num_queues).map(|_| QueueStats::default()).collect(),
            epoch: Instant::now(),
        })
    }

    /// Accounts a request completed on queue `q` (ignored for a queue index
    /// beyond the configured count).
    pub fn record(&self, q: usize, s: &RequestStat) {
        if let Some(qs) = self.queues.get(q) {
            qs.record(s, self.epoch);
        }
    }

    /// Per-queue copies, indexed like the queues.
    pub fn per_queue(&self) -> Vec<QueueSnapshot> {
        self.queues.iter().map(QueueStats::snapshot).collect()
    }

    /// Nanoseconds since these stats were created.
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// Sums per-queue copies into the disk's totals.
pub fn total(queues: &[QueueSnapshot]) -> QueueSnapshot {
    let mut t = QueueSnapshot::default();
    for q in queues {
        for (a, b) in t.ops.iter_mut().zip(q.ops.iter()) {
            a.add(b);
        }
        t.last_ns = t.last_ns.max(q.last_ns);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::request::StatOp;
    use std::time::Duration;

    fn req(op: StatOp, bytes: u64, outcome: Outcome, ago: Duration) -> RequestStat {
        RequestStat {
            op,
            bytes,
            started: Instant::now().checked_sub(ago),
            outcome,
        }
    }

    #[test]
    fn outcomes_land_in_their_own_counters_and_queues_stay_apart() {
        let s = DeviceStats::new(2);
        let ms = Duration::from_millis(2);
        s.record(0, &req(StatOp::Read, 4096, Outcome::Ok, ms));
        s.record(0, &req(StatOp::Read, 512, Outcome::Ok, ms));
        s.record(1, &req(StatOp::Write, 8192, Outcome::Ok, ms));
        s.record(1, &req(StatOp::Write, 8192, Outcome::Failed, ms));
        s.record(1, &req(StatOp::Discard, 1 << 20, Outcome::Invalid, ms));
        s.record(0, &req(StatOp::Other, 20, Outcome::Ok, ms));
        s.record(7, &req(StatOp::Read, 1, Outcome::Ok, ms));
        let q = s.per_queue();
        assert_eq!((q[0].ops[0].ops, q[0].ops[0].bytes), (2, 4608));
        assert_eq!(q[0].ops[1], OpSnapshot::default());
        assert_eq!(
            (q[1].ops[1].ops, q[1].ops[1].bytes, q[1].ops[1].failed),
            (1, 8192, 1)
        );
        assert_eq!((q[1].ops[3].ops, q[1].ops[3].invalid), (0, 1));
        let t = total(&q);
        assert_eq!(t.ops[0].ops + t.ops[1].ops + t.ops[2].ops + t.ops[3].ops, 3);
        // 2 ms falls in [1 ms, 5 ms): bin 5; the invalid discard is not timed.
        assert_eq!(t.ops[0].bins[5], 2);
        assert_eq!(t.ops[1].bins.iter().sum::<u64>(), 2);
        assert_eq!(t.ops[3].bins.iter().sum::<u64>(), 0);
        assert!(t.ops[0].total_ns >= 4_000_000);
    }

    #[test]
    fn queue_counters_do_not_share_cache_lines() {
        assert!(std::mem::align_of::<QueueStats>() >= 128);
        assert_eq!(std::mem::size_of::<QueueStats>() % 128, 0);
    }
}
