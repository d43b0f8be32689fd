//! Where a failover commit spends its time, logged once when it ends: the
//! guest waits on what the commit holds (a cluster's range lock, the closed
//! gate), so the figures that matter for guest latency are the longest holds.

use std::time::{Duration, Instant};

/// A sum and a maximum of durations.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Span {
    sum: Duration,
    max: Duration,
}

impl Span {
    pub(super) fn add(&mut self, d: Duration) {
        self.sum += d;
        self.max = self.max.max(d);
    }

    /// Adds the time since `t` and returns now.
    pub(super) fn since(&mut self, t: Instant) -> Instant {
        let now = Instant::now();
        self.add(now - t);
        now
    }
}

impl std::fmt::Display for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        write!(f, "{:.1} ms (max {:.2} ms)", ms(self.sum), ms(self.max))
    }
}

/// Per-phase timing of one commit.
#[derive(Debug)]
pub(super) struct CommitStats {
    started: Instant,
    /// Clusters moved while the guest ran.
    pub(super) clusters: u64,
    /// Copies made again because a guest wrote to the cluster meanwhile.
    pub(super) recopies: u64,
    /// Clusters copied holding their lock (hot or busy ones).
    pub(super) copies_held: u64,
    /// Tries of a cluster's lock that found it busy.
    pub(super) busy: u64,
    /// Locks taken by waiting in line after a stream of guest holders.
    pub(super) waited: u64,
    /// Resting between bursts (pacing against guest activity).
    pub(super) rest: Span,
    /// Waiting for a cluster's exclusive lock.
    pub(super) lock_wait: Span,
    /// Holding a cluster's exclusive lock (guest requests on it wait).
    pub(super) held: Span,
    /// Copying overlay data to the disk.
    pub(super) copy: Span,
    /// Dropping committed granules from the overlays (and their space).
    pub(super) release: Span,
    /// The disk flush before the gate closes.
    pub(super) flush: Span,
    /// The gate held closed at the end (all guest I/O waits).
    pub(super) quiesced: Span,
}

impl CommitStats {
    pub(super) fn new() -> Self {
        CommitStats {
            started: Instant::now(),
            clusters: 0,
            recopies: 0,
            copies_held: 0,
            busy: 0,
            waited: 0,
            rest: Span::default(),
            lock_wait: Span::default(),
            held: Span::default(),
            copy: Span::default(),
            release: Span::default(),
            flush: Span::default(),
            quiesced: Span::default(),
        }
    }

    /// Logs the figures; `guest_lock_wait` is the longest a guest request
    /// waited for a cluster lock meanwhile.
    pub(super) fn log(&self, guest_lock_wait: Duration) {
        log::info!(
            "replication (secondary): commit of {} clusters in {:.1} ms ({} copied again, \
             {} copied held, {} busy tries, {} waited in line): lock wait {}, held {}, \
             copy {}, release {}, rest {}, flush {}, quiesced {}; a guest waited for a \
             cluster lock {:.2} ms at most",
            self.clusters,
            self.started.elapsed().as_secs_f64() * 1e3,
            self.recopies,
            self.copies_held,
            self.busy,
            self.waited,
            self.lock_wait,
            self.held,
            self.copy,
            self.release,
            self.rest,
            self.flush,
            self.quiesced,
            guest_lock_wait.as_secs_f64() * 1e3
        );
    }
}
