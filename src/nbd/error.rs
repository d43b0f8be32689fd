use super::wire::WireError;
use std::io;
use thiserror::Error;

/// Why an NBD server or client operation failed.
#[derive(Debug, Error)]
pub enum NbdError {
    /// A listen address or NBD URI could not be parsed.
    #[error("invalid NBD address {input:?}: {reason}")]
    InvalidAddress {
        /// The text as given.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The socket failed.
    #[error("NBD connection: {0}")]
    Io(#[from] io::Error),
    /// The Unix listening socket could not be created.
    #[error("NBD listen: {0}")]
    Listen(#[from] crate::unix_socket::UnixSocketError),
    /// The peer sent something the protocol does not allow.
    #[error("NBD protocol violation: {0}")]
    Wire(#[from] WireError),
    /// The peer's behaviour is valid wire format but breaks the protocol rules.
    #[error("NBD protocol violation: {0}")]
    Protocol(String),
    /// The server answered an option we need with an error.
    #[error("NBD server refused {option}: {reply:#x} {message}")]
    OptionRefused {
        /// The option's protocol name.
        option: &'static str,
        /// The error reply type.
        reply: u32,
        /// The server's message, if any.
        message: String,
    },
    /// TLS credentials or the peer's identity were refused.
    #[error("NBD TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The TLS handshake after STARTTLS failed (certificate not trusted,
    /// expired, missing, or the peer broke the protocol).
    #[error("NBD TLS handshake failed: {0}")]
    TlsHandshake(#[source] io::Error),
    /// A TLS client met a server that will not upgrade (or an attacker
    /// rewrote its answer): the client refuses to go on in plain text.
    #[error("NBD server refused STARTTLS ({0}); not continuing without TLS")]
    TlsRefused(String),
    /// The server does not have the export.
    #[error("NBD server has no export named {0:?}")]
    UnknownExport(String),
    /// After a reconnect the export has a different size.
    #[error("NBD export size changed from {old} to {new} bytes")]
    SizeChanged {
        /// Size of the first connection.
        old: u64,
        /// Size now.
        new: u64,
    },
}
