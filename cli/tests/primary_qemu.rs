//! `colo-blk serve --mode primary` replicating into QEMU's own NBD server
//! (qemu-storage-daemon), driven through libblkio and `colo-blk ctl`: the
//! primary interoperates with a QEMU secondary's NBD export.

mod common;
mod nbd_util;

use common::{ctl, ctl_ok, sparse_image, Client, Daemon};
use nbd_util::{pattern, qsd_nbd, Process};
use std::path::{Path, PathBuf};
use std::process::Command;

const SIZE: u64 = 32 << 20;

/// A colo-blk primary forwarding to a qemu-storage-daemon NBD secondary.
struct Setup {
    dir: tempfile::TempDir,
    pimg: PathBuf,
    simg: PathBuf,
    nbd: PathBuf,
    control: PathBuf,
    secondary: Process,
    daemon: Daemon,
}

fn setup(extra: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (pimg, simg) = (dir.path().join("p.img"), dir.path().join("s.img"));
    sparse_image(&pimg, SIZE);
    sparse_image(&simg, SIZE);
    let nbd = dir.path().join("nbd.sock");
    let control = dir.path().join("ctl.sock");
    let secondary = qsd_nbd(&simg, &nbd);
    let uri = format!("nbd+unix:///parent0?socket={}", nbd.display());
    let mut args = vec![
        "--mode",
        "primary",
        "--secondary",
        &uri,
        "--control",
        control.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let daemon = Daemon::serve(dir.path(), &pimg, &args);
    Setup {
        dir,
        pimg,
        simg,
        nbd,
        control,
        secondary,
        daemon,
    }
}

fn assert_files_equal(a: &Path, b: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn primary_resyncs_forwards_and_survives_losing_a_qemu_secondary() {
    let Setup {
        dir: _dir,
        pimg,
        simg,
        nbd,
        control,
        mut secondary,
        daemon,
    } = setup(&[]);
    let mut guest = Client::connect(daemon.socket()).unwrap();

    // Data before start reaches the secondary through the full resync.
    guest.write(0, &pattern(1, 1 << 20)).unwrap();
    guest.write(20 << 20, &pattern(2, 64 << 10)).unwrap();
    assert!(ctl_ok(&control, &["status"]).contains("stage: none"));
    ctl_ok(&control, &["start"]);
    ctl_ok(&control, &["checkpoint"]); // waits for the resync
    let status = ctl_ok(&control, &["--json", "status"]);
    assert!(status.contains("\"stage\":\"running\""), "{status}");
    assert_files_equal(&pimg, &simg);

    // Writes while running are forwarded before they are acknowledged.
    for i in 0..50u64 {
        let off = (i * 7919 * 4096) % (SIZE - 65536);
        guest.write(off, &pattern(100 + i, 8192)).unwrap();
    }
    guest.write_zeroes(0, 65536, false).unwrap();
    guest.discard(1 << 20, 65536).unwrap();
    ctl_ok(&control, &["checkpoint"]);
    assert_files_equal(&pimg, &simg);
    assert_eq!(ctl(&control, &["get-error"]).status.code(), Some(0));

    // The secondary dies: the guest's writes keep succeeding, the loss is
    // recorded, and the checkpoint barrier reports it.
    secondary.kill();
    for i in 0..20u64 {
        guest.write(i * 65536, &pattern(500 + i, 4096)).unwrap();
    }
    let got = guest.read(0, 4096).unwrap();
    assert_eq!(got, pattern(500, 4096));
    let out = ctl(&control, &["get-error"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("forwarding"),
        "{out:?}"
    );
    assert_eq!(ctl(&control, &["checkpoint"]).status.code(), Some(1));
    let status = ctl_ok(&control, &["status"]);
    assert!(status.contains("dirty clusters: 20"), "{status}");

    // A restarted secondary catches up with only the dirty clusters.
    ctl_ok(&control, &["stop"]);
    let _secondary = qsd_nbd(&simg, &nbd);
    ctl_ok(&control, &["start", "--sync", "dirty"]);
    ctl_ok(&control, &["checkpoint"]);
    assert_files_equal(&pimg, &simg);
    let status = ctl_ok(&control, &["--json", "status"]);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["resync"]["total"], 20 * 65536, "{v}");
    assert_eq!(v["dirty-clusters"], 0);
    drop(guest);
}

#[test]
fn a_hung_secondary_is_declared_lost_after_the_forward_timeout() {
    let Setup {
        dir: _dir,
        control,
        secondary,
        daemon,
        ..
    } = setup(&["--forward-timeout", "1"]);
    let mut guest = Client::connect(daemon.socket()).unwrap();
    ctl_ok(&control, &["start", "--sync", "none"]);
    guest.write(0, &pattern(1, 4096)).unwrap();
    ctl_ok(&control, &["checkpoint"]);

    // The secondary stops answering (SIGSTOP) but keeps its connection open.
    secondary.signal(libc::SIGSTOP).unwrap();
    guest.write(65536, &pattern(2, 4096)).unwrap();
    guest.write(2 * 65536, &pattern(3, 4096)).unwrap();
    secondary.signal(libc::SIGCONT).unwrap();
    assert_eq!(guest.read(65536, 4096).unwrap(), pattern(2, 4096));
    let out = ctl(&control, &["get-error"]);
    assert_eq!(out.status.code(), Some(1), "the hang is recorded");
    let v = common::ctl_status(&control);
    assert_eq!(v["dirty-clusters"], 2, "{v}");
}
