//! Large transfers are split between the queue worker and helper threads.
//!
//! A single thread copying between the page cache and guest memory tops out at
//! one core's memory bandwidth; a 1 MiB request takes long enough that handing
//! parts of it to other threads pays for the hand-off many times over. Small
//! requests never take this path, so 4 KiB latency is unaffected.
//!
//! Each queue worker thread gets its own helpers (created on first use, stopped
//! when the worker thread exits), so queues share no lock here either.

use crate::block::{iov_len, BlockError, SharedDev};
use std::cell::RefCell;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::OnceLock;
use vm_memory::VolatileSlice;

/// Smallest part a transfer is split into: requests shorter than two parts
/// are not split.
pub const PART_MIN: u64 = 128 << 10;

/// Most parts per transfer (the worker does one, helpers the rest).
const MAX_PARTS: usize = 4;

/// Parts per transfer on this machine: one per CPU, at most [`MAX_PARTS`].
/// More threads than CPUs only add hand-offs to the same memory copies.
fn max_parts() -> usize {
    static PARTS: OnceLock<usize> = OnceLock::new();
    *PARTS.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, usize::from)
            .clamp(1, MAX_PARTS)
    })
}

/// Split points are multiples of this, so parts of an aligned request stay
/// aligned (O_DIRECT).
const SPLIT_ALIGN: u64 = 4096;

/// Reads or writes `bufs` at `offset`, splitting large transfers.
pub fn transfer(
    dev: &SharedDev,
    write: bool,
    offset: u64,
    bufs: &[VolatileSlice<'_>],
) -> Result<(), BlockError> {
    transfer_in_parts(dev, write, offset, bufs, max_parts())
}

fn transfer_in_parts(
    dev: &SharedDev,
    write: bool,
    offset: u64,
    bufs: &[VolatileSlice<'_>],
    max_parts: usize,
) -> Result<(), BlockError> {
    let len = iov_len(bufs);
    let parts = usize::try_from(len / PART_MIN)
        .unwrap_or(MAX_PARTS)
        .min(max_parts);
    if parts < 2 {
        return direct(&**dev, write, offset, bufs);
    }
    let part = len / parts as u64 / SPLIT_ALIGN * SPLIT_ALIGN;
    HELPERS.with(|cell| {
        let mut helpers = cell.borrow_mut();
        while helpers.len() < parts - 1 {
            match Helper::spawn() {
                Some(h) => helpers.push(h),
                None => break,
            }
        }
        // The worker keeps the first part; each helper takes one of the rest.
        let mut rest = bufs.to_vec();
        let mut first = Vec::new();
        let mut pending = Vec::with_capacity(parts - 1);
        for i in 0..parts.min(helpers.len() + 1) {
            let last = i + 1 == parts.min(helpers.len() + 1);
            let (mine, tail) = if last {
                (rest, Vec::new())
            } else {
                split_at(&rest, part)
            };
            rest = tail;
            if i == 0 {
                first = mine;
                continue;
            }
            let helper = &helpers[i - 1];
            let job = Job {
                dev: dev.clone(),
                write,
                offset: offset + part * i as u64,
                iovs: mine
                    .iter()
                    .map(|s| (s.ptr_guard_mut().as_ptr() as usize, s.len()))
                    .collect(),
            };
            if helper.jobs.send(job).is_err() {
                // The helper is gone: do its part here instead.
                let done = direct(&**dev, write, offset + part * i as u64, &mine);
                pending.push(Pending::Done(done));
                continue;
            }
            // From here the helper may be touching this part's memory: it is
            // waited for on every path, unwinding included, before the borrow
            // of `bufs` can end.
            pending.push(Pending::Running(&helper.done));
        }
        let mut result = direct(&**dev, write, offset, &first);
        for p in pending {
            result = result.and(p.wait());
        }
        result
    })
}

fn direct(
    dev: &dyn crate::block::BlockDev,
    write: bool,
    offset: u64,
    bufs: &[VolatileSlice<'_>],
) -> Result<(), BlockError> {
    if write {
        dev.write_vectored(offset, bufs)
    } else {
        dev.read_vectored(offset, bufs)
    }
}

/// Splits a buffer list after `at` bytes.
fn split_at<'a>(
    bufs: &[VolatileSlice<'a>],
    at: u64,
) -> (Vec<VolatileSlice<'a>>, Vec<VolatileSlice<'a>>) {
    let mut head = Vec::with_capacity(bufs.len());
    let mut tail = Vec::with_capacity(bufs.len());
    let mut left = at as usize;
    for s in bufs {
        if left >= s.len() {
            left -= s.len();
            head.push(*s);
        } else if left == 0 {
            tail.push(*s);
        } else {
            // In bounds: 0 < left < s.len().
            match s.split_at(left) {
                Ok((a, b)) => {
                    head.push(a);
                    tail.push(b);
                }
                Err(_) => tail.push(*s),
            }
            left = 0;
        }
    }
    (head, tail)
}

thread_local! {
    static HELPERS: RefCell<Vec<Helper>> = const { RefCell::new(Vec::new()) };
}

/// One helper thread; dropping it (worker thread exit) ends the helper.
struct Helper {
    jobs: Sender<Job>,
    done: Receiver<Result<(), BlockError>>,
}

struct Job {
    dev: SharedDev,
    write: bool,
    offset: u64,
    /// (address, length) of guest buffers, valid until the reply is received.
    iovs: Vec<(usize, usize)>,
}

impl Helper {
    fn spawn() -> Option<Helper> {
        let (jobs, inbox) = channel::<Job>();
        let (outbox, done) = channel();
        let spawned = std::thread::Builder::new()
            .name("colo-blk-io".into())
            .spawn(move || {
                for job in inbox {
                    let bufs: Vec<VolatileSlice<'_>> = job
                        .iovs
                        .iter()
                        // SAFETY: the submitting worker lent these buffers and
                        // blocks (`Pending`) until this job's reply is received,
                        // so they stay valid and mapped while we use them.
                        .map(|&(addr, len)| unsafe { VolatileSlice::new(addr as *mut u8, len) })
                        .collect();
                    let result = direct(&*job.dev, job.write, job.offset, &bufs);
                    if outbox.send(result).is_err() {
                        break;
                    }
                }
            });
        match spawned {
            Ok(_) => Some(Helper { jobs, done }),
            Err(e) => {
                log::warn!("cannot start an I/O helper thread, large requests stay serial: {e}");
                None
            }
        }
    }
}

/// A part's outcome: known, or still with a helper.
enum Pending<'a> {
    Done(Result<(), BlockError>),
    Running(&'a Receiver<Result<(), BlockError>>),
}

impl Pending<'_> {
    fn wait(mut self) -> Result<(), BlockError> {
        let result = match &mut self {
            Pending::Done(r) => std::mem::replace(r, Ok(())),
            Pending::Running(rx) => rx.recv().unwrap_or_else(|_| {
                Err(BlockError::io(
                    "split transfer",
                    0,
                    std::io::Error::other("I/O helper thread died"),
                ))
            }),
        };
        // The reply is consumed: nothing is left for Drop to wait for (and
        // `self` owns no resources, only a reference).
        std::mem::forget(self);
        result
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        // Reached with Running only when unwinding: the helper must be done
        // with the guest buffers before they can go away.
        if let Pending::Running(rx) = self {
            let _ = rx.recv();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{BlockDevExt, RawFile, RawFileOptions};
    use std::sync::Arc;

    #[test]
    fn split_transfers_move_every_byte_to_the_right_place() {
        let dir = tempfile::tempdir().unwrap();
        let raw = RawFile::open(
            &dir.path().join("img"),
            &RawFileOptions {
                create_size: Some(4 << 20),
                ..Default::default()
            },
        )
        .unwrap();
        let dev: SharedDev = Arc::new(raw);
        let data: Vec<u8> = (0..(1 << 20) + 512).map(|i| (i * 7 % 253) as u8).collect();
        let zeros = vec![0u8; data.len()];
        for parts in 1..=4 {
            // Uneven buffers so split points fall inside them.
            dev.write_at(8192, &zeros).unwrap();
            let mut a = data[..300_000].to_vec();
            let mut b = data[300_000..].to_vec();
            let bufs = [
                VolatileSlice::from(&mut a[..]),
                VolatileSlice::from(&mut b[..]),
            ];
            transfer_in_parts(&dev, true, 8192, &bufs, parts).unwrap();
            let mut back = vec![0u8; data.len()];
            dev.read_at(8192, &mut back).unwrap();
            assert!(back == data, "write in {parts} parts");

            let mut c = vec![0u8; 700_000];
            let mut d = vec![0u8; data.len() - 700_000];
            {
                let bufs = [
                    VolatileSlice::from(&mut c[..]),
                    VolatileSlice::from(&mut d[..]),
                ];
                transfer_in_parts(&dev, false, 8192, &bufs, parts).unwrap();
                // A part past the end fails the whole transfer.
                assert!(transfer_in_parts(&dev, false, (4 << 20) - 4096, &bufs, parts).is_err());
            }
            assert!(
                c[..] == data[..700_000] && d[..] == data[700_000..],
                "read in {parts} parts"
            );
        }
    }
}
