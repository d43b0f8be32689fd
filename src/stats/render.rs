//! The statistics as QMP values (QEMU's `query-blockstats` shape) and as
//! Prometheus text.

use super::device::{total, OpSnapshot, QueueSnapshot, LATENCY_BOUNDARIES_NS};
use super::replication::ReplicationSnapshot;
use serde_json::{json, Map, Value};
use std::fmt::Write;

/// QEMU's prefixes, in `BlockDeviceStats` order: read, write, flush, unmap.
const QEMU_PREFIX: [&str; 4] = ["rd", "wr", "flush", "unmap"];
/// The same classes as Prometheus label values.
const OP_LABEL: [&str; 4] = ["read", "write", "flush", "discard"];

fn histogram(o: &OpSnapshot) -> Value {
    json!({"boundaries": LATENCY_BOUNDARIES_NS, "bins": o.bins})
}

/// One `BlockDeviceStats` object (QEMU's qapi/block-core.json member names;
/// merging and zone append do not exist here and read 0).
pub fn device_stats_json(q: &QueueSnapshot, now_ns: u64) -> Value {
    let mut m = Map::new();
    for (i, p) in QEMU_PREFIX.iter().enumerate() {
        let o = &q.ops[i];
        if *p != "flush" {
            m.insert(format!("{p}_bytes"), json!(o.bytes));
        }
        m.insert(format!("{p}_operations"), json!(o.ops));
        m.insert(format!("{p}_total_time_ns"), json!(o.total_ns));
        if *p != "flush" {
            m.insert(format!("{p}_merged"), json!(0));
        }
        m.insert(format!("failed_{p}_operations"), json!(o.failed));
        m.insert(format!("invalid_{p}_operations"), json!(o.invalid));
    }
    for p in [
        "zone_append_bytes",
        "zone_append_operations",
        "zone_append_total_time_ns",
    ] {
        m.insert(p.into(), json!(0));
    }
    m.insert("zone_append_merged".into(), json!(0));
    m.insert("failed_zone_append_operations".into(), json!(0));
    m.insert("invalid_zone_append_operations".into(), json!(0));
    if q.last_ns > 0 {
        m.insert(
            "idle_time_ns".into(),
            json!(now_ns.saturating_sub(q.last_ns)),
        );
    }
    m.insert("wr_highest_offset".into(), json!(0));
    m.insert("account_invalid".into(), json!(true));
    m.insert("account_failed".into(), json!(true));
    m.insert("timed_stats".into(), json!([]));
    m.insert("rd_latency_histogram".into(), histogram(&q.ops[0]));
    m.insert("wr_latency_histogram".into(), histogram(&q.ops[1]));
    m.insert("flush_latency_histogram".into(), histogram(&q.ops[2]));
    Value::Object(m)
}

/// The `query-blockstats` return value: one `BlockStats` for the served
/// disk (`node-name` = the disk's node name, `qdev` = the vhost-user
/// device), with colo-blk's per-queue breakdown in `queues`.
pub fn blockstats_json(node: &str, queues: &[QueueSnapshot], now_ns: u64) -> Value {
    let per_queue: Vec<Value> = queues
        .iter()
        .enumerate()
        .map(|(i, q)| json!({"queue": i, "stats": device_stats_json(q, now_ns)}))
        .collect();
    json!([{
        "device": "",
        "node-name": node,
        "qdev": "vhost-user-blk",
        "stats": device_stats_json(&total(queues), now_ns),
        "queues": per_queue,
    }])
}

/// The `query-replication-stats` return value.
pub fn replication_json(r: &ReplicationSnapshot) -> Value {
    json!({
        "forwarded-writes": r.forwarded_writes,
        "forwarded-bytes": r.forwarded_bytes,
        "cbw-copies": r.cbw_copies,
        "cbw-bytes": r.cbw_bytes,
        "resync-bytes": r.resync_bytes,
        "commit-bytes": r.commit_bytes,
        "errors": r.errors,
    })
}

/// Prometheus text exposition format 0.0.4.
pub fn prometheus_text(queues: &[QueueSnapshot], r: &ReplicationSnapshot) -> String {
    let mut s = String::new();
    let counter = |s: &mut String, name: &str, help: &str| {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
    };
    let per_op = |s: &mut String, name: &str, help: &str, f: &dyn Fn(&OpSnapshot) -> u64| {
        counter(s, name, help);
        for (qi, q) in queues.iter().enumerate() {
            for (i, op) in OP_LABEL.iter().enumerate() {
                let _ = writeln!(s, "{name}{{queue=\"{qi}\",op=\"{op}\"}} {}", f(&q.ops[i]));
            }
        }
    };
    per_op(
        &mut s,
        "coloblk_requests_total",
        "Requests completed successfully.",
        &|o| o.ops,
    );
    per_op(
        &mut s,
        "coloblk_bytes_total",
        "Bytes of successful requests.",
        &|o| o.bytes,
    );
    per_op(
        &mut s,
        "coloblk_failed_requests_total",
        "Requests whose I/O failed.",
        &|o| o.failed,
    );
    per_op(
        &mut s,
        "coloblk_invalid_requests_total",
        "Requests refused as invalid.",
        &|o| o.invalid,
    );
    let _ = writeln!(
        s,
        "# HELP coloblk_request_latency_seconds Latency from pick-up to the used ring.\n\
         # TYPE coloblk_request_latency_seconds histogram"
    );
    for (qi, q) in queues.iter().enumerate() {
        for (i, op) in OP_LABEL.iter().enumerate() {
            let o = &q.ops[i];
            let mut cum = 0;
            for (b, n) in LATENCY_BOUNDARIES_NS.iter().zip(o.bins.iter()) {
                cum += n;
                let le = *b as f64 / 1e9;
                let _ = writeln!(
                    s,
                    "coloblk_request_latency_seconds_bucket{{queue=\"{qi}\",op=\"{op}\",le=\"{le}\"}} {cum}"
                );
            }
            cum += o.bins[o.bins.len() - 1];
            let l = format!("queue=\"{qi}\",op=\"{op}\"");
            let _ = writeln!(
                s,
                "coloblk_request_latency_seconds_bucket{{{l},le=\"+Inf\"}} {cum}\n\
                 coloblk_request_latency_seconds_sum{{{l}}} {}\n\
                 coloblk_request_latency_seconds_count{{{l}}} {cum}",
                o.total_ns as f64 / 1e9
            );
        }
    }
    let repl = [
        (
            "coloblk_replication_forwarded_writes_total",
            "Writes forwarded to the secondary.",
            r.forwarded_writes,
        ),
        (
            "coloblk_replication_forwarded_bytes_total",
            "Bytes forwarded to the secondary.",
            r.forwarded_bytes,
        ),
        (
            "coloblk_replication_cbw_copies_total",
            "Copy-before-write copies to hidden.",
            r.cbw_copies,
        ),
        (
            "coloblk_replication_cbw_bytes_total",
            "Copy-before-write bytes.",
            r.cbw_bytes,
        ),
        (
            "coloblk_replication_resync_bytes_total",
            "Bytes copied by resyncs.",
            r.resync_bytes,
        ),
        (
            "coloblk_replication_commit_bytes_total",
            "Bytes committed at failover.",
            r.commit_bytes,
        ),
        (
            "coloblk_replication_errors_total",
            "Replication errors recorded.",
            r.errors,
        ),
    ];
    for (name, help, v) in repl {
        counter(&mut s, name, help);
        let _ = writeln!(s, "{name} {v}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_read() -> Vec<QueueSnapshot> {
        let mut q = QueueSnapshot::default();
        q.ops[0].ops = 3;
        q.ops[0].bytes = 12288;
        q.ops[0].bins[2] = 3;
        q.ops[0].total_ns = 240_000;
        q.last_ns = 10;
        vec![q, QueueSnapshot::default()]
    }

    #[test]
    fn blockstats_has_qemus_member_names_and_sums_queues() {
        let v = blockstats_json("parent0", &one_read(), 110);
        let st = &v[0]["stats"];
        assert_eq!(st["rd_operations"], 3);
        assert_eq!(st["rd_bytes"], 12288);
        assert_eq!(st["wr_operations"], 0);
        assert_eq!(st["flush_operations"], 0);
        assert_eq!(st["unmap_bytes"], 0);
        assert_eq!(st["idle_time_ns"], 100);
        assert_eq!(st["rd_latency_histogram"]["bins"][2], 3);
        assert_eq!(
            st["rd_latency_histogram"]["bins"].as_array().unwrap().len(),
            LATENCY_BOUNDARIES_NS.len() + 1
        );
        assert_eq!(v[0]["queues"][1]["stats"]["rd_operations"], 0);
        assert_eq!(v[0]["node-name"], "parent0");
    }

    #[test]
    fn prometheus_buckets_are_cumulative_and_end_with_the_count() {
        let text = prometheus_text(&one_read(), &ReplicationSnapshot::default());
        assert!(text.contains("coloblk_requests_total{queue=\"0\",op=\"read\"} 3\n"));
        assert!(text.contains(
            "coloblk_request_latency_seconds_bucket{queue=\"0\",op=\"read\",le=\"0.0001\"} 3\n"
        ));
        assert!(text.contains(
            "coloblk_request_latency_seconds_bucket{queue=\"0\",op=\"read\",le=\"+Inf\"} 3\n"
        ));
        assert!(
            text.contains("coloblk_request_latency_seconds_sum{queue=\"0\",op=\"read\"} 0.00024\n")
        );
        assert!(text.contains("coloblk_replication_errors_total 0\n"));
    }
}
