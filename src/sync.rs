//! Locks that outlive a panicking holder.
//!
//! A thread that panics while holding a `std::sync` lock poisons it. Every lock
//! in colo-blk guards state that a panic cannot leave half-changed (a counter, a
//! list, a stage, a unit value), and one panicking connection or worker must
//! not take the whole daemon down with it: so a poisoned lock is taken anyway.
//! These are the only place that decides so.

use std::sync::{
    Condvar, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
    WaitTimeoutResult,
};
use std::time::Duration;

/// [`Mutex::lock`], recovering from poisoning.
pub(crate) trait MutexExt<T: ?Sized> {
    /// Locks, even if a holder panicked.
    fn lock_or_recover(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> MutexExt<T> for Mutex<T> {
    fn lock_or_recover(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// [`RwLock::read`] and [`RwLock::write`], recovering from poisoning.
pub(crate) trait RwLockExt<T: ?Sized> {
    /// Locks shared, even if a holder panicked.
    fn read_or_recover(&self) -> RwLockReadGuard<'_, T>;
    /// Locks exclusive, even if a holder panicked.
    fn write_or_recover(&self) -> RwLockWriteGuard<'_, T>;
}

impl<T: ?Sized> RwLockExt<T> for RwLock<T> {
    fn read_or_recover(&self) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_or_recover(&self) -> RwLockWriteGuard<'_, T> {
        self.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// [`Condvar::wait`] and [`Condvar::wait_timeout`], recovering from poisoning.
pub(crate) trait CondvarExt {
    /// Waits for a notification, even if a holder of the lock panicked.
    fn wait_or_recover<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T>;
    /// Waits for a notification or `timeout`, even if a holder panicked.
    fn wait_timeout_or_recover<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: Duration,
    ) -> (MutexGuard<'a, T>, WaitTimeoutResult);
}

impl CondvarExt for Condvar {
    fn wait_or_recover<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        self.wait(guard).unwrap_or_else(PoisonError::into_inner)
    }

    fn wait_timeout_or_recover<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: Duration,
    ) -> (MutexGuard<'a, T>, WaitTimeoutResult) {
        self.wait_timeout(guard, timeout)
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_poisoned_lock_is_taken_anyway() {
        let m = Arc::new(Mutex::new(1));
        let l = Arc::new(RwLock::new(2));
        let (m2, l2) = (m.clone(), l.clone());
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            let _w = l2.write().unwrap();
            panic!("holder panics");
        })
        .join();
        assert!(m.is_poisoned() && l.is_poisoned());
        assert_eq!(*m.lock_or_recover(), 1);
        assert_eq!(*l.read_or_recover(), 2);
        *l.write_or_recover() = 3;
        let cv = Condvar::new();
        let (g, r) = cv.wait_timeout_or_recover(m.lock_or_recover(), Duration::from_millis(1));
        assert!(r.timed_out() && *g == 1);
    }
}
