//! Transmission phase of one connection: a reader that parses requests (and
//! receives WRITE payloads whole before anything is applied) and a pool of
//! workers that run them against the device and send the replies.
//!
//! Memory: every WRITE payload byte is reserved in the connection's and the
//! server's budget before it is received, and its buffer grows as the payload
//! arrives. A READ is read and sent in pieces of at most `READ_PIECE` by the
//! worker running it, so a connection holds at most one piece per worker for
//! its reads (queued READs hold nothing), however many replies its client
//! leaves unread: reads never wait for a budget another client could pin.

use super::handshake::{Negotiated, BASE_ALLOCATION_ID};
use super::inbuf::{Fill, InBuf};
use super::pool::{Budget, JobQueue};
use super::watch::Activity;
use super::Inner;
use crate::block::{BlockError, ExtentKind};
use crate::nbd::stream::Stream;
use crate::nbd::wire::transmission::{encode_chunk, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_NONE};
use crate::nbd::wire::*;
use crate::nbd::MAX_PAYLOAD;
use crate::sync::MutexExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;
use vm_memory::VolatileSlice;

/// At most this many descriptors in one block status reply.
const MAX_EXTENTS: usize = 1024;

/// The most workers per connection a device's `concurrent_writes` hint asks for.
const MAX_DEVICE_WORKERS: usize = 32;

/// The reader's input buffer: room for a queue of small requests at once.
const IN_BUF: usize = 256 << 10;

/// Writes up to this size run on the reader when the device allows it
/// (see `read_requests`); bigger ones gain from the workers' parallelism.
const INLINE_MAX: usize = 64 << 10;
// An inline payload must fit in the input buffer whole.
const _: () = assert!(INLINE_MAX <= IN_BUF);

/// Batched replies are sent once they reach this many bytes.
const OUT_FLUSH: usize = 16 << 10;

/// WRITE buffers grow by this much as their payload arrives.
const PIECE: usize = 1 << 20;

/// READ replies bigger than this are read and sent piece by piece.
const READ_PIECE: usize = 256 << 10;

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
    /// Payload bytes in flight on this connection (the server's own budget,
    /// `Inner::memory`, is taken too).
    budget: Budget,
    activity: &'a Activity,
    /// A reply could not be sent: the connection is being torn down.
    failed: AtomicBool,
    /// The client went away without NBD_CMD_DISC: queued requests are dropped.
    departed: AtomicBool,
    /// Requests dropped because the client had gone.
    dropped: AtomicU64,
}

/// Serves requests until the client disconnects, breaks the protocol, or the
/// server shuts the socket down. Returns after every accepted request ran, or
/// was dropped because the client had gone.
pub(super) fn serve(
    inner: &Inner,
    stream: Stream,
    neg: Negotiated,
    peer: &str,
    activity: &Activity,
) {
    // A client that accepts no reply bytes for this long is gone or hostile;
    // the failed send closes the connection and frees what it pinned.
    if let Err(e) = stream.set_write_timeout(Some(inner.opts.idle_timeout)) {
        log::warn!("nbd {peer}: {e}");
        stream.shutdown();
        return;
    }
    let conn = Conn {
        inner,
        stream: &stream,
        peer,
        neg,
        size: inner.dev.size(),
        send_lock: Mutex::new(()),
        budget: Budget::new(inner.opts.max_in_flight_bytes),
        activity,
        failed: AtomicBool::new(false),
        departed: AtomicBool::new(false),
        dropped: AtomicU64::new(0),
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
    // A device whose writes wait on storage (the hint) gets that many running
    // at once, so a connection's queue depth reaches it.
    let workers = inner
        .opts
        .workers_per_connection
        .max(inner.dev.concurrent_writes().min(MAX_DEVICE_WORKERS));
    std::thread::scope(|s| {
        for i in 0..workers {
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
    let dropped = conn.dropped.load(Ordering::Relaxed);
    if dropped > 0 {
        log::warn!("nbd {peer}: dropped {dropped} queued requests of a client that went away");
    }
}

/// How the reader stopped.
enum End {
    /// NBD_CMD_DISC, or the server closed the connection: finish the queue.
    Polite,
    /// The client went away or broke the protocol.
    Gone,
}

impl Conn<'_> {
    fn read_requests(&self, stream: Stream, mut dispatch: impl FnMut(Job)) {
        let mut rd = InBuf::new(stream, IN_BUF);
        let mut out = Vec::with_capacity(OUT_FLUSH);
        // A write that costs about as much as a hand-off to a worker (a local
        // file: the device's hint) runs here, on the reader, and its reply is
        // batched with the next ones.
        let inline = self.inner.dev.concurrent_writes() == 0;
        if let End::Gone = self.read_loop(&mut rd, &mut out, inline, &mut dispatch) {
            // Nobody is left to take the replies of what is still queued. A
            // half-closed socket (the peer still reading) is not gone.
            if self.stream.peer_gone() {
                self.departed.store(true, Ordering::Relaxed);
            }
        }
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
    ) -> End {
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
                    return End::Gone;
                }
                Fill::Err(e) => {
                    if self.activity.is_doomed() {
                        return End::Polite;
                    }
                    if !self.failed.load(Ordering::Relaxed) {
                        log::warn!("nbd {peer}: connection lost mid-request: {e}");
                    }
                    return End::Gone;
                }
            }
            let mut raw = [0u8; Request::LEN];
            raw.copy_from_slice(rd.take(Request::LEN));
            let req = match Request::decode(&raw) {
                Ok(r) => r,
                Err(e) => {
                    log::warn!("nbd {peer}: {e}; disconnecting");
                    return End::Gone;
                }
            };
            self.activity.touch();
            let Some(cmd) = req.command() else {
                log::warn!("nbd {peer}: unknown command {}", req.kind);
                self.send_error(&req, &Refusal::new(EINVAL, "unknown command"));
                continue;
            };
            if cmd == Command::Disc {
                log::info!("nbd {peer}: client disconnected (NBD_CMD_DISC)");
                return End::Polite;
            }
            let check = self.validate(&req, cmd);
            let mut payload = None;
            if cmd == Command::Write {
                if let Err(refusal) = check {
                    // The payload still follows the header: skip it to stay
                    // in sync, apply none of it.
                    if rd.skip(req.len.into()).is_err() {
                        log::warn!("nbd {peer}: connection lost in a refused WRITE payload");
                        return End::Gone;
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
                        self.activity.begin();
                        self.write_inline(&req, rd.take(len), out);
                        self.activity.end();
                        continue;
                    }
                    log::warn!(
                        "nbd {peer}: connection lost inside a WRITE payload ({} bytes at {}); \
                         nothing of it written",
                        req.len,
                        req.offset
                    );
                    return End::Gone;
                }
                // The reservation may wait for other requests to finish:
                // send what is answered first.
                self.flush(out);
                self.reserve(len);
                match self.receive_payload(rd, len) {
                    Ok(buf) => payload = Some(buf),
                    Err(e) => {
                        log::warn!(
                            "nbd {peer}: connection lost inside a WRITE payload ({} bytes at \
                             {}): {e}; nothing of it written",
                            req.len,
                            req.offset
                        );
                        self.unreserve(len);
                        return End::Gone;
                    }
                }
            } else if let Err(refusal) = check {
                self.log_refusal(&req, cmd, &refusal);
                self.send_error(&req, &refusal);
                continue;
            }
            // The reader may block on a full queue: nothing answered waits.
            self.flush(out);
            self.activity.begin();
            dispatch(Job { req, cmd, payload });
        }
    }

    /// Takes `n` payload bytes from this connection's budget and the server's.
    fn reserve(&self, n: usize) {
        self.budget.acquire(n as u64);
        self.inner.memory.acquire(n as u64);
    }

    fn unreserve(&self, n: usize) {
        self.inner.memory.release(n as u64);
        self.budget.release(n as u64);
    }

    /// Receives a WRITE payload into a buffer that grows as bytes arrive,
    /// within the idle limit for the whole payload (a client trickling it
    /// cannot hold its reservation longer).
    fn receive_payload(&self, rd: &mut InBuf<Stream>, len: usize) -> std::io::Result<Vec<u8>> {
        let deadline = Instant::now() + self.inner.opts.idle_timeout;
        let mut timed = false;
        let mut buf = self.inner.bufs.take();
        let got = rd.read_growing(&mut buf, len, PIECE, || {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "payload not complete after {:?}",
                        self.inner.opts.idle_timeout
                    ),
                ));
            }
            timed = true;
            self.stream.set_read_timeout(Some(left))
        });
        // Between requests the reader waits as long as the client likes.
        let reset = if timed {
            self.stream.set_read_timeout(None)
        } else {
            Ok(())
        };
        match got.and(reset) {
            Ok(()) => Ok(buf),
            Err(e) => {
                self.inner.bufs.put(buf);
                Err(e)
            }
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
            if self.departed.load(Ordering::Relaxed) || self.failed.load(Ordering::Relaxed) {
                self.discard(job);
            } else {
                self.run(job);
            }
            self.activity.end();
        }
    }

    /// Releases what a request holds without running it: its client is gone.
    fn discard(&self, job: Job) {
        // Only a WRITE holds memory while queued (its payload).
        if job.cmd == Command::Write {
            self.inner.bufs.put(job.payload.unwrap_or_default());
            self.unreserve(job.req.len as usize);
        }
        self.dropped.fetch_add(1, Ordering::Relaxed);
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
                let piece = (req.len as usize).min(READ_PIECE);
                let mut buf = self.inner.bufs.get(piece);
                let out = self.read(&req, &mut buf[..piece]);
                self.inner.bufs.put(buf);
                out
            }
            Command::Write => {
                let mut buf = payload.unwrap_or_default();
                let len = (req.len as usize).min(buf.len());
                let r = dev.write_vectored(req.offset, &[VolatileSlice::from(&mut buf[..len])]);
                self.inner.bufs.put(buf);
                self.unreserve(req.len as usize);
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

    /// Answers a READ through `buf` (one piece). A read that fits is read
    /// whole, then sent; a bigger one sends its first piece only once it was
    /// read (so an error still gets an error reply) and the rest piece by
    /// piece, holding the send lock.
    fn read(&self, req: &Request, buf: &mut [u8]) -> Result<(), Refusal> {
        let dev = &self.inner.dev;
        let len = req.len as usize;
        dev.read_vectored(req.offset, &[VolatileSlice::from(&mut *buf)])?;
        if buf.len() >= len {
            self.send_read(req, &buf[..len]);
            return Ok(());
        }
        let head = if self.neg.structured {
            ChunkHeader::offset_data(req.cookie, REPLY_FLAG_DONE, req.offset, req.len).to_vec()
        } else {
            SimpleReply {
                error: 0,
                cookie: req.cookie,
            }
            .encode()
            .to_vec()
        };
        let guard = self.send_lock.lock_or_recover();
        if !self.send_locked(&guard, &[&head, buf]) {
            return Ok(());
        }
        let mut pos = buf.len();
        while pos < len {
            let n = (len - pos).min(buf.len());
            let at = req.offset + pos as u64;
            if let Err(e) = dev.read_vectored(at, &[VolatileSlice::from(&mut buf[..n])]) {
                // Part of the data is on the wire: no error reply can follow
                // it (NBD requires a disconnect here).
                log::warn!(
                    "nbd {}: READ {}+{} failed at {at} after its reply began: {e}; closing",
                    self.peer,
                    req.offset,
                    req.len
                );
                self.failed.store(true, Ordering::Relaxed);
                self.stream.shutdown();
                return Ok(());
            }
            if !self.send_locked(&guard, &[&buf[..n]]) {
                return Ok(());
            }
            pos += n;
        }
        Ok(())
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
        let guard = self.send_lock.lock_or_recover();
        self.send_locked(&guard, parts);
    }

    /// Sends with the send lock held; false once the connection failed.
    fn send_locked(&self, _guard: &MutexGuard<'_, ()>, parts: &[&[u8]]) -> bool {
        if self.failed.load(Ordering::Relaxed) {
            return false;
        }
        match self.stream.send_all(parts) {
            Ok(()) => true,
            Err(e) => {
                if !self.failed.swap(true, Ordering::Relaxed) {
                    log::warn!("nbd {}: cannot send reply: {e}; closing", self.peer);
                }
                self.stream.shutdown();
                false
            }
        }
    }
}
