//! Fencing on the primary: once the secondary answers a forwarded write with
//! "fenced" (it took over at failover), this primary must never again
//! acknowledge a guest write, or the two sides diverge with both believing
//! they hold the disk (split brain).
//!
//! [`Fence`] is the whole decision, kept apart from the write path so that any
//! write path (the threaded one here, an asynchronous one later) asks it the
//! same question: [`Fence::admit_write`] before a write starts, and
//! [`Fence::trip`] when the secondary refuses one. What happens to writes after
//! the fence is the policy ([`OnFenced`]): held (never completed, like QEMU's
//! `werror=stop` pausing the VM, so nothing is lost that the guest believes
//! written) or failed with an I/O error. Held writes are released, as
//! failures, only by [`Fence::release`] (the tooling's `stop`, or shutdown).

use crate::block::channel::{Doorbell, Waiters};
use crate::block::BlockError;
use crate::sync::{CondvarExt, MutexExt};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// What a fenced primary does with guest writes (also `serve --on-fenced`;
/// the variants' documentation is its `--help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OnFenced {
    /// Hold guest writes.
    #[default]
    Hold,
    /// Fail guest writes.
    Error,
}

impl OnFenced {
    /// The name used on the command line and in QMP.
    pub fn as_str(self) -> &'static str {
        match self {
            OnFenced::Hold => "hold",
            OnFenced::Error => "error",
        }
    }
}

/// The answer of [`Fence::admit_write`].
#[derive(Debug)]
pub enum Admit {
    /// Not fenced: write and forward as usual.
    Proceed,
    /// Fenced, policy hold: park the write until [`Fence::release`]; it then
    /// fails. A threaded caller uses [`Fence::wait_admitted`] instead.
    Hold,
    /// Fenced: fail the write with this error, do not touch the disk.
    Fail(BlockError),
}

const FENCED: u8 = 1;

/// Fencing state of one primary. See the module documentation.
#[derive(Debug, Default)]
pub struct Fence {
    state: AtomicU8,
    policy: AtomicU8,
    released: AtomicBool,
    reason: Mutex<Option<String>>,
    /// Wakes held writes at [`Fence::release`]; paired with `reason`.
    wake: Condvar,
    held_now: AtomicU64,
    refused: AtomicU64,
    /// Queue workers with parked writes, rung at [`Fence::release`].
    bells: Mutex<Waiters>,
}

/// What `query-replication` tells about a fence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceStatus {
    /// The configured policy.
    pub policy: OnFenced,
    /// Why (the secondary's refusal).
    pub reason: String,
    /// Guest writes held right now.
    pub held_writes: u64,
    /// Guest writes failed because of the fence so far.
    pub failed_writes: u64,
}

impl Fence {
    /// An open fence with `policy`.
    pub fn new(policy: OnFenced) -> Self {
        let f = Fence::default();
        f.set_policy(policy);
        f
    }

    /// Changes the policy (configuration, before the guest runs).
    pub fn set_policy(&self, policy: OnFenced) {
        let code = match policy {
            OnFenced::Hold => 0,
            OnFenced::Error => 1,
        };
        self.policy.store(code, Ordering::Release);
    }

    /// The configured policy.
    pub fn policy(&self) -> OnFenced {
        match self.policy.load(Ordering::Acquire) {
            0 => OnFenced::Hold,
            _ => OnFenced::Error,
        }
    }

    /// True once tripped.
    pub fn is_fenced(&self) -> bool {
        self.state.load(Ordering::Acquire) == FENCED
    }

    /// Asked before a guest write touches anything. One atomic load while open.
    pub fn admit_write(&self) -> Admit {
        if !self.is_fenced() {
            return Admit::Proceed;
        }
        if self.policy() == OnFenced::Hold && !self.released.load(Ordering::Acquire) {
            return Admit::Hold;
        }
        self.refused.fetch_add(1, Ordering::Relaxed);
        Admit::Fail(self.error())
    }

    /// [`Fence::admit_write`] for a thread that may block: returns `Ok` when
    /// not fenced, else waits while the policy holds and returns the error the
    /// write must fail with. Must be called with no lock held that a control
    /// command needs.
    pub fn wait_admitted(&self) -> Result<(), BlockError> {
        match self.admit_write() {
            Admit::Proceed => Ok(()),
            Admit::Fail(e) => Err(e),
            Admit::Hold => {
                self.held_now.fetch_add(1, Ordering::AcqRel);
                let mut reason = self.reason.lock_or_recover();
                while !self.released.load(Ordering::Acquire) {
                    reason = self.wake.wait_or_recover(reason);
                }
                drop(reason);
                self.held_now.fetch_sub(1, Ordering::AcqRel);
                self.refused.fetch_add(1, Ordering::Relaxed);
                Err(self.error())
            }
        }
    }

    /// Holds a write for a caller that must not block (a queue worker with
    /// other requests in flight): counted as held until [`Fence::unpark`];
    /// `bell` rings at [`Fence::release`].
    pub fn park(&self, bell: &Arc<Doorbell>) {
        self.held_now.fetch_add(1, Ordering::AcqRel);
        self.bells.lock_or_recover().add(bell);
        // A release that ran before the bell was added must still be seen.
        if self.is_released() {
            bell.ring();
        }
    }

    /// True once held writes are to fail.
    pub fn is_released(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }

    /// Ends the hold of a parked write (after [`Fence::is_released`]): the
    /// error it must fail with.
    pub fn unpark(&self) -> BlockError {
        self.held_now.fetch_sub(1, Ordering::AcqRel);
        self.refused.fetch_add(1, Ordering::Relaxed);
        self.error()
    }

    /// Fences: from now on no write is admitted. True the first time only
    /// (the caller then announces it).
    pub fn trip(&self, reason: &str) -> bool {
        let mut slot = self.reason.lock_or_recover();
        if self.is_fenced() {
            return false;
        }
        *slot = Some(reason.to_owned());
        self.state.store(FENCED, Ordering::Release);
        true
    }

    /// Fails every held write and every later one (the tooling gave up on
    /// this side, or the process is stopping). Idempotent.
    pub fn release(&self) {
        let _slot = self.reason.lock_or_recover();
        self.released.store(true, Ordering::Release);
        self.wake.notify_all();
        self.bells.lock_or_recover().ring_all();
    }

    /// Guest writes currently held.
    pub fn held_writes(&self) -> u64 {
        self.held_now.load(Ordering::Acquire)
    }

    /// The state for `query-replication`, `None` while open.
    pub fn status(&self) -> Option<FenceStatus> {
        if !self.is_fenced() {
            return None;
        }
        Some(FenceStatus {
            policy: self.policy(),
            reason: self.reason_text(),
            held_writes: self.held_writes(),
            failed_writes: self.refused.load(Ordering::Relaxed),
        })
    }

    fn reason_text(&self) -> String {
        self.reason.lock_or_recover().clone().unwrap_or_default()
    }

    fn error(&self) -> BlockError {
        BlockError::io(
            "write",
            0,
            std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "fenced: the secondary took over; this primary no longer accepts writes",
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn open_fence_admits_and_error_policy_fails_after_trip() {
        let f = Fence::new(OnFenced::Error);
        assert!(matches!(f.admit_write(), Admit::Proceed));
        assert!(f.trip("refused"));
        assert!(!f.trip("again"));
        assert!(matches!(f.admit_write(), Admit::Fail(_)));
        assert!(f.wait_admitted().is_err());
        assert_eq!(f.status().unwrap().failed_writes, 2);
    }

    #[test]
    fn held_writes_stay_pending_until_release_then_fail() {
        let f = Arc::new(Fence::new(OnFenced::Hold));
        f.trip("refused");
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let f = f.clone();
            std::thread::spawn(move || tx.send(f.wait_admitted().is_err()).unwrap())
        };
        // The write must still be pending: nothing may complete it but release.
        for _ in 0..1000 {
            if f.held_writes() == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(f.held_writes(), 1);
        assert!(rx.try_recv().is_err(), "a held write completed");
        f.release();
        assert!(rx.recv().unwrap(), "a released write must fail");
        waiter.join().unwrap();
        assert_eq!(f.held_writes(), 0);
        assert!(matches!(f.admit_write(), Admit::Fail(_)));
    }
}
