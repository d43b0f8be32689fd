//! Statistics: what a known libblkio workload makes `query-blockstats`
//! (through `colo-blk ctl --json stats`) and the Prometheus endpoint report,
//! per queue and in all, on each I/O engine path: inline and pool (sync
//! engine), and the io_uring channel.

mod common;

use common::{ctl_ok, sparse_image, Client, ClientOptions, Daemon};
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// What one queue was asked to do: counts and bytes per class.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Issued {
    reads: u64,
    read_bytes: u64,
    writes: u64,
    write_bytes: u64,
    flushes: u64,
    discards: u64,
    discard_bytes: u64,
}

impl Issued {
    fn add(&mut self, o: &Issued) {
        self.reads += o.reads;
        self.read_bytes += o.read_bytes;
        self.writes += o.writes;
        self.write_bytes += o.write_bytes;
        self.flushes += o.flushes;
        self.discards += o.discards;
        self.discard_bytes += o.discard_bytes;
    }
}

/// Queue 0: small and large (pool-sized) reads, writes, write-zeroes (a
/// write, as QEMU accounts it), flushes, discards. Queue 1: a different mix,
/// so a swapped queue index shows.
fn workload(c: &mut Client) -> [Issued; 2] {
    let mut issued = [Issued::default(); 2];
    let q0 = &mut issued[0];
    for i in 0..7u64 {
        c.queue(0).write(i * 4096, &[i as u8; 4096]).unwrap();
        q0.writes += 1;
        q0.write_bytes += 4096;
    }
    for i in 0..5u64 {
        c.queue(0).read(i * 8192, 8192).unwrap();
        q0.reads += 1;
        q0.read_bytes += 8192;
    }
    for _ in 0..2 {
        // 256 KiB: handed to the queue's pool on the sync engine.
        c.queue(0).read(1 << 20, 256 << 10).unwrap();
        q0.reads += 1;
        q0.read_bytes += 256 << 10;
    }
    c.queue(0).write_zeroes(2 << 20, 32 << 10, false).unwrap();
    q0.writes += 1;
    q0.write_bytes += 32 << 10;
    for _ in 0..3 {
        c.queue(0).flush().unwrap();
        q0.flushes += 1;
    }
    for i in 0..2u64 {
        c.queue(0)
            .discard((4 << 20) + i * (64 << 10), 64 << 10)
            .unwrap();
        q0.discards += 1;
        q0.discard_bytes += 64 << 10;
    }
    let q1 = &mut issued[1];
    for i in 0..4u64 {
        c.queue(1).write((8 << 20) + i * 512, &[7; 512]).unwrap();
        q1.writes += 1;
        q1.write_bytes += 512;
    }
    for i in 0..6u64 {
        c.queue(1).read((8 << 20) + i * 4096, 4096).unwrap();
        q1.reads += 1;
        q1.read_bytes += 4096;
    }
    c.queue(1).flush().unwrap();
    q1.flushes += 1;
    issued
}

fn reported(s: &Value) -> Issued {
    let n = |k: &str| {
        s[k].as_u64()
            .unwrap_or_else(|| panic!("{k} missing in {s}"))
    };
    Issued {
        reads: n("rd_operations"),
        read_bytes: n("rd_bytes"),
        writes: n("wr_operations"),
        write_bytes: n("wr_bytes"),
        flushes: n("flush_operations"),
        discards: n("unmap_operations"),
        discard_bytes: n("unmap_bytes"),
    }
}

fn stats(control: &Path) -> Value {
    serde_json::from_str(&ctl_ok(control, &["--json", "stats"])).expect("stats JSON")
}

fn scrape(path: &Path) -> String {
    let mut s = UnixStream::connect(path).expect("metrics socket");
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.0 200 OK"), "{out}");
    out
}

fn metric(text: &str, line_prefix: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .unwrap_or_else(|| panic!("no {line_prefix} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

fn check_engine(engine: &str) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    sparse_image(&disk, 16 << 20);
    let control = dir.path().join("ctl.sock");
    let metrics = dir.path().join("metrics.sock");
    let mut d = Daemon::serve(
        dir.path(),
        &disk,
        &[
            "--num-queues",
            "2",
            "--io-engine",
            engine,
            "--control",
            control.to_str().unwrap(),
            "--metrics",
            &format!("unix:{}", metrics.display()),
        ],
    );
    let opts = ClientOptions {
        num_queues: 2,
        ..ClientOptions::default()
    };
    let mut expected = [Issued::default(); 2];
    // Two connections: the counters outlive a frontend reconnect.
    for _ in 0..2 {
        let mut c = Client::connect_with(d.socket(), opts).unwrap();
        let issued = workload(&mut c);
        drop(c);
        for (e, i) in expected.iter_mut().zip(issued.iter()) {
            e.add(i);
        }
    }
    let st = stats(&control);
    let dev = &st["blockstats"][0];
    let queues = dev["queues"].as_array().unwrap();
    assert_eq!(queues.len(), 2);
    for (q, want) in expected.iter().enumerate() {
        let s = &queues[q]["stats"];
        assert_eq!(reported(s), *want, "engine {engine}, queue {q}: {s}");
        for p in ["rd", "wr", "flush", "unmap"] {
            assert_eq!(s[format!("failed_{p}_operations")], 0, "{s}");
            assert_eq!(s[format!("invalid_{p}_operations")], 0, "{s}");
        }
        // Every successful read, write and flush is in its histogram once.
        for (ops, h) in [
            ("rd_operations", "rd_latency_histogram"),
            ("wr_operations", "wr_latency_histogram"),
            ("flush_operations", "flush_latency_histogram"),
        ] {
            let bins: u64 = s[h]["bins"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap())
                .sum();
            assert_eq!(bins, s[ops].as_u64().unwrap(), "{h}: {s}");
        }
        assert!(s["rd_total_time_ns"].as_u64().unwrap() > 0, "{s}");
    }
    let mut all = expected[0];
    all.add(&expected[1]);
    assert_eq!(reported(&dev["stats"]), all, "totals: {}", dev["stats"]);

    let text = scrape(&metrics);
    for (q, want) in expected.iter().enumerate() {
        let l = |op: &str| format!("coloblk_requests_total{{queue=\"{q}\",op=\"{op}\"}} ");
        assert_eq!(metric(&text, &l("read")), want.reads);
        assert_eq!(metric(&text, &l("write")), want.writes);
        assert_eq!(metric(&text, &l("flush")), want.flushes);
        assert_eq!(metric(&text, &l("discard")), want.discards);
        let b = format!("coloblk_bytes_total{{queue=\"{q}\",op=\"write\"}} ");
        assert_eq!(metric(&text, &b), want.write_bytes);
        let count = format!("coloblk_request_latency_seconds_count{{queue=\"{q}\",op=\"read\"}} ");
        assert_eq!(metric(&text, &count), want.reads);
    }
    let human = ctl_ok(&control, &["stats"]);
    assert!(human.contains("\nall "), "{human}");
    d.terminate();
}

#[test]
fn stats_match_a_libblkio_workload_exactly_on_the_sync_engine() {
    check_engine("sync");
}

#[test]
fn stats_match_a_libblkio_workload_exactly_on_the_io_uring_engine() {
    check_engine("uring");
}

#[test]
fn requests_refused_as_invalid_are_counted_apart_from_successes() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    sparse_image(&disk, 1 << 20);
    let control = dir.path().join("ctl.sock");
    let mut d = Daemon::serve(dir.path(), &disk, &["--control", control.to_str().unwrap()]);
    let mut c = Client::connect(d.socket()).unwrap();
    c.queue(0).read(0, 4096).unwrap();
    // Past the end: the device refuses it (IOERR) without any I/O.
    let past = c.queue(0).read((1 << 20) - 512, 4096);
    assert!(past.is_err(), "a read past the end succeeded");
    drop(c);
    let st = stats(&control);
    let s = &st["blockstats"][0]["stats"];
    assert_eq!(s["rd_operations"], 1, "{s}");
    assert_eq!(s["rd_bytes"], 4096, "{s}");
    assert_eq!(s["invalid_rd_operations"], 1, "{s}");
    assert_eq!(s["failed_rd_operations"], 0, "{s}");
    d.terminate();
}
