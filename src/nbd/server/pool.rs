//! Per-connection resource bounds: a byte budget for payloads in flight and a
//! pool of reusable payload buffers.

use std::sync::{Condvar, Mutex};

/// Counts payload bytes in flight; `acquire` blocks while the budget is spent,
/// which stops the reader and so pushes back on the client through the socket.
pub(super) struct Budget {
    free: Mutex<u64>,
    cv: Condvar,
}

impl Budget {
    pub(super) fn new(bytes: u64) -> Self {
        Budget {
            free: Mutex::new(bytes),
            cv: Condvar::new(),
        }
    }

    /// Takes `n` bytes (n never exceeds the total: requests are capped below it).
    pub(super) fn acquire(&self, n: u64) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while *free < n {
            free = self.cv.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        *free -= n;
    }

    pub(super) fn release(&self, n: u64) {
        if n == 0 {
            return;
        }
        *self.free.lock().unwrap_or_else(|e| e.into_inner()) += n;
        self.cv.notify_one();
    }
}

/// Buffers are kept for reuse up to this size: bigger ones are rare (large
/// sequential I/O) and would pin memory per idle connection.
const KEEP_MAX: usize = 4 << 20;

/// Recycles payload buffers so the hot path neither allocates nor zeroes.
pub(super) struct BufPool {
    bufs: Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

impl BufPool {
    pub(super) fn new(keep: usize) -> Self {
        BufPool {
            bufs: Mutex::new(Vec::new()),
            keep,
        }
    }

    /// A buffer of at least `len` bytes (contents unspecified); callers use
    /// `&buf[..len]`. Lengths only grow, so reuse never zeroes again.
    pub(super) fn get(&self, len: usize) -> Vec<u8> {
        let reused = self.bufs.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut buf = reused.unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, 0);
        }
        buf
    }

    pub(super) fn put(&self, buf: Vec<u8>) {
        if buf.len() > KEEP_MAX {
            return;
        }
        let mut bufs = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
        if bufs.len() < self.keep {
            bufs.push(buf);
        }
    }
}
