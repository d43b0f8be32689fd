//! Transmission phase of one connection: a reader that parses requests (and
//! receives WRITE payloads whole before anything is applied) and a pool of
//! workers that run them against the device and send the replies.

use super::handshake::{Negotiated, BASE_ALLOCATION_ID};
use super::inbuf::{Fill, InBuf};
use super::pool::{Budget, BufPool, JobQueue};
use super::{lock, Inner, MAX_PAYLOAD};
use crate::block::{BlockError, ExtentKind};
use crate::nbd::stream::Stream;
use crate::nbd::wire::transmission::{encode_chunk, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_NONE};
use crate::nbd::wire::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use vm_memory::VolatileSlice;

/// At most this many descriptors in one block status reply.
const MAX_EXTENTS: usize = 1024;

/// The reader's input buffer: room for a queue of small requests at once.
const IN_BUF: usize = 256 << 10;

/// Writes up to this size run on the reader when the device allows it
/// (see `read_requests`); bigger ones gain from the workers' parallelism.
const INLINE_MAX: usize = 64 << 10;
// An inline payload must fit in the input buffer whole.
const _: () = assert!(INLINE_MAX <= IN_BUF);

/// Batched replies are sent once they reach this many bytes.
const OUT_FLUSH: usize = 16 << 10;

/// A request ready to run; a WRITE carries its whole payload.
struct Job {
    req: Request,
    cmd: Command,
    payload: Option<Vec<u8>>,
}

/// Why a request is answered with an error.
struct Refusal {
    errno: u32,
    message: String,
}

impl Refusal {
    fn new(errno: u32, message: impl Into<String>) -> Self {
        Refusal {
            errno,
            message: message.into(),
        }
    }
}

impl From<BlockError> for Refusal {
    fn from(e: BlockError) -> Self {
        Refusal::new(nbd_errno(e.errno()), e.to_string())
    }
}

/// What the reader and the workers of one connection share.
struct Conn<'a> {
    inner: &'a Inner,
    stream: &'a Stream,
    peer: &'a str,
    neg: Negotiated,
    size: u64,
    send_lock: Mutex<()>,
    budget: Budget,
    pool: BufPool,
    /// A reply could not be sent: the connection is being torn down.
    failed: AtomicBool,
}

/// Serves requests until the client disconnects, breaks the protocol, or the
/// server shuts the socket down. Returns after every accepted request ran.
pub(super) fn serve(inner: &Inner, stream: Stream, neg: Negotiated, peer: &str) {
    let conn = Conn {
        inner,
        stream: &stream,
        peer,
        neg,
        size: inner.dev.size(),
        send_lock: Mutex::new(()),
        budget: Budget::new(inner.opts.max_in_flight_bytes),
        pool: BufPool::new(inner.opts.workers_per_connection + 4),
        failed: AtomicBool::new(false),
    };
    let reader = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            log::warn!("nbd {peer}: {e}");
            stream.shutdown();
            return;
        }
    };
    let queue = JobQueue::new(inner.opts.queue_depth);
    std::thread::scope(|s| {
        for i in 0..inner.opts.workers_per_connection {
            let (conn, queue) = (&conn, &queue);
            let spawned = std::thread::Builder::new()
                .name(format!("nbd-worker-{i}"))
                .spawn_scoped(s, move || conn.work(queue));
            if let Err(e) = spawned {
                log::warn!("nbd {peer}: cannot start worker: {e}");
                if i == 0 {
                    stream.shutdown();
                    return;
                }
                break;
            }
        }
        conn.read_requests(reader, |job| queue.push(job));
        queue.close();
    });
    stream.shutdown();
}

impl Conn<'_> {
    fn read_requests(&self, stream: Stream, mut dispatch: impl FnMut(Job)) {
        let mut rd = InBuf::new(stream, IN_BUF);
        let mut out = Vec::with_capacity(OUT_FLUSH);
        // A write that costs about as much as a hand-off to a worker (a local
        // file: the device's hint) runs here, on the reader, and its reply is
        // batched with the next ones.
        let inline = self.inner.dev.concurrent_writes() == 0;
        self.read_loop(&mut rd, &mut out, inline, &mut dispatch);
        // Requests answered inline before DISC or a disconnect still get
        // their replies (the send fails harmlessly if the client is gone).
        self.flush(&mut out);
    }

    fn read_loop(
        &self,
        rd: &mut InBuf<Stream>,
        out: &mut Vec<u8>,
        inline: bool,
        dispatch: &mut impl FnMut(Job),
    ) {
        let peer = self.peer;
        loop {
            // Replies wait only while more requests are already here: the
            // client may be waiting for them before it sends more.
            if rd.buffered() < Request::LEN {
                self.flush(out);
            }
            match rd.fill(Request::LEN) {
                Fill::Ok => {}
                Fill::Eof => {
                    log::info!("nbd {peer}: client closed the connection");
                    return;
                }
                Fill::Err(e) => {
                    if !self.failed.load(Ordering::Relaxed) {
                        log::warn!("nbd {peer}: connection lost mid-request: {e}");
                    }
                    return;
                }
            }
            let mut raw = [0u8; Request::LEN];
            raw.copy_from_slice(rd.take(Request::LEN));
            let req = match Request::decode(&raw) {
                Ok(r) => r,
                Err(e) => {
                    log::warn!("nbd {peer}: {e}; disconnecting");
                    return;
                }
            };
            let Some(cmd) = req.command() else {
                log::warn!("nbd {peer}: unknown command {}", req.kind);
                self.send_error(&req, &Refusal::new(EINVAL, "unknown command"));
                continue;
            };
            if cmd == Command::Disc {
                log::info!("nbd {peer}: client disconnected (NBD_CMD_DISC)");
                return;
            }
            let check = self.validate(&req, cmd);
            let mut payload = None;
            if cmd == Command::Write {
                if let Err(refusal) = check {
                    // The payload still follows the header: skip it to stay
                    // in sync, apply none of it.
                    if rd.skip(req.len.into()).is_err() {
                        log::warn!("nbd {peer}: connection lost in a refused WRITE payload");
                        return;
                    }
                    self.log_refusal(&req, cmd, &refusal);
                    self.send_error(&req, &refusal);
                    continue;
                }
                let len = req.len as usize;
                let fua = req.flags & CMD_FLAG_FUA != 0;
                if inline && !fua && len <= INLINE_MAX {
                    if rd.buffered() < len {
                        self.flush(out);
                    }
                    if let Fill::Ok = rd.fill(len) {
                        self.write_inline(&req, rd.take(len), out);
                        continue;
                    }
                    log::warn!(
                        "nbd {peer}: connection lost inside a WRITE payload ({} bytes at {}); \
                         nothing of it written",
                        req.len,
                        req.offset
                    );
                    return;
                }
                self.budget.acquire(len as u64);
                let mut buf = self.pool.get(len);
                if let Err(e) = rd.read_exact(&mut buf[..len]) {
                    log::warn!(
                        "nbd {peer}: connection lost inside a WRITE payload ({} bytes at {}): \
                         {e}; nothing of it written",
                        req.len,
                        req.offset
                    );
                    self.budget.release(len as u64);
                    return;
                }
                payload = Some(buf);
            } else if let Err(refusal) = check {
                self.log_refusal(&req, cmd, &refusal);
                self.send_error(&req, &refusal);
                continue;
            } else if cmd == Command::Read {
                self.budget.acquire(req.len.into());
            }
            // The reader may block on a full queue: nothing answered waits.
            self.flush(out);
            dispatch(Job { req, cmd, payload });
        }
    }

    /// Runs a small write on the reader; a success reply joins `out`.
    fn write_inline(&self, req: &Request, data: &mut [u8], out: &mut Vec<u8>) {
        match self
            .inner
            .dev
            .write_vectored(req.offset, &[VolatileSlice::from(data)])
        {
            Ok(()) => {
                let reply = SimpleReply {
                    error: 0,
                    cookie: req.cookie,
                };
                out.extend_from_slice(&reply.encode());
                if out.len() >= OUT_FLUSH {
                    self.flush(out);
                }
            }
            Err(e) => {
                let refusal = Refusal::from(e);
                self.log_refusal(req, Command::Write, &refusal);
                self.send_error(req, &refusal);
            }
        }
    }

    /// Sends the batched replies, if any.
    fn flush(&self, out: &mut Vec<u8>) {
        if !out.is_empty() {
            self.send(&[out]);
            out.clear();
        }
    }

    fn log_refusal(&self, req: &Request, cmd: Command, r: &Refusal) {
        log::warn!(
            "nbd {}: {} {}+{} (flags {:#x}) refused: {} ({})",
            self.peer,
            cmd.name(),
            req.offset,
            req.len,
            req.flags,
            r.message,
            errno_name(r.errno)
        );
    }

    /// Checks flags, sizes, range and writability before anything runs.
    fn validate(&self, req: &Request, cmd: Command) -> Result<(), Refusal> {
        let allowed = CMD_FLAG_FUA
            | match cmd {
                Command::Read if self.neg.structured => CMD_FLAG_DF,
                Command::WriteZeroes => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                Command::BlockStatus => CMD_FLAG_REQ_ONE,
                _ => 0,
            };
        if req.flags & !allowed != 0 {
            return Err(Refusal::new(
                EINVAL,
                format!("flags {:#x} not valid for {}", req.flags, cmd.name()),
            ));
        }
        let writes = matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes);
        match cmd {
            Command::Read if req.len > MAX_PAYLOAD => {
                return Err(Refusal::new(EOVERFLOW, "read larger than 32 MiB"))
            }
            Command::Write if req.len > MAX_PAYLOAD => {
                return Err(Refusal::new(EINVAL, "write larger than 32 MiB"))
            }
            Command::BlockStatus if !self.neg.base_allocation => {
                return Err(Refusal::new(EINVAL, "no metadata context selected"))
            }
            Command::BlockStatus if req.len == 0 => {
                return Err(Refusal::new(EINVAL, "empty block status range"))
            }
            _ => {}
        }
        if writes && self.inner.dev.read_only() {
            return Err(Refusal::new(EPERM, "export is read-only"));
        }
        if cmd != Command::Flush {
            let inside = req
                .offset
                .checked_add(req.len.into())
                .is_some_and(|end| end <= self.size);
            if !inside {
                let errno = if matches!(cmd, Command::Write | Command::WriteZeroes) {
                    ENOSPC
                } else {
                    EINVAL
                };
                return Err(Refusal::new(errno, "request beyond the end of the export"));
            }
        }
        Ok(())
    }

    fn work(&self, queue: &JobQueue<Job>) {
        while let Some(job) = queue.pop() {
            self.run(job);
        }
    }

    fn run(&self, job: Job) {
        let Job { req, cmd, payload } = job;
        let dev = &self.inner.dev;
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let then_flush = |r: Result<(), BlockError>| match r {
            Ok(()) if fua => dev.flush(),
            other => other,
        };
        let result: Result<(), Refusal> = match cmd {
            Command::Read => {
                let len = req.len as usize;
                let mut buf = self.pool.get(len);
                let r = dev.read_vectored(req.offset, &[VolatileSlice::from(&mut buf[..len])]);
                let out = r
                    .map(|()| self.send_read(&req, &buf[..len]))
                    .map_err(Refusal::from);
                self.pool.put(buf);
                self.budget.release(len as u64);
                out
            }
            Command::Write => {
                let mut buf = payload.unwrap_or_default();
                let len = (req.len as usize).min(buf.len());
                let r = dev.write_vectored(req.offset, &[VolatileSlice::from(&mut buf[..len])]);
                self.pool.put(buf);
                self.budget.release(req.len.into());
                then_flush(r)
                    .map_err(Refusal::from)
                    .map(|()| self.send_ok(&req))
            }
            Command::Flush => dev
                .flush()
                .map_err(Refusal::from)
                .map(|()| self.send_ok(&req)),
            Command::Trim => {
                let r = if req.len == 0 {
                    Ok(())
                } else {
                    dev.discard(req.offset, req.len.into())
                };
                then_flush(r)
                    .map_err(Refusal::from)
                    .map(|()| self.send_ok(&req))
            }
            Command::WriteZeroes if req.flags & CMD_FLAG_FAST_ZERO != 0 => {
                // A node cannot tell in advance whether its write-zeroes beats a
                // write (copy-before-write on a secondary never does): refuse
                // fast, as the protocol allows, and let the client write zeroes.
                Err(Refusal::new(ENOTSUP, "fast zero not available"))
            }
            Command::WriteZeroes => {
                let unmap = req.flags & CMD_FLAG_NO_HOLE == 0;
                let r = if req.len == 0 {
                    Ok(())
                } else {
                    dev.write_zeroes(req.offset, req.len.into(), unmap)
                };
                then_flush(r)
                    .map_err(Refusal::from)
                    .map(|()| self.send_ok(&req))
            }
            // The device has no cache to warm; the range was validated.
            Command::Cache => {
                self.send_ok(&req);
                Ok(())
            }
            Command::BlockStatus => self.block_status(&req),
            Command::Disc => Ok(()),
        };
        if let Err(refusal) = result {
            if refusal.errno != ENOTSUP {
                self.log_refusal(&req, cmd, &refusal);
            }
            self.send_error(&req, &refusal);
        }
    }

    fn block_status(&self, req: &Request) -> Result<(), Refusal> {
        let end = req.offset + u64::from(req.len);
        let one = req.flags & CMD_FLAG_REQ_ONE != 0;
        let mut extents: Vec<(u32, u32)> = Vec::new();
        let mut pos = req.offset;
        while pos < end && extents.len() < MAX_EXTENTS {
            let e = match self.inner.dev.block_status(pos, end - pos) {
                Ok(e) if e.len > 0 => e,
                Ok(_) => break,
                Err(e) if extents.is_empty() => return Err(e.into()),
                // Part of the range is known: report it, the client asks again.
                Err(_) => break,
            };
            let len = e.len.min(end - pos);
            let flags = match e.kind {
                ExtentKind::Data => 0,
                ExtentKind::Zero => STATE_ZERO,
                ExtentKind::Hole => STATE_HOLE | STATE_ZERO,
            };
            match extents.last_mut() {
                Some((l, f)) if *f == flags => *l += len as u32,
                _ => extents.push((len as u32, flags)),
            }
            pos += len;
            if one {
                break;
            }
        }
        if extents.is_empty() {
            return Err(Refusal::new(EIO, "device reported no extent"));
        }
        let chunk = BlockStatusChunk {
            context: BASE_ALLOCATION_ID,
            extents,
        };
        let msg = encode_chunk(
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            req.cookie,
            &chunk.encode(),
        );
        self.send(&[&msg]);
        Ok(())
    }

    fn send_ok(&self, req: &Request) {
        let reply = SimpleReply {
            error: 0,
            cookie: req.cookie,
        };
        self.send(&[&reply.encode()]);
    }

    fn send_read(&self, req: &Request, data: &[u8]) {
        if !self.neg.structured {
            let reply = SimpleReply {
                error: 0,
                cookie: req.cookie,
            };
            self.send(&[&reply.encode(), data]);
        } else if data.is_empty() {
            let msg = encode_chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, req.cookie, &[]);
            self.send(&[&msg]);
        } else {
            // The data is already read: no error can follow, so this one chunk
            // is also the last.
            let head = ChunkHeader::offset_data(
                req.cookie,
                REPLY_FLAG_DONE,
                req.offset,
                data.len() as u32,
            );
            self.send(&[&head, data]);
        }
    }

    fn send_error(&self, req: &Request, r: &Refusal) {
        if self.neg.structured {
            let chunk = ErrorChunk {
                error: r.errno,
                message: r.message.clone(),
                offset: None,
            };
            let msg = encode_chunk(REPLY_FLAG_DONE, chunk.kind(), req.cookie, &chunk.encode());
            self.send(&[&msg]);
        } else {
            let reply = SimpleReply {
                error: r.errno,
                cookie: req.cookie,
            };
            self.send(&[&reply.encode()]);
        }
    }

    /// Sends one whole reply; replies of different requests never interleave.
    fn send(&self, parts: &[&[u8]]) {
        if self.failed.load(Ordering::Relaxed) {
            return;
        }
        let sent = {
            let _guard = lock(&self.send_lock);
            self.stream.send_all(parts)
        };
        if let Err(e) = sent {
            if !self.failed.swap(true, Ordering::Relaxed) {
                log::warn!("nbd {}: cannot send reply: {e}; closing", self.peer);
            }
            self.stream.shutdown();
        }
    }
}
