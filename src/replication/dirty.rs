//! A lock-free cluster bitmap: which clusters changed while forwarding was off.

use std::sync::atomic::{AtomicU64, Ordering};

/// One bit per cluster; set and test-and-clear are atomic, so queue workers mark
/// clusters while a resync drains them, with no lock.
#[derive(Debug)]
pub struct DirtyBitmap {
    words: Vec<AtomicU64>,
    clusters: u64,
}

impl DirtyBitmap {
    /// A clean bitmap for `clusters` clusters.
    pub fn new(clusters: u64) -> Self {
        let words = clusters.div_ceil(64) as usize;
        DirtyBitmap {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            clusters,
        }
    }

    /// Marks clusters `first..=last` (clamped to the bitmap).
    pub fn set_range(&self, first: u64, last: u64) {
        if self.clusters == 0 {
            return;
        }
        let last = last.min(self.clusters.saturating_sub(1));
        let mut c = first;
        while c <= last {
            let word = (c / 64) as usize;
            let lo = c % 64;
            let hi = (last - (c - lo)).min(63);
            let mask = if hi - lo == 63 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo + 1)) - 1) << lo
            };
            self.words[word].fetch_or(mask, Ordering::AcqRel);
            c = c - lo + 64;
        }
    }

    /// Clears one cluster; true when it was set.
    pub fn test_and_clear(&self, cluster: u64) -> bool {
        if cluster >= self.clusters {
            return false;
        }
        let bit = 1u64 << (cluster % 64);
        self.words[(cluster / 64) as usize].fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    /// True when the cluster is set.
    pub fn get(&self, cluster: u64) -> bool {
        cluster < self.clusters
            && self.words[(cluster / 64) as usize].load(Ordering::Acquire)
                & (1u64 << (cluster % 64))
                != 0
    }

    /// First set cluster at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        let mut c = from;
        while c < self.clusters {
            let word = self.words[(c / 64) as usize].load(Ordering::Acquire) >> (c % 64);
            if word != 0 {
                let found = c + u64::from(word.trailing_zeros());
                return (found < self.clusters).then_some(found);
            }
            c = (c / 64 + 1) * 64;
        }
        None
    }

    /// Number of set clusters.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// Clears every cluster.
    pub fn clear(&self) {
        for w in &self.words {
            w.store(0, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_across_word_boundaries_set_exactly_those_bits() {
        let b = DirtyBitmap::new(200);
        b.set_range(60, 130);
        assert_eq!(b.count(), 71);
        assert!(!b.get(59) && b.get(60) && b.get(130) && !b.get(131));
        assert_eq!(b.next_set(0), Some(60));
        assert_eq!(b.next_set(131), None);
        b.set_range(190, 500);
        assert_eq!(b.count(), 81);
        assert!(b.test_and_clear(199));
        assert!(!b.test_and_clear(199));
        assert!(!b.test_and_clear(10_000));
    }

    #[test]
    fn full_range_and_clear() {
        let b = DirtyBitmap::new(129);
        b.set_range(0, u64::MAX);
        assert_eq!(b.count(), 129);
        b.clear();
        assert_eq!(b.next_set(0), None);
        b.set_range(0, 63);
        assert_eq!(b.count(), 64);
    }
}
