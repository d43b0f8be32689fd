//! Resource bounds: byte budgets for payloads in flight (one per connection,
//! one for the whole server) and a pool of reusable payload buffers.

use crate::sync::{CondvarExt, MutexExt};
use std::sync::{Condvar, Mutex};

/// Counts payload bytes in flight; `acquire` blocks while the budget is spent,
/// which stops the reader and so pushes back on the client through the socket.
pub(super) struct Budget {
    state: Mutex<BudgetState>,
    cv: Condvar,
}

struct BudgetState {
    free: u64,
    /// Threads blocked in `acquire` (a notify costs a syscall: only then is
    /// one sent).
    waiting: usize,
}

impl Budget {
    pub(super) fn new(bytes: u64) -> Self {
        Budget {
            state: Mutex::new(BudgetState {
                free: bytes,
                waiting: 0,
            }),
            cv: Condvar::new(),
        }
    }

    /// Takes `n` bytes (n never exceeds the total: requests are capped below
    /// it), waiting until they are free. Every request takes its bytes in one
    /// call, so no thread holds part of what it waits for: no deadlock.
    pub(super) fn acquire(&self, n: u64) {
        let mut st = self.state.lock_or_recover();
        while st.free < n {
            st.waiting += 1;
            st = self.cv.wait_or_recover(st);
            st.waiting -= 1;
        }
        st.free -= n;
    }

    pub(super) fn release(&self, n: u64) {
        if n == 0 {
            return;
        }
        let mut st = self.state.lock_or_recover();
        st.free += n;
        if st.waiting > 0 {
            drop(st);
            // Waiters want different amounts: let each one check.
            self.cv.notify_all();
        }
    }
}

/// Buffers are kept for reuse up to this size: bigger ones are rare (large
/// sequential I/O) and would pin memory per idle connection.
const KEEP_MAX: usize = 4 << 20;

/// Recycles payload buffers so the hot path neither allocates nor zeroes.
/// Shared by the whole server and capped in bytes, so idle connections pin
/// nothing.
pub(super) struct BufPool {
    bufs: Mutex<Kept>,
    keep_bytes: usize,
}

struct Kept {
    bufs: Vec<Vec<u8>>,
    bytes: usize,
}

impl BufPool {
    pub(super) fn new(keep_bytes: usize) -> Self {
        BufPool {
            bufs: Mutex::new(Kept {
                bufs: Vec::new(),
                bytes: 0,
            }),
            keep_bytes,
        }
    }

    /// A buffer of at least `len` bytes (contents unspecified); callers use
    /// `&buf[..len]`. Lengths only grow, so reuse never zeroes again.
    pub(super) fn get(&self, len: usize) -> Vec<u8> {
        let mut buf = self.take();
        if buf.len() < len {
            buf.resize(len, 0);
        }
        buf
    }

    /// A kept buffer (any length, contents unspecified) or an empty one,
    /// for callers that grow it themselves as bytes arrive.
    pub(super) fn take(&self) -> Vec<u8> {
        let mut kept = self.bufs.lock_or_recover();
        match kept.bufs.pop() {
            Some(b) => {
                kept.bytes -= b.len();
                b
            }
            None => Vec::new(),
        }
    }

    pub(super) fn put(&self, buf: Vec<u8>) {
        if buf.len() > KEEP_MAX || buf.is_empty() {
            return;
        }
        let mut kept = self.bufs.lock_or_recover();
        if kept.bytes + buf.len() <= self.keep_bytes {
            kept.bytes += buf.len();
            kept.bufs.push(buf);
        }
    }
}

/// A bounded FIFO between the reader and the workers. Wake-ups cost a
/// syscall, so they are sent only to threads that are actually asleep.
pub(super) struct JobQueue<T> {
    state: Mutex<QueueState<T>>,
    /// Workers wait here for work.
    work: Condvar,
    /// The reader waits here for room.
    room: Condvar,
    depth: usize,
}

struct QueueState<T> {
    jobs: std::collections::VecDeque<T>,
    idle_workers: usize,
    reader_waiting: bool,
    closed: bool,
}

impl<T> JobQueue<T> {
    pub(super) fn new(depth: usize) -> Self {
        JobQueue {
            state: Mutex::new(QueueState {
                jobs: std::collections::VecDeque::with_capacity(depth),
                idle_workers: 0,
                reader_waiting: false,
                closed: false,
            }),
            work: Condvar::new(),
            room: Condvar::new(),
            depth: depth.max(1),
        }
    }

    /// Queues a job, waiting while the queue is full.
    pub(super) fn push(&self, job: T) {
        let mut st = self.state.lock_or_recover();
        while st.jobs.len() >= self.depth {
            st.reader_waiting = true;
            st = self.room.wait_or_recover(st);
        }
        st.reader_waiting = false;
        st.jobs.push_back(job);
        let wake = st.idle_workers > 0;
        drop(st);
        if wake {
            self.work.notify_one();
        }
    }

    /// Next job; `None` once the queue is closed and drained.
    pub(super) fn pop(&self) -> Option<T> {
        let mut st = self.state.lock_or_recover();
        loop {
            if let Some(job) = st.jobs.pop_front() {
                let wake = st.reader_waiting;
                drop(st);
                if wake {
                    self.room.notify_one();
                }
                return Some(job);
            }
            if st.closed {
                return None;
            }
            st.idle_workers += 1;
            st = self.work.wait_or_recover(st);
            st.idle_workers -= 1;
        }
    }

    /// No more jobs will come: workers finish what is queued, then stop.
    pub(super) fn close(&self) {
        self.state.lock_or_recover().closed = true;
        self.work.notify_all();
    }
}
