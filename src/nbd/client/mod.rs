//! The NBD client: a [`BlockDev`] whose storage is an NBD export.
//!
//! Built for the primary's forwarding path: many queue worker threads call
//! [`BlockDev::write_vectored`] concurrently and their requests are pipelined
//! on one connection (up to [`ClientOptions::max_in_flight`] at once), matched
//! to replies by cookie. Writes go from the caller's buffers (guest memory)
//! straight to the socket; read data comes through one bounce buffer.
//!
//! # Reconnect policy
//!
//! There is none inside the client, on purpose: when the connection breaks
//! (socket error, server gone, protocol violation) every pending request and
//! every later one fails with [`BlockError::Io`] (`NotConnected`). Nothing is
//! retried silently, because a write that may or may not have reached the
//! secondary must be accounted for by the caller (the primary records the
//! error, stops forwarding and tracks dirty clusters). To resume, the caller
//! either calls [`Client::reconnect`] (new connection, same export, same size
//! required) or builds a new [`Client`]. A server that hangs without closing
//! the socket is detected only with [`ClientOptions::request_timeout`].
//!
//! # Error mapping
//!
//! NBD `EPERM` (a fenced primary after failover, a read-only export) becomes
//! [`BlockError::Refused`]; `ENOTSUP` becomes [`BlockError::Unsupported`];
//! `ENOSPC` keeps its errno; everything else is [`BlockError::Io`].
//!
//! Semantics: [`BlockDev::discard`] is sent as WRITE_ZEROES allowing holes (or
//! written zeroes when the server lacks WRITE_ZEROES) so the export reads
//! zeroes afterwards, as the trait promises and replication needs. When the
//! server advertises a minimum block size, unaligned requests fail with `EINVAL`.

mod conn;
mod handshake;

pub use handshake::ExportInfo;

use self::conn::{Conn, Failure, Reply, Ticket};
use super::stream::Stream;
use super::uri::NbdUri;
use super::wire::*;
use super::NbdError;
use crate::block::channel::Doorbell;
use crate::block::{
    check_range, iov_len, iov_window, BlockDev, BlockError, Extent, ExtentKind, Refusal, Result,
};
use crate::sync::RwLockExt;
use std::io;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use vm_memory::VolatileSlice;

/// How a [`Client`] connects. `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Requests in flight on the connection at once. Default 64.
    pub max_in_flight: usize,
    /// The server must finish the negotiation within this time. Default 10 s.
    pub handshake_timeout: Duration,
    /// A request without a reply after this long breaks the connection (every
    /// request then fails, as for a lost connection). `None` (the default)
    /// waits forever, as a kernel or QEMU NBD client does.
    pub request_timeout: Option<Duration>,
    /// TLS credentials: when set the connection is upgraded with
    /// NBD_OPT_STARTTLS before anything else, and a server that refuses is
    /// not used. Default none (plain text).
    pub tls: Option<Arc<crate::tls::ClientTls>>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            max_in_flight: 64,
            handshake_timeout: Duration::from_secs(10),
            request_timeout: None,
            tls: None,
        }
    }
}

/// A connection to one NBD export, usable as a block device.
pub struct Client {
    uri: NbdUri,
    opts: ClientOptions,
    size: u64,
    conn: RwLock<Arc<Conn>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("uri", &self.uri.to_string())
            .field("size", &self.size)
            .finish()
    }
}

/// Splits work into requests no larger than this for length-only commands
/// (the 32-bit length field), keeping alignment.
const MAX_EFFECT_LEN: u64 = 1 << 30;

impl Client {
    /// Connects to a URI in QEMU's forms (`nbd+unix:///NAME?socket=PATH`,
    /// `nbd://HOST:PORT/NAME`) with default options.
    pub fn connect(uri: &str) -> std::result::Result<Client, NbdError> {
        Client::connect_to(&NbdUri::parse(uri)?, ClientOptions::default())
    }

    /// Connects to `uri` with `opts`.
    pub fn connect_to(uri: &NbdUri, opts: ClientOptions) -> std::result::Result<Client, NbdError> {
        let conn = open(uri, &opts)?;
        Ok(Client {
            uri: uri.clone(),
            size: conn.info().size,
            opts,
            conn: RwLock::new(Arc::new(conn)),
        })
    }

    /// Replaces the connection with a new one to the same export. Requests on
    /// the old connection fail; the export must still have the same size.
    pub fn reconnect(&self) -> std::result::Result<(), NbdError> {
        let conn = open(&self.uri, &self.opts)?;
        if conn.info().size != self.size {
            return Err(NbdError::SizeChanged {
                old: self.size,
                new: conn.info().size,
            });
        }
        let old = std::mem::replace(&mut *self.conn.write_or_recover(), Arc::new(conn));
        drop(old);
        Ok(())
    }

    /// The export this client talks to.
    pub fn uri(&self) -> &NbdUri {
        &self.uri
    }

    /// What the current connection negotiated.
    pub fn info(&self) -> ExportInfo {
        self.current().info().clone()
    }

    /// Why the current connection is unusable, or `None` while it works.
    pub fn broken(&self) -> Option<String> {
        self.current().broken()
    }

    /// Writes `bufs` at `offset` with FUA: durable on the server when this
    /// returns (a write then a flush if the server lacks FUA).
    pub fn write_fua(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        self.write(offset, bufs, true)
    }

    fn current(&self) -> Arc<Conn> {
        self.conn.read_or_recover().clone()
    }

    /// Sends a write of `bufs` at `offset` and returns without waiting for
    /// the reply: the caller can do other work (the primary writes its local
    /// disk) while the server handles it, then calls
    /// [`SubmittedWrite::wait`]. The buffers are on the wire (or in the
    /// socket) when this returns, so they may be reused at once.
    pub fn submit_write(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<SubmittedWrite> {
        self.send_write(offset, bufs, 0, None)
    }

    /// Sends a write and returns at once; `bell` rings when its replies are
    /// in (then [`Started::finish`] does not block). For a queue worker that
    /// keeps many requests in flight on one thread.
    pub fn start_write(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_>],
        bell: &Arc<Doorbell>,
    ) -> Result<Started> {
        let w = self.send_write(offset, bufs, 0, Some(bell))?;
        Ok(Started {
            conn: w.conn,
            op: "write",
            tickets: w.tickets,
        })
    }

    /// [`Client::start_write`] for a write-zeroes (a discard is sent as one
    /// that may leave holes, as [`BlockDev::discard`] is). `None` when the
    /// server has no WRITE_ZEROES: the caller then writes zeroes with
    /// [`BlockDev::write_zeroes`], which sends them as data and waits.
    pub fn start_write_zeroes(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        bell: &Arc<Doorbell>,
    ) -> Option<Result<Started>> {
        let info = self.info();
        if !info.has(FLAG_SEND_WRITE_ZEROES) && !info.has(FLAG_READ_ONLY) {
            return None;
        }
        let checked = || {
            if info.has(FLAG_READ_ONLY) {
                return Err(BlockError::ReadOnly);
            }
            check_range(offset, len, self.size)?;
            aligned(&info, "write-zeroes", offset, len)
        };
        if let Err(e) = checked() {
            return Some(Err(e));
        }
        let flags = if unmap { 0 } else { CMD_FLAG_NO_HOLE };
        let (conn, tickets) =
            self.send_ranged(Command::WriteZeroes, flags, offset, len, Some(bell));
        Some(Ok(Started {
            conn,
            op: "write-zeroes",
            tickets,
        }))
    }

    /// [`Client::start_write`] for a flush. A server without a write cache
    /// (no FLUSH flag) needs none: that completes at once.
    pub fn start_flush(&self, bell: &Arc<Doorbell>) -> Started {
        let conn = self.current();
        let tickets = if conn.info().has(FLAG_SEND_FLUSH) {
            vec![(
                0,
                conn.send_waking(Command::Flush, 0, 0, 0, &[], Some(bell)),
            )]
        } else {
            match conn.broken() {
                Some(why) => vec![(0, Err(Failure::Broken(why)))],
                None => Vec::new(),
            }
        };
        Started {
            conn,
            op: "flush",
            tickets,
        }
    }

    fn send_write(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_>],
        flags: u16,
        bell: Option<&Arc<Doorbell>>,
    ) -> Result<SubmittedWrite> {
        let conn = self.current();
        let info = conn.info();
        if info.has(FLAG_READ_ONLY) {
            return Err(BlockError::ReadOnly);
        }
        let len = iov_len(bufs);
        check_range(offset, len, self.size)?;
        aligned(info, "write", offset, len)?;
        let step = u64::from(info.max_payload);
        let mut tickets = Vec::new();
        let mut at = 0;
        while at < len {
            let n = (len - at).min(step);
            let part = iov_window(bufs, at, n)?;
            let t = conn.send_waking(Command::Write, flags, offset + at, n as u32, &part, bell);
            tickets.push((offset + at, t));
            at += n;
        }
        Ok(SubmittedWrite { conn, tickets })
    }

    fn write(&self, offset: u64, bufs: &[VolatileSlice<'_>], fua: bool) -> Result<()> {
        let native_fua = fua && self.current().info().has(FLAG_SEND_FUA);
        let flags = if native_fua { CMD_FLAG_FUA } else { 0 };
        self.send_write(offset, bufs, flags, None)?.wait()?;
        if fua && !native_fua {
            return self.flush();
        }
        Ok(())
    }

    /// Sends a length-only command over `[offset, offset+len)` in pieces.
    fn ranged(
        &self,
        cmd: Command,
        flags: u16,
        offset: u64,
        len: u64,
        op: &'static str,
    ) -> Result<()> {
        let (conn, tickets) = self.send_ranged(cmd, flags, offset, len, None);
        wait_all(&conn, op, tickets).map(|_| ())
    }

    /// Sends the pieces of a length-only command without waiting.
    fn send_ranged(
        &self,
        cmd: Command,
        flags: u16,
        offset: u64,
        len: u64,
        bell: Option<&Arc<Doorbell>>,
    ) -> (Arc<Conn>, Tickets) {
        let conn = self.current();
        let step =
            MAX_EFFECT_LEN / u64::from(conn.info().min_block) * u64::from(conn.info().min_block);
        let mut tickets = Vec::new();
        let mut at = 0;
        while at < len {
            let n = (len - at).min(step);
            tickets.push((
                offset + at,
                conn.send_waking(cmd, flags, offset + at, n as u32, &[], bell),
            ));
            at += n;
        }
        (conn, tickets)
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<()> {
        let chunk = len.min(1 << 20) as usize;
        let mut zeroes = vec![0u8; chunk];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(chunk as u64) as usize;
            self.write(offset + at, &[VolatileSlice::from(&mut zeroes[..n])], false)?;
            at += n as u64;
        }
        Ok(())
    }
}

/// Requests sent, each with the offset it starts at.
type Tickets = Vec<(u64, std::result::Result<Arc<Ticket>, Failure>)>;

/// Requests sent by a `start_*` call of [`Client`], whose replies ring the
/// doorbell given there.
#[must_use = "the outcome is only known after finish()"]
pub struct Started {
    conn: Arc<Conn>,
    op: &'static str,
    tickets: Tickets,
}

impl Started {
    /// True once every reply is in (or the connection failed them).
    pub fn is_done(&self) -> bool {
        self.tickets
            .iter()
            .all(|(_, t)| t.as_ref().map_or(true, |t| t.is_done()))
    }

    /// The outcome; the first failure (in offset order) is returned. Blocks
    /// (under the request timeout) unless [`is_done`](Self::is_done).
    pub fn finish(self) -> Result<()> {
        wait_all(&self.conn, self.op, self.tickets).map(|_| ())
    }
}

impl std::fmt::Debug for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Started")
            .field("op", &self.op)
            .field("requests", &self.tickets.len())
            .finish()
    }
}

/// A write sent by [`Client::submit_write`] whose reply is still to come.
/// Dropping it without [`wait`](Self::wait) leaves the outcome unknown.
#[must_use = "the write's outcome is only known after wait()"]
pub struct SubmittedWrite {
    conn: Arc<Conn>,
    tickets: Tickets,
}

impl SubmittedWrite {
    /// Waits for the server's replies; the first failure (in offset order)
    /// is returned, as [`BlockDev::write_vectored`] would.
    pub fn wait(self) -> Result<()> {
        wait_all(&self.conn, "write", self.tickets).map(|_| ())
    }
}

impl std::fmt::Debug for SubmittedWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubmittedWrite")
            .field("requests", &self.tickets.len())
            .finish()
    }
}

/// Connects, negotiates and starts the reply reader.
fn open(uri: &NbdUri, opts: &ClientOptions) -> std::result::Result<Conn, NbdError> {
    let stream = Stream::connect(&uri.addr)?;
    stream.set_read_timeout(Some(opts.handshake_timeout))?;
    let tls = match &opts.tls {
        None => None,
        Some(creds) => {
            let host = match &uri.addr {
                super::NbdAddr::Tcp { host, .. } => Some(host.as_str()),
                super::NbdAddr::Unix(_) => None,
            };
            Some(handshake::TlsTarget { creds, host })
        }
    };
    let (info, stream) = handshake::negotiate(stream, &uri.export, tls)?;
    stream.set_read_timeout(None)?;
    log::info!(
        "nbd client: connected to {uri} ({} bytes, flags {:#x}, structured {}{})",
        info.size,
        info.flags,
        info.structured,
        if stream.is_tls() { ", TLS" } else { "" }
    );
    Conn::start(
        stream,
        info,
        opts.max_in_flight,
        opts.request_timeout,
        uri.to_string(),
    )
}

fn aligned(info: &ExportInfo, op: &'static str, offset: u64, len: u64) -> Result<()> {
    let min = u64::from(info.min_block);
    if offset % min == 0 && len % min == 0 {
        return Ok(());
    }
    Err(BlockError::io(
        op,
        offset,
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{offset}+{len} is not aligned to the server's {min}-byte blocks"),
        ),
    ))
}

/// Waits for every ticket; the first failure (in offset order) is returned.
fn wait_all(
    conn: &Conn,
    op: &'static str,
    tickets: Vec<(u64, std::result::Result<Arc<Ticket>, Failure>)>,
) -> Result<Vec<Reply>> {
    let mut first_err = None;
    let mut replies = Vec::with_capacity(tickets.len());
    for (offset, t) in tickets {
        match t.and_then(|t| conn.wait(&t)) {
            Ok(r) => replies.push(r),
            Err(f) => {
                first_err.get_or_insert_with(|| to_block_error(op, offset, f));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(replies),
    }
}

fn to_block_error(op: &'static str, offset: u64, f: Failure) -> BlockError {
    match f {
        Failure::Broken(why) => BlockError::io(
            op,
            offset,
            io::Error::new(
                io::ErrorKind::NotConnected,
                format!("NBD connection lost: {why}"),
            ),
        ),
        Failure::Nbd { errno, message } => {
            let text = if message.is_empty() {
                format!("NBD server replied {}", errno_name(errno))
            } else {
                format!("NBD server replied {}: {message}", errno_name(errno))
            };
            match errno {
                EPERM => BlockError::Refused(Refusal::Remote(text)),
                ENOTSUP => BlockError::Unsupported("request refused by the NBD server (ENOTSUP)"),
                ENOSPC => BlockError::io(op, offset, io::Error::from_raw_os_error(libc::ENOSPC)),
                _ => BlockError::io(op, offset, io::Error::other(text)),
            }
        }
    }
}

impl BlockDev for Client {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.current().info().has(FLAG_READ_ONLY)
    }

    fn read_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        let conn = self.current();
        let len = iov_len(bufs);
        check_range(offset, len, self.size)?;
        aligned(conn.info(), "read", offset, len)?;
        let step = u64::from(conn.info().max_payload);
        let mut tickets = Vec::new();
        let mut at = 0;
        while at < len {
            let n = (len - at).min(step);
            tickets.push((
                offset + at,
                conn.send(Command::Read, 0, offset + at, n as u32, &[]),
            ));
            at += n;
        }
        let replies = wait_all(&conn, "read", tickets)?;
        let mut at = 0;
        for r in replies {
            let mut from = 0;
            for dst in iov_window(bufs, at, r.data.len() as u64)? {
                dst.copy_from(&r.data[from..]);
                from += dst.len();
            }
            at += r.data.len() as u64;
        }
        Ok(())
    }

    fn write_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        self.write(offset, bufs, false)
    }

    fn flush(&self) -> Result<()> {
        let conn = self.current();
        if !conn.info().has(FLAG_SEND_FLUSH) {
            // The server exposes no write cache to flush.
            return conn.broken().map_or(Ok(()), |why| {
                Err(to_block_error("flush", 0, Failure::Broken(why)))
            });
        }
        let t = conn.send(Command::Flush, 0, 0, 0, &[]);
        wait_all(&conn, "flush", vec![(0, t)]).map(|_| ())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let info = self.info();
        if info.has(FLAG_READ_ONLY) {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        aligned(&info, "write-zeroes", offset, len)?;
        if !info.has(FLAG_SEND_WRITE_ZEROES) {
            return self.write_zero_bytes(offset, len);
        }
        let flags = if unmap { 0 } else { CMD_FLAG_NO_HOLE };
        self.ranged(Command::WriteZeroes, flags, offset, len, "write-zeroes")
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(offset, len, self.size)?;
        let conn = self.current();
        let info = conn.info();
        let min = u64::from(info.min_block);
        let asked = len.min(MAX_EFFECT_LEN / min * min);
        if info.base_allocation.is_none() || asked == 0 || offset % min != 0 {
            return Ok(Extent {
                len,
                kind: ExtentKind::Data,
            });
        }
        // The server rounds to its blocks; a short tail is asked as one block.
        let asked = if asked % min == 0 {
            asked
        } else {
            asked.div_ceil(min) * min
        };
        let asked = asked.min(self.size - offset);
        let t = conn.send(
            Command::BlockStatus,
            CMD_FLAG_REQ_ONE,
            offset,
            asked as u32,
            &[],
        );
        let reply = wait_all(&conn, "block-status", vec![(offset, t)])?;
        let Some((elen, flags)) = reply.first().and_then(|r| r.extent) else {
            return Err(BlockError::io(
                "block-status",
                offset,
                io::Error::other("NBD server sent no extent for base:allocation"),
            ));
        };
        let elen = u64::from(elen).clamp(1, len);
        let kind = if flags & STATE_ZERO != 0 && flags & STATE_HOLE != 0 {
            ExtentKind::Hole
        } else if flags & STATE_ZERO != 0 {
            ExtentKind::Zero
        } else {
            // A hole that may not read as zeroes is, for us, data.
            ExtentKind::Data
        };
        Ok(Extent { len: elen, kind })
    }
}
