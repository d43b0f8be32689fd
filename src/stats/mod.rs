//! I/O statistics: per-queue request counters and latency histograms
//! ([`DeviceStats`], shown by `query-blockstats` in QEMU's shape), replication
//! counters ([`replication()`]), `colo-blk ctl stats`, and an optional
//! Prometheus endpoint ([`MetricsServer`]).
//!
//! The data path touches this module once per request: the worker that puts
//! a completed request in the used ring calls [`DeviceStats::record`] with
//! the [`RequestStat`] the request carried since it was parsed.

mod device;
mod metrics;
mod render;
mod replication;
mod request;

pub use device::{
    total, DeviceStats, OpSnapshot, QueueSnapshot, QueueStats, LATENCY_BOUNDARIES_NS,
};
pub use metrics::{MetricsAddr, MetricsServer, Render};
pub use render::{blockstats_json, device_stats_json, prometheus_text, replication_json};
pub use replication::{replication, ReplicationCounters, ReplicationSnapshot};
pub use request::{Outcome, RequestStat, StatOp};

use std::net::SocketAddr;
use thiserror::Error;

/// Why the metrics endpoint could not be set up.
#[derive(Debug, Error)]
pub enum StatsError {
    /// `--metrics` does not parse or is not allowed.
    #[error("--metrics {0}: {1}")]
    Addr(String, String),
    /// The unix socket could not be created.
    #[error("metrics {0}")]
    Socket(#[from] crate::unix_socket::UnixSocketError),
    /// The TCP listener could not be bound.
    #[error("metrics: cannot listen on {0}: {1}")]
    Listen(SocketAddr, #[source] std::io::Error),
    /// The server thread could not be started.
    #[error("metrics: cannot start a thread: {0}")]
    Thread(#[source] std::io::Error),
}
