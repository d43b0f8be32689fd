//! Rate-limited logging for guest-triggered errors.
//!
//! A guest can submit bad requests as fast as it likes; logging each one would let
//! it fill the host's disk and drown every other message. Each error class gets at
//! most [`PER_SECOND`] lines per second; the lines it lost are counted and
//! reported with the next line that gets through.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

/// Lines per class per second.
pub const PER_SECOND: u32 = 5;

/// One counter set per class; lock-free, only touched on error paths.
#[derive(Debug)]
pub struct LogLimiter {
    epoch: Instant,
    classes: Vec<Window>,
}

#[derive(Debug, Default)]
struct Window {
    second: AtomicU64,
    emitted: AtomicU32,
    suppressed: AtomicU64,
}

impl LogLimiter {
    /// A limiter for `classes` independent classes.
    pub fn new(classes: usize) -> Self {
        LogLimiter {
            epoch: Instant::now(),
            classes: (0..classes).map(|_| Window::default()).collect(),
        }
    }

    /// Returns `Some(lost)` when a line of `class` may be logged now (`lost` lines
    /// of that class were dropped since the last one), `None` when it must be
    /// dropped. Unknown classes are always allowed.
    pub fn allow(&self, class: usize) -> Option<u64> {
        let Some(w) = self.classes.get(class) else {
            return Some(0);
        };
        let now = self.epoch.elapsed().as_secs();
        let seen = w.second.load(Ordering::Relaxed);
        if seen != now
            && w.second
                .compare_exchange(seen, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            w.emitted.store(0, Ordering::Relaxed);
        }
        if w.emitted.fetch_add(1, Ordering::Relaxed) < PER_SECOND {
            Some(w.suppressed.swap(0, Ordering::Relaxed))
        } else {
            w.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_cut_to_the_per_second_budget_per_class() {
        let l = LogLimiter::new(2);
        let allowed = (0..100).filter(|_| l.allow(0).is_some()).count();
        // The burst may straddle a second boundary, which refills the budget once.
        assert!((PER_SECOND as usize..=2 * PER_SECOND as usize).contains(&allowed));
        // Another class has its own budget.
        assert_eq!(l.allow(1), Some(0));
    }
}
