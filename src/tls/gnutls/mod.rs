//! TLS-PSK through GnuTLS, the library QEMU's `tls-creds-psk` uses, so
//! both ends offer the suites and key exchanges QEMU does. rustls (the x509 path) has
//! no external pre-shared-key support (rustls issue #174).
//!
//! GnuTLS is opened at run time (`ffi.rs`); without it only `--tls-creds-psk`
//! is unavailable, with a message naming the library.

pub(crate) mod ffi;
pub(crate) mod session;

pub use ffi::{GnutlsError, LIBRARY, LIBRARY_ENV, MIN_VERSION};
pub(crate) use session::{HandshakeError, RecordParts, Session};

/// Loads GnuTLS now (a missing or too old library fails here, at start).
pub fn load() -> Result<(), GnutlsError> {
    ffi::lib().map(|_| ())
}
