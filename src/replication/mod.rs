//! COLO block replication: the stage machine, copy-before-write, checkpoint and
//! failover commit (behaviour of QEMU's `block/replication.c`; ARCHITECTURE.md,
//! "Replication stages and their invariants", at the root of the repository).
//!
//! Both modes implement [`Replication`], the surface the control socket drives.

use crate::block::BlockError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// Which side of a COLO pair this process is (also `serve --mode`; the
/// variants' documentation is its `--help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Serves the guest from the local disk and forwards writes to the secondary.
    Primary,
    /// Receives the primary's writes over NBD; the guest sees active ▸ hidden ▸ disk.
    Secondary,
}

impl Mode {
    /// The name used on the command line and in QMP.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Primary => "primary",
            Mode::Secondary => "secondary",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Replication stage (ARCHITECTURE.md: the stages and the I/O policy per stage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Not started.
    None,
    /// Replicating.
    Running,
    /// Secondary: committing active ▸ hidden into the secondary disk.
    Failover,
    /// Secondary: the commit failed; the error is kept.
    FailoverFailed,
    /// Stopped (after a plain stop or a completed failover).
    Done,
    /// Primary: the secondary took over (it refused a forwarded write as
    /// fenced); guest writes are held or failed, never acknowledged.
    Fenced,
}

impl Stage {
    /// The name used in QMP (`query-replication`, events).
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::None => "none",
            Stage::Running => "running",
            Stage::Failover => "failover",
            Stage::FailoverFailed => "failover-failed",
            Stage::Done => "done",
            Stage::Fenced => "fenced",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a primary brings the secondary disk up to date at `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// Copy the whole disk (holes skipped), then forward.
    #[default]
    Full,
    /// Copy only clusters changed since forwarding stopped.
    Dirty,
    /// The disks are already equal.
    None,
}

/// Progress of a long-running background job (resync, commit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Bytes done.
    pub done: u64,
    /// Bytes to do in all (may grow while the guest writes).
    pub total: u64,
}

/// What `query-replication` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Configured mode.
    pub mode: Mode,
    /// Current stage.
    pub stage: Stage,
    /// The recorded error, if any.
    pub error: Option<String>,
    /// Primary: initial/dirty resync progress.
    pub resync: Option<Progress>,
    /// Secondary: failover commit progress.
    pub commit: Option<Progress>,
    /// Primary: clusters marked dirty since forwarding stopped.
    pub dirty_clusters: Option<u64>,
    /// Primary: set once fenced (stage `fenced`).
    pub fence: Option<FenceStatus>,
}

/// Something that happened, for the control socket to emit as a QMP event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The stage changed.
    StageChanged {
        /// Mode of this side.
        mode: Mode,
        /// New stage.
        stage: Stage,
    },
    /// An I/O error was recorded (forwarding failure, commit failure, ...).
    Error {
        /// Mode of this side.
        mode: Mode,
        /// Human-readable description.
        message: String,
    },
    /// Resync progressed (primary).
    ResyncProgress(Progress),
    /// Commit progressed (secondary).
    CommitProgress(Progress),
    /// The primary was fenced by its secondary's failover.
    Fenced {
        /// What happens to guest writes now.
        policy: OnFenced,
        /// The secondary's refusal.
        reason: String,
    },
}

/// Where a replication node sends its [`Event`]s.
pub type EventSink = Arc<dyn Fn(Event) + Send + Sync>;

/// An [`EventSink`] that drops everything.
pub fn no_events() -> EventSink {
    Arc::new(|_| {})
}

/// A failure a replication node recorded (a forwarded request, the resync,
/// fencing, the failover commit): what `replication-get-error` returns and
/// `query-replication` shows, with its cause.
#[derive(Debug, Clone, Error)]
#[error("{context}{}", .source.as_ref().map(|s| format!(": {s}")).unwrap_or_default())]
pub struct Failure {
    context: String,
    #[source]
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl Failure {
    /// A failure with no underlying error.
    pub fn new(context: impl Into<String>) -> Self {
        Failure {
            context: context.into(),
            source: None,
        }
    }

    /// `context` failed because of `source`.
    pub fn caused_by(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Failure {
            context: context.into(),
            source: Some(Arc::new(source)),
        }
    }
}

/// Why a replication command failed. The text is what QMP clients see; the
/// causes stay reachable through [`std::error::Error::source`].
#[derive(Debug, Error)]
pub enum ReplicationError {
    /// `start` outside stage `none`.
    #[error("Block replication is running or done")]
    AlreadyStarted,
    /// The requested mode is not the configured one.
    #[error("The parameter mode's value is invalid, needs {expected}, but got {got}")]
    ModeMismatch {
        /// Configured mode.
        expected: Mode,
        /// Requested mode.
        got: Mode,
    },
    /// A command that needs replication running.
    #[error("Block replication is not running")]
    NotRunning,
    /// Active, hidden and secondary disk differ in length.
    #[error("Active disk, hidden disk, secondary disk's length are not the same")]
    LengthMismatch,
    /// The primary's and the secondary's disk differ in size.
    #[error("secondary disk is {secondary} bytes, primary disk is {primary}")]
    SizeMismatch {
        /// The secondary's, in bytes.
        secondary: u64,
        /// The primary's, in bytes.
        primary: u64,
    },
    /// A secondary's cluster size is not usable with its overlays.
    #[error("cluster size {size} must be a power of two of at least {granule} bytes")]
    ClusterSize {
        /// The cluster size asked for.
        size: u64,
        /// The overlays' granule.
        granule: u64,
    },
    /// A failure recorded earlier (get-error, checkpoint) or hit now.
    #[error(transparent)]
    Failed(#[from] Failure),
    /// The write-intent bitmap could not be updated.
    #[error(transparent)]
    Intent(#[from] IntentError),
    /// `start` could not reach the secondary.
    #[error("cannot reach the secondary: {0}")]
    Unreachable(#[source] BlockError),
    /// `start` did not reach the secondary within the connect deadline.
    #[error("cannot reach the secondary: no connection within {0:?}")]
    ConnectTimeout(Duration),
    /// A thread the command needs could not be started.
    #[error("cannot start {what}: {source}")]
    Thread {
        /// What the thread was for.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `start` on a fenced primary.
    #[error(
        "this primary is fenced: its secondary took over at failover and holds the newer \
         disk; restart this side as the new primary's secondary (full resync)"
    )]
    Fenced,
    /// `start --sync dirty` without a dirty-resync baseline.
    #[error("no dirty bitmap: the secondary was never in sync with this primary; use sync full")]
    NoBaseline,
    /// A second `start` while one is connecting.
    #[error("a replication-start is already in progress")]
    StartInProgress,
    /// The stage changed (fenced) while `start` was connecting.
    #[error("stage changed to {0} while starting")]
    StageChanged(Stage),
    /// A command after the failover commit failed.
    #[error("Block replication failover failed; the overlays hold data the secondary disk lacks")]
    FailoverFailed,
    /// The node is being dropped.
    #[error("the replication node is closing")]
    Closing,
}

/// The control surface of a replication node, in either mode.
///
/// Semantics as in ARCHITECTURE.md (the stages and their invariants). All methods are safe to call from any thread,
/// concurrently with guest and peer I/O.
pub trait Replication: Send + Sync {
    /// Configured mode.
    fn mode(&self) -> Mode;
    /// `replication-start`.
    fn start(&self, mode: Mode, sync: SyncMode) -> Result<(), ReplicationError>;
    /// `replication-checkpoint`: primary = barrier; secondary = quiesce and empty
    /// the overlays.
    fn checkpoint(&self) -> Result<(), ReplicationError>;
    /// `replication-stop`. With `failover` the work completes in the background.
    fn stop(&self, failover: bool) -> Result<(), ReplicationError>;
    /// `replication-get-error`.
    fn get_error(&self) -> Result<(), ReplicationError>;
    /// `query-replication`.
    fn status(&self) -> Status;
    /// The process is stopping: complete (as failures) guest writes a fenced
    /// primary holds, so in-flight requests can drain. No-op elsewhere.
    fn release_held(&self) {}
}

pub mod fence;
mod gate;
pub mod intent;
pub mod primary;
mod secondary;

pub use fence::{Admit, Fence, FenceStatus, OnFenced};
pub use intent::{IntentError, WriteIntent};
pub use primary::{Connector, ForwardTarget, Primary, PrimaryControl};
pub use secondary::{Secondary, DEFAULT_CLUSTER_SIZE};
