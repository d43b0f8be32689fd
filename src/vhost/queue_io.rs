//! Everything one queue worker owns besides its vring: the asynchronous
//! channel to the node (when it has one), the thread pool for large reads and
//! slow writes (when it has none), and the polling state. Nothing here is
//! shared between queues.

use super::inflight::QueueRegion;
use super::offload::IoPool;
use super::poll::Poller;
use crate::sync::MutexExt;
use crate::virtio_blk::{AsyncQueue, VirtioBlk};
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// What a queue worker holds while it serves (behind one mutex that only the
/// worker, and a stopping control thread, ever take).
pub(crate) struct QueueState {
    /// The node's asynchronous channel; `None` means requests run inline on
    /// the worker (or in the pool).
    pub(crate) channel: Option<AsyncQueue>,
    pub(crate) poller: Poller,
    /// This queue's part of the frontend's inflight buffer, once it sent one.
    pub(crate) inflight: Option<QueueRegion>,
    /// A buffer sent (SET_INFLIGHT_FD) since the ring last started: it takes
    /// over at the next start, never under a running ring, whose requests in
    /// flight it knows nothing of.
    pub(crate) inflight_next: Option<Option<QueueRegion>>,
}

/// The I/O side of one queue.
pub(crate) struct QueueIo {
    pub(crate) index: usize,
    pub(crate) pool: IoPool,
    state: Mutex<QueueState>,
}

impl QueueIo {
    /// Opens queue `index`'s channel on the device's node (for up to `depth`
    /// requests in flight) and its pool.
    pub(crate) fn new(
        device: Arc<VirtioBlk>,
        index: usize,
        depth: u16,
        poll_us: u32,
    ) -> io::Result<Self> {
        let channel = device
            .open_channel(u32::from(depth))
            .transpose()?
            .map(AsyncQueue::new);
        Ok(QueueIo {
            index,
            pool: IoPool::new(device, index)?,
            state: Mutex::new(QueueState {
                channel,
                poller: Poller::new(poll_us),
                inflight: None,
                inflight_next: None,
            }),
        })
    }

    /// The worker's state, for one pass.
    pub(crate) fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock_or_recover()
    }

    /// The eventfds that signal completions: the pool's, and the channel's.
    pub(crate) fn notify_fds(&self) -> Vec<RawFd> {
        let mut fds = vec![std::os::fd::AsRawFd::as_raw_fd(self.pool.notify_fd())];
        if let Some(ch) = &self.lock().channel {
            fds.push(ch.notify_fd());
        }
        fds
    }

    /// What drives the node asynchronously, if anything does (for the log).
    pub(crate) fn channel_name(&self) -> Option<&'static str> {
        self.lock().channel.as_ref().map(AsyncQueue::channel_name)
    }

    /// Tracks the queue's requests in `region` from its next start on (`None`:
    /// stop tracking then).
    pub(crate) fn set_inflight(&self, region: Option<QueueRegion>) {
        self.lock().inflight_next = Some(region);
    }

    /// Blocks until every request picked up is in the used ring
    /// (GET_VRING_BASE must not report a ring position with requests still
    /// running, and no write may land on the disk after the queue stopped).
    /// The worker completes them: it keeps reaping on its completion eventfd
    /// while the queue is stopped.
    pub(crate) fn wait_idle(&self) {
        self.pool.wait_idle();
        loop {
            match &self.lock().channel {
                Some(ch) if ch.in_flight() > 0 => {}
                _ => return,
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}
