//! colo-blk: a vhost-user-blk backend with COLO block replication.
//!
//! Data flows one way: [`vhost`] → [`virtio_blk`] → [`block`] (the node stack,
//! where [`replication`] sits) → files or [`nbd`]. [`control`] drives the
//! replication state machine from outside. ARCHITECTURE.md at the root of the
//! repository maps the modules, the replication invariants and the threads.

pub mod block;
pub mod control;
pub mod demo;
pub mod frontend;
pub mod nbd;
pub mod pattern;
pub mod replication;
pub mod stats;
pub mod tls;
pub mod units;
pub mod unix_socket;
pub mod vhost;
pub mod virtio_blk;
