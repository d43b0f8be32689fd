//! The control socket of a real `colo-blk serve` process, driven by `colo-blk ctl`.

mod common;

use common::{ctl, sparse_image, Daemon, BIN};
use std::process::Command;

#[test]
fn plain_serve_answers_replication_commands_with_an_error_and_quits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    sparse_image(&disk, 1 << 20);
    let control = dir.path().join("ctl.sock");
    let mut daemon = Daemon::serve(dir.path(), &disk, &["--control", control.to_str().unwrap()]);
    assert!(common::is_socket(&control), "control socket created");

    let out = ctl(&control, &["status"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not configured"), "{err}");

    let out = ctl(&control, &["--json", "quit"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "{}");
    let status = daemon.wait_exit();
    assert!(
        status.success(),
        "daemon exit: {status:?}\n{}",
        daemon.log()
    );
    assert!(!control.exists(), "control socket removed");
    assert!(!daemon.socket().exists(), "vhost socket removed");
}

#[test]
fn ctl_without_a_daemon_fails_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = ctl(&dir.path().join("nothing.sock"), &["status"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect to control socket"), "{err}");
    let out = Command::new(BIN).args(["ctl", "status"]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "missing --control is a usage error"
    );
}
