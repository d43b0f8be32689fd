//! An in-memory node with fault injection and counters, for tests of error paths
//! (failover-failed, copy-before-write failures) and of I/O cost (how many
//! requests a layer above issued).
//!
//! Memory is kept in 64 KiB pages, each behind its own lock and allocated on first
//! write, so a large sparse device costs little and concurrent requests to
//! different pages do not serialise. A request spanning pages is not atomic, much
//! like a real file.
//!
//! A test double: compiled for this crate's tests and, with the `test-utils`
//! feature, for the crates that test against it; never in the product.

use super::{check_range, iov_len, BlockDev, BlockError, Extent, ExtentKind, Result};
use crate::sync::RwLockExt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::RwLock;
use vm_memory::VolatileSlice;

const PAGE: u64 = 64 * 1024;
const OFF: u64 = u64::MAX;

type Page = Option<Box<[u8]>>;

/// Request counters of a [`MemDev`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemStats {
    /// Read requests (including failed ones).
    pub reads: u64,
    /// Write requests.
    pub writes: u64,
    /// Flush requests.
    pub flushes: u64,
    /// Discard requests.
    pub discards: u64,
    /// Write-zeroes requests.
    pub write_zeroes: u64,
    /// Bytes read by successful reads.
    pub bytes_read: u64,
    /// Bytes written by successful writes.
    pub bytes_written: u64,
    /// Requests failed by injection.
    pub injected_failures: u64,
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    write_zeroes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    injected_failures: AtomicU64,
}

/// An in-memory block device. Fresh or discarded ranges read as zeroes.
///
/// Faults (all off by default) fail a request with `EIO` before it touches memory:
/// * [`MemDev::fail_writes_from`] / [`MemDev::fail_reads_from`]: every request of
///   that kind reaching at or beyond an offset (write-type = write, discard,
///   write-zeroes);
/// * [`MemDev::fail_nth_write`] / [`MemDev::fail_nth_read`]: the n-th next one,
///   once;
/// * [`MemDev::fail_flush`]: every flush.
pub struct MemDev {
    size: u64,
    pages: Box<[RwLock<Page>]>,
    read_only: bool,
    writes_from: AtomicU64,
    reads_from: AtomicU64,
    nth_write: AtomicU64,
    nth_read: AtomicU64,
    flush_fails: AtomicBool,
    counters: Counters,
}

impl std::fmt::Debug for MemDev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemDev")
            .field("size", &self.size)
            .field("stats", &self.stats())
            .finish()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
}

impl MemDev {
    /// A zeroed device of `size` bytes.
    pub fn new(size: u64) -> Self {
        let npages = size.div_ceil(PAGE);
        MemDev {
            size,
            pages: (0..npages).map(|_| RwLock::new(None)).collect(),
            read_only: false,
            writes_from: AtomicU64::new(OFF),
            reads_from: AtomicU64::new(OFF),
            nth_write: AtomicU64::new(0),
            nth_read: AtomicU64::new(0),
            flush_fails: AtomicBool::new(false),
            counters: Counters::default(),
        }
    }

    /// A device of `size` bytes, every byte `byte`.
    pub fn filled(size: u64, byte: u8) -> Self {
        let dev = MemDev::new(size);
        for (i, p) in dev.pages.iter().enumerate() {
            let len = (size - i as u64 * PAGE).min(PAGE) as usize;
            *p.write_or_recover() = Some(vec![byte; len].into_boxed_slice());
        }
        dev
    }

    /// The same device, refusing write-type requests.
    pub fn into_read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// A copy of the whole contents.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.size as usize];
        self.copy_out(0, &mut out);
        out
    }

    /// Fails every write-type request that reaches `offset` or beyond (`None`: off).
    pub fn fail_writes_from(&self, offset: Option<u64>) {
        self.writes_from
            .store(offset.unwrap_or(OFF), Ordering::SeqCst);
    }

    /// Fails every read that reaches `offset` or beyond (`None`: off).
    pub fn fail_reads_from(&self, offset: Option<u64>) {
        self.reads_from
            .store(offset.unwrap_or(OFF), Ordering::SeqCst);
    }

    /// Fails the `n`-th next write-type request (1 = the next one), once; 0: off.
    pub fn fail_nth_write(&self, n: u64) {
        self.nth_write.store(n, Ordering::SeqCst);
    }

    /// Fails the `n`-th next read (1 = the next one), once; 0: off.
    pub fn fail_nth_read(&self, n: u64) {
        self.nth_read.store(n, Ordering::SeqCst);
    }

    /// Fails every flush while `on`.
    pub fn fail_flush(&self, on: bool) {
        self.flush_fails.store(on, Ordering::SeqCst);
    }

    /// Turns every fault off.
    pub fn clear_faults(&self) {
        self.fail_writes_from(None);
        self.fail_reads_from(None);
        self.fail_nth_write(0);
        self.fail_nth_read(0);
        self.fail_flush(false);
    }

    /// The counters so far.
    pub fn stats(&self) -> MemStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::SeqCst);
        MemStats {
            reads: l(&c.reads),
            writes: l(&c.writes),
            flushes: l(&c.flushes),
            discards: l(&c.discards),
            write_zeroes: l(&c.write_zeroes),
            bytes_read: l(&c.bytes_read),
            bytes_written: l(&c.bytes_written),
            injected_failures: l(&c.injected_failures),
        }
    }

    /// Sets every counter back to zero.
    pub fn reset_stats(&self) {
        let c = &self.counters;
        for a in [
            &c.reads,
            &c.writes,
            &c.flushes,
            &c.discards,
            &c.write_zeroes,
            &c.bytes_read,
            &c.bytes_written,
            &c.injected_failures,
        ] {
            a.store(0, Ordering::SeqCst);
        }
    }

    /// Checks range, read-only and injected faults for a request.
    fn admit(&self, kind: Kind, op: &'static str, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size)?;
        if kind == Kind::Write && self.read_only {
            return Err(BlockError::ReadOnly);
        }
        let (from, nth) = match kind {
            Kind::Read => (&self.reads_from, &self.nth_read),
            Kind::Write => (&self.writes_from, &self.nth_write),
        };
        let reaches = len > 0 && offset + len > from.load(Ordering::SeqCst);
        let counted_down = nth
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .map(|before| before == 1)
            .unwrap_or(false);
        if reaches || counted_down {
            self.counters
                .injected_failures
                .fetch_add(1, Ordering::SeqCst);
            return Err(BlockError::io(
                op,
                offset,
                io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        Ok(())
    }

    /// Visits the pages covering `offset..offset + len` as (page, byte range in page,
    /// position in the request).
    fn spans(&self, offset: u64, len: u64) -> impl Iterator<Item = (usize, usize, usize, usize)> {
        let end = offset + len;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let page = pos / PAGE;
            let lo = pos - page * PAGE;
            let hi = (end - page * PAGE).min(PAGE);
            let at = pos - offset;
            pos = page * PAGE + hi;
            Some((page as usize, lo as usize, hi as usize, at as usize))
        })
    }

    fn copy_out(&self, offset: u64, dst: &mut [u8]) {
        for (p, lo, hi, at) in self.spans(offset, dst.len() as u64) {
            let out = &mut dst[at..at + hi - lo];
            match &*self.pages[p].read_or_recover() {
                Some(data) => out.copy_from_slice(&data[lo..hi]),
                None => out.fill(0),
            }
        }
    }

    fn page_len(&self, p: usize) -> usize {
        (self.size - p as u64 * PAGE).min(PAGE) as usize
    }

    fn zero_range(&self, offset: u64, len: u64) {
        for (p, lo, hi, _) in self.spans(offset, len) {
            let mut page = self.pages[p].write_or_recover();
            if lo == 0 && hi == self.page_len(p) {
                *page = None;
            } else if let Some(data) = page.as_mut() {
                data[lo..hi].fill(0);
            }
        }
    }
}

impl BlockDev for MemDev {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        self.counters.reads.fetch_add(1, Ordering::SeqCst);
        let len = iov_len(bufs);
        self.admit(Kind::Read, "read", offset, len)?;
        let mut pos = offset;
        for b in bufs {
            let mut tmp = vec![0u8; b.len()];
            self.copy_out(pos, &mut tmp);
            b.copy_from(&tmp);
            pos += b.len() as u64;
        }
        self.counters.bytes_read.fetch_add(len, Ordering::SeqCst);
        Ok(())
    }

    fn write_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        self.counters.writes.fetch_add(1, Ordering::SeqCst);
        let len = iov_len(bufs);
        self.admit(Kind::Write, "write", offset, len)?;
        let mut data = vec![0u8; len as usize];
        let mut at = 0;
        for b in bufs {
            at += b.copy_to(&mut data[at..]);
        }
        for (p, lo, hi, at) in self.spans(offset, len) {
            let plen = self.page_len(p);
            let mut page = self.pages[p].write_or_recover();
            let buf = page.get_or_insert_with(|| vec![0u8; plen].into_boxed_slice());
            buf[lo..hi].copy_from_slice(&data[at..at + hi - lo]);
        }
        self.counters.bytes_written.fetch_add(len, Ordering::SeqCst);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.counters.flushes.fetch_add(1, Ordering::SeqCst);
        if self.flush_fails.load(Ordering::SeqCst) {
            self.counters
                .injected_failures
                .fetch_add(1, Ordering::SeqCst);
            return Err(BlockError::io(
                "flush",
                0,
                io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.counters.discards.fetch_add(1, Ordering::SeqCst);
        self.admit(Kind::Write, "discard", offset, len)?;
        self.zero_range(offset, len);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<()> {
        self.counters.write_zeroes.fetch_add(1, Ordering::SeqCst);
        self.admit(Kind::Write, "write-zeroes", offset, len)?;
        self.zero_range(offset, len);
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(offset, len, self.size)?;
        let mut kind = None;
        let mut run = 0;
        for (p, lo, hi, _) in self.spans(offset, len) {
            let k = if self.pages[p].read_or_recover().is_some() {
                ExtentKind::Data
            } else {
                ExtentKind::Hole
            };
            match kind {
                None => kind = Some(k),
                Some(prev) if prev != k => break,
                _ => {}
            }
            run += (hi - lo) as u64;
        }
        Ok(Extent {
            len: run.max(len.min(1)),
            kind: kind.unwrap_or(ExtentKind::Hole),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::BlockDevExt;

    #[test]
    fn reads_back_writes_across_pages_and_zeroes_elsewhere() {
        let dev = MemDev::new(3 * PAGE + 100);
        dev.write_at(PAGE - 10, &[7u8; 20]).unwrap();
        let mut out = vec![1u8; 40];
        dev.read_at(PAGE - 20, &mut out).unwrap();
        assert_eq!(&out[..10], &[0u8; 10]);
        assert_eq!(&out[10..30], &[7u8; 20]);
        assert_eq!(&out[30..], &[0u8; 10]);
        dev.write_at(3 * PAGE + 90, &[5u8; 10]).unwrap();
        assert!(dev.write_at(3 * PAGE + 91, &[5u8; 10]).is_err());
        assert_eq!(dev.stats().bytes_written, 30);
    }

    #[test]
    fn injected_faults_fail_exactly_the_chosen_requests() {
        let dev = MemDev::filled(4 * PAGE, 0x11);
        dev.fail_writes_from(Some(2 * PAGE));
        dev.write_at(2 * PAGE - 512, &[0u8; 512]).unwrap();
        assert!(dev.write_at(2 * PAGE - 512, &[0u8; 1024]).is_err());
        assert!(dev.discard(3 * PAGE, 512).is_err());
        dev.fail_writes_from(None);
        dev.fail_nth_read(2);
        let mut b = [0u8; 512];
        dev.read_at(0, &mut b).unwrap();
        assert!(dev.read_at(0, &mut b).is_err());
        dev.read_at(0, &mut b).unwrap();
        assert_eq!(b, [0x11; 512]);
        dev.fail_flush(true);
        assert!(dev.flush().is_err());
        dev.clear_faults();
        dev.flush().unwrap();
        assert_eq!(dev.stats().injected_failures, 4);
    }

    #[test]
    fn discard_frees_whole_pages_and_reports_holes() {
        let dev = MemDev::filled(4 * PAGE, 0x11);
        dev.discard(PAGE - 512, 2 * PAGE).unwrap();
        let snap = dev.snapshot();
        assert_eq!(snap[PAGE as usize - 513], 0x11);
        assert!(snap[PAGE as usize - 512..3 * PAGE as usize - 512]
            .iter()
            .all(|&b| b == 0));
        let ext = dev.block_status(PAGE, 3 * PAGE).unwrap();
        assert_eq!((ext.kind, ext.len), (ExtentKind::Hole, PAGE));
        assert_eq!(dev.block_status(0, PAGE).unwrap().kind, ExtentKind::Data);
    }
}
