//! The I/O gate of a replication node: every request passes it, and a control
//! operation (checkpoint, start, stop) closes it to wait until no request is in
//! flight and to keep new ones out while it changes the stack.
//!
//! The gate is sharded: a thread always enters through its own shard (a
//! reader-writer lock on its own cache line), so that in the common, open case a
//! request costs one uncontended atomic operation to enter and one to leave.
//! Closing takes every shard's write lock, in order. Waiting writers block new
//! readers, so a checkpoint is not starved by a busy guest.
//!
//! A queue worker's asynchronous channel keeps many requests in flight at once
//! and must never block, so it does not take the shards: it counts its passes
//! in a [`HeldPasses`] of its own (registered with the gate, locked only by
//! that worker and by a closer), tries to enter, and leaves a doorbell when the
//! gate is closed. Closing waits for those counts to reach zero too.

use crate::block::channel::{Doorbell, Waiters};
use crate::sync::{CondvarExt, MutexExt, RwLockExt};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

const SHARDS: usize = 16;

#[repr(align(128))]
#[derive(Default)]
struct Shard(RwLock<()>);

/// A sharded in-flight gate.
pub(crate) struct Gate {
    shards: Box<[Shard]>,
    held: Mutex<HeldList>,
}

/// The asynchronous channels' passes (dropped channels leave dead entries,
/// pruned at the next registration), and whether a closer holds the gate.
#[derive(Default)]
struct HeldList {
    sets: Vec<Weak<HeldPasses>>,
    closed: bool,
}

/// A request in flight; leaves the gate when dropped.
pub(crate) struct Pass<'a>(#[allow(dead_code)] RwLockReadGuard<'a, ()>);

/// The gate held closed; reopens when dropped.
pub(crate) struct Closed<'a> {
    gate: &'a Gate,
    _shards: Vec<RwLockWriteGuard<'a, ()>>,
}

impl Drop for Closed<'_> {
    fn drop(&mut self) {
        let mut list = self.gate.held_list();
        list.closed = false;
        for h in list.sets.iter().filter_map(Weak::upgrade) {
            let mut st = h.lock();
            st.closed = false;
            st.bells.ring_all();
        }
    }
}

#[derive(Default)]
struct HeldState {
    closed: bool,
    count: usize,
    /// Workers to ring when the gate reopens.
    bells: Waiters,
}

/// The passes one asynchronous channel holds: counted, never blocking.
#[derive(Default)]
pub(crate) struct HeldPasses {
    state: Mutex<HeldState>,
    drained: Condvar,
}

/// One pass counted in a [`HeldPasses`]; leaves the gate when dropped.
pub(crate) struct HeldPass(Arc<HeldPasses>);

impl Drop for HeldPass {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.count -= 1;
        if st.closed && st.count == 0 {
            self.0.drained.notify_all();
        }
    }
}

impl HeldPasses {
    fn lock(&self) -> MutexGuard<'_, HeldState> {
        self.state.lock_or_recover()
    }

    /// Enters if the gate is open; otherwise takes nothing, and `bell` rings
    /// when it reopens.
    pub(crate) fn try_enter(self: &Arc<Self>, bell: &Arc<Doorbell>) -> Option<HeldPass> {
        let mut st = self.lock();
        if st.closed {
            st.bells.add(bell);
            return None;
        }
        st.count += 1;
        Some(HeldPass(self.clone()))
    }

    /// Shuts the door and waits for every pass to leave.
    fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        while st.count > 0 {
            st = self.drained.wait_or_recover(st);
        }
    }
}

fn my_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

impl Gate {
    /// An open gate.
    pub(crate) fn new() -> Self {
        Gate {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            held: Mutex::new(HeldList::default()),
        }
    }

    fn held_list(&self) -> MutexGuard<'_, HeldList> {
        self.held.lock_or_recover()
    }

    /// A set of passes for one asynchronous channel; closed from the start
    /// when the gate is closed now (the closer reopens it with the others).
    pub(crate) fn register_held(&self) -> Arc<HeldPasses> {
        let mut list = self.held_list();
        let set = Arc::new(HeldPasses::default());
        set.lock().closed = list.closed;
        list.sets.retain(|w| w.strong_count() > 0);
        list.sets.push(Arc::downgrade(&set));
        set
    }

    /// Enters (waits while the gate is closed). A thread must not enter twice
    /// before leaving: a closer waiting in between would deadlock it.
    pub(crate) fn enter(&self) -> Pass<'_> {
        let shard = &self.shards[my_shard()].0;
        Pass(shard.read_or_recover())
    }

    /// Closes: returns once every request that entered has left, the
    /// asynchronous channels' held passes included.
    pub(crate) fn close(&self) -> Closed<'_> {
        let shards = self.shards.iter().map(|s| s.0.write_or_recover()).collect();
        let held: Vec<Arc<HeldPasses>> = {
            let mut list = self.held_list();
            list.closed = true;
            list.sets.iter().filter_map(Weak::upgrade).collect()
        };
        for h in &held {
            h.close();
        }
        Closed {
            gate: self,
            _shards: shards,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn close_waits_for_passes_on_other_threads_and_blocks_new_ones() {
        let gate = Arc::new(Gate::new());
        let in_flight = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let (gate, in_flight, stop) = (gate.clone(), in_flight.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        let _p = gate.enter();
                        in_flight.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_micros(200));
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for _ in 0..50 {
            let _closed = gate.close();
            assert_eq!(in_flight.load(Ordering::SeqCst), 0);
            std::thread::sleep(Duration::from_micros(300));
            assert_eq!(in_flight.load(Ordering::SeqCst), 0);
        }
        stop.store(true, Ordering::SeqCst);
        for w in workers {
            w.join().unwrap();
        }
    }

    #[test]
    fn close_waits_for_held_passes_and_rings_their_worker_at_reopening() {
        use std::os::fd::AsRawFd;
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
        let gate = Arc::new(Gate::new());
        let held = gate.register_held();
        let ev = EventFd::new(EFD_NONBLOCK).unwrap();
        let bell = Arc::new(Doorbell::on_eventfd(ev.as_raw_fd()).unwrap());
        let pass = held.try_enter(&bell).expect("open gate");
        let closed = Arc::new(AtomicUsize::new(0));
        let closer = {
            let (gate, closed) = (gate.clone(), closed.clone());
            std::thread::spawn(move || {
                let c = gate.close();
                closed.store(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
                drop(c);
            })
        };
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(closed.load(Ordering::SeqCst), 0, "closed over a held pass");
        drop(pass);
        while closed.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(held.try_enter(&bell).is_none(), "no entry while closed");
        closer.join().unwrap();
        assert!(bell.take(), "reopening rang the worker");
        assert!(held.try_enter(&bell).is_some());
    }
}
