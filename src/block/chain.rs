//! A chain of overlays over a base node: `active ▸ hidden ▸ secondary disk`.
//!
//! Reads take each granule from the top-most overlay that has it allocated, else
//! from the base; a request is split into runs of one source each, and every run
//! reads straight into the caller's buffers. Writes go to the top overlay, which
//! completes partial granules from the layers below.
//!
//! The chain itself takes no locks: a caller that changes lower layers while the
//! chain reads them (copy-before-write, commit) excludes itself by range (see
//! the replication node).

use super::iov::iov_window;
use super::overlay::Overlay;
use super::{check_range, iov_len, BlockDev, Extent, ExtentKind, Result, SharedDev};
use std::sync::Arc;
use vm_memory::VolatileSlice;

/// `overlays[0] ▸ overlays[1] ▸ … ▸ base`.
pub struct Chain {
    overlays: Vec<Arc<Overlay>>,
    base: SharedDev,
    size: u64,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("overlays", &self.overlays)
            .field("size", &self.size)
            .finish()
    }
}

impl Chain {
    /// A chain of `overlays` (top first) over `base`. Its size is the base's;
    /// layers are meant to have the same size ([`Chain::sizes_match`]); a request
    /// reaching past a shorter layer fails with `OutOfRange`.
    pub fn new(overlays: Vec<Arc<Overlay>>, base: SharedDev) -> Self {
        let size = base.size();
        Chain {
            overlays,
            base,
            size,
        }
    }

    /// True when every layer has the base's size.
    pub fn sizes_match(&self) -> bool {
        self.overlays.iter().all(|o| o.size() == self.size)
    }

    /// The overlays, top first.
    pub fn overlays(&self) -> &[Arc<Overlay>] {
        &self.overlays
    }

    /// The base node.
    pub fn base(&self) -> &SharedDev {
        &self.base
    }

    /// Which layer serves the run starting at `offset` (at most `len` bytes): an
    /// index into [`Chain::overlays`], or `overlays().len()` for the base; and the
    /// run's length.
    pub fn source(&self, offset: u64, len: u64) -> (usize, u64) {
        self.source_from(0, offset, len)
    }

    fn source_from(&self, level: usize, offset: u64, len: u64) -> (usize, u64) {
        let mut limit = len;
        for (i, ov) in self.overlays.iter().enumerate().skip(level) {
            let (alloc, run) = ov.allocation(offset, limit);
            if alloc {
                return (i, run);
            }
            limit = run;
        }
        (self.overlays.len(), limit)
    }

    /// The run starting at `offset`: allocated in any overlay or not, and its length.
    pub fn allocated_above(&self, offset: u64, len: u64) -> (bool, u64) {
        let n = self.overlays.len();
        let (src, mut run) = self.source(offset, len);
        let alloc = src < n;
        while run < len {
            let (next, more) = self.source(offset + run, len - run);
            if (next < n) != alloc || more == 0 {
                break;
            }
            run += more;
        }
        (alloc, run)
    }

    /// Reads through the layers from `level` down (`level` 0 = the whole chain).
    pub fn read_from(&self, level: usize, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        let len = iov_len(bufs);
        check_range(offset, len, self.size)?;
        let nothing_above = self.overlays[level.min(self.overlays.len())..]
            .iter()
            .all(|o| o.is_empty());
        if nothing_above {
            return self.base.read_vectored(offset, bufs);
        }
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let (src, run) = self.source_from(level, pos, end - pos);
            let whole = pos == offset && run == len;
            let part;
            let bufs_for_run = if whole {
                bufs
            } else {
                part = iov_window(bufs, pos - offset, run)?;
                &part[..]
            };
            match self.overlays.get(src) {
                Some(ov) => ov.read_allocated(pos, bufs_for_run)?,
                None => self.base.read_vectored(pos, bufs_for_run)?,
            }
            pos += run;
        }
        Ok(())
    }

    /// Writes to the top overlay, completing partial granules from the layers below.
    pub fn write_top(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        match self.overlays.first() {
            Some(top) => top.write_over(offset, bufs, &self.below_top()),
            None => self.base.write_vectored(offset, bufs),
        }
    }

    /// Makes the range read as zeroes through the chain, in the top overlay.
    pub fn zero_top(&self, offset: u64, len: u64) -> Result<()> {
        match self.overlays.first() {
            Some(top) => top.zero_over(offset, len, &self.below_top()),
            None => self.base.write_zeroes(offset, len, false),
        }
    }

    /// What the top overlay sees below itself.
    pub fn below_top(&self) -> impl Fn(u64, &mut [u8]) -> Result<()> + '_ {
        move |offset, buf: &mut [u8]| self.read_from(1, offset, &[VolatileSlice::from(buf)])
    }
}

impl BlockDev for Chain {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        self.read_from(0, offset, bufs)
    }

    fn write_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        self.write_top(offset, bufs)
    }

    fn flush(&self) -> Result<()> {
        match self.overlays.first() {
            Some(top) => top.flush(),
            None => self.base.flush(),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_top(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<()> {
        self.zero_top(offset, len)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        check_range(offset, len, self.size)?;
        let (src, run) = self.source(offset, len);
        if src < self.overlays.len() {
            return Ok(Extent {
                len: run,
                kind: ExtentKind::Data,
            });
        }
        self.base.block_status(offset, run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::testing::memory_overlay;
    use crate::block::{BlockDevExt, MemDev};

    fn chain3(size: u64) -> (Arc<Overlay>, Arc<Overlay>, Arc<MemDev>, Chain) {
        let a = memory_overlay(size);
        let h = memory_overlay(size);
        let base = Arc::new(MemDev::filled(size, 0x11));
        let c = Chain::new(vec![a.clone(), h.clone()], base.clone());
        (a, h, base, c)
    }

    #[test]
    fn read_takes_top_most_allocated_layer_per_granule() {
        let (a, h, _b, c) = chain3(1 << 20);
        h.write_at(0, &[0x22u8; 12288]).unwrap();
        a.write_at(4096, &[0x33u8; 4096]).unwrap();
        let mut out = vec![0u8; 16384];
        c.read_at(0, &mut out).unwrap();
        let want: Vec<u8> = [0x22u8, 0x33, 0x22, 0x11]
            .iter()
            .flat_map(|&b| std::iter::repeat_n(b, 4096))
            .collect();
        assert_eq!(out, want);
        assert_eq!(c.source(0, 16384), (1, 4096));
        assert_eq!(c.source(4096, 16384), (0, 4096));
        assert_eq!(c.source(12288, 16384), (2, 16384));
        assert_eq!(c.allocated_above(100, 1 << 20), (true, 12188));
        assert_eq!(c.block_status(8192, 8192).unwrap().kind, ExtentKind::Data);
        assert_eq!(c.block_status(12288, 8192).unwrap().kind, ExtentKind::Data);
    }

    #[test]
    fn write_goes_to_top_and_fills_partial_granules_from_below() {
        let (a, h, b, c) = chain3(1 << 20);
        h.write_at(0, &[0x22u8; 4096]).unwrap();
        c.write_at(1024, &[0x33u8; 6144]).unwrap();
        assert_eq!(a.allocated_bytes(), 8192);
        assert_eq!(h.allocated_bytes(), 4096);
        let mut out = vec![0u8; 8192];
        c.read_at(0, &mut out).unwrap();
        assert!(out[..1024].iter().all(|&x| x == 0x22));
        assert!(out[1024..7168].iter().all(|&x| x == 0x33));
        assert!(out[7168..].iter().all(|&x| x == 0x11));
        assert_eq!(b.stats().writes, 0);
    }

    #[test]
    fn zeroes_through_chain_hide_lower_layers() {
        let (a, _h, _b, c) = chain3(1 << 20);
        c.write_zeroes(2048, 8192, true).unwrap();
        let mut out = vec![0u8; 12288];
        c.read_at(0, &mut out).unwrap();
        assert!(out[..2048].iter().all(|&x| x == 0x11));
        assert!(out[2048..10240].iter().all(|&x| x == 0));
        assert!(out[10240..].iter().all(|&x| x == 0x11));
        assert_eq!(a.allocated_bytes(), 12288);
    }

    #[test]
    fn vectored_read_split_across_layers_fills_every_buffer() {
        let (a, _h, _b, c) = chain3(1 << 20);
        a.write_at(4096, &[0x33u8; 4096]).unwrap();
        let mut x = vec![0u8; 3000];
        let mut y = vec![0u8; 6000];
        c.read_vectored(
            2000,
            &[
                VolatileSlice::from(x.as_mut_slice()),
                VolatileSlice::from(y.as_mut_slice()),
            ],
        )
        .unwrap();
        let all: Vec<u8> = x.iter().chain(y.iter()).copied().collect();
        for (i, &v) in all.iter().enumerate() {
            let off = 2000 + i as u64;
            let want = if (4096..8192).contains(&off) {
                0x33
            } else {
                0x11
            };
            assert_eq!(v, want, "byte at {off}");
        }
    }
}
