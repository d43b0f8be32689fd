//! Online resize (`block_resize`, `colo-blk ctl resize`) of the real binary:
//! a libblkio frontend serves I/O past the old end after re-reading the
//! capacity on its live connection; a raw vhost-user frontend that negotiated
//! the backend request channel receives VHOST_USER_BACKEND_CONFIG_CHANGE_MSG
//! and re-reads the config space from inside its handler, as QEMU does; a
//! frontend that never answers cannot wedge the control socket.

mod common;

use common::{ctl, ctl_ok, sparse_image, Client, Daemon};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
};
use vhost::VhostBackend;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

/// A plain daemon on a fresh 16 MiB image with a control socket.
fn plain(dir: &Path, extra: &[&str]) -> (Daemon, PathBuf, PathBuf) {
    let img = dir.join("disk.img");
    sparse_image(&img, SIZE);
    let control = dir.join("ctl.sock");
    let mut args = vec!["--control", control.to_str().unwrap()];
    args.extend_from_slice(extra);
    let d = Daemon::serve(dir, &img, &args);
    wait_for(&control);
    (d, img, control)
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + common::PATIENCE;
    while !common::is_socket(path) {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

fn ctl_err(control: &Path, args: &[&str]) -> String {
    let out = ctl(control, args);
    assert_eq!(out.status.code(), Some(1), "ctl {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn libblkio_reads_the_new_capacity_and_writes_past_the_old_end() {
    let dir = tempfile::tempdir().unwrap();
    let (d, img, control) = plain(dir.path(), &[]);
    let mut c = Client::connect(d.socket()).unwrap();
    assert_eq!(c.capacity, SIZE);
    assert!(c.write(SIZE, &[1u8; 4096]).is_err(), "past the end before");

    let out = ctl_ok(&control, &["resize", "24M"]);
    assert!(
        out.contains("disk grown from 16.0 MiB (16777216 bytes) to 24.0 MiB (25165824 bytes)"),
        "{out}"
    );
    // libblkio never negotiates BACKEND_REQ: it is not told, but its next
    // config read on the same connection returns the new size.
    assert!(
        out.contains("did not negotiate the backend request channel"),
        "{out}"
    );
    assert_eq!(file_len(&img), 24 * MIB);
    assert_eq!(c.refresh_capacity().unwrap(), 24 * MIB);
    let data = common::pattern(7, 1 << 20);
    c.write(SIZE, &data).unwrap();
    c.write(24 * MIB - 4096, &[9u8; 4096]).unwrap();
    c.flush().unwrap();
    assert_eq!(c.read(SIZE, 1 << 20).unwrap(), data);
    assert!(c.write(24 * MIB, &[1u8; 4096]).is_err(), "past the new end");
    drop(c);

    // A later connection is served the new size from the start.
    let mut c = Client::connect(d.socket()).unwrap();
    assert_eq!(c.capacity, 24 * MIB);
    assert_eq!(c.read(24 * MIB - 4096, 4096).unwrap(), vec![9u8; 4096]);
    drop(c);
    assert!(d
        .log()
        .contains("disk grown online from 16777216 to 25165824 bytes"));
}

#[test]
fn refusals_name_the_rule_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, img, control) = plain(dir.path(), &["--logical-block-size", "4096"]);
    let cases: [(&[&str], &str); 4] = [
        (
            &["resize", "8M"],
            "Cannot shrink the disk from 16777216 to 8388608 bytes",
        ),
        (
            &["resize", "16777728"],
            "Size 16777728 is not a multiple of the logical block size (4096 bytes)",
        ),
        (&["resize", "1Q"], "unknown size suffix"),
        (&["resize"], "SIZE"),
    ];
    for (args, want) in cases {
        let out = ctl(&control, args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert_eq!(file_len(&img), SIZE);
    // The same size: nothing to do.
    let out = ctl_ok(&control, &["resize", "16M"]);
    assert!(out.contains("already 16.0 MiB"), "{out}");
    // --json prints QMP's return value.
    let out = ctl_ok(&control, &["--json", "resize", "20M"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"size": 20 * MIB, "old-size": SIZE, "frontend": "not-connected"})
    );
}

#[test]
fn a_read_only_disk_and_a_replicating_one_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, img, control) = plain(dir.path(), &["--readonly"]);
    assert!(ctl_err(&control, &["resize", "32M"]).contains("Image is read-only"));
    assert_eq!(file_len(&img), SIZE);

    let dir = tempfile::tempdir().unwrap();
    let uri = format!(
        "nbd+unix:///parent0?socket={}",
        dir.path().join("nowhere.sock").display()
    );
    let (_d, img, control) = plain(dir.path(), &["--mode", "primary", "--secondary", &uri]);
    let err = ctl_err(&control, &["resize", "32M"]);
    assert!(
        err.contains("while it is replicated") && err.contains("COLO primary"),
        "{err}"
    );
    assert_eq!(file_len(&img), SIZE);
}

/// A frontend's handler of the backend request channel that does what QEMU's
/// vhost-user-blk does on a config change: GET_CONFIG on the main channel
/// (served by the connection thread while the backend waits for this
/// handler's answer), and records the capacity it read.
struct QemuLike {
    /// Taken away at the end, so that the connection can close.
    main: Mutex<Option<Frontend>>,
    changes: AtomicUsize,
    capacity_sectors: AtomicU64,
}

impl VhostUserFrontendReqHandler for QemuLike {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        let mut main = self.main.lock().unwrap();
        let fe = main
            .as_mut()
            .ok_or_else(|| std::io::Error::other("closed"))?;
        let sectors = read_capacity(fe).map_err(std::io::Error::other)?;
        self.capacity_sectors.store(sectors, Ordering::SeqCst);
        self.changes.fetch_add(1, Ordering::SeqCst);
        Ok(0)
    }
}

fn read_capacity(fe: &mut Frontend) -> Result<u64, vhost::Error> {
    let buf = [0u8; 60];
    let (_, cfg) = fe.get_config(0, buf.len() as u32, VhostUserConfigFlags::empty(), &buf)?;
    Ok(u64::from_le_bytes(cfg[0..8].try_into().unwrap()))
}

/// Connects a raw frontend that negotiates REPLY_ACK, CONFIG and BACKEND_REQ.
fn negotiate(socket: &Path) -> Frontend {
    let mut fe = Frontend::connect(socket, 1).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    fe.set_features(features).unwrap();
    let offered = fe.get_protocol_features().unwrap();
    let wanted = VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::BACKEND_REQ;
    assert!(offered.contains(wanted), "offered {offered:?}");
    fe.set_protocol_features(wanted).unwrap();
    fe
}

/// A raw frontend whose backend request channel is served by [`QemuLike`]
/// on a thread of its own.
struct ToldFrontend {
    fe: Frontend,
    handler: Arc<QemuLike>,
    serving: std::thread::JoinHandle<()>,
}

impl ToldFrontend {
    fn connect(socket: &Path) -> ToldFrontend {
        let mut fe = negotiate(socket);
        let handler = Arc::new(QemuLike {
            main: Mutex::new(Some(fe.clone())),
            changes: AtomicUsize::new(0),
            capacity_sectors: AtomicU64::new(0),
        });
        let mut channel = FrontendReqHandler::new(Arc::clone(&handler)).unwrap();
        channel.set_reply_ack_flag(true);
        fe.set_backend_request_fd(&RawFdHolder(channel.get_tx_raw_fd()))
            .unwrap();
        let serving = std::thread::spawn(move || {
            // Until the backend closes the channel (the connection ends).
            while channel.handle_request().is_ok() {}
        });
        ToldFrontend {
            fe,
            handler,
            serving,
        }
    }

    /// Config changes handled so far, and the capacity the last one read.
    fn told(&self) -> (usize, u64) {
        (
            self.handler.changes.load(Ordering::SeqCst),
            self.handler.capacity_sectors.load(Ordering::SeqCst) * 512,
        )
    }

    /// Disconnects; the daemon then closes the channel, which ends the
    /// handler's loop.
    fn leave(self) {
        self.handler.main.lock().unwrap().take();
        drop(self.fe);
        self.serving.join().unwrap();
    }
}

#[test]
fn a_frontend_with_the_backend_channel_is_told_and_rereads_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let (d, _img, control) = plain(dir.path(), &[]);
    let mut first = ToldFrontend::connect(d.socket());
    assert_eq!(read_capacity(&mut first.fe).unwrap(), SIZE / 512);

    let out = ctl_ok(&control, &["resize", "32M"]);
    assert!(out.contains("the frontend was told"), "{out}\n{}", d.log());
    assert_eq!(first.told(), (1, 32 * MIB));
    let out = ctl_ok(&control, &["--json", "resize", "40M"]);
    assert!(out.contains("\"frontend\":\"notified\""), "{out}");
    assert_eq!(first.told(), (2, 40 * MIB));
    first.leave();

    // The next connection's channel replaces the first one's.
    let mut second = ToldFrontend::connect(d.socket());
    assert_eq!(read_capacity(&mut second.fe).unwrap(), 40 * MIB / 512);
    let out = ctl_ok(&control, &["--json", "resize", "48M"]);
    assert!(
        out.contains("\"frontend\":\"notified\""),
        "{out}\n{}",
        d.log()
    );
    assert_eq!(second.told(), (1, 48 * MIB));
    second.leave();
    assert!(
        d.log().contains("frontend notified of the new size"),
        "{}",
        d.log()
    );
}

#[test]
fn a_frontend_that_never_answers_does_not_wedge_the_control_socket() {
    let dir = tempfile::tempdir().unwrap();
    let (d, img, control) = plain(dir.path(), &[]);
    let mut fe = negotiate(d.socket());
    // The channel's other end is kept open and never read.
    let (ours, theirs) = UnixStream::pair().unwrap();
    fe.set_backend_request_fd(&theirs).unwrap();
    drop(theirs);

    let started = Instant::now();
    let resizing = {
        let control = control.clone();
        std::thread::spawn(move || ctl(&control, &["resize", "32M"]))
    };
    // Meanwhile the control socket answers other clients.
    std::thread::sleep(Duration::from_millis(500));
    ctl_ok(&control, &["stats"]);
    let out = resizing.join().unwrap();
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", d.log());
    assert!(text.contains("did not answer"), "{text}");
    assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");
    assert_eq!(file_len(&img), 32 * MIB);

    // The frontend goes away: the blocked sender is released, and the next
    // resize has no one to tell.
    drop(fe);
    drop(ours);
    let deadline = Instant::now() + common::PATIENCE;
    loop {
        let out = ctl_ok(&control, &["--json", "resize", "48M"]);
        if out.contains("not-connected") {
            break;
        }
        assert!(Instant::now() < deadline, "still connected: {out}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // And a new frontend is served the new size.
    let c = Client::connect(d.socket()).unwrap();
    assert_eq!(c.capacity, 48 * MIB);
}

/// `FrontendReqHandler` lends its socket as a raw descriptor only.
struct RawFdHolder(std::os::fd::RawFd);

impl AsRawFd for RawFdHolder {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}
