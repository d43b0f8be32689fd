//! How the failover commit takes a cluster's exclusive lock without making
//! guest requests queue behind it.
//!
//! The range locks prefer writers: a thread blocked in
//! [`RangeLocks::exclusive`] keeps new shared holders out until it has had its
//! turn, so a commit waiting for one slow guest request would hold up every
//! other request on that stripe. The commit *tries* instead, leaving a
//! [`Doorbell`] on the busy stripe, and sleeps on the doorbell's eventfd until
//! the holders let go. Only when the stripe was released and taken again by
//! new holders many times (a stream of guest requests that never leaves a gap)
//! does it wait its turn like any request, so that it cannot be starved.

use crate::block::channel::Doorbell;
use crate::block::{OwnedRangeGuard, RangeGuard, RangeLocks};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

/// Releases seen with the range still busy before waiting in line.
const RINGS_BEFORE_BLOCKING: u32 = 8;

/// Longest sleep between tries when no release rings (a safety net: a
/// release always rings).
const IDLE_TRY: Duration = Duration::from_millis(50);

/// A commit thread's doorbell and the eventfd it sleeps on.
pub(super) struct LockWaiter {
    fd: EventFd,
    bell: Arc<Doorbell>,
}

/// How a lock was taken; holds it until dropped.
pub(super) enum Taken<'a> {
    /// By trying: no guest request waited for the commit.
    Tried(#[allow(dead_code)] OwnedRangeGuard),
    /// After a stream of holders: by waiting in line like a request.
    Waited(#[allow(dead_code)] RangeGuard<'a>),
}

impl LockWaiter {
    pub(super) fn new() -> io::Result<Self> {
        let fd = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        let bell = Arc::new(Doorbell::on_eventfd(fd.as_raw_fd())?);
        Ok(LockWaiter { fd, bell })
    }

    /// Holds `offset..offset + len` alone. `on_busy` is called for every try
    /// that found the range busy.
    pub(super) fn exclusive<'a>(
        &self,
        locks: &'a Arc<RangeLocks>,
        offset: u64,
        len: u64,
        mut on_busy: impl FnMut(),
    ) -> Taken<'a> {
        let mut rings = 0;
        loop {
            if let Some(held) = locks.try_exclusive(offset, len, &self.bell) {
                return Taken::Tried(held);
            }
            on_busy();
            if rings >= RINGS_BEFORE_BLOCKING {
                return Taken::Waited(locks.exclusive(offset, len));
            }
            if self.sleep() {
                rings += 1;
            }
        }
    }

    /// Sleeps until the doorbell rings or [`IDLE_TRY`] passes; true when it rang.
    fn sleep(&self) -> bool {
        if !self.bell.is_rung() {
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd that lives across the call; poll only writes
            // its revents. An error or EINTR just means another try sooner.
            unsafe { libc::poll(&mut pfd, 1, IDLE_TRY.as_millis() as libc::c_int) };
        }
        // Drain the counter so that the next sleep waits for a new ring.
        let _ = self.fd.read();
        self.bell.take()
    }
}
