//! Connection liveness: what the accept thread needs to enforce the handshake
//! deadline and to choose whom to evict when every slot is taken.
//!
//! A connection that has not finished negotiating within the handshake
//! deadline is closed, however slowly it trickles bytes in. When all slots are
//! taken, a newcomer waits (in arrival order) and a slot is freed for it by
//! closing first the connection that has been negotiating the longest (after a
//! short grace, so a real client in the middle of its handshake is safe), then
//! the established connection idle the longest, if idle past the idle limit.
//! A connection with requests in flight or recent requests is never evicted.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Shared between a connection's threads (which report) and the accept
/// thread (which judges).
#[derive(Debug)]
pub(super) struct Activity {
    /// The server's clock origin; times below are milliseconds since it.
    epoch: Instant,
    /// When the connection was accepted.
    accepted_ms: u64,
    /// Negotiation finished: the handshake deadline no longer applies.
    established: AtomicBool,
    /// Last complete request received or reply finished.
    last_ms: AtomicU64,
    /// Requests received and not yet finished.
    busy: AtomicUsize,
    /// The accept thread already closed this connection.
    doomed: AtomicBool,
}

/// Why the accept thread may close a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Keep it.
    Keep,
    /// Negotiating past the handshake deadline: close it now.
    Expired,
    /// May be closed to make room: negotiating for this long.
    EvictNegotiating(Duration),
    /// May be closed to make room: established and idle for this long.
    EvictIdle(Duration),
}

/// The limits a verdict is judged against.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub handshake: Duration,
    pub idle: Duration,
    /// A negotiating connection younger than this is not evicted.
    pub grace: Duration,
}

impl Activity {
    pub(super) fn new(epoch: Instant, accepted: Instant) -> Self {
        let accepted_ms = ms(accepted.saturating_duration_since(epoch));
        Activity {
            epoch,
            accepted_ms,
            established: AtomicBool::new(false),
            last_ms: AtomicU64::new(accepted_ms),
            busy: AtomicUsize::new(0),
            doomed: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        ms(self.epoch.elapsed())
    }

    /// Negotiation is over.
    pub(super) fn establish(&self) {
        self.touch();
        self.established.store(true, Ordering::Relaxed);
    }

    /// The client did something useful just now.
    pub(super) fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// A request was received whole and will be answered.
    pub(super) fn begin(&self) {
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.touch();
    }

    /// A request begun with [`Activity::begin`] is finished (answered or dropped).
    pub(super) fn end(&self) {
        self.touch();
        self.busy.fetch_sub(1, Ordering::Relaxed);
    }

    /// Marks the connection closed by the accept thread; false if it already was.
    pub(super) fn doom(&self) -> bool {
        !self.doomed.swap(true, Ordering::Relaxed)
    }

    pub(super) fn is_doomed(&self) -> bool {
        self.doomed.load(Ordering::Relaxed)
    }

    /// What the accept thread may do with this connection.
    pub(super) fn verdict(&self, limits: &Limits) -> Verdict {
        if self.is_doomed() {
            return Verdict::Keep;
        }
        let now = self.now_ms();
        if !self.established.load(Ordering::Relaxed) {
            let age = Duration::from_millis(now.saturating_sub(self.accepted_ms));
            return if age >= limits.handshake {
                Verdict::Expired
            } else if age >= limits.grace {
                Verdict::EvictNegotiating(age)
            } else {
                Verdict::Keep
            };
        }
        if self.busy.load(Ordering::Relaxed) > 0 {
            return Verdict::Keep;
        }
        let idle = Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)));
        if idle >= limits.idle {
            Verdict::EvictIdle(idle)
        } else {
            Verdict::Keep
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Picks the connection to evict: the longest negotiating first, then the
/// longest idle. `None` when every connection is working.
pub(super) fn pick_victim<K: Copy>(verdicts: impl Iterator<Item = (K, Verdict)>) -> Option<K> {
    let mut best: Option<(K, (u8, Duration))> = None;
    for (k, v) in verdicts {
        let rank = match v {
            Verdict::EvictNegotiating(age) => (1, age),
            Verdict::EvictIdle(idle) => (0, idle),
            Verdict::Keep | Verdict::Expired => continue,
        };
        let better = match &best {
            None => true,
            Some((_, r)) => rank > *r,
        };
        if better {
            best = Some((k, rank));
        }
    }
    best.map(|(k, _)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            handshake: Duration::from_secs(30),
            idle: Duration::from_secs(60),
            grace: Duration::from_secs(1),
        }
    }

    fn activity(accepted_secs_ago: u64) -> Activity {
        let now = Instant::now();
        let epoch = now - Duration::from_secs(1000);
        Activity::new(epoch, now - Duration::from_secs(accepted_secs_ago))
    }

    #[test]
    fn a_negotiation_past_the_deadline_expires_however_busy_the_peer_is() {
        let a = activity(31);
        a.touch();
        assert_eq!(a.verdict(&limits()), Verdict::Expired);
    }

    #[test]
    fn a_fresh_negotiation_is_kept_and_an_older_one_is_evictable() {
        assert_eq!(activity(0).verdict(&limits()), Verdict::Keep);
        assert!(matches!(
            activity(5).verdict(&limits()),
            Verdict::EvictNegotiating(_)
        ));
    }

    #[test]
    fn an_established_connection_with_requests_in_flight_is_never_evicted() {
        let a = activity(500);
        a.establish();
        a.begin();
        a.last_ms.store(0, Ordering::Relaxed);
        assert_eq!(a.verdict(&limits()), Verdict::Keep);
        a.end();
        assert_eq!(a.verdict(&limits()), Verdict::Keep, "just finished");
        a.last_ms.store(0, Ordering::Relaxed);
        assert!(matches!(a.verdict(&limits()), Verdict::EvictIdle(_)));
    }

    #[test]
    fn negotiating_connections_are_evicted_before_idle_ones_oldest_first() {
        let v = [
            (1, Verdict::EvictIdle(Duration::from_secs(900))),
            (2, Verdict::EvictNegotiating(Duration::from_secs(2))),
            (3, Verdict::EvictNegotiating(Duration::from_secs(7))),
            (4, Verdict::Keep),
        ];
        assert_eq!(pick_victim(v.into_iter()), Some(3));
        assert_eq!(pick_victim(v[..1].iter().copied()), Some(1));
        assert_eq!(pick_victim(v[3..].iter().copied()), None);
    }
}
