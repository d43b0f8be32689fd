//! The QMP control socket (`--control PATH`) and the `colo-blk ctl` client.
//!
//! The wire format is QMP's, so QMP clients (the `qemu.qmp` Python library,
//! `qmp-shell`, `socat`) drive colo-blk as they drive QEMU.

pub mod client;
pub mod ctl;
pub mod exports;
#[cfg(test)]
mod fake;
pub mod framing;
pub mod progress;
pub mod protocol;
mod schema;
mod server;

pub use exports::NbdExports;
pub use server::{ControlContext, ControlServer, EventHub, MAX_CLIENTS, MAX_MESSAGE, OUTPUT_QUEUE};

use std::path::PathBuf;
use thiserror::Error;

/// Why the control socket could not be served or reached.
#[derive(Debug, Error)]
pub enum ControlError {
    /// The control socket could not be created (path in use, too long, ...).
    #[error("control {0}")]
    Socket(#[from] crate::unix_socket::UnixSocketError),
    /// connect() failed.
    #[error("cannot connect to control socket {0}: {1}")]
    Connect(PathBuf, #[source] std::io::Error),
    /// Reading or writing the socket failed.
    #[error("control socket I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The peer did not speak QMP.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The command failed; the text is the server's `desc`.
    #[error("{0}")]
    Command(String),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(#[source] std::io::Error),
}
