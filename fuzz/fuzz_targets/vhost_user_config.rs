//! The part of vhost-user message handling that is colo-blk's own: what the
//! device makes of GET_CONFIG/SET_CONFIG payloads (offset and bytes chosen by
//! the frontend). Nothing may panic; only the writeback byte may ever change,
//! and only on a writable disk; a refused write changes nothing.

#![no_main]

use colo_blk::block::MemDev;
use colo_blk::virtio_blk::{VirtioBlk, Geometry, CONFIG_SPACE_SIZE};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let read_only = data[0] & 1 != 0;
    let lbs = if data[0] & 2 != 0 { 4096 } else { 512 };
    let dev = VirtioBlk::new(
        Arc::new(MemDev::new(1 << 20)),
        Geometry::new(1 << 20, lbs, 256, 1, read_only),
        "fuzz",
    );
    let mut rest = &data[1..];
    // A sequence of writes: offset (u32), length (u8), bytes.
    while rest.len() >= 5 {
        let offset = u32::from_le_bytes(rest[..4].try_into().unwrap());
        let len = usize::from(rest[4]).min(rest.len() - 5);
        let bytes = &rest[5..5 + len];
        rest = &rest[5 + len..];
        let before = dev.config_space();
        let accepted = dev.write_config(offset, bytes);
        let after = dev.config_space();
        assert_eq!(before.len(), CONFIG_SPACE_SIZE);
        let changed: Vec<usize> = (0..CONFIG_SPACE_SIZE)
            .filter(|&i| before[i] != after[i])
            .collect();
        if !accepted || read_only {
            assert!(!accepted || !read_only, "a read-only disk accepted a write");
            assert!(changed.is_empty(), "refused write changed {changed:?}");
        }
        assert!(changed.len() <= 1, "one write changed {changed:?}");
    }
});
