//! Range locks at a fixed granularity (the copy-before-write cluster), striped:
//! unit `u` of the disk is guarded by reader-writer lock `u % stripes`.
//!
//! A request locks every stripe its units map to, in ascending stripe order, so two
//! requests can never wait for each other in a cycle. Uncontended, a shared lock
//! costs one atomic operation per stripe touched; unrelated ranges contend only
//! when they map to the same stripe (`stripes` × granularity apart).

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Default number of stripes.
pub const DEFAULT_STRIPES: usize = 1024;

/// Striped reader-writer locks over byte ranges.
#[derive(Debug)]
pub struct RangeLocks {
    stripes: Box<[RwLock<()>]>,
    shift: u32,
}

enum Held<'a> {
    Shared(#[allow(dead_code)] RwLockReadGuard<'a, ()>),
    Exclusive(#[allow(dead_code)] RwLockWriteGuard<'a, ()>),
}

/// Holds the locks of one range until dropped.
pub struct RangeGuard<'a> {
    // Most requests touch one or two units; only larger ones allocate.
    first: Option<Held<'a>>,
    second: Option<Held<'a>>,
    rest: Vec<Held<'a>>,
}

impl RangeGuard<'_> {
    /// Number of stripes held.
    pub fn stripes_held(&self) -> usize {
        usize::from(self.first.is_some()) + usize::from(self.second.is_some()) + self.rest.len()
    }
}

impl RangeLocks {
    /// Locks over units of `granularity` bytes (a power of two) in `stripes` stripes.
    pub fn new(granularity: u64, stripes: usize) -> Self {
        let granularity = granularity.max(1).next_power_of_two();
        RangeLocks {
            stripes: (0..stripes.max(1)).map(|_| RwLock::new(())).collect(),
            shift: granularity.trailing_zeros(),
        }
    }

    /// Shares `offset..offset + len` with other shared holders.
    pub fn shared(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        self.lock(offset, len, |l| {
            Held::Shared(l.read().unwrap_or_else(|e| e.into_inner()))
        })
    }

    /// Holds `offset..offset + len` alone.
    pub fn exclusive(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        self.lock(offset, len, |l| {
            Held::Exclusive(l.write().unwrap_or_else(|e| e.into_inner()))
        })
    }

    fn lock<'a>(
        &'a self,
        offset: u64,
        len: u64,
        take: impl Fn(&'a RwLock<()>) -> Held<'a>,
    ) -> RangeGuard<'a> {
        let mut guard = RangeGuard {
            first: None,
            second: None,
            rest: Vec::new(),
        };
        let n = self.stripes.len() as u64;
        let u0 = offset >> self.shift;
        let u1 = (offset.saturating_add(len.max(1)) - 1) >> self.shift;
        let units = u1 - u0 + 1;
        // Stripes in ascending order: either all, one interval, or two when the
        // interval wraps around the end of the table.
        let (a, b) = if units >= n {
            ((0, n), (0, 0))
        } else {
            let s = u0 % n;
            let e = u1 % n;
            if s <= e {
                ((s, e + 1), (0, 0))
            } else {
                ((0, e + 1), (s, n))
            }
        };
        for i in (a.0..a.1).chain(b.0..b.1) {
            let held = take(&self.stripes[i as usize]);
            if guard.first.is_none() {
                guard.first = Some(held);
            } else if guard.second.is_none() {
                guard.second = Some(held);
            } else {
                guard.rest.push(held);
            }
        }
        guard
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn guards_cover_each_stripe_once_including_wrap_and_whole_table() {
        let l = RangeLocks::new(65536, 8);
        assert_eq!(l.shared(0, 1).stripes_held(), 1);
        assert_eq!(l.shared(65535, 2).stripes_held(), 2);
        assert_eq!(l.shared(7 * 65536, 3 * 65536).stripes_held(), 3);
        assert_eq!(l.exclusive(0, 100 << 20).stripes_held(), 8);
        assert_eq!(l.shared(5, 0).stripes_held(), 1);
    }

    #[test]
    fn exclusive_waits_for_shared_holder_of_same_unit_only() {
        let l = Arc::new(RangeLocks::new(65536, 16));
        let reading = l.shared(65536, 10);
        // A different unit is free.
        drop(l.exclusive(0, 65536));
        let done = Arc::new(AtomicBool::new(false));
        let t = {
            let (l, done) = (l.clone(), done.clone());
            std::thread::spawn(move || {
                let _g = l.exclusive(100_000, 1);
                done.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !done.load(Ordering::SeqCst),
            "exclusive ran while shared was held"
        );
        drop(reading);
        t.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
    }

    #[test]
    fn overlapping_multi_unit_lockers_do_not_deadlock() {
        let l = Arc::new(RangeLocks::new(4096, 8));
        let inside = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let (l, inside) = (l.clone(), inside.clone());
                std::thread::spawn(move || {
                    for i in 0..2000u64 {
                        let off = ((i * 7 + t * 13) % 40) * 4096;
                        let _g = l.exclusive(off, 5 * 4096);
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}
