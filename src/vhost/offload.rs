//! Per-queue I/O pools: large reads, and writes when the served node asks for
//! it ([`BlockDev::concurrent_writes`](crate::block::BlockDev::concurrent_writes)),
//! run on threads beside the queue worker, so several proceed at once while the
//! worker keeps serving its ring. A node that does not ask (a local file) has
//! its writes run inline, exactly as without a pool.
//!
//! The worker hands a validated request over ([`Offload`]); a pool thread does
//! the I/O, writes the status byte, and queues the completion; the worker,
//! woken through an eventfd registered in its own epoll loop, puts completions in
//! the used ring. Only the worker (and GET_VRING_BASE, after waiting for the pool
//! to drain) ever writes the used ring, and each queue has its own pool: queues
//! share nothing here.

use crate::sync::{CondvarExt, MutexExt};
use crate::virtio_blk::{Completion, Deferred, GuestMem, Offload, VirtioBlk};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use vm_memory::GuestMemoryLoadGuard;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

/// Threads per queue's pool for reads (started on the first request handed over).
const POOL_THREADS: usize = 4;
/// Upper bound on a node's write hint: more threads than requests a ring can
/// hold in flight would only idle.
const MAX_WRITE_THREADS: usize = 64;

/// The I/O pool of one queue.
pub(crate) struct IoPool {
    device: Arc<VirtioBlk>,
    queue_index: usize,
    /// Threads to start: enough for reads, or for the node's write hint.
    threads_wanted: usize,
    /// Writes, discards and write-zeroes are handed over too.
    takes_writes: bool,
    /// Every request is handed over (the node asked for concurrent reads).
    takes_all: bool,
    jobs: OnceLock<Sender<Deferred>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    done_tx: Sender<Completion>,
    done_rx: Mutex<Receiver<Completion>>,
    /// Readable when completions are waiting.
    notify: EventFd,
    /// Requests submitted and not yet in the used ring.
    in_flight: AtomicUsize,
    idle_lock: Mutex<()>,
    idle: Condvar,
}

impl IoPool {
    pub(crate) fn new(device: Arc<VirtioBlk>, queue_index: usize) -> std::io::Result<Self> {
        let (done_tx, done_rx) = channel();
        let writes = device.concurrent_writes().min(MAX_WRITE_THREADS);
        let reads = device.concurrent_reads().min(MAX_WRITE_THREADS);
        Ok(IoPool {
            device,
            queue_index,
            threads_wanted: POOL_THREADS.max(writes).max(reads),
            takes_writes: writes > 0,
            takes_all: reads > 0,
            jobs: OnceLock::new(),
            threads: Mutex::new(Vec::new()),
            done_tx,
            done_rx: Mutex::new(done_rx),
            notify: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
            in_flight: AtomicUsize::new(0),
            idle_lock: Mutex::new(()),
            idle: Condvar::new(),
        })
    }

    /// The eventfd to watch for completions.
    pub(crate) fn notify_fd(&self) -> &EventFd {
        &self.notify
    }

    /// An offload for one pass of the worker over its ring.
    pub(crate) fn offload<'a>(&'a self, mem: &'a GuestMemoryLoadGuard<GuestMem>) -> Submitter<'a> {
        Submitter { pool: self, mem }
    }

    fn submit(&self, request: Deferred) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let request = match self.jobs.get_or_init(|| self.start()).send(request) {
            Ok(()) => return,
            Err(unsent) => unsent.0,
        };
        // No pool thread could be started: run it here, completing it through
        // the same path so that accounting stays in one place.
        self.complete(request.run(&self.device));
    }

    fn start(&self) -> Sender<Deferred> {
        let (tx, rx) = channel::<Deferred>();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = self.threads.lock_or_recover();
        for i in 0..self.threads_wanted {
            let rx = Arc::clone(&rx);
            let device = Arc::clone(&self.device);
            let done = self.done_tx.clone();
            let notify = match self.notify.try_clone() {
                Ok(fd) => fd,
                Err(e) => {
                    log::warn!("queue {}: I/O pool: {e}", self.queue_index);
                    break;
                }
            };
            let spawned = std::thread::Builder::new()
                .name(format!("colo-blk-io{}.{i}", self.queue_index))
                .spawn(move || loop {
                    let next = rx.lock_or_recover().recv();
                    let Ok(request) = next else { return };
                    if done.send(request.run(&device)).is_err() {
                        return;
                    }
                    let _ = notify.write(1);
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => log::warn!(
                    "queue {}: cannot start an I/O thread: {e}",
                    self.queue_index
                ),
            }
        }
        if threads.is_empty() {
            // Dropping the receiver makes every send fail: requests then run inline.
            drop(rx);
        }
        tx
    }

    fn complete(&self, c: Completion) {
        let _ = self.done_tx.send(c);
        let _ = self.notify.write(1);
    }

    /// True while requests handed over are not yet retired.
    pub(crate) fn busy(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) > 0
    }

    /// Takes every waiting completion (after resetting the eventfd, so that a
    /// completion queued while draining wakes the worker again).
    pub(crate) fn drain(&self, out: &mut Vec<Completion>) {
        let _ = self.notify.read();
        out.extend(self.done_rx.lock_or_recover().try_iter());
    }

    /// Records that `n` drained completions are now in the used ring.
    pub(crate) fn retire(&self, n: usize) {
        if n > 0 && self.in_flight.fetch_sub(n, Ordering::SeqCst) == n {
            let _guard = self.idle_lock.lock_or_recover();
            self.idle.notify_all();
        }
    }

    /// Blocks until every submitted request is in the used ring (GET_VRING_BASE
    /// must not report a ring position with requests still running, and a
    /// stopped queue must not have writes still landing on the disk).
    pub(crate) fn wait_idle(&self) {
        let mut guard = self.idle_lock.lock_or_recover();
        while self.in_flight.load(Ordering::SeqCst) > 0 {
            guard = self.idle.wait_or_recover(guard);
        }
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        // Closing the job channel ends the threads once they have run every
        // request queued (a write picked up is never dropped); the requests keep
        // guest memory mapped until then.
        self.jobs.take();
        for t in self.threads.lock_or_recover().drain(..) {
            let _ = t.join();
        }
    }
}

/// The [`Offload`] a worker uses during one pass.
pub(crate) struct Submitter<'a> {
    pool: &'a IoPool,
    mem: &'a GuestMemoryLoadGuard<GuestMem>,
}

impl Offload for Submitter<'_> {
    fn memory(&self) -> Arc<GuestMem> {
        self.mem.clone().into_inner()
    }

    fn takes_writes(&self) -> bool {
        self.pool.takes_writes
    }

    fn takes_all(&self) -> bool {
        self.pool.takes_all
    }

    fn submit(&mut self, request: Deferred) {
        self.pool.submit(request);
    }
}
