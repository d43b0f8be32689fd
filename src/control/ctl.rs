//! `colo-blk ctl`: one control command, printed for humans (or as JSON).

use super::client::QmpClient;
use super::progress::{self, Job};
use super::ControlError;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

/// Arguments of `colo-blk ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// Control socket of the daemon (its `serve --control PATH`).
    #[arg(long, value_name = "PATH")]
    pub control: PathBuf,
    /// Print the raw QMP return value as JSON instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// Give up when the daemon does not answer within this many seconds.
    #[arg(long, default_value_t = 120, value_name = "SECONDS")]
    pub timeout: u64,
    /// What to do.
    #[command(subcommand)]
    pub action: CtlAction,
}

/// The control commands.
#[derive(Debug, Subcommand)]
pub enum CtlAction {
    /// Start replication in the daemon's configured mode (replication-start).
    Start {
        /// Primary only: how to bring the secondary up to date first.
        #[arg(long, value_enum, default_value_t = SyncArg::Full)]
        sync: SyncArg,
        /// Primary: return once the resync is complete, showing its progress
        /// (a bar with rate and ETA on a terminal, a line a second otherwise).
        #[arg(long)]
        wait: bool,
    },
    /// Take a checkpoint (replication-checkpoint): a barrier on the primary,
    /// emptying of the overlays on the secondary.
    Checkpoint,
    /// Stop replicating (replication-stop).
    Stop {
        /// Secondary: take over (commit the overlays, fence the old primary).
        /// Primary: carry on alone.
        #[arg(long)]
        failover: bool,
        /// With --failover: return once the commit is complete (or failed),
        /// showing its progress.
        #[arg(long, requires = "failover")]
        wait: bool,
    },
    /// Show mode, stage, error and progress (query-replication).
    Status,
    /// Exit 0 when no I/O error is recorded, else print it and exit 1
    /// (replication-get-error).
    GetError,
    /// Show I/O statistics per queue and in all (query-blockstats) and the
    /// replication counters (query-replication-stats).
    Stats,
    /// Grow the disk online (block_resize); plain mode only, never shrinks.
    ///
    /// The image file grows, the guest is served the new size at once, and
    /// the frontend is told with a config-change message when it negotiated
    /// the backend request channel (QEMU does); otherwise its next config
    /// read returns the new size. Prints what the frontend was told.
    Resize {
        /// The new size: bytes, or with a K/M/G/T suffix (powers of 1024). A
        /// multiple of the logical block size, not below the current size.
        #[arg(value_name = "SIZE", value_parser = crate::units::parse_size)]
        size: u64,
    },
    /// Ask the daemon to exit cleanly (quit).
    Quit,
}

/// `--sync` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum SyncArg {
    /// Copy the whole disk (holes skipped), then forward writes.
    Full,
    /// Copy only what changed since forwarding stopped.
    Dirty,
    /// The disks are known to be equal.
    None,
}

impl SyncArg {
    fn as_str(self) -> &'static str {
        match self {
            SyncArg::Full => "full",
            SyncArg::Dirty => "dirty",
            SyncArg::None => "none",
        }
    }
}

/// Runs one `ctl` invocation; the returned text is what to print on success.
pub fn run(args: &CtlArgs) -> Result<String, ControlError> {
    let timeout = Some(Duration::from_secs(args.timeout.max(1)));
    let mut qmp = QmpClient::connect(&args.control, timeout)?;
    let (ret, summary) = match &args.action {
        CtlAction::Start { sync, wait } => {
            let status = qmp.execute("query-replication", json!({}))?;
            let mode = status["mode"].as_str().unwrap_or("secondary").to_owned();
            let mut a = json!({ "mode": mode });
            if mode == "primary" {
                a["sync"] = json!(sync.as_str());
            }
            let mut ret = qmp.execute("replication-start", a)?;
            if *wait && mode == "primary" {
                ret = progress::wait(&mut qmp, Job::Resync, timeout_of(args))?;
                (
                    ret,
                    "replication started (primary), resync complete".to_owned(),
                )
            } else {
                (ret, format!("replication started ({mode})"))
            }
        }
        CtlAction::Checkpoint => (
            qmp.execute("replication-checkpoint", json!({}))?,
            "checkpoint done".to_owned(),
        ),
        CtlAction::Stop { failover, wait } => {
            let ret = qmp.execute("replication-stop", json!({ "failover": failover }))?;
            if *wait {
                let st = progress::wait(&mut qmp, Job::Commit, timeout_of(args))?;
                return Ok(if args.json {
                    st.to_string()
                } else {
                    "failover complete: serving the secondary disk".to_owned()
                });
            }
            let text = if *failover {
                "failover started (query status to follow it)"
            } else {
                "replication stopped"
            };
            (ret, text.to_owned())
        }
        CtlAction::Status => {
            let ret = qmp.execute("query-replication", json!({}))?;
            let text = status_text(&ret);
            (ret, text)
        }
        CtlAction::GetError => (
            qmp.execute("replication-get-error", json!({}))?,
            "no error".to_owned(),
        ),
        CtlAction::Stats => {
            let blk = qmp.execute("query-blockstats", json!({}))?;
            let repl = qmp.execute("query-replication-stats", json!({}))?;
            let text = stats_text(&blk, &repl);
            (json!({"blockstats": blk, "replication": repl}), text)
        }
        CtlAction::Resize { size } => {
            // block_resize names the disk; the daemon serves one, whose node
            // name query-blockstats reports.
            let stats = qmp.execute("query-blockstats", json!({}))?;
            let node = stats[0]["node-name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let ret = qmp.execute("block_resize", json!({"node-name": node, "size": size}))?;
            let text = resize_text(&ret);
            (ret, text)
        }
        CtlAction::Quit => (qmp.execute("quit", json!({}))?, "daemon exiting".to_owned()),
    };
    Ok(if args.json { ret.to_string() } else { summary })
}

/// How long `--wait` follows a job: the `--timeout` of the whole command.
fn timeout_of(args: &CtlArgs) -> Duration {
    Duration::from_secs(args.timeout.max(1))
}

/// One row per queue and one for the disk: operations, bytes and mean
/// latency per class, then failures and the replication counters.
fn stats_text(blk: &Value, repl: &Value) -> String {
    let mut out = String::from(
        "queue     reads      read bytes  writes     write bytes flushes  discards           failed invalid  mean r/w/f µs",
    );
    let row = |name: &str, s: &Value| {
        let n = |k: &str| s[k].as_u64().unwrap_or(0);
        let mean = |ops: &str, ns: &str| {
            let (o, t) = (n(ops), n(ns));
            if o == 0 {
                "-".to_owned()
            } else {
                format!("{:.0}", t as f64 / o as f64 / 1000.0)
            }
        };
        let failed: u64 = ["rd", "wr", "flush", "unmap"]
            .iter()
            .map(|p| n(&format!("failed_{p}_operations")))
            .sum();
        let invalid: u64 = ["rd", "wr", "flush", "unmap"]
            .iter()
            .map(|p| n(&format!("invalid_{p}_operations")))
            .sum();
        format!(
            "\n{name:<9} {:<10} {:<11} {:<10} {:<11} {:<8} {:<9} {failed:<6} {invalid:<7}  {}/{}/{}",
            n("rd_operations"),
            n("rd_bytes"),
            n("wr_operations"),
            n("wr_bytes"),
            n("flush_operations"),
            n("unmap_operations"),
            mean("rd_operations", "rd_total_time_ns"),
            mean("wr_operations", "wr_total_time_ns"),
            mean("flush_operations", "flush_total_time_ns"),
        )
    };
    for dev in blk.as_array().into_iter().flatten() {
        for q in dev["queues"].as_array().into_iter().flatten() {
            out.push_str(&row(&q["queue"].to_string(), &q["stats"]));
        }
        out.push_str(&row("all", &dev["stats"]));
    }
    let r = |k: &str| repl[k].as_u64().unwrap_or(0);
    out.push_str(&format!(
        "\nreplication: forwarded {} writes ({} bytes), copy-before-write {} ({} bytes), \
         resync {} bytes, commit {} bytes, errors {}",
        r("forwarded-writes"),
        r("forwarded-bytes"),
        r("cbw-copies"),
        r("cbw-bytes"),
        r("resync-bytes"),
        r("commit-bytes"),
        r("errors"),
    ));
    out
}

/// What `ctl resize` prints: the sizes, then what the frontend was told.
fn resize_text(r: &Value) -> String {
    let n = |k: &str| r[k].as_u64().unwrap_or(0);
    let (old, new) = (n("old-size"), n("size"));
    let size = |b: u64| format!("{} ({b} bytes)", progress::human_bytes(b as f64));
    let frontend = r["frontend"].as_str().unwrap_or_default();
    if frontend == "unchanged" {
        return format!("the disk is already {}: nothing to do", size(new));
    }
    let told = match frontend {
        "notified" => "the frontend was told (config-change message delivered)".into(),
        "not-connected" => "no frontend is connected: the next one gets the new size".into(),
        "no-backend-channel" => "the frontend did not negotiate the backend request channel \
             (BACKEND_REQ), so it was not told: its next config read returns the new size"
            .into(),
        "no-answer" => "the frontend did not answer the config-change message in time \
             (it may still apply it)"
            .into(),
        _ => format!(
            "telling the frontend failed: {}",
            r["error"].as_str().unwrap_or("unknown error")
        ),
    };
    format!("disk grown from {} to {}; {told}", size(old), size(new))
}

fn status_text(s: &Value) -> String {
    let mut out = format!(
        "mode:  {}\nstage: {}\nerror: {}",
        s["mode"].as_str().unwrap_or("?"),
        s["stage"].as_str().unwrap_or("?"),
        s["error"].as_str().unwrap_or("none"),
    );
    for key in ["resync", "commit"] {
        if let (Some(done), Some(total)) = (s[key]["done"].as_u64(), s[key]["total"].as_u64()) {
            let pct = (done * 100).checked_div(total).unwrap_or(100);
            out.push_str(&format!("\n{key}: {done}/{total} bytes ({pct}%)"));
        }
    }
    if let Some(n) = s["dirty-clusters"].as_u64() {
        out.push_str(&format!("\ndirty clusters: {n}"));
    }
    out
}
