//! Worst guest latency during a secondary's failover commit.
//!
//! Against a running `colo-blk serve --mode secondary --num-queues QD` (stage
//! running): fills the active overlay with FILL MiB of guest writes, runs 4k
//! random read/write (50/50) at queue depth QD (one request per queue, one
//! thread per queue), triggers `replication-stop {failover: true}` and waits
//! for stage `done`. Prints the worst latency of requests that overlapped the
//! commit and of those before it, and a `RESULT` line.
//!
//!     commit-latency VHOST_SOCKET CONTROL_SOCKET [FILL_MIB] [QD]

use colo_blk::control::client::QmpClient;
use colo_blk_testkit::{Client, ClientOptions};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: commit-latency VHOST_SOCKET CONTROL_SOCKET [FILL_MIB] [QD]");
        std::process::exit(2);
    }
    let fill_mb: u64 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(256);
    let qd: usize = args.get(4).and_then(|a| a.parse().ok()).unwrap_or(8);
    let mut client = Client::connect_with(
        args[1].as_ref(),
        ClientOptions {
            num_queues: qd,
            ..ClientOptions::default()
        },
    )
    .expect("connect");
    let size = client.capacity;
    let chunk = vec![0x5au8; 1 << 20];
    for i in 0..fill_mb.min(size >> 20) {
        client.queue(0).write(i << 20, &chunk).expect("fill");
    }
    let mut qmp = QmpClient::connect(args[2].as_ref(), Some(Duration::from_secs(60))).expect("qmp");
    let stop = AtomicBool::new(false);
    // (start, latency, write?) of every request.
    let log: Mutex<Vec<(Instant, Duration, bool)>> = Mutex::new(Vec::new());
    let mut window = (Instant::now(), Instant::now());
    std::thread::scope(|s| {
        for (i, q) in client.queues().iter_mut().enumerate() {
            let (stop, log) = (&stop, &log);
            s.spawn(move || {
                let data = vec![i as u8; 4096];
                let mut n = i as u64 * 7919 + 13;
                let mut mine = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    n = n
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let off = (n >> 17) % (size / 4096) * 4096;
                    let t = Instant::now();
                    let write = n >> 63 == 0;
                    let ok = if write {
                        q.write(off, &data).is_ok()
                    } else {
                        q.read(off, 4096).is_ok()
                    };
                    assert!(ok, "guest I/O failed during the commit");
                    mine.push((t, t.elapsed(), write));
                }
                log.lock().unwrap().extend(mine);
            });
        }
        std::thread::sleep(Duration::from_millis(1000));
        let t0 = Instant::now();
        qmp.execute("replication-stop", json!({"failover": true}))
            .expect("failover");
        let deadline = t0 + Duration::from_secs(600);
        loop {
            let st = qmp.execute("query-replication", json!({})).expect("query");
            if st["stage"] == "done" {
                break;
            }
            assert!(st["stage"] == "failover", "commit failed: {st}");
            assert!(Instant::now() < deadline, "commit did not end");
            std::thread::sleep(Duration::from_millis(5));
        }
        window = (t0, Instant::now());
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
    });
    let log = log.into_inner().unwrap();
    let (t0, t1) = window;
    let overlaps = |t: &Instant, l: &Duration| *t + *l >= t0 && *t <= t1;
    let during: Vec<Duration> = log
        .iter()
        .filter(|(t, l, _)| overlaps(t, l))
        .map(|(_, l, _)| *l)
        .collect();
    let before_all: Vec<Duration> = log
        .iter()
        .filter(|(t, l, _)| *t + *l < t0)
        .map(|(_, l, _)| *l)
        .collect();
    let before = before_all.iter().max().copied().unwrap_or_default();
    // Just after: the commit's deferred work (space release) must not simply
    // move a stall out of the window.
    let after = log
        .iter()
        .filter(|(t, _, _)| *t > t1)
        .map(|(_, l, _)| *l)
        .max()
        .unwrap_or_default();
    let worst = during.iter().max().copied().unwrap_or_default();
    // Where in the commit the worst request started (ms from the stop command),
    // and what it was.
    let (worst_at, worst_kind) = log
        .iter()
        .filter(|(t, l, _)| overlaps(t, l) && *l == worst)
        .map(|(t, _, w)| {
            (
                t.saturating_duration_since(t0),
                if *w { "write" } else { "read" },
            )
        })
        .next()
        .unwrap_or_default();
    // How many requests were slow, during and before (the machine is shared:
    // slow requests before the commit are the scheduler's, not the commit's).
    let slow =
        |v: &[Duration], ms: u64| v.iter().filter(|l| **l > Duration::from_millis(ms)).count();
    let mut sorted = during.clone();
    sorted.sort();
    let p99 = sorted
        .get(sorted.len().saturating_sub(1) * 99 / 100)
        .copied()
        .unwrap_or_default();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "RESULT commit {fill_mb} MiB in {:.0} ms, 4k randrw QD{qd}: {} requests during, worst {:.1} ms (at +{:.0} ms, {worst_kind}), p99 {:.2} ms, >5/>10 ms {}/{}; before: {} requests, worst {:.1} ms, >5/>10 ms {}/{}; worst after {:.1} ms",
        ms(t1 - t0),
        during.len(),
        ms(worst),
        ms(worst_at),
        ms(p99),
        slow(&during, 5),
        slow(&during, 10),
        before_all.len(),
        ms(before),
        slow(&before_all, 5),
        slow(&before_all, 10),
        ms(after),
    );
}
