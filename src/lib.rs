//! colo-blk: a vhost-user-blk backend with COLO block replication.
//!
//! Data flows one way: [`vhost`] → [`virtio_blk`] → [`block`] (the node stack,
//! where [`replication`] sits) → files or [`nbd`]. [`control`] drives the
//! replication state machine from outside. ARCHITECTURE.md at the root of the
//! repository maps the modules, the replication invariants and the threads.

mod acceptor;
pub mod block;
pub mod control;
pub mod nbd;
pub mod replication;
pub mod stats;
mod sync;
pub mod tls;
pub mod units;
pub mod unix_socket;
pub mod vhost;
pub mod virtio_blk;
