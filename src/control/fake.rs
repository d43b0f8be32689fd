//! A replication node stand-in for control-socket tests.

use crate::replication::{Mode, Progress, Replication, ReplicationError, Stage, Status, SyncMode};
use std::sync::Mutex;

/// Records calls and answers like a node in stage `none`.
#[derive(Default)]
pub(crate) struct Fake {
    pub(crate) calls: Mutex<Vec<String>>,
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
        Err(ReplicationError::NotRunning)
    }
    fn status(&self) -> Status {
        Status {
            mode: Mode::Secondary,
            stage: Stage::Running,
            error: None,
            resync: None,
            commit: Some(Progress { done: 1, total: 2 }),
            dirty_clusters: None,
            fence: None,
        }
    }
}
