//! Child processes that cannot outlive their test (or the demo), and waiting
//! for the sockets they serve.

use crate::PATIENCE;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Lines of the log an error report shows.
const TAIL_LINES: usize = 15;

/// A child process (a colo-blk daemon, a QEMU tool). Dropping it kills the
/// process by pid (SIGKILL unless [`Process::stop_with`] says otherwise) and
/// reaps it, so nothing is left behind on any path out of a test, panics
/// included.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Option<Child>,
    log: Option<PathBuf>,
    stop_signal: libc::c_int,
}

/// Why a [`Process`] did not get ready.
#[derive(Debug)]
pub enum ProcessError {
    /// It could not be started.
    Spawn(String, io::Error),
    /// It exited first.
    Exited(String, ExitStatus),
    /// It was not ready within the time given.
    Timeout(String),
}

impl std::fmt::Display for ProcessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProcessError::Spawn(what, e) => write!(f, "cannot start {what}: {e}"),
            ProcessError::Exited(what, status) => write!(f, "{what} exited early ({status})"),
            ProcessError::Timeout(what) => write!(f, "{what}: not ready in time"),
        }
    }
}

impl std::error::Error for ProcessError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProcessError::Spawn(_, e) => Some(e),
            _ => None,
        }
    }
}

impl Process {
    /// Starts `cmd` with stdin and stdout closed and stderr appended to `log`
    /// (when given), with `RUST_LOG` defaulting to `info`. `name` names it in
    /// errors and log excerpts.
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        log: Option<&Path>,
    ) -> Result<Process, ProcessError> {
        let spawn_error = |e| ProcessError::Spawn(name.to_string(), e);
        let stderr = match log {
            Some(path) => Stdio::from(File::create(path).map_err(spawn_error)?),
            None => Stdio::inherit(),
        };
        let child = cmd
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(spawn_error)?;
        Ok(Process {
            name: name.to_string(),
            child: Some(child),
            log: log.map(Path::to_path_buf),
            stop_signal: libc::SIGKILL,
        })
    }

    /// Guards a child spawned elsewhere (with stdio of its own choosing).
    pub fn adopt(name: &str, child: Child) -> Process {
        Process {
            name: name.to_string(),
            child: Some(child),
            log: None,
            stop_signal: libc::SIGKILL,
        }
    }

    /// Makes dropping send `signal` first (SIGTERM: let a QEMU tool flush),
    /// then, if the process has not exited within [`PATIENCE`], SIGKILL.
    #[must_use]
    pub fn stop_with(mut self, signal: libc::c_int) -> Self {
        self.stop_signal = signal;
        self
    }

    /// Waits up to `patience` until `ready` holds, polling; fails early if
    /// the process exits first.
    pub fn wait_until(
        &mut self,
        patience: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), ProcessError> {
        let deadline = Instant::now() + patience;
        loop {
            if ready() {
                return Ok(());
            }
            if let Some(status) = self.try_wait() {
                return Err(ProcessError::Exited(self.name.clone(), status));
            }
            if Instant::now() > deadline {
                return Err(ProcessError::Timeout(self.name.clone()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until every path in `paths` is a Unix socket. colo-blk's
    /// sockets appear only once they accept connections, so their path is
    /// enough (`colo_blk::unix_socket`).
    pub fn wait_for_sockets(&mut self, paths: &[&Path]) -> Result<(), ProcessError> {
        self.wait_until(PATIENCE, || paths.iter().all(|p| is_socket(p)))
    }

    /// Waits until `path` accepts a connection: QEMU binds before it
    /// listens, so its socket file exists a moment before it accepts.
    pub fn wait_for_listener(&mut self, path: &Path) -> Result<(), ProcessError> {
        self.wait_until(PATIENCE, || UnixStream::connect(path).is_ok())
    }

    /// The process id.
    ///
    /// # Panics
    ///
    /// Once the process has been reaped.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("process already reaped").id()
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        let pid = libc::pid_t::try_from(self.pid()).map_err(io::Error::other)?;
        // SAFETY: kill only reads its integer arguments; the pid is our own
        // unreaped child, so it cannot have been recycled.
        if unsafe { libc::kill(pid, signal) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// The exit status, if the process has exited (it is then reaped).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
    }

    /// Waits up to `patience` for the process to exit on its own.
    pub fn wait_exit(&mut self, patience: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + patience;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit, however long it takes.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        let status = self
            .child
            .as_mut()
            .ok_or_else(|| io::Error::other("process already reaped"))?
            .wait()?;
        self.child = None;
        Ok(status)
    }

    /// Kills the process at once (SIGKILL) and reaps it: a host failure.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Everything the process wrote to its log so far.
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// The last lines of the log, headed by the name, for error reports.
    pub fn log_tail(&self) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(TAIL_LINES);
        format!("--- {} log ---\n{}", self.name, lines[from..].join("\n"))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.stop_signal != libc::SIGKILL
            && self.child.is_some()
            && self.signal(self.stop_signal).is_ok()
        {
            let _ = self.wait_exit(PATIENCE);
        }
        self.kill();
    }
}

/// True if `path` exists and is a Unix socket.
pub fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}
