//! vhost-user glue: the `VhostUserBackend` implementation, per-queue workers and
//! the reconnect loop.
