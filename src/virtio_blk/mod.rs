//! virtio-blk: descriptor chains to typed requests, config space, status codes.
