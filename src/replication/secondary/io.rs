//! The two I/O views of a [`Secondary`]: the secondary VM's (guest) and the
//! primary's (NBD), with the per-stage policy tabled in ARCHITECTURE.md.

use super::channel::SecondaryChannel;
use super::Secondary;
use crate::block::channel::IoChannel;
use crate::block::{
    check_range, iov_len, iov_window, BlockDev, BlockError, Extent, RangeGuard, Refusal, Result,
    SharedDev,
};
use crate::replication::{Failure, Stage};
use std::sync::Arc;
use vm_memory::VolatileSlice;

thread_local! {
    /// The copy-before-write bounce buffer, reused per thread: a fresh zeroed
    /// cluster per copy cost most of a first write's CPU (callgrind).
    static CBW_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The secondary VM's view.
pub(super) struct GuestView(pub(super) Arc<Secondary>);

/// The primary's view.
pub(super) struct PrimaryView(pub(super) Arc<Secondary>);

pub(super) fn not_started() -> BlockError {
    BlockError::Refused(Refusal::NotStarted)
}

fn fenced() -> BlockError {
    BlockError::Refused(Refusal::TakenOver)
}

fn no_below(_offset: u64, buf: &mut [u8]) -> Result<()> {
    buf.fill(0);
    Ok(())
}

/// A guest-side zeroing request.
#[derive(Clone, Copy)]
pub(super) enum Zeroes {
    Discard,
    WriteZeroes { unmap: bool },
}

/// What a guest request does, for the hold it needs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum GuestOp {
    Read,
    Write,
    Zeroes,
}

impl Secondary {
    fn size(&self) -> u64 {
        self.disk.size()
    }

    /// True when a guest write cannot need a read from below the active disk.
    fn granule_aligned(&self, offset: u64, len: u64) -> bool {
        let g = self.active.granule();
        let end = offset + len;
        offset % g == 0 && (end % g == 0 || end == self.size())
    }

    /// The hold a guest request needs on its clusters in `stage`: shared while
    /// running when it looks below the active disk (`below`), always during
    /// failover (counted and timed), none otherwise.
    fn guest_hold(
        &self,
        stage: Stage,
        offset: u64,
        len: u64,
        below: bool,
    ) -> Option<RangeGuard<'_>> {
        match stage {
            Stage::Running => below.then(|| self.locks.shared(offset, len)),
            Stage::Failover | Stage::FailoverFailed => Some(self.failover_shared(offset, len)),
            Stage::None | Stage::Fenced | Stage::Done => None,
        }
    }

    /// True when a guest request of `kind` on the range must hold its
    /// clusters shared in `stage` (see [`Secondary::guest_hold`]).
    pub(super) fn guest_needs_hold(
        &self,
        stage: Stage,
        kind: GuestOp,
        offset: u64,
        len: u64,
    ) -> bool {
        match stage {
            // Only a read-modify-write looks below the active disk, where
            // copy-before-write may be changing things.
            Stage::Running => kind != GuestOp::Write || !self.granule_aligned(offset, len),
            Stage::Failover | Stage::FailoverFailed => true,
            Stage::None | Stage::Fenced | Stage::Done => false,
        }
    }

    fn guest_read(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        // Done is final and the overlays are empty: no gate, no locks.
        if self.stage() == Stage::Done {
            return self.disk.read_vectored(offset, bufs);
        }
        let len = iov_len(bufs);
        check_range(offset, len, self.size())?;
        let _pass = self.gate.enter();
        let stage = self.stage();
        let _held = self.guest_hold(stage, offset, len, true);
        self.guest_read_held(stage, offset, bufs)
    }

    /// A guest read in `stage`, the caller holding a pass of the gate and the
    /// hold [`Secondary::guest_needs_hold`] asks for.
    pub(super) fn guest_read_held(
        &self,
        stage: Stage,
        offset: u64,
        bufs: &[VolatileSlice<'_>],
    ) -> Result<()> {
        match stage {
            Stage::None | Stage::Fenced => Err(not_started()),
            Stage::Done => self.disk.read_vectored(offset, bufs),
            Stage::Running | Stage::Failover | Stage::FailoverFailed => {
                self.chain.read_vectored(offset, bufs)
            }
        }
    }

    fn guest_write(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        if self.stage() == Stage::Done {
            return self.disk.write_vectored(offset, bufs);
        }
        let len = iov_len(bufs);
        check_range(offset, len, self.size())?;
        let _pass = self.gate.enter();
        let stage = self.stage();
        let below = self.guest_needs_hold(stage, GuestOp::Write, offset, len);
        let _held = self.guest_hold(stage, offset, len, below);
        self.guest_write_held(stage, offset, bufs)
    }

    /// A guest write in `stage`, held as for [`Secondary::guest_read_held`].
    pub(super) fn guest_write_held(
        &self,
        stage: Stage,
        offset: u64,
        bufs: &[VolatileSlice<'_>],
    ) -> Result<()> {
        match stage {
            Stage::None | Stage::Fenced => Err(not_started()),
            Stage::Done => self.disk.write_vectored(offset, bufs),
            Stage::Running => self.chain.write_top(offset, bufs),
            Stage::Failover | Stage::FailoverFailed => self.split_write(offset, bufs),
        }
    }

    /// Failover policy: what active or hidden still hold goes to active (the
    /// commit moves it later, or has failed to); the rest goes to the disk.
    fn split_write(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        let end = offset + iov_len(bufs);
        let mut pos = offset;
        while pos < end {
            let (above, run) = self.chain.allocated_above(pos, end - pos);
            let part = iov_window(bufs, pos - offset, run)?;
            if above {
                let written = self.chain.write_top(pos, &part);
                // After the write (even a failed one), under the range lock:
                // a commit that copied this cluster meanwhile copies it again.
                self.mark_rewritten(pos, run);
                written?;
            } else {
                self.disk.write_vectored(pos, &part)?;
            }
            pos += run;
        }
        Ok(())
    }

    fn guest_zeroes(&self, offset: u64, len: u64, how: Zeroes) -> Result<()> {
        if self.stage() == Stage::Done {
            return self.zeroes_on_disk(offset, len, how);
        }
        check_range(offset, len, self.size())?;
        let _pass = self.gate.enter();
        let stage = self.stage();
        let _held = self.guest_hold(stage, offset, len, true);
        self.guest_zeroes_held(stage, offset, len, how)
    }

    fn zeroes_on_disk(&self, offset: u64, len: u64, how: Zeroes) -> Result<()> {
        match how {
            Zeroes::Discard => self.disk.discard(offset, len),
            Zeroes::WriteZeroes { unmap } => self.disk.write_zeroes(offset, len, unmap),
        }
    }

    /// A guest discard or write-zeroes in `stage`, held as for
    /// [`Secondary::guest_read_held`].
    pub(super) fn guest_zeroes_held(
        &self,
        stage: Stage,
        offset: u64,
        len: u64,
        how: Zeroes,
    ) -> Result<()> {
        match stage {
            Stage::None | Stage::Fenced => Err(not_started()),
            Stage::Done => self.zeroes_on_disk(offset, len, how),
            Stage::Running => self.chain.zero_top(offset, len),
            Stage::Failover | Stage::FailoverFailed => {
                let end = offset + len;
                let mut pos = offset;
                while pos < end {
                    let (above, run) = self.chain.allocated_above(pos, end - pos);
                    if above {
                        let zeroed = self.chain.zero_top(pos, run);
                        self.mark_rewritten(pos, run);
                        zeroed?;
                    } else {
                        self.zeroes_on_disk(pos, run, how)?;
                    }
                    pos += run;
                }
                Ok(())
            }
        }
    }

    pub(super) fn guest_flush(&self) -> Result<()> {
        match self.stage() {
            // A flush exposes nothing and makes the initial sync durable; QEMU's
            // driver passes flushes down in every stage too. It also lets the
            // daemon's final flush at SIGTERM succeed before replication started.
            Stage::None | Stage::Fenced => self.disk.flush(),
            // The overlays are volatile by design (their bitmaps live in memory):
            // the secondary VM's writes become durable by the failover commit,
            // which flushes the disk. Syncing the overlay files buys nothing.
            Stage::Running => Ok(()),
            Stage::Failover | Stage::FailoverFailed | Stage::Done => self.disk.flush(),
        }
    }

    fn guest_block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        if self.stage() == Stage::Done {
            return self.disk.block_status(offset, len);
        }
        check_range(offset, len, self.size())?;
        let _pass = self.gate.enter();
        match self.stage() {
            Stage::None | Stage::Fenced => Err(not_started()),
            Stage::Done => self.disk.block_status(offset, len),
            Stage::Running | Stage::Failover | Stage::FailoverFailed => {
                let _held = self.locks.shared(offset, len);
                self.chain.block_status(offset, len)
            }
        }
    }

    /// Runs a primary write-type request `op` on `offset..offset + len` with the
    /// policy of the current stage.
    fn primary_modify(&self, offset: u64, len: u64, op: impl FnOnce() -> Result<()>) -> Result<()> {
        check_range(offset, len, self.size())?;
        let _pass = self.gate.enter();
        match self.stage() {
            Stage::None | Stage::Fenced => op(),
            Stage::Running => {
                let result = self.with_copy_before_write(offset, len, op);
                if let Err(e) = &result {
                    if !matches!(e, BlockError::OutOfRange { .. }) {
                        self.record_error(Failure::caused_by(
                            "applying a primary write",
                            e.clone(),
                        ));
                    }
                }
                result
            }
            Stage::Failover | Stage::FailoverFailed | Stage::Done => Err(fenced()),
        }
    }

    /// Copies the old contents of every cluster of the range not yet copied since
    /// the last checkpoint to hidden, then runs `op`, holding those clusters
    /// exclusively throughout so that no guest read sees hidden before the copy and
    /// the disk after `op`.
    fn with_copy_before_write(
        &self,
        offset: u64,
        len: u64,
        op: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        if len == 0 {
            return op();
        }
        let c0 = offset / self.cluster;
        let c1 = (offset + len - 1) / self.cluster;
        let n = c1 - c0 + 1;
        if self.copied.run(c0, n) == (true, n) {
            // Copied before, under the lock: guest reads of these clusters go to
            // hidden and never look at the disk until the next checkpoint.
            return op();
        }
        let _held = self.locks.exclusive(c0 * self.cluster, n * self.cluster);
        CBW_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            for c in c0..=c1 {
                if !self.copied.get(c) {
                    self.copy_cluster(c, &mut buf)?;
                }
            }
            Ok::<(), BlockError>(())
        })?;
        op()
    }

    fn copy_cluster(&self, c: u64, buf: &mut Vec<u8>) -> Result<()> {
        let start = c * self.cluster;
        let end = (start + self.cluster).min(self.size());
        buf.resize((end - start) as usize, 0);
        let cbw = |e: BlockError| BlockError::below("copy-before-write", start, e);
        let slice = [VolatileSlice::from(buf.as_mut_slice())];
        self.disk.read_vectored(start, &slice).map_err(cbw)?;
        self.hidden
            .write_over(start, &slice, &no_below)
            .map_err(cbw)?;
        self.copied.set_range(c, 1);
        crate::stats::replication().cbw_copy(end - start);
        Ok(())
    }
}

impl BlockDev for GuestView {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        self.0.guest_read(offset, bufs)
    }

    fn write_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        self.0.guest_write(offset, bufs)
    }

    fn flush(&self) -> Result<()> {
        self.0.guest_flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.0.guest_zeroes(offset, len, Zeroes::Discard)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.0
            .guest_zeroes(offset, len, Zeroes::WriteZeroes { unmap })
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.0.guest_block_status(offset, len)
    }

    /// With a disk that has a channel (io_uring on an O_DIRECT disk), the
    /// guest's requests keep their queue depth on it: see `channel`.
    fn open_channel(&self, depth: u32) -> Option<std::io::Result<Box<dyn IoChannel>>> {
        let disk = match self.0.disk.open_channel(depth)? {
            Ok(ch) => ch,
            Err(e) => return Some(Err(e)),
        };
        Some(SecondaryChannel::new(self.0.clone(), disk).map(|c| Box::new(c) as Box<dyn IoChannel>))
    }
}

impl BlockDev for PrimaryView {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        self.0.disk.read_vectored(offset, bufs)
    }

    fn write_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> Result<()> {
        let disk: &SharedDev = &self.0.disk;
        self.0
            .primary_modify(offset, iov_len(bufs), || disk.write_vectored(offset, bufs))
    }

    fn flush(&self) -> Result<()> {
        self.0.disk.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let disk: &SharedDev = &self.0.disk;
        self.0
            .primary_modify(offset, len, || disk.discard(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let disk: &SharedDev = &self.0.disk;
        self.0
            .primary_modify(offset, len, || disk.write_zeroes(offset, len, unmap))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
        self.0.disk.block_status(offset, len)
    }
}
