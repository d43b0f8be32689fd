//! Helpers shared by the integration tests: run the real `colo-blk` binary
//! ([`Daemon`]) and drive a vhost-user-blk socket through libblkio ([`Client`]).
//!
//! Use from a test file with `mod common;`.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs::File;

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_colo-blk");

/// How long to wait for a daemon to create its socket or to exit. Generous: the
/// machine is shared and slow; a healthy daemon needs milliseconds.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A running `colo-blk` process. Dropping it kills the process (by pid) and
/// reaps it, so no test leaves a daemon behind on any path, panics included.
pub struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts `colo-blk ARGS...` and waits until `socket` exists. The process's
    /// stderr goes to `log` (shown when a helper fails).
    pub fn spawn<I, S>(args: I, socket: &Path, log: &Path) -> Daemon
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let err = File::create(log).expect("create daemon log");
        let child = Command::new(BIN)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn colo-blk");
        let mut d = Daemon {
            child: Some(child),
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
        };
        d.wait_for_socket();
        d
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

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if is_socket(&self.socket) {
                return;
            }
            if let Some(status) = self.child_mut().try_wait().expect("try_wait") {
                panic!(
                    "colo-blk exited ({status}) before creating {}:\n{}",
                    self.socket.display(),
                    self.log()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "colo-blk did not create {} in {PATIENCE:?}:\n{}",
                    self.socket.display(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("daemon already reaped")
    }

    /// The vhost-user socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon already reaped").id()
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: kill only reads its integer arguments; the pid is our own
        // unreaped child, so it cannot have been recycled.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal})");
    }

    /// Waits for the daemon to exit on its own and returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child_mut().try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                panic!("colo-blk did not exit in {PATIENCE:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: as in `signal`; the child is not reaped yet.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
            let _ = child.wait();
        }
    }
}

/// True if `path` exists and is a Unix socket.
pub fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// A sparse file of `size` bytes at `path`.
pub fn sparse_image(path: &Path, size: u64) {
    File::create(path)
        .and_then(|f| f.set_len(size))
        .expect("create image");
}

/// Deterministic pseudo-random bytes (xorshift): patterns that differ per
/// offset and per seed, so misplaced data is caught.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[allow(unused_imports)]
pub use colo_blk::frontend::{Client, ClientOptions, IoError, Queue};

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
