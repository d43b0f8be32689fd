//! `colo-blk bench`: drives any vhost-user-blk socket through libblkio and
//! reports IOPS, throughput and latency percentiles per workload.
//!
//! It measures whatever serves the socket (colo-blk, qemu-storage-daemon, ...),
//! so `integration/bench-peers.sh` can compare peers on the same image.

mod probe;
mod workload;

use clap::Args;
use colo_blk_testkit::{Client, ClientOptions, IoError};
use probe::Probe;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use thiserror::Error;

/// `colo-blk bench` flags.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// vhost-user-blk socket to benchmark (any backend).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,

    /// Seconds per workload.
    #[arg(long, value_name = "N", default_value_t = 3.0)]
    pub seconds: f64,

    /// Comma-separated workloads to run. Default: seqwrite-1m-qd8,
    /// seqread-1m-qd8, randread-4k-qd1, randwrite-4k-qd1, randread-4k-qd32,
    /// randwrite-4k-qd32. Also known: randread-4k-qd128, randwrite-4k-qd128
    /// (need a queue size of at least 128), randread-4k-2q-qd32,
    /// randwrite-4k-2q-qd32 (2 queues, QD32 each, one thread per queue).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub workloads: Vec<String>,

    /// Queues to start (default: as many as the selected workloads use).
    #[arg(long, value_name = "N")]
    pub num_queues: Option<usize>,

    /// Virtqueue size to ask for (default: libblkio's, 256).
    #[arg(long, value_name = "N")]
    pub queue_size: Option<u32>,

    /// Also report the CPU use (utime+stime from /proc/PID/stat, as % of one
    /// core) and the thread count of process PID (the server, on this host).
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,

    /// After the workloads, keep the connection open with no request in
    /// flight for N seconds and report the server's CPU use (needs --pid).
    #[arg(long, value_name = "N", default_value_t = 0.0)]
    pub idle_seconds: f64,
}

/// Why a benchmark could not run.
#[derive(Debug, Error)]
pub enum BenchError {
    /// A libblkio call failed.
    #[error("libblkio {0}: {1}")]
    Blkio(&'static str, #[source] IoError),
    /// A request completed with an error.
    #[error("{0}: request failed with errno {1}")]
    Request(&'static str, i32),
    /// A queue's thread panicked.
    #[error("queue thread panicked")]
    Panicked,
    /// The device is too small for the workload.
    #[error("device of {0} bytes is too small for the workload")]
    TooSmall(u64),
    /// Bad flags.
    #[error("{0}")]
    Usage(String),
}

/// Runs the selected workloads and prints one table row and one
/// machine-readable line per workload:
/// `RESULT name iops mb/s p50_us p99_us cpu_pct threads` (the last two are
/// `-` without `--pid`); with `--idle-seconds`, a last `RESULT idle 0 0 0 0
/// cpu_pct threads`.
pub fn run(args: &BenchArgs) -> Result<(), BenchError> {
    if !(args.seconds > 0.0 && args.seconds <= 3600.0) {
        return Err(BenchError::Usage(format!(
            "--seconds {} is not in (0, 3600]",
            args.seconds
        )));
    }
    if !(0.0..=3600.0).contains(&args.idle_seconds) {
        return Err(BenchError::Usage(format!(
            "--idle-seconds {} is not in [0, 3600]",
            args.idle_seconds
        )));
    }
    let selected: Vec<workload::Workload> = if args.workloads.is_empty() {
        workload::ALL
            .iter()
            .filter(|w| w.default)
            .copied()
            .collect()
    } else {
        args.workloads
            .iter()
            .map(|name| {
                workload::ALL
                    .iter()
                    .find(|w| w.name == name)
                    .copied()
                    .ok_or_else(|| BenchError::Usage(format!("unknown workload {name:?}")))
            })
            .collect::<Result<_, _>>()?
    };
    let probe = match args.pid {
        Some(pid) => Some(Probe::new(pid)?),
        None if args.idle_seconds > 0.0 => {
            return Err(BenchError::Usage("--idle-seconds needs --pid".into()))
        }
        None => None,
    };
    let wanted = selected.iter().map(|w| w.queues).max().unwrap_or(1);
    let num_queues = args.num_queues.unwrap_or(wanted);
    if num_queues < wanted || num_queues == 0 || num_queues > 64 {
        return Err(BenchError::Usage(format!(
            "--num-queues {num_queues}: the workloads need {wanted} (at most 64)"
        )));
    }
    let buf_per_queue = selected
        .iter()
        .map(|w| w.block * w.depth)
        .max()
        .unwrap_or(4096);
    let mut client = Client::connect_with(
        &args.socket,
        ClientOptions {
            num_queues,
            queue_size: args.queue_size,
            buf_per_queue,
            read_only: false,
        },
    )
    .map_err(|e| BenchError::Blkio("connect", e))?;
    client.fill(0xa5);
    let duration = Duration::from_secs_f64(args.seconds);
    println!(
        "{:<20} {:>10} {:>9} {:>10} {:>10} {:>7} {:>7}",
        "workload", "IOPS", "MB/s", "p50 us", "p99 us", "cpu %", "threads"
    );
    let pct = |c: Option<f64>| c.map_or("-".to_string(), |c| format!("{:.1}", c * 100.0));
    let count = |t: Option<usize>| t.map_or("-".to_string(), |t| t.to_string());
    for w in selected {
        let o = workload::run(&mut client, w, duration, probe.as_ref())?;
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "{:<20} {:>10.0} {:>9.1} {:>10.1} {:>10.1} {:>7} {:>7}",
            w.name,
            o.iops(),
            o.mbps(),
            us(o.p50),
            us(o.p99),
            pct(o.cpu),
            count(o.threads)
        );
        println!(
            "RESULT {} {:.0} {:.1} {:.1} {:.1} {} {}",
            w.name,
            o.iops(),
            o.mbps(),
            us(o.p50),
            us(o.p99),
            pct(o.cpu),
            count(o.threads)
        );
    }
    if let Some(probe) = probe.filter(|_| args.idle_seconds > 0.0) {
        let (cpu, threads) = idle(&probe, Duration::from_secs_f64(args.idle_seconds));
        println!(
            "{:<20} {:>10} {:>9} {:>10} {:>10} {:>7} {:>7}",
            "idle",
            "-",
            "-",
            "-",
            "-",
            pct(cpu),
            count(threads)
        );
        println!("RESULT idle 0 0 0 0 {} {}", pct(cpu), count(threads));
    }
    Ok(())
}

/// CPU use (fraction of one core) of the probed process over `duration` with
/// the connection open and nothing in flight, and its thread count then.
fn idle(probe: &Probe, duration: Duration) -> (Option<f64>, Option<usize>) {
    let cpu0 = probe.cpu_seconds();
    let t0 = Instant::now();
    std::thread::sleep(duration);
    let cpu = match (cpu0, probe.cpu_seconds()) {
        (Some(a), Some(b)) => Some((b - a) / t0.elapsed().as_secs_f64()),
        _ => None,
    };
    (cpu, probe.threads())
}
