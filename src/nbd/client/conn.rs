//! One live client connection: callers send requests under a send lock and
//! wait; one reader thread matches replies to requests by cookie and wakes the
//! caller. A broken connection fails every pending and every later request.

use super::handshake::ExportInfo;
use crate::block::channel::Doorbell;
use crate::nbd::stream::Stream;
use crate::nbd::wire::transmission::{
    decode_offset_data_len, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_FLAG_ERROR, REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE,
};
use crate::nbd::wire::*;
use crate::nbd::{NbdError, Violation};
use crate::sync::{CondvarExt, MutexExt};
use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_memory::VolatileSlice;

/// Error chunks and block status payloads larger than this break the connection.
const MAX_META_PAYLOAD: u32 = 1 << 20;

/// Why a request did not succeed.
#[derive(Debug, Clone)]
pub(super) enum Failure {
    /// The server answered with an NBD error.
    Nbd {
        /// NBD error value.
        errno: u32,
        /// The server's message (structured replies only).
        message: String,
    },
    /// The connection is gone; the text says why.
    Broken(String),
}

/// A successful reply.
#[derive(Debug, Default)]
pub(super) struct Reply {
    /// READ data.
    pub data: Vec<u8>,
    /// BLOCK_STATUS: the first extent of our context, `(length, flags)`.
    pub extent: Option<(u32, u32)>,
}

type Outcome = Result<Reply, Failure>;

/// Where a caller waits for its reply, or (with a doorbell) learns that it
/// arrived without waiting.
pub(super) struct Ticket {
    slot: Mutex<Option<Outcome>>,
    cv: Condvar,
    done: AtomicBool,
    bell: Option<Arc<Doorbell>>,
}

impl Ticket {
    fn new(bell: Option<&Arc<Doorbell>>) -> Arc<Ticket> {
        Arc::new(Ticket {
            slot: Mutex::new(None),
            cv: Condvar::new(),
            done: AtomicBool::new(false),
            bell: bell.cloned(),
        })
    }

    fn complete(&self, outcome: Outcome) {
        *self.slot.lock_or_recover() = Some(outcome);
        self.done.store(true, Ordering::Release);
        self.cv.notify_one();
        if let Some(b) = &self.bell {
            b.ring();
        }
    }

    /// True once the outcome is in: [`Conn::wait`] then returns at once.
    pub(super) fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Blocks until the reply (or the connection's failure) arrives, or
    /// until `deadline` passes (then `None`).
    fn wait_until(&self, deadline: Option<Instant>) -> Option<Outcome> {
        let mut slot = self.slot.lock_or_recover();
        loop {
            if let Some(o) = slot.take() {
                return Some(o);
            }
            slot = match deadline {
                None => self.cv.wait_or_recover(slot),
                Some(d) => {
                    let left = d.checked_duration_since(Instant::now())?;
                    self.cv.wait_timeout_or_recover(slot, left).0
                }
            };
        }
    }
}

struct Pending {
    cmd: Command,
    offset: u64,
    len: u32,
    data: Vec<u8>,
    covered: u64,
    extent: Option<(u32, u32)>,
    error: Option<(u32, String)>,
    ticket: Arc<Ticket>,
    /// When it was sent, for the request timeout.
    sent: Instant,
}

struct State {
    pending: HashMap<u64, Pending>,
    /// Requests sent and not completed (includes one the reader holds).
    in_flight: usize,
    next_cookie: u64,
    broken: Option<String>,
    /// Senders blocked on a full window (a notify costs a syscall even with
    /// nobody waiting: only then is one sent).
    window_waiters: usize,
}

struct Shared {
    stream: Stream,
    send_lock: Mutex<()>,
    state: Mutex<State>,
    window: Condvar,
    max_in_flight: usize,
    request_timeout: Option<Duration>,
    info: ExportInfo,
    closing: AtomicBool,
    peer: String,
}

/// A negotiated connection with its reply reader.
pub(super) struct Conn {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
}

impl Conn {
    /// Starts the reply reader on a negotiated stream.
    pub(super) fn start(
        stream: Stream,
        info: ExportInfo,
        max_in_flight: usize,
        request_timeout: Option<Duration>,
        peer: String,
    ) -> Result<Conn, NbdError> {
        let rd = stream.try_clone()?;
        let shared = Arc::new(Shared {
            stream,
            send_lock: Mutex::new(()),
            state: Mutex::new(State {
                pending: HashMap::new(),
                in_flight: 0,
                next_cookie: 1,
                broken: None,
                window_waiters: 0,
            }),
            window: Condvar::new(),
            max_in_flight: max_in_flight.max(1),
            request_timeout,
            info,
            closing: AtomicBool::new(false),
            peer,
        });
        let reader = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("nbd-client-rx".into())
                .spawn(move || shared.read_replies(rd))?
        };
        if let Some(limit) = request_timeout {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("nbd-client-watch".into())
                .spawn(move || shared.watch(limit))?;
        }
        Ok(Conn {
            shared,
            reader: Some(reader),
        })
    }

    /// Waits for the reply of `ticket`. A request that outlives the request
    /// timeout breaks the whole connection: the server is presumed hung.
    pub(super) fn wait(&self, ticket: &Ticket) -> Outcome {
        let deadline = self.shared.request_timeout.map(|t| Instant::now() + t);
        if let Some(o) = ticket.wait_until(deadline) {
            return o;
        }
        let why = format!(
            "no reply within {:?}",
            self.shared.request_timeout.unwrap_or_default()
        );
        self.shared.fail(why.clone());
        // fail() completed the ticket (it was pending) unless the reply won
        // the race; either way it is complete now.
        ticket.wait_until(None).unwrap_or(Err(Failure::Broken(why)))
    }

    /// What was negotiated.
    pub(super) fn info(&self) -> &ExportInfo {
        &self.shared.info
    }

    /// Why the connection is unusable, if it is.
    pub(super) fn broken(&self) -> Option<String> {
        self.shared.state.lock_or_recover().broken.clone()
    }

    /// Sends one request (with `payload` for a WRITE) and returns where to wait
    /// for its reply. Blocks while the in-flight window is full.
    pub(super) fn send(
        &self,
        cmd: Command,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[VolatileSlice<'_>],
    ) -> Result<Arc<Ticket>, Failure> {
        self.send_waking(cmd, flags, offset, len, payload, None)
    }

    /// [`Conn::send`], ringing `bell` once the reply (or the connection's
    /// failure) is in. Blocks only while the in-flight window is full; the
    /// reply reader frees it, never the caller.
    pub(super) fn send_waking(
        &self,
        cmd: Command,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[VolatileSlice<'_>],
        bell: Option<&Arc<Doorbell>>,
    ) -> Result<Arc<Ticket>, Failure> {
        let sh = &*self.shared;
        let ticket = Ticket::new(bell);
        let data = if cmd == Command::Read {
            vec![0u8; len as usize]
        } else {
            Vec::new()
        };
        let cookie = {
            let mut st = sh.state.lock_or_recover();
            loop {
                if let Some(why) = &st.broken {
                    return Err(Failure::Broken(why.clone()));
                }
                if st.in_flight < sh.max_in_flight {
                    break;
                }
                st.window_waiters += 1;
                st = sh.window.wait_or_recover(st);
                st.window_waiters -= 1;
            }
            let cookie = st.next_cookie;
            st.next_cookie = st.next_cookie.wrapping_add(1);
            st.in_flight += 1;
            st.pending.insert(
                cookie,
                Pending {
                    cmd,
                    offset,
                    len,
                    data,
                    covered: 0,
                    extent: None,
                    error: None,
                    ticket: ticket.clone(),
                    sent: Instant::now(),
                },
            );
            cookie
        };
        let header = Request::new(cmd, flags, cookie, offset, len).encode();
        let sent = {
            let _g = sh.send_lock.lock_or_recover();
            sh.stream.send_volatile(&header, payload)
        };
        if let Err(e) = sent {
            // Fails this request too: it is in the pending table.
            sh.fail(format!("cannot send {}: {e}", cmd.name()));
        }
        Ok(ticket)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let sh = &*self.shared;
        sh.closing.store(true, Ordering::SeqCst);
        let idle = {
            let st = sh.state.lock_or_recover();
            st.broken.is_none() && st.in_flight == 0
        };
        if idle {
            // A polite goodbye; the server may already be gone.
            let disc = Request::new(Command::Disc, 0, 0, 0, 0);
            let _g = sh.send_lock.lock_or_recover();
            let _ = sh.stream.send_all(&[&disc.encode()]);
        }
        sh.fail("connection closed by the client".into());
        if let Some(t) = self.reader.take() {
            if t.join().is_err() {
                log::error!("nbd client {}: reply reader panicked", sh.peer);
            }
        }
    }
}

impl Shared {
    /// Marks the connection broken, fails every pending request, wakes every
    /// waiter and shuts the socket so the reader stops.
    fn fail(&self, why: String) {
        let drained: Vec<Pending> = {
            let mut st = self.state.lock_or_recover();
            if st.broken.is_none() {
                if !self.closing.load(Ordering::SeqCst) {
                    log::warn!("nbd client {}: connection lost: {why}", self.peer);
                }
                st.broken = Some(why);
            }
            st.in_flight = st.in_flight.saturating_sub(st.pending.len());
            st.pending.drain().map(|(_, p)| p).collect()
        };
        self.window.notify_all();
        self.stream.shutdown();
        let why = self
            .state
            .lock_or_recover()
            .broken
            .clone()
            .unwrap_or_default();
        for p in drained {
            p.ticket.complete(Err(Failure::Broken(why.clone())));
        }
    }

    /// Breaks the connection when a request outlives `limit`. Callers that
    /// wait ([`Conn::wait`]) check it themselves; this also covers requests
    /// whose caller does not wait but is rung by a doorbell. Ends once the
    /// connection is broken or closed.
    fn watch(&self, limit: Duration) {
        let step = (limit / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        loop {
            std::thread::sleep(step);
            let oldest = {
                let st = self.state.lock_or_recover();
                if st.broken.is_some() || self.closing.load(Ordering::SeqCst) {
                    return;
                }
                st.pending.values().map(|p| p.sent).min()
            };
            if oldest.is_some_and(|t| t.elapsed() > limit) {
                self.fail(format!("no reply within {limit:?}"));
                return;
            }
        }
    }

    fn read_replies(&self, stream: Stream) {
        let mut rd = BufReader::with_capacity(256 << 10, stream);
        let mut holding: Option<Pending> = None;
        let err = loop {
            if let Err(e) = self.read_one(&mut rd, &mut holding) {
                break e;
            }
        };
        // The request being received when the stream broke fails with the rest.
        if let Some(p) = holding.take() {
            let mut st = self.state.lock_or_recover();
            st.in_flight = st.in_flight.saturating_sub(1);
            drop(st);
            self.window.notify_one();
            p.ticket
                .complete(Err(Failure::Broken(format!("connection lost: {err}"))));
        }
        self.fail(err.to_string());
    }

    /// Takes the pending request `cookie` out of the table while its reply is
    /// read, so the socket is never read with the table locked.
    fn take(&self, cookie: u64) -> Result<Pending, NbdError> {
        self.state
            .lock_or_recover()
            .pending
            .remove(&cookie)
            .ok_or(NbdError::Protocol(Violation::UnknownCookie(cookie)))
    }

    fn finish(&self, p: Pending, outcome: Outcome) {
        let wake = {
            let mut st = self.state.lock_or_recover();
            st.in_flight = st.in_flight.saturating_sub(1);
            st.window_waiters > 0
        };
        if wake {
            self.window.notify_one();
        }
        p.ticket.complete(outcome);
    }

    fn read_one(&self, rd: &mut impl Read, holding: &mut Option<Pending>) -> Result<(), NbdError> {
        let mut magic = [0u8; 4];
        rd.read_exact(&mut magic)?;
        let kind = ReplyKind::from_magic(u32::from_be_bytes(magic))?;
        let mut header = [0u8; ChunkHeader::LEN];
        header[..4].copy_from_slice(&magic);
        rd.read_exact(&mut header[4..kind.header_len()])?;
        match kind {
            ReplyKind::Simple => {
                let r = SimpleReply::decode(&header[..SimpleReply::LEN])?;
                let mut p = self.take(r.cookie)?;
                if r.error == 0 && p.cmd == Command::Read {
                    if let Err(e) = rd.read_exact(&mut p.data) {
                        *holding = Some(p);
                        return Err(e.into());
                    }
                }
                let outcome = if r.error != 0 {
                    Err(Failure::Nbd {
                        errno: r.error,
                        message: String::new(),
                    })
                } else {
                    Ok(Reply {
                        data: std::mem::take(&mut p.data),
                        extent: None,
                    })
                };
                self.finish(p, outcome);
            }
            ReplyKind::Structured => {
                let h = ChunkHeader::decode(&header)?;
                let mut p = self.take(h.cookie)?;
                if let Err(e) = self.read_chunk(rd, &h, &mut p) {
                    *holding = Some(p);
                    return Err(e);
                }
                if h.flags & REPLY_FLAG_DONE == 0 {
                    self.state.lock_or_recover().pending.insert(h.cookie, p);
                    return Ok(());
                }
                let outcome = match p.error.take() {
                    Some((errno, message)) => Err(Failure::Nbd { errno, message }),
                    None if p.cmd == Command::Read && p.covered != u64::from(p.len) => {
                        Err(Failure::Nbd {
                            errno: EIO,
                            message: "server sent an incomplete read".into(),
                        })
                    }
                    None => Ok(Reply {
                        data: std::mem::take(&mut p.data),
                        extent: p.extent,
                    }),
                };
                self.finish(p, outcome);
            }
        }
        Ok(())
    }

    fn read_chunk(
        &self,
        rd: &mut impl Read,
        h: &ChunkHeader,
        p: &mut Pending,
    ) -> Result<(), NbdError> {
        let end = p.offset + u64::from(p.len);
        let in_request =
            |off: u64, len: u64| off >= p.offset && off.checked_add(len).is_some_and(|e| e <= end);
        match h.kind {
            REPLY_TYPE_NONE if h.len == 0 => Ok(()),
            REPLY_TYPE_OFFSET_DATA if p.cmd == Command::Read => {
                let n = decode_offset_data_len(h.len)?;
                let mut off = [0u8; 8];
                rd.read_exact(&mut off)?;
                let off = u64::from_be_bytes(off);
                if !in_request(off, n.into()) {
                    return Err(NbdError::Protocol(Violation::ChunkOutside {
                        kind: "data",
                        offset: off,
                        len: n,
                    }));
                }
                let at = (off - p.offset) as usize;
                rd.read_exact(&mut p.data[at..at + n as usize])?;
                p.covered += u64::from(n);
                Ok(())
            }
            REPLY_TYPE_OFFSET_HOLE if p.cmd == Command::Read && h.len == OffsetHole::LEN as u32 => {
                let mut raw = [0u8; OffsetHole::LEN];
                rd.read_exact(&mut raw)?;
                let hole = OffsetHole::decode(&raw)?;
                if !in_request(hole.offset, hole.len.into()) {
                    return Err(NbdError::Protocol(Violation::ChunkOutside {
                        kind: "hole",
                        offset: hole.offset,
                        len: hole.len,
                    }));
                }
                let at = (hole.offset - p.offset) as usize;
                p.data[at..at + hole.len as usize].fill(0);
                p.covered += u64::from(hole.len);
                Ok(())
            }
            REPLY_TYPE_BLOCK_STATUS
                if p.cmd == Command::BlockStatus && h.len <= MAX_META_PAYLOAD =>
            {
                let mut raw = vec![0u8; h.len as usize];
                rd.read_exact(&mut raw)?;
                let chunk = BlockStatusChunk::decode(&raw)?;
                if Some(chunk.context) == self.info.base_allocation {
                    p.extent = chunk.extents.first().copied();
                }
                Ok(())
            }
            k if k & REPLY_TYPE_FLAG_ERROR != 0 && h.len <= MAX_META_PAYLOAD => {
                let mut raw = vec![0u8; h.len as usize];
                rd.read_exact(&mut raw)?;
                let e = ErrorChunk::decode(k, &raw)?;
                let errno = if e.error == 0 { EIO } else { e.error };
                p.error.get_or_insert((errno, e.message));
                Ok(())
            }
            k => Err(NbdError::Protocol(Violation::UnexpectedChunk {
                kind: k,
                len: h.len,
                command: p.cmd.name(),
            })),
        }
    }
}
