//! `colo-blk serve --mode secondary --nbd-listen ...`: QEMU's NBD client plays
//! the primary and writes into the secondary; a libblkio frontend plays the
//! secondary guest. What the guest sees follows the replication stage.

mod common;
mod nbd_util;

use colo_blk::control::client::QmpClient;
use common::{Client, Daemon};
use nbd_util::{qemu_io, run};
use serde_json::json;
use std::path::Path;
use std::time::Duration;

const SIZE: u64 = 16 << 20;
const HALF: u64 = SIZE / 2;

struct Secondary {
    daemon: Daemon,
    control: std::path::PathBuf,
    nbd: String,
}

fn secondary(dir: &Path, listen: &str) -> Secondary {
    let disk = dir.join("secondary.img");
    common::sparse_image(&disk, SIZE);
    let control = dir.join("ctl.sock");
    let daemon = Daemon::serve(
        dir,
        &disk,
        &[
            "--mode",
            "secondary",
            "--nbd-listen",
            listen,
            "--control",
            control.to_str().unwrap(),
        ],
    );
    Secondary {
        daemon,
        control,
        nbd: String::new(),
    }
}

fn qmp(s: &Secondary, cmd: &str, args: serde_json::Value) -> serde_json::Value {
    let mut c = QmpClient::connect(&s.control, Some(Duration::from_secs(60))).unwrap();
    c.execute(cmd, args)
        .unwrap_or_else(|e| panic!("{cmd}: {e}\n{}", s.daemon.log()))
}

fn all(bytes: &[u8], v: u8) -> bool {
    bytes.iter().all(|&b| b == v)
}

#[test]
fn primary_writes_over_nbd_follow_the_stages_seen_by_the_secondary_guest() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let mut s = secondary(dir.path(), &format!("unix:{}", sock.display()));
    s.nbd = format!("nbd+unix:///parent0?socket={}", sock.display());

    // Stage none: the primary's initial sync goes straight to the disk; the
    // guest is refused.
    qemu_io(&s.nbd, &["write -P 0x11 0 16M", "flush"]);
    qemu_io(&s.nbd, &["read -P 0x11 0 16M"]);
    let mut guest = Client::connect(s.daemon.socket()).unwrap();
    assert!(
        guest.read(0, 4096).is_err(),
        "guest I/O before start must fail"
    );

    qmp(&s, "replication-start", json!({"mode": "secondary"}));
    assert!(all(&guest.read(0, 65536).unwrap(), 0x11));

    // Running: the primary writes the second half; the guest keeps seeing the
    // state of the last checkpoint, while NBD reads show the new data.
    qemu_io(&s.nbd, &[&format!("write -P 0x22 {HALF} {HALF}")]);
    qemu_io(&s.nbd, &[&format!("read -P 0x22 {HALF} {HALF}")]);
    assert!(all(&guest.read(HALF, 65536).unwrap(), 0x11));
    assert!(all(&guest.read(SIZE - 65536, 65536).unwrap(), 0x11));

    // Checkpoint: the guest now sees the primary's writes.
    qmp(&s, "replication-checkpoint", json!({}));
    assert!(all(&guest.read(HALF, 65536).unwrap(), 0x22));

    // The guest diverges, the primary writes again, then failover: the
    // primary's uncheckpointed write is rolled back on the disk, the guest's
    // kept, and the old primary is fenced (EPERM through NBD).
    guest.write(0, &[0x33; 65536]).unwrap();
    assert!(all(&guest.read(0, 65536).unwrap(), 0x33));
    qemu_io(&s.nbd, &["write -P 0x44 4M 64k"]);
    qemu_io(&s.nbd, &["read -P 0x44 4M 64k"]);
    qmp(&s, "replication-stop", json!({"failover": true}));
    for _ in 0..3000 {
        let st = qmp(&s, "query-replication", json!({}));
        if st["stage"] == "done" {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(qmp(&s, "query-replication", json!({}))["stage"], "done");
    let out = run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x55 0 4k", &s.nbd],
    );
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Operation not permitted"), "{text}");
    // The guest sees its own writes and the checkpointed state.
    assert!(all(&guest.read(0, 65536).unwrap(), 0x33));
    assert!(all(&guest.read(4 << 20, 65536).unwrap(), 0x11));
    assert!(all(&guest.read(HALF, 65536).unwrap(), 0x22));
    drop(guest);
    s.daemon.terminate();
    assert!(!sock.exists(), "NBD socket left behind");
    let disk = std::fs::read(dir.path().join("secondary.img")).unwrap();
    assert!(all(&disk[..65536], 0x33));
    assert!(all(&disk[4 << 20..(4 << 20) + 65536], 0x11));
    assert!(all(&disk[HALF as usize..], 0x22));
}

#[test]
fn secondary_nbd_over_tcp_loopback_takes_a_qemu_img_convert() {
    let dir = tempfile::tempdir().unwrap();
    // Pick a free port, then hand it to the daemon.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut s = secondary(dir.path(), &format!("tcp:127.0.0.1:{port}"));
    let uri = format!("nbd://127.0.0.1:{port}/parent0");
    let src = dir.path().join("src.img");
    let content = common::pattern(5, SIZE as usize);
    std::fs::write(&src, &content).unwrap();
    nbd_util::run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &uri,
        ],
    );
    nbd_util::run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &uri,
        ],
    );
    s.daemon.terminate();
    assert!(std::fs::read(dir.path().join("secondary.img")).unwrap() == content);
}
