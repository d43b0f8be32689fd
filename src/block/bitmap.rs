//! A concurrent two-level bitmap: one bit per granule (overlay allocation) or per
//! cluster (copy-before-write done).
//!
//! Level 0 holds the bits in atomic words. Level 1 (the summary) has one bit per
//! level-0 word, set whenever that word may be non-zero, so that finding or
//! clearing the set bits costs O(set words + bits / 4096) instead of a scan of
//! every word: emptying an overlay of a huge, mostly clean disk stays cheap.
//!
//! Setters write the word first, then the summary bit; only [`Bitmap::clear_all`]
//! clears summary bits, and it re-checks the word afterwards, so a set bit is never
//! hidden from a later scan.

use std::sync::atomic::{AtomicU64, Ordering};

const WORD: u64 = 64;

/// A fixed-size bitmap whose bits can be set and cleared from any thread.
#[derive(Debug)]
pub(crate) struct Bitmap {
    words: Box<[AtomicU64]>,
    summary: Box<[AtomicU64]>,
    bits: u64,
    ones: AtomicU64,
}

fn atomics(n: u64) -> Box<[AtomicU64]> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

/// Bits `lo..hi` (within one word, `hi <= 64`) as a mask.
fn mask(lo: u64, hi: u64) -> u64 {
    let upper = if hi >= WORD {
        u64::MAX
    } else {
        (1u64 << hi) - 1
    };
    upper & !((1u64 << lo) - 1)
}

impl Bitmap {
    /// A bitmap of `bits` clear bits.
    pub(crate) fn new(bits: u64) -> Self {
        let nwords = bits.div_ceil(WORD);
        Bitmap {
            words: atomics(nwords),
            summary: atomics(nwords.div_ceil(WORD)),
            bits,
            ones: AtomicU64::new(0),
        }
    }

    /// Number of bits.
    pub(crate) fn len_bits(&self) -> u64 {
        self.bits
    }

    /// Number of set bits.
    pub(crate) fn count(&self) -> u64 {
        self.ones.load(Ordering::Acquire)
    }

    /// Value of bit `i` (false past the end).
    pub(crate) fn get(&self, i: u64) -> bool {
        if i >= self.bits {
            return false;
        }
        let w = self.words[(i / WORD) as usize].load(Ordering::Acquire);
        w & (1u64 << (i % WORD)) != 0
    }

    /// Sets bits `start..start + n` (clipped to the end); returns how many were clear.
    pub(crate) fn set_range(&self, start: u64, n: u64) -> u64 {
        let end = start.saturating_add(n).min(self.bits);
        let mut i = start;
        let mut newly = 0;
        while i < end {
            let w = i / WORD;
            let hi = ((w + 1) * WORD).min(end);
            let m = mask(i % WORD, hi - w * WORD);
            let old = self.words[w as usize].fetch_or(m, Ordering::SeqCst);
            newly += u64::from((m & !old).count_ones());
            self.summary[(w / WORD) as usize].fetch_or(1u64 << (w % WORD), Ordering::SeqCst);
            i = hi;
        }
        self.ones.fetch_add(newly, Ordering::AcqRel);
        newly
    }

    /// Clears bits `start..start + n` (clipped); returns how many were set.
    pub(crate) fn clear_range(&self, start: u64, n: u64) -> u64 {
        let end = start.saturating_add(n).min(self.bits);
        let mut i = start;
        let mut cleared = 0;
        while i < end {
            let w = i / WORD;
            let hi = ((w + 1) * WORD).min(end);
            let m = mask(i % WORD, hi - w * WORD);
            let old = self.words[w as usize].fetch_and(!m, Ordering::SeqCst);
            cleared += u64::from((m & old).count_ones());
            i = hi;
        }
        self.ones.fetch_sub(cleared, Ordering::AcqRel);
        cleared
    }

    /// The run of equal bits starting at `start`: its value and length (at most
    /// `max`, never past the end). `start` must be below [`Bitmap::len`].
    pub(crate) fn run(&self, start: u64, max: u64) -> (bool, u64) {
        let end = start.saturating_add(max).min(self.bits);
        if start >= end {
            return (false, 0);
        }
        let value = self.get(start);
        let mut i = start;
        while i < end {
            let w = i / WORD;
            // A clear summary bit guarantees a zero word: skip whole words cheaply.
            if !value && i % WORD == 0 && !self.summary_bit(w) {
                i = (w + 1) * WORD;
                continue;
            }
            let mut word = self.words[w as usize].load(Ordering::Acquire);
            if value {
                word = !word;
            }
            word &= mask(i % WORD, WORD);
            if word != 0 {
                let stop = w * WORD + u64::from(word.trailing_zeros());
                return (value, stop.min(end) - start);
            }
            i = (w + 1) * WORD;
        }
        (value, end - start)
    }

    fn summary_bit(&self, w: u64) -> bool {
        self.summary[(w / WORD) as usize].load(Ordering::SeqCst) & (1u64 << (w % WORD)) != 0
    }

    /// The first set bit at or after `start`.
    pub(crate) fn next_set(&self, start: u64) -> Option<u64> {
        if start >= self.bits {
            return None;
        }
        let first_word = start / WORD;
        let w0 = self.words[first_word as usize].load(Ordering::Acquire) & mask(start % WORD, WORD);
        if w0 != 0 {
            return Some(first_word * WORD + u64::from(w0.trailing_zeros()));
        }
        let from = first_word + 1;
        let mut s = from / WORD;
        while (s as usize) < self.summary.len() {
            let mut sw = self.summary[s as usize].load(Ordering::SeqCst);
            if s == from / WORD {
                sw &= mask(from % WORD, WORD);
            }
            while sw != 0 {
                let w = s * WORD + u64::from(sw.trailing_zeros());
                sw &= sw - 1;
                let word = self.words[w as usize].load(Ordering::Acquire);
                if word != 0 {
                    return Some(w * WORD + u64::from(word.trailing_zeros()));
                }
            }
            s += 1;
        }
        None
    }

    /// Calls `f(start, len)` for every maximal run of set bits, in order. Visits only
    /// the words the summary marks. Returns the number of level-0 words visited.
    pub(crate) fn for_each_run(&self, mut f: impl FnMut(u64, u64)) -> u64 {
        let mut visited = 0;
        let mut pending: Option<(u64, u64)> = None;
        for (s, sword) in self.summary.iter().enumerate() {
            let mut sw = sword.load(Ordering::SeqCst);
            while sw != 0 {
                let w = s as u64 * WORD + u64::from(sw.trailing_zeros());
                sw &= sw - 1;
                visited += 1;
                let mut word = self.words[w as usize].load(Ordering::Acquire);
                while word != 0 {
                    let lo = u64::from(word.trailing_zeros());
                    let ones = u64::from((word >> lo).trailing_ones());
                    let start = w * WORD + lo;
                    match pending {
                        Some((ps, pl)) if ps + pl == start => pending = Some((ps, pl + ones)),
                        Some((ps, pl)) => {
                            f(ps, pl);
                            pending = Some((start, ones));
                        }
                        None => pending = Some((start, ones)),
                    }
                    word &= !mask(lo, lo + ones);
                }
            }
        }
        if let Some((ps, pl)) = pending {
            f(ps, pl);
        }
        visited
    }

    /// Clears every bit. Returns the number of level-0 words visited (the cost).
    ///
    /// Meant for a quiesced bitmap; a concurrent setter is not lost (its summary
    /// bit is restored) but may or may not be cleared.
    pub(crate) fn clear_all(&self) -> u64 {
        let mut visited = 0;
        for (s, sword) in self.summary.iter().enumerate() {
            let sw = sword.swap(0, Ordering::SeqCst);
            let mut rest = sw;
            while rest != 0 {
                let j = u64::from(rest.trailing_zeros());
                rest &= rest - 1;
                let w = s as u64 * WORD + j;
                visited += 1;
                let old = self.words[w as usize].swap(0, Ordering::SeqCst);
                self.ones
                    .fetch_sub(u64::from(old.count_ones()), Ordering::AcqRel);
                // A setter that raced the swap above has its bit in the word again:
                // put its summary bit back so scans still find it.
                if self.words[w as usize].load(Ordering::SeqCst) != 0 {
                    sword.fetch_or(1u64 << j, Ordering::SeqCst);
                }
            }
        }
        visited
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(b: &Bitmap) -> Vec<(u64, u64)> {
        let mut v = Vec::new();
        b.for_each_run(|s, l| v.push((s, l)));
        v
    }

    #[test]
    fn set_and_clear_count_only_changed_bits() {
        let b = Bitmap::new(1000);
        assert_eq!(b.set_range(10, 100), 100);
        assert_eq!(b.set_range(50, 100), 40);
        assert_eq!(b.count(), 140);
        assert_eq!(b.clear_range(0, 20), 10);
        assert_eq!(b.count(), 130);
        assert!(!b.get(19));
        assert!(b.get(20));
        assert!(b.get(149));
        assert!(!b.get(150));
        assert!(!b.get(5000));
    }

    #[test]
    fn runs_coalesce_across_words_and_stop_at_end() {
        let b = Bitmap::new(300);
        b.set_range(60, 10);
        b.set_range(128, 64);
        b.set_range(192, 1);
        b.set_range(295, 100);
        assert_eq!(runs(&b), vec![(60, 10), (128, 65), (295, 5)]);
        assert_eq!(b.run(0, 300), (false, 60));
        assert_eq!(b.run(60, 300), (true, 10));
        assert_eq!(b.run(61, 3), (true, 3));
        assert_eq!(b.run(70, 1000), (false, 58));
        assert_eq!(b.run(128, 1000), (true, 65));
        assert_eq!(b.run(299, 1000), (true, 1));
    }

    #[test]
    fn next_set_skips_clean_words() {
        let b = Bitmap::new(1 << 20);
        assert_eq!(b.next_set(0), None);
        b.set_range(777_777, 3);
        b.set_range(5, 1);
        assert_eq!(b.next_set(0), Some(5));
        assert_eq!(b.next_set(6), Some(777_777));
        assert_eq!(b.next_set(777_779), Some(777_779));
        assert_eq!(b.next_set(777_780), None);
    }

    #[test]
    fn clear_all_visits_only_dirty_words() {
        let b = Bitmap::new(1 << 24);
        b.set_range(0, 1);
        b.set_range(1 << 23, 130);
        let visited = b.clear_all();
        assert_eq!(visited, 1 + 3);
        assert_eq!(b.count(), 0);
        assert_eq!(b.next_set(0), None);
        assert!(runs(&b).is_empty());
        // Words cleared lazily by clear_range are still found and visited once.
        b.set_range(100, 1);
        b.clear_range(100, 1);
        assert_eq!(b.clear_all(), 1);
        assert_eq!(b.clear_all(), 0);
    }
}
