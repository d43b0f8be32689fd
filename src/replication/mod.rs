//! COLO block replication: the stage machine, copy-before-write, checkpoint and
//! failover commit.
