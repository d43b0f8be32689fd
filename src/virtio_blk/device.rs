//! The virtio-blk device model: turns one descriptor chain into block-stack calls
//! and a status byte.

use super::chain::{scatter, slices, GuestMem, Layout};
use super::config::{Capacity, Geometry, CONFIG_SPACE_SIZE, ID_BYTES, WRITEBACK_OFFSET};
use super::error::{ERROR_CLASSES, RING_CLASS};
use super::ratelimit::LogLimiter;
use super::request::{Limits, Range, Request};
use super::RequestError;
use crate::block::{BlockDev, SharedDev};
use crate::stats::{DeviceStats, Outcome, RequestStat};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_S_OK};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileSlice};

/// A finished request: what goes into the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Head descriptor index of the chain.
    pub head: u16,
    /// Bytes written to the guest: data plus the status byte (0 when no status
    /// could be written).
    pub used_len: u32,
    /// What the request contributes to the statistics.
    pub stat: RequestStat,
}

/// Reads at least this long may be handed to [`Offload`]: long enough that
/// the hand-off is a small part of their cost.
pub const OFFLOAD_MIN: u64 = 128 << 10;

/// Where a queue worker can send requests to run on other threads, so that
/// several of them proceed at once while the worker keeps serving its ring:
/// large reads always, and writes, discards and write-zeroes when
/// [`takes_writes`](Offload::takes_writes) says so.
///
/// Flushes run inline (or, with [`takes_all`](Offload::takes_all), beside the
/// writes in flight), without waiting for writes handed over: virtio only
/// promises that writes completed (in the used ring) before a flush was
/// submitted are durable after it, and a deferred write is not completed
/// before its I/O has finished.
pub trait Offload {
    /// The guest memory map the current chains were parsed against; a deferred
    /// request holds it so that its buffers stay mapped until it completes.
    fn memory(&self) -> Arc<GuestMem>;

    /// True when writes, discards and write-zeroes are handed over too (the
    /// served node's [`BlockDev::concurrent_writes`] is not 0).
    fn takes_writes(&self) -> bool {
        false
    }

    /// True when every request is handed over: reads of any size and flushes
    /// too (an asynchronous channel, which keeps them all in flight at once).
    fn takes_all(&self) -> bool {
        false
    }

    /// Asked once per valid request, before anything is handed over: true
    /// runs this one synchronously on the worker, as without an offload.
    fn run_inline(&mut self) -> bool {
        false
    }

    /// Takes a validated request. The implementation must eventually
    /// [`run`](Deferred::run) it and put the returned completion in the used
    /// ring.
    fn submit(&mut self, request: Deferred);
}

/// What a deferred request does.
pub(super) enum DeferredOp {
    /// Fill the device-writable `ranges` (guest address, length).
    Read {
        offset: u64,
        len: u64,
        ranges: Vec<(u64, u64)>,
    },
    /// Write the device-readable `ranges` (guest address, length).
    Write {
        offset: u64,
        ranges: Vec<(u64, u64)>,
    },
    /// Discard or zero these validated segments.
    Ranges { zeroes: bool, ranges: Vec<Range> },
    /// Make completed writes durable.
    Flush,
}

/// A validated request whose I/O has not happened yet.
pub struct Deferred {
    pub(super) head: u16,
    pub(super) op: DeferredOp,
    pub(super) status_addr: u64,
    /// Flush after a write or write-zeroes (write-through cache), as decided
    /// when the request was validated.
    pub(super) flush: bool,
    dev: SharedDev,
    pub(super) mem: Arc<GuestMem>,
    pub(super) stat: RequestStat,
}

impl Deferred {
    /// True for a read, false for a write, discard or write-zeroes.
    pub fn is_read(&self) -> bool {
        matches!(self.op, DeferredOp::Read { .. })
    }

    /// Does the I/O, writes the status byte, and returns the used-ring entry.
    /// `device` is the model that deferred it (for error reporting).
    pub fn run(self, device: &VirtioBlk) -> Completion {
        let dev = self.dev.as_ref();
        let mut bufs = Vec::new();
        let result = match &self.op {
            DeferredOp::Read {
                offset,
                len,
                ranges,
            } => slices(&self.mem, ranges.iter().copied(), &mut bufs)
                .and_then(|_| Ok(dev.read_vectored(*offset, &bufs)?))
                .map(|()| Exec::Done(*len)),
            DeferredOp::Write { offset, ranges } => {
                slices(&self.mem, ranges.iter().copied(), &mut bufs)
                    .and_then(|_| apply_write(dev, *offset, &bufs, self.flush))
                    .map(Exec::Done)
            }
            DeferredOp::Ranges { zeroes, ranges } => {
                apply_ranges(dev, *zeroes, ranges, self.flush).map(Exec::Done)
            }
            DeferredOp::Flush => dev.flush().map(|()| Exec::Done(0)).map_err(Into::into),
        };
        drop(bufs);
        device
            .finish(&self.mem, self.head, self.status_addr, result, self.stat)
            .unwrap_or(Completion {
                head: self.head,
                used_len: 0,
                stat: self.stat,
            })
    }
}

/// What executing a request led to.
pub(super) enum Exec {
    /// Finished; this many data bytes were written to the guest.
    Done(u64),
    /// Handed to an [`Offload`]; it completes later.
    Deferred,
}

/// Per-worker buffers reused from one request to the next, so the hot path does
/// not allocate. `'m` is the borrow of guest memory held for one pass over a queue.
#[derive(Default)]
pub struct Scratch<'m> {
    layout: Layout,
    slices: Vec<VolatileSlice<'m>>,
    /// The current request's statistics, filled in as it is parsed.
    pub(super) stat: RequestStat,
    /// The queue served, for the statistics.
    pub(super) queue: usize,
}

impl Scratch<'_> {
    /// Buffers for the worker of queue `queue`.
    pub fn for_queue(queue: usize) -> Self {
        Scratch {
            queue,
            ..Self::default()
        }
    }
}

/// The device model shared by every queue worker of one connection. Everything
/// mutable is atomic and written only on control paths (feature negotiation,
/// config writes), so queues never contend on it.
pub struct VirtioBlk {
    dev: SharedDev,
    geometry: Geometry,
    /// What requests are checked against and GET_CONFIG reports: shared with
    /// the resizer, so a grown disk is served at once.
    capacity: Arc<Capacity>,
    serial: [u8; ID_BYTES],
    /// The `writeback` config field (driver-writable with CONFIG_WCE).
    writeback: AtomicBool,
    /// The driver negotiated FLUSH; without it the device must be write-through.
    flush_negotiated: AtomicBool,
    log: LogLimiter,
    stats: Option<Arc<DeviceStats>>,
}

impl VirtioBlk {
    /// A device serving `dev` as described by `geometry`; `serial` is answered
    /// to GET_ID (truncated to 20 bytes, zero padded).
    pub fn new(dev: SharedDev, geometry: Geometry, serial: &str) -> Self {
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        VirtioBlk {
            dev,
            capacity: Arc::new(Capacity::new(geometry.capacity_sectors)),
            geometry,
            serial: id,
            writeback: AtomicBool::new(true),
            flush_negotiated: AtomicBool::new(true),
            log: LogLimiter::new(ERROR_CLASSES),
            stats: None,
        }
    }

    /// Serves `capacity` (shared with whoever grows the disk, and with the
    /// devices of earlier and later connections) instead of the geometry's.
    pub fn with_capacity(mut self, capacity: Arc<Capacity>) -> Self {
        self.capacity = capacity;
        self
    }

    /// The capacity requests are checked against and GET_CONFIG reports.
    pub fn capacity(&self) -> &Arc<Capacity> {
        &self.capacity
    }

    /// Counts completed requests into `stats` (kept across connections).
    pub fn with_stats(mut self, stats: Option<Arc<DeviceStats>>) -> Self {
        self.stats = stats;
        self
    }

    /// Accounts a request of queue `q` that just entered the used ring.
    pub fn account(&self, q: usize, stat: &RequestStat) {
        if let Some(s) = &self.stats {
            s.record(q, stat);
        }
    }

    /// The served node's [`BlockDev::concurrent_reads`] hint.
    pub fn concurrent_reads(&self) -> usize {
        self.dev.concurrent_reads()
    }

    /// The served node's [`BlockDev::concurrent_writes`] hint.
    pub fn concurrent_writes(&self) -> usize {
        self.dev.concurrent_writes()
    }

    /// An asynchronous channel to the served node for one queue (see
    /// [`BlockDev::open_channel`]).
    pub fn open_channel(
        &self,
        depth: u32,
    ) -> Option<std::io::Result<Box<dyn crate::block::channel::IoChannel>>> {
        self.dev.open_channel(depth)
    }

    /// What the guest is told about the disk (its `capacity_sectors` is the
    /// capacity at creation; [`capacity`](Self::capacity) is the current one).
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// The current configuration space, with the current capacity.
    pub fn config_space(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let geometry = Geometry {
            capacity_sectors: self.capacity.sectors(),
            ..self.geometry.clone()
        };
        geometry.config_space(self.writeback.load(Ordering::Relaxed))
    }

    /// Applies a driver write to the configuration space. Only the `writeback`
    /// byte is writable, and only on a writable disk; returns false (and changes
    /// nothing) for any other write.
    pub fn write_config(&self, offset: u32, data: &[u8]) -> bool {
        let Some(at) = (WRITEBACK_OFFSET as u64).checked_sub(u64::from(offset)) else {
            return false;
        };
        match data.get(at as usize) {
            Some(&wce) if !self.geometry.read_only => {
                self.writeback.store(wce != 0, Ordering::Relaxed);
                log::info!(
                    "guest set the write cache to {}",
                    if wce != 0 {
                        "write-back"
                    } else {
                        "write-through"
                    }
                );
                true
            }
            _ => false,
        }
    }

    /// Records the features the driver accepted.
    pub fn set_driver_features(&self, features: u64) {
        self.flush_negotiated
            .store(features & (1 << VIRTIO_BLK_F_FLUSH) != 0, Ordering::Relaxed);
    }

    /// Back to the state of a freshly created device (VIRTIO reset).
    pub fn reset(&self) {
        self.writeback.store(true, Ordering::Relaxed);
        self.flush_negotiated.store(true, Ordering::Relaxed);
    }

    fn write_through(&self) -> bool {
        !(self.writeback.load(Ordering::Relaxed) && self.flush_negotiated.load(Ordering::Relaxed))
    }

    /// Serves one request: executes it, writes the status byte, and returns what
    /// goes into the used ring. Never panics on guest input; every failure becomes
    /// a status byte (or, with no writable status byte, a used length of 0) and a
    /// rate-limited log line.
    ///
    /// With `offload`, a large read (or, if it takes them, a write, discard or
    /// write-zeroes) may be handed over instead: then `None` is returned and the
    /// offload completes it later.
    pub fn handle_chain<'m>(
        &self,
        mem: &'m GuestMem,
        chain: DescriptorChain<&'m GuestMem>,
        scratch: &mut Scratch<'m>,
        offload: Option<&mut dyn Offload>,
    ) -> Option<Completion> {
        let head = chain.head_index();
        self.handle_descs(mem, head, chain, scratch, offload)
    }

    /// [`handle_chain`](Self::handle_chain) for the descriptors of the chain at
    /// `head`, however they were found.
    pub fn handle_descs<'m>(
        &self,
        mem: &'m GuestMem,
        head: u16,
        chain: impl IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
        scratch: &mut Scratch<'m>,
        offload: Option<&mut dyn Offload>,
    ) -> Option<Completion> {
        scratch.stat = RequestStat::start();
        // Header + data + status; anything longer is over seg_max anyway.
        let cap = self.geometry.seg_max as usize + 3;
        scratch.layout.collect(chain, cap);

        let status_addr = match scratch.layout.status {
            Some(a) if GuestMemoryBackend::check_range(mem, GuestAddress(a), 1) => a,
            _ => {
                self.report(head, &RequestError::NoStatus);
                return Some(Completion {
                    head,
                    used_len: 0,
                    stat: RequestStat::default(),
                });
            }
        };
        let result = self.execute(mem, scratch, head, status_addr, offload);
        self.finish(mem, head, status_addr, result, scratch.stat)
    }

    /// Writes the status byte of a finished request (`None` when deferred).
    pub(super) fn finish(
        &self,
        mem: &GuestMem,
        head: u16,
        status_addr: u64,
        result: Result<Exec, RequestError>,
        mut stat: RequestStat,
    ) -> Option<Completion> {
        let (status, written) = match result {
            Ok(Exec::Deferred) => return None,
            Ok(Exec::Done(written)) => (VIRTIO_BLK_S_OK as u8, written),
            Err(e) => {
                self.report(head, &e);
                stat.outcome = match e {
                    RequestError::Block(_) => Outcome::Failed,
                    _ => Outcome::Invalid,
                };
                (e.status(), 0)
            }
        };
        if mem.write_obj(status, GuestAddress(status_addr)).is_err() {
            // Checked before executing; only a memory-map change gets here.
            self.report(head, &RequestError::NoStatus);
            stat.outcome = Outcome::Failed;
            return Some(Completion {
                head,
                used_len: 0,
                stat,
            });
        }
        Some(Completion {
            head,
            used_len: u32::try_from(written).unwrap_or(u32::MAX - 1) + 1,
            stat,
        })
    }

    /// Logs a problem with the ring itself (not one request), rate limited like
    /// request errors: a guest can provoke these on every kick.
    pub fn report_ring_error(&self, queue_index: usize, what: &str, err: virtio_queue::Error) {
        let Some(lost) = self.log.allow(RING_CLASS) else {
            return;
        };
        let more = if lost > 0 {
            format!(" ({lost} similar messages suppressed)")
        } else {
            String::new()
        };
        log::warn!("queue {queue_index}: {what}: {err}{more}");
    }

    pub(super) fn report(&self, head: u16, err: &RequestError) {
        let Some(lost) = self.log.allow(err.class()) else {
            return;
        };
        let more = if lost > 0 {
            format!(" ({lost} similar messages suppressed)")
        } else {
            String::new()
        };
        match err {
            RequestError::Block(e) => log::error!("request (head {head}): {e}{more}"),
            e => log::warn!("bad request from guest (head {head}): {e}{more}"),
        }
    }

    /// What a request is checked against now.
    fn limits(&self) -> Limits {
        Limits {
            capacity_sectors: self.capacity.sectors(),
            seg_max: self.geometry.seg_max,
            read_only: self.geometry.read_only,
        }
    }

    /// Parses the request, then runs (or defers) it.
    fn execute<'m>(
        &self,
        mem: &'m GuestMem,
        scratch: &mut Scratch<'m>,
        head: u16,
        status_addr: u64,
        offload: Option<&mut dyn Offload>,
    ) -> Result<Exec, RequestError> {
        let request = Request::parse(mem, &scratch.layout, &self.limits(), &mut scratch.stat)?;
        let offload = offload.and_then(|o| if o.run_inline() { None } else { Some(o) });
        let at = Deferral { head, status_addr };
        match request {
            Request::Read { offset, len } => self.read(mem, offset, len, scratch, at, offload),
            Request::Write { offset } => self.write(mem, offset, scratch, at, offload),
            Request::Flush => self.flush(scratch, at, offload),
            Request::GetId => {
                let written = scatter(mem, scratch.layout.writable_payload(), &self.serial)?;
                Ok(Exec::Done(written as u64))
            }
            Request::Ranges { zeroes, ranges } => {
                self.discard_or_zero(zeroes, ranges.as_slice(), scratch, at, offload)
            }
        }
    }

    fn read<'m>(
        &self,
        mem: &'m GuestMem,
        offset: u64,
        len: u64,
        scratch: &mut Scratch<'m>,
        at: Deferral,
        offload: Option<&mut dyn Offload>,
    ) -> Result<Exec, RequestError> {
        let layout = &scratch.layout;
        // Resolving the buffers also validates them, before any hand-off.
        slices(mem, layout.writable_payload(), &mut scratch.slices)?;
        if let Some(offload) = offload.filter(|o| len >= OFFLOAD_MIN || o.takes_all()) {
            scratch.slices.clear();
            let op = DeferredOp::Read {
                offset,
                len,
                ranges: layout.writable_payload().collect(),
            };
            return Ok(self.defer(offload, at, op, false, scratch.stat));
        }
        self.dev.read_vectored(offset, &scratch.slices)?;
        Ok(Exec::Done(len))
    }

    fn write<'m>(
        &self,
        mem: &'m GuestMem,
        offset: u64,
        scratch: &mut Scratch<'m>,
        at: Deferral,
        offload: Option<&mut dyn Offload>,
    ) -> Result<Exec, RequestError> {
        let layout = &scratch.layout;
        slices(mem, layout.readable_payload(), &mut scratch.slices)?;
        if let Some(offload) = offload.filter(|o| o.takes_writes() || o.takes_all()) {
            scratch.slices.clear();
            let op = DeferredOp::Write {
                offset,
                ranges: layout.readable_payload().collect(),
            };
            return Ok(self.defer(offload, at, op, self.write_through(), scratch.stat));
        }
        apply_write(
            self.dev.as_ref(),
            offset,
            &scratch.slices,
            self.write_through(),
        )
        .map(Exec::Done)
    }

    fn flush(
        &self,
        scratch: &Scratch<'_>,
        at: Deferral,
        offload: Option<&mut dyn Offload>,
    ) -> Result<Exec, RequestError> {
        if let Some(offload) = offload.filter(|o| o.takes_all()) {
            return Ok(self.defer(offload, at, DeferredOp::Flush, false, scratch.stat));
        }
        self.dev.flush()?;
        Ok(Exec::Done(0))
    }

    fn discard_or_zero(
        &self,
        zeroes: bool,
        ranges: &[Range],
        scratch: &Scratch<'_>,
        at: Deferral,
        offload: Option<&mut dyn Offload>,
    ) -> Result<Exec, RequestError> {
        let flush = zeroes && self.write_through();
        if let Some(offload) = offload.filter(|o| o.takes_writes() || o.takes_all()) {
            let op = DeferredOp::Ranges {
                zeroes,
                ranges: ranges.to_vec(),
            };
            return Ok(self.defer(offload, at, op, flush, scratch.stat));
        }
        apply_ranges(self.dev.as_ref(), zeroes, ranges, flush).map(Exec::Done)
    }

    /// Hands a parsed request to `offload`.
    fn defer(
        &self,
        offload: &mut dyn Offload,
        at: Deferral,
        op: DeferredOp,
        flush: bool,
        stat: RequestStat,
    ) -> Exec {
        offload.submit(Deferred {
            head: at.head,
            op,
            status_addr: at.status_addr,
            flush,
            dev: self.dev.clone(),
            mem: offload.memory(),
            stat,
        });
        Exec::Deferred
    }
}

/// Where a request's completion goes: its chain and its status byte.
#[derive(Debug, Clone, Copy)]
struct Deferral {
    head: u16,
    status_addr: u64,
}

/// Writes a validated request's data (flushing after it for a write-through
/// cache); returns the bytes written to the guest (none).
fn apply_write(
    dev: &dyn BlockDev,
    offset: u64,
    bufs: &[VolatileSlice<'_>],
    flush: bool,
) -> Result<u64, RequestError> {
    dev.write_vectored(offset, bufs)?;
    if flush {
        dev.flush()?;
    }
    Ok(0)
}

/// Discards or zeroes validated segments, in order; returns the bytes written
/// to the guest (none).
fn apply_ranges(
    dev: &dyn BlockDev,
    zeroes: bool,
    ranges: &[Range],
    flush: bool,
) -> Result<u64, RequestError> {
    for r in ranges.iter().filter(|r| r.len > 0) {
        if zeroes {
            dev.write_zeroes(r.offset, r.len, r.unmap)?;
        } else {
            dev.discard(r.offset, r.len)?;
        }
    }
    if flush {
        dev.flush()?;
    }
    Ok(0)
}
