//! A replication node stand-in for control-socket tests.

use crate::replication::{
    Failure, Mode, Progress, Replication, ReplicationError, Stage, Status, SyncMode,
};
use std::sync::Mutex;

/// Records calls and answers like a secondary in the stage it is given
/// (`running` unless set).
#[derive(Default)]
pub(crate) struct Fake {
    pub(crate) calls: Mutex<Vec<String>>,
    pub(crate) stage: Mutex<Option<Stage>>,
    pub(crate) error: Mutex<Option<String>>,
}

impl Fake {
    fn stage(&self) -> Stage {
        self.stage.lock().unwrap().unwrap_or(Stage::Running)
    }
}

impl Replication for Fake {
    fn mode(&self) -> Mode {
        Mode::Secondary
    }
    fn start(&self, mode: Mode, sync: SyncMode) -> Result<(), ReplicationError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("start {mode} {sync:?}"));
        if mode != Mode::Secondary {
            return Err(ReplicationError::ModeMismatch {
                expected: Mode::Secondary,
                got: mode,
            });
        }
        Ok(())
    }
    fn checkpoint(&self) -> Result<(), ReplicationError> {
        self.calls.lock().unwrap().push("checkpoint".into());
        Ok(())
    }
    fn stop(&self, failover: bool) -> Result<(), ReplicationError> {
        self.calls.lock().unwrap().push(format!("stop {failover}"));
        Ok(())
    }
    fn get_error(&self) -> Result<(), ReplicationError> {
        if self.stage.lock().unwrap().is_none() {
            // The default answer of the older tests.
            return Err(ReplicationError::NotRunning);
        }
        match (self.stage(), self.error.lock().unwrap().clone()) {
            (Stage::None, _) => Err(ReplicationError::NotRunning),
            (_, Some(e)) => Err(Failure::new(e).into()),
            _ => Ok(()),
        }
    }
    fn status(&self) -> Status {
        Status {
            mode: Mode::Secondary,
            stage: self.stage(),
            error: self.error.lock().unwrap().clone(),
            resync: None,
            commit: Some(Progress { done: 1, total: 2 }),
            dirty_clusters: None,
            fence: None,
        }
    }
}
