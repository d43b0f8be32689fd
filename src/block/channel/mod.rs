//! Per-queue asynchronous I/O: an [`IoChannel`] keeps many requests in flight on
//! a node at once, so a guest's queue depth reaches the storage.
//!
//! A queue worker owns its channel outright (no lock is shared between queues):
//! it adds operations as it pops descriptor chains, submits them once per pass
//! over the ring, and reaps completions when the channel's eventfd fires or
//! while it polls. Buffers are guest memory handed over as raw `iovec`s: the
//! caller keeps that memory mapped until the completion comes back (or the
//! channel is dropped; dropping waits for the kernel to finish with them).
//!
//! Which requests take this path and which stay synchronous is decided in one
//! place, [`Engine`].

mod doorbell;
mod queued;
mod transfer;
mod uring;

pub use doorbell::{Doorbell, Waiters};
pub(crate) use queued::{add_ops_by_starting, QueuedOp, StartsOps};
pub use transfer::Transfer;
pub use uring::UringChannel;

use super::Result;
use std::os::fd::RawFd;

/// What an operation added to a channel does (for channels' own tables).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Read,
    Write,
    Flush,
    Discard,
    Zeroes { unmap: bool },
}

impl Kind {
    /// The operation's name in error messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Write => "write",
            Kind::Flush => "flush",
            Kind::Discard => "discard",
            Kind::Zeroes { .. } => "write-zeroes",
        }
    }
}

/// Guest buffers handed to a channel as raw iovecs, as slices for a node's
/// synchronous path.
///
/// # Safety
/// Every iovec must point to memory that stays mapped for `'a` and that
/// nothing else writes meanwhile when the slices are read from (the
/// [`IoChannel::add_read`]/[`IoChannel::add_write`] contract, for a request
/// not yet completed).
pub(crate) unsafe fn iov_slices<'a>(iovs: &[libc::iovec]) -> Vec<vm_memory::VolatileSlice<'a>> {
    iovs.iter()
        // SAFETY: the caller's contract above.
        .map(|v| unsafe { vm_memory::VolatileSlice::new(v.iov_base.cast::<u8>(), v.iov_len) })
        .collect()
}

/// The completion of one operation added to a channel.
#[derive(Debug)]
pub struct IoCompletion {
    /// The id the operation was added with.
    pub id: u64,
    /// What became of it. A read that completed filled every byte.
    pub result: Result<()>,
}

/// A per-queue asynchronous submission path to one node.
///
/// Errors are never returned by `add_*`: an operation that cannot even start
/// (out of range, read-only node) completes with its error, like any other.
pub trait IoChannel: Send {
    /// Adds a read of `iovs.iter().map(len).sum()` bytes at `offset`.
    ///
    /// # Safety
    /// Every iovec must point to memory that stays valid and writable, and that
    /// nothing else writes, until [`poll`](IoChannel::poll) returns this id's
    /// completion or the channel is dropped.
    unsafe fn add_read(&mut self, id: u64, offset: u64, iovs: &[libc::iovec]);

    /// Adds a write of the bytes of `iovs`, in order, at `offset`.
    ///
    /// # Safety
    /// Every iovec must point to memory that stays valid and readable until
    /// [`poll`](IoChannel::poll) returns this id's completion or the channel is
    /// dropped.
    unsafe fn add_write(&mut self, id: u64, offset: u64, iovs: &[libc::iovec]);

    /// Adds a flush: every write completed before it was added is durable when it
    /// completes.
    fn add_flush(&mut self, id: u64);

    /// Adds a discard (the range reads as zeroes afterwards).
    fn add_discard(&mut self, id: u64, offset: u64, len: u64);

    /// Adds a write-zeroes; with `unmap` the space may be released.
    fn add_write_zeroes(&mut self, id: u64, offset: u64, len: u64, unmap: bool);

    /// Hands everything added since the last call to the storage.
    fn submit(&mut self);

    /// Moves every finished operation to `out`; returns how many.
    fn poll(&mut self, out: &mut Vec<IoCompletion>) -> usize;

    /// True when [`poll`](IoChannel::poll) would return something. Cheap (no
    /// system call), for a worker that polls before it sleeps.
    fn has_completions(&mut self) -> bool;

    /// Operations added and not yet returned by [`poll`](IoChannel::poll).
    fn in_flight(&self) -> usize;

    /// An eventfd that becomes readable when completions are waiting.
    fn notify_fd(&self) -> RawFd;

    /// True when a request alone on its queue is served faster by the served
    /// node's synchronous path than through this channel (the rule that uses
    /// it: `virtio_blk::lone`).
    fn inline_when_lone(&self) -> bool {
        false
    }

    /// What drives the operations, for logs ("io_uring", ...).
    fn name(&self) -> &'static str {
        "asynchronous channel"
    }
}

/// How a raw file is driven: the single place that chooses between the
/// synchronous path and an [`IoChannel`].
///
/// The rule (`Auto`): a file opened with `O_DIRECT` gets an io_uring channel,
/// because every request then waits on the device and only a deep queue keeps
/// it busy; a file on the page cache is served synchronously on the queue
/// worker, because a cache hit is a memory copy and an asynchronous round trip
/// only adds to it (measured in integration/bench-peers.sh: tmpfs rows).
/// On a channel, one exception: a request alone on a queue that keeps one in
/// flight runs synchronously (`virtio_blk::lone` holds that rule).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// io_uring with `--direct`, synchronous otherwise.
    #[default]
    Auto,
    /// Always io_uring.
    Uring,
    /// Always synchronous `preadv`/`pwritev` on the queue worker (large reads
    /// and slow nodes still use the per-queue thread pool).
    Sync,
}

impl Engine {
    /// True when a file opened with (`direct`) or without `O_DIRECT` gets an
    /// io_uring channel.
    pub fn uses_uring(self, direct: bool) -> bool {
        match self {
            Engine::Auto => direct,
            Engine::Uring => true,
            Engine::Sync => false,
        }
    }
}
