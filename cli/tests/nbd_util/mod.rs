//! Shared helpers of the NBD integration tests: an in-process server on a raw
//! image and running QEMU's tools (guarded by the test kit's [`Process`]).
#![allow(dead_code)]

use colo_blk::block::{RawFile, SharedDev};
use colo_blk::nbd::{NbdAddr, Server, ServerOptions};
#[allow(unused_imports)]
pub use colo_blk_testkit::{pattern, Process};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

/// A server on a fresh sparse raw image in a temporary directory.
pub struct Served {
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
    pub socket: PathBuf,
    pub server: Option<Server>,
}

impl Served {
    /// Serves a new sparse image of `size` bytes on a Unix socket.
    pub fn raw(size: u64) -> Served {
        Served::with(size, ServerOptions::default(), |d| d)
    }

    /// Serves a new image, letting the test wrap the device.
    pub fn with(
        size: u64,
        opts: ServerOptions,
        wrap: impl FnOnce(SharedDev) -> SharedDev,
    ) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        let socket = dir.path().join("nbd.sock");
        let dev = RawFile::create(&image, size).unwrap();
        let dev: SharedDev = wrap(Arc::new(dev));
        let server = Server::start(&NbdAddr::Unix(socket.clone()), dev, opts).unwrap();
        Served {
            dir,
            image,
            socket,
            server: Some(server),
        }
    }

    /// QEMU's URI for the export.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///parent0?socket={}", self.socket.display())
    }

    pub fn server(&self) -> &Server {
        self.server.as_ref().unwrap()
    }

    pub fn image_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.image).unwrap()
    }
}

/// Runs a QEMU tool and returns its output.
pub fn run(tool: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"))
}

/// Runs a QEMU tool and fails the test (with its output) unless it succeeds.
pub fn run_ok(tool: &str, args: &[&str]) -> String {
    let out = run(tool, args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{tool} {args:?} failed:\n{text}");
    text
}

/// `qemu-io` on an NBD URI with the given commands; returns the output text.
/// Pattern checks (`read -P`) print "Pattern verification failed" on mismatch,
/// which this treats as a failure too.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    let text = run_ok("qemu-io", &args);
    assert!(
        !text.contains("failed") && !text.contains("error"),
        "qemu-io {cmds:?} reported a failure:\n{text}"
    );
    text
}

/// qemu-storage-daemon exporting `image` as `parent0` on `socket`.
pub fn qsd_nbd(image: &Path, socket: &Path) -> Process {
    let _ = std::fs::remove_file(socket);
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=disk,filename={}",
            image.display()
        ))
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", socket.display()))
        .arg("--export")
        .arg("type=nbd,id=exp,node-name=disk,name=parent0,writable=on");
    let mut child = Process::spawn("qemu-storage-daemon", cmd, None).expect("qemu-storage-daemon");
    // QEMU binds before it listens: wait for a connection, not the path.
    child
        .wait_for_listener(socket)
        .expect("qemu-storage-daemon listens");
    child
}
