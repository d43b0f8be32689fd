//! Striped per-cluster locks: two holders of different clusters rarely contend,
//! and there is no lock around the whole disk.

use std::sync::{Mutex, MutexGuard};

/// Enough stripes that queue workers writing different places almost never
/// share one; a range that wraps them all locks every stripe once.
const STRIPES: usize = 1024;

/// Locks clusters by hashing them onto a fixed set of mutexes.
#[derive(Debug)]
pub struct ClusterLocks {
    stripes: Vec<Mutex<()>>,
}

/// Holds the stripes of a cluster range; dropping it unlocks them.
pub struct RangeGuard<'a> {
    _guards: Vec<MutexGuard<'a, ()>>,
}

impl Default for ClusterLocks {
    fn default() -> Self {
        ClusterLocks {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }
}

impl ClusterLocks {
    /// Locks clusters `first..=last`. Stripes are taken in ascending order, so
    /// two overlapping ranges never deadlock.
    pub fn lock(&self, first: u64, last: u64) -> RangeGuard<'_> {
        let n = (last.saturating_sub(first) + 1).min(STRIPES as u64) as usize;
        let mut idx: Vec<usize> = (0..n)
            .map(|i| ((first + i as u64) % STRIPES as u64) as usize)
            .collect();
        idx.sort_unstable();
        RangeGuard {
            _guards: idx
                .into_iter()
                .map(|i| self.stripes[i].lock().unwrap_or_else(|e| e.into_inner()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn overlapping_ranges_exclude_each_other_without_deadlock() {
        let locks = Arc::new(ClusterLocks::default());
        let busy = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let (locks, busy) = (Arc::clone(&locks), Arc::clone(&busy));
                std::thread::spawn(move || {
                    for i in 0..2000u64 {
                        // Every range covers cluster 5000, wrapping the stripes
                        // differently per thread.
                        let first = 5000 - (i + t) % 7;
                        let _g = locks.lock(first, first + 1030);
                        assert!(!busy.swap(true, Ordering::SeqCst));
                        busy.store(false, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}
