use std::io;
use std::sync::Arc;
use thiserror::Error;

/// Why a block-stack operation failed: a kind, its context, and the cause
/// (`source`), never the cause flattened into text. The error is cheap to
/// clone (causes are shared), so a node can record it and still return it.
#[derive(Debug, Clone, Error)]
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
    /// The node's state refuses the request.
    #[error("refused: {0}")]
    Refused(Refusal),
    /// The node does not implement the operation.
    #[error("operation not supported: {0}")]
    Unsupported(&'static str),
    /// A node was set up with an unusable parameter.
    #[error("{what} {value} is not a power of two >= {min}")]
    NotPowerOfTwo {
        /// The parameter (`overlay granule`, ...).
        what: &'static str,
        /// Its value.
        value: u64,
        /// The least value allowed.
        min: u64,
    },
    /// The operating system failed an I/O.
    #[error("{op} at offset {offset}: {source}")]
    Io {
        /// The operation that failed (`read`, `write`, `flush`, ...).
        op: &'static str,
        /// Where it failed.
        offset: u64,
        /// The OS error.
        #[source]
        source: Arc<io::Error>,
    },
    /// A step of this node's own work failed in a node it uses (the
    /// secondary's copy-before-write reading the disk or writing hidden).
    #[error("{op} at offset {offset}: {source}")]
    Below {
        /// The step (`copy-before-write`, ...).
        op: &'static str,
        /// Where it failed.
        offset: u64,
        /// The failure below.
        #[source]
        source: Box<BlockError>,
    },
    /// A node that reaches another over the network could not connect (the
    /// primary's link to its secondary).
    #[error("{target}: {source}")]
    Connect {
        /// What it tried to reach (a URI).
        target: String,
        /// Why it failed.
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
}

/// Why a node refuses a request that is otherwise valid.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    /// A secondary before `replication-start`.
    #[error("block replication is not started")]
    NotStarted,
    /// A secondary after failover, to writes of its old primary.
    #[error("this secondary has taken over; writes from the old primary are fenced")]
    TakenOver,
    /// Growing a block device past what it holds (its owner grows it).
    #[error(
        "the block device holds {held} bytes, fewer than {wanted}: grow it first \
         (lvextend, a resized LUN), then resize"
    )]
    DeviceTooSmall {
        /// What the device holds, in bytes.
        held: u64,
        /// The size asked for.
        wanted: u64,
    },
    /// A remote node refused (an NBD server's `EPERM`), with its message.
    #[error("{0}")]
    Remote(String),
}

impl BlockError {
    /// Builds an [`BlockError::Io`].
    pub fn io(op: &'static str, offset: u64, source: io::Error) -> Self {
        BlockError::Io {
            op,
            offset,
            source: Arc::new(source),
        }
    }

    /// Builds a [`BlockError::Below`].
    pub fn below(op: &'static str, offset: u64, source: BlockError) -> Self {
        BlockError::Below {
            op,
            offset,
            source: Box::new(source),
        }
    }

    /// Builds a [`BlockError::Connect`].
    pub fn connect(
        target: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        BlockError::Connect {
            target: target.into(),
            source: Arc::new(source),
        }
    }

    /// The errno a wire protocol (NBD) should report for this error.
    pub fn errno(&self) -> i32 {
        match self {
            BlockError::OutOfRange { .. } | BlockError::NotPowerOfTwo { .. } => libc::EINVAL,
            BlockError::ReadOnly => libc::EPERM,
            BlockError::Refused(_) => libc::EPERM,
            BlockError::Unsupported(_) => libc::ENOTSUP,
            BlockError::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC) => libc::ENOSPC,
                Some(libc::EDQUOT) => libc::ENOSPC,
                _ => libc::EIO,
            },
            // A failure inside this node's own work is this node's I/O
            // error, whatever it was below (a refusal below is not a
            // refusal of this request).
            BlockError::Below { .. } | BlockError::Connect { .. } => libc::EIO,
        }
    }
}
