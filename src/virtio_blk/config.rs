//! The virtio-blk configuration space and the feature bits colo-blk offers.

use std::sync::atomic::{AtomicU64, Ordering};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Bytes in a virtio-blk sector: request offsets are in these units whatever the
/// logical block size is.
pub const SECTOR_SIZE: u64 = 512;

/// Bytes of the GET_ID answer (the serial, zero padded).
pub const ID_BYTES: usize = 20;

/// Size of the configuration space we expose: `struct virtio_blk_config` up to and
/// including the zoned characteristics (all zero: not a zoned device).
pub const CONFIG_SPACE_SIZE: usize = 96;

/// Offset of the `writeback` byte, the only field a driver may write
/// (with VIRTIO_BLK_F_CONFIG_WCE).
pub const WRITEBACK_OFFSET: usize = 32;

/// Most sectors one discard or write-zeroes segment may cover (1 GiB): large
/// enough that guests never notice, small enough that one segment stays a
/// bounded amount of work for a queue worker.
pub const MAX_RANGE_SECTORS: u32 = (1 << 30) / SECTOR_SIZE as u32;

/// Most segments one discard or write-zeroes request may carry.
pub const MAX_RANGE_SEGMENTS: u32 = 32;

/// Upper bound for `seg_max`: one preadv/pwritev call takes at most this many iovecs.
const MAX_SEGMENTS: u32 = 1024;

/// What the guest is told about the disk: everything the configuration space and
/// the feature bits describe. Fixed for the lifetime of a connection, except the
/// capacity, which an online resize grows ([`Capacity`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    /// Capacity in 512-byte sectors (a whole number of logical blocks) when the
    /// geometry was made; the device model serves its [`Capacity`], which may
    /// have grown since.
    pub capacity_sectors: u64,
    /// Logical block size in bytes (512 or 4096).
    pub logical_block_size: u32,
    /// Most data segments in one request.
    pub seg_max: u32,
    /// Number of request queues.
    pub num_queues: u16,
    /// The disk refuses writes; VIRTIO_BLK_F_RO is offered.
    pub read_only: bool,
}

impl Geometry {
    /// Describes a disk of `size_bytes` served with the given queue layout.
    ///
    /// The capacity is rounded down to a whole logical block: a trailing partial
    /// block cannot be addressed by a guest anyway.
    pub fn new(
        size_bytes: u64,
        logical_block_size: u32,
        queue_size: u16,
        num_queues: u16,
        read_only: bool,
    ) -> Self {
        let lbs = u64::from(logical_block_size.max(SECTOR_SIZE as u32));
        // The header and the status byte take a descriptor each when the driver
        // does not use indirect descriptors.
        let seg_max = u32::from(queue_size)
            .saturating_sub(2)
            .clamp(1, MAX_SEGMENTS);
        Geometry {
            capacity_sectors: capacity_sectors(size_bytes, logical_block_size),
            logical_block_size: lbs as u32,
            seg_max,
            num_queues: num_queues.max(1),
            read_only,
        }
    }

    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_sectors * SECTOR_SIZE
    }

    /// The virtio feature bits offered (device, ring and transport-independent
    /// bits; the vhost-user PROTOCOL_FEATURES bit is added by the vhost layer).
    pub fn features(&self) -> u64 {
        let mut bits = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_MQ,
        ]
        .iter()
        .fold(0u64, |acc, bit| acc | 1 << bit);
        if self.read_only {
            bits |= 1 << VIRTIO_BLK_F_RO;
        } else {
            // A read-only disk has no cache to configure and nothing to discard.
            bits |= 1 << VIRTIO_BLK_F_CONFIG_WCE
                | 1 << VIRTIO_BLK_F_DISCARD
                | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        bits
    }

    /// Serialises `struct virtio_blk_config` (little endian, as VERSION_1 requires).
    pub fn config_space(&self, writeback: bool) -> [u8; CONFIG_SPACE_SIZE] {
        let mut c = [0u8; CONFIG_SPACE_SIZE];
        let sectors_per_block = self.logical_block_size / SECTOR_SIZE as u32;
        put(&mut c, 0, &self.capacity_sectors.to_le_bytes());
        // 8: size_max (feature not offered), 12: seg_max.
        put(&mut c, 12, &self.seg_max.to_le_bytes());
        // 16..20: geometry (feature not offered).
        put(&mut c, 20, &self.logical_block_size.to_le_bytes());
        // 24: physical_block_exp = 0 (physical block = logical block),
        // 25: alignment_offset = 0, 26: min_io_size = 1 logical block,
        // 28: opt_io_size = 0 (no preference).
        put(&mut c, 26, &1u16.to_le_bytes());
        c[WRITEBACK_OFFSET] = u8::from(writeback);
        put(&mut c, 34, &self.num_queues.to_le_bytes());
        put(&mut c, 36, &MAX_RANGE_SECTORS.to_le_bytes());
        put(&mut c, 40, &MAX_RANGE_SEGMENTS.to_le_bytes());
        put(&mut c, 44, &sectors_per_block.to_le_bytes());
        put(&mut c, 48, &MAX_RANGE_SECTORS.to_le_bytes());
        put(&mut c, 52, &MAX_RANGE_SEGMENTS.to_le_bytes());
        // 56: write_zeroes_may_unmap.
        c[56] = 1;
        c
    }
}

/// The capacity in sectors of a disk of `size_bytes` served with
/// `logical_block_size` blocks: rounded down to a whole block, since a trailing
/// partial block cannot be addressed by a guest anyway.
pub fn capacity_sectors(size_bytes: u64, logical_block_size: u32) -> u64 {
    let lbs = u64::from(logical_block_size.max(SECTOR_SIZE as u32));
    size_bytes / lbs * lbs / SECTOR_SIZE
}

/// The disk's capacity as the guest is told it, in 512-byte sectors. One per
/// served disk, shared by the device model of every connection, so that an
/// online resize reaches the current connection (its requests and its next
/// GET_CONFIG) and every later one.
///
/// Only grows. Whoever grows it makes the node below accept the new range
/// first: a request this capacity admits is always inside the node.
#[derive(Debug)]
pub struct Capacity(AtomicU64);

impl Capacity {
    /// A capacity of `sectors`.
    pub fn new(sectors: u64) -> Self {
        Capacity(AtomicU64::new(sectors))
    }

    /// The current capacity in sectors.
    pub fn sectors(&self) -> u64 {
        // Acquire pairs with grow_to: a request that sees the new capacity
        // also sees the node's new size.
        self.0.load(Ordering::Acquire)
    }

    /// The current capacity in bytes.
    pub fn bytes(&self) -> u64 {
        self.sectors() * SECTOR_SIZE
    }

    /// Raises the capacity to `sectors` (a smaller value changes nothing).
    pub fn grow_to(&self, sectors: u64) {
        self.0.fetch_max(sectors, Ordering::AcqRel);
    }
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le32(c: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(c[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn config_space_describes_capacity_limits_and_cache_mode() {
        let g = Geometry::new(10 * 4096 + 100, 4096, 256, 4, false);
        let c = g.config_space(true);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 80);
        assert_eq!(le32(&c, 12), 254);
        assert_eq!(le32(&c, 20), 4096);
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 4);
        assert_eq!(le32(&c, 44), 8);
        assert_eq!(c[WRITEBACK_OFFSET], 1);
        assert_eq!(g.config_space(false)[WRITEBACK_OFFSET], 0);
        assert_eq!(c[56], 1);
    }

    #[test]
    fn capacity_rounds_down_to_a_block_and_only_grows() {
        assert_eq!(capacity_sectors(10 * 4096 + 100, 4096), 80);
        assert_eq!(capacity_sectors(1000, 512), 1);
        let c = Capacity::new(80);
        c.grow_to(160);
        c.grow_to(100);
        assert_eq!((c.sectors(), c.bytes()), (160, 160 * 512));
    }

    #[test]
    fn read_only_disk_offers_ro_and_no_write_features() {
        let ro = Geometry::new(1 << 20, 512, 128, 1, true).features();
        assert_ne!(ro & 1 << VIRTIO_BLK_F_RO, 0);
        assert_eq!(ro & 1 << VIRTIO_BLK_F_DISCARD, 0);
        assert_eq!(ro & 1 << VIRTIO_BLK_F_WRITE_ZEROES, 0);
        let rw = Geometry::new(1 << 20, 512, 128, 1, false).features();
        assert_eq!(rw & 1 << VIRTIO_BLK_F_RO, 0);
        assert_ne!(rw & 1 << VIRTIO_BLK_F_WRITE_ZEROES, 0);
        assert_ne!(rw & 1 << VIRTIO_RING_F_EVENT_IDX, 0);
    }
}
