//! Replication under faults, with the two sides on two "hosts" (network
//! namespaces on a veth link, created and removed by each test): the control
//! plane answers while the link is cut, and an old primary fenced by its
//! secondary's failover acknowledges no guest write afterwards.
//!
//! Needs root (ip netns, nft), python3 with qemu.qmp.

mod common;
mod netns;

use colo_blk::control::client::QmpClient;
use common::{ctl, ctl_ok, ctl_status, Client, ClientOptions, PATIENCE};
use netns::{Pair, TwoHosts};
use serde_json::json;
use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

const SIZE: u64 = 64 << 20;

/// Polls `query-replication` until `done` says so (bounded by PATIENCE).
fn wait_status(control: &Path, what: &str, done: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let st = ctl_status(control);
        if done(&st) {
            return;
        }
        assert!(Instant::now() < deadline, "waiting for {what}: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start_pair(pair: &Pair) {
    ctl_ok(&pair.secondary_ctl, &["start"]);
    ctl_ok(&pair.primary_ctl, &["start", "--sync", "full"]);
    wait_status(&pair.primary_ctl, "the initial resync", |st| {
        st["resync"]["total"].as_u64().is_some_and(|t| t > 0)
            && st["resync"]["done"] == st["resync"]["total"]
    });
}

#[test]
fn query_replication_answers_while_a_start_is_blocked_on_a_dropped_link() {
    let hosts = TwoHosts::new();
    let dir = tempfile::tempdir().unwrap();
    // The start's connect deadline is the forward timeout: long enough that
    // a query answered "at once" surely lands while the start still waits.
    let pair = Pair::start(&hosts, dir.path(), SIZE, &["--forward-timeout", "10"]);
    ctl_ok(&pair.secondary_ctl, &["start"]);
    hosts.partition();

    let pending = Arc::new(AtomicBool::new(true));
    let (tx, rx) = mpsc::channel();
    let starter = {
        let (path, pending) = (pair.primary_ctl.clone(), pending.clone());
        std::thread::spawn(move || {
            let mut c = QmpClient::connect(&path, Some(Duration::from_secs(120))).unwrap();
            let r = c.execute("replication-start", json!({"mode": "primary"}));
            pending.store(false, Ordering::SeqCst);
            tx.send(r.map_err(|e| e.to_string())).unwrap();
        })
    };
    // Let the start reach its connect (it logs that it forwards to the secondary
    // at boot; the connect itself leaves no mark): answered queries before it
    // would prove nothing, so wait until the daemon has read the command.
    std::thread::sleep(Duration::from_millis(300));
    let mut q = QmpClient::connect(&pair.primary_ctl, Some(Duration::from_secs(60))).unwrap();
    let mut answered_while_pending = 0;
    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        let t = Instant::now();
        let st = q.execute("query-replication", json!({})).unwrap();
        let took = t.elapsed();
        if pending.load(Ordering::SeqCst) {
            answered_while_pending += 1;
            worst = worst.max(took);
        }
        assert_eq!(st["stage"], "none", "{st}");
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "query-replication: {answered_while_pending} answers while the start was pending, \
         worst {:.1} ms",
        worst.as_secs_f64() * 1e3
    );
    assert!(
        answered_while_pending >= 9,
        "query-replication waited for the blocked start ({answered_while_pending} of 10 answered while it was pending)"
    );
    // A second start is refused at once rather than queued behind the first.
    let again = q.execute("replication-start", json!({"mode": "primary"}));
    assert!(
        pending.load(Ordering::SeqCst),
        "the first start ended early"
    );
    let again = again
        .expect_err("a concurrent start was accepted")
        .to_string();
    assert!(again.contains("in progress"), "{again}");

    let result = rx.recv_timeout(PATIENCE).expect("start never returned");
    starter.join().unwrap();
    let err = result.expect_err("start over a dropped link succeeded");
    assert!(err.contains("no connection within"), "{err}");
    assert_eq!(ctl_status(&pair.primary_ctl)["stage"], "none");

    // Healed, the same daemon starts.
    hosts.heal();
    ctl_ok(&pair.primary_ctl, &["start", "--sync", "full"]);
    assert_eq!(ctl_status(&pair.primary_ctl)["stage"], "running");
}

/// One guest write as the frontend saw it.
struct Write {
    submitted: Instant,
    ok: bool,
}

/// Runs `body` while guest writers on every queue of the primary issue random
/// 4k writes, each until one fails or `body` returns; every outcome is
/// recorded in the returned log. `body` must make held writes complete.
fn with_writers(vhost: &Path, queues: usize, body: impl FnOnce(&Mutex<Vec<Write>>)) -> Vec<Write> {
    let mut client = Client::connect_with(
        vhost,
        ClientOptions {
            num_queues: queues,
            ..ClientOptions::default()
        },
    )
    .unwrap();
    let blocks = client.capacity / 4096;
    let stop = AtomicBool::new(false);
    let log = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for (i, queue) in client.queues().iter_mut().enumerate() {
            let (stop, log) = (&stop, &log);
            s.spawn(move || {
                let data = common::pattern(i as u64 + 1, 4096);
                let mut n = i as u64 * 7919 + 1;
                while !stop.load(Ordering::SeqCst) {
                    n = n
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let off = (n >> 20) % blocks * 4096;
                    let submitted = Instant::now();
                    let ok = queue.write(off, &data).is_ok();
                    log.lock().unwrap().push(Write { submitted, ok });
                    if !ok {
                        break;
                    }
                }
            });
        }
        body(&log);
        stop.store(true, Ordering::SeqCst);
    });
    log.into_inner().unwrap()
}

/// A qemu.qmp client waiting for `event` on `control`, started and listening.
fn qmp_event_waiter(control: &Path, event: &str) -> std::process::Child {
    let script = common::repo_path("integration/netns/wait_event.py");
    let mut child = Command::new("python3")
        .arg(script)
        .arg(control)
        .arg(event)
        .arg("60")
        .stdout(Stdio::piped())
        .spawn()
        .expect("run wait_event.py");
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first.trim(), "READY", "qemu.qmp waiter did not start");
    child
}

fn wait_progress(log: &Mutex<Vec<Write>>, ok_writes: usize) {
    let deadline = Instant::now() + PATIENCE;
    while log.lock().unwrap().iter().filter(|w| w.ok).count() < ok_writes {
        assert!(Instant::now() < deadline, "guest writes make no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Failover on the secondary while the primary's guest writes; returns the
/// moment the failover command returned and the event waiter's output.
fn fence_scenario(policy: &str) {
    let hosts = TwoHosts::new();
    let dir = tempfile::tempdir().unwrap();
    let mut pair = Pair::start(
        &hosts,
        dir.path(),
        SIZE,
        &["--on-fenced", policy, "--num-queues", "4"],
    );
    start_pair(&pair);
    let waiter = qmp_event_waiter(&pair.primary_ctl, "REPLICATION_FENCED");
    let mut failover_at = None;
    let queues = 4;
    let log = with_writers(&pair.primary_vhost, queues, |log| {
        wait_progress(log, 200);
        ctl_ok(&pair.secondary_ctl, &["stop", "--failover"]);
        failover_at = Some(Instant::now());
        wait_status(&pair.primary_ctl, "stage fenced", |st| {
            st["stage"] == "fenced"
        });
        let st = ctl_status(&pair.primary_ctl);
        assert_eq!(st["fence"]["on-fenced"], policy, "{st}");
        if policy == "hold" {
            // Every writer ends up parked on the fence: none completes.
            wait_status(&pair.primary_ctl, "all writers held", |st| {
                st["fence"]["held-writes"] == queues
            });
            let done_after = log
                .lock()
                .unwrap()
                .iter()
                .filter(|w| Some(w.submitted) > failover_at)
                .count();
            assert_eq!(
                done_after, 0,
                "a write submitted after the failover completed while held"
            );
            // The tooling gives up on this side: held writes fail.
            ctl_ok(&pair.primary_ctl, &["stop"]);
        } else {
            let deadline = Instant::now() + PATIENCE;
            while log.lock().unwrap().iter().filter(|w| !w.ok).count() < queues {
                assert!(
                    Instant::now() < deadline,
                    "writers still succeed after the fence"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    });
    let failover_at = failover_at.unwrap();
    let acked_after = log
        .iter()
        .filter(|w| w.ok && w.submitted > failover_at)
        .count();
    let failed = log.iter().filter(|w| !w.ok).count();
    let acked = log.iter().filter(|w| w.ok).count();
    eprintln!(
        "on-fenced {policy}: {acked} writes acknowledged before the failover, {acked_after} after it, {failed} failed"
    );
    assert_eq!(
        acked_after, 0,
        "the old primary acknowledged writes after the fence"
    );
    assert_eq!(
        failed, queues,
        "every writer stops at its first failed write"
    );

    let out = waiter.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qemu.qmp client saw no REPLICATION_FENCED: {text}"
    );
    assert!(
        text.contains(&format!("\"on-fenced\": \"{policy}\"")),
        "{text}"
    );

    // Resuming against the new primary is refused explicitly: this disk is stale.
    let again = ctl(&pair.primary_ctl, &["start", "--sync", "full"]);
    assert!(!again.status.success());
    let why = String::from_utf8_lossy(&again.stderr);
    assert!(why.contains("fenced"), "{why}");
    // And a fenced primary still shuts down cleanly.
    assert!(pair.primary.terminate().success(), "{}", pair.primary.log());
}

#[test]
fn fenced_primary_holds_guest_writes_and_acknowledges_none_after_failover() {
    fence_scenario("hold");
}

#[test]
fn fenced_primary_fails_guest_writes_with_on_fenced_error() {
    fence_scenario("error");
}

/// Set bits in a write-intent bitmap file (4 KiB header, then the bits).
fn intent_bits(image: &Path) -> u64 {
    let mut path = image.as_os_str().to_owned();
    path.push(".colo-intent");
    let bytes = std::fs::read(&path).unwrap_or_default();
    bytes
        .get(4096..)
        .unwrap_or_default()
        .iter()
        .map(|b| u64::from(b.count_ones()))
        .sum()
}

#[test]
fn restarted_primary_resyncs_only_the_write_intent_clusters_and_disks_end_equal() {
    const CLUSTER: u64 = 64 << 10;
    const BIG: u64 = 256 << 20;
    // The guest writes only here, so the bitmap must stay within it.
    const HOT: u64 = 16 << 20;
    for run in 1..=3u64 {
        let hosts = TwoHosts::new();
        let dir = tempfile::tempdir().unwrap();
        let mut pair = Pair::start(&hosts, dir.path(), BIG, &[]);
        start_pair(&pair);
        // The initial copy marked every cluster; the lazy clear drops them
        // once both copies are flushed.
        let deadline = Instant::now() + PATIENCE;
        while intent_bits(&pair.primary_img) != 0 {
            assert!(
                Instant::now() < deadline,
                "the write-intent bitmap is never cleared"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // The writer is not joined: its last request may never complete once
        // the primary is killed. It stops at its first error.
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
        {
            let (vhost, stop, written) =
                (pair.primary_vhost.clone(), stop.clone(), written.clone());
            std::thread::spawn(move || {
                let mut c = Client::connect(&vhost).unwrap();
                let mut n = run;
                while !stop.load(Ordering::SeqCst) {
                    n = n
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let off = (n >> 20) % (HOT / 4096) * 4096;
                    if c.write(off, &common::pattern(n, 4096)).is_err() {
                        return;
                    }
                    written.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        let deadline = Instant::now() + PATIENCE;
        while written.load(Ordering::SeqCst) < 500 * run {
            assert!(Instant::now() < deadline, "guest writes make no progress");
            std::thread::sleep(Duration::from_millis(5));
        }
        pair.primary.signal(libc::SIGKILL);
        stop.store(true, Ordering::SeqCst);
        pair.restart_primary(&hosts, dir.path(), &[]);
        let st = ctl_status(&pair.primary_ctl);
        let dirty = st["dirty-clusters"].as_u64().expect("dirty-clusters");
        assert!(dirty > 0, "run {run}: the bitmap lost the writes: {st}");
        assert!(
            dirty <= HOT / CLUSTER,
            "run {run}: {dirty} clusters marked, the guest wrote only {}",
            HOT / CLUSTER
        );
        ctl_ok(&pair.primary_ctl, &["start", "--sync", "dirty"]);
        wait_status(&pair.primary_ctl, "the dirty resync", |st| {
            st["resync"]["done"] == st["resync"]["total"]
        });
        let st = ctl_status(&pair.primary_ctl);
        let copied = st["resync"]["total"].as_u64().unwrap();
        eprintln!(
            "run {run}: {} guest writes, bitmap {dirty} of {} clusters after SIGKILL, \
             dirty resync copied {copied} bytes",
            written.load(Ordering::SeqCst),
            BIG / CLUSTER
        );
        assert!(
            copied <= dirty * CLUSTER,
            "run {run}: copied more than the bitmap: {st}"
        );
        assert!(pair.primary.terminate().success(), "{}", pair.primary.log());
        // A plain stop empties the overlays: the secondary disk is what the
        // primary forwarded and resynced.
        ctl_ok(&pair.secondary_ctl, &["stop"]);
        let a = std::fs::read(&pair.primary_img).unwrap();
        let b = std::fs::read(&pair.secondary_img).unwrap();
        let differing = a
            .chunks(CLUSTER as usize)
            .zip(b.chunks(CLUSTER as usize))
            .filter(|(x, y)| x != y)
            .count();
        assert_eq!(
            differing, 0,
            "run {run}: clusters differ after the dirty resync"
        );
    }
}
