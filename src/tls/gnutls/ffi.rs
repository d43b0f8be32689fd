//! The GnuTLS functions the PSK path calls, looked up at run time with
//! `dlopen("libgnutls.so.30")`: the binary has no link-time dependency on
//! GnuTLS, and a machine without it only loses `--tls-creds-psk`.
//!
//! Types and constants are GnuTLS 3's ABI (`gnutls/gnutls.h`, soname 30).
//! The library is opened once and never closed.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::sync::OnceLock;
use thiserror::Error;

/// The library opened (QEMU's GnuTLS; Debian package libgnutls30).
pub const LIBRARY: &str = "libgnutls.so.30";
/// Environment variable naming another file to open instead of [`LIBRARY`].
pub const LIBRARY_ENV: &str = "COLO_BLK_LIBGNUTLS";
/// Oldest GnuTLS accepted: TLS 1.3, and a key update a peer asks for is
/// answered by the next send instead of from inside a receive (3.6.3), which
/// is what lets one thread send while another receives.
pub const MIN_VERSION: &str = "3.6.5";

/// `gnutls_session_t`.
pub type Session = *mut c_void;
/// `gnutls_psk_server_credentials_t` / `gnutls_psk_client_credentials_t`.
pub type Creds = *mut c_void;
/// `gnutls_transport_ptr_t`.
pub type TransportPtr = *mut c_void;

/// `gnutls_datum_t`.
#[repr(C)]
#[derive(Debug)]
pub struct Datum {
    /// The bytes.
    pub data: *mut u8,
    /// Their number.
    pub size: c_uint,
}

/// `gnutls_pull_func`.
pub type PullFn = unsafe extern "C" fn(TransportPtr, *mut c_void, usize) -> isize;
/// `gnutls_push_func`.
pub type PushFn = unsafe extern "C" fn(TransportPtr, *const c_void, usize) -> isize;
/// `gnutls_pull_timeout_func`.
pub type PullTimeoutFn = unsafe extern "C" fn(TransportPtr, c_uint) -> c_int;
/// `gnutls_psk_server_credentials_function`: 0 with `key` set, 1 for an
/// unknown user (GnuTLS then uses a random key, so a client cannot tell an
/// unknown name from a wrong key), negative to abort.
pub type ServerKeyFn = unsafe extern "C" fn(Session, *const c_char, *mut Datum) -> c_int;

/// `gnutls_handshake_secret_func`: the traffic secrets of an encryption
/// level as the handshake installs them (either may be null).
pub type SecretFn =
    unsafe extern "C" fn(Session, c_int, *const c_void, *const c_void, usize) -> c_int;

/// `GNUTLS_ENCRYPTION_LEVEL_APPLICATION`.
pub const LEVEL_APPLICATION: c_int = 3;
/// `GNUTLS_TLS1_3`.
pub const TLS1_3: c_int = 5;
/// `GNUTLS_CIPHER_AES_128_GCM`.
pub const CIPHER_AES_128_GCM: c_int = 10;
/// `GNUTLS_CIPHER_AES_256_GCM`.
pub const CIPHER_AES_256_GCM: c_int = 11;
/// `GNUTLS_CIPHER_CHACHA20_POLY1305`.
pub const CIPHER_CHACHA20_POLY1305: c_int = 23;

/// `gnutls_init` flags.
pub const SERVER: c_uint = 1;
/// Client side.
pub const CLIENT: c_uint = 1 << 1;
/// No session tickets: one long-lived connection, nothing to resume.
pub const NO_TICKETS: c_uint = 1 << 10;
/// `GNUTLS_CRD_PSK`.
pub const CRD_PSK: c_int = 4;
/// `GNUTLS_PSK_KEY_RAW`.
pub const PSK_KEY_RAW: c_int = 0;
/// `GNUTLS_SHUT_WR`.
pub const SHUT_WR: c_int = 1;
/// `GNUTLS_INDEFINITE_TIMEOUT`.
pub const INDEFINITE_TIMEOUT: c_uint = u32::MAX - 1;

/// Error codes the session handles by name.
pub const E_AGAIN: c_int = -28;
/// `GNUTLS_E_INTERRUPTED`.
pub const E_INTERRUPTED: c_int = -52;
/// `GNUTLS_E_PREMATURE_TERMINATION`: EOF without close_notify.
pub const E_PREMATURE_TERMINATION: c_int = -110;
/// `GNUTLS_E_FATAL_ALERT_RECEIVED`.
pub const E_FATAL_ALERT_RECEIVED: c_int = -12;
/// `GNUTLS_E_WARNING_ALERT_RECEIVED`.
pub const E_WARNING_ALERT_RECEIVED: c_int = -16;
/// `GNUTLS_E_DECRYPTION_FAILED` (bad record MAC).
pub const E_DECRYPTION_FAILED: c_int = -24;
/// `GNUTLS_E_RECEIVED_ILLEGAL_PARAMETER` (a TLS 1.3 PSK binder that does
/// not verify, i.e. the other key).
pub const E_RECEIVED_ILLEGAL_PARAMETER: c_int = -55;
/// `GNUTLS_E_PUSH_ERROR`.
pub const E_PUSH_ERROR: c_int = -53;
/// `GNUTLS_E_PULL_ERROR`.
pub const E_PULL_ERROR: c_int = -54;

/// Why GnuTLS could not be used.
#[derive(Debug, Clone, Error)]
pub enum GnutlsError {
    /// dlopen failed.
    #[error(
        "TLS-PSK runs on GnuTLS, loaded at start, and {library} cannot be loaded: {why} \
         (install GnuTLS {MIN_VERSION} or later: Debian package libgnutls30)"
    )]
    Missing {
        /// The file asked for.
        library: String,
        /// dlerror's text.
        why: String,
    },
    /// The library lacks a function.
    #[error("{library} has no {symbol}: TLS-PSK needs GnuTLS {MIN_VERSION} or later")]
    Symbol {
        /// The file opened.
        library: String,
        /// The function.
        symbol: &'static str,
    },
    /// The library is older than [`MIN_VERSION`].
    #[error("{library} is GnuTLS {found}: TLS-PSK needs {MIN_VERSION} or later")]
    TooOld {
        /// The file opened.
        library: String,
        /// Its version.
        found: String,
    },
    /// A GnuTLS call returned an error.
    #[error("{call}: {message}")]
    Call {
        /// The function.
        call: &'static str,
        /// Its return code.
        code: i32,
        /// `gnutls_strerror` of it.
        message: String,
    },
}

macro_rules! table {
    ($($field:ident: $sym:literal => $ty:ty,)*) => {
        /// The functions used, resolved once.
        pub struct Lib {
            $(
                #[doc = concat!("`", $sym, "`")]
                pub $field: $ty,
            )*
            /// What hands a TLS 1.3 session's records over to the caller
            /// (GnuTLS 3.7.0 or later; `None` before).
            pub records: Option<RecordFns>,
            /// The value of the exported variable `gnutls_malloc`: keys handed
            /// to GnuTLS are freed by it with `gnutls_free`.
            pub malloc: unsafe extern "C" fn(usize) -> *mut c_void,
            /// The value of `gnutls_free`.
            pub free: unsafe extern "C" fn(*mut c_void),
        }

        impl Lib {
            /// Resolves every function in `handle`.
            ///
            /// # Safety
            /// `handle` is a live dlopen handle of a GnuTLS 3 library, whose
            /// symbols have the C types written in this table.
            unsafe fn resolve(handle: *mut c_void, library: &str) -> Result<Lib, GnutlsError> {
                $(
                    // SAFETY: handle is live (this function's contract).
                    let p = unsafe { symbol(handle, library, $sym) }?;
                    // SAFETY: `p` is the non-null address of the GnuTLS
                    // function `$sym`, whose C signature is `$ty`'s; function
                    // and data pointers have the same size on Linux.
                    let $field = unsafe { std::mem::transmute::<*mut c_void, $ty>(p) };
                )*
                // SAFETY: handle is live (this function's contract).
                let (m, f) = unsafe {
                    (
                        symbol(handle, library, "gnutls_malloc")?,
                        symbol(handle, library, "gnutls_free")?,
                    )
                };
                // SAFETY: both are the addresses of exported variables holding
                // the allocator GnuTLS uses (`gnutls_alloc_function`,
                // `gnutls_free_function`), set at library initialisation and
                // never null (malloc and free by default).
                let (malloc, free) = unsafe {
                    (
                        *(m as *const unsafe extern "C" fn(usize) -> *mut c_void),
                        *(f as *const unsafe extern "C" fn(*mut c_void)),
                    )
                };
                // SAFETY: handle is live (this function's contract).
                let records = unsafe { RecordFns::resolve(handle, library) };
                Ok(Lib { $($field,)* records, malloc, free })
            }
        }
    };
}

table! {
    check_version: "gnutls_check_version" => unsafe extern "C" fn(*const c_char) -> *const c_char,
    global_init: "gnutls_global_init" => unsafe extern "C" fn() -> c_int,
    init: "gnutls_init" => unsafe extern "C" fn(*mut Session, c_uint) -> c_int,
    deinit: "gnutls_deinit" => unsafe extern "C" fn(Session),
    priority_set_direct: "gnutls_priority_set_direct"
        => unsafe extern "C" fn(Session, *const c_char, *mut *const c_char) -> c_int,
    psk_allocate_server_credentials: "gnutls_psk_allocate_server_credentials"
        => unsafe extern "C" fn(*mut Creds) -> c_int,
    psk_free_server_credentials: "gnutls_psk_free_server_credentials"
        => unsafe extern "C" fn(Creds),
    psk_set_server_credentials_function: "gnutls_psk_set_server_credentials_function"
        => unsafe extern "C" fn(Creds, ServerKeyFn),
    psk_allocate_client_credentials: "gnutls_psk_allocate_client_credentials"
        => unsafe extern "C" fn(*mut Creds) -> c_int,
    psk_free_client_credentials: "gnutls_psk_free_client_credentials"
        => unsafe extern "C" fn(Creds),
    psk_set_client_credentials: "gnutls_psk_set_client_credentials"
        => unsafe extern "C" fn(Creds, *const c_char, *const Datum, c_int) -> c_int,
    psk_server_get_username: "gnutls_psk_server_get_username"
        => unsafe extern "C" fn(Session) -> *const c_char,
    credentials_set: "gnutls_credentials_set"
        => unsafe extern "C" fn(Session, c_int, *mut c_void) -> c_int,
    session_set_ptr: "gnutls_session_set_ptr" => unsafe extern "C" fn(Session, *mut c_void),
    session_get_ptr: "gnutls_session_get_ptr" => unsafe extern "C" fn(Session) -> *mut c_void,
    transport_set_ptr: "gnutls_transport_set_ptr" => unsafe extern "C" fn(Session, TransportPtr),
    transport_set_push_function: "gnutls_transport_set_push_function"
        => unsafe extern "C" fn(Session, PushFn),
    transport_set_pull_function: "gnutls_transport_set_pull_function"
        => unsafe extern "C" fn(Session, PullFn),
    transport_set_pull_timeout_function: "gnutls_transport_set_pull_timeout_function"
        => unsafe extern "C" fn(Session, PullTimeoutFn),
    handshake_set_timeout: "gnutls_handshake_set_timeout" => unsafe extern "C" fn(Session, c_uint),
    handshake: "gnutls_handshake" => unsafe extern "C" fn(Session) -> c_int,
    record_send: "gnutls_record_send" => unsafe extern "C" fn(Session, *const c_void, usize) -> isize,
    record_recv: "gnutls_record_recv" => unsafe extern "C" fn(Session, *mut c_void, usize) -> isize,
    bye: "gnutls_bye" => unsafe extern "C" fn(Session, c_int) -> c_int,
    alert_send_appropriate: "gnutls_alert_send_appropriate"
        => unsafe extern "C" fn(Session, c_int) -> c_int,
    error_is_fatal: "gnutls_error_is_fatal" => unsafe extern "C" fn(c_int) -> c_int,
    strerror: "gnutls_strerror" => unsafe extern "C" fn(c_int) -> *const c_char,
    alert_get: "gnutls_alert_get" => unsafe extern "C" fn(Session) -> c_int,
    alert_get_name: "gnutls_alert_get_name" => unsafe extern "C" fn(c_int) -> *const c_char,
    session_get_desc: "gnutls_session_get_desc" => unsafe extern "C" fn(Session) -> *mut c_char,
    kx_get: "gnutls_kx_get" => unsafe extern "C" fn(Session) -> c_int,
    kx_get_name: "gnutls_kx_get_name" => unsafe extern "C" fn(c_int) -> *const c_char,
}

/// The functions that let the caller seal and open an established TLS 1.3
/// session's records itself (as kTLS does): the traffic secrets as the
/// handshake installs them, the suite, and where the record counts stand.
pub struct RecordFns {
    /// `gnutls_handshake_set_secret_function` (3.7.0).
    pub handshake_set_secret_function: unsafe extern "C" fn(Session, SecretFn),
    /// `gnutls_transport_get_ptr`.
    pub transport_get_ptr: unsafe extern "C" fn(Session) -> TransportPtr,
    /// `gnutls_protocol_get_version`.
    pub protocol_get_version: unsafe extern "C" fn(Session) -> c_int,
    /// `gnutls_cipher_get`.
    pub cipher_get: unsafe extern "C" fn(Session) -> c_int,
    /// `gnutls_record_get_state`.
    pub record_get_state:
        unsafe extern "C" fn(Session, c_uint, *mut Datum, *mut Datum, *mut Datum, *mut u8) -> c_int,
    /// `gnutls_record_check_pending`.
    pub record_check_pending: unsafe extern "C" fn(Session) -> usize,
}

impl RecordFns {
    /// All of them, or `None` when the library lacks one.
    ///
    /// # Safety
    /// As [`Lib::resolve`].
    unsafe fn resolve(handle: *mut c_void, library: &str) -> Option<RecordFns> {
        // SAFETY: handle is live (this function's contract); each address is
        // that of the GnuTLS function of the same name, whose C signature is
        // the field's type.
        unsafe {
            let f = |name| symbol(handle, library, name).ok();
            Some(RecordFns {
                handshake_set_secret_function: std::mem::transmute::<
                    *mut c_void,
                    unsafe extern "C" fn(Session, SecretFn),
                >(f(
                    "gnutls_handshake_set_secret_function",
                )?),
                transport_get_ptr: std::mem::transmute::<
                    *mut c_void,
                    unsafe extern "C" fn(Session) -> TransportPtr,
                >(f("gnutls_transport_get_ptr")?),
                protocol_get_version: std::mem::transmute::<
                    *mut c_void,
                    unsafe extern "C" fn(Session) -> c_int,
                >(f("gnutls_protocol_get_version")?),
                cipher_get: std::mem::transmute::<
                    *mut c_void,
                    unsafe extern "C" fn(Session) -> c_int,
                >(f("gnutls_cipher_get")?),
                record_get_state: std::mem::transmute::<
                    *mut c_void,
                    unsafe extern "C" fn(
                        Session,
                        c_uint,
                        *mut Datum,
                        *mut Datum,
                        *mut Datum,
                        *mut u8,
                    ) -> c_int,
                >(f("gnutls_record_get_state")?),
                record_check_pending: std::mem::transmute::<
                    *mut c_void,
                    unsafe extern "C" fn(Session) -> usize,
                >(f("gnutls_record_check_pending")?),
            })
        }
    }
}

/// Looks `name` up in `handle`.
///
/// # Safety
/// `handle` is a live dlopen handle.
unsafe fn symbol(
    handle: *mut c_void,
    library: &str,
    name: &'static str,
) -> Result<*mut c_void, GnutlsError> {
    let c = CString::new(name).map_err(|_| GnutlsError::Symbol {
        library: library.to_string(),
        symbol: name,
    })?;
    // SAFETY: handle is live (caller's contract) and `c` is NUL-terminated.
    let p = unsafe { libc::dlsym(handle, c.as_ptr()) };
    if p.is_null() {
        Err(GnutlsError::Symbol {
            library: library.to_string(),
            symbol: name,
        })
    } else {
        Ok(p)
    }
}

/// Copies a C string GnuTLS returned (static or owned by it); lossy UTF-8.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string alive for the call.
pub unsafe fn text(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null and NUL-terminated by the caller's contract.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn open() -> Result<Lib, GnutlsError> {
    let library = std::env::var(LIBRARY_ENV).unwrap_or_else(|_| LIBRARY.to_string());
    let c = CString::new(library.as_str()).map_err(|_| GnutlsError::Missing {
        library: library.clone(),
        why: "the name contains a NUL byte".into(),
    })?;
    // SAFETY: `c` is NUL-terminated; RTLD_LOCAL keeps GnuTLS's symbols out of
    // the global namespace; the handle is never closed, so everything
    // resolved from it stays valid for the life of the process.
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns null or a NUL-terminated message valid
        // until the next dl* call on this thread; it is copied at once.
        let why = unsafe { text(libc::dlerror()) };
        return Err(GnutlsError::Missing { library, why });
    }
    // SAFETY: a live handle to a library named as GnuTLS 3's soname.
    let lib = unsafe { Lib::resolve(handle, &library)? };
    let min = CString::new(MIN_VERSION).map_err(|_| GnutlsError::Symbol {
        library: library.clone(),
        symbol: "gnutls_check_version",
    })?;
    // SAFETY: gnutls_check_version takes a NUL-terminated version (or null)
    // and returns a static string, or null when the library is older.
    let (ok, found) = unsafe {
        (
            !(lib.check_version)(min.as_ptr()).is_null(),
            text((lib.check_version)(std::ptr::null())),
        )
    };
    if !ok {
        return Err(GnutlsError::TooOld { library, found });
    }
    // SAFETY: reference-counted global initialisation, safe to call from any
    // thread (GnuTLS 3.3+ also runs it from its library constructor).
    let rc = unsafe { (lib.global_init)() };
    lib.check("gnutls_global_init", rc)?;
    log::debug!("tls: loaded {library} (GnuTLS {found}) for TLS-PSK");
    Ok(lib)
}

/// The library, opened on first use; the error (missing, too old) is kept
/// and returned to every caller.
pub fn lib() -> Result<&'static Lib, GnutlsError> {
    static LIB: OnceLock<Result<Lib, GnutlsError>> = OnceLock::new();
    LIB.get_or_init(open).as_ref().map_err(Clone::clone)
}

impl Lib {
    /// `gnutls_strerror(code)`.
    pub fn strerror(&self, code: c_int) -> String {
        // SAFETY: gnutls_strerror returns a static NUL-terminated string for
        // any code, known or not.
        unsafe { text((self.strerror)(code)) }
    }

    /// `Ok(rc)` for a non-negative return code, the error otherwise.
    pub fn check(&self, call: &'static str, rc: c_int) -> Result<c_int, GnutlsError> {
        if rc >= 0 {
            Ok(rc)
        } else {
            Err(GnutlsError::Call {
                call,
                code: rc,
                message: self.strerror(rc),
            })
        }
    }

    /// True unless `code` is one of GnuTLS's retryable or warning codes.
    pub fn is_fatal(&self, code: c_int) -> bool {
        // SAFETY: a pure function of an integer.
        unsafe { (self.error_is_fatal)(code) != 0 }
    }
}
