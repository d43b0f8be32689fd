//! The block stack: one trait, [`BlockDev`], and the nodes that implement it.
//!
//! A node is what a QEMU `BlockDriver` is: a raw file, an overlay, a chain of
//! overlays, a replication filter. Nodes take `&self` and are `Send + Sync` so that
//! every virtio queue worker (and every NBD connection) can drive the same node
//! concurrently; a node that needs mutual exclusion does it internally, per range,
//! never with one lock around the whole disk.
//!
//! Buffers are [`VolatileSlice`]s: guest memory handed straight from the virtqueue,
//! or a plain `&mut [u8]` converted with `VolatileSlice::from`, so that the hot path
//! moves data between guest memory and the file with no bounce copy.

mod bitmap;
mod chain;
pub mod channel;
mod error;
mod iov;
#[cfg(any(test, feature = "test-utils"))]
mod mem;
mod overlay;
mod parallel;
mod rangelock;
mod raw;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;

pub(crate) use bitmap::Bitmap;
pub use chain::Chain;
pub use error::{BlockError, Refusal};
pub(crate) use iov::{iov_window, iovecs_advance};
#[cfg(any(test, feature = "test-utils"))]
pub use mem::{MemDev, MemStats};
pub use overlay::{Below, Emptied, Overlay, DEFAULT_GRANULE};
pub use parallel::Parallel;
pub use rangelock::{OwnedRangeGuard, RangeGuard, RangeLocks, DEFAULT_STRIPES};
pub use raw::{RawFile, RawFileOptions};

use std::sync::Arc;
use vm_memory::VolatileSlice;

/// Result of a block-stack operation.
pub type Result<T> = std::result::Result<T, BlockError>;

/// A shared handle to a node, as held by queue workers and NBD connections.
pub type SharedDev = Arc<dyn BlockDev>;

/// What a range of a node holds, as answered by [`BlockDev::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// This node holds data for the range.
    Data,
    /// This node holds the range and it reads as zeroes (allocated zeroes).
    Zero,
    /// This node holds nothing for the range: a raw file reads zeroes there, an
    /// overlay passes the read down to the layer below.
    Hole,
}

/// A run of bytes with one [`ExtentKind`], starting at the queried offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (> 0, never beyond the queried range).
    pub len: u64,
    /// What the run holds.
    pub kind: ExtentKind,
}

/// A block device node.
///
/// The trait is the specification every node follows:
/// * offsets and lengths are in bytes; callers validate them against [`size`]
///   (nodes still return [`BlockError::OutOfRange`] rather than touch bytes past
///   the end);
/// * a read fills every byte of every buffer, or fails;
/// * a write is durable only after a successful [`flush`];
/// * the node never panics on any offset, length or buffer it is given.
///
/// [`size`]: BlockDev::size
/// [`flush`]: BlockDev::flush
pub trait BlockDev: Send + Sync {
    /// Length of the device in bytes.
    fn size(&self) -> u64;

    /// True when writes, discards and write-zeroes are refused.
    fn read_only(&self) -> bool {
        false
    }

    /// Reads `bufs.iter().map(len).sum()` bytes starting at `offset` into `bufs`.
    fn read_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()>;

    /// Writes the bytes of `bufs`, in order, starting at `offset`.
    fn write_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()>;

    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;

    /// Tells the node the range's contents are no longer needed. After a discard
    /// the range reads either its old contents or zeroes; nodes here read zeroes.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Makes the range read as zeroes; with `unmap` the node may release the space.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()>;

    /// Describes the run that starts at `offset`, at most `len` bytes long.
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent>;

    /// How many writes (and discards / write-zeroes) this node benefits from
    /// running at once. 0, the default, means a write costs about as much as
    /// handing it to another thread would (a local file), so callers run it
    /// inline; a node whose writes wait on a round trip (a primary forwarding
    /// to its secondary) returns how many it can usefully keep in flight.
    fn concurrent_writes(&self) -> usize {
        0
    }

    /// How many reads this node benefits from running at once on threads
    /// (it has no channel, but each read waits on a device). 0, the default:
    /// reads run inline on the queue worker, only large ones in its pool. Not
    /// 0: every request goes to the queue's pool.
    fn concurrent_reads(&self) -> usize {
        0
    }

    /// Grows the node to `new_size` bytes, for an online resize. Once it
    /// returns Ok, [`size`](BlockDev::size) is at least `new_size` and every
    /// request up to it is valid (also on channels opened before). A size not
    /// above the current one changes nothing: nodes never shrink here.
    ///
    /// The default refuses: overlays and the replication nodes would have to
    /// grow with their peer (the other copy, the layers below) at once.
    fn grow(&self, new_size: u64) -> Result<()> {
        let _ = new_size;
        Err(BlockError::Unsupported("growing this node"))
    }

    /// An asynchronous channel to this node for one queue, holding up to
    /// `depth` requests in flight; `None` when the node is served
    /// synchronously (see [`channel::Engine`] for the rule).
    fn open_channel(&self, depth: u32) -> Option<std::io::Result<Box<dyn channel::IoChannel>>> {
        let _ = depth;
        None
    }
}

/// Returns the total length of a buffer list.
pub fn iov_len(bufs: &[VolatileSlice<'_>]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

/// Checks that `[offset, offset + len)` lies inside a device of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}

/// Convenience wrappers for callers that hold plain byte buffers (tests, NBD,
/// copy-before-write), implemented for every node.
pub trait BlockDevExt: BlockDev {
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_vectored(offset, &[VolatileSlice::from(buf)])
    }

    /// Writes `buf` at `offset`.
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        // VolatileSlice has no read-only variant; the copy keeps `buf` immutable
        // for callers. Only tests and cold paths use this helper.
        let mut owned = buf.to_vec();
        self.write_vectored(offset, &[VolatileSlice::from(owned.as_mut_slice())])
    }
}

impl<T: BlockDev + ?Sized> BlockDevExt for T {}
