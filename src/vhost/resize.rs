//! Online resize: grow the served node, then the capacity every connection's
//! device model serves, then tell the connected frontend with a config-change
//! message on its backend request channel (QEMU re-reads the config space and
//! raises a config interrupt; the guest sees the new size).
//!
//! Locks: the connection thread only ever takes `link` briefly (to attach or
//! drop a channel); a resize takes `link` only to clone the channel out, and
//! waits for the frontend's answer holding nothing, so the frontend's
//! GET_CONFIG in between is served at once.

use super::config_change::{ConfigChannel, Delivery};
use crate::block::{BlockError, SharedDev};
use crate::sync::MutexExt;
use crate::virtio_blk::{capacity_sectors, Capacity, SECTOR_SIZE};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use vhost::vhost_user::Backend;

/// How long a resize waits for the frontend to answer its config-change
/// message (QEMU answers after one GET_CONFIG round trip, milliseconds).
pub const CONFIG_CHANGE_ANSWER_BOUND: Duration = Duration::from_secs(5);

/// What the frontend was told of a new size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The size did not change: nothing to tell.
    Unchanged,
    /// No frontend is connected: the next one reads the new size.
    NoFrontend,
    /// The frontend did not negotiate the backend request channel
    /// (VHOST_USER_PROTOCOL_F_BACKEND_REQ): its next GET_CONFIG returns the
    /// new size, but nothing tells it to ask.
    NoChannel,
    /// The config-change message was delivered (and answered, with REPLY_ACK).
    Notified,
    /// The message was sent but not answered within
    /// [`CONFIG_CHANGE_ANSWER_BOUND`]; the frontend may still act on it.
    NoAnswer,
    /// The message could not be delivered (the text says why).
    Failed(String),
}

impl Notice {
    /// The name in the `block_resize` reply's `frontend` member.
    pub fn as_str(&self) -> &'static str {
        match self {
            Notice::Unchanged => "unchanged",
            Notice::NoFrontend => "not-connected",
            Notice::NoChannel => "no-backend-channel",
            Notice::Notified => "notified",
            Notice::NoAnswer => "no-answer",
            Notice::Failed(_) => "failed",
        }
    }
}

/// A resize that happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resized {
    /// The capacity before, in bytes.
    pub old_size: u64,
    /// The capacity now, in bytes.
    pub new_size: u64,
    /// What the frontend was told.
    pub notice: Notice,
}

/// Why a resize was refused. Nothing changed when one is returned.
#[derive(Debug, Error)]
pub enum ResizeError {
    /// The disk is served read-only (QEMU's text).
    #[error("Image is read-only")]
    ReadOnly,
    /// Not a whole number of logical blocks.
    #[error("Size {size} is not a multiple of the logical block size ({block} bytes)")]
    Unaligned {
        /// The size asked for.
        size: u64,
        /// The logical block size.
        block: u64,
    },
    /// Smaller than the disk.
    #[error(
        "Cannot shrink the disk from {old} to {new} bytes: colo-blk only grows a disk \
         online (the guest may hold data past the new end)"
    )]
    Shrink {
        /// The current size.
        old: u64,
        /// The size asked for.
        new: u64,
    },
    /// The node could not grow (no space, file size limit, a block device
    /// not grown yet, a node that cannot grow).
    #[error("Cannot grow the disk to {size} bytes: {source}")]
    Grow {
        /// The size asked for.
        size: u64,
        /// What the node said.
        #[source]
        source: BlockError,
    },
}

/// What the control socket resizes through (a trait, so its argument
/// handling is tested without a disk).
pub trait Resize: Send + Sync {
    /// The capacity the guest is served, in bytes.
    fn size(&self) -> u64;
    /// Grows the disk to `new_size` bytes and tells the frontend.
    fn resize(&self, new_size: u64) -> Result<Resized, ResizeError>;
}

/// The connection a resize has to tell.
#[derive(Default)]
struct Link {
    connected: bool,
    channel: Option<Arc<ConfigChannel>>,
}

/// Grows the served disk online; one per served disk, shared by the control
/// socket and the vhost-user loop (which reports connections and backend
/// request channels to it).
pub struct Resizer {
    dev: SharedDev,
    logical_block_size: u32,
    capacity: Arc<Capacity>,
    link: Mutex<Link>,
    /// Resizes run one at a time (two control clients at once).
    one_at_a_time: Mutex<()>,
    answer_bound: Duration,
}

impl std::fmt::Debug for Resizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resizer")
            .field("capacity_bytes", &self.capacity.bytes())
            .field("logical_block_size", &self.logical_block_size)
            .finish_non_exhaustive()
    }
}

impl Resizer {
    /// A resizer for `dev`, served with `logical_block_size` blocks.
    pub fn new(dev: SharedDev, logical_block_size: u32) -> Self {
        let sectors = capacity_sectors(dev.size(), logical_block_size);
        Resizer {
            dev,
            logical_block_size,
            capacity: Arc::new(Capacity::new(sectors)),
            link: Mutex::new(Link::default()),
            one_at_a_time: Mutex::new(()),
            answer_bound: CONFIG_CHANGE_ANSWER_BOUND,
        }
    }

    /// Waits at most `bound` for the frontend's answer (tests).
    pub fn with_answer_bound(mut self, bound: Duration) -> Self {
        self.answer_bound = bound;
        self
    }

    /// The capacity every connection's device model serves.
    pub fn capacity(&self) -> Arc<Capacity> {
        Arc::clone(&self.capacity)
    }

    /// A frontend connection starts.
    pub(crate) fn connected(&self) {
        self.link.lock_or_recover().connected = true;
    }

    /// The connection ended: its channel is closed (ending a wait for its
    /// answer).
    pub(crate) fn disconnected(&self) {
        let channel = {
            let mut link = self.link.lock_or_recover();
            link.connected = false;
            link.channel.take()
        };
        if let Some(channel) = channel {
            channel.close();
        }
    }

    /// The frontend sent its backend request channel (SET_BACKEND_REQ_FD); a
    /// channel sent before is closed. Runs on the connection thread.
    pub(crate) fn attach_channel(&self, backend: Backend) {
        let channel = match ConfigChannel::open(backend) {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => {
                log::warn!(
                    "backend request channel unusable ({e}): a resize will not be announced"
                );
                None
            }
        };
        if channel.is_some() {
            log::info!("frontend gave a backend request channel: resizes will be announced");
        }
        let old = std::mem::replace(&mut self.link.lock_or_recover().channel, channel);
        if let Some(old) = old {
            old.close();
        }
    }

    /// Tells the connected frontend, if any, that the config space changed.
    fn notify(&self) -> Notice {
        let channel = {
            let link = self.link.lock_or_recover();
            if !link.connected {
                return Notice::NoFrontend;
            }
            match &link.channel {
                None => return Notice::NoChannel,
                Some(c) => Arc::clone(c),
            }
        };
        match channel.notify(self.answer_bound) {
            Delivery::Delivered => Notice::Notified,
            Delivery::NoAnswer => Notice::NoAnswer,
            Delivery::Failed(e) => Notice::Failed(e),
            Delivery::Closed => Notice::Failed(
                "the connection ended (or the frontend replaced its channel) before it answered"
                    .into(),
            ),
        }
    }
}

impl Resize for Resizer {
    fn size(&self) -> u64 {
        self.capacity.bytes()
    }

    fn resize(&self, new_size: u64) -> Result<Resized, ResizeError> {
        let old_size = {
            let _one = self.one_at_a_time.lock_or_recover();
            let old = self.capacity.bytes();
            if self.dev.read_only() {
                return Err(ResizeError::ReadOnly);
            }
            let block = u64::from(self.logical_block_size);
            if new_size % block != 0 {
                return Err(ResizeError::Unaligned {
                    size: new_size,
                    block,
                });
            }
            if new_size < old {
                return Err(ResizeError::Shrink { old, new: new_size });
            }
            if new_size == old {
                return Ok(Resized {
                    old_size: old,
                    new_size,
                    notice: Notice::Unchanged,
                });
            }
            // The node first: every request the new capacity admits must
            // find it long enough.
            self.dev
                .grow(new_size)
                .map_err(|source| ResizeError::Grow {
                    size: new_size,
                    source,
                })?;
            self.capacity.grow_to(new_size / SECTOR_SIZE);
            old
        };
        log::info!("disk grown online from {old_size} to {new_size} bytes");
        // Outside the resize lock: a frontend slow to answer delays only this
        // reply, and a message sent later covers this change as well.
        let notice = self.notify();
        match &notice {
            Notice::Notified => {
                log::info!("frontend notified of the new size (config-change message)")
            }
            Notice::NoFrontend => {
                log::info!("no frontend connected: the next one reads the new size")
            }
            Notice::NoChannel => log::warn!(
                "the frontend did not negotiate BACKEND_REQ: its next GET_CONFIG returns the \
                 new size, but it is not told to ask"
            ),
            Notice::NoAnswer => log::warn!(
                "the frontend did not answer the config-change message within {:?}",
                self.answer_bound
            ),
            Notice::Failed(e) => log::warn!("config-change message not delivered: {e}"),
            Notice::Unchanged => {}
        }
        Ok(Resized {
            old_size,
            new_size,
            notice,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{BlockDev, RawFile, RawFileOptions};
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn disk(size: u64, read_only: bool) -> (tempfile::TempDir, Arc<RawFile>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        let opts = RawFileOptions {
            read_only,
            ..Default::default()
        };
        (dir, Arc::new(RawFile::open(&path, &opts).unwrap()))
    }

    #[test]
    fn refusals_change_nothing() {
        let (dir, raw) = disk(1 << 20, false);
        let r = Resizer::new(raw.clone(), 4096);
        for (size, want) in [
            (
                (1 << 20) + 512,
                "Size 1049088 is not a multiple of the logical block size (4096 bytes)",
            ),
            (
                1 << 19,
                "Cannot shrink the disk from 1048576 to 524288 bytes: colo-blk only grows a \
                 disk online (the guest may hold data past the new end)",
            ),
        ] {
            let e = r.resize(size).unwrap_err();
            assert_eq!(e.to_string(), want);
        }
        assert_eq!((r.size(), raw.size()), (1 << 20, 1 << 20));
        let len = std::fs::metadata(dir.path().join("img")).unwrap().len();
        assert_eq!(len, 1 << 20);

        let (_d, ro) = disk(1 << 20, true);
        let r = Resizer::new(ro, 512);
        assert_eq!(
            r.resize(2 << 20).unwrap_err().to_string(),
            "Image is read-only"
        );
    }

    #[test]
    fn growing_reaches_the_file_the_node_and_the_capacity() {
        let (dir, raw) = disk(1 << 20, false);
        let r = Resizer::new(raw.clone(), 512);
        let cap = r.capacity();
        let done = r.resize(3 << 20).unwrap();
        assert_eq!(
            done,
            Resized {
                old_size: 1 << 20,
                new_size: 3 << 20,
                notice: Notice::NoFrontend
            }
        );
        assert_eq!(cap.bytes(), 3 << 20);
        assert_eq!(raw.size(), 3 << 20);
        let len = std::fs::metadata(dir.path().join("img")).unwrap().len();
        assert_eq!(len, 3 << 20);
        // The same size again: nothing to do, nothing to tell.
        assert_eq!(r.resize(3 << 20).unwrap().notice, Notice::Unchanged);
        r.connected();
        assert_eq!(r.resize(4 << 20).unwrap().notice, Notice::NoChannel);
    }

    #[test]
    fn a_frontend_that_does_not_answer_delays_the_reply_by_the_bound_only() {
        let (_dir, raw) = disk(1 << 20, false);
        let r = Resizer::new(raw, 512).with_answer_bound(Duration::from_millis(200));
        r.connected();
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let backend = Backend::from_stream(ours);
        backend.set_reply_ack_flag(true);
        r.attach_channel(backend);
        let started = std::time::Instant::now();
        assert_eq!(r.resize(2 << 20).unwrap().notice, Notice::NoAnswer);
        assert!(started.elapsed() < Duration::from_secs(5));
        let mut hdr = [0u8; 12];
        theirs.read_exact(&mut hdr).unwrap();
        assert_eq!(u32::from_le_bytes(hdr[0..4].try_into().unwrap()), 2);
        // The connection ends: the blocked sender is released and joined.
        let closing = std::time::Instant::now();
        r.disconnected();
        assert!(closing.elapsed() < Duration::from_secs(5));
        assert_eq!(r.resize(3 << 20).unwrap().notice, Notice::NoFrontend);
    }
}
