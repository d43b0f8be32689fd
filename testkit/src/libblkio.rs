//! The one libblkio client: libblkio's `virtio-blk-vhost-user` driver does what
//! a VMM's virtio-blk driver does. The demo drives colo-blk's guests with it,
//! `colo-blk bench` measures any vhost-user-blk socket with it, and so do the
//! tests.
//!
//! A [`Queue`] either runs one request at a time ([`Queue::write`],
//! [`Queue::read`], ...) or keeps many in flight ([`Queue::submit`] and
//! [`Queue::reap`]), each using its own slot of the queue's buffer.

use crate::PATIENCE;
use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use std::fmt;
use std::mem::MaybeUninit;
use std::path::Path;
use std::time::Duration;

/// A libblkio error: the errno of a failed request or setup step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoError {
    /// Positive errno.
    pub errno: i32,
    /// libblkio's message.
    pub message: String,
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (errno {})",
            if self.message.is_empty() {
                "I/O error"
            } else {
                &self.message
            },
            self.errno
        )
    }
}

impl std::error::Error for IoError {}

impl From<blkio::Error> for IoError {
    fn from(e: blkio::Error) -> Self {
        IoError {
            errno: e.errno().raw_os_error(),
            message: e.message().to_string(),
        }
    }
}

/// Completions fetched per [`Queue::reap`] at the most.
pub const BATCH: usize = 64;

/// How to connect a [`Client`].
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions {
    /// Queues to use (the device must offer at least this many).
    pub num_queues: usize,
    /// Open read-only (required by libblkio when the device is read-only).
    pub read_only: bool,
    /// Bytes of shared buffer per queue (the largest single request, or all
    /// the slots of the requests kept in flight).
    pub buf_per_queue: usize,
    /// Virtqueue size; `None` keeps libblkio's default (256).
    pub queue_size: Option<u32>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            num_queues: 1,
            read_only: false,
            buf_per_queue: 2 << 20,
            queue_size: None,
        }
    }
}

/// A request of [`Queue::submit`] that completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// The slot given at submission.
    pub slot: usize,
    /// 0 or a negative errno.
    pub ret: i32,
}

/// A libblkio "virtio-blk-vhost-user" frontend: what a VMM's virtio-blk driver
/// does, from a test. Data buffers live in memory mapped to the backend, as
/// vhost-user requires.
pub struct Client {
    // Field order matters: queues go before the Blkio instance that owns them.
    queues: Vec<Queue>,
    region: MemoryRegion,
    blkio: Blkio,
    /// Device capacity in bytes.
    pub capacity: u64,
}

/// One request queue with its own window of the shared buffer. A queue is
/// driven by one thread at a time (`Send`: it may move to another thread).
pub struct Queue {
    q: Blkioq,
    buf: *mut u8,
    len: usize,
    completions: Vec<MaybeUninit<Completion>>,
}

// SAFETY: `buf` points into a mapping owned by the Client, which outlives its
// queues; each queue's window is disjoint from every other queue's, so a queue
// moved to another thread is the only one touching its window.
unsafe impl Send for Queue {}

impl Client {
    /// Connects with one queue.
    pub fn connect(socket: &Path) -> Result<Client, IoError> {
        Self::connect_with(socket, ClientOptions::default())
    }

    /// Connects, starts `opts.num_queues` queues and maps their buffers.
    pub fn connect_with(socket: &Path, opts: ClientOptions) -> Result<Client, IoError> {
        let invalid = |message: String| IoError {
            errno: libc::EINVAL,
            message,
        };
        let path = socket
            .to_str()
            .ok_or_else(|| invalid(format!("socket path {} is not UTF-8", socket.display())))?;
        let num_queues = i32::try_from(opts.num_queues)
            .map_err(|_| invalid(format!("{} queues", opts.num_queues)))?;
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", path)?;
        blkio.set_bool("read-only", opts.read_only)?;
        blkio.connect()?;
        blkio.set_i32("num-queues", num_queues)?;
        if let Some(size) = opts.queue_size {
            let size = i32::try_from(size).map_err(|_| invalid(format!("queue size {size}")))?;
            blkio.set_i32("queue-size", size)?;
        }
        let capacity = blkio.get_u64("capacity")?;
        let started = blkio.start()?;
        if started.queues.len() < opts.num_queues {
            return Err(invalid(format!(
                "{} queues started, {} asked for",
                started.queues.len(),
                opts.num_queues
            )));
        }
        let total = opts.buf_per_queue * opts.num_queues;
        let region = blkio.alloc_mem_region(total)?;
        blkio.map_mem_region(&region)?;
        let queues = started
            .queues
            .into_iter()
            .take(opts.num_queues)
            .enumerate()
            .map(|(i, q)| Queue {
                q,
                // In bounds: i < num_queues and the region holds num_queues windows.
                buf: (region.addr + i * opts.buf_per_queue) as *mut u8,
                len: opts.buf_per_queue,
                completions: (0..BATCH).map(|_| MaybeUninit::uninit()).collect(),
            })
            .collect();
        Ok(Client {
            queues,
            region,
            blkio,
            capacity,
        })
    }

    /// Reads the capacity again (a GET_CONFIG on the live connection, as a
    /// driver does on a config interrupt) and returns it; `capacity` follows.
    pub fn refresh_capacity(&mut self) -> Result<u64, IoError> {
        self.capacity = self.blkio.get_u64("capacity")?;
        Ok(self.capacity)
    }

    /// Queue `i`.
    pub fn queue(&mut self, i: usize) -> &mut Queue {
        &mut self.queues[i]
    }

    /// All queues, e.g. to drive them from several threads at once.
    pub fn queues(&mut self) -> &mut [Queue] {
        &mut self.queues
    }

    /// Writes `data` at `offset` on queue 0.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        self.queues[0].write(offset, data)
    }

    /// Reads `len` bytes at `offset` on queue 0.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, IoError> {
        self.queues[0].read(offset, len)
    }

    /// Flushes on queue 0.
    pub fn flush(&mut self) -> Result<(), IoError> {
        self.queues[0].flush()
    }

    /// Discards on queue 0.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), IoError> {
        self.queues[0].discard(offset, len)
    }

    /// Write-zeroes on queue 0.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), IoError> {
        self.queues[0].write_zeroes(offset, len, unmap)
    }

    /// The libblkio instance, for properties.
    pub fn blkio(&self) -> &Blkio {
        &self.blkio
    }

    /// The shared buffer region.
    pub fn region(&self) -> &MemoryRegion {
        &self.region
    }

    /// Fills every queue's whole buffer with `byte` (so that writes from
    /// [`Queue::submit`] carry non-zero data).
    pub fn fill(&mut self, byte: u8) {
        for q in &mut self.queues {
            q.buf().fill(byte);
        }
    }
}

impl Queue {
    /// This queue's window of the shared buffer.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the window lies in the mapped region (see Client::connect_with)
        // and is only reachable through this exclusive borrow.
        unsafe { std::slice::from_raw_parts_mut(self.buf, self.len) }
    }

    /// Writes `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), IoError> {
        self.buf()[..data.len()].copy_from_slice(data);
        self.q
            .write(offset, self.buf, data.len(), 0, ReqFlags::empty());
        self.complete_one()
    }

    /// Writes `data` at `offset` as `pieces` separate buffers (one request with
    /// several data descriptors).
    pub fn writev(&mut self, offset: u64, data: &[u8], pieces: usize) -> Result<(), IoError> {
        self.buf()[..data.len()].copy_from_slice(data);
        let iov = self.iovecs(data.len(), pieces);
        self.q
            .writev(offset, iov.as_ptr(), iov.len() as u32, 0, ReqFlags::empty());
        self.complete_one()
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, IoError> {
        self.q.read(offset, self.buf, len, 0, ReqFlags::empty());
        self.complete_one()?;
        Ok(self.buf()[..len].to_vec())
    }

    /// Reads `len` bytes at `offset` into `pieces` separate buffers.
    pub fn readv(&mut self, offset: u64, len: usize, pieces: usize) -> Result<Vec<u8>, IoError> {
        let iov = self.iovecs(len, pieces);
        self.q
            .readv(offset, iov.as_ptr(), iov.len() as u32, 0, ReqFlags::empty());
        self.complete_one()?;
        Ok(self.buf()[..len].to_vec())
    }

    /// Flushes the device's write cache.
    pub fn flush(&mut self) -> Result<(), IoError> {
        self.q.flush(0, ReqFlags::empty());
        self.complete_one()
    }

    /// Discards `[offset, offset + len)`.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), IoError> {
        self.q.discard(offset, len, 0, ReqFlags::empty());
        self.complete_one()
    }

    /// Zeroes `[offset, offset + len)`, letting the device unmap if `unmap`.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), IoError> {
        let flags = if unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        self.q.write_zeroes(offset, len, 0, flags);
        self.complete_one()
    }

    /// Queues a read or write of `len` bytes at `offset` using the buffer
    /// bytes `[slot * len, (slot + 1) * len)`; [`Queue::reap`] sends it.
    ///
    /// # Panics
    ///
    /// If the slot lies outside this queue's buffer.
    pub fn submit(&mut self, write: bool, offset: u64, len: usize, slot: usize) {
        assert!((slot + 1) * len <= self.len, "slot {slot} of {len} bytes");
        // SAFETY: in bounds of this queue's window, as asserted above.
        let buf = unsafe { self.buf.add(slot * len) };
        if write {
            self.q.write(offset, buf, len, slot, ReqFlags::empty());
        } else {
            self.q.read(offset, buf, len, slot, ReqFlags::empty());
        }
    }

    /// Sends what [`Queue::submit`] queued and waits for at least one
    /// completion (at most [`BATCH`]); `out` receives them.
    pub fn reap(&mut self, out: &mut Vec<Done>) -> Result<(), IoError> {
        self.reap_within(out, PATIENCE)
    }

    /// [`Queue::reap`], giving up (`ETIMEDOUT`) after `patience`.
    pub fn reap_within(&mut self, out: &mut Vec<Done>, patience: Duration) -> Result<(), IoError> {
        let mut timeout = patience;
        let n = self
            .q
            .do_io(&mut self.completions, 1, Some(&mut timeout), None)?;
        out.clear();
        for c in &self.completions[..n] {
            // SAFETY: do_io initialised the first `n` entries.
            let c = unsafe { c.assume_init_read() };
            out.push(Done {
                slot: c.user_data,
                ret: c.ret,
            });
        }
        if n == 0 {
            return Err(IoError {
                errno: libc::ETIMEDOUT,
                message: format!("no completion within {patience:?}"),
            });
        }
        Ok(())
    }

    /// Splits the first `len` bytes of the window into `pieces` iovecs whose
    /// lengths are multiples of 512 (the last one takes the rest).
    fn iovecs(&mut self, len: usize, pieces: usize) -> Vec<libc::iovec> {
        let pieces = pieces.clamp(1, (len / 512).max(1));
        let step = len / pieces / 512 * 512;
        (0..pieces)
            .map(|i| {
                let start = i * step;
                let end = if i + 1 == pieces { len } else { start + step };
                libc::iovec {
                    // SAFETY: start < len <= window length.
                    iov_base: unsafe { self.buf.add(start) }.cast(),
                    iov_len: end - start,
                }
            })
            .collect()
    }

    /// Waits for the single outstanding request.
    fn complete_one(&mut self) -> Result<(), IoError> {
        let mut done = [const { MaybeUninit::<Completion>::uninit() }; 1];
        let mut timeout = PATIENCE;
        let n = self.q.do_io(&mut done, 1, Some(&mut timeout), None)?;
        if n != 1 {
            return Err(IoError {
                errno: libc::ETIMEDOUT,
                message: format!("no completion within {PATIENCE:?}"),
            });
        }
        // SAFETY: do_io initialised the first `n` completions.
        let c = unsafe { done[0].assume_init_read() };
        if c.ret < 0 {
            let message = if c.error_msg.is_null() {
                String::new()
            } else {
                // SAFETY: a failed completion carries a pointer to one of
                // libblkio's static NUL-terminated messages.
                unsafe { std::ffi::CStr::from_ptr(c.error_msg) }
                    .to_string_lossy()
                    .into_owned()
            };
            return Err(IoError {
                errno: -c.ret,
                message,
            });
        }
        Ok(())
    }
}
