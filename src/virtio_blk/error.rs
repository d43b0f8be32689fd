use crate::block::BlockError;
use thiserror::Error;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP};

/// Why a request failed. Every variant maps to the status byte the guest reads
/// ([`RequestError::status`]), except [`RequestError::NoStatus`], where no status
/// can be written and the chain is returned with a used length of 0.
#[derive(Debug, Error)]
pub enum RequestError {
    /// The last descriptor is not device-writable, or is empty, or lies outside
    /// guest memory: there is nowhere to put the status byte.
    #[error("no writable status byte at the end of the chain")]
    NoStatus,
    /// The device-readable part is shorter than the 16-byte request header.
    #[error("request header is {0} bytes, 16 needed")]
    ShortHeader(u64),
    /// Data buffers point the wrong way for the request type (a read with
    /// device-readable data, a write with device-writable data, or a
    /// device-readable descriptor after a device-writable one).
    #[error("descriptor direction is wrong for a {0} request")]
    WrongDirection(&'static str),
    /// A data-carrying request without data.
    #[error("{0} request carries no data")]
    ZeroLength(&'static str),
    /// A read or write whose length is not a whole number of sectors.
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    /// More data segments than the `seg_max` the device advertised.
    #[error("{count} data segments, seg_max is {max}")]
    TooManySegments {
        /// Segments in the request.
        count: usize,
        /// The advertised limit.
        max: u32,
    },
    /// The request reaches past the end of the disk.
    #[error("sector {sector} + {bytes} bytes is past the end of the disk ({capacity} sectors)")]
    OutOfRange {
        /// First sector of the request.
        sector: u64,
        /// Length in bytes.
        bytes: u64,
        /// Disk capacity in sectors.
        capacity: u64,
    },
    /// A descriptor points outside guest memory.
    #[error("buffer {addr:#x}+{len} is outside guest memory")]
    BadBuffer {
        /// Guest physical address of the buffer.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// A write, discard or write-zeroes on a read-only disk.
    #[error("{0} on a read-only disk")]
    ReadOnly(&'static str),
    /// A request type colo-blk does not implement.
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
    /// Reserved or forbidden flags in a discard / write-zeroes segment.
    #[error("unsupported flags {flags:#x} in a {op} segment")]
    UnsupportedFlags {
        /// The request type.
        op: &'static str,
        /// The flags found.
        flags: u32,
    },
    /// The discard / write-zeroes payload is not a whole number of 16-byte
    /// segments, or holds none.
    #[error("{op} payload of {len} bytes is not a list of 16-byte segments")]
    BadRangeList {
        /// The request type.
        op: &'static str,
        /// Payload length.
        len: u64,
    },
    /// More discard / write-zeroes segments, or more sectors in one segment,
    /// than the limits advertised in the configuration space.
    #[error("{op} exceeds the advertised limits: {detail}")]
    RangeLimit {
        /// The request type.
        op: &'static str,
        /// Which limit.
        detail: String,
    },
    /// The block stack failed the operation.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// The virtqueue itself is broken (available index out of range, used ring
    /// outside guest memory): no request can be completed on it.
    #[error("virtqueue: {0}")]
    Queue(virtio_queue::Error),
}

/// Number of distinct [`RequestError::class`] values.
pub(crate) const ERROR_CLASSES: usize = 15;

/// The class of ring-level errors ([`RequestError::Queue`]).
pub(crate) const RING_CLASS: usize = 14;

impl RequestError {
    /// The virtio-blk status byte for this error.
    pub fn status(&self) -> u8 {
        let status = match self {
            RequestError::UnsupportedType(_)
            | RequestError::UnsupportedFlags { .. }
            | RequestError::RangeLimit { .. }
            | RequestError::Block(BlockError::Unsupported(_)) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        };
        status as u8
    }

    /// A small index per kind of error, so that log lines are rate limited per
    /// kind: a guest flooding one bad request cannot hide a different problem.
    pub(crate) fn class(&self) -> usize {
        match self {
            RequestError::NoStatus => 0,
            RequestError::ShortHeader(_) => 1,
            RequestError::WrongDirection(_) => 2,
            RequestError::ZeroLength(_) => 3,
            RequestError::Unaligned(_) => 4,
            RequestError::TooManySegments { .. } => 5,
            RequestError::OutOfRange { .. } => 6,
            RequestError::BadBuffer { .. } => 7,
            RequestError::ReadOnly(_) => 8,
            RequestError::UnsupportedType(_) => 9,
            RequestError::UnsupportedFlags { .. } => 10,
            RequestError::BadRangeList { .. } => 11,
            RequestError::RangeLimit { .. } => 12,
            RequestError::Block(_) => 13,
            RequestError::Queue(_) => RING_CLASS,
        }
    }
}
