//! Range locks at a fixed granularity (the copy-before-write cluster), striped:
//! unit `u` of the disk is guarded by reader-writer lock `u % stripes`.
//!
//! A request locks every stripe its units map to, in ascending stripe order, so two
//! requests can never wait for each other in a cycle. Unrelated ranges contend
//! only when they map to the same stripe (`stripes` × granularity apart).
//!
//! Threads block ([`RangeLocks::shared`], [`RangeLocks::exclusive`]); a queue
//! worker that keeps many requests in flight must not, so it tries
//! ([`RangeLocks::try_exclusive`]), leaves a [`Doorbell`] on the stripe that is
//! busy, and tries again when the holder releases it and rings. Its guard is
//! owned (it lives in the request until the request completes). Writers are
//! preferred: a waiting exclusive holder keeps new shared ones out, so a
//! copy-before-write or a commit is not starved by a stream of guest reads.

use super::channel::{Doorbell, Waiters};
use crate::sync::{CondvarExt, MutexExt};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Default number of stripes.
pub const DEFAULT_STRIPES: usize = 1024;

#[derive(Default)]
struct StripeState {
    readers: u32,
    writer: bool,
    /// Blocked exclusive lockers (they keep new shared ones out).
    writers_waiting: u32,
    /// Threads asleep on the condvar.
    sleepers: u32,
    /// Workers to ring once the stripe is released.
    bells: Waiters,
}

#[derive(Default)]
struct Stripe {
    state: Mutex<StripeState>,
    cv: Condvar,
}

impl Stripe {
    fn lock(&self) -> MutexGuard<'_, StripeState> {
        self.state.lock_or_recover()
    }

    fn sleep<'a>(&self, st: MutexGuard<'a, StripeState>) -> MutexGuard<'a, StripeState> {
        let mut st = st;
        st.sleepers += 1;
        let mut st = self.cv.wait_or_recover(st);
        st.sleepers -= 1;
        st
    }

    fn acquire(&self, mode: Mode) {
        let mut st = self.lock();
        match mode {
            Mode::Shared => {
                while st.writer || st.writers_waiting > 0 {
                    st = self.sleep(st);
                }
                st.readers += 1;
            }
            Mode::Exclusive => {
                st.writers_waiting += 1;
                while st.writer || st.readers > 0 {
                    st = self.sleep(st);
                }
                st.writers_waiting -= 1;
                st.writer = true;
            }
        }
    }

    /// Shares the stripe if no holder or waiter wants it alone; else leaves
    /// `bell` to be rung.
    fn try_shared(&self, bell: &Arc<Doorbell>) -> bool {
        let mut st = self.lock();
        if st.writer || st.writers_waiting > 0 {
            st.bells.add(bell);
            return false;
        }
        st.readers += 1;
        true
    }

    /// Takes the stripe alone if it is free; else leaves `bell` to be rung.
    fn try_exclusive(&self, bell: &Arc<Doorbell>) -> bool {
        let mut st = self.lock();
        if st.writer || st.readers > 0 || st.writers_waiting > 0 {
            st.bells.add(bell);
            return false;
        }
        st.writer = true;
        true
    }

    fn release(&self, mode: Mode) {
        let mut st = self.lock();
        match mode {
            Mode::Shared => st.readers -= 1,
            Mode::Exclusive => st.writer = false,
        }
        if st.readers == 0 || mode == Mode::Exclusive {
            if st.sleepers > 0 {
                self.cv.notify_all();
            }
            st.bells.ring_all();
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Shared,
    Exclusive,
}

/// The stripes one range maps to, in ascending order: one interval, or two
/// when it wraps around the end of the table.
#[derive(Clone, Copy, Debug)]
struct Span {
    a: (usize, usize),
    b: (usize, usize),
}

impl Span {
    fn stripes(self) -> impl Iterator<Item = usize> {
        (self.a.0..self.a.1).chain(self.b.0..self.b.1)
    }

    fn len(self) -> usize {
        (self.a.1 - self.a.0) + (self.b.1 - self.b.0)
    }
}

/// Striped reader-writer locks over byte ranges.
pub struct RangeLocks {
    stripes: Box<[Stripe]>,
    shift: u32,
}

impl std::fmt::Debug for RangeLocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RangeLocks")
            .field("stripes", &self.stripes.len())
            .field("granularity", &(1u64 << self.shift))
            .finish()
    }
}

/// Holds the locks of one range until dropped.
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    span: Span,
    mode: Mode,
}

impl RangeGuard<'_> {
    /// Number of stripes held.
    pub fn stripes_held(&self) -> usize {
        self.span.len()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        self.locks.release(self.span, self.mode);
    }
}

/// A hold on one range that owns its lock table, for a request that keeps it
/// across many passes of a queue worker.
pub struct OwnedRangeGuard {
    locks: Arc<RangeLocks>,
    span: Span,
    mode: Mode,
}

impl Drop for OwnedRangeGuard {
    fn drop(&mut self) {
        self.locks.release(self.span, self.mode);
    }
}

impl std::fmt::Debug for OwnedRangeGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedRangeGuard")
            .field("stripes", &self.span.len())
            .finish()
    }
}

impl RangeLocks {
    /// Locks over units of `granularity` bytes (a power of two) in `stripes` stripes.
    pub fn new(granularity: u64, stripes: usize) -> Self {
        let granularity = granularity.max(1).next_power_of_two();
        RangeLocks {
            stripes: (0..stripes.max(1)).map(|_| Stripe::default()).collect(),
            shift: granularity.trailing_zeros(),
        }
    }

    /// Shares `offset..offset + len` with other shared holders.
    pub fn shared(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        self.lock(offset, len, Mode::Shared)
    }

    /// Holds `offset..offset + len` alone.
    pub fn exclusive(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        self.lock(offset, len, Mode::Exclusive)
    }

    /// Holds `offset..offset + len` alone if that needs no waiting. Otherwise
    /// takes nothing, and `bell` rings once the stripe in the way is released
    /// (then try again).
    pub fn try_exclusive(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        bell: &Arc<Doorbell>,
    ) -> Option<OwnedRangeGuard> {
        self.try_lock(offset, len, Mode::Exclusive, bell)
    }

    /// Shares `offset..offset + len` if that needs no waiting. Otherwise takes
    /// nothing, and `bell` rings once the stripe in the way is released.
    pub fn try_shared(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        bell: &Arc<Doorbell>,
    ) -> Option<OwnedRangeGuard> {
        self.try_lock(offset, len, Mode::Shared, bell)
    }

    fn try_lock(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        mode: Mode,
        bell: &Arc<Doorbell>,
    ) -> Option<OwnedRangeGuard> {
        let span = self.span(offset, len);
        for (n, i) in span.stripes().enumerate() {
            let taken = match mode {
                Mode::Shared => self.stripes[i].try_shared(bell),
                Mode::Exclusive => self.stripes[i].try_exclusive(bell),
            };
            if !taken {
                for j in span.stripes().take(n) {
                    self.stripes[j].release(mode);
                }
                return None;
            }
        }
        Some(OwnedRangeGuard {
            locks: self.clone(),
            span,
            mode,
        })
    }

    fn lock(&self, offset: u64, len: u64, mode: Mode) -> RangeGuard<'_> {
        let span = self.span(offset, len);
        for i in span.stripes() {
            self.stripes[i].acquire(mode);
        }
        RangeGuard {
            locks: self,
            span,
            mode,
        }
    }

    fn release(&self, span: Span, mode: Mode) {
        for i in span.stripes() {
            self.stripes[i].release(mode);
        }
    }

    fn span(&self, offset: u64, len: u64) -> Span {
        let n = self.stripes.len() as u64;
        let u0 = offset >> self.shift;
        let u1 = (offset.saturating_add(len.max(1)) - 1) >> self.shift;
        let units = u1 - u0 + 1;
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
        // Both bounds are at most `n`, a `usize`.
        let u = |x: u64| x as usize;
        Span {
            a: (u(a.0), u(a.1)),
            b: (u(b.0), u(b.1)),
        }
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

    #[test]
    fn a_failed_try_takes_nothing_and_rings_when_the_holder_releases() {
        use std::os::fd::AsRawFd;
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
        let l = Arc::new(RangeLocks::new(4096, 8));
        let ev = EventFd::new(EFD_NONBLOCK).unwrap();
        let bell = Arc::new(Doorbell::on_eventfd(ev.as_raw_fd()).unwrap());
        // Stripes 2..=4 wanted; 4 is busy.
        let held = l.shared(4 * 4096, 1);
        assert!(l.try_exclusive(2 * 4096, 3 * 4096, &bell).is_none());
        // Stripes 2 and 3 were given back: another holder gets them at once.
        let g = l.try_exclusive(2 * 4096, 2 * 4096, &bell).unwrap();
        assert!(!bell.is_rung());
        drop(held);
        assert!(bell.take(), "the release rang the waiting worker");
        drop(g);
        let owned = l.try_exclusive(2 * 4096, 3 * 4096, &bell).unwrap();
        // An owned guard blocks threads like any exclusive holder.
        let done = Arc::new(AtomicBool::new(false));
        let t = {
            let (l, done) = (l.clone(), done.clone());
            std::thread::spawn(move || {
                let _g = l.shared(3 * 4096, 1);
                done.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(30));
        assert!(!done.load(Ordering::SeqCst));
        drop(owned);
        t.join().unwrap();
    }

    #[test]
    fn a_shared_try_shares_with_readers_and_waits_for_an_exclusive_holder() {
        use std::os::fd::AsRawFd;
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
        let l = Arc::new(RangeLocks::new(4096, 8));
        let ev = EventFd::new(EFD_NONBLOCK).unwrap();
        let bell = Arc::new(Doorbell::on_eventfd(ev.as_raw_fd()).unwrap());
        let reading = l.shared(0, 4096);
        let a = l.try_shared(0, 2 * 4096, &bell).expect("readers share");
        let writing = l.try_exclusive(4 * 4096, 1, &bell).unwrap();
        // Stripes 3..=4 wanted; 4 is held alone: nothing taken, 3 given back.
        assert!(l.try_shared(3 * 4096, 2 * 4096, &bell).is_none());
        assert!(l.try_exclusive(3 * 4096, 1, &bell).is_some());
        drop(writing);
        assert!(bell.take(), "the exclusive holder's release rang");
        let b = l.try_shared(3 * 4096, 2 * 4096, &bell).unwrap();
        // Owned shared guards keep an exclusive locker out until both go.
        assert!(l.try_exclusive(0, 1, &bell).is_none());
        drop(reading);
        drop(a);
        assert!(l.try_exclusive(0, 1, &bell).is_some());
        assert!(l.try_exclusive(4 * 4096, 1, &bell).is_none());
        drop(b);
        assert!(l.try_exclusive(4 * 4096, 1, &bell).is_some());
    }

    #[test]
    fn a_waiting_exclusive_locker_keeps_new_shared_ones_out() {
        let l = Arc::new(RangeLocks::new(4096, 4));
        let reading = l.shared(0, 1);
        let t = {
            let l = l.clone();
            std::thread::spawn(move || drop(l.exclusive(0, 1)))
        };
        // Bounded wait until the writer is queued on the stripe.
        for _ in 0..1000 {
            if l.stripes[0].lock().writers_waiting == 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(l.stripes[0].lock().writers_waiting, 1);
        let ev = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let bell = Arc::new(Doorbell::on_eventfd(std::os::fd::AsRawFd::as_raw_fd(&ev)).unwrap());
        assert!(l.try_exclusive(0, 1, &bell).is_none());
        drop(reading);
        t.join().unwrap();
    }
}
