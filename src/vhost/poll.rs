//! Adaptive polling: how long a queue worker keeps looking for work before it
//! sleeps in epoll, learned from how long it then sleeps (as QEMU's AioContext
//! does with `poll-max-ns`).
//!
//! A worker that gave up and was woken soon after would have done better to
//! keep polling: the window grows (doubling, up to the maximum). A worker that
//! slept longer than the maximum could not have been saved by polling: the
//! window halves, down to nothing, so an idle disk costs no CPU.
//!
//! Only waits for the guest count. A worker with requests in flight on the
//! disk waits for the disk: it sleeps, since a completion wakes it anyway and
//! polling would take the CPU that the interrupt, the direct-I/O workqueue and
//! the frontend need; and how long a disk takes says nothing about how soon
//! the guest sends the next request.

use std::time::{Duration, Instant};

/// The smallest window worth polling for.
const MIN_WINDOW: Duration = Duration::from_micros(2);

/// One queue worker's polling state.
#[derive(Debug)]
pub(crate) struct Poller {
    max: Duration,
    window: Duration,
    asleep_since: Option<Instant>,
}

impl Poller {
    /// A poller that polls for at most `max_us` microseconds (0: never).
    pub(crate) fn new(max_us: u32) -> Self {
        Poller {
            max: Duration::from_micros(u64::from(max_us)),
            window: Duration::ZERO,
            asleep_since: None,
        }
    }

    /// How long to keep polling after the last work found.
    pub(crate) fn window(&self) -> Duration {
        self.window
    }

    /// Opens the window to the maximum, as a worker that has polled
    /// successfully for a while would have it.
    #[cfg(test)]
    pub(crate) fn open_fully(&mut self) {
        self.window = self.max;
    }

    /// The worker woke up (an event arrived): adapt the window to the sleep
    /// that just ended.
    pub(crate) fn woke(&mut self) {
        let slept = self.asleep_since.take().map(|t| t.elapsed());
        self.woke_after(slept);
    }

    fn woke_after(&mut self, slept: Option<Duration>) {
        let Some(slept) = slept else { return };
        if slept <= self.max {
            if slept > self.window {
                self.window = (self.window * 2).max(MIN_WINDOW).min(self.max);
            }
        } else {
            self.window /= 2;
            if self.window < MIN_WINDOW {
                self.window = Duration::ZERO;
            }
        }
    }

    /// The worker is about to sleep, waiting for the guest (nothing in flight)
    /// or not (requests in flight: it waits for the disk).
    pub(crate) fn sleeping(&mut self, on_guest: bool) {
        self.asleep_since = (on_guest && !self.max.is_zero()).then(Instant::now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn short_sleeps_grow_the_window_up_to_the_maximum() {
        let mut p = Poller::new(50);
        assert_eq!(p.window(), Duration::ZERO, "no polling before it pays");
        for _ in 0..10 {
            p.woke_after(Some(us(30)));
        }
        assert_eq!(p.window(), us(32), "grew until it covers the 30 µs gap");
        for _ in 0..10 {
            p.woke_after(Some(us(49)));
        }
        assert_eq!(p.window(), us(50), "never beyond --poll-us");
    }

    #[test]
    fn long_sleeps_shrink_the_window_to_nothing() {
        let mut p = Poller::new(50);
        for _ in 0..10 {
            p.woke_after(Some(us(40)));
        }
        assert_eq!(p.window(), us(50));
        for _ in 0..10 {
            p.woke_after(Some(Duration::from_millis(5)));
        }
        assert_eq!(p.window(), Duration::ZERO, "an idle disk does not poll");
    }

    #[test]
    fn a_sleep_waiting_for_the_disk_leaves_the_window_alone() {
        let mut p = Poller::new(50);
        for _ in 0..10 {
            p.woke_after(Some(us(40)));
        }
        assert_eq!(p.window(), us(50));
        for _ in 0..10 {
            p.sleeping(false);
            std::thread::sleep(Duration::from_millis(1));
            p.woke();
        }
        assert_eq!(p.window(), us(50), "long disk waits did not shrink it");
        p.sleeping(true);
        std::thread::sleep(Duration::from_millis(1));
        p.woke();
        assert_eq!(p.window(), us(25), "a long wait for the guest did");
    }

    #[test]
    fn zero_disables_polling() {
        let mut p = Poller::new(0);
        p.woke_after(Some(Duration::ZERO));
        p.sleeping(true);
        assert_eq!(p.window(), Duration::ZERO);
        assert!(p.asleep_since.is_none());
    }
}
