//! What one finished guest request contributes to the statistics, carried
//! from where it is parsed to where it enters the used ring.

use std::time::Instant;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};

/// The accounting class of a request, as QEMU's `BlockAcctType` has them.
/// Write-zeroes counts as a write (QEMU's virtio-blk accounts it so); GET_ID
/// and unknown types are not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StatOp {
    /// `VIRTIO_BLK_T_IN`.
    Read,
    /// `VIRTIO_BLK_T_OUT` and `VIRTIO_BLK_T_WRITE_ZEROES`.
    Write,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_DISCARD` (QEMU's "unmap").
    Discard,
    /// Not accounted (GET_ID, unsupported types, no parsable header).
    #[default]
    Other,
}

impl StatOp {
    /// The class of virtio-blk request type `kind`.
    pub fn of_virtio(kind: u32) -> Self {
        match kind {
            VIRTIO_BLK_T_IN => StatOp::Read,
            VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_WRITE_ZEROES => StatOp::Write,
            VIRTIO_BLK_T_FLUSH => StatOp::Flush,
            VIRTIO_BLK_T_DISCARD => StatOp::Discard,
            _ => StatOp::Other,
        }
    }

    /// Index into per-op arrays; `None` for [`StatOp::Other`].
    pub(crate) fn index(self) -> Option<usize> {
        match self {
            StatOp::Read => Some(0),
            StatOp::Write => Some(1),
            StatOp::Flush => Some(2),
            StatOp::Discard => Some(3),
            StatOp::Other => None,
        }
    }
}

/// How a request ended, in QEMU's three accounting outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Outcome {
    /// Completed with `VIRTIO_BLK_S_OK`.
    #[default]
    Ok,
    /// The I/O failed (a block-layer error): QEMU's `failed_*_operations`.
    Failed,
    /// Refused before any I/O (bad range, bad buffers, read-only, ...):
    /// QEMU's `invalid_*_operations`.
    Invalid,
}

/// One request's contribution: set while it is parsed, finished when its
/// status byte is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestStat {
    /// Accounting class.
    pub op: StatOp,
    /// Bytes read, written, zeroed or discarded.
    pub bytes: u64,
    /// When the worker picked the request up (None: not timed).
    pub started: Option<Instant>,
    /// How it ended.
    pub outcome: Outcome,
}

impl RequestStat {
    /// A request picked up now; its class and size are filled in as it is
    /// parsed.
    pub fn start() -> Self {
        RequestStat {
            started: Some(Instant::now()),
            ..Self::default()
        }
    }
}
