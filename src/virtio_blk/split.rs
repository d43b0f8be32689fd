//! Large transfers are split between the queue worker and one helper thread.
//!
//! A single thread copying between the page cache and guest memory tops out at
//! one core's memory bandwidth; a 1 MiB request takes long enough that handing
//! half of it to a second thread pays for the hand-off many times over. Small
//! requests never take this path, so 4 KiB latency is unaffected.
//!
//! Each queue worker thread gets its own helper (created on first use, stopped
//! when the worker thread exits), so queues share no lock here either.

use crate::block::{iov_len, BlockError, SharedDev};
use std::cell::RefCell;
use std::sync::mpsc::{channel, Receiver, Sender};
use vm_memory::VolatileSlice;

/// Requests at least this long are split in two.
pub const SPLIT_MIN: u64 = 256 << 10;

/// Split points are multiples of this, so halves of an aligned request stay
/// aligned (O_DIRECT).
const SPLIT_ALIGN: u64 = 4096;

/// Reads or writes `bufs` at `offset`, splitting large transfers.
pub fn transfer(
    dev: &SharedDev,
    write: bool,
    offset: u64,
    bufs: &[VolatileSlice<'_>],
) -> Result<(), BlockError> {
    let len = iov_len(bufs);
    if len < SPLIT_MIN {
        return direct(&**dev, write, offset, bufs);
    }
    let half = len / 2 / SPLIT_ALIGN * SPLIT_ALIGN;
    let (head, tail) = split_at(bufs, half);
    HELPER.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Helper::spawn();
        }
        let Some(helper) = slot.as_ref() else {
            return direct(&**dev, write, offset, bufs);
        };
        let job = Job {
            dev: dev.clone(),
            write,
            offset: offset + half,
            iovs: tail
                .iter()
                .map(|s| (s.ptr_guard_mut().as_ptr() as usize, s.len()))
                .collect(),
        };
        if helper.jobs.send(job).is_err() {
            return direct(&**dev, write, offset, bufs);
        }
        // From here the helper may be touching `tail`'s memory: wait for it
        // on every path, unwinding included, before the borrow can end.
        let pending = Pending(&helper.done);
        let first = direct(&**dev, write, offset, &head);
        let second = pending.wait();
        first.and(second)
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
    static HELPER: RefCell<Option<Helper>> = const { RefCell::new(None) };
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

/// The reply to a job in flight; waits for it even when dropped unread.
struct Pending<'a>(&'a Receiver<Result<(), BlockError>>);

impl Pending<'_> {
    fn wait(self) -> Result<(), BlockError> {
        let r = self.0.recv().unwrap_or_else(|_| {
            Err(BlockError::io(
                "split transfer",
                0,
                std::io::Error::other("I/O helper thread died"),
            ))
        });
        std::mem::forget(self);
        r
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let _ = self.0.recv();
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
        // Uneven buffers so the split point falls inside one of them.
        let mut a = data[..300_000].to_vec();
        let mut b = data[300_000..].to_vec();
        let bufs = [
            VolatileSlice::from(&mut a[..]),
            VolatileSlice::from(&mut b[..]),
        ];
        transfer(&dev, true, 8192, &bufs).unwrap();
        let mut back = vec![0u8; data.len()];
        dev.read_at(8192, &mut back).unwrap();
        assert!(back == data);

        let mut c = vec![0u8; 700_000];
        let mut d = vec![0u8; data.len() - 700_000];
        {
            let bufs = [
                VolatileSlice::from(&mut c[..]),
                VolatileSlice::from(&mut d[..]),
            ];
            transfer(&dev, false, 8192, &bufs).unwrap();
            // Errors from either half are reported.
            assert!(transfer(&dev, false, (4 << 20) - 4096, &bufs).is_err());
        }
        assert!(c[..] == data[..700_000] && d[..] == data[700_000..]);
    }
}
