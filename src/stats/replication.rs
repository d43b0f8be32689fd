//! Replication counters: writes forwarded to the secondary (primary),
//! copy-before-write copies (secondary), resync and commit bytes, errors.
//!
//! One colo-blk process serves one disk in one mode, so the counters are
//! process-wide: the replication code bumps them with one call where the
//! event happens, without any plumbing through its constructors. Resync and
//! commit bytes and errors are taken from the replication events the
//! control socket already receives ([`ReplicationCounters::observe`]).

use crate::replication::{Event, Progress};
use crate::sync::MutexExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// The process's replication counters.
#[derive(Debug, Default)]
pub struct ReplicationCounters {
    forwarded_writes: AtomicU64,
    forwarded_bytes: AtomicU64,
    cbw_copies: AtomicU64,
    cbw_bytes: AtomicU64,
    errors: AtomicU64,
    jobs: Mutex<Jobs>,
}

/// Bytes of finished jobs plus the running one, per kind.
#[derive(Debug, Default, Clone, Copy)]
struct Jobs {
    resync: JobBytes,
    commit: JobBytes,
}

#[derive(Debug, Default, Clone, Copy)]
struct JobBytes {
    finished: u64,
    current: u64,
}

impl JobBytes {
    fn progress(&mut self, p: Progress) {
        // A new job starts again from 0: the previous one's bytes are kept.
        if p.done < self.current {
            self.finished += self.current;
        }
        self.current = p.done;
    }

    fn total(self) -> u64 {
        self.finished + self.current
    }
}

/// A copy of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicationSnapshot {
    /// Guest writes the primary forwarded and the secondary acknowledged.
    pub forwarded_writes: u64,
    /// Their bytes.
    pub forwarded_bytes: u64,
    /// Clusters the secondary copied to hidden before a primary write.
    pub cbw_copies: u64,
    /// Their bytes.
    pub cbw_bytes: u64,
    /// Bytes copied by resyncs (primary), all runs.
    pub resync_bytes: u64,
    /// Bytes committed by failovers (secondary).
    pub commit_bytes: u64,
    /// `REPLICATION_ERROR` events.
    pub errors: u64,
}

/// The process-wide counters.
pub fn replication() -> &'static ReplicationCounters {
    static COUNTERS: OnceLock<ReplicationCounters> = OnceLock::new();
    COUNTERS.get_or_init(ReplicationCounters::default)
}

impl ReplicationCounters {
    /// A forwarded write of `bytes` was acknowledged by the secondary.
    pub fn forwarded(&self, bytes: u64) {
        self.forwarded_writes.fetch_add(1, Ordering::Relaxed);
        self.forwarded_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A cluster of `bytes` was copied before a primary write.
    pub fn cbw_copy(&self, bytes: u64) {
        self.cbw_copies.fetch_add(1, Ordering::Relaxed);
        self.cbw_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Takes what the counters need from a replication event.
    pub fn observe(&self, ev: &Event) {
        let mut jobs = self.jobs.lock_or_recover();
        match ev {
            Event::Error { .. } => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
            Event::ResyncProgress(p) => jobs.resync.progress(*p),
            Event::CommitProgress(p) => jobs.commit.progress(*p),
            Event::StageChanged { .. } | Event::Fenced { .. } => {}
        }
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> ReplicationSnapshot {
        let jobs = *self.jobs.lock_or_recover();
        ReplicationSnapshot {
            forwarded_writes: self.forwarded_writes.load(Ordering::Relaxed),
            forwarded_bytes: self.forwarded_bytes.load(Ordering::Relaxed),
            cbw_copies: self.cbw_copies.load(Ordering::Relaxed),
            cbw_bytes: self.cbw_bytes.load(Ordering::Relaxed),
            resync_bytes: jobs.resync.total(),
            commit_bytes: jobs.commit.total(),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::Mode;

    #[test]
    fn job_bytes_add_up_across_runs_and_errors_are_counted() {
        let c = ReplicationCounters::default();
        let p = |done| Progress { done, total: 100 };
        for d in [0, 40, 100] {
            c.observe(&Event::ResyncProgress(p(d)));
        }
        // A second resync starts from 0 again.
        for d in [0, 30] {
            c.observe(&Event::ResyncProgress(p(d)));
        }
        c.observe(&Event::CommitProgress(p(64)));
        c.observe(&Event::Error {
            mode: Mode::Primary,
            message: "link down".into(),
        });
        c.forwarded(4096);
        c.cbw_copy(65536);
        let s = c.snapshot();
        assert_eq!((s.resync_bytes, s.commit_bytes, s.errors), (130, 64, 1));
        assert_eq!((s.forwarded_writes, s.forwarded_bytes), (1, 4096));
        assert_eq!((s.cbw_copies, s.cbw_bytes), (1, 65536));
    }
}
