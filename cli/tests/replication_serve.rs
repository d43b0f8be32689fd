//! `colo-blk serve --mode secondary` end to end, with the real peers: libblkio as
//! the secondary VM, our NBD client as the primary's forwarder, `colo-blk ctl` on
//! the control socket. Overlays on tmpfs (and at their default paths).

mod common;

use colo_blk::block::{BlockDevExt, BlockError};
use colo_blk::nbd;
use common::{Client, Daemon, BIN};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const SIZE: u64 = 32 << 20;
const HALF: u64 = SIZE / 2;
const CHUNK: u64 = 1 << 20;

struct Pair {
    dir: tempfile::TempDir,
    daemon: Daemon,
    control: PathBuf,
    nbd_uri: String,
}

fn tmpfs_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

fn image(path: &Path, byte: u8) {
    let f = std::fs::File::create(path).unwrap();
    let buf = vec![byte; CHUNK as usize];
    for i in 0..SIZE / CHUNK {
        f.write_all_at(&buf, i * CHUNK).unwrap();
    }
}

fn serve(overlays: Option<&Path>) -> Pair {
    serve_with(overlays, &[])
}

fn serve_with(overlays: Option<&Path>, flags: &[&str]) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    image(&disk, 0x11);
    let control = dir.path().join("ctl.sock");
    let nbd_sock = dir.path().join("nbd.sock");
    let listen = format!("unix:{}", nbd_sock.display());
    let mut extra: Vec<String> = vec![
        "--mode".into(),
        "secondary".into(),
        "--nbd-listen".into(),
        listen,
        "--control".into(),
        control.display().to_string(),
    ];
    if let Some(ov) = overlays {
        extra.push("--active".into());
        extra.push(ov.join("a.active").display().to_string());
        extra.push("--hidden".into());
        extra.push(ov.join("a.hidden").display().to_string());
    }
    extra.extend(flags.iter().map(|f| f.to_string()));
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut daemon = Daemon::serve(dir.path(), &disk, &extra);
    daemon.wait_for_socket(&nbd_sock);
    daemon.wait_for_socket(&control);
    Pair {
        nbd_uri: format!("nbd+unix:///parent0?socket={}", nbd_sock.display()),
        dir,
        daemon,
        control,
    }
}

impl Pair {
    fn ctl(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(BIN)
            .arg("ctl")
            .arg("--control")
            .arg(&self.control)
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    }

    fn ctl_ok(&self, args: &[&str]) -> String {
        let (ok, text) = self.ctl(args);
        assert!(ok, "ctl {args:?} failed: {text}\n{}", self.daemon.log());
        text
    }

    fn wait_stage(&self, stage: &str) {
        let deadline = Instant::now() + common::PATIENCE;
        loop {
            let status = self.ctl_ok(&["--json", "status"]);
            if status.contains(&format!("\"stage\":\"{stage}\""))
                || status.contains(&format!("\"stage\": \"{stage}\""))
            {
                return;
            }
            assert!(Instant::now() < deadline, "stage never {stage}: {status}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn disk_bytes(&self, off: u64, len: u64) -> Vec<u8> {
        let f = std::fs::File::open(self.dir.path().join("disk.img")).unwrap();
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, off).unwrap();
        buf
    }
}

fn guest_fill(c: &mut Client, off: u64, len: u64, byte: u8) {
    let buf = vec![byte; CHUNK as usize];
    let mut pos = off;
    while pos < off + len {
        let n = (off + len - pos).min(CHUNK);
        c.write(pos, &buf[..n as usize]).unwrap();
        pos += n;
    }
}

fn guest_expect(c: &mut Client, off: u64, len: u64, byte: u8) {
    let mut pos = off;
    while pos < off + len {
        let n = (off + len - pos).min(CHUNK);
        let got = c.read(pos, n as usize).unwrap();
        if let Some(i) = got.iter().position(|&b| b != byte) {
            panic!(
                "guest reads {:#04x} at {}, expected {byte:#04x}",
                got[i],
                pos + i as u64
            );
        }
        pos += n;
    }
}

fn primary_fill(p: &nbd::Client, off: u64, len: u64, byte: u8) {
    let buf = vec![byte; CHUNK as usize];
    let mut pos = off;
    while pos < off + len {
        let n = (off + len - pos).min(CHUNK);
        p.write_at(pos, &buf[..n as usize]).unwrap();
        pos += n;
    }
}

#[test]
fn secondary_serves_guest_through_overlays_on_tmpfs_checkpoints_and_fails_over() {
    serves_checkpoints_and_fails_over(&[]);
}

/// The same with the disk O_DIRECT: the guest's requests go through the
/// secondary's channel, reads of clean clusters on the disk's io_uring.
#[test]
fn secondary_on_an_o_direct_disk_serves_the_guest_through_its_channel() {
    let pair = serves_checkpoints_and_fails_over(&["--direct"]);
    let log = pair.daemon.log();
    assert!(log.contains("secondary channel"), "{log}");
}

fn serves_checkpoints_and_fails_over(flags: &[&str]) -> Pair {
    let ov = tmpfs_dir();
    let pair = serve_with(Some(ov.path()), flags);
    assert_eq!(
        std::fs::metadata(ov.path().join("a.active")).unwrap().len(),
        SIZE
    );
    assert_eq!(
        std::fs::metadata(ov.path().join("a.hidden")).unwrap().len(),
        SIZE
    );
    let mut guest = Client::connect(pair.daemon.socket()).unwrap();
    assert_eq!(guest.capacity, SIZE);
    // Before start the secondary VM gets EIO; the primary's initial sync lands.
    let err = guest.read(0, 4096).unwrap_err();
    assert_eq!(err.errno, libc::EIO, "{err:?}");
    assert!(guest.write(0, &[0u8; 4096]).is_err());
    let primary = nbd::Client::connect(&pair.nbd_uri).unwrap();
    primary_fill(&primary, 0, CHUNK, 0x44);
    assert!(pair.disk_bytes(0, CHUNK).iter().all(|&b| b == 0x44));

    let (ok, text) = pair.ctl(&["get-error"]);
    assert!(!ok, "get-error before start: {text}");
    pair.ctl_ok(&["start"]);
    pair.wait_stage("running");
    guest_expect(&mut guest, 0, CHUNK, 0x44);
    guest_expect(&mut guest, CHUNK, SIZE - CHUNK, 0x11);

    // The primary's writes stay invisible until the checkpoint.
    primary_fill(&primary, HALF, HALF, 0x22);
    guest_expect(&mut guest, HALF, HALF, 0x11);
    guest_fill(&mut guest, 0, HALF, 0x33);
    guest_expect(&mut guest, 0, HALF, 0x33);
    assert!(pair.disk_bytes(0, 4096).iter().all(|&b| b == 0x44));
    pair.ctl_ok(&["checkpoint"]);
    guest_expect(&mut guest, HALF, HALF, 0x22);
    guest_expect(&mut guest, CHUNK, HALF - CHUNK, 0x11);
    // The space is released in the background, shortly after the checkpoint.
    let deadline = Instant::now() + common::PATIENCE;
    loop {
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(ov.path().join("a.active"))
            .unwrap()
            .blocks();
        if blocks * 512 < 1 << 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "active not released: {blocks} blocks"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // Another interval, then failover while the guest keeps working.
    primary_fill(&primary, 0, 4 * CHUNK, 0x55);
    guest_fill(&mut guest, HALF, 4 * CHUNK, 0x66);
    pair.ctl_ok(&["get-error"]);
    pair.ctl_ok(&["stop", "--failover"]);
    guest_fill(&mut guest, SIZE - CHUNK, CHUNK, 0x77);
    pair.wait_stage("done");
    pair.ctl_ok(&["get-error"]);
    // The old primary is fenced.
    let fenced = primary.write_at(0, &[0u8; 4096]);
    assert!(
        matches!(
            fenced,
            Err(BlockError::Io { .. }) | Err(BlockError::Refused(_))
        ),
        "{fenced:?}"
    );
    // The disk equals the guest's view: the uncheckpointed 0x55 rolled back.
    let want: Vec<(u64, u64, u8)> = vec![
        (0, CHUNK, 0x44),
        (CHUNK, HALF - CHUNK, 0x11),
        (HALF, 4 * CHUNK, 0x66),
        (HALF + 4 * CHUNK, HALF - 5 * CHUNK, 0x22),
        (SIZE - CHUNK, CHUNK, 0x77),
    ];
    for &(off, len, byte) in &want {
        guest_expect(&mut guest, off, len, byte);
        let disk = pair.disk_bytes(off, len);
        if let Some(i) = disk.iter().position(|&b| b != byte) {
            panic!(
                "disk has {:#04x} at {}, guest saw {byte:#04x}",
                disk[i],
                off + i as u64
            );
        }
    }
    // After failover, start/checkpoint/stop are accepted no-ops.
    pair.ctl_ok(&["checkpoint"]);
    pair.ctl_ok(&["stop"]);
    drop(guest);
    pair
}

#[test]
fn default_overlays_are_created_next_to_the_image_and_reused() {
    let pair = serve(None);
    let active = pair.dir.path().join("disk.img.active");
    let hidden = pair.dir.path().join("disk.img.hidden");
    assert_eq!(std::fs::metadata(&active).unwrap().len(), SIZE);
    assert_eq!(std::fs::metadata(&hidden).unwrap().len(), SIZE);
    let mut guest = Client::connect(pair.daemon.socket()).unwrap();
    pair.ctl_ok(&["start"]);
    guest_fill(&mut guest, 0, CHUNK, 0x33);
    drop(guest);
    let mut d = pair.daemon;
    assert!(d.terminate().success());
    // A restarted secondary opens the existing overlays and discards their
    // contents: it must be resynced, and serves nothing stale.
    let disk = pair.dir.path().join("disk.img");
    let control = pair.control.clone();
    let nbd_sock = pair.dir.path().join("nbd2.sock");
    let listen = format!("unix:{}", nbd_sock.display());
    let mut d2 = Daemon::serve(
        pair.dir.path(),
        &disk,
        &[
            "--mode",
            "secondary",
            "--nbd-listen",
            &listen,
            "--control",
            control.to_str().unwrap(),
        ],
    );
    d2.wait_for_socket(&control);
    let again = Pair {
        dir: pair.dir,
        daemon: d2,
        control,
        nbd_uri: String::new(),
    };
    again.ctl_ok(&["start"]);
    let mut guest = Client::connect(again.daemon.socket()).unwrap();
    guest_expect(&mut guest, 0, 2 * CHUNK, 0x11);
}
