//! NBD: the server a secondary exposes to its primary, and the primary's client.
