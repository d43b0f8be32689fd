//! Child `colo-blk serve` processes for the demo, killed by pid when dropped.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running daemon; dropping it kills and reaps the process.
pub struct Proc {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Starts `colo-blk serve ARGS` (this same executable) and waits until every
    /// path in `sockets` exists.
    pub fn serve(
        name: &'static str,
        args: &[String],
        sockets: &[&Path],
        log: PathBuf,
    ) -> Result<Proc, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?;
        let err = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let child = Command::new(exe)
            .arg("serve")
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start the {name}: {e}"))?;
        let mut p = Proc {
            name,
            child: Some(child),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sockets.iter().all(|s| s.exists()) {
            if let Some(status) = p.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(format!(
                    "the {name} exited early ({status}):\n{}",
                    p.log_tail()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the {name} did not create its sockets:\n{}",
                    p.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(p)
    }

    /// Kills the process at once (SIGKILL): a host failure.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The last lines of the daemon's log, for error reports.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(15);
        format!("--- {} log ---\n{}", self.name, lines[from..].join("\n"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
