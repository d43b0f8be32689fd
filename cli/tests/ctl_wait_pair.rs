//! A COLO pair on unix sockets driven with `ctl ... --wait`: the primary's
//! full resync and the secondary's failover commit are followed to their end
//! with progress lines (not a terminal here: plain lines), and the
//! replication counters (`query-replication-stats`) count exactly the writes
//! the primary's libblkio guest made and the copy-before-write copies they
//! caused on the secondary.

mod common;

use common::{ctl, ctl_ok, ctl_status, pattern, sparse_image, Client, Daemon};
use serde_json::Value;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

const SIZE: u64 = 32 << 20;
const CLUSTER: u64 = 64 << 10;

fn serve(dir: &Path, name: &str, extra: &[&str]) -> Daemon {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let disk = d.join("disk.img");
    if !disk.exists() {
        sparse_image(&disk, SIZE);
    }
    let control = d.join("ctl.sock");
    let mut args = vec!["--control", control.to_str().unwrap()];
    args.extend_from_slice(extra);
    Daemon::serve(&d, &disk, &args)
}

fn repl_stats(control: &Path) -> Value {
    serde_json::from_str::<Value>(&ctl_ok(control, &["--json", "stats"])).unwrap()["replication"]
        .clone()
}

#[test]
fn wait_follows_resync_and_failover_and_counters_match_the_guest_writes() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    let nbd = dir.join("nbd.sock");
    let sec_ctl = dir.join("sec/ctl.sock");
    let pri_ctl = dir.join("pri/ctl.sock");
    let listen = format!("unix:{}", nbd.display());
    let secondary = serve(
        dir,
        "sec",
        &["--mode", "secondary", "--nbd-listen", &listen],
    );
    let uri = format!("nbd+unix:///parent0?socket={}", nbd.display());
    // 8 MiB of data on the primary's disk, so the full resync has bytes to copy.
    {
        std::fs::create_dir_all(dir.join("pri")).unwrap();
        let mut f = std::fs::File::create(dir.join("pri/disk.img")).unwrap();
        f.set_len(SIZE).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.write_all(&pattern(1, 8 << 20)).unwrap();
    }
    let primary = serve(dir, "pri", &["--mode", "primary", "--secondary", &uri]);

    ctl_ok(&sec_ctl, &["start"]);
    let out = ctl(&pri_ctl, &["start", "--sync", "full", "--wait"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "start --wait failed: {stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("resync complete"),
        "{out:?}"
    );
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("resync: ") && last.contains("(100%)") && last.contains("ETA"),
        "no final progress line: {stderr}"
    );
    let st = ctl_status(&pri_ctl);
    assert_eq!(st["resync"]["done"], st["resync"]["total"], "{st}");
    assert!(st["resync"]["done"].as_u64().unwrap() >= 8 << 20, "{st}");

    // Empty the overlays: from here every first write to a cluster copies it.
    ctl_ok(&pri_ctl, &["checkpoint"]);
    ctl_ok(&sec_ctl, &["checkpoint"]);
    let pri_before = repl_stats(&pri_ctl);
    let sec_before = repl_stats(&sec_ctl);
    let mut guest = Client::connect(primary.socket()).unwrap();
    // 6 writes: 5 distinct clusters, one cluster written twice.
    for (i, c) in [3u64, 9, 17, 40, 41, 9].iter().enumerate() {
        guest.write(c * CLUSTER, &pattern(i as u64, 4096)).unwrap();
    }
    drop(guest);
    let pri = repl_stats(&pri_ctl);
    let sec = repl_stats(&sec_ctl);
    let delta = |a: &Value, b: &Value, k: &str| a[k].as_u64().unwrap() - b[k].as_u64().unwrap();
    assert_eq!(delta(&pri, &pri_before, "forwarded-writes"), 6, "{pri}");
    assert_eq!(
        delta(&pri, &pri_before, "forwarded-bytes"),
        6 * 4096,
        "{pri}"
    );
    assert_eq!(delta(&sec, &sec_before, "cbw-copies"), 5, "{sec}");
    assert_eq!(delta(&sec, &sec_before, "cbw-bytes"), 5 * CLUSTER, "{sec}");
    assert!(pri["resync-bytes"].as_u64().unwrap() >= 8 << 20, "{pri}");
    assert_eq!(pri["errors"], 0, "{pri}");

    // The secondary's guest writes, then failover: the commit is followed.
    let mut sguest = Client::connect(secondary.socket()).unwrap();
    for c in 0..16u64 {
        sguest.write(c * CLUSTER, &pattern(100 + c, 8192)).unwrap();
    }
    drop(sguest);
    let out = ctl(&sec_ctl, &["stop", "--failover", "--wait"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "stop --failover --wait failed: {stderr}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("failover complete"),
        "{out:?}"
    );
    assert_eq!(ctl_status(&sec_ctl)["stage"], "done");
    let sec = repl_stats(&sec_ctl);
    assert!(
        sec["commit-bytes"].as_u64().unwrap() > 0,
        "{sec} / {stderr}"
    );
    drop(primary);
    drop(secondary);
}

#[test]
fn wait_is_refused_without_failover() {
    let root = tempfile::tempdir().unwrap();
    let d = serve(root.path(), "sec", &["--mode", "secondary"]);
    let out = ctl(&root.path().join("sec/ctl.sock"), &["stop", "--wait"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    drop(d);
}
