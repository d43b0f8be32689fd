//! virtio-blk: descriptor chains to block-stack calls, config space, status codes.
//!
//! Pure device model: it knows guest memory and descriptor chains but nothing of
//! vhost-user, so unit tests drive it with `virtio_queue::mock` queues.

mod async_queue;
mod chain;
mod config;
mod device;
mod error;
mod lone;
mod queue;
mod ratelimit;
mod request;

pub use async_queue::{AsyncQueue, Submitter as AsyncSubmitter};
pub use chain::{GuestMem, HeadChain};
pub use config::{capacity_sectors, Capacity, Geometry, CONFIG_SPACE_SIZE, ID_BYTES, SECTOR_SIZE};
pub use device::{Completion, Deferred, Offload, Scratch, VirtioBlk, OFFLOAD_MIN};
pub use error::RequestError;
pub use lone::STREAK as LONE_STREAK;
pub use queue::{NoLog, RingLog};

#[cfg(test)]
mod head_chain_tests;
#[cfg(test)]
mod tests;
