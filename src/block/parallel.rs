//! A decorator that tells the queue workers to run a node's requests on the
//! queue's thread pool, several at once, when the node has no asynchronous
//! channel of its own but waits on a device for every request.
//!
//! Used where a secondary's synchronous paths meet an O_DIRECT disk: the
//! primary's writes through the NBD server (copy-before-write, then the
//! write), which then run on `n` workers per connection instead of inline on
//! its reader; and the guest's path when the disk has no io_uring channel
//! (`--io-engine sync`), each request on one pool thread, up to `n` at once.

use super::{BlockDev, Extent, Result, SharedDev};
use vm_memory::VolatileSlice;

/// `inner`, with requests worth running `n` at once.
pub struct Parallel {
    inner: SharedDev,
    n: usize,
}

impl Parallel {
    /// Wraps `inner`; `n` requests of it are worth keeping in flight.
    pub fn new(inner: SharedDev, n: usize) -> Self {
        Parallel { inner, n }
    }
}

impl BlockDev for Parallel {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        self.inner.read_vectored(offset, bufs)
    }
    fn write_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        self.inner.write_vectored(offset, bufs)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.inner.block_status(offset, len)
    }
    fn concurrent_writes(&self) -> usize {
        self.n.max(self.inner.concurrent_writes())
    }
    fn concurrent_reads(&self) -> usize {
        self.n
    }
}
