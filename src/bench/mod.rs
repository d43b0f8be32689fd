//! `colo-blk bench`: drives any vhost-user-blk socket through libblkio and
//! reports IOPS, throughput and latency percentiles per workload.
//!
//! It measures whatever serves the socket (colo-blk, qemu-storage-daemon, ...),
//! so `integration/bench-peers.sh` can compare peers on the same image.

pub(crate) mod client;
mod workload;

use clap::Args;
use client::BenchClient;
use std::path::PathBuf;
use std::time::Duration;
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

    /// Comma-separated workloads to run (default: all). Known:
    /// seqwrite-1m-qd8, seqread-1m-qd8, randread-4k-qd1, randwrite-4k-qd1,
    /// randread-4k-qd32, randwrite-4k-qd32.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub workloads: Vec<String>,
}

/// Why a benchmark could not run.
#[derive(Debug, Error)]
pub enum BenchError {
    /// A libblkio call failed.
    #[error("libblkio {0}: {1}")]
    Blkio(&'static str, String),
    /// A request completed with an error.
    #[error("{0}: request failed with errno {1}")]
    Request(&'static str, i32),
    /// The device is too small for the workload.
    #[error("device of {0} bytes is too small for the workload")]
    TooSmall(u64),
    /// Bad flags.
    #[error("{0}")]
    Usage(String),
}

/// Runs the selected workloads and prints one table row and one
/// machine-readable `RESULT` line per workload.
pub fn run(args: &BenchArgs) -> Result<(), BenchError> {
    if !(args.seconds > 0.0 && args.seconds <= 3600.0) {
        return Err(BenchError::Usage(format!(
            "--seconds {} is not in (0, 3600]",
            args.seconds
        )));
    }
    let selected: Vec<workload::Workload> = if args.workloads.is_empty() {
        workload::ALL.to_vec()
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
    let buf = selected
        .iter()
        .map(|w| w.block * w.depth)
        .max()
        .unwrap_or(4096);
    let mut client = BenchClient::connect(&args.socket, buf)?;
    client.fill(0xa5);
    let duration = Duration::from_secs_f64(args.seconds);
    println!(
        "{:<20} {:>10} {:>9} {:>10} {:>10}",
        "workload", "IOPS", "MB/s", "p50 us", "p99 us"
    );
    for w in selected {
        let o = workload::run(&mut client, w, duration)?;
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "{:<20} {:>10.0} {:>9.1} {:>10.1} {:>10.1}",
            w.name,
            o.iops(),
            o.mbps(),
            us(o.p50),
            us(o.p99)
        );
        println!(
            "RESULT {} {:.0} {:.1} {:.1} {:.1}",
            w.name,
            o.iops(),
            o.mbps(),
            us(o.p50),
            us(o.p99)
        );
    }
    Ok(())
}
