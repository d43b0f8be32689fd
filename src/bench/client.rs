//! A minimal libblkio frontend for the benchmark: one queue, one mapped buffer.

use super::BenchError;
use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use std::mem::MaybeUninit;
use std::path::Path;
use std::time::Duration;

/// Longest a single `do_io` may wait before the benchmark gives up on the peer.
const STALL: Duration = Duration::from_secs(30);

/// Completions fetched per `do_io` call.
pub const BATCH: usize = 64;

/// One connection to a vhost-user-blk socket.
pub struct BenchClient {
    // Declared first: the queue must go before the Blkio instance owning it.
    queue: Blkioq,
    region: MemoryRegion,
    _blkio: Blkio,
    /// Device capacity in bytes.
    pub capacity: u64,
    completions: Vec<MaybeUninit<Completion>>,
}

/// A finished request.
pub struct Done {
    /// The `user_data` given at submission.
    pub slot: usize,
    /// 0 or a negative errno.
    pub ret: i32,
}

impl BenchClient {
    /// Connects to `socket` and maps a `buf_len`-byte buffer.
    pub fn connect(socket: &Path, buf_len: usize) -> Result<Self, BenchError> {
        let e =
            |what: &'static str| move |err: blkio::Error| BenchError::Blkio(what, err.to_string());
        let path = socket
            .to_str()
            .ok_or_else(|| BenchError::Blkio("path", "socket path is not UTF-8".into()))?;
        let mut blkio = Blkio::new("virtio-blk-vhost-user").map_err(e("new"))?;
        blkio.set_str("path", path).map_err(e("path"))?;
        blkio.connect().map_err(e("connect"))?;
        blkio.set_i32("num-queues", 1).map_err(e("num-queues"))?;
        let capacity = blkio.get_u64("capacity").map_err(e("capacity"))?;
        let mut started = blkio.start().map_err(e("start"))?;
        let region = blkio.alloc_mem_region(buf_len).map_err(e("alloc"))?;
        blkio.map_mem_region(&region).map_err(e("map"))?;
        let queue = started
            .queues
            .pop()
            .ok_or_else(|| BenchError::Blkio("start", "no queue".into()))?;
        Ok(BenchClient {
            queue,
            region,
            _blkio: blkio,
            capacity,
            completions: (0..BATCH).map(|_| MaybeUninit::uninit()).collect(),
        })
    }

    /// Fills the whole buffer with `byte` (so writes carry non-zero data).
    pub fn fill(&mut self, byte: u8) {
        self.buf().fill(byte);
    }

    /// The whole mapped buffer.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is a live mapping of region.len bytes that only this
        // client uses; callers touch it only while no request is in flight.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    /// Queues a read or write of `len` bytes at `offset` using buffer bytes
    /// `[slot * len, (slot + 1) * len)`.
    pub fn submit(&mut self, write: bool, offset: u64, len: usize, slot: usize) {
        debug_assert!((slot + 1) * len <= self.region.len);
        let buf = (self.region.addr + slot * len) as *mut u8;
        if write {
            self.queue.write(offset, buf, len, slot, ReqFlags::empty());
        } else {
            self.queue.read(offset, buf, len, slot, ReqFlags::empty());
        }
    }

    /// Submits what was queued and waits for at least one completion.
    pub fn reap(&mut self, out: &mut Vec<Done>) -> Result<(), BenchError> {
        let mut timeout = STALL;
        let n = self
            .queue
            .do_io(&mut self.completions, 1, Some(&mut timeout), None)
            .map_err(|err| BenchError::Blkio("do_io", err.to_string()))?;
        out.clear();
        for c in &self.completions[..n] {
            // SAFETY: do_io initialised the first `n` entries.
            let c = unsafe { c.assume_init_read() };
            out.push(Done {
                slot: c.user_data,
                ret: c.ret,
            });
        }
        Ok(())
    }
}
