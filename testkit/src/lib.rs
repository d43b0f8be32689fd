//! What colo-blk's integration tests, `colo-blk demo` and `colo-blk bench`
//! share, kept out of the product library: the one libblkio client
//! ([`libblkio`]), the one test-data generator ([`pattern`](mod@pattern)), and the one
//! guard for child processes with its socket waits ([`process`]).
//!
//! The product library (`colo-blk`) does not depend on this crate or on
//! libblkio; ARCHITECTURE.md at the root of the repository maps the workspace.

use std::time::Duration;

/// How long a request, a process getting ready, or a process exiting may take
/// before a test gives up. Generous: the machine is shared and slow; a
/// healthy daemon needs milliseconds.
pub const PATIENCE: Duration = Duration::from_secs(30);

pub mod libblkio;
pub mod pattern;
pub mod process;

pub use libblkio::{Client, ClientOptions, Done, IoError, Queue};
pub use pattern::{pattern, XorShift};
pub use process::{is_socket, Process, ProcessError};
