//! A minimal libblkio frontend for the benchmark: one or more queues, one
//! mapped buffer split evenly between them.

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
    // Declared first: the queues must go before the Blkio instance owning them.
    queues: Vec<BenchQueue>,
    region: MemoryRegion,
    _blkio: Blkio,
    /// Device capacity in bytes.
    pub capacity: u64,
}

/// One virtqueue and its own slice of the mapped buffer. A queue is driven by
/// one thread at a time (`Send`, moved into a scoped thread per queue).
pub struct BenchQueue {
    queue: Blkioq,
    /// Start of this queue's slice of the mapped region.
    buf_addr: usize,
    /// Length of this queue's slice.
    buf_len: usize,
    completions: Vec<MaybeUninit<Completion>>,
}

/// A finished request.
pub struct Done {
    /// The `user_data` given at submission.
    pub slot: usize,
    /// 0 or a negative errno.
    pub ret: i32,
}

/// How to connect.
#[derive(Debug, Clone, Copy)]
pub struct ConnectOptions {
    /// Request queues to start (the device must offer at least this many).
    pub num_queues: usize,
    /// Virtqueue size; `None` keeps libblkio's default (256).
    pub queue_size: Option<u32>,
    /// Buffer bytes per queue.
    pub buf_per_queue: usize,
}

impl BenchClient {
    /// Connects to `socket`, starts the queues and maps their buffers.
    pub fn connect(socket: &Path, opts: ConnectOptions) -> Result<Self, BenchError> {
        let e =
            |what: &'static str| move |err: blkio::Error| BenchError::Blkio(what, err.to_string());
        let path = socket
            .to_str()
            .ok_or_else(|| BenchError::Blkio("path", "socket path is not UTF-8".into()))?;
        let num_queues = i32::try_from(opts.num_queues)
            .map_err(|_| BenchError::Usage(format!("{} queues", opts.num_queues)))?;
        let mut blkio = Blkio::new("virtio-blk-vhost-user").map_err(e("new"))?;
        blkio.set_str("path", path).map_err(e("path"))?;
        blkio.connect().map_err(e("connect"))?;
        blkio
            .set_i32("num-queues", num_queues)
            .map_err(e("num-queues"))?;
        if let Some(size) = opts.queue_size {
            let size =
                i32::try_from(size).map_err(|_| BenchError::Usage(format!("queue size {size}")))?;
            blkio.set_i32("queue-size", size).map_err(e("queue-size"))?;
        }
        let capacity = blkio.get_u64("capacity").map_err(e("capacity"))?;
        let started = blkio.start().map_err(e("start"))?;
        let total = opts.buf_per_queue * opts.num_queues;
        let region = blkio.alloc_mem_region(total).map_err(e("alloc"))?;
        blkio.map_mem_region(&region).map_err(e("map"))?;
        if started.queues.len() < opts.num_queues {
            return Err(BenchError::Blkio("start", "fewer queues than asked".into()));
        }
        let queues = started
            .queues
            .into_iter()
            .take(opts.num_queues)
            .enumerate()
            .map(|(i, queue)| BenchQueue {
                queue,
                buf_addr: region.addr + i * opts.buf_per_queue,
                buf_len: opts.buf_per_queue,
                completions: (0..BATCH).map(|_| MaybeUninit::uninit()).collect(),
            })
            .collect();
        Ok(BenchClient {
            queues,
            region,
            _blkio: blkio,
            capacity,
        })
    }

    /// Fills the whole buffer with `byte` (so writes carry non-zero data).
    pub fn fill(&mut self, byte: u8) {
        // SAFETY: the region is a live mapping of region.len bytes that only this
        // client uses, and no request is in flight while the client is borrowed
        // mutably outside a workload run.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
            .fill(byte);
    }

    /// The started queues.
    pub fn queues_mut(&mut self) -> &mut [BenchQueue] {
        &mut self.queues
    }
}

impl BenchQueue {
    /// Queues a read or write of `len` bytes at `offset` using this queue's
    /// buffer bytes `[slot * len, (slot + 1) * len)`.
    pub fn submit(&mut self, write: bool, offset: u64, len: usize, slot: usize) {
        debug_assert!((slot + 1) * len <= self.buf_len);
        let buf = (self.buf_addr + slot * len) as *mut u8;
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
