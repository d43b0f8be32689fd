//! The I/O gate of a replication node: every request passes it, and a control
//! operation (checkpoint, start, stop) closes it to wait until no request is in
//! flight and to keep new ones out while it changes the stack.
//!
//! The gate is sharded: a thread always enters through its own shard (a
//! reader-writer lock on its own cache line), so that in the common, open case a
//! request costs one uncontended atomic operation to enter and one to leave.
//! Closing takes every shard's write lock, in order. Waiting writers block new
//! readers, so a checkpoint is not starved by a busy guest.

use crate::sync::RwLockExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

const SHARDS: usize = 16;

#[repr(align(128))]
#[derive(Default)]
struct Shard(RwLock<()>);

/// A sharded in-flight gate.
pub(crate) struct Gate {
    shards: Box<[Shard]>,
}

/// A request in flight; leaves the gate when dropped.
pub(crate) struct Pass<'a>(#[allow(dead_code)] RwLockReadGuard<'a, ()>);

/// The gate held closed; reopens when dropped.
pub(crate) struct Closed<'a>(#[allow(dead_code)] Vec<RwLockWriteGuard<'a, ()>>);

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
        }
    }

    /// Enters (waits while the gate is closed). A thread must not enter twice
    /// before leaving: a closer waiting in between would deadlock it.
    pub(crate) fn enter(&self) -> Pass<'_> {
        let shard = &self.shards[my_shard()].0;
        Pass(shard.read_or_recover())
    }

    /// Closes: returns once every request that entered has left.
    pub(crate) fn close(&self) -> Closed<'_> {
        Closed(self.shards.iter().map(|s| s.0.write_or_recover()).collect())
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
}
