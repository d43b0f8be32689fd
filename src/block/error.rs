use std::io;
use thiserror::Error;

/// Why a block-stack operation failed.
#[derive(Debug, Error)]
pub enum BlockError {
    /// The request reaches past the end of the device.
    #[error("range {offset}+{len} is outside the device ({size} bytes)")]
    OutOfRange {
        /// First byte of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Device size.
        size: u64,
    },
    /// A write-type request on a read-only node.
    #[error("device is read-only")]
    ReadOnly,
    /// The node's state refuses the request (replication not started, writer
    /// fenced after failover, ...). The text says why.
    #[error("refused: {0}")]
    Refused(String),
    /// The node does not implement the operation.
    #[error("operation not supported: {0}")]
    Unsupported(&'static str),
    /// The operating system failed an I/O.
    #[error("{op} at offset {offset}: {source}")]
    Io {
        /// The operation that failed (`read`, `write`, `flush`, ...).
        op: &'static str,
        /// Where it failed.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl BlockError {
    /// Builds an [`BlockError::Io`].
    pub fn io(op: &'static str, offset: u64, source: io::Error) -> Self {
        BlockError::Io { op, offset, source }
    }

    /// The errno a wire protocol (NBD) should report for this error.
    pub fn errno(&self) -> i32 {
        match self {
            BlockError::OutOfRange { .. } => libc::EINVAL,
            BlockError::ReadOnly => libc::EPERM,
            BlockError::Refused(_) => libc::EPERM,
            BlockError::Unsupported(_) => libc::ENOTSUP,
            BlockError::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC) => libc::ENOSPC,
                Some(libc::EDQUOT) => libc::ENOSPC,
                _ => libc::EIO,
            },
        }
    }
}
