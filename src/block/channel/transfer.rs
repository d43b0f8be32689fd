//! The progress of one vectored read or write that the kernel may complete in
//! several pieces (a short transfer), and that may need several system calls or
//! submissions anyway (more than `IOV_MAX` iovecs).

use crate::block::iovecs_advance;

/// At most this many iovecs per `preadv`/`pwritev` (Linux's `UIO_MAXIOV`).
pub const IOV_MAX: usize = 1024;

/// A vectored transfer in progress: what is left, and where it goes.
#[derive(Debug, Default)]
pub struct Transfer {
    iovs: Vec<libc::iovec>,
    first: usize,
    pos: u64,
}

// SAFETY: a Transfer only stores the iovecs; whoever created it guarantees the
// memory they point to (see IoChannel::add_read), and a Transfer is used by one
// thread at a time.
unsafe impl Send for Transfer {}

impl Transfer {
    /// Starts over for a transfer of `iovs` at byte `offset`, reusing the
    /// allocation. Empty iovecs are dropped: a zero-length one would read as
    /// "end of file" when it is the only one left.
    pub fn reset(&mut self, offset: u64, iovs: &[libc::iovec]) {
        self.iovs.clear();
        self.iovs
            .extend(iovs.iter().filter(|v| v.iov_len > 0).copied());
        self.first = 0;
        self.pos = offset;
    }

    /// The iovecs of the next system call or submission (at most `IOV_MAX`).
    pub fn next_batch(&self) -> &[libc::iovec] {
        let end = self.iovs.len().min(self.first + IOV_MAX);
        &self.iovs[self.first..end]
    }

    /// Where the next batch starts on the device.
    pub fn offset(&self) -> u64 {
        self.pos
    }

    /// Bytes still to transfer.
    pub fn remaining(&self) -> u64 {
        self.iovs[self.first..]
            .iter()
            .map(|v| v.iov_len as u64)
            .sum()
    }

    /// True when nothing is left.
    pub fn is_done(&self) -> bool {
        self.first >= self.iovs.len()
    }

    /// Records that `n` bytes of the last batch were transferred; returns true
    /// when the whole transfer is done.
    pub fn advance(&mut self, n: usize) -> bool {
        self.pos += n as u64;
        self.first = iovecs_advance(&mut self.iovs, self.first, n);
        self.is_done()
    }

    /// Fills what is left with zeroes and finishes the transfer (a read that
    /// reached the end of the file, as a sparse or shrunk file does).
    ///
    /// # Safety
    /// The iovecs must still point to valid, writable memory.
    pub unsafe fn zero_rest(&mut self) {
        for iov in &self.iovs[self.first..] {
            // SAFETY: the caller guarantees the iovec's memory is valid and writable.
            unsafe { std::ptr::write_bytes(iov.iov_base.cast::<u8>(), 0, iov.iov_len) };
        }
        self.first = self.iovs.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    #[test]
    fn a_short_transfer_resumes_inside_the_partial_iovec() {
        let (mut a, mut b) = ([0u8; 4096], [0u8; 8192]);
        let mut t = Transfer::default();
        t.reset(1 << 20, &[iov(&mut a), iov(&mut b)]);
        assert_eq!(t.remaining(), 12288);
        assert!(!t.advance(5000), "5000 of 12288 bytes");
        assert_eq!(t.offset(), (1 << 20) + 5000);
        let batch = t.next_batch();
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].iov_base as usize, b.as_ptr() as usize + 904);
        assert_eq!(batch[0].iov_len, 8192 - 904);
        assert!(t.advance(8192 - 904));
    }

    #[test]
    fn more_than_iov_max_iovecs_go_in_batches() {
        let mut bufs = vec![[0u8; 512]; IOV_MAX + 3];
        let iovs: Vec<_> = bufs.iter_mut().map(|b| iov(b)).collect();
        let mut t = Transfer::default();
        t.reset(0, &iovs);
        assert_eq!(t.next_batch().len(), IOV_MAX);
        assert!(!t.advance(IOV_MAX * 512));
        assert_eq!(t.next_batch().len(), 3);
        assert!(t.advance(3 * 512));
    }

    #[test]
    fn zero_length_iovecs_are_skipped_and_eof_zero_fills() {
        let mut a = [7u8; 16];
        let mut t = Transfer::default();
        t.reset(0, &[iov(&mut [][..]), iov(&mut a)]);
        assert_eq!(t.next_batch().len(), 1);
        t.advance(4);
        // SAFETY: `a` is alive and writable.
        unsafe { t.zero_rest() };
        assert!(t.is_done());
        assert_eq!(&a[..4], &[7; 4]);
        assert_eq!(&a[4..], &[0; 12]);
    }
}
