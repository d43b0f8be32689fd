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
    Protocol(#[source] Violation),
    /// A server was asked to run with limits it cannot work with.
    #[error(
        "server options: need at least one worker, one connection and a 32 MiB \
         in-flight budget per connection and per server"
    )]
    ServerOptions,
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

/// How a peer broke the NBD protocol rules (the wire format was fine).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Violation {
    /// A client sent handshake flags the server does not know.
    #[error("unknown client flags {0:#x}")]
    ClientFlags(u32),
    /// A client asked for the export the old way before the TLS it needs.
    #[error("NBD_OPT_EXPORT_NAME before STARTTLS, TLS is required; disconnecting")]
    ExportNameBeforeTls,
    /// An option with more data than the server reads or skips.
    #[error("{option} with {len} bytes of data")]
    OptionTooLong {
        /// The option's protocol name.
        option: &'static str,
        /// Its announced data length.
        len: u32,
    },
    /// A server's block sizes contradict each other.
    #[error("server block sizes min {min} preferred {preferred} max {max} are inconsistent")]
    BlockSizes {
        /// Minimum block size.
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum payload.
        max: u32,
    },
    /// A reply to another option than the one asked.
    #[error("reply for option {got} while waiting for {waiting}")]
    ReplyToOtherOption {
        /// The option the reply is for.
        got: u32,
        /// The option asked.
        waiting: &'static str,
    },
    /// An option reply longer than the client reads.
    #[error("{len}-byte reply to {option}")]
    ReplyTooLong {
        /// The reply's length.
        len: u32,
        /// The option asked.
        option: &'static str,
    },
    /// A reply type the option does not allow.
    #[error("unexpected reply {reply:#x} to {option}")]
    UnexpectedReply {
        /// The reply type.
        reply: u32,
        /// The option asked.
        option: &'static str,
    },
    /// NBD_OPT_GO acknowledged without saying the export's size.
    #[error("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")]
    GoWithoutExport,
    /// A reply whose cookie matches no request in flight.
    #[error("reply for unknown cookie {0}")]
    UnknownCookie(u64),
    /// A data or hole chunk outside its request's range.
    #[error("{kind} chunk {offset}+{len} outside the request")]
    ChunkOutside {
        /// `data` or `hole`.
        kind: &'static str,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u32,
    },
    /// A structured reply chunk the request does not allow.
    #[error("unexpected chunk type {kind} ({len} bytes) for {command}")]
    UnexpectedChunk {
        /// The chunk type.
        kind: u16,
        /// Its length.
        len: u32,
        /// The request's command.
        command: &'static str,
    },
}
