//! A descriptor chain as the device sees it: a device-readable part (header, then
//! write data or a discard list), a device-writable part (read data), and the
//! status byte, which is the last byte of the last descriptor.
//!
//! VERSION_1 devices may not assume any framing, so the header may be split over
//! descriptors and share one with data, and the status byte may share the last
//! descriptor with read data. Everything here works on guest address ranges; no
//! guest memory is touched until a range has been checked against the memory map.

use super::RequestError;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

/// Guest memory as the vhost-user layer maps it.
pub type GuestMem = GuestMemoryMmap<()>;

/// Length of the request header (`type`, `ioprio`, `sector`).
pub const HEADER_LEN: u64 = 16;

/// One descriptor: a guest address range and its direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Device-writable.
    pub writable: bool,
}

/// The shape of a chain, gathered once per request.
#[derive(Debug, Default)]
pub struct Layout {
    /// The descriptors, in chain order (at most `cap` of them, see `overflow`).
    pub segs: Vec<Seg>,
    /// Guest address of the status byte, if the chain ends in a non-empty
    /// device-writable descriptor.
    pub status: Option<u64>,
    /// A device-readable descriptor follows a device-writable one.
    pub mixed_direction: bool,
    /// The chain had more descriptors than were kept.
    pub overflow: bool,
}

impl Layout {
    /// Walks `chain`, keeping at most `cap` descriptors in `self.segs` (the
    /// vector is reused across requests to avoid allocating per request).
    pub fn collect(&mut self, chain: impl IntoIterator<Item = Descriptor>, cap: usize) {
        self.segs.clear();
        self.status = None;
        self.mixed_direction = false;
        self.overflow = false;
        let mut seen_writable = false;
        let mut last = None;
        for desc in chain {
            let seg = Seg {
                addr: desc.addr().0,
                len: u64::from(desc.len()),
                writable: desc.is_write_only(),
            };
            if seg.writable {
                seen_writable = true;
            } else if seen_writable {
                self.mixed_direction = true;
            }
            if self.segs.len() < cap {
                self.segs.push(seg);
            } else {
                self.overflow = true;
            }
            last = Some(seg);
        }
        self.status = match last {
            Some(s) if s.writable && s.len > 0 => s.addr.checked_add(s.len - 1),
            _ => None,
        };
    }

    /// Device-readable bytes after the header, as (address, length) ranges.
    pub fn readable_payload(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut skip = HEADER_LEN;
        self.segs
            .iter()
            .filter(|s| !s.writable)
            .filter_map(move |s| {
                if s.len <= skip {
                    skip -= s.len;
                    return None;
                }
                // An address near the top wraps nowhere: it fails translation.
                let r = (s.addr.saturating_add(skip), s.len - skip);
                skip = 0;
                Some(r)
            })
    }

    /// Device-writable bytes before the status byte, as (address, length) ranges.
    /// Only meaningful when the chain was not truncated (`!overflow`).
    pub fn writable_payload(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let last = self.segs.len().saturating_sub(1);
        self.segs
            .iter()
            .enumerate()
            .filter(|(_, s)| s.writable)
            .map(move |(i, s)| {
                // A truncated chain's last kept descriptor may be empty.
                let len = if i == last {
                    s.len.saturating_sub(1)
                } else {
                    s.len
                };
                (s.addr, len)
            })
            .filter(|&(_, len)| len > 0)
    }

    /// Total device-readable bytes.
    pub fn readable_len(&self) -> u64 {
        self.segs
            .iter()
            .filter(|s| !s.writable)
            .map(|s| s.len)
            .sum()
    }

    /// Reads the first `buf.len()` device-readable bytes into `buf`.
    pub fn read_prefix(&self, mem: &GuestMem, buf: &mut [u8]) -> Result<(), RequestError> {
        let mut at = 0;
        for s in self.segs.iter().filter(|s| !s.writable) {
            if at == buf.len() {
                break;
            }
            let n = (buf.len() - at).min(s.len as usize);
            mem.read_slice(&mut buf[at..at + n], GuestAddress(s.addr))
                .map_err(|_| RequestError::BadBuffer {
                    addr: s.addr,
                    len: s.len,
                })?;
            at += n;
        }
        if at < buf.len() {
            return Err(RequestError::ShortHeader(at as u64));
        }
        Ok(())
    }
}

/// Reads `len` bytes of ranges into one buffer (the discard list; small).
pub fn gather(
    mem: &GuestMem,
    ranges: impl Iterator<Item = (u64, u64)>,
    out: &mut [u8],
) -> Result<(), RequestError> {
    let mut at = 0;
    for (addr, len) in ranges {
        let n = (len as usize).min(out.len() - at);
        mem.read_slice(&mut out[at..at + n], GuestAddress(addr))
            .map_err(|_| RequestError::BadBuffer { addr, len })?;
        at += n;
        if at == out.len() {
            break;
        }
    }
    Ok(())
}

/// Copies `data` into the ranges, in order; returns the bytes written.
pub fn scatter(
    mem: &GuestMem,
    ranges: impl Iterator<Item = (u64, u64)>,
    data: &[u8],
) -> Result<usize, RequestError> {
    let mut at = 0;
    for (addr, len) in ranges {
        if at == data.len() {
            break;
        }
        let n = (len as usize).min(data.len() - at);
        mem.write_slice(&data[at..at + n], GuestAddress(addr))
            .map_err(|_| RequestError::BadBuffer { addr, len })?;
        at += n;
    }
    Ok(at)
}

/// Turns ranges into volatile slices of guest memory (a range that crosses a
/// memory-region boundary yields several). Fails, touching nothing, if any byte
/// lies outside guest memory.
pub fn slices<'m>(
    mem: &'m GuestMem,
    ranges: impl Iterator<Item = (u64, u64)>,
    out: &mut Vec<VolatileSlice<'m>>,
) -> Result<u64, RequestError> {
    out.clear();
    let mut total = 0;
    for (addr, len) in ranges {
        let bad = || RequestError::BadBuffer { addr, len };
        let count = usize::try_from(len).map_err(|_| bad())?;
        for slice in GuestMemoryBackend::get_slices(mem, GuestAddress(addr), count) {
            out.push(slice.map_err(|_| bad())?);
        }
        total += len;
    }
    Ok(total)
}

/// Size of one split-ring descriptor in the table.
const DESC_SIZE: u64 = 16;

/// The descriptors of the chain starting at `head` in a descriptor table, read
/// without the avail ring: how a request taken by a predecessor backend is found
/// again. Walks as `virtio_queue::DescriptorChain` does (whose constructor is not
/// public): at most as many descriptors as the table has, one level of indirect
/// table, a chain of at most 4 GiB; anything else ends the chain.
pub struct HeadChain<'m> {
    mem: &'m GuestMem,
    table: u64,
    size: u16,
    next: u16,
    ttl: u16,
    indirect: bool,
    bytes: u32,
}

impl<'m> HeadChain<'m> {
    /// The chain at `head` of the `size`-entry table at guest address `table`.
    pub fn new(mem: &'m GuestMem, table: u64, size: u16, head: u16) -> Self {
        HeadChain {
            mem,
            table,
            size,
            next: head,
            ttl: size,
            indirect: false,
            bytes: 0,
        }
    }
}

impl Iterator for HeadChain<'_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        if self.ttl == 0 || self.next >= self.size {
            return None;
        }
        let addr = self.table.checked_add(u64::from(self.next) * DESC_SIZE)?;
        let desc: Descriptor = self.mem.read_obj(GuestAddress(addr)).ok()?;
        if desc.refers_to_indirect_table() {
            if self.indirect || u64::from(desc.len()) % DESC_SIZE != 0 {
                self.ttl = 0;
                return None;
            }
            let entries = u16::try_from(u64::from(desc.len()) / DESC_SIZE).ok()?;
            self.table = desc.addr().0;
            self.size = entries;
            self.next = 0;
            self.ttl = entries;
            self.indirect = true;
            return self.next();
        }
        self.bytes = self.bytes.checked_add(desc.len())?;
        if desc.has_next() {
            self.next = desc.next();
            self.ttl -= 1;
        } else {
            self.ttl = 0;
        }
        Some(desc)
    }
}
