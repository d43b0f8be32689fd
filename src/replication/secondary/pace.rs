//! Pacing of the failover commit against guest activity.
//!
//! The commit is a CPU and page-cache hog: on a small host its copy thread
//! competes with the threads serving the guest, and when it is preempted in
//! the middle of a write it holds the disk file's inode lock that a guest
//! write to the disk needs. So it works in short bursts and, when guests were
//! active during a burst, rests as long as the burst lasted before the next
//! one: a thread that sleeps that often is seldom preempted mid-burst, and
//! the guest gets at least half of the commit's CPU time back. With an idle
//! guest it never rests. Either way the commit advances at least half the
//! time, so its duration stays bounded (at most about twice the unpaced one).

use std::time::{Duration, Instant};

/// Work done between two looks at the guest.
pub(super) const BURST: Duration = Duration::from_micros(500);

/// Rest after a burst during which guests were active.
pub(super) const REST: Duration = Duration::from_micros(500);

/// Tracks the current burst of the commit.
pub(super) struct Pacer {
    burst_start: Instant,
    guest_ops: u64,
}

impl Pacer {
    /// Starts the first burst; `guest_ops` is the guest's request count now.
    pub(super) fn new(guest_ops: u64) -> Self {
        Pacer {
            burst_start: Instant::now(),
            guest_ops,
        }
    }

    /// Called between two units of work with the guest's request count:
    /// once the burst is over, rests if guests were active during it, and
    /// starts the next burst. Returns how long it rested (until it ran again).
    pub(super) fn between(&mut self, guest_ops: u64) -> Duration {
        if self.burst_start.elapsed() < BURST {
            return Duration::ZERO;
        }
        let now = Instant::now();
        if guest_ops != self.guest_ops {
            std::thread::sleep(REST);
        }
        self.burst_start = Instant::now();
        self.guest_ops = guest_ops;
        // Measured: on a busy host the thread gets its CPU back late.
        self.burst_start - now
    }
}
