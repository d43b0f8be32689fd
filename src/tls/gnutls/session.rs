//! One TLS-PSK session (GnuTLS) over a connected socket, shared by a
//! connection's reader thread and its senders as the rustls session is.
//!
//! GnuTLS allows one thread in `gnutls_record_send` while another is in
//! `gnutls_record_recv` on the same session (manual, "Thread safety"), as
//! long as nobody renegotiates (this link never does; a peer's request is
//! an error) and `GNUTLS_AUTO_REAUTH` is off (it is). A TLS 1.3 key update a
//! peer asks for is answered by the next send, not from inside the receive
//! (GnuTLS 3.6.3+, the minimum loaded). So senders take the send lock and
//! the reader the receive lock, and the two never wait for each other: a
//! sender blocked on a full socket never holds up the reader that would
//! drain the peer.
//!
//! The socket is driven through push/pull callbacks rather than a bare fd:
//! the reader pulls up to 256 KiB per `recv` and decrypts everything already
//! received before returning (so the NBD server sees a batch of requests at
//! once), and a send gathers its records into one `send` per 256 KiB.

use super::ffi::{self, Datum, GnutlsError, Lib};
use crate::sync::MutexExt;
use crate::tls::psk::{PskLookup, Secret};
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::sync::Mutex;
use thiserror::Error;
use vm_memory::VolatileSlice;

/// QEMU's session priority for PSK credentials (crypto/tlssession.c:
/// `NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK`), so both ends offer and accept the
/// same suites, with one change of order. GnuTLS ties an external PSK to
/// SHA-256, which rules out NORMAL's first TLS 1.3 suite (AES-256-GCM-SHA384)
/// and leaves ChaCha20-Poly1305 ahead of AES-128-GCM: 57 MB/s against
/// 1.3 GB/s through one session on this machine (AES-NI, GnuTLS 3.7.9).
/// So ChaCha20 goes last, and a server's order wins: QEMU's clients (which
/// list ChaCha20 first) get AES-128-GCM too.
const PRIORITY: &str =
    "NORMAL:%SERVER_PRECEDENCE:-CHACHA20-POLY1305:+CHACHA20-POLY1305:+ECDHE-PSK:+DHE-PSK:+PSK";
/// Largest TLS plaintext record.
const RECORD: usize = 16 << 10;
/// Ciphertext read per `recv`.
const RECV_BUF: usize = 256 << 10;
/// Sealed records gathered before a `send`.
const SEND_FLUSH: usize = 256 << 10;
/// `GNUTLS_E_REHANDSHAKE`.
const E_REHANDSHAKE: c_int = -37;
/// Non-fatal returns (warning alerts) tolerated in a row.
const MAX_NON_FATAL: u32 = 64;

/// Why a PSK session could not be set up.
#[derive(Debug, Error)]
pub enum HandshakeError {
    /// GnuTLS is missing or refused the session's setup.
    #[error(transparent)]
    Setup(#[from] GnutlsError),
    /// The socket failed, timed out or closed under the handshake.
    #[error("{0}")]
    Transport(#[source] io::Error),
    /// Server: the client's username is not in keys.psk.
    #[error("PSK username {0:?} is not in keys.psk")]
    UnknownUser(String),
    /// Server: the client's username is in keys.psk but not in --tls-authz.
    #[error("PSK username {0:?} is not authorised")]
    NotAuthorised(String),
    /// The TLS exchange failed: usually the other key.
    #[error("{message}")]
    Failed {
        /// GnuTLS's return code.
        code: i32,
        /// What to log: GnuTLS's text, the alert, and a hint.
        message: String,
    },
}

fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}

/// What the push/pull callbacks reach through the transport pointer.
struct Transport {
    fd: RawFd,
    rx: Mutex<Rx>,
    tx: Mutex<Tx>,
    /// The application traffic secrets, as the handshake installs them.
    secrets: Mutex<AppSecrets>,
}

/// TLS 1.3 application traffic secrets (wiped when dropped).
#[derive(Default)]
struct AppSecrets {
    read: Vec<u8>,
    write: Vec<u8>,
}

impl Drop for AppSecrets {
    fn drop(&mut self) {
        self.read.fill(0);
        self.write.fill(0);
    }
}

/// What the caller needs to seal and open an established TLS 1.3 session's
/// records itself: the suite, the application traffic secrets, the record
/// counts, and the bytes already received past the handshake.
pub(crate) struct RecordParts {
    /// `ffi::CIPHER_*`.
    pub cipher: c_int,
    /// Our application traffic secret (wiped by the receiver).
    pub write_secret: Vec<u8>,
    /// The peer's.
    pub read_secret: Vec<u8>,
    /// Records sent with them so far (the next one's sequence number).
    pub write_seq: u64,
    /// Records received with them so far.
    pub read_seq: u64,
    /// Ciphertext received and not yet opened.
    pub received: Vec<u8>,
}

struct Rx {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The reader already has data: say EAGAIN rather than block.
    nonblock: bool,
    /// The socket error behind GnuTLS's last pull error.
    err: Option<io::Error>,
}

struct Tx {
    buf: Vec<u8>,
    /// Gather records until the sender flushes.
    corked: bool,
    /// Never block (close_notify on the way out).
    dontwait: bool,
    /// The socket error behind GnuTLS's last push error.
    err: Option<io::Error>,
}

impl Transport {
    fn send_some(&self, buf: &[u8], dontwait: bool) -> io::Result<usize> {
        let flags = libc::MSG_NOSIGNAL | if dontwait { libc::MSG_DONTWAIT } else { 0 };
        loop {
            // SAFETY: buf is a valid slice for the call; send only reads it.
            let n = unsafe { libc::send(self.fd, buf.as_ptr().cast(), buf.len(), flags) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn send_all(&self, mut buf: &[u8], dontwait: bool) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self.send_some(buf, dontwait)?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            buf = &buf[n..];
        }
        Ok(())
    }

    fn set_nonblock(&self, on: bool) {
        self.rx.lock_or_recover().nonblock = on;
    }

    fn cork(&self) {
        self.tx.lock_or_recover().corked = true;
    }

    /// Sends what was gathered and stops gathering.
    fn uncork(&self) -> io::Result<()> {
        let mut tx = self.tx.lock_or_recover();
        tx.corked = false;
        let r = self.send_all(&tx.buf, tx.dontwait);
        tx.buf.clear();
        r
    }

    fn take_rx_err(&self) -> Option<io::Error> {
        self.rx.lock_or_recover().err.take()
    }

    fn take_tx_err(&self) -> Option<io::Error> {
        self.tx.lock_or_recover().err.take()
    }
}

/// Runs a callback body; a panic becomes an error return, never an unwind
/// into C.
fn guarded<R>(fail: R, f: impl FnOnce() -> R) -> R {
    std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or(fail)
}

/// Keeps the application traffic secrets (other levels are of no use).
unsafe extern "C" fn secret(
    session: ffi::Session,
    level: c_int,
    read: *const c_void,
    write: *const c_void,
    size: usize,
) -> c_int {
    guarded(-1, || {
        if level != ffi::LEVEL_APPLICATION {
            return 0;
        }
        let Some(fns) = ffi::lib().ok().and_then(|l| l.records.as_ref()) else {
            return 0;
        };
        // SAFETY: a live session in its handshake; its transport pointer is
        // the Box<Transport> the session registered, alive until deinit.
        let t = unsafe { &*((fns.transport_get_ptr)(session) as *const Transport) };
        let mut secrets = t.secrets.lock_or_recover();
        // SAFETY: GnuTLS passes `size`-byte secrets, or null for one not set.
        unsafe {
            if !read.is_null() {
                secrets.read = std::slice::from_raw_parts(read.cast::<u8>(), size).to_vec();
            }
            if !write.is_null() {
                secrets.write = std::slice::from_raw_parts(write.cast::<u8>(), size).to_vec();
            }
        }
        0
    })
}

unsafe extern "C" fn pull(ptr: ffi::TransportPtr, buf: *mut c_void, len: usize) -> isize {
    guarded(-1, || {
        // SAFETY: ptr is the Box<Transport> the session registered; it
        // outlives the GnuTLS session (dropped after gnutls_deinit).
        let t = unsafe { &*(ptr as *const Transport) };
        let mut rx = t.rx.lock_or_recover();
        if rx.start == rx.end {
            if rx.nonblock {
                set_errno(libc::EAGAIN);
                return -1;
            }
            rx.start = 0;
            rx.end = 0;
            loop {
                let cap = rx.buf.len();
                // SAFETY: rx.buf is a live buffer of `cap` bytes we own.
                let n = unsafe { libc::recv(t.fd, rx.buf.as_mut_ptr().cast(), cap, 0) };
                if n >= 0 {
                    rx.end = n as usize;
                    break;
                }
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // EAGAIN (the socket's read timeout) stays EAGAIN: GnuTLS
                // keeps its state and the caller decides.
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                rx.err = Some(e);
                set_errno(errno);
                return -1;
            }
            if rx.end == 0 {
                return 0;
            }
        }
        let n = len.min(rx.end - rx.start);
        // SAFETY: GnuTLS lent `buf` with room for `len` >= n bytes; the
        // source range is within rx.buf.
        unsafe { std::ptr::copy_nonoverlapping(rx.buf.as_ptr().add(rx.start), buf.cast(), n) };
        rx.start += n;
        byte_count(n)
    })
}

/// A byte count for GnuTLS's `ssize_t` returns: counts are of buffers
/// GnuTLS lent, so they fit.
fn byte_count(n: usize) -> isize {
    isize::try_from(n).unwrap_or(isize::MAX)
}

unsafe extern "C" fn push(ptr: ffi::TransportPtr, buf: *const c_void, len: usize) -> isize {
    guarded(-1, || {
        // SAFETY: as in `pull`.
        let t = unsafe { &*(ptr as *const Transport) };
        // SAFETY: GnuTLS lends `len` readable bytes at `buf` for the call.
        let data = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) };
        let mut tx = t.tx.lock_or_recover();
        let fail = |tx: &mut Tx, e: io::Error| {
            tx.err = Some(e);
            // Never EAGAIN: a record GnuTLS thinks unsent must not be
            // sent again by a retry.
            set_errno(libc::EIO);
            -1
        };
        if tx.corked {
            tx.buf.extend_from_slice(data);
            if tx.buf.len() >= SEND_FLUSH {
                let r = t.send_all(&tx.buf, tx.dontwait);
                tx.buf.clear();
                if let Err(e) = r {
                    return fail(&mut tx, e);
                }
            }
            return byte_count(len);
        }
        match t.send_some(data, tx.dontwait) {
            Ok(n) => byte_count(n),
            Err(e) => fail(&mut tx, e),
        }
    })
}

unsafe extern "C" fn pull_timeout(ptr: ffi::TransportPtr, ms: c_uint) -> c_int {
    guarded(-1, || {
        // SAFETY: as in `pull`.
        let t = unsafe { &*(ptr as *const Transport) };
        {
            let rx = t.rx.lock_or_recover();
            if rx.start < rx.end {
                return 1;
            }
        }
        let mut pfd = libc::pollfd {
            fd: t.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let timeout = if ms == ffi::INDEFINITE_TIMEOUT {
            -1
        } else {
            c_int::try_from(ms).unwrap_or(c_int::MAX)
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout) };
        rc.min(1)
    })
}

/// What the server's key callback consults and records, for one handshake.
struct Lookup<'a> {
    lookup: &'a dyn Fn(&[u8]) -> PskLookup,
    /// The username the client gave and what became of it.
    seen: RefCell<Option<(String, Seen)>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Seen {
    Found,
    Unknown,
    NotAuthorised,
}

unsafe extern "C" fn server_key(
    session: ffi::Session,
    username: *const c_char,
    key: *mut Datum,
) -> c_int {
    guarded(-1, || {
        let Ok(lib) = ffi::lib() else { return -1 };
        // SAFETY: the session is the one being handshaken on this thread.
        let ctx = unsafe { (lib.session_get_ptr)(session) } as *const Lookup<'_>;
        if ctx.is_null() || username.is_null() || key.is_null() {
            return -1;
        }
        // SAFETY: the pointer was set to a Lookup on the stack of
        // `Session::handshake`, which is inside gnutls_handshake on this
        // very thread, and is reset to null before that frame ends.
        let ctx = unsafe { &*ctx };
        // SAFETY: GnuTLS passes the client's identity NUL-terminated.
        let name = unsafe { CStr::from_ptr(username) }.to_bytes();
        let (seen, rc) = match (ctx.lookup)(name) {
            PskLookup::Key(secret) => {
                let bytes = secret.bytes();
                // SAFETY: gnutls_malloc is GnuTLS's allocator; GnuTLS frees
                // the key with gnutls_free after deriving the secrets.
                let p = unsafe { (lib.malloc)(bytes.len().max(1)) }.cast::<u8>();
                if p.is_null() {
                    return -1;
                }
                // SAFETY: p has room for bytes.len() bytes; key is GnuTLS's
                // out-parameter for this call.
                unsafe {
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, bytes.len());
                    (*key).data = p;
                    (*key).size = bytes.len() as c_uint;
                }
                (Seen::Found, 0)
            }
            // 1: GnuTLS goes on with a random key, so the client cannot
            // tell an unknown or refused name from a wrong key.
            PskLookup::Unknown => (Seen::Unknown, 1),
            PskLookup::NotAuthorised => (Seen::NotAuthorised, 1),
        };
        *ctx.seen.borrow_mut() = Some((String::from_utf8_lossy(name).into_owned(), seen));
        rc
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Server,
    Client,
}

/// An established TLS-PSK session over `sock`.
pub(crate) struct Session<S: AsRawFd> {
    lib: &'static Lib,
    raw: ffi::Session,
    side: Side,
    creds: ffi::Creds,
    established: bool,
    transport: Box<Transport>,
    send: Mutex<Vec<u8>>,
    recv: Mutex<RecvState>,
    /// The client's username (both sides).
    username: String,
    /// Protocol and suites, for log lines.
    desc: String,
    sock: S,
}

#[derive(Default)]
struct RecvState {
    /// An error met after data was already returned; reported next.
    pending: Option<io::Error>,
    closed: bool,
}

// SAFETY: the GnuTLS session is used by at most one sender (under `send`)
// and one receiver (under `recv`) at a time, which GnuTLS supports; the
// handshake and gnutls_deinit happen while the value is not shared; the
// transport's buffers sit behind their own mutexes.
unsafe impl<S: AsRawFd + Send> Send for Session<S> {}
// SAFETY: as above: every &self method takes the lock of its direction.
unsafe impl<S: AsRawFd + Sync> Sync for Session<S> {}

impl<S: AsRawFd> std::fmt::Debug for Session<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PskSession")
            .field("fd", &self.sock.as_raw_fd())
            .field("username", &self.username)
            .field("desc", &self.desc)
            .finish()
    }
}

impl<S: AsRawFd> Session<S> {
    fn new(sock: S, side: Side) -> Result<Session<S>, HandshakeError> {
        let lib = ffi::lib()?;
        let transport = Box::new(Transport {
            fd: sock.as_raw_fd(),
            rx: Mutex::new(Rx {
                buf: vec![0; RECV_BUF],
                start: 0,
                end: 0,
                nonblock: false,
                err: None,
            }),
            tx: Mutex::new(Tx {
                buf: Vec::new(),
                corked: false,
                dontwait: false,
                err: None,
            }),
            secrets: Mutex::new(AppSecrets::default()),
        });
        let flags = ffi::NO_TICKETS
            | match side {
                Side::Server => ffi::SERVER,
                Side::Client => ffi::CLIENT,
            };
        let mut raw: ffi::Session = std::ptr::null_mut();
        // SAFETY: gnutls_init writes a new session into `raw`.
        let rc = unsafe { (lib.init)(&mut raw, flags) };
        lib.check("gnutls_init", rc)?;
        let mut s = Session {
            lib,
            raw,
            side,
            creds: std::ptr::null_mut(),
            established: false,
            transport,
            send: Mutex::new(Vec::with_capacity(RECORD)),
            recv: Mutex::new(RecvState::default()),
            username: String::new(),
            desc: String::new(),
            sock,
        };
        let prio = CString::new(PRIORITY).map_err(|_| GnutlsError::Call {
            call: "gnutls_priority_set_direct",
            code: 0,
            message: "bad priority string".into(),
        })?;
        let tp = std::ptr::addr_of!(*s.transport) as *mut c_void;
        // SAFETY: `raw` is a live session; the priority string is
        // NUL-terminated (GnuTLS copies it); `tp` points to the boxed
        // Transport that lives as long as `s`, which deinits the session
        // before dropping it; the callbacks have GnuTLS's signatures.
        let rc = unsafe {
            let rc = (lib.priority_set_direct)(s.raw, prio.as_ptr(), std::ptr::null_mut());
            (lib.transport_set_ptr)(s.raw, tp);
            (lib.transport_set_push_function)(s.raw, push);
            (lib.transport_set_pull_function)(s.raw, pull);
            (lib.transport_set_pull_timeout_function)(s.raw, pull_timeout);
            // The socket's read timeout bounds the handshake, as for rustls.
            (lib.handshake_set_timeout)(s.raw, 0);
            if let Some(fns) = &lib.records {
                (fns.handshake_set_secret_function)(s.raw, secret);
            }
            rc
        };
        lib.check("gnutls_priority_set_direct", rc)?;
        let mut creds: ffi::Creds = std::ptr::null_mut();
        // SAFETY: the allocators write a new credentials object into `creds`.
        let rc = unsafe {
            match side {
                Side::Server => (lib.psk_allocate_server_credentials)(&mut creds),
                Side::Client => (lib.psk_allocate_client_credentials)(&mut creds),
            }
        };
        lib.check("gnutls_psk_allocate_credentials", rc)?;
        s.creds = creds;
        Ok(s)
    }

    /// Accepts a client: its username picks the key through `lookup`,
    /// which also applies `--tls-authz`. Bounded by the socket's read timeout.
    pub(crate) fn server(
        sock: S,
        lookup: &dyn Fn(&[u8]) -> PskLookup,
    ) -> Result<Session<S>, HandshakeError> {
        let mut s = Session::new(sock, Side::Server)?;
        let ctx = Lookup {
            lookup,
            seen: RefCell::new(None),
        };
        // SAFETY: live session and credentials; the callback has GnuTLS's
        // signature; GnuTLS keeps a pointer to `creds`, which outlives the
        // session (freed after gnutls_deinit).
        let rc = unsafe {
            (s.lib.psk_set_server_credentials_function)(s.creds, server_key);
            (s.lib.credentials_set)(s.raw, ffi::CRD_PSK, s.creds)
        };
        s.lib.check("gnutls_credentials_set", rc)?;
        // SAFETY: `ctx` outlives the handshake below, and the pointer is
        // cleared before `ctx` goes out of scope.
        unsafe { (s.lib.session_set_ptr)(s.raw, std::ptr::addr_of!(ctx) as *mut c_void) };
        let r = s.handshake();
        // SAFETY: live session; clears the pointer to `ctx`.
        unsafe { (s.lib.session_set_ptr)(s.raw, std::ptr::null_mut()) };
        let seen = ctx.seen.borrow().clone();
        match (r, seen) {
            (_, Some((name, Seen::Unknown))) => Err(HandshakeError::UnknownUser(name)),
            (_, Some((name, Seen::NotAuthorised))) => Err(HandshakeError::NotAuthorised(name)),
            (Err(HandshakeError::Failed { code, message }), Some((name, Seen::Found))) => {
                let hint = if matches!(
                    code,
                    ffi::E_RECEIVED_ILLEGAL_PARAMETER | ffi::E_DECRYPTION_FAILED
                ) {
                    "; the client's key does not match the one keys.psk holds for it"
                } else {
                    ""
                };
                Err(HandshakeError::Failed {
                    code,
                    message: format!("PSK username {name:?}: {message}{hint}"),
                })
            }
            (Err(e), _) => Err(e),
            (Ok(()), seen) => {
                // SAFETY: live session after a PSK handshake: the username
                // is a NUL-terminated string GnuTLS owns (null otherwise).
                let name = unsafe { ffi::text((s.lib.psk_server_get_username)(s.raw)) };
                // Only a key this lookup handed out can have completed it.
                if seen.as_ref().map(|(n, k)| (n.as_str(), *k))
                    != Some((name.as_str(), Seen::Found))
                {
                    return Err(HandshakeError::Failed {
                        code: 0,
                        message: format!("PSK username {name:?} was not looked up"),
                    });
                }
                s.username = name;
                Ok(s)
            }
        }
    }

    /// Connects as `username` with `key`. Bounded by the socket's read timeout.
    pub(crate) fn client(
        sock: S,
        username: &str,
        key: &Secret,
    ) -> Result<Session<S>, HandshakeError> {
        let mut s = Session::new(sock, Side::Client)?;
        let name = CString::new(username).map_err(|_| HandshakeError::Failed {
            code: 0,
            message: format!("PSK username {username:?} contains a NUL byte"),
        })?;
        let bytes = key.bytes();
        let datum = Datum {
            data: bytes.as_ptr() as *mut u8,
            size: bytes.len() as c_uint,
        };
        // SAFETY: live credentials and session; GnuTLS copies the username
        // and the key (it does not write through `data`).
        let rc = unsafe {
            (s.lib.psk_set_client_credentials)(s.creds, name.as_ptr(), &datum, ffi::PSK_KEY_RAW)
        };
        s.lib.check("gnutls_psk_set_client_credentials", rc)?;
        // SAFETY: as in `server`.
        let rc = unsafe { (s.lib.credentials_set)(s.raw, ffi::CRD_PSK, s.creds) };
        s.lib.check("gnutls_credentials_set", rc)?;
        s.username = username.to_string();
        match s.handshake() {
            Ok(()) => Ok(s),
            Err(HandshakeError::Failed { code, message }) => {
                let hint = if matches!(
                    code,
                    ffi::E_FATAL_ALERT_RECEIVED
                        | ffi::E_PREMATURE_TERMINATION
                        | ffi::E_DECRYPTION_FAILED
                        | ffi::E_RECEIVED_ILLEGAL_PARAMETER
                ) {
                    format!(
                        "; a server that does not know username {username:?}, or holds \
                         another key for it, ends the handshake this way"
                    )
                } else {
                    String::new()
                };
                Err(HandshakeError::Failed {
                    code,
                    message: format!("{message}{hint}"),
                })
            }
            Err(e) => Err(e),
        }
    }

    fn handshake(&mut self) -> Result<(), HandshakeError> {
        let mut non_fatal = 0;
        loop {
            // SAFETY: live, fully set-up session, used by this thread only.
            let rc = unsafe { (self.lib.handshake)(self.raw) };
            if rc == 0 {
                break;
            }
            if rc == ffi::E_AGAIN {
                // Only our pull says EAGAIN while blocking: the read timeout.
                let e = self
                    .transport
                    .take_rx_err()
                    .unwrap_or_else(|| io::ErrorKind::TimedOut.into());
                return Err(HandshakeError::Transport(e));
            }
            if rc == ffi::E_INTERRUPTED || (!self.lib.is_fatal(rc) && non_fatal < MAX_NON_FATAL) {
                non_fatal += 1;
                continue;
            }
            if rc == ffi::E_PREMATURE_TERMINATION {
                // How QEMU's server refuses a key: it hangs up, no alert.
                return Err(HandshakeError::Failed {
                    code: rc,
                    message: "the peer closed the connection during the handshake".into(),
                });
            }
            if let Some(e) = self.transport_error(rc) {
                return Err(HandshakeError::Transport(e));
            }
            // Tell the peer why, best effort (it may be gone).
            // SAFETY: live session; sends one alert record.
            let _ = unsafe { (self.lib.alert_send_appropriate)(self.raw, rc) };
            return Err(HandshakeError::Failed {
                code: rc,
                message: self.describe(rc),
            });
        }
        self.established = true;
        // SAFETY: live session after its handshake; the description is
        // allocated by GnuTLS and freed here with gnutls_free.
        self.desc = unsafe {
            let p = (self.lib.session_get_desc)(self.raw);
            let d = ffi::text(p);
            if !p.is_null() {
                (self.lib.free)(p.cast());
            }
            let kx = ffi::text((self.lib.kx_get_name)((self.lib.kx_get)(self.raw)));
            format!("{kx} {d}")
        };
        Ok(())
    }

    /// The socket error behind a push or pull failure, if that is what `rc` is.
    fn transport_error(&self, rc: c_int) -> Option<io::Error> {
        match rc {
            ffi::E_PULL_ERROR => self.transport.take_rx_err(),
            ffi::E_PUSH_ERROR => self.transport.take_tx_err(),
            ffi::E_PREMATURE_TERMINATION => Some(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection without a TLS close_notify",
            )),
            _ => None,
        }
    }

    /// GnuTLS's text for `rc`, with the alert the peer sent if that is why.
    fn describe(&self, rc: c_int) -> String {
        let mut msg = self.lib.strerror(rc).trim_end_matches('.').to_string();
        if rc == ffi::E_FATAL_ALERT_RECEIVED || rc == ffi::E_WARNING_ALERT_RECEIVED {
            // SAFETY: live session; the alert name is a static string.
            let alert =
                unsafe { ffi::text((self.lib.alert_get_name)((self.lib.alert_get)(self.raw))) };
            if !alert.is_empty() {
                msg = format!("{msg} (peer's alert: {alert})");
            }
        }
        msg
    }

    /// The socket under the session.
    pub(crate) fn socket(&self) -> &S {
        &self.sock
    }

    /// The client's PSK username (the identity `--tls-authz` lists).
    pub(crate) fn username(&self) -> &str {
        &self.username
    }

    /// Hands the established session's records over to the caller, who
    /// seals and opens them from now on (see [`RecordParts`]): TLS 1.3 with
    /// an AEAD suite the caller knows, nothing decrypted and unread, nothing
    /// unsent, and GnuTLS 3.7.0 or later (the secrets). `None` otherwise:
    /// the session carries on with GnuTLS. Afterwards the session must only
    /// be dropped (which then sends nothing).
    pub(crate) fn take_records(&mut self) -> Option<RecordParts> {
        let fns = self.lib.records.as_ref()?;
        if !self.established {
            return None;
        }
        // SAFETY: live established session, not shared yet (just handshaken).
        let (version, cipher, pending) = unsafe {
            (
                (fns.protocol_get_version)(self.raw),
                (fns.cipher_get)(self.raw),
                (fns.record_check_pending)(self.raw),
            )
        };
        let known = [
            ffi::CIPHER_AES_128_GCM,
            ffi::CIPHER_AES_256_GCM,
            ffi::CIPHER_CHACHA20_POLY1305,
        ];
        if version != ffi::TLS1_3 || !known.contains(&cipher) || pending > 0 {
            return None;
        }
        if !self.transport.tx.lock_or_recover().buf.is_empty() {
            return None;
        }
        let seq = |read: c_uint| {
            let mut n = [0u8; 8];
            let d = || Datum {
                data: std::ptr::null_mut(),
                size: 0,
            };
            let (mut mac, mut iv, mut key) = (d(), d(), d());
            // SAFETY: live session; GnuTLS fills the datums with pointers
            // into its own state (not to be freed) and 8 bytes into `n`.
            let rc = unsafe {
                (fns.record_get_state)(self.raw, read, &mut mac, &mut iv, &mut key, n.as_mut_ptr())
            };
            (rc >= 0).then_some(u64::from_be_bytes(n))
        };
        let (write_seq, read_seq) = (seq(0)?, seq(1)?);
        let (write_secret, read_secret) = {
            let s = self.transport.secrets.lock_or_recover();
            if s.read.is_empty() || s.write.is_empty() {
                return None;
            }
            (s.write.clone(), s.read.clone())
        };
        let received = {
            let rx = self.transport.rx.lock_or_recover();
            rx.buf[rx.start..rx.end].to_vec()
        };
        // GnuTLS's record state is stale from here: no close_notify from it.
        self.established = false;
        Some(RecordParts {
            cipher,
            write_secret,
            read_secret,
            write_seq,
            read_seq,
            received,
        })
    }

    /// Protocol, key exchange and cipher, e.g. `(TLS1.3-PSK)-(ECDHE-SECP256R1)-(AES-256-GCM)`.
    pub(crate) fn description(&self) -> &str {
        &self.desc
    }

    /// Seals one record (at most [`RECORD`] bytes of `data`); the send
    /// lock is held. Returns the bytes taken.
    fn record(&self, data: &[u8]) -> io::Result<usize> {
        let mut retries = 0;
        loop {
            // SAFETY: live established session; only the holder of the send
            // lock sends; `data` is valid for the call.
            let n = unsafe { (self.lib.record_send)(self.raw, data.as_ptr().cast(), data.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let rc = n as c_int;
            if (rc == ffi::E_AGAIN || rc == ffi::E_INTERRUPTED) && retries < MAX_NON_FATAL {
                retries += 1;
                continue;
            }
            return Err(self.transport_error(rc).unwrap_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("TLS send: {}", self.describe(rc)),
                )
            }));
        }
    }

    /// Appends `src` to the records being built; full records are sealed.
    fn stage(&self, stage: &mut Vec<u8>, mut src: &[u8]) -> io::Result<()> {
        while !src.is_empty() {
            if stage.is_empty() && src.len() >= RECORD {
                let n = self.record(&src[..RECORD])?;
                src = &src[n..];
                continue;
            }
            let n = (RECORD - stage.len()).min(src.len());
            stage.extend_from_slice(&src[..n]);
            src = &src[n..];
            if stage.len() == RECORD {
                self.seal(stage)?;
            }
        }
        Ok(())
    }

    fn seal(&self, stage: &mut Vec<u8>) -> io::Result<()> {
        let mut at = 0;
        while at < stage.len() {
            at += self.record(&stage[at..])?;
        }
        stage.clear();
        Ok(())
    }

    /// Runs `fill` with the send lock held and records gathered into
    /// few socket sends; everything is on the wire (or failed) on return.
    fn sending(&self, fill: impl FnOnce(&mut Vec<u8>) -> io::Result<()>) -> io::Result<()> {
        let mut stage = self.send.lock_or_recover();
        stage.clear();
        self.transport.cork();
        let r = fill(&mut stage).and_then(|()| self.seal(&mut stage));
        stage.clear();
        let flushed = self.transport.uncork();
        r.and(flushed)
    }

    /// Encrypts and sends `parts` as one ordered burst.
    pub(crate) fn send_all(&self, parts: &[&[u8]]) -> io::Result<()> {
        self.sending(|stage| {
            for p in parts {
                self.stage(stage, p)?;
            }
            Ok(())
        })
    }

    /// Sends `head` then guest memory, copied a record at a time (guest
    /// memory may change under us; GnuTLS reads plain bytes).
    pub(crate) fn send_volatile(&self, head: &[u8], bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        self.sending(|stage| {
            self.stage(stage, head)?;
            for b in bufs {
                let mut off = 0;
                while off < b.len() {
                    let n = (RECORD - stage.len()).min(b.len() - off);
                    let at = stage.len();
                    stage.resize(at + n, 0);
                    let piece = b.subslice(off, n).map_err(io::Error::other)?;
                    piece.copy_to(&mut stage[at..]);
                    off += n;
                    if stage.len() == RECORD {
                        self.seal(stage)?;
                    }
                }
            }
            Ok(())
        })
    }

    /// Reads decrypted bytes; `Ok(0)` after the peer's close_notify. Blocks
    /// only while nothing was read: after the first record it returns what
    /// was already received and decrypts no further than that.
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut st = self.recv.lock_or_recover();
        if let Some(e) = st.pending.take() {
            return Err(e);
        }
        if st.closed {
            return Ok(0);
        }
        let mut got = 0;
        let mut non_fatal = 0;
        let r = loop {
            self.transport.set_nonblock(got > 0);
            let rest = &mut buf[got..];
            // SAFETY: live established session; only the holder of the
            // receive lock receives; `rest` is writable for the call.
            let n =
                unsafe { (self.lib.record_recv)(self.raw, rest.as_mut_ptr().cast(), rest.len()) };
            if n > 0 {
                got += n as usize;
                if got == buf.len() {
                    break Ok(got);
                }
                continue;
            }
            if n == 0 {
                st.closed = true;
                break Ok(got);
            }
            let rc = n as c_int;
            if rc == ffi::E_AGAIN && got > 0 {
                break Ok(got);
            }
            let e = if rc == ffi::E_AGAIN {
                // Blocking and still EAGAIN: the socket's read timeout.
                self.transport
                    .take_rx_err()
                    .unwrap_or_else(|| io::ErrorKind::WouldBlock.into())
            } else if rc == ffi::E_INTERRUPTED
                || (rc != E_REHANDSHAKE && !self.lib.is_fatal(rc) && non_fatal < MAX_NON_FATAL)
            {
                non_fatal += 1;
                continue;
            } else if rc == E_REHANDSHAKE {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the peer asked for a TLS renegotiation, which this link does not do",
                )
            } else {
                self.transport_error(rc).unwrap_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("TLS receive: {}", self.describe(rc)),
                    )
                })
            };
            if got > 0 {
                st.pending = Some(e);
                break Ok(got);
            }
            break Err(e);
        };
        self.transport.set_nonblock(false);
        r
    }
}

impl<S: AsRawFd> Drop for Session<S> {
    fn drop(&mut self) {
        if self.established {
            // A close_notify, best effort and never blocking: the peer may
            // be gone, or the socket full.
            {
                let mut tx = self.transport.tx.lock_or_recover();
                tx.dontwait = true;
                tx.corked = false;
            }
            // SAFETY: live session, no other user left (we are in drop).
            let _ = unsafe { (self.lib.bye)(self.raw, ffi::SHUT_WR) };
        }
        // SAFETY: the session, then the credentials it points to, each
        // freed once; the transport box is dropped after this.
        unsafe {
            (self.lib.deinit)(self.raw);
            if !self.creds.is_null() {
                match self.side {
                    Side::Server => (self.lib.psk_free_server_credentials)(self.creds),
                    Side::Client => (self.lib.psk_free_client_credentials)(self.creds),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::psk::PskKeys;
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    fn key(hex: &str) -> Secret {
        let text = format!("alice:{hex}\n");
        let keys = PskKeys::parse(Path::new("test"), text.as_bytes()).unwrap();
        keys.get(b"alice").unwrap().clone()
    }

    const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    /// A server knowing only alice's key, and a client; both handshakes run
    /// at once (each waits for the other).
    fn pair(
        client_name: &'static str,
        client_key: Secret,
    ) -> (
        Result<Session<UnixStream>, HandshakeError>,
        Result<Session<UnixStream>, HandshakeError>,
    ) {
        let (a, b) = UnixStream::pair().unwrap();
        for s in [&a, &b] {
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        }
        let server = std::thread::spawn(move || {
            let k = key(KEY);
            Session::server(a, &|name| {
                if name == b"alice" {
                    PskLookup::Key(k.clone())
                } else if name == b"mallory" {
                    PskLookup::NotAuthorised
                } else {
                    PskLookup::Unknown
                }
            })
        });
        let client = Session::client(b, client_name, &client_key);
        (server.join().unwrap(), client)
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn both_directions_stream_at_once_through_one_session_per_side() {
        let (server, client) = pair("alice", key(KEY));
        let (server, client) = (Arc::new(server.unwrap()), Arc::new(client.unwrap()));
        assert_eq!(server.username(), "alice");
        // ECDHE (forward secrecy) and AES-128-GCM (see PRIORITY).
        assert!(
            server.description().starts_with("ECDHE-PSK (TLS1.3)")
                && server.description().contains("AES-128-GCM"),
            "{}",
            server.description()
        );
        // Each side sends 16 MiB while the other does the same: with one
        // lock for both directions, both senders would fill the socket and
        // wait for readers that wait for that lock.
        const TOTAL: usize = 16 << 20;
        let mut threads = Vec::new();
        for (seed, s) in [(1u8, &server), (2u8, &client)] {
            let tx = Arc::clone(s);
            threads.push(std::thread::spawn(move || {
                let chunk = pattern(seed, 1 << 20);
                for _ in 0..TOTAL / chunk.len() {
                    // Small head and big tail, as NBD replies and writes go.
                    tx.send_all(&[&chunk[..16], &chunk[16..]]).unwrap();
                }
            }));
            let rx = Arc::clone(s);
            let want = pattern(if seed == 1 { 2 } else { 1 }, 1 << 20);
            threads.push(std::thread::spawn(move || {
                let mut got = 0;
                let mut buf = vec![0u8; 300 << 10];
                while got < TOTAL {
                    let n = rx.read(&mut buf).unwrap();
                    assert!(n > 0, "early EOF at {got}");
                    for (i, b) in buf[..n].iter().enumerate() {
                        assert_eq!(*b, want[(got + i) % want.len()], "byte {}", got + i);
                    }
                    got += n;
                }
            }));
        }
        for t in threads {
            t.join().unwrap();
        }
        // A close_notify when the client goes: the server reads a clean end.
        drop(client);
        assert_eq!(server.read(&mut [0u8; 16]).unwrap(), 0);
    }

    #[test]
    fn a_read_timeout_is_an_error_the_session_survives() {
        let (server, client) = pair("alice", key(KEY));
        let (server, client) = (server.unwrap(), client.unwrap());
        server
            .socket()
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let e = server.read(&mut [0u8; 64]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
        client.send_all(&[b"still here"]).unwrap();
        let mut buf = [0u8; 64];
        let n = server.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"still here");
    }

    #[test]
    fn a_wrong_key_an_unknown_and_a_refused_username_fail_on_both_sides() {
        let other = "ff".repeat(32);
        let (server, client) = pair("alice", key(&other));
        match server {
            Err(HandshakeError::Failed { message, .. }) => {
                assert!(
                    message.contains("alice") && message.contains("does not match"),
                    "{message}"
                )
            }
            other => panic!("{other:?}"),
        }
        let e = client.unwrap_err().to_string();
        assert!(e.contains("\"alice\""), "{e}");

        let (server, client) = pair("bob", key(KEY));
        assert!(matches!(server, Err(HandshakeError::UnknownUser(n)) if n == "bob"));
        client.unwrap_err();

        let (server, client) = pair("mallory", key(KEY));
        assert!(matches!(server, Err(HandshakeError::NotAuthorised(n)) if n == "mallory"));
        client.unwrap_err();
    }
}
