//! One TLS session over a connected socket, shared by the connection's reader
//! thread and its senders (as the plain socket is, through clones):
//! [`TlsStream`] is either a rustls session (x509 credentials) or a GnuTLS
//! one (PSK credentials, [`crate::tls::gnutls`]); the NBD code sees one type.
//! STARTTLS's handshake and the identity check for both are here.
//!
//! The x509 session runs its handshake in rustls, then seals and opens its
//! records itself ([`record`]: one plaintext copy per direction instead of
//! rustls' buffered two, no allocation per record), keeping rustls only for
//! key updates and session tickets. Each direction has its own lock: a
//! sender seals into its own buffer and sends, the reader opens records in
//! the buffer it read them into. The reader never blocks on the send lock: a
//! key update it owes the peer is sent by whoever holds it. Holding one state
//! for both directions across a blocking send would deadlock two peers that
//! both send more than the socket buffers hold while their readers wait for
//! the state to decrypt.

mod record;
#[cfg(test)]
mod tests;

use self::record::{
    RecordKey, TrafficSecret, Version, ALERT, APPLICATION_DATA, CHANGE_CIPHER_SPEC, HANDSHAKE,
    HEADER, MAX_BODY, MAX_PLAIN,
};
use super::stream::Stream;
use super::NbdError;
use crate::sync::MutexExt;
use crate::tls::gnutls::{self, HandshakeError};
use crate::tls::{ClientTls, ServerTls, TlsError};
use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ClientConfig, ExtractedSecrets, ServerConfig, SupportedCipherSuite};
use rustls_pki_types::{CertificateDer, ServerName};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vm_memory::VolatileSlice;

/// Sealed records are sent once they reach this many bytes: few syscalls,
/// and the records still in the CPU cache they were sealed in.
const SEND_CHUNK: usize = 256 << 10;
/// The outgoing buffer: a chunk and the record that crosses its end.
const OUT_BUF: usize = SEND_CHUNK + HEADER + MAX_BODY;
/// Ciphertext read per socket read (about sixteen full TLS records).
const RECV_BUF: usize = 256 << 10;
/// Reads at least this big receive records straight into the caller's
/// buffer and open them there (an NBD WRITE payload), with room for a few
/// whole records so the partial one carried over stays a small part.
const DIRECT_READ: usize = 4 * (HEADER + MAX_BODY);
/// AES-GCM's confidentiality limit in records per key (rustls' figure,
/// after the AEAD limits draft: 2^-60 attack probability at full records).
const GCM_LIMIT: u64 = 1 << 24;
// A whole record always fits behind a partial one moved to the front.
const _: () = assert!(RECV_BUF >= 2 * (HEADER + MAX_BODY));

/// A TLS session (client or server side) on a plain stream.
// Always behind the Arc of `Stream::Tls`: the size is paid once per connection.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum TlsStream {
    /// Our own records: x509 (rustls' handshake), or TLS 1.3 PSK (GnuTLS's).
    Records(RecordStream),
    /// PSK credentials, GnuTLS throughout (when it cannot hand over).
    Psk(gnutls::Session<Stream>),
}

impl TlsStream {
    /// Server side of STARTTLS: the handshake (bounded by the socket's read
    /// timeout), then the client's identity against `--tls-authz`. Returns
    /// the session and the identity (subject DN or PSK username).
    pub(crate) fn accept(sock: Stream, creds: &ServerTls) -> Result<(TlsStream, String), NbdError> {
        if let Some(config) = creds.x509_config() {
            let session = RecordStream::accept(sock, config).map_err(NbdError::TlsHandshake)?;
            let identity = creds.authorise(session.peer_certificates().as_deref())?;
            return Ok((TlsStream::Records(session), identity));
        }
        let session =
            gnutls::Session::server(sock, &|name| creds.psk_lookup(name)).map_err(psk_error)?;
        let identity = creds.authorise_identity(session.username().to_string())?;
        Ok((TlsStream::psk(session, false)?, identity))
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
            let session =
                RecordStream::connect(sock, config, name).map_err(NbdError::TlsHandshake)?;
            return Ok(TlsStream::Records(session));
        }
        let Some((username, key)) = creds.psk() else {
            return Err(NbdError::Tls(TlsError::Config(
                "no TLS credentials of either kind".into(),
            )));
        };
        let session = gnutls::Session::client(sock, &username, &key).map_err(psk_error)?;
        TlsStream::psk(session, true)
    }

    /// An established PSK session: its records are ours from here when
    /// GnuTLS hands them over (TLS 1.3, see [`gnutls::Session::take_records`]),
    /// for the same single copy per direction as x509; else GnuTLS carries on.
    fn psk(mut session: gnutls::Session<Stream>, client: bool) -> Result<TlsStream, NbdError> {
        let Some(parts) = session.take_records() else {
            return Ok(TlsStream::Psk(session));
        };
        // A second descriptor of the socket: the session's goes with it.
        let sock = session.socket().try_clone()?;
        let describe = session.description().to_string();
        drop(session);
        let s = RecordStream::from_psk(sock, parts, &describe, client)
            .map_err(NbdError::TlsHandshake)?;
        Ok(TlsStream::Records(s))
    }

    /// What the handshake agreed on, for log lines.
    pub(crate) fn describe(&self) -> String {
        match self {
            TlsStream::Records(s) => s.describe().to_string(),
            TlsStream::Psk(s) => s.description().to_string(),
        }
    }

    /// The plain socket under the session (shutdown, timeouts, peer name).
    pub(crate) fn socket(&self) -> &Stream {
        match self {
            TlsStream::Records(s) => s.socket(),
            TlsStream::Psk(s) => s.socket(),
        }
    }

    /// Encrypts and sends `parts` as one ordered burst.
    pub(crate) fn send_all(&self, parts: &[&[u8]]) -> io::Result<()> {
        match self {
            TlsStream::Records(s) => s.send_all(parts),
            TlsStream::Psk(s) => s.send_all(parts),
        }
    }

    /// Sends `head` then guest memory.
    pub(crate) fn send_volatile(&self, head: &[u8], bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        match self {
            TlsStream::Records(s) => s.send_volatile(head, bufs),
            TlsStream::Psk(s) => s.send_volatile(head, bufs),
        }
    }

    /// Reads decrypted bytes; `Ok(0)` after the peer's close_notify.
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            TlsStream::Records(s) => s.read(buf),
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

/// Where the plaintext of a send comes from: our own bytes or guest memory.
enum Source<'a, 'b> {
    Bytes(&'b [u8]),
    Guest(&'b VolatileSlice<'a>),
}

impl Source<'_, '_> {
    fn len(&self) -> usize {
        match self {
            Source::Bytes(b) => b.len(),
            Source::Guest(v) => v.len(),
        }
    }
}

/// Copies the sources' bytes out in order, a record's worth at a time.
struct Gather<'s, 'a, 'b> {
    sources: &'s [Source<'a, 'b>],
    index: usize,
    offset: usize,
}

impl Gather<'_, '_, '_> {
    fn copy_to(&mut self, mut dst: &mut [u8]) {
        while !dst.is_empty() {
            let Some(src) = self.sources.get(self.index) else {
                // The caller asked for no more than the sources hold.
                debug_assert!(false, "gather past its sources");
                return;
            };
            let n = (src.len() - self.offset).min(dst.len());
            match src {
                Source::Bytes(b) => dst[..n].copy_from_slice(&b[self.offset..self.offset + n]),
                Source::Guest(v) => {
                    if let Ok(part) = v.subslice(self.offset, n) {
                        part.copy_to(&mut dst[..n]);
                    }
                }
            }
            dst = &mut dst[n..];
            self.offset += n;
            if self.offset == src.len() {
                self.index += 1;
                self.offset = 0;
            }
        }
    }
}

/// What derives the next traffic keys (key updates) and takes session
/// tickets once the handshake is over: rustls' kernel connection, or for a
/// GnuTLS (PSK) session the traffic secrets themselves.
enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
    Secrets {
        tx: TrafficSecret,
        rx: TrafficSecret,
        client: bool,
    },
}

impl Kernel {
    fn update_tx(&mut self, version: Version) -> io::Result<RecordKey> {
        let next = match self {
            Kernel::Client(k) => k.update_tx_secret(),
            Kernel::Server(k) => k.update_tx_secret(),
            Kernel::Secrets { tx, .. } => return tx.update(),
        };
        RecordKey::new(version, next.map_err(tls_io_error)?)
    }

    fn update_rx(&mut self, version: Version) -> io::Result<RecordKey> {
        let next = match self {
            Kernel::Client(k) => k.update_rx_secret(),
            Kernel::Server(k) => k.update_rx_secret(),
            Kernel::Secrets { rx, .. } => return rx.update(),
        };
        RecordKey::new(version, next.map_err(tls_io_error)?)
    }

    fn session_ticket(&mut self, payload: &[u8]) -> io::Result<()> {
        match self {
            Kernel::Client(k) => k.handle_new_session_ticket(payload).map_err(tls_io_error),
            // Nothing resumes a PSK session here (no tickets asked for).
            Kernel::Secrets { client: true, .. } => Ok(()),
            Kernel::Server(_) | Kernel::Secrets { .. } => {
                Err(invalid("TLS: a client sent a session ticket"))
            }
        }
    }
}

/// The two kinds of unbuffered rustls connection, driven through one
/// handshake loop.
trait Handshaking {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn common(&self) -> &rustls::CommonState;
}

/// rustls' client and server connections take records the same way.
macro_rules! handshaking {
    ($conn:ty, $data:ty) => {
        impl Handshaking for $conn {
            type Data = $data;
            fn process<'c, 'i>(
                &'c mut self,
                incoming: &'i mut [u8],
            ) -> UnbufferedStatus<'c, 'i, Self::Data> {
                self.process_tls_records(incoming)
            }
            fn common(&self) -> &rustls::CommonState {
                self
            }
        }
    };
}

handshaking!(UnbufferedClientConnection, ClientConnectionData);
handshaking!(UnbufferedServerConnection, ServerConnectionData);

/// What one handshake step asks for next.
enum Next {
    Continue,
    Read,
    /// Ready for application data (the handshake may still wait for the
    /// peer's last flight: a TLS 1.3 server may send before the client's
    /// Finished).
    Traffic,
    Failed(rustls::Error),
}

/// The handshake's outgoing records and the application data rustls opened
/// before the handshake ended.
#[derive(Default)]
struct HandshakeIo {
    out: Vec<u8>,
    early: Vec<u8>,
}

impl HandshakeIo {
    fn step<Data>(
        &mut self,
        sock: &Stream,
        state: Result<ConnectionState<'_, '_, Data>, rustls::Error>,
    ) -> io::Result<Next> {
        let state = match state {
            Ok(s) => s,
            Err(e) => return Ok(Next::Failed(e)),
        };
        match state {
            ConnectionState::EncodeTlsData(mut d) => {
                let at = self.out.len();
                self.out.resize(at + 4096, 0);
                loop {
                    match d.encode(&mut self.out[at..]) {
                        Ok(n) => {
                            self.out.truncate(at + n);
                            break;
                        }
                        Err(EncodeError::InsufficientSize(e)) => {
                            self.out.resize(at + e.required_size, 0)
                        }
                        Err(_) => {
                            self.out.truncate(at);
                            break;
                        }
                    }
                }
                Ok(Next::Continue)
            }
            ConnectionState::TransmitTlsData(t) => {
                sock.send_all(&[&self.out])?;
                self.out.clear();
                t.done();
                Ok(Next::Continue)
            }
            ConnectionState::BlockedHandshake => Ok(Next::Read),
            ConnectionState::ReadTraffic(mut r) => {
                while let Some(rec) = r.next_record() {
                    self.early
                        .extend_from_slice(rec.map_err(tls_io_error)?.payload);
                }
                Ok(Next::Continue)
            }
            ConnectionState::WriteTraffic(_) => Ok(Next::Traffic),
            ConnectionState::PeerClosed | ConnectionState::Closed => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection during the TLS handshake",
            )),
            other => Err(io::Error::other(format!(
                "TLS handshake: unexpected state {other:?}"
            ))),
        }
    }
}

/// Runs the handshake on `sock` to its end (the socket's read timeout bounds
/// it). Returns the bytes received past it (the start of the record stream)
/// and any application data rustls already opened.
fn drive<C: Handshaking>(conn: &mut C, sock: &Stream) -> io::Result<(Vec<u8>, usize, Vec<u8>)> {
    let mut incoming = vec![0u8; RECV_BUF];
    let mut used = 0;
    let mut io = HandshakeIo::default();
    loop {
        let status = conn.process(&mut incoming[..used]);
        let discard = status.discard;
        let next = io.step(sock, status.state);
        incoming.copy_within(discard..used, 0);
        used -= discard;
        match next? {
            Next::Continue => continue,
            Next::Traffic if !conn.common().is_handshaking() => break,
            Next::Read | Next::Traffic => {}
            Next::Failed(e) => {
                // rustls queued an alert telling the peer why: send it, best
                // effort (the peer may be gone). rustls still points into
                // the unprocessed bytes: it gets the same buffer back.
                for _ in 0..4 {
                    let status = conn.process(&mut incoming[..used]);
                    let discard = status.discard;
                    let next = io.step(sock, status.state);
                    incoming.copy_within(discard..used, 0);
                    used -= discard;
                    if !matches!(next, Ok(Next::Continue)) {
                        break;
                    }
                }
                // What was encoded and not transmitted yet (rustls asks for
                // the transmission only once it has nothing left to process,
                // which a failed session never gets to).
                if !io.out.is_empty() {
                    let _ = sock.send_all(&[&io.out]);
                }
                return Err(tls_io_error(e));
            }
        }
        if used == incoming.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS handshake: a record larger than the protocol allows",
            ));
        }
        let n = sock.read_raw(&mut incoming[used..])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection during the TLS handshake",
            ));
        }
        used += n;
    }
    Ok((incoming, used, io.early))
}

/// An x509 TLS session (client or server side) on `sock`: rustls for the
/// handshake and the key schedule, [`record`] for the records.
pub(crate) struct RecordStream {
    sock: Stream,
    version: Version,
    describe: String,
    peer_certs: Option<Vec<CertificateDer<'static>>>,
    /// Records one key may seal: past it, TLS 1.3 updates the key and TLS
    /// 1.2 (which cannot) ends the session.
    limit: u64,
    kernel: Mutex<Kernel>,
    send: Mutex<SendState>,
    recv: Mutex<RecvState>,
    /// The peer asked for a key update: ours goes out before our next record.
    owe_update: AtomicBool,
}

struct SendState {
    key: RecordKey,
    /// Sealed records waiting for the socket: `out[..len]` (allocated once
    /// at full size, so sealing never grows it).
    out: Vec<u8>,
    len: usize,
    /// A send failed midway: the record stream is cut, nothing more may go.
    broken: bool,
}

struct RecvState {
    key: RecordKey,
    /// Records as received: `buf[start..end]`; records are opened in place.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Opened application data not yet handed out (in `buf`, before `start`).
    plain: Range<usize>,
    /// Application data rustls opened as the handshake ended, handed out first.
    early: Vec<u8>,
    early_at: usize,
    /// The peer's close_notify arrived: a clean end.
    closed: bool,
}

impl std::fmt::Debug for RecordStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordStream")
            .field("sock", &self.sock)
            .field("version", &self.version)
            .finish()
    }
}

fn tls_io_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

/// TLS 1.3 handshake message types after the handshake (RFC 8446 §4).
const HS_HELLO_REQUEST: u8 = 0;
const HS_NEW_SESSION_TICKET: u8 = 4;
const HS_KEY_UPDATE: u8 = 24;

impl RecordStream {
    /// Server side: the handshake on `sock`, bounded by its read timeout.
    pub(crate) fn accept(sock: Stream, config: Arc<ServerConfig>) -> io::Result<RecordStream> {
        let mut conn = UnbufferedServerConnection::new(config).map_err(io::Error::other)?;
        let (buf, end, early) = drive(&mut conn, &sock)?;
        let info = Handshaken::of(&conn)?;
        let (secrets, kernel) = conn
            .dangerous_into_kernel_connection()
            .map_err(tls_io_error)?;
        RecordStream::new(sock, info, secrets, Kernel::Server(kernel), buf, end, early)
    }

    /// Client side: the handshake on `sock`, bounded by its read timeout.
    pub(crate) fn connect(
        sock: Stream,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> io::Result<RecordStream> {
        let mut conn = UnbufferedClientConnection::new(config, name).map_err(io::Error::other)?;
        let (buf, end, early) = drive(&mut conn, &sock)?;
        let info = Handshaken::of(&conn)?;
        let (secrets, kernel) = conn
            .dangerous_into_kernel_connection()
            .map_err(tls_io_error)?;
        RecordStream::new(sock, info, secrets, Kernel::Client(kernel), buf, end, early)
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        sock: Stream,
        info: Handshaken,
        secrets: ExtractedSecrets,
        kernel: Kernel,
        buf: Vec<u8>,
        end: usize,
        early: Vec<u8>,
    ) -> io::Result<RecordStream> {
        let suite = match &kernel {
            Kernel::Client(k) => k.negotiated_cipher_suite(),
            Kernel::Server(k) => k.negotiated_cipher_suite(),
            Kernel::Secrets { .. } => return Err(io::Error::other("not a rustls session")),
        };
        let limit = match suite {
            SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
            SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
        };
        let version = info.version;
        let keys = (
            RecordKey::new(version, secrets.tx)?,
            RecordKey::new(version, secrets.rx)?,
        );
        Ok(RecordStream::assemble(
            sock,
            format!("x509, {:?}, {:?}", info.protocol, suite.suite()),
            info,
            limit,
            kernel,
            keys,
            (buf, end, early),
        ))
    }

    /// A GnuTLS (PSK) session's records, taken over after its handshake:
    /// TLS 1.3, keys from its traffic secrets.
    pub(crate) fn from_psk(
        sock: Stream,
        parts: gnutls::RecordParts,
        describe: &str,
        client: bool,
    ) -> io::Result<RecordStream> {
        let (aead, hash, limit) = match parts.cipher {
            gnutls::ffi::CIPHER_AES_128_GCM => {
                (&ring::aead::AES_128_GCM, ring::hkdf::HKDF_SHA256, GCM_LIMIT)
            }
            gnutls::ffi::CIPHER_AES_256_GCM => {
                (&ring::aead::AES_256_GCM, ring::hkdf::HKDF_SHA384, GCM_LIMIT)
            }
            gnutls::ffi::CIPHER_CHACHA20_POLY1305 => (
                &ring::aead::CHACHA20_POLY1305,
                ring::hkdf::HKDF_SHA256,
                u64::MAX,
            ),
            c => return Err(io::Error::other(format!("TLS: unknown GnuTLS cipher {c}"))),
        };
        let tx = TrafficSecret::new(parts.write_secret, aead, hash);
        let rx = TrafficSecret::new(parts.read_secret, aead, hash);
        let keys = (tx.key(parts.write_seq)?, rx.key(parts.read_seq)?);
        let mut buf = parts.received;
        let end = buf.len();
        buf.resize(RECV_BUF.max(end), 0);
        let info = Handshaken {
            version: Version::Tls13,
            protocol: rustls::ProtocolVersion::TLSv1_3,
            peer_certs: None,
        };
        Ok(RecordStream::assemble(
            sock,
            describe.to_string(),
            info,
            limit,
            Kernel::Secrets { tx, rx, client },
            keys,
            (buf, end, Vec::new()),
        ))
    }

    fn assemble(
        sock: Stream,
        describe: String,
        info: Handshaken,
        limit: u64,
        kernel: Kernel,
        (tx, rx): (RecordKey, RecordKey),
        (buf, end, early): (Vec<u8>, usize, Vec<u8>),
    ) -> RecordStream {
        RecordStream {
            sock,
            version: info.version,
            describe,
            peer_certs: info.peer_certs,
            // A margin below the limit, as rustls keeps one.
            limit: limit - limit / 16,
            kernel: Mutex::new(kernel),
            send: Mutex::new(SendState {
                key: tx,
                out: vec![0; OUT_BUF],
                len: 0,
                broken: false,
            }),
            recv: Mutex::new(RecvState {
                key: rx,
                buf,
                start: 0,
                end,
                plain: 0..0,
                early,
                early_at: 0,
                closed: false,
            }),
            owe_update: AtomicBool::new(false),
        }
    }

    /// The plain socket under the session (shutdown, timeouts, peer name).
    pub(crate) fn socket(&self) -> &Stream {
        &self.sock
    }

    /// Protocol and cipher suite, for log lines.
    pub(crate) fn describe(&self) -> &str {
        &self.describe
    }

    /// The peer's certificate chain, as the handshake verified it.
    pub(crate) fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.peer_certs.clone()
    }

    /// Encrypts and sends `parts` as one ordered burst.
    pub(crate) fn send_all(&self, parts: &[&[u8]]) -> io::Result<()> {
        let sources: Vec<Source<'_, '_>> = parts.iter().map(|p| Source::Bytes(p)).collect();
        self.send_sources(&sources)
    }

    /// Sends `head` then guest memory: each record's plaintext is copied
    /// from guest memory straight into the record and sealed there (guest
    /// memory may change under us, so it is never sealed in place).
    pub(crate) fn send_volatile(&self, head: &[u8], bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        let mut sources = Vec::with_capacity(1 + bufs.len());
        sources.push(Source::Bytes(head));
        sources.extend(bufs.iter().map(Source::Guest));
        self.send_sources(&sources)
    }

    fn send_sources(&self, sources: &[Source<'_, '_>]) -> io::Result<()> {
        let mut st = self.send.lock_or_recover();
        if st.broken {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "TLS session cut by an earlier failed send",
            ));
        }
        self.pay_key_update(&mut st)?;
        let mut left: usize = sources.iter().map(Source::len).sum();
        let mut gather = Gather {
            sources,
            index: 0,
            offset: 0,
        };
        while left > 0 {
            let n = left.min(MAX_PLAIN);
            self.seal(&mut st, APPLICATION_DATA, n, |dst| gather.copy_to(dst))?;
            left -= n;
            if st.len >= SEND_CHUNK {
                self.flush(&mut st)?;
            }
        }
        self.flush(&mut st)?;
        // The reader may have been asked for a key update while we held the
        // lock, and left it to us.
        self.pay_key_update(&mut st)
    }

    /// Seals one record into the outgoing buffer (sending what is there
    /// first if it is full), updating the key first when it is used up.
    fn seal(
        &self,
        st: &mut SendState,
        content_type: u8,
        plain: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> io::Result<()> {
        if st.key.seq() >= self.limit {
            self.update_key(st)?;
        }
        self.seal_with_current_key(st, content_type, plain, fill)
    }

    fn seal_with_current_key(
        &self,
        st: &mut SendState,
        content_type: u8,
        plain: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> io::Result<()> {
        let n = st.key.record_len(plain);
        if st.len + n > st.out.len() {
            self.flush(st)?;
        }
        let SendState { key, out, len, .. } = st;
        key.seal(&mut out[*len..*len + n], content_type, plain, fill)?;
        *len += n;
        Ok(())
    }

    /// TLS 1.3: a KeyUpdate (sealed with the old key), then the new key.
    fn update_key(&self, st: &mut SendState) -> io::Result<()> {
        if self.version != Version::Tls13 {
            st.broken = true;
            return Err(io::Error::other(
                "TLS 1.2 session used up its key (no key update in TLS 1.2)",
            ));
        }
        // key_update, 1 byte: update_not_requested.
        let msg = [HS_KEY_UPDATE, 0, 0, 1, 0];
        self.seal_with_current_key(st, HANDSHAKE, msg.len(), |d| d.copy_from_slice(&msg))?;
        st.key = self.kernel.lock_or_recover().update_tx(self.version)?;
        Ok(())
    }

    /// Answers a key update the peer asked for, if one is owed.
    fn pay_key_update(&self, st: &mut SendState) -> io::Result<()> {
        if self.owe_update.swap(false, Ordering::AcqRel) {
            self.update_key(st)?;
            self.flush(st)?;
        }
        Ok(())
    }

    fn flush(&self, st: &mut SendState) -> io::Result<()> {
        if st.len == 0 {
            return Ok(());
        }
        let r = self.sock.send_all(&[&st.out[..st.len]]);
        st.len = 0;
        if r.is_err() {
            st.broken = true;
        }
        r
    }

    /// Reads decrypted bytes; `Ok(0)` after the peer's close_notify.
    /// Opens everything already received and returns as much of it as fits,
    /// so a reader sees a whole batch of small requests at once (the server
    /// batches its replies on that), not one TLS record per call.
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut rs = self.recv.lock_or_recover();
        let rs = &mut *rs;
        loop {
            let mut got = 0;
            if rs.early_at < rs.early.len() {
                let n = (rs.early.len() - rs.early_at).min(buf.len());
                buf[..n].copy_from_slice(&rs.early[rs.early_at..rs.early_at + n]);
                rs.early_at += n;
                got += n;
                if rs.early_at == rs.early.len() {
                    rs.early = Vec::new();
                    rs.early_at = 0;
                }
            }
            while got < buf.len() {
                if !rs.plain.is_empty() {
                    let n = rs.plain.len().min(buf.len() - got);
                    buf[got..got + n].copy_from_slice(&rs.buf[rs.plain.start..rs.plain.start + n]);
                    rs.plain.start += n;
                    got += n;
                    continue;
                }
                if !self.open_next(rs)? {
                    break;
                }
            }
            if got > 0 {
                return Ok(got);
            }
            if rs.closed {
                return Ok(0);
            }
            // Nothing opened is in hand and no whole record is here: a read
            // big enough for whole records takes them in place.
            if buf.len() >= DIRECT_READ {
                let n = self.read_direct(rs, buf)?;
                if n > 0 || rs.closed {
                    return Ok(n);
                }
                continue;
            }
            // Nothing opened is left (`plain` is empty): move the partial
            // record to the front and read more behind it.
            if rs.start > 0 {
                rs.buf.copy_within(rs.start..rs.end, 0);
                rs.end -= rs.start;
                rs.start = 0;
            }
            let n = self.sock.read_raw(&mut rs.buf[rs.end..])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection without a TLS close_notify",
                ));
            }
            rs.end += n;
        }
    }

    /// Opens the next record if it was received whole. False when there is
    /// none (or the peer closed).
    fn open_next(&self, rs: &mut RecvState) -> io::Result<bool> {
        if rs.closed {
            return Ok(false);
        }
        let at = rs.start;
        let Some(len) = Self::whole_record(&rs.buf, at, rs.end)? else {
            return Ok(false);
        };
        rs.start = at + len;
        let (ty, range) = rs.key.open(&mut rs.buf[at..at + len])?;
        let range = at + range.start..at + range.end;
        if ty == APPLICATION_DATA {
            rs.plain = range;
        } else {
            let plain = rs.buf[range].to_vec();
            self.control(rs, ty, &plain)?;
        }
        Ok(true)
    }

    /// A received alert: true for the peer's close_notify (a clean end).
    fn alert(bytes: &[u8]) -> io::Result<bool> {
        let &[level, desc] = bytes else {
            return Err(invalid("TLS: malformed alert"));
        };
        match rustls::AlertDescription::from(desc) {
            rustls::AlertDescription::CloseNotify => Ok(true),
            // Followed by a close_notify (RFC 8446 §6.1).
            rustls::AlertDescription::UserCanceled => Ok(false),
            d => Err(invalid(format!(
                "TLS: the peer sent alert {d:?} (level {level})"
            ))),
        }
    }

    /// Acts on an opened record that is not application data.
    fn control(&self, rs: &mut RecvState, ty: u8, plain: &[u8]) -> io::Result<()> {
        match ty {
            ALERT => rs.closed |= Self::alert(plain)?,
            HANDSHAKE => {
                let msgs = plain.to_vec();
                self.post_handshake(rs, &msgs)?;
            }
            CHANGE_CIPHER_SPEC if self.version == Version::Tls12 => {
                return Err(invalid("TLS: renegotiation is not supported"))
            }
            ty => {
                return Err(invalid(format!(
                    "TLS: unexpected record type {ty} after the handshake"
                )))
            }
        }
        Ok(())
    }

    /// The length of the whole record at `buf[at..end]`, if it is all there.
    fn whole_record(buf: &[u8], at: usize, end: usize) -> io::Result<Option<usize>> {
        if end - at < HEADER {
            return Ok(None);
        }
        let body = usize::from(u16::from_be_bytes([buf[at + 3], buf[at + 4]]));
        if body > MAX_BODY {
            return Err(invalid(format!(
                "TLS: a record of {body} bytes, more than the protocol allows"
            )));
        }
        Ok((end - at >= HEADER + body).then_some(HEADER + body))
    }

    /// A big read with nothing opened in hand: the records are received
    /// straight into `buf` (after the partial one we hold) and opened there,
    /// each one's plaintext moved up behind the previous one's in the same
    /// pass, so the bytes are not copied again. The partial record left at
    /// the end goes back into our buffer. `Ok(0)` when no whole record came
    /// (and the peer did not close): the caller reads the usual way.
    fn read_direct(&self, rs: &mut RecvState, buf: &mut [u8]) -> io::Result<usize> {
        let held = rs.end - rs.start;
        buf[..held].copy_from_slice(&rs.buf[rs.start..rs.end]);
        rs.start = 0;
        rs.end = 0;
        let n = self.sock.read_raw(&mut buf[held..])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection without a TLS close_notify",
            ));
        }
        let filled = held + n;
        let (mut at, mut out) = (0, 0);
        while !rs.closed {
            let Some(len) = Self::whole_record(buf, at, filled)? else {
                break;
            };
            let (ty, n) = rs.key.open_to(buf, at, len, out)?;
            at += len;
            if ty == APPLICATION_DATA {
                out += n;
            } else {
                self.control(rs, ty, &buf[out..out + n])?;
            }
        }
        if !rs.closed {
            let rest = filled - at;
            rs.buf[..rest].copy_from_slice(&buf[at..filled]);
            rs.end = rest;
        }
        Ok(out)
    }

    /// Handshake messages after the handshake: key updates and session
    /// tickets (TLS 1.3); a TLS 1.2 renegotiation request is ignored (no
    /// renegotiation, as rustls). A message split across records is refused:
    /// both are a few bytes.
    fn post_handshake(&self, rs: &mut RecvState, mut msgs: &[u8]) -> io::Result<()> {
        while !msgs.is_empty() {
            let split = || invalid("TLS: a post-handshake message split across records");
            let &[ty, a, b, c, ..] = msgs else {
                return Err(split());
            };
            let len = u32::from_be_bytes([0, a, b, c]) as usize;
            let body = msgs.get(4..4 + len).ok_or_else(split)?;
            msgs = &msgs[4 + len..];
            match (self.version, ty) {
                (Version::Tls13, HS_KEY_UPDATE) => {
                    let &[request] = body else {
                        return Err(invalid("TLS: malformed key_update"));
                    };
                    if request > 1 || !msgs.is_empty() {
                        return Err(invalid("TLS: malformed key_update"));
                    }
                    rs.key = self.kernel.lock_or_recover().update_rx(self.version)?;
                    if request == 1 {
                        self.owe_update.store(true, Ordering::Release);
                        // Sent now unless a sender holds the lock (it sends
                        // it next): the reader never waits behind a send
                        // that may be blocked on a peer waiting for us.
                        if let Ok(mut st) = self.send.try_lock() {
                            // A failure shows up at the next send.
                            let _ = self.pay_key_update(&mut st);
                        }
                    }
                }
                (Version::Tls13, HS_NEW_SESSION_TICKET) => {
                    self.kernel.lock_or_recover().session_ticket(body)?
                }
                (Version::Tls12, HS_HELLO_REQUEST) => {}
                _ => {
                    return Err(invalid(format!(
                        "TLS: unexpected handshake message {ty} after the handshake"
                    )))
                }
            }
        }
        Ok(())
    }
}

impl Drop for RecordStream {
    /// A close_notify, best effort and never blocking: the peer reads a
    /// clean end rather than a truncation.
    fn drop(&mut self) {
        let st = match self.send.get_mut() {
            Ok(st) => st,
            Err(poisoned) => poisoned.into_inner(),
        };
        if st.broken {
            return;
        }
        st.len = 0;
        // close_notify: level warning (1), description 0.
        let alert = [1u8, 0];
        let n = st.key.record_len(alert.len());
        if st
            .key
            .seal(&mut st.out[..n], ALERT, alert.len(), |d| {
                d.copy_from_slice(&alert)
            })
            .is_err()
        {
            return;
        }
        // SAFETY: the buffer is valid for `n` bytes for the whole call.
        let _ = unsafe {
            libc::send(
                self.sock.as_raw_fd(),
                st.out.as_ptr().cast(),
                n,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
    }
}

/// What the handshake settled, read before rustls hands the keys over.
struct Handshaken {
    version: Version,
    protocol: rustls::ProtocolVersion,
    peer_certs: Option<Vec<CertificateDer<'static>>>,
}

impl Handshaken {
    fn of(common: &rustls::CommonState) -> io::Result<Handshaken> {
        let protocol = common
            .protocol_version()
            .ok_or_else(|| io::Error::other("TLS handshake did not settle a version"))?;
        let version = match protocol {
            rustls::ProtocolVersion::TLSv1_3 => Version::Tls13,
            rustls::ProtocolVersion::TLSv1_2 => Version::Tls12,
            v => return Err(io::Error::other(format!("TLS: unsupported version {v:?}"))),
        };
        Ok(Handshaken {
            version,
            protocol,
            peer_certs: common
                .peer_certificates()
                .map(|c| c.iter().map(|d| d.clone().into_owned()).collect()),
        })
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
