//! Helpers shared by the integration tests: run the real `colo-blk` binary
//! ([`Daemon`]) and drive a vhost-user-blk socket through libblkio ([`Client`],
//! from the test kit, as are the patterns and the process guard).
//!
//! Use from a test file with `mod common;`.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

#[allow(unused_imports)]
pub use colo_blk_testkit::{
    is_socket, pattern, Client, ClientOptions, IoError, Process, Queue, PATIENCE,
};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_colo-blk");

/// A running `colo-blk` process. Dropping it kills the process (by pid) and
/// reaps it, so no test leaves a daemon behind on any path, panics included.
pub struct Daemon {
    process: Process,
    socket: PathBuf,
}

impl Daemon {
    /// Starts `colo-blk ARGS...` and waits until `socket` exists. The process's
    /// stderr goes to `log` (shown when a helper fails).
    pub fn spawn<I, S>(args: I, socket: &Path, log: &Path) -> Daemon
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(BIN);
        cmd.args(args);
        Daemon::start(cmd, socket, log)
    }

    /// Starts `cmd` (colo-blk, possibly through a wrapper such as `ip netns
    /// exec`, which execs it in place) and waits until `socket` exists.
    pub fn start(cmd: Command, socket: &Path, log: &Path) -> Daemon {
        let mut process = Process::spawn("colo-blk", cmd, Some(log)).expect("spawn colo-blk");
        if let Err(e) = process.wait_for_sockets(&[socket]) {
            panic!("{e}: no socket {}:\n{}", socket.display(), process.log());
        }
        Daemon {
            process,
            socket: socket.to_path_buf(),
        }
    }

    /// `colo-blk serve --socket DIR/vhost.sock --disk DISK EXTRA...`, logging to
    /// DIR/serve.log.
    pub fn serve(dir: &Path, disk: &Path, extra: &[&str]) -> Daemon {
        let socket = dir.join("vhost.sock");
        let mut args: Vec<&OsStr> = vec![
            "serve".as_ref(),
            "--socket".as_ref(),
            socket.as_os_str(),
            "--disk".as_ref(),
            disk.as_os_str(),
        ];
        args.extend(extra.iter().map(|s| OsStr::new(*s)));
        Daemon::spawn(args, &socket, &dir.join("serve.log"))
    }

    /// Waits until `path` (another socket of the daemon's: control, NBD,
    /// metrics) is a socket; fails the test with the log if it exits first.
    pub fn wait_for_socket(&mut self, path: &Path) {
        if let Err(e) = self.process.wait_for_sockets(&[path]) {
            panic!("{e}: no socket {}:\n{}", path.display(), self.log());
        }
    }

    /// Waits until the Unix socket `path` accepts a connection: after a
    /// SIGKILLed predecessor its stale file exists before this daemon listens.
    pub fn wait_for_listener(&mut self, path: &Path) {
        if let Err(e) = self.process.wait_for_listener(path) {
            panic!(
                "{e}: nothing listens on {}:\n{}",
                path.display(),
                self.log()
            );
        }
    }

    /// The vhost-user socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: libc::c_int) {
        if let Err(e) = self.process.signal(signal) {
            panic!("kill({}, {signal}): {e}", self.pid());
        }
    }

    /// Waits for the daemon to exit on its own and returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        match self.process.wait_exit(PATIENCE) {
            Some(status) => status,
            None => panic!("colo-blk did not exit in {PATIENCE:?}:\n{}", self.log()),
        }
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit()
    }
}

/// `path` (such as `integration/tls/make-certs.sh`) in the repository, whose
/// root is the workspace's, one above this package.
pub fn repo_path(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ is inside the repository")
        .join(path)
}

/// Starts a qemu-nbd command line, stopped by pid (SIGTERM, so that it
/// flushes) when dropped.
pub fn spawn_qemu_nbd(cmd: &mut Command) -> Process {
    Process::adopt("qemu-nbd", cmd.spawn().expect("qemu-nbd")).stop_with(libc::SIGTERM)
}

/// A loopback TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A sparse file of `size` bytes at `path`.
pub fn sparse_image(path: &Path, size: u64) {
    File::create(path)
        .and_then(|f| f.set_len(size))
        .expect("create image");
}

/// Runs `colo-blk ctl --control CONTROL ARGS...` and returns its output.
pub fn ctl(control: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("ctl")
        .arg("--control")
        .arg(control)
        .args(args)
        .output()
        .expect("run colo-blk ctl")
}

/// Like [`ctl`], failing the test unless it succeeds; returns stdout.
pub fn ctl_ok(control: &Path, args: &[&str]) -> String {
    let out = ctl(control, args);
    assert!(
        out.status.success(),
        "colo-blk ctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `query-replication` through `ctl --json status`.
pub fn ctl_status(control: &Path) -> serde_json::Value {
    serde_json::from_str(&ctl_ok(control, &["--json", "status"])).expect("status JSON")
}
