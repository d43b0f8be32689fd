//! What a channel that starts its own operations shares with every other such
//! channel (the primary's and the secondary's): the operation as the queue
//! added it, kept until it can start, and the order in which held-back
//! operations are tried again.

use super::Kind;
use std::collections::VecDeque;

/// An operation as the queue's request table added it.
#[derive(Debug)]
pub(crate) struct QueuedOp {
    /// The id the queue added it with.
    pub(crate) id: u64,
    pub(crate) kind: Kind,
    pub(crate) offset: u64,
    pub(crate) len: u64,
    /// Guest buffers (reads and writes), valid until the completion is returned.
    pub(crate) iovs: Vec<libc::iovec>,
}

/// A channel that starts operations itself and holds back those that something
/// (a busy cluster, a closed gate, a link switch) keeps from starting; the
/// holder rings the channel's doorbell when it lets go.
pub(crate) trait StartsOps {
    /// Starts `op`, or hands it back when something is in the way.
    fn start(&mut self, op: QueuedOp) -> Option<QueuedOp>;

    /// The operations held back, oldest first.
    fn held_back(&mut self) -> &mut VecDeque<QueuedOp>;

    /// Takes an operation from the queue: started now, or held back.
    fn add_op(&mut self, id: u64, kind: Kind, offset: u64, len: u64, iovs: &[libc::iovec]) {
        let op = QueuedOp {
            id,
            kind,
            offset,
            len,
            iovs: iovs.to_vec(),
        };
        // A request may overtake one that waits: virtio does not order
        // requests in flight together (same-cluster order is the range locks'
        // job).
        if let Some(op) = self.start(op) {
            self.held_back().push_back(op);
        }
    }

    /// Tries every held-back operation once, in order.
    fn retry_held_back(&mut self) {
        for _ in 0..self.held_back().len() {
            let Some(op) = self.held_back().pop_front() else {
                break;
            };
            if let Some(op) = self.start(op) {
                self.held_back().push_back(op);
            }
        }
    }
}

/// The `add_*` methods of an [`IoChannel`](super::IoChannel) implemented by
/// [`StartsOps::add_op`], for use inside the `impl IoChannel` block.
macro_rules! add_ops_by_starting {
    () => {
        unsafe fn add_read(&mut self, id: u64, offset: u64, iovs: &[libc::iovec]) {
            let len = iovs.iter().map(|v| v.iov_len as u64).sum();
            $crate::block::channel::StartsOps::add_op(
                self,
                id,
                $crate::block::channel::Kind::Read,
                offset,
                len,
                iovs,
            );
        }

        unsafe fn add_write(&mut self, id: u64, offset: u64, iovs: &[libc::iovec]) {
            let len = iovs.iter().map(|v| v.iov_len as u64).sum();
            $crate::block::channel::StartsOps::add_op(
                self,
                id,
                $crate::block::channel::Kind::Write,
                offset,
                len,
                iovs,
            );
        }

        fn add_flush(&mut self, id: u64) {
            $crate::block::channel::StartsOps::add_op(
                self,
                id,
                $crate::block::channel::Kind::Flush,
                0,
                0,
                &[],
            );
        }

        fn add_discard(&mut self, id: u64, offset: u64, len: u64) {
            $crate::block::channel::StartsOps::add_op(
                self,
                id,
                $crate::block::channel::Kind::Discard,
                offset,
                len,
                &[],
            );
        }

        fn add_write_zeroes(&mut self, id: u64, offset: u64, len: u64, unmap: bool) {
            $crate::block::channel::StartsOps::add_op(
                self,
                id,
                $crate::block::channel::Kind::Zeroes { unmap },
                offset,
                len,
                &[],
            );
        }
    };
}
pub(crate) use add_ops_by_starting;
