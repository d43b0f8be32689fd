//! An overlay disk (the active or hidden disk of COLO replication): a sparse data
//! store the size of the disk plus an in-memory allocation bitmap, one bit per
//! granule (4 KiB by default).
//!
//! * A granule is *allocated* once a write covered it; only allocated granules are
//!   ever read from the store. Unallocated granules belong to the layers below
//!   (see [`Chain`](super::Chain)); read on their own they are zeroes.
//! * A write covering whole granules goes straight to the store. A write covering
//!   part of an unallocated granule fills the rest of the granule from a `below`
//!   callback (read-modify-write), under a per-granule lock so that two writes to
//!   different sectors of one granule both survive.
//! * [`Overlay::make_empty`] (the checkpoint) costs O(allocated): it walks only the
//!   bitmap words that have bits set and releases the space, by punching a hole per
//!   allocated run or, for a file with many runs, by truncating it and setting its
//!   length back (two syscalls whose kernel cost is the pages freed).
//! * [`Overlay::make_empty_deferred`] does the bitmap part only (microseconds) and
//!   marks the old runs *pending release*; [`Overlay::release_pending`], run on any
//!   thread while I/O goes on, punches them chunk by chunk. A write that lands on a
//!   pending granule first claims it under the chunk's lock, so a punch can never
//!   run after (and destroy) new data. Freeing pages is the expensive part of
//!   emptying (the kernel's work, proportional to the bytes); this keeps it out of
//!   the window in which the checkpoint holds guest I/O.
//!
//! The bitmap lives in memory only: **an overlay's contents do not survive the
//! process**. Opening an overlay file discards what it held. That is by design: a
//! secondary that died has lost its VM too and must be resynced from the primary.

use super::bitmap::Bitmap;
use super::iov::{iov_copy_out, iov_window, iov_zero};
use super::{
    check_range, iov_len, BlockDev, BlockError, Extent, ExtentKind, RawFile, Result, SharedDev,
};
use crate::sync::MutexExt;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use vm_memory::VolatileSlice;

/// Default allocation granule: a 4 KiB aligned guest write needs no read from below.
pub const DEFAULT_GRANULE: u64 = 4096;

/// Locks for read-modify-write of partial granules, picked by granule number.
const RMW_STRIPES: usize = 64;

/// Granules per release chunk (1 MiB at 4 KiB): the unit of background release
/// and of its locking.
const RELEASE_CHUNK: u64 = 256;

/// Locks for background release, picked by chunk number.
const RELEASE_STRIPES: usize = 64;

/// Above this many allocated runs, a file overlay is emptied by truncation rather
/// than one hole punch per run.
const PUNCH_LIMIT: usize = 16;

/// Fills `buf` with the contents of the layers below an overlay at `offset`.
pub type Below<'a> = &'a dyn Fn(u64, &mut [u8]) -> Result<()>;

/// What [`Overlay::make_empty`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Emptied {
    /// Allocated runs found (each a maximal range of allocated granules).
    pub runs: u64,
    /// Bytes that were allocated.
    pub bytes: u64,
    /// Bitmap words visited: the CPU cost, proportional to what was allocated.
    pub words_visited: u64,
    /// True when the space was released by truncating the file.
    pub truncated: bool,
}

/// An overlay disk. See the module documentation.
pub struct Overlay {
    store: SharedDev,
    file: Option<File>,
    size: u64,
    granule: u64,
    bitmap: Bitmap,
    rmw: Box<[Mutex<()>]>,
    /// Granules emptied but whose space is not released yet.
    pending: Bitmap,
    release_locks: Box<[Mutex<()>]>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay")
            .field("size", &self.size)
            .field("granule", &self.granule)
            .field("allocated", &self.allocated_bytes())
            .finish()
    }
}

fn zero_below(_offset: u64, buf: &mut [u8]) -> Result<()> {
    buf.fill(0);
    Ok(())
}

impl Overlay {
    /// Creates the overlay file at `path` (or empties an existing one) with length
    /// `size`, sparse, with 4 KiB granules.
    pub fn create(path: &Path, size: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(size)?;
        Self::from_file(file)
    }

    /// Opens an existing overlay file, keeping its length (so that a length that
    /// does not match the disk is caught by replication start) and discarding its
    /// contents.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let size = file.metadata()?.len();
        file.set_len(0)?;
        file.set_len(size)?;
        Self::from_file(file)
    }

    fn from_file(file: File) -> io::Result<Self> {
        let store = RawFile::from_file(file.try_clone()?, false)?;
        let mut overlay = Self::with_store(Arc::new(store), DEFAULT_GRANULE)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        overlay.file = Some(file);
        Ok(overlay)
    }

    /// An overlay over any node as its data store (tests use a `MemDev`).
    /// The store must read zeroes where it was never
    /// written or was discarded; `granule` is a power of two of at least 512.
    pub fn with_store(store: SharedDev, granule: u64) -> Result<Self> {
        if !granule.is_power_of_two() || granule < 512 {
            return Err(BlockError::NotPowerOfTwo {
                what: "overlay granule",
                value: granule,
                min: 512,
            });
        }
        let size = store.size();
        Ok(Overlay {
            store,
            file: None,
            size,
            granule,
            bitmap: Bitmap::new(size.div_ceil(granule)),
            rmw: (0..RMW_STRIPES).map(|_| Mutex::new(())).collect(),
            pending: Bitmap::new(size.div_ceil(granule)),
            release_locks: (0..RELEASE_STRIPES).map(|_| Mutex::new(())).collect(),
        })
    }

    /// The allocation granule in bytes.
    pub fn granule(&self) -> u64 {
        self.granule
    }

    /// Bytes currently allocated (whole granules).
    pub fn allocated_bytes(&self) -> u64 {
        (self.bitmap.count() * self.granule).min(self.size)
    }

    /// True when nothing is allocated.
    pub fn is_empty(&self) -> bool {
        self.bitmap.count() == 0
    }

    /// Whether the byte at `offset` is allocated here.
    pub fn is_allocated(&self, offset: u64) -> bool {
        self.bitmap.get(offset / self.granule)
    }

    /// The run starting at `offset` (at most `len` bytes): allocated or not, and
    /// its length in bytes. Runs end on granule boundaries or at `offset + len`.
    pub fn allocation(&self, offset: u64, len: u64) -> (bool, u64) {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return (false, 0);
        }
        let first = offset / self.granule;
        let last = (end - 1) / self.granule;
        let (alloc, n) = self.bitmap.run(first, last - first + 1);
        let run_end = ((first + n) * self.granule).min(end);
        (alloc, run_end - offset)
    }

    /// The first allocated byte at or after `offset` (granule aligned, or `offset`).
    pub fn next_allocated(&self, offset: u64) -> Option<u64> {
        let g = self.bitmap.next_set(offset / self.granule)?;
        Some((g * self.granule).max(offset))
    }

    fn granule_end(&self, g: u64) -> u64 {
        ((g + 1) * self.granule).min(self.size)
    }

    /// Granules fully inside `offset..end` (the tail granule counts as full when
    /// `end` is the end of the disk).
    fn whole_granules(&self, offset: u64, end: u64) -> Option<(u64, u64)> {
        let first = offset.div_ceil(self.granule);
        let last = if end == self.size {
            self.size.div_ceil(self.granule)
        } else {
            end / self.granule
        };
        if first < last {
            Some((first, last - first))
        } else {
            None
        }
    }

    /// Writes `bufs` at `offset`. Parts of unallocated granules the request does not
    /// cover are filled from `below` first, so the granule becomes allocated whole.
    pub fn write_over(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_>],
        below: Below<'_>,
    ) -> Result<()> {
        let len = iov_len(bufs);
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let first = offset / self.granule;
        let last = (end - 1) / self.granule;
        let covers = |g: u64| g * self.granule >= offset && self.granule_end(g) <= end;
        let mut lo = offset;
        let mut hi = end;
        if !covers(first) && !self.bitmap.get(first) {
            self.rmw_granule(first, offset, bufs, below)?;
            lo = self.granule_end(first).min(end);
        }
        if last != first && !covers(last) && !self.bitmap.get(last) {
            self.rmw_granule(last, offset, bufs, below)?;
            hi = last * self.granule;
        }
        if lo < hi {
            let part = iov_window(bufs, lo - offset, hi - lo)?;
            let g0 = lo / self.granule;
            let g1 = (hi - 1) / self.granule;
            self.claim(g0, g1 - g0 + 1);
            self.store.write_vectored(lo, &part)?;
            self.bitmap.set_range(g0, g1 - g0 + 1);
        }
        Ok(())
    }

    /// Writes the part of the request (`offset`, `bufs`) that falls in granule `g`,
    /// which the request covers only partly.
    fn rmw_granule(
        &self,
        g: u64,
        offset: u64,
        bufs: &[VolatileSlice<'_>],
        below: Below<'_>,
    ) -> Result<()> {
        let end = offset + iov_len(bufs);
        let gs = g * self.granule;
        let ge = self.granule_end(g);
        let part_lo = offset.max(gs);
        let part_hi = end.min(ge);
        let _guard = self.rmw[g as usize % RMW_STRIPES].lock_or_recover();
        if self.bitmap.get(g) {
            // Another request allocated the granule while we waited.
            let part = iov_window(bufs, part_lo - offset, part_hi - part_lo)?;
            return self.store.write_vectored(part_lo, &part);
        }
        let mut buf = vec![0u8; (ge - gs) as usize];
        below(gs, &mut buf)?;
        let at = (part_lo - gs) as usize;
        iov_copy_out(
            bufs,
            part_lo - offset,
            &mut buf[at..at + (part_hi - part_lo) as usize],
        )?;
        self.claim(g, 1);
        self.store
            .write_vectored(gs, &[VolatileSlice::from(buf.as_mut_slice())])?;
        self.bitmap.set_range(g, 1);
        Ok(())
    }

    /// Reads a range the caller knows is allocated (from [`Overlay::allocation`])
    /// straight from the store, without looking at the bitmap again.
    pub fn read_allocated(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        check_range(offset, iov_len(bufs), self.size)?;
        self.store.read_vectored(offset, bufs)
    }

    /// Makes `offset..offset + len` read as zeroes here, hiding the layers below
    /// (partial granules are completed from `below`).
    pub fn zero_over(&self, offset: u64, len: u64, below: Below<'_>) -> Result<()> {
        check_range(offset, len, self.size)?;
        let end = offset + len;
        let Some((g0, n)) = self.whole_granules(offset, end) else {
            return self.write_zero_bytes(offset, len, below);
        };
        let mid_lo = g0 * self.granule;
        let mid_hi = self.granule_end(g0 + n - 1);
        if offset < mid_lo {
            self.write_zero_bytes(offset, mid_lo - offset, below)?;
        }
        if mid_hi < end {
            self.write_zero_bytes(mid_hi, end - mid_hi, below)?;
        }
        self.claim(g0, n);
        self.store.write_zeroes(mid_lo, mid_hi - mid_lo, true)?;
        self.bitmap.set_range(g0, n);
        Ok(())
    }

    fn write_zero_bytes(&self, offset: u64, len: u64, below: Below<'_>) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mut zeroes = vec![0u8; len as usize];
        self.write_over(offset, &[VolatileSlice::from(zeroes.as_mut_slice())], below)
    }

    /// Drops the granules fully inside `offset..offset + len`: they belong to the
    /// layers below again, and their space is released.
    pub fn unallocate(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size)?;
        let Some((g0, n)) = self.whole_granules(offset, offset + len) else {
            return Ok(());
        };
        if self.bitmap.clear_range(g0, n) > 0 {
            let lo = g0 * self.granule;
            let hi = self.granule_end(g0 + n - 1);
            self.release(lo, hi - lo);
        }
        Ok(())
    }

    /// Releases store space; the bitmap already says the range is unallocated, so
    /// a failure costs space, never correctness.
    fn release(&self, offset: u64, len: u64) {
        if let Err(e) = self.store.discard(offset, len) {
            log::warn!("overlay: releasing {len} bytes at {offset}: {e}");
        }
    }

    /// Takes granules `g0..g0 + n` out of the pending-release set before a write
    /// to them: under the chunk's lock, so that a release in progress either has
    /// punched them already or will not touch them.
    fn claim(&self, g0: u64, n: u64) {
        if self.pending.count() == 0 || self.pending.run(g0, n) == (false, n) {
            return;
        }
        let end = g0 + n;
        let mut c = g0 / RELEASE_CHUNK;
        while c * RELEASE_CHUNK < end {
            let _guard = self.release_locks[c as usize % RELEASE_STRIPES].lock_or_recover();
            let lo = g0.max(c * RELEASE_CHUNK);
            let hi = end.min((c + 1) * RELEASE_CHUNK);
            self.pending.clear_range(lo, hi - lo);
            c += 1;
        }
    }

    /// Bytes emptied whose space is not released yet.
    pub fn pending_release_bytes(&self) -> u64 {
        (self.pending.count() * self.granule).min(self.size)
    }

    /// Empties the bitmap only (the checkpoint's critical part): afterwards the
    /// overlay is empty, and the old runs are pending release
    /// ([`Overlay::release_pending`]). The caller must keep writers away for the
    /// duration.
    pub fn make_empty_deferred(&self) -> Emptied {
        let mut stats = Emptied::default();
        let words = self.bitmap.for_each_run(|g, n| {
            self.pending.set_range(g, n);
            stats.runs += 1;
            stats.bytes += self.granule_end(g + n - 1) - g * self.granule;
        });
        stats.words_visited = words + self.bitmap.clear_all();
        stats
    }

    /// Releases the space of everything pending release, one chunk at a time,
    /// while I/O may go on. Returns the bytes released.
    pub fn release_pending(&self) -> u64 {
        let granules = self.pending.len_bits();
        let mut released = 0;
        let mut from = 0;
        loop {
            // Wrap around once: a checkpoint may have added runs behind us.
            let next = self
                .pending
                .next_set(from)
                .or_else(|| (from > 0).then(|| self.pending.next_set(0)).flatten());
            let Some(g) = next else {
                break;
            };
            let c = g / RELEASE_CHUNK;
            let hi = ((c + 1) * RELEASE_CHUNK).min(granules);
            released += self.release_in_chunk(g, hi);
            from = hi;
            if from >= granules {
                from = 0;
            }
        }
        released
    }

    /// Releases the pending granules of `g..hi`, which lie in one release chunk,
    /// under the chunk's lock. Returns the bytes released.
    fn release_in_chunk(&self, g: u64, hi: u64) -> u64 {
        let c = g / RELEASE_CHUNK;
        let _guard = self.release_locks[c as usize % RELEASE_STRIPES].lock_or_recover();
        let mut released = 0;
        let mut pos = g;
        while pos < hi {
            let (set, n) = self.pending.run(pos, hi - pos);
            if set {
                let lo = pos * self.granule;
                let len = self.granule_end(pos + n - 1) - lo;
                self.release(lo, len);
                // Only now: a writer that sees the bit clear skips the
                // lock, so the punch must be over by then.
                self.pending.clear_range(pos, n);
                released += len;
            }
            pos += n;
        }
        released
    }

    /// Drops the granules fully inside `offset..offset + len` from the bitmap
    /// only (they belong to the layers below again) and marks them pending
    /// release: no system call, so a caller holding a lock that requests need
    /// keeps it for a few atomic operations. The caller must keep readers and
    /// writers of the range away until this returns; the space is released by
    /// [`Overlay::release_pending`]. Returns the bytes that were allocated.
    pub fn unallocate_deferred(&self, offset: u64, len: u64) -> Result<u64> {
        check_range(offset, len, self.size)?;
        let Some((g0, n)) = self.whole_granules(offset, offset + len) else {
            return Ok(0);
        };
        let end = g0 + n;
        let mut g = g0;
        let mut bytes = 0;
        while g < end {
            let (set, run) = self.bitmap.run(g, end - g);
            if set {
                self.pending.set_range(g, run);
                self.bitmap.clear_range(g, run);
                bytes += self.granule_end(g + run - 1) - g * self.granule;
            }
            g += run;
        }
        Ok(bytes)
    }

    /// Empties the overlay and releases its space now (see the module
    /// documentation). The caller must keep writers away for the duration.
    pub fn make_empty(&self) -> Result<Emptied> {
        let mut stats = self.make_empty_deferred();
        let mut runs = 0;
        self.pending.for_each_run(|_, _| runs += 1);
        match &self.file {
            Some(file) if runs > PUNCH_LIMIT => {
                file.set_len(0)
                    .and_then(|()| file.set_len(self.size))
                    .map_err(|e| BlockError::io("truncate", 0, e))?;
                self.pending.clear_all();
                stats.truncated = true;
            }
            _ => {
                self.release_pending();
            }
        }
        Ok(stats)
    }
}

impl BlockDev for Overlay {
    fn size(&self) -> u64 {
        self.size
    }

    /// Allocated granules come from the store; the rest read as zeroes.
    fn read_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        let len = iov_len(bufs);
        check_range(offset, len, self.size)?;
        let mut pos = offset;
        while pos < offset + len {
            let (alloc, run) = self.allocation(pos, offset + len - pos);
            if alloc && pos == offset && run == len {
                return self.store.read_vectored(offset, bufs);
            }
            let part = iov_window(bufs, pos - offset, run)?;
            if alloc {
                self.store.read_vectored(pos, &part)?;
            } else {
                iov_zero(&part);
            }
            pos += run;
        }
        Ok(())
    }

    fn write_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        self.write_over(offset, bufs, &zero_below)
    }

    fn flush(&self) -> Result<()> {
        self.store.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size)?;
        let end = offset + len;
        let Some((g0, n)) = self.whole_granules(offset, end) else {
            return self.zero_over(offset, len, &zero_below);
        };
        let mid_lo = g0 * self.granule;
        let mid_hi = self.granule_end(g0 + n - 1);
        if offset < mid_lo {
            self.zero_over(offset, mid_lo - offset, &zero_below)?;
        }
        if mid_hi < end {
            self.zero_over(mid_hi, end - mid_hi, &zero_below)?;
        }
        self.unallocate(mid_lo, mid_hi - mid_lo)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<()> {
        self.zero_over(offset, len, &zero_below)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(offset, len, self.size)?;
        let (alloc, run) = self.allocation(offset, len);
        Ok(Extent {
            len: run,
            kind: if alloc {
                ExtentKind::Data
            } else {
                ExtentKind::Hole
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{BlockDevExt, MemDev};
    use std::os::unix::fs::MetadataExt;

    fn mem_overlay(size: u64) -> (Arc<MemDev>, Overlay) {
        let store = Arc::new(MemDev::new(size));
        let ov = Overlay::with_store(store.clone(), DEFAULT_GRANULE).unwrap();
        (store, ov)
    }

    fn fill_below(byte: u8) -> impl Fn(u64, &mut [u8]) -> Result<()> {
        move |_, buf: &mut [u8]| {
            buf.fill(byte);
            Ok(())
        }
    }

    #[test]
    fn aligned_write_reads_nothing_from_below() {
        let (_s, ov) = mem_overlay(1 << 20);
        let below = |_: u64, _: &mut [u8]| -> Result<()> { panic!("read from below") };
        let mut data = vec![3u8; 8192];
        ov.write_over(4096, &[VolatileSlice::from(data.as_mut_slice())], &below)
            .unwrap();
        assert_eq!(ov.allocated_bytes(), 8192);
        assert_eq!(ov.allocation(0, 1 << 20), (false, 4096));
        assert_eq!(ov.allocation(4096, 1 << 20), (true, 8192));
        assert_eq!(ov.allocation(5000, 100), (true, 100));
    }

    #[test]
    fn partial_write_completes_granule_from_below() {
        let (_s, ov) = mem_overlay(1 << 20);
        let mut data = vec![9u8; 1024];
        ov.write_over(
            4096 + 512,
            &[VolatileSlice::from(data.as_mut_slice())],
            &fill_below(0x11),
        )
        .unwrap();
        let mut out = vec![0u8; 4096];
        ov.read_at(4096, &mut out).unwrap();
        assert!(out[..512].iter().all(|&b| b == 0x11));
        assert!(out[512..1536].iter().all(|&b| b == 9));
        assert!(out[1536..].iter().all(|&b| b == 0x11));
        // Once allocated, a partial write no longer consults below.
        ov.write_over(
            4096,
            &[VolatileSlice::from(&mut [5u8; 512][..])],
            &fill_below(0x77),
        )
        .unwrap();
        ov.read_at(4096, &mut out).unwrap();
        assert!(out[..512].iter().all(|&b| b == 5));
        assert!(out[1536..].iter().all(|&b| b == 0x11));
    }

    #[test]
    fn concurrent_sector_writes_to_one_granule_all_survive() {
        let (_s, ov) = mem_overlay(1 << 20);
        let ov = Arc::new(ov);
        let threads: Vec<_> = (0..8u8)
            .map(|i| {
                let ov = ov.clone();
                std::thread::spawn(move || {
                    let mut d = vec![i + 1; 512];
                    ov.write_over(
                        u64::from(i) * 512,
                        &[VolatileSlice::from(d.as_mut_slice())],
                        &fill_below(0xee),
                    )
                    .unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut out = vec![0u8; 4096];
        ov.read_at(0, &mut out).unwrap();
        for i in 0..8 {
            assert!(out[i * 512..(i + 1) * 512]
                .iter()
                .all(|&b| b == i as u8 + 1));
        }
    }

    #[test]
    fn make_empty_costs_one_discard_per_run_whatever_the_disk_size() {
        for size in [1u64 << 30, 16u64 << 30] {
            let (store, ov) = mem_overlay(size);
            for i in 0..5u64 {
                ov.write_at(i * (100 << 20), &vec![1u8; 64 << 10]).unwrap();
            }
            ov.write_at(size - 4096, &[2u8; 4096]).unwrap();
            store.reset_stats();
            let st = ov.make_empty().unwrap();
            assert_eq!(st.runs, 6);
            assert_eq!(st.bytes, 5 * (64 << 10) + 4096);
            assert!(st.words_visited <= 2 * 6, "visited {}", st.words_visited);
            let io = store.stats();
            assert_eq!(io.discards, 6);
            assert_eq!(io.reads + io.writes + io.write_zeroes, 0);
            assert!(ov.is_empty());
            assert_eq!(ov.next_allocated(0), None);
            let mut b = [1u8; 512];
            ov.read_at(size - 512, &mut b).unwrap();
            assert_eq!(b, [0u8; 512]);
        }
    }

    #[test]
    fn make_empty_releases_file_space() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("active");
        let ov = Overlay::create(&path, 64 << 20).unwrap();
        // Many scattered runs: the truncate path.
        for i in 0..64u64 {
            ov.write_at(i * (1 << 20), &vec![7u8; 8192]).unwrap();
        }
        // Also one big run.
        ov.write_at(40 << 20, &vec![7u8; 4 << 20]).unwrap();
        let before = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(before >= 4 << 20, "allocated {before}");
        let st = ov.make_empty().unwrap();
        assert!(st.truncated);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert!(
            meta.blocks() * 512 < 64 << 10,
            "still {} bytes",
            meta.blocks() * 512
        );
        // Few runs: hole punching.
        ov.write_at(1 << 20, &vec![7u8; 2 << 20]).unwrap();
        let st = ov.make_empty().unwrap();
        assert!(!st.truncated);
        assert_eq!(st.runs, 1);
        assert!(std::fs::metadata(&path).unwrap().blocks() * 512 < 64 << 10);
        let mut out = vec![1u8; 4096];
        ov.read_at(1 << 20, &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0));
    }

    #[test]
    fn deferred_empty_releases_later_and_never_punches_rewritten_granules() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("active");
        let ov = Arc::new(Overlay::create(&path, 64 << 20).unwrap());
        ov.write_at(0, &vec![7u8; 32 << 20]).unwrap();
        let st = ov.make_empty_deferred();
        assert_eq!((st.runs, st.bytes), (1, 32 << 20));
        assert!(ov.is_empty());
        assert_eq!(ov.pending_release_bytes(), 32 << 20);
        assert!(std::fs::metadata(&path).unwrap().blocks() * 512 >= 32 << 20);
        // Writers re-allocate pending granules while a release runs.
        let releaser = {
            let ov = ov.clone();
            std::thread::spawn(move || ov.release_pending())
        };
        let writers: Vec<_> = (0..2u64)
            .map(|t| {
                let ov = ov.clone();
                std::thread::spawn(move || {
                    for i in 0..200u64 {
                        let off = ((i * 2 + t) * 40_960) % (32 << 20) / 4096 * 4096;
                        ov.write_at(off, &[t as u8 + 1; 4096]).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        releaser.join().unwrap();
        ov.release_pending();
        assert_eq!(ov.pending_release_bytes(), 0);
        for t in 0..2u64 {
            for i in 0..200u64 {
                let off = ((i * 2 + t) * 40_960) % (32 << 20) / 4096 * 4096;
                let mut b = vec![0u8; 4096];
                ov.read_at(off, &mut b).unwrap();
                assert!(
                    b.iter().all(|&x| x == t as u8 + 1),
                    "granule at {off} punched"
                );
            }
        }
        let kept = ov.allocated_bytes();
        let blocks = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(
            blocks <= kept + (64 << 10),
            "{blocks} bytes held for {kept} allocated"
        );
    }

    #[test]
    fn background_release_never_punches_granules_written_after_the_checkpoint() {
        // Writers (whole-granule and partial, read-modify-write) race a release
        // of the previous checkpoint's runs; every granule written since the
        // last checkpoint must read back exactly.
        const SIZE: u64 = 4 << 20;
        let granules = SIZE / DEFAULT_GRANULE;
        let (_s, ov) = mem_overlay(SIZE);
        let ov = Arc::new(ov);
        let pause = Arc::new(std::sync::RwLock::new(()));
        let model: Arc<Vec<Mutex<Option<Vec<u8>>>>> =
            Arc::new((0..granules).map(|_| Mutex::new(None)).collect());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0..2u64)
            .map(|t| {
                let (ov, pause, model, stop) =
                    (ov.clone(), pause.clone(), model.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut rng = colo_blk_testkit::XorShift::new(0x1234_5678u64 + t);
                    let mut v = 0u8;
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        let x = rng.next();
                        v = v.wrapping_add(1).max(1);
                        let g = x % granules;
                        let _running = pause.read().unwrap();
                        let mut m = model[g as usize].lock().unwrap();
                        if x % 3 == 0 {
                            let mut half = vec![v; 2048];
                            let below = fill_below(v);
                            ov.write_over(
                                g * 4096 + 1024,
                                &[VolatileSlice::from(half.as_mut_slice())],
                                &below,
                            )
                            .unwrap();
                            match m.as_mut() {
                                Some(old) => old[1024..3072].fill(v),
                                None => *m = Some(vec![v; 4096]),
                            }
                        } else {
                            ov.write_at(g * 4096, &[v; 4096]).unwrap();
                            *m = Some(vec![v; 4096]);
                        }
                        drop(m);
                        let h = (x >> 20) % granules;
                        if let Some(want) = model[h as usize].lock().unwrap().as_ref() {
                            let mut got = vec![0u8; 4096];
                            ov.read_at(h * 4096, &mut got).unwrap();
                            assert!(got == *want, "granule {h} lost its data");
                        }
                    }
                })
            })
            .collect();
        let mut releasers = Vec::new();
        for _ in 0..150 {
            std::thread::sleep(std::time::Duration::from_millis(1));
            let _paused = pause.write().unwrap();
            ov.make_empty_deferred();
            for m in model.iter() {
                *m.lock().unwrap() = None;
            }
            let ov = ov.clone();
            releasers.push(std::thread::spawn(move || ov.release_pending()));
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for w in writers {
            w.join().unwrap();
        }
        for r in releasers {
            r.join().unwrap();
        }
        ov.release_pending();
        assert_eq!(ov.pending_release_bytes(), 0);
    }

    #[test]
    fn deferred_unallocate_drops_at_once_and_releases_later() {
        let (store, ov) = mem_overlay(4 << 20);
        ov.write_at(0, &vec![7u8; 3 << 20]).unwrap();
        store.reset_stats();
        // Partial granules at the edges stay allocated.
        assert_eq!(
            ov.unallocate_deferred(100, (2 << 20) - 100).unwrap(),
            (2 << 20) - 4096
        );
        assert_eq!(
            store.stats().discards,
            0,
            "no system call while callers wait"
        );
        assert!(ov.is_allocated(0));
        assert!(!ov.is_allocated(4096));
        assert!(ov.is_allocated(2 << 20));
        assert_eq!(ov.allocated_bytes(), (1 << 20) + 4096);
        assert_eq!(ov.pending_release_bytes(), (2 << 20) - 4096);
        let mut b = [1u8; 4096];
        ov.read_at(8192, &mut b).unwrap();
        assert_eq!(b, [0u8; 4096], "a dropped granule reads from below");
        assert_eq!(ov.release_pending(), (2 << 20) - 4096);
        assert_eq!(ov.pending_release_bytes(), 0);
        let mut kept = vec![0u8; 4096];
        ov.read_at(2 << 20, &mut kept).unwrap();
        assert!(
            kept.iter().all(|&x| x == 7),
            "a granule outside the range lost"
        );
        ov.read_at(0, &mut kept).unwrap();
        assert!(kept.iter().all(|&x| x == 7), "a partial edge granule lost");
    }

    #[test]
    fn open_discards_old_contents_and_keeps_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hidden");
        {
            let ov = Overlay::create(&path, 1 << 20).unwrap();
            ov.write_at(0, &[4u8; 4096]).unwrap();
        }
        let ov = Overlay::open(&path).unwrap();
        assert_eq!(ov.size(), 1 << 20);
        assert!(ov.is_empty());
        let mut b = [1u8; 4096];
        ov.read_at(0, &mut b).unwrap();
        assert_eq!(b, [0u8; 4096]);
    }

    #[test]
    fn zero_over_hides_below_and_discard_unallocates() {
        let (_s, ov) = mem_overlay(1 << 20);
        ov.zero_over(1000, 10_000, &fill_below(0x11)).unwrap();
        let mut out = vec![0u8; 12288];
        ov.read_at(0, &mut out).unwrap();
        assert!(out[..1000].iter().all(|&b| b == 0x11));
        assert!(out[1000..11000].iter().all(|&b| b == 0));
        assert!(out[11000..].iter().all(|&b| b == 0x11));
        assert_eq!(ov.allocation(0, 1 << 20), (true, 12288));
        ov.discard(4096, 4096).unwrap();
        assert_eq!(ov.allocation(4096, 1 << 20), (false, 4096));
        assert_eq!(ov.block_status(4096, 8192).unwrap().kind, ExtentKind::Hole);
        ov.unallocate(0, 1 << 20).unwrap();
        assert!(ov.is_empty());
    }

    #[test]
    fn odd_sized_disk_tail_granule_is_whole_at_the_end() {
        let (_s, ov) = mem_overlay(10_000);
        let below = |_: u64, _: &mut [u8]| -> Result<()> { panic!("read from below") };
        let mut d = vec![6u8; 10_000 - 8192];
        ov.write_over(8192, &[VolatileSlice::from(d.as_mut_slice())], &below)
            .unwrap();
        assert_eq!(ov.allocation(8192, 5000), (true, 10_000 - 8192));
        assert_eq!(ov.make_empty().unwrap().bytes, 10_000 - 8192);
    }
}
