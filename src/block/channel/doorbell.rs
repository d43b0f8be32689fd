//! A doorbell: how a thread that is not the queue worker (an NBD reply reader,
//! a lock holder releasing a range, a control command releasing a fence) tells
//! a channel that one of its operations can make progress.
//!
//! It writes the channel's completion eventfd, so a worker asleep in epoll
//! wakes up, and raises a flag, so a worker that polls sees it without a
//! system call. Ringing twice before the worker looks costs nothing extra.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// Wakes one channel's worker. Shared as `Arc<Doorbell>` with the threads that
/// may ring it.
#[derive(Debug)]
pub struct Doorbell {
    fd: OwnedFd,
    rung: AtomicBool,
}

impl Doorbell {
    /// A doorbell on (a duplicate of) eventfd `fd`.
    pub fn on_eventfd(fd: RawFd) -> io::Result<Self> {
        // SAFETY: dup has no memory effects; the result is checked below.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Doorbell {
            // SAFETY: `dup` is a fresh descriptor that nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(dup) },
            rung: AtomicBool::new(false),
        })
    }

    /// Wakes the worker. Callable from any thread, with any lock held.
    pub fn ring(&self) {
        if self.rung.swap(true, Ordering::AcqRel) {
            // Not yet looked at: the eventfd has been written already.
            return;
        }
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write from a live buffer to an eventfd we own. A
        // full counter (EAGAIN) already wakes the reader, so the result does
        // not matter.
        unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    /// True once rung since the last [`take`](Self::take). No system call.
    pub fn is_rung(&self) -> bool {
        self.rung.load(Ordering::Acquire)
    }

    /// Clears the flag; true when it was set. The caller then looks at
    /// everything that may have rung it (a ring after this is seen next time).
    pub fn take(&self) -> bool {
        self.rung.swap(false, Ordering::AcqRel)
    }
}

/// A list of doorbells to ring once something is released.
#[derive(Debug, Default)]
pub struct Waiters(Vec<std::sync::Arc<Doorbell>>);

impl Waiters {
    /// Adds `bell` unless it is already in the list.
    pub fn add(&mut self, bell: &std::sync::Arc<Doorbell>) {
        if !self.0.iter().any(|b| std::sync::Arc::ptr_eq(b, bell)) {
            self.0.push(bell.clone());
        }
    }

    /// True when nobody waits.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Rings and forgets every doorbell.
    pub fn ring_all(&mut self) {
        for b in self.0.drain(..) {
            b.ring();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn a_ring_wakes_the_eventfd_once_until_taken() {
        let ev = EventFd::new(EFD_NONBLOCK).unwrap();
        let bell = Doorbell::on_eventfd(ev.as_raw_fd()).unwrap();
        assert!(!bell.is_rung());
        bell.ring();
        bell.ring();
        assert!(bell.is_rung());
        assert_eq!(ev.read().unwrap(), 1, "second ring wrote nothing");
        assert!(bell.take());
        assert!(!bell.take());
        bell.ring();
        assert_eq!(ev.read().unwrap(), 1);
    }
}
