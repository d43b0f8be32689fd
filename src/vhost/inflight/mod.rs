//! vhost-user inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`), split
//! rings only.
//!
//! The backend creates a shared buffer (a memfd) on GET_INFLIGHT_FD; the frontend
//! keeps it and hands it back on SET_INFLIGHT_FD, also to a backend that restarted
//! after a crash. Each queue's part records which descriptor heads the backend took
//! from the avail ring and has not yet put in the used ring, and in which order it
//! took them. A restarted backend resubmits exactly those, and resumes the avail ring
//! after the last request taken, instead of at the used index the frontend rewinds
//! to (exact only when requests complete in order; ours do not).
//!
//! Layout (docs/interop/vhost-user.rst, "Inflight I/O tracking"; the `vhost` crate's
//! `QueueRegionSplit` and `DescStateSplit`): per queue a 16-byte header (`features`
//! u64, `version` u16, `desc_num` u16, `last_batch_head` u16, `used_idx` u16), then
//! `desc_num` 16-byte entries (`inflight` u8, padding, `next` u16, `counter` u64);
//! each queue's part is rounded up to 64 bytes.

mod mapping;
mod region;
#[cfg(test)]
mod tests;

pub(crate) use region::{QueueRegion, Recovery};

use mapping::Mapping;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use thiserror::Error;
use vhost::vhost_user::message::{DescStateSplit, VhostUserInflight};

/// Bytes of a queue region's header.
const HEADER_LEN: usize = 16;
/// Bytes of one descriptor's entry.
const DESC_LEN: usize = 16;
/// Queue regions start on this boundary (libvhost-user and DPDK use the same).
const ALIGN: usize = 64;

// The layout above is the spec's; the vhost crate carries it as a packed struct.
const _: () = assert!(std::mem::size_of::<DescStateSplit>() == DESC_LEN);

/// Why an inflight buffer was refused.
#[derive(Debug, Error)]
pub(crate) enum InflightError {
    /// The frontend asks about more queues, or larger ones, than the backend has.
    #[error("{num_queues} queue(s) of {queue_size} asked for; the backend has {have_queues} of at most {have_size}")]
    Shape {
        num_queues: u16,
        queue_size: u16,
        have_queues: usize,
        have_size: usize,
    },
    /// The buffer handed back is smaller than its queues need.
    #[error("{have} bytes at offset {offset} cannot hold {need} bytes of tracking")]
    TooSmall { have: u64, offset: u64, need: u64 },
    /// Creating, sizing or mapping the memfd failed.
    #[error("{0}: {1}")]
    Os(&'static str, #[source] io::Error),
}

impl From<InflightError> for io::Error {
    fn from(e: InflightError) -> Self {
        let kind = match &e {
            InflightError::Os(_, err) => err.kind(),
            _ => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, e)
    }
}

/// Bytes one queue of `queue_size` entries takes in the buffer.
pub(crate) fn queue_region_len(queue_size: u16) -> usize {
    (HEADER_LEN + DESC_LEN * usize::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

/// Checks the frontend's queue count and size against the backend's.
fn check_shape(
    msg: &VhostUserInflight,
    have_queues: usize,
    have_size: usize,
) -> Result<(), InflightError> {
    if msg.num_queues == 0
        || usize::from(msg.num_queues) > have_queues
        || msg.queue_size == 0
        || usize::from(msg.queue_size) > have_size
    {
        return Err(InflightError::Shape {
            num_queues: msg.num_queues,
            queue_size: msg.queue_size,
            have_queues,
            have_size,
        });
    }
    Ok(())
}

/// GET_INFLIGHT_FD: a zeroed memfd for `msg.num_queues` queues of `msg.queue_size`,
/// and the reply describing it. Zero means "not initialised": the first ring start
/// initialises each queue's part.
pub(crate) fn create(
    msg: &VhostUserInflight,
    have_queues: usize,
    have_size: usize,
) -> Result<(VhostUserInflight, File), InflightError> {
    check_shape(msg, have_queues, have_size)?;
    let len = (queue_region_len(msg.queue_size) * usize::from(msg.num_queues)) as u64;
    // SAFETY: a NUL-terminated name and flags; the kernel returns a new fd or -1.
    let fd = unsafe {
        libc::memfd_create(
            c"colo-blk-inflight".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(InflightError::Os(
            "memfd_create",
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)
        .map_err(|e| InflightError::Os("sizing the memfd", e))?;
    // A backend given this buffer back maps it; a frontend that could shrink it
    // would kill that backend with SIGBUS at its next access.
    // SAFETY: fcntl on an fd this process owns; no memory involved.
    let rc = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )
    };
    if rc < 0 {
        return Err(InflightError::Os(
            "sealing the memfd",
            io::Error::last_os_error(),
        ));
    }
    Ok((
        VhostUserInflight::new(len, 0, msg.num_queues, msg.queue_size),
        file,
    ))
}

/// The buffer handed back by SET_INFLIGHT_FD, mapped.
pub(crate) struct InflightBuffer {
    map: Arc<Mapping>,
    num_queues: u16,
    queue_size: u16,
}

impl InflightBuffer {
    /// Maps `file` as `msg` describes it, after checking it can hold what `msg` says.
    pub(crate) fn open(
        msg: &VhostUserInflight,
        file: &File,
        have_queues: usize,
        have_size: usize,
    ) -> Result<Self, InflightError> {
        check_shape(msg, have_queues, have_size)?;
        let need = (queue_region_len(msg.queue_size) * usize::from(msg.num_queues)) as u64;
        let file_len = file
            .metadata()
            .map_err(|e| InflightError::Os("fstat", e))?
            .len();
        if msg.mmap_size < need || file_len < msg.mmap_offset.saturating_add(need) {
            return Err(InflightError::TooSmall {
                have: msg.mmap_size.min(file_len.saturating_sub(msg.mmap_offset)),
                offset: msg.mmap_offset,
                need,
            });
        }
        let map = Mapping::new(file, msg.mmap_offset, need as usize)
            .map_err(|e| InflightError::Os("mmap", e))?;
        Ok(InflightBuffer {
            map: Arc::new(map),
            num_queues: msg.num_queues,
            queue_size: msg.queue_size,
        })
    }

    /// Queues the buffer tracks.
    pub(crate) fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Queue `q`'s part, if the buffer covers it.
    pub(crate) fn queue(&self, q: usize) -> Option<QueueRegion> {
        if q >= usize::from(self.num_queues) {
            return None;
        }
        let len = queue_region_len(self.queue_size);
        Some(QueueRegion::new(self.map.clone(), q * len, self.queue_size))
    }
}
