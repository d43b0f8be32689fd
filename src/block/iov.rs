//! Helpers over buffer lists (`&[VolatileSlice]`): take a byte window of the list,
//! copy between the list and a plain buffer, zero it. Nodes that split a request
//! by layer or by granule use them to address parts of the caller's buffers
//! without bouncing the data.

use super::{BlockError, Result};
use vm_memory::VolatileSlice;

fn window_error(start: u64, len: u64, total: u64) -> BlockError {
    BlockError::OutOfRange {
        offset: start,
        len,
        size: total,
    }
}

/// Bytes `start..start + len` of the concatenation of `bufs`, as a list of slices
/// into the same memory.
pub(crate) fn iov_window<'a>(
    bufs: &[VolatileSlice<'a>],
    start: u64,
    len: u64,
) -> Result<Vec<VolatileSlice<'a>>> {
    let mut out = Vec::with_capacity(1);
    let mut skip = start;
    let mut want = len;
    for b in bufs {
        if want == 0 {
            break;
        }
        let blen = b.len() as u64;
        if skip >= blen {
            skip -= blen;
            continue;
        }
        let take = (blen - skip).min(want);
        let sub = b
            .subslice(skip as usize, take as usize)
            .map_err(|_| window_error(start, len, super::iov_len(bufs)))?;
        out.push(sub);
        want -= take;
        skip = 0;
    }
    if want != 0 {
        return Err(window_error(start, len, super::iov_len(bufs)));
    }
    Ok(out)
}

/// Copies bytes `start..start + dst.len()` of `bufs` into `dst`.
pub(crate) fn iov_copy_out(bufs: &[VolatileSlice<'_>], start: u64, dst: &mut [u8]) -> Result<()> {
    let mut at = 0;
    for s in iov_window(bufs, start, dst.len() as u64)? {
        at += s.copy_to(&mut dst[at..]);
    }
    Ok(())
}

/// Fills every buffer with zeroes.
pub(crate) fn iov_zero(bufs: &[VolatileSlice<'_>]) {
    const ZEROES: [u8; 4096] = [0; 4096];
    for b in bufs {
        let mut at = 0;
        while at < b.len() {
            let n = (b.len() - at).min(ZEROES.len());
            if let Ok(sub) = b.subslice(at, n) {
                sub.copy_from(&ZEROES[..n]);
            }
            at += n;
        }
    }
}

/// Consumes `n` transferred bytes from `iovs[first..]` after a short
/// `preadv`/`pwritev`/`writev`: skips the iovecs done, trims the one in progress,
/// and returns the new index of the first pending iovec.
pub(crate) fn iovecs_advance(iovs: &mut [libc::iovec], mut first: usize, mut n: usize) -> usize {
    while first < iovs.len() && n >= iovs[first].iov_len {
        n -= iovs[first].iov_len;
        first += 1;
    }
    if n > 0 && first < iovs.len() {
        let iov = &mut iovs[first];
        // SAFETY: n < iov_len, so the advanced pointer stays in the buffer.
        iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(n).cast() };
        iov.iov_len -= n;
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_spans_buffers_and_rejects_overrun() {
        let mut a = [1u8; 3];
        let mut b = [2u8; 5];
        let bufs = [
            VolatileSlice::from(&mut a[..]),
            VolatileSlice::from(&mut b[..]),
        ];
        let w = iov_window(&bufs, 2, 4).unwrap();
        assert_eq!(w.iter().map(|s| s.len()).collect::<Vec<_>>(), vec![1, 3]);
        let mut out = [0u8; 4];
        iov_copy_out(&bufs, 2, &mut out).unwrap();
        assert_eq!(out, [1, 2, 2, 2]);
        iov_window(&bufs, 6, 3).unwrap_err();
        iov_zero(&bufs[1..]);
        assert_eq!(a, [1, 1, 1]);
        assert_eq!(b, [0; 5]);
    }

    #[test]
    fn iovecs_advance_skips_done_and_trims_the_partial_one() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        let mut iovs = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 8,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 8,
            },
        ];
        assert_eq!(super::iovecs_advance(&mut iovs, 0, 11), 1);
        assert_eq!(iovs[1].iov_len, 5);
        assert_eq!(iovs[1].iov_base as usize, b.as_ptr() as usize + 3);
        assert_eq!(super::iovecs_advance(&mut iovs, 1, 5), 2);
    }
}
