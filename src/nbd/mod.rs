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

mod client;
mod error;
mod server;
mod stream;
mod tls;
pub mod uri;
pub mod wire;

pub use client::{Client, ClientOptions, ExportInfo, Started, SubmittedWrite};
pub use error::NbdError;
pub use server::{Server, ServerLimits, ServerOptions, DEFAULT_EXPORT, MAX_PAYLOAD};
pub use uri::{NbdAddr, NbdUri};
