//! COLO block replication: the stage machine, copy-before-write, checkpoint and
//! failover commit (behaviour of QEMU's `block/replication.c`, see DESIGN.md §1).
//!
//! Both modes implement [`Replication`], the surface the control socket drives.

use std::fmt;
use std::sync::Arc;
use thiserror::Error;

/// Which side of a COLO pair this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Serves the primary VM and forwards its writes.
    Primary,
    /// Serves the secondary VM; receives the primary's writes over NBD.
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

/// Replication stage (DESIGN.md §1, "Stages and the I/O policy").
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

/// Why a replication command failed. The text is what QMP clients see.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
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
    /// An I/O error recorded earlier (get-error) or hit now.
    #[error("{0}")]
    Io(String),
    /// The command is not valid in this mode or stage.
    #[error("{0}")]
    Invalid(String),
}

/// The control surface of a replication node, in either mode.
///
/// Semantics per DESIGN.md §1. All methods are safe to call from any thread,
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
pub use primary::{Connector, ForwardTarget, Primary, PrimaryControl, TargetConnector};
pub use secondary::{Secondary, DEFAULT_CLUSTER_SIZE};
