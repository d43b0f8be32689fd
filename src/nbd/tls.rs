//! One TLS session over a connected socket, shared by the connection's reader
//! thread and its senders (as the plain socket is, through clones):
//! [`TlsStream`] is either a rustls session (x509 credentials) or a GnuTLS
//! one (PSK credentials, [`crate::tls::gnutls`]); the NBD code sees one type.
//! STARTTLS's handshake and the identity check for both are here.
//!
//! rustls keeps one state for both directions, so it sits behind a mutex, but
//! no socket call is ever made while holding it: a sender encrypts into its
//! own buffer and sends after letting go, and the reader reads ciphertext into
//! its own buffer first. Holding the state across a blocking send would
//! deadlock two peers that both send more than the socket buffers hold while
//! their readers wait for the state to decrypt.

use super::stream::Stream;
use super::NbdError;
use crate::sync::MutexExt;
use crate::tls::gnutls::{self, HandshakeError};
use crate::tls::{ClientTls, ServerTls, TlsError};
use std::io::{self, IoSlice, Read, Write};
use std::sync::Mutex;
use vm_memory::VolatileSlice;

/// Plaintext handed to rustls per lock and sent per sendmsg: 256 KiB keeps
/// the reader's wait for the state short and the syscalls few.
const SEND_CHUNK: usize = 256 << 10;
/// Ciphertext read per socket read (about sixteen full TLS records).
const RECV_BUF: usize = 256 << 10;

/// A TLS session (client or server side) on a plain stream.
// Always behind the Arc of `Stream::Tls`: the size is paid once per connection.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum TlsStream {
    /// x509 credentials, rustls.
    Rustls(RustlsStream),
    /// PSK credentials, GnuTLS.
    Psk(gnutls::Session<Stream>),
}

impl TlsStream {
    /// Server side of STARTTLS: the handshake (bounded by the socket's read
    /// timeout), then the client's identity against `--tls-authz`. Returns
    /// the session and the identity (subject DN or PSK username).
    pub(crate) fn accept(sock: Stream, creds: &ServerTls) -> Result<(TlsStream, String), NbdError> {
        if let Some(config) = creds.x509_config() {
            let conn = rustls::ServerConnection::new(config)
                .map_err(|e| NbdError::TlsHandshake(io::Error::other(e)))?;
            let session =
                RustlsStream::handshake(sock, conn.into()).map_err(NbdError::TlsHandshake)?;
            let identity = creds.authorise(session.peer_certificates().as_deref())?;
            return Ok((TlsStream::Rustls(session), identity));
        }
        let session =
            gnutls::Session::server(sock, &|name| creds.psk_lookup(name)).map_err(psk_error)?;
        let identity = creds.authorise_identity(session.username().to_string())?;
        Ok((TlsStream::Psk(session), identity))
    }

    /// Client side of STARTTLS. `host` is the host connected to (`None` for
    /// a Unix socket), for the x509 certificate name check.
    pub(crate) fn connect(
        sock: Stream,
        creds: &ClientTls,
        host: Option<&str>,
    ) -> Result<TlsStream, NbdError> {
        if let Some(config) = creds.x509_config() {
            let name = creds.server_name(host)?;
            let conn = rustls::ClientConnection::new(config, name)
                .map_err(|e| NbdError::TlsHandshake(io::Error::other(e)))?;
            let session =
                RustlsStream::handshake(sock, conn.into()).map_err(NbdError::TlsHandshake)?;
            return Ok(TlsStream::Rustls(session));
        }
        let Some((username, key)) = creds.psk() else {
            return Err(NbdError::Tls(TlsError::Config(
                "no TLS credentials of either kind".into(),
            )));
        };
        let session = gnutls::Session::client(sock, &username, &key).map_err(psk_error)?;
        Ok(TlsStream::Psk(session))
    }

    /// What the handshake agreed on, for log lines.
    pub(crate) fn describe(&self) -> String {
        match self {
            TlsStream::Rustls(_) => "x509".to_string(),
            TlsStream::Psk(s) => s.description().to_string(),
        }
    }

    /// The plain socket under the session (shutdown, timeouts, peer name).
    pub(crate) fn socket(&self) -> &Stream {
        match self {
            TlsStream::Rustls(s) => s.socket(),
            TlsStream::Psk(s) => s.socket(),
        }
    }

    /// Encrypts and sends `parts` as one ordered burst.
    pub(crate) fn send_all(&self, parts: &[&[u8]]) -> io::Result<()> {
        match self {
            TlsStream::Rustls(s) => s.send_all(parts),
            TlsStream::Psk(s) => s.send_all(parts),
        }
    }

    /// Sends `head` then guest memory.
    pub(crate) fn send_volatile(&self, head: &[u8], bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        match self {
            TlsStream::Rustls(s) => s.send_volatile(head, bufs),
            TlsStream::Psk(s) => s.send_volatile(head, bufs),
        }
    }

    /// Reads decrypted bytes; `Ok(0)` after the peer's close_notify.
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            TlsStream::Rustls(s) => s.read(buf),
            TlsStream::Psk(s) => s.read(buf),
        }
    }
}

/// A refused or failed PSK handshake as the NBD layer reports it: a refused
/// identity like x509's, anything else as a handshake failure.
fn psk_error(e: HandshakeError) -> NbdError {
    match e {
        HandshakeError::Setup(e) => NbdError::Tls(TlsError::Gnutls(e)),
        HandshakeError::UnknownUser(name) => NbdError::Tls(TlsError::UnknownPskUser(name)),
        HandshakeError::NotAuthorised(name) => NbdError::Tls(TlsError::NotAuthorised(name)),
        HandshakeError::Transport(e) => NbdError::TlsHandshake(e),
        e @ HandshakeError::Failed { .. } => NbdError::TlsHandshake(io::Error::other(e)),
    }
}

/// A rustls session (client or server side) on `sock`.
pub(crate) struct RustlsStream {
    sock: Stream,
    conn: Mutex<rustls::Connection>,
    send: Mutex<SendState>,
    recv: Mutex<RecvState>,
}

struct SendState {
    out: Vec<u8>,
    bounce: Vec<u8>,
}

struct RecvState {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl std::fmt::Debug for RustlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RustlsStream")
            .field("sock", &self.sock)
            .finish()
    }
}

fn tls_io_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl RustlsStream {
    /// Runs the handshake on `sock` (a plain stream) to its end; the read
    /// timeout set on the socket bounds it.
    pub(crate) fn handshake(
        sock: Stream,
        mut conn: rustls::Connection,
    ) -> Result<RustlsStream, io::Error> {
        let mut io = sock.try_clone()?;
        while conn.is_handshaking() {
            match conn.complete_io(&mut io) {
                Ok((0, 0)) if conn.is_handshaking() => {
                    return Err(io::ErrorKind::UnexpectedEof.into())
                }
                Ok(_) => {}
                Err(e) => {
                    // Tell the peer why (a pending alert), best effort.
                    let _ = conn.write_tls(&mut io);
                    return Err(e);
                }
            }
        }
        while conn.wants_write() {
            conn.write_tls(&mut io)?;
        }
        // Room for a whole chunk of sealed records before write_tls drains them.
        conn.set_buffer_limit(Some(2 * SEND_CHUNK));
        Ok(RustlsStream {
            sock,
            conn: Mutex::new(conn),
            send: Mutex::new(SendState {
                out: Vec::with_capacity(SEND_CHUNK + 4096),
                bounce: Vec::new(),
            }),
            recv: Mutex::new(RecvState {
                buf: vec![0; RECV_BUF],
                start: 0,
                end: 0,
            }),
        })
    }

    /// The plain socket under the session (shutdown, timeouts, peer name).
    pub(crate) fn socket(&self) -> &Stream {
        &self.sock
    }

    /// The peer's certificate chain, as the handshake verified it.
    pub(crate) fn peer_certificates(
        &self,
    ) -> Option<Vec<rustls_pki_types::CertificateDer<'static>>> {
        self.conn
            .lock_or_recover()
            .peer_certificates()
            .map(|c| c.iter().map(|d| d.clone().into_owned()).collect())
    }

    /// Encrypts and sends `parts` as one ordered burst.
    pub(crate) fn send_all(&self, parts: &[&[u8]]) -> io::Result<()> {
        let mut st = self.send.lock_or_recover();
        self.send_locked(&mut st.out, parts)
    }

    /// Sends `head` then guest memory, through a bounce buffer: guest memory
    /// may change under us, and rustls wants `&[u8]`.
    pub(crate) fn send_volatile(&self, head: &[u8], bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        let mut st = self.send.lock_or_recover();
        let SendState { out, bounce } = &mut *st;
        bounce.clear();
        bounce.extend_from_slice(head);
        for b in bufs {
            let at = bounce.len();
            bounce.resize(at + b.len(), 0);
            b.copy_to(&mut bounce[at..]);
        }
        self.send_locked(out, &[bounce])
    }

    /// The send lock is held (its buffer is `out`): records leave in the
    /// order they were sealed.
    fn send_locked(&self, out: &mut Vec<u8>, parts: &[&[u8]]) -> io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(parts.len());
        let mut pending = 0;
        for p in parts.iter().filter(|p| !p.is_empty()) {
            let mut rest: &[u8] = p;
            while !rest.is_empty() {
                let n = rest.len().min(SEND_CHUNK - pending);
                slices.push(IoSlice::new(&rest[..n]));
                pending += n;
                rest = &rest[n..];
                if pending == SEND_CHUNK {
                    self.encrypt(&slices, out)?;
                    self.flush_out(out)?;
                    slices.clear();
                    pending = 0;
                }
            }
        }
        if pending > 0 {
            self.encrypt(&slices, out)?;
        }
        self.flush_out(out)?;
        // The reader may have queued a record (a key-update answer) while we
        // sent, and left it to us because we held the send lock.
        self.drain_queued(out)
    }

    fn drain_queued(&self, out: &mut Vec<u8>) -> io::Result<()> {
        {
            let mut conn = self.conn.lock_or_recover();
            while conn.wants_write() {
                conn.write_tls(out)?;
            }
        }
        self.flush_out(out)
    }

    fn encrypt(&self, slices: &[IoSlice<'_>], out: &mut Vec<u8>) -> io::Result<()> {
        let mut conn = self.conn.lock_or_recover();
        let total: usize = slices.iter().map(|s| s.len()).sum();
        let mut written = 0;
        let mut idle = 0;
        while written < total {
            // Skip what an earlier partial write took.
            let mut skip = written;
            let mut rest = Vec::with_capacity(slices.len());
            for s in slices {
                if skip >= s.len() {
                    skip -= s.len();
                    continue;
                }
                rest.push(IoSlice::new(&s[skip..]));
                skip = 0;
            }
            let n = conn.writer().write_vectored(&rest)?;
            written += n;
            while conn.wants_write() {
                conn.write_tls(out)?;
            }
            if n == 0 {
                idle += 1;
                if idle > 2 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
            }
        }
        Ok(())
    }

    fn flush_out(&self, out: &mut Vec<u8>) -> io::Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let r = self.sock.send_all(&[out]);
        out.clear();
        r
    }

    /// Sends what rustls queued on its own (alerts, key-update answers). A
    /// sender holding the send lock sends it after its own records instead:
    /// the reader must never wait behind a send that may be blocked on a
    /// peer that is itself waiting for us to read.
    fn send_queued(&self) {
        if let Ok(mut st) = self.send.try_lock() {
            // The session is failing or idle: a send error shows up later.
            let _ = self.drain_queued(&mut st.out);
        }
    }

    /// Reads decrypted bytes; `Ok(0)` after the peer's close_notify.
    /// Decrypts everything already received and returns as much of it as
    /// fits, so a reader sees a whole batch of small requests at once (the
    /// server batches its replies on that), not one TLS record per call.
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut rs = self.recv.lock_or_recover();
        let rs = &mut *rs;
        loop {
            let mut needs_send = false;
            let got = {
                let mut conn = self.conn.lock_or_recover();
                while rs.start < rs.end {
                    let mut avail = &rs.buf[rs.start..rs.end];
                    // An error here is rustls' plaintext buffer being full:
                    // the rest waits until the caller drained it.
                    let Ok(n) = conn.read_tls(&mut avail) else {
                        break;
                    };
                    rs.start += n;
                    if let Err(e) = conn.process_new_packets() {
                        drop(conn);
                        self.send_queued();
                        return Err(tls_io_error(e));
                    }
                    needs_send |= conn.wants_write();
                    if n == 0 {
                        break;
                    }
                }
                let mut got = 0;
                let mut closed = false;
                while got < buf.len() {
                    match conn.reader().read(&mut buf[got..]) {
                        // The peer's close_notify: a clean end after this data.
                        Ok(0) => {
                            closed = true;
                            break;
                        }
                        Ok(n) => got += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if got == 0 => return Err(e),
                        Err(_) => break,
                    }
                }
                if got == 0 && closed {
                    return Ok(0);
                }
                got
            };
            if needs_send {
                self.send_queued();
            }
            if got > 0 {
                return Ok(got);
            }
            if rs.start == rs.end {
                rs.start = 0;
                rs.end = 0;
            } else if rs.start > 0 {
                rs.buf.copy_within(rs.start..rs.end, 0);
                rs.end -= rs.start;
                rs.start = 0;
            }
            let n = self.sock.read_raw(&mut rs.buf[rs.end..])?;
            if n == 0 {
                // EOF without close_notify: a truncation, not a clean end.
                let mut conn = self.conn.lock_or_recover();
                let _ = conn.read_tls(&mut &[][..]);
                let _ = conn.process_new_packets();
                return match conn.reader().read(buf) {
                    Ok(n) => Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        Err(io::ErrorKind::UnexpectedEof.into())
                    }
                    Err(e) => Err(e),
                };
            }
            rs.end += n;
        }
    }
}

impl Stream {
    /// One `read` on the plain socket (never through TLS).
    fn read_raw(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let r = match self {
                Stream::Unix(s) => (&*s).read(buf),
                Stream::Tcp(s) => (&*s).read(buf),
                Stream::Tls(_) => return Err(io::Error::other("TLS inside TLS")),
            };
            match r {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }
}

impl Write for &TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send_all(&[buf])?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
