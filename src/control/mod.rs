//! The QMP control socket and the `colo-blk ctl` client.
