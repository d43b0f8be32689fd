//! Parsing a request: a descriptor chain's layout and header become a typed,
//! validated [`Request`], or the [`RequestError`] the guest is answered. Nothing
//! here touches the disk; the checks run in the order the device reports them,
//! so a bad request has no effect at all. `device.rs` executes what parses.

use super::chain::{gather, GuestMem, Layout, HEADER_LEN};
use super::config::{MAX_RANGE_SECTORS, MAX_RANGE_SEGMENTS, SECTOR_SIZE};
use super::RequestError;
use crate::stats::{RequestStat, StatOp};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

/// What a request is checked against, read once per request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// The current capacity, in sectors (a resize may grow it between
    /// requests: one request sees one value, which its error names).
    pub(super) capacity_sectors: u64,
    /// Data descriptors a request may have.
    pub(super) seg_max: u32,
    /// Write-type requests are refused.
    pub(super) read_only: bool,
}

/// One discard / write-zeroes segment, validated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Range {
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) unmap: bool,
}

/// The validated segments of a discard or write-zeroes request.
#[derive(Debug, Clone, Copy)]
pub(super) struct RangeList {
    ranges: [Range; MAX_RANGE_SEGMENTS as usize],
    count: usize,
}

impl RangeList {
    /// The segments, in the guest's order.
    pub(super) fn as_slice(&self) -> &[Range] {
        &self.ranges[..self.count]
    }
}

/// A request that parsed: what to do, nothing done yet. Data buffers stay
/// in the chain's layout (device-writable for a read and GET_ID,
/// device-readable for a write).
// Ranges holds its segments inline, as the old stack array did: parsed on
// the worker's stack once per request, where a Box would allocate per discard.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy)]
pub(super) enum Request {
    /// Read `len` bytes at byte `offset` into the device-writable buffers.
    Read { offset: u64, len: u64 },
    /// Write the device-readable buffers at byte `offset`.
    Write { offset: u64 },
    /// Make completed writes durable.
    Flush,
    /// Answer the serial into the device-writable buffers.
    GetId,
    /// Discard, or with `zeroes` write zeroes over, these segments.
    Ranges { zeroes: bool, ranges: RangeList },
}

/// The request header fields colo-blk uses.
#[derive(Debug, Clone, Copy)]
struct Header {
    kind: u32,
    sector: u64,
}

impl Request {
    /// Parses and validates the request whose descriptors `layout` holds,
    /// reading its header (and a range list) from `mem`. Fills in `stat`'s
    /// operation and byte count as soon as they are known, so an invalid
    /// request is counted with them.
    pub(super) fn parse(
        mem: &GuestMem,
        layout: &Layout,
        limits: &Limits,
        stat: &mut RequestStat,
    ) -> Result<Request, RequestError> {
        let mut raw = [0u8; HEADER_LEN as usize];
        layout.read_prefix(mem, &mut raw).map_err(|e| match e {
            RequestError::ShortHeader(_) => RequestError::ShortHeader(layout.readable_len()),
            e => e,
        })?;
        let header = Header {
            kind: u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]),
            sector: u64::from_le_bytes([
                raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15],
            ]),
        };
        stat.op = StatOp::of_virtio(header.kind);
        if layout.mixed_direction {
            return Err(RequestError::WrongDirection(type_name(header.kind)));
        }
        match header.kind {
            VIRTIO_BLK_T_IN => {
                if layout.readable_payload().next().is_some() {
                    return Err(RequestError::WrongDirection("read"));
                }
                check_segments(layout, limits)?;
                let len = layout.writable_payload().map(|(_, l)| l).sum();
                stat.bytes = len;
                let offset = check_data(limits, header.sector, len, "read")?;
                Ok(Request::Read { offset, len })
            }
            VIRTIO_BLK_T_OUT => {
                if layout.writable_payload().next().is_some() {
                    return Err(RequestError::WrongDirection("write"));
                }
                if limits.read_only {
                    return Err(RequestError::ReadOnly("write"));
                }
                check_segments(layout, limits)?;
                let len = layout.readable_payload().map(|(_, l)| l).sum();
                stat.bytes = len;
                let offset = check_data(limits, header.sector, len, "write")?;
                Ok(Request::Write { offset })
            }
            VIRTIO_BLK_T_FLUSH => Ok(Request::Flush),
            VIRTIO_BLK_T_GET_ID => {
                if layout.overflow {
                    check_segments(layout, limits)?;
                }
                if layout.writable_payload().next().is_none() {
                    return Err(RequestError::ZeroLength("get-id"));
                }
                Ok(Request::GetId)
            }
            kind @ (VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES) => {
                let zeroes = kind == VIRTIO_BLK_T_WRITE_ZEROES;
                let ranges = parse_ranges(mem, layout, limits, zeroes)?;
                stat.bytes = ranges.as_slice().iter().map(|r| r.len).sum();
                Ok(Request::Ranges { zeroes, ranges })
            }
            other => Err(RequestError::UnsupportedType(other)),
        }
    }
}

/// The range list of a discard or write-zeroes request, every segment
/// validated before any is used, so a bad list has no partial effect.
fn parse_ranges(
    mem: &GuestMem,
    layout: &Layout,
    limits: &Limits,
    zeroes: bool,
) -> Result<RangeList, RequestError> {
    let op = if zeroes { "write-zeroes" } else { "discard" };
    if layout.overflow {
        return Err(RequestError::RangeLimit {
            op,
            detail: format!("more than {} descriptors", layout.segs.len()),
        });
    }
    if layout.writable_payload().next().is_some() {
        return Err(RequestError::WrongDirection(op));
    }
    if limits.read_only {
        return Err(RequestError::ReadOnly(op));
    }
    let len: u64 = layout.readable_payload().map(|(_, l)| l).sum();
    if len == 0 || len % 16 != 0 {
        return Err(RequestError::BadRangeList { op, len });
    }
    let count = len / 16;
    if count > u64::from(MAX_RANGE_SEGMENTS) {
        return Err(RequestError::RangeLimit {
            op,
            detail: format!("{count} segments, at most {MAX_RANGE_SEGMENTS}"),
        });
    }
    let mut raw = [0u8; 16 * MAX_RANGE_SEGMENTS as usize];
    // At most 16 * MAX_RANGE_SEGMENTS bytes (checked above).
    let raw = &mut raw[..len as usize];
    gather(mem, layout.readable_payload(), raw)?;
    let allowed = if zeroes {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    } else {
        0
    };
    let mut list = RangeList {
        ranges: [Range::default(); MAX_RANGE_SEGMENTS as usize],
        count: 0,
    };
    for seg in raw.chunks_exact(16) {
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
        let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
        if flags & !allowed != 0 {
            return Err(RequestError::UnsupportedFlags { op, flags });
        }
        if sectors > MAX_RANGE_SECTORS {
            return Err(RequestError::RangeLimit {
                op,
                detail: format!("{sectors} sectors, at most {MAX_RANGE_SECTORS}"),
            });
        }
        let bytes = u64::from(sectors) * SECTOR_SIZE;
        list.ranges[list.count] = Range {
            offset: check_range(limits, sector, bytes)?,
            len: bytes,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        };
        list.count += 1;
    }
    Ok(list)
}

/// At most `seg_max` data descriptors (header and status aside).
fn check_segments(layout: &Layout, limits: &Limits) -> Result<(), RequestError> {
    let data = if layout.overflow {
        usize::MAX
    } else {
        layout.readable_payload().count() + layout.writable_payload().count()
    };
    if data > limits.seg_max as usize {
        return Err(RequestError::TooManySegments {
            count: if layout.overflow {
                layout.segs.len()
            } else {
                data
            },
            max: limits.seg_max,
        });
    }
    Ok(())
}

/// Validates a read/write data range; returns its byte offset.
fn check_data(
    limits: &Limits,
    sector: u64,
    len: u64,
    op: &'static str,
) -> Result<u64, RequestError> {
    if len == 0 {
        return Err(RequestError::ZeroLength(op));
    }
    if len % SECTOR_SIZE != 0 {
        return Err(RequestError::Unaligned(len));
    }
    check_range(limits, sector, len)
}

/// `len` bytes from `sector` within the capacity; returns the byte offset.
fn check_range(limits: &Limits, sector: u64, len: u64) -> Result<u64, RequestError> {
    let capacity = limits.capacity_sectors;
    let out = || RequestError::OutOfRange {
        sector,
        bytes: len,
        capacity,
    };
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(out)?;
    match offset.checked_add(len) {
        Some(end) if end <= capacity * SECTOR_SIZE => Ok(offset),
        _ => Err(out()),
    }
}

fn type_name(kind: u32) -> &'static str {
    match kind {
        VIRTIO_BLK_T_IN => "read",
        VIRTIO_BLK_T_OUT => "write",
        VIRTIO_BLK_T_FLUSH => "flush",
        VIRTIO_BLK_T_GET_ID => "get-id",
        VIRTIO_BLK_T_DISCARD => "discard",
        VIRTIO_BLK_T_WRITE_ZEROES => "write-zeroes",
        _ => "unknown",
    }
}
