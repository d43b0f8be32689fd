//! Test doubles that wrap a node: [`Intercept`] sees every request before the
//! node does (to hold, stall, count or fail it), [`Gate`] holds requests until
//! opened, and [`Hold`] stops the next request of one kind at a known point.
//!
//! Compiled for this crate's tests and, with the `test-utils` feature, for the
//! crates that test against it; never in the product.

use super::{iov_len, BlockDev, Extent, MemDev, Overlay, Result, SharedDev, DEFAULT_GRANULE};
use crate::sync::{CondvarExt, MutexExt};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vm_memory::VolatileSlice;

/// The longest a [`Gate`] or a [`Hold`] keeps a request: a guard against a
/// test hanging forever, far beyond what any test needs.
const LONGEST_HOLD: Duration = Duration::from_secs(60);

/// An overlay of `size` bytes kept in memory (its store a fresh [`MemDev`]),
/// with the default granule: an active or hidden disk for a test.
pub fn memory_overlay(size: u64) -> Arc<Overlay> {
    let store = Arc::new(MemDev::new(size));
    Arc::new(Overlay::with_store(store, DEFAULT_GRANULE).expect("the default granule is valid"))
}

/// The kind of a request an [`Intercept`] hook sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A read.
    Read,
    /// A write.
    Write,
    /// A flush.
    Flush,
    /// A discard.
    Discard,
    /// A write-zeroes.
    WriteZeroes,
}

impl Op {
    /// True for the requests that change content: write, discard, write-zeroes.
    pub fn is_write_type(self) -> bool {
        matches!(self, Op::Write | Op::Discard | Op::WriteZeroes)
    }
}

type Hook = dyn Fn(Op, u64, u64) -> Result<()> + Send + Sync;

/// A node that passes every request to `inner` once `hook(op, offset, len)`
/// has returned `Ok` (an `Err` fails the request instead; flush has offset and
/// length 0). Block status and the size are not hooked.
pub struct Intercept {
    inner: SharedDev,
    hook: Box<Hook>,
    concurrent_writes: Option<usize>,
}

impl Intercept {
    /// Wraps `inner`.
    pub fn new(
        inner: SharedDev,
        hook: impl Fn(Op, u64, u64) -> Result<()> + Send + Sync + 'static,
    ) -> Self {
        Intercept {
            inner,
            hook: Box::new(hook),
            concurrent_writes: None,
        }
    }

    /// Answers `n` to [`BlockDev::concurrent_writes`] (so that a server or a
    /// queue runs writes on threads and several can wait in the hook at once).
    #[must_use]
    pub fn with_concurrent_writes(mut self, n: usize) -> Self {
        self.concurrent_writes = Some(n);
        self
    }
}

impl BlockDev for Intercept {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        (self.hook)(Op::Read, offset, iov_len(bufs))?;
        self.inner.read_vectored(offset, bufs)
    }
    fn write_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        (self.hook)(Op::Write, offset, iov_len(bufs))?;
        self.inner.write_vectored(offset, bufs)
    }
    fn flush(&self) -> Result<()> {
        (self.hook)(Op::Flush, 0, 0)?;
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        (self.hook)(Op::Discard, offset, len)?;
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        (self.hook)(Op::WriteZeroes, offset, len)?;
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.inner.block_status(offset, len)
    }
    fn concurrent_writes(&self) -> usize {
        self.concurrent_writes
            .unwrap_or_else(|| self.inner.concurrent_writes())
    }
}

/// Requests that [`Gate::pass`] wait while the gate is closed.
#[derive(Debug, Default)]
pub struct Gate {
    open: Mutex<bool>,
    changed: Condvar,
    waiting: AtomicUsize,
    most_waiting: AtomicUsize,
}

impl Gate {
    /// A closed gate.
    pub fn closed() -> Self {
        Gate::default()
    }

    /// Lets every waiting and later request through.
    pub fn open(&self) {
        *self.open.lock_or_recover() = true;
        self.changed.notify_all();
    }

    /// Holds later requests again.
    pub fn close(&self) {
        *self.open.lock_or_recover() = false;
    }

    /// Waits while the gate is closed (at most a minute: a test guard).
    pub fn pass(&self) {
        let deadline = Instant::now() + LONGEST_HOLD;
        let mut open = self.open.lock_or_recover();
        let now = self.waiting.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_waiting.fetch_max(now, Ordering::SeqCst);
        self.changed.notify_all();
        while !*open && Instant::now() < deadline {
            open = self
                .changed
                .wait_timeout_or_recover(open, Duration::from_millis(50))
                .0;
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }

    /// Requests waiting at the gate now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// The most requests that waited at once.
    pub fn most_waiting(&self) -> usize {
        self.most_waiting.load(Ordering::SeqCst)
    }

    /// Waits up to `timeout` until `n` requests wait at once; returns how
    /// many wait.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut open = self.open.lock_or_recover();
        while self.waiting() < n && Instant::now() < deadline {
            open = self
                .changed
                .wait_timeout_or_recover(open, Duration::from_millis(10))
                .0;
        }
        drop(open);
        self.waiting()
    }
}

/// Opens its gate when dropped: however a test ends, the requests held at
/// the gate finish (and a server serving them can shut down).
#[derive(Debug)]
pub struct OpenOnDrop(pub Arc<Gate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct HoldSlot {
    armed: bool,
    entered: bool,
    released: bool,
}

/// Stops the next read, or the next write, once armed, until released: puts
/// one request of a node at a known point (a hook of [`Intercept`] calls
/// [`Hold::pass`]). Reads and writes are held independently.
#[derive(Debug, Default)]
pub struct Hold {
    slots: Mutex<[HoldSlot; 2]>,
    changed: Condvar,
}

impl Hold {
    fn slot(op: Op) -> Option<usize> {
        match op {
            Op::Read => Some(0),
            Op::Write => Some(1),
            _ => None,
        }
    }

    /// Nothing armed.
    pub fn new() -> Self {
        Hold::default()
    }

    /// `inner`, its reads and writes passing this hold.
    pub fn wrap(self: &Arc<Self>, inner: SharedDev) -> Intercept {
        let hold = Arc::clone(self);
        Intercept::new(inner, move |op, _, _| {
            hold.pass(op);
            Ok(())
        })
    }

    /// Arms `op` (a read or a write): the next such request stops.
    pub fn arm(&self, op: Op) {
        if let Some(i) = Self::slot(op) {
            self.slots.lock_or_recover()[i] = HoldSlot {
                armed: true,
                ..HoldSlot::default()
            };
        }
    }

    /// Called for every request: stops it if its kind is armed (disarming),
    /// until [`Hold::release`].
    pub fn pass(&self, op: Op) {
        let Some(i) = Self::slot(op) else {
            return;
        };
        let deadline = Instant::now() + LONGEST_HOLD;
        let mut s = self.slots.lock_or_recover();
        if !s[i].armed {
            return;
        }
        s[i].armed = false;
        s[i].entered = true;
        self.changed.notify_all();
        while !s[i].released && Instant::now() < deadline {
            s = self
                .changed
                .wait_timeout_or_recover(s, Duration::from_millis(50))
                .0;
        }
    }

    /// Waits up to `timeout` until the held `op` has stopped; true if it has.
    pub fn wait_entered(&self, op: Op, timeout: Duration) -> bool {
        let Some(i) = Self::slot(op) else {
            return false;
        };
        let deadline = Instant::now() + timeout;
        let mut s = self.slots.lock_or_recover();
        while !s[i].entered {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self.changed.wait_timeout_or_recover(s, left).0;
        }
        true
    }

    /// Lets the held `op` go on.
    pub fn release(&self, op: Op) {
        if let Some(i) = Self::slot(op) {
            self.slots.lock_or_recover()[i].released = true;
            self.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{BlockDevExt, BlockError, Refusal};

    #[test]
    fn the_hook_sees_every_request_and_can_fail_it() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let dev = Intercept::new(Arc::new(MemDev::new(1 << 20)), move |op, o, l| {
            s.lock_or_recover().push((op, o, l));
            if op == Op::Discard {
                return Err(BlockError::Refused(Refusal::Remote("no".into())));
            }
            Ok(())
        });
        dev.write_at(4096, &[1; 512]).unwrap();
        dev.read_at(0, &mut [0; 1024]).unwrap();
        dev.flush().unwrap();
        assert!(matches!(dev.discard(0, 512), Err(BlockError::Refused(_))));
        dev.write_zeroes(0, 512, true).unwrap();
        assert_eq!(
            *seen.lock_or_recover(),
            vec![
                (Op::Write, 4096, 512),
                (Op::Read, 0, 1024),
                (Op::Flush, 0, 0),
                (Op::Discard, 0, 512),
                (Op::WriteZeroes, 0, 512)
            ]
        );
    }

    #[test]
    fn a_hold_stops_the_armed_kind_until_released_and_a_gate_until_opened() {
        let hold = Arc::new(Hold::new());
        hold.arm(Op::Write);
        hold.pass(Op::Read);
        let h = hold.clone();
        let t = std::thread::spawn(move || h.pass(Op::Write));
        assert!(hold.wait_entered(Op::Write, Duration::from_secs(10)));
        assert!(!t.is_finished());
        hold.release(Op::Write);
        t.join().unwrap();

        let gate = Arc::new(Gate::closed());
        let g = gate.clone();
        let t = std::thread::spawn(move || g.pass());
        assert_eq!(gate.wait_for(1, Duration::from_secs(10)), 1);
        gate.open();
        t.join().unwrap();
        assert_eq!((gate.waiting(), gate.most_waiting()), (0, 1));
    }
}
