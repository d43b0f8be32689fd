//! `ctl ... --wait`: follows a resync or a failover commit through
//! `query-replication` until it ends, showing its progress: a bar with rate
//! and ETA redrawn in place on a terminal, one plain line per second
//! otherwise (logs, pipes, the OCF agent).

use super::client::QmpClient;
use super::ControlError;
use serde_json::{json, Value};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How often the daemon is asked.
const POLL: Duration = Duration::from_millis(200);
/// How often a plain line is printed when not on a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(1);
const BAR_WIDTH: usize = 30;

/// Which job is followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// The primary's resync (`start --sync full|dirty`).
    Resync,
    /// The secondary's failover commit (`stop --failover`).
    Commit,
}

impl Job {
    fn key(self) -> &'static str {
        match self {
            Job::Resync => "resync",
            Job::Commit => "commit",
        }
    }
}

/// What a poll of `query-replication` says about the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Still going: bytes done of total (None before the first figure).
    Running(Option<(u64, u64)>),
    /// Finished.
    Done,
    /// Ended with this error.
    Failed(String),
}

/// Reads the job's phase from a `query-replication` return value.
pub fn phase(job: Job, status: &Value) -> Phase {
    let stage = status["stage"].as_str().unwrap_or("");
    let error = status["error"].as_str();
    let figures = match (
        status[job.key()]["done"].as_u64(),
        status[job.key()]["total"].as_u64(),
    ) {
        (Some(d), Some(t)) => Some((d, t)),
        _ => None,
    };
    match job {
        Job::Commit => match stage {
            "failover" => Phase::Running(figures),
            "failover-failed" => Phase::Failed(error.unwrap_or("commit failed").to_owned()),
            "done" => Phase::Done,
            other => Phase::Failed(format!("stage is {other}, not failing over")),
        },
        Job::Resync => {
            if let Some(e) = error {
                return Phase::Failed(e.to_owned());
            }
            match (stage, figures) {
                ("running", Some((d, t))) if d < t => Phase::Running(figures),
                ("running", Some(_)) => Phase::Done,
                // No resync figures yet: start returned before the copy began,
                // or `--sync none` (nothing to copy).
                ("running", None) => Phase::Done,
                (other, _) => Phase::Failed(format!("stage is {other}, not replicating")),
            }
        }
    }
}

/// Formats a byte count with a binary unit.
pub fn human_bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn human_duration(secs: f64) -> String {
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// One progress report: `job: done/total (pct) rate, ETA`; with `bar`, a
/// bar of `#` in front.
pub fn render(job: Job, done: u64, total: u64, rate: Option<f64>, bar: bool) -> String {
    let pct = if total == 0 {
        100.0
    } else {
        (done as f64 * 100.0 / total as f64).min(100.0)
    };
    let mut s = String::new();
    if bar {
        let filled = ((pct / 100.0) * BAR_WIDTH as f64) as usize;
        s.push_str(&format!(
            "[{}{}] ",
            "#".repeat(filled),
            " ".repeat(BAR_WIDTH - filled.min(BAR_WIDTH))
        ));
    }
    s.push_str(&format!(
        "{}: {} / {} ({pct:.0}%)",
        job.key(),
        human_bytes(done as f64),
        human_bytes(total as f64)
    ));
    match rate {
        Some(r) if r > 0.0 => {
            let eta = total.saturating_sub(done) as f64 / r;
            s.push_str(&format!(
                ", {}/s, ETA {}",
                human_bytes(r),
                human_duration(eta)
            ));
        }
        _ => s.push_str(", rate -, ETA -"),
    }
    s
}

/// Rate over the whole run so far (bytes per second), once there is one.
struct Rate {
    first: Option<(Instant, u64)>,
}

impl Rate {
    fn update(&mut self, now: Instant, done: u64) -> Option<f64> {
        let (t0, d0) = *self.first.get_or_insert((now, done));
        let secs = now.duration_since(t0).as_secs_f64();
        (secs > 0.2 && done > d0).then(|| (done - d0) as f64 / secs)
    }
}

/// Polls until `job` ends or `timeout` passes; progress goes to stderr (so
/// `--json` output on stdout stays one JSON value). Returns the final status.
pub fn wait(qmp: &mut QmpClient, job: Job, timeout: Duration) -> Result<Value, ControlError> {
    let tty = std::io::stderr().is_terminal();
    let deadline = Instant::now() + timeout;
    let mut rate = Rate { first: None };
    let mut last_line: Option<Instant> = None;
    let mut err = std::io::stderr();
    loop {
        let status = qmp.execute("query-replication", json!({}))?;
        let now = Instant::now();
        match phase(job, &status) {
            Phase::Done => {
                if let Some((d, t)) = figures(job, &status) {
                    let line = render(job, d, t.max(d), rate.update(now, d), tty);
                    if tty {
                        let _ = writeln!(err, "\r{line}");
                    } else {
                        let _ = writeln!(err, "{line}");
                    }
                }
                return Ok(status);
            }
            Phase::Failed(e) => {
                if tty {
                    let _ = writeln!(err);
                }
                return Err(ControlError::Command(format!("{}: {e}", job.key())));
            }
            Phase::Running(figs) => {
                let (d, t) = figs.unwrap_or((0, 0));
                let r = rate.update(now, d);
                if tty {
                    let _ = write!(err, "\r{}", render(job, d, t, r, true));
                    let _ = err.flush();
                } else if last_line.map_or(true, |l| now.duration_since(l) >= PLAIN_EVERY) {
                    let _ = writeln!(err, "{}", render(job, d, t, r, false));
                    last_line = Some(now);
                }
            }
        }
        if now >= deadline {
            if tty {
                let _ = writeln!(err);
            }
            return Err(ControlError::Command(format!(
                "{} still running after {} s (--timeout)",
                job.key(),
                timeout.as_secs()
            )));
        }
        std::thread::sleep(POLL);
    }
}

fn figures(job: Job, status: &Value) -> Option<(u64, u64)> {
    Some((
        status[job.key()]["done"].as_u64()?,
        status[job.key()]["total"].as_u64()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_phase_follows_the_secondary_stage() {
        let running = json!({"stage": "failover", "error": null,
                             "commit": {"done": 5, "total": 10}});
        assert_eq!(phase(Job::Commit, &running), Phase::Running(Some((5, 10))));
        assert_eq!(
            phase(Job::Commit, &json!({"stage": "done", "error": null})),
            Phase::Done
        );
        assert_eq!(
            phase(
                Job::Commit,
                &json!({"stage": "failover-failed", "error": "EIO at 4096"})
            ),
            Phase::Failed("EIO at 4096".into())
        );
    }

    #[test]
    fn resync_ends_when_done_reaches_total_or_an_error_is_recorded() {
        let at = |d: u64, t: u64| {
            json!({"stage": "running", "error": null,
                                         "resync": {"done": d, "total": t}})
        };
        assert_eq!(phase(Job::Resync, &at(1, 4)), Phase::Running(Some((1, 4))));
        assert_eq!(phase(Job::Resync, &at(4, 4)), Phase::Done);
        let failed = json!({"stage": "running", "error": "link down",
                            "resync": {"done": 1, "total": 4}});
        assert_eq!(
            phase(Job::Resync, &failed),
            Phase::Failed("link down".into())
        );
    }

    #[test]
    fn a_line_shows_bytes_percent_rate_and_eta() {
        let line = render(Job::Resync, 1 << 20, 4 << 20, Some(1048576.0), false);
        assert_eq!(line, "resync: 1.0 MiB / 4.0 MiB (25%), 1.0 MiB/s, ETA 3s");
        let bar = render(Job::Commit, 1, 2, None, true);
        assert!(
            bar.starts_with("[###############               ] commit:"),
            "{bar}"
        );
        assert!(bar.ends_with("rate -, ETA -"), "{bar}");
    }
}
