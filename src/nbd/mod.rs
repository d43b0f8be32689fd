//! NBD: the server a secondary exposes to its primary, and the primary's client.
//!
//! Our own implementation of the NBD protocol (fixed newstyle negotiation,
//! structured replies, `base:allocation` block status), interoperable with
//! QEMU's NBD client and server.
//!
//! * [`wire`]: the message formats, pure encode/decode.
//! * [`Server`]: serves a [`SharedDev`](crate::block::SharedDev) on
//!   `unix:PATH` or `tcp:HOST:PORT`.
//! * [`Client`]: an NBD export as a [`BlockDev`](crate::block::BlockDev),
//!   pipelined, for the primary's forwarding path.
//! * [`uri`]: listen addresses and QEMU-style NBD URIs.

/// Export name used when none is configured (QEMU COLO's convention): what
/// the server offers and the daemon's `--nbd-export` defaults to.
pub const DEFAULT_EXPORT: &str = "parent0";

/// Largest READ or WRITE payload colo-blk sends or accepts (the protocol's
/// interoperable maximum): the server refuses larger requests and
/// advertises it, the client splits its requests to it.
pub const MAX_PAYLOAD: u32 = 32 << 20;

mod client;
mod error;
mod server;
mod stream;
mod tls;
pub mod uri;
pub mod wire;

pub use client::{Client, ClientOptions, ExportInfo, Started, SubmittedWrite};
pub use error::{NbdError, Violation};
pub use server::{Server, ServerLimits, ServerOptions};
pub use uri::{NbdAddr, NbdUri};
