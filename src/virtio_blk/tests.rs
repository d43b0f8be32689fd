//! The device model driven through `virtio_queue::mock` chains: well-formed
//! requests of every type and every malformed-chain class a guest can produce.

use super::*;
use crate::block::{BlockDevExt, RawFile, RawFileOptions};
use std::sync::Arc;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: u64 = 0x100_0000;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const DISK: u64 = 1 << 20;
const UNTOUCHED: u8 = 0xee;

const W: u32 = VRING_DESC_F_WRITE;
const R: u32 = 0;

struct Rig {
    _dir: tempfile::TempDir,
    mem: Arc<GuestMem>,
    disk: Arc<RawFile>,
    dev: VirtioBlk,
}

impl Rig {
    fn new(read_only: bool) -> Rig {
        Self::with_queue_size(read_only, 256)
    }

    fn with_queue_size(read_only: bool, queue_size: u16) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let rw = RawFile::create(&path, DISK).unwrap();
        // A recognisable pattern, so that "unchanged" is observable.
        let pattern: Vec<u8> = (0..DISK).map(|i| (i % 251) as u8).collect();
        rw.write_at(0, &pattern).unwrap();
        let disk = if read_only {
            Arc::new(
                RawFile::open(
                    &path,
                    &RawFileOptions {
                        read_only: true,
                        ..Default::default()
                    },
                )
                .unwrap(),
            )
        } else {
            Arc::new(rw)
        };
        let geometry = Geometry::new(DISK, 512, queue_size, 1, read_only);
        let dev = VirtioBlk::new(disk.clone(), geometry, "colo-serial-0123");
        let mem = Arc::new(GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap());
        Rig {
            _dir: dir,
            mem,
            disk,
            dev,
        }
    }

    fn header(&self, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
    }

    /// Submits one chain built from (addr, len, flags) triples; returns the
    /// completion and the status byte in guest memory.
    fn run(&self, descs: &[(u64, u32, u32)]) -> (Completion, u8) {
        let (c, st) = self.run_with(descs, None);
        (c.expect("completed inline"), st)
    }

    /// Like `run`, with an offload that may take large reads.
    fn run_with(
        &self,
        descs: &[(u64, u32, u32)],
        offload: Option<&mut dyn Offload>,
    ) -> (Option<Completion>, u8) {
        let vq = MockSplitQueue::new(&*self.mem, 64);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(a, l, f)| RawDescriptor::from(SplitDescriptor::new(a, l, f as u16, 0)))
            .collect();
        let chain = vq.build_desc_chain(&raw).unwrap();
        let mut scratch = Scratch::default();
        let c = self
            .dev
            .handle_chain(&self.mem, chain, &mut scratch, offload);
        (c, self.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap())
    }

    fn disk_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.disk.read_at(offset, &mut buf).unwrap();
        buf
    }

    fn pattern(offset: u64, len: usize) -> Vec<u8> {
        (offset..offset + len as u64)
            .map(|i| (i % 251) as u8)
            .collect()
    }

    fn unchanged(&self) -> bool {
        self.disk_bytes(0, DISK as usize) == Self::pattern(0, DISK as usize)
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn write_then_read_moves_data_and_counts_used_bytes() {
    let rig = Rig::new(false);
    rig.mem
        .write_slice(&[0x5a; 4096], GuestAddress(DATA))
        .unwrap();
    rig.header(VIRTIO_BLK_T_OUT, 8);
    let (c, st) = rig.run(&[(HDR, 16, R), (DATA, 4096, R), (STATUS, 1, W)]);
    assert_eq!((st, c.used_len), (OK, 1));
    assert_eq!(rig.disk_bytes(4096, 4096), vec![0x5a; 4096]);

    rig.mem
        .write_slice(&[0u8; 4096], GuestAddress(DATA))
        .unwrap();
    rig.header(VIRTIO_BLK_T_IN, 8);
    let (c, st) = rig.run(&[(HDR, 16, R), (DATA, 4096, W), (STATUS, 1, W)]);
    assert_eq!((st, c.used_len), (OK, 4097));
    let mut back = vec![0u8; 4096];
    rig.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, vec![0x5a; 4096]);
}

#[test]
fn any_layout_split_header_and_status_sharing_the_data_descriptor() {
    let rig = Rig::new(false);
    rig.header(VIRTIO_BLK_T_IN, 2);
    // Header in two pieces; data and status in one writable descriptor whose
    // last byte is the status.
    let status_in_data = STATUS - 512;
    let (c, _) = rig.run(&[(HDR, 8, R), (HDR + 8, 8, R), (status_in_data, 513, W)]);
    assert_eq!(c.used_len, 513);
    assert_eq!(rig.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), OK);
    let mut back = vec![0u8; 512];
    rig.mem
        .read_slice(&mut back, GuestAddress(status_in_data))
        .unwrap();
    assert_eq!(back, Rig::pattern(1024, 512));

    // Header and write data in one readable descriptor.
    rig.mem
        .write_slice(&[0x77; 512], GuestAddress(HDR + 16))
        .unwrap();
    rig.header(VIRTIO_BLK_T_OUT, 4);
    let (c, st) = rig.run(&[(HDR, 16 + 512, R), (STATUS, 1, W)]);
    assert_eq!((st, c.used_len), (OK, 1));
    assert_eq!(rig.disk_bytes(2048, 512), vec![0x77; 512]);
}

#[test]
fn sector_past_the_end_is_ioerr_and_writes_nothing() {
    let rig = Rig::new(false);
    let last = DISK / 512 - 1;
    rig.header(VIRTIO_BLK_T_OUT, last);
    let (c, st) = rig.run(&[(HDR, 16, R), (DATA, 1024, R), (STATUS, 1, W)]);
    assert_eq!((st, c.used_len), (IOERR, 1));
    // Sector numbers whose byte offset overflows u64.
    rig.header(VIRTIO_BLK_T_OUT, u64::MAX / 256);
    let (_, st) = rig.run(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
    assert_eq!(st, IOERR);
    rig.header(VIRTIO_BLK_T_IN, DISK / 512);
    let (c, st) = rig.run(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    assert_eq!((st, c.used_len), (IOERR, 1));
    assert!(rig.unchanged());
}

#[test]
fn a_grown_capacity_admits_requests_past_the_old_end_and_shows_in_the_config() {
    let rig = Rig::new(false);
    let capacity = Arc::clone(rig.dev.capacity());
    rig.header(VIRTIO_BLK_T_OUT, DISK / 512);
    let (_, st) = rig.run(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
    assert_eq!(st, IOERR);
    // What a resize does: the node first, then the capacity.
    crate::block::BlockDev::grow(rig.disk.as_ref(), 2 * DISK).unwrap();
    capacity.grow_to(2 * DISK / 512);
    let sectors = u64::from_le_bytes(rig.dev.config_space()[0..8].try_into().unwrap());
    assert_eq!(sectors, 2 * DISK / 512);
    rig.mem
        .write_slice(&[0x5a; 512], GuestAddress(DATA))
        .unwrap();
    let (_, st) = rig.run(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
    assert_eq!(st, OK);
    assert_eq!(rig.disk_bytes(DISK, 512), vec![0x5a; 512]);
    rig.header(VIRTIO_BLK_T_IN, 2 * DISK / 512 - 1);
    let (_, st) = rig.run(&[(HDR, 16, R), (DATA, 1024, W), (STATUS, 1, W)]);
    assert_eq!(st, IOERR, "still bounded by the new capacity");
}

#[test]
fn length_not_a_multiple_of_512_is_ioerr() {
    let rig = Rig::new(false);
    rig.header(VIRTIO_BLK_T_OUT, 0);
    let (_, st) = rig.run(&[(HDR, 16, R), (DATA, 700, R), (STATUS, 1, W)]);
    assert_eq!(st, IOERR);
    rig.header(VIRTIO_BLK_T_IN, 0);
    let (c, st) = rig.run(&[
        (HDR, 16, R),
        (DATA, 512, W),
        (DATA + 512, 100, W),
        (STATUS, 1, W),
    ]);
    assert_eq!((st, c.used_len), (IOERR, 1));
    assert!(rig.unchanged());
}

#[test]
fn wrong_descriptor_direction_is_ioerr() {
    let rig = Rig::new(false);
    // A read whose data buffer is device-readable.
    rig.header(VIRTIO_BLK_T_IN, 0);
    let (_, st) = rig.run(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
    assert_eq!(st, IOERR);
    // A write whose data buffer is device-writable.
    rig.header(VIRTIO_BLK_T_OUT, 0);
    let (_, st) = rig.run(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    assert_eq!(st, IOERR);
    // A device-readable descriptor after a device-writable one.
    rig.header(VIRTIO_BLK_T_OUT, 0);
    let (_, st) = rig.run(&[
        (HDR, 16, R),
        (DATA, 512, W),
        (DATA + 512, 512, R),
        (STATUS, 1, W),
    ]);
    assert_eq!(st, IOERR);
    // A header in device-writable memory.
    rig.header(VIRTIO_BLK_T_OUT, 0);
    let (_, st) = rig.run(&[(HDR, 16, W), (STATUS, 1, W)]);
    assert_eq!(st, IOERR);
    assert!(rig.unchanged());
}

#[test]
fn missing_or_read_only_status_drops_the_chain_without_executing_it() {
    let rig = Rig::new(false);
    rig.mem
        .write_slice(&[0x11; 512], GuestAddress(DATA))
        .unwrap();
    rig.header(VIRTIO_BLK_T_OUT, 0);
    // No status descriptor at all.
    let (c, st) = rig.run(&[(HDR, 16, R), (DATA, 512, R)]);
    assert_eq!((c.used_len, st), (0, UNTOUCHED));
    // A read-only status descriptor.
    let (c, st) = rig.run(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, R)]);
    assert_eq!((c.used_len, st), (0, UNTOUCHED));
    // An empty status descriptor.
    let (c, st) = rig.run(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 0, W)]);
    assert_eq!((c.used_len, st), (0, UNTOUCHED));
    // A status byte outside guest memory.
    let (c, _) = rig.run(&[(HDR, 16, R), (DATA, 512, R), (MEM_SIZE + 4096, 1, W)]);
    assert_eq!(c.used_len, 0);
    assert!(rig.unchanged());
}

#[test]
fn zero_length_data_is_ioerr() {
    let rig = Rig::new(false);
    rig.header(VIRTIO_BLK_T_IN, 0);
    let (c, st) = rig.run(&[(HDR, 16, R), (STATUS, 1, W)]);
    assert_eq!((st, c.used_len), (IOERR, 1));
    rig.header(VIRTIO_BLK_T_OUT, 0);
    let (_, st) = rig.run(&[(HDR, 16, R), (DATA, 0, R), (STATUS, 1, W)]);
    assert_eq!(st, IOERR);
    assert!(rig.unchanged());
}

#[test]
fn more_segments_than_seg_max_is_ioerr() {
    // Queue size 16 advertises seg_max 14.
    let rig = Rig::with_queue_size(false, 16);
    assert_eq!(rig.dev.geometry().seg_max, 14);
    let mut descs = vec![(HDR, 16, R)];
    descs.extend((0..15u64).map(|i| (DATA + i * 512, 512, R)));
    descs.push((STATUS, 1, W));
    rig.header(VIRTIO_BLK_T_OUT, 0);
    let (_, st) = rig.run(&descs);
    assert_eq!(st, IOERR);
    // Exactly seg_max segments is fine.
    descs.remove(15);
    rig.mem
        .write_slice(&[0x42; 14 * 512], GuestAddress(DATA))
        .unwrap();
    rig.header(VIRTIO_BLK_T_OUT, 0);
    let (_, st) = rig.run(&descs);
    assert_eq!(st, OK);
    assert_eq!(rig.disk_bytes(0, 14 * 512), vec![0x42; 14 * 512]);
    // Far more descriptors than kept for parsing.
    let mut long = vec![(HDR, 16, R)];
    long.extend((0..40u64).map(|i| (DATA + i * 512, 512, W)));
    long.push((STATUS, 1, W));
    rig.header(VIRTIO_BLK_T_IN, 0);
    let (c, st) = rig.run(&long);
    assert_eq!((st, c.used_len), (IOERR, 1));
}

#[test]
fn writes_discards_and_zeroes_on_a_read_only_disk_are_ioerr() {
    let rig = Rig::new(true);
    rig.header(VIRTIO_BLK_T_OUT, 0);
    let (_, st) = rig.run(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
    assert_eq!(st, IOERR);
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        write_range(&rig, DATA, 0, 8, 0);
        rig.header(kind, 0);
        let (_, st) = rig.run(&[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]);
        assert_eq!(st, IOERR, "type {kind}");
    }
    // Reads and flushes still work.
    rig.header(VIRTIO_BLK_T_IN, 0);
    let (c, st) = rig.run(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    assert_eq!((st, c.used_len), (OK, 513));
    rig.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(rig.run(&[(HDR, 16, R), (STATUS, 1, W)]).1, OK);
    assert!(rig.unchanged());
}

#[test]
fn buffer_outside_guest_memory_is_ioerr() {
    let rig = Rig::new(false);
    rig.header(VIRTIO_BLK_T_IN, 0);
    let (c, st) = rig.run(&[(HDR, 16, R), (MEM_SIZE - 512, 1024, W), (STATUS, 1, W)]);
    assert_eq!((st, c.used_len), (IOERR, 1));
    rig.header(VIRTIO_BLK_T_OUT, 0);
    let (_, st) = rig.run(&[(HDR, 16, R), (u64::MAX - 100, 512, R), (STATUS, 1, W)]);
    assert_eq!(st, IOERR);
    // A header outside guest memory.
    let (_, st) = rig.run(&[(MEM_SIZE, 16, R), (STATUS, 1, W)]);
    assert_eq!(st, IOERR);
    assert!(rig.unchanged());
}

#[test]
fn short_header_is_ioerr() {
    let rig = Rig::new(false);
    rig.header(VIRTIO_BLK_T_FLUSH, 0);
    let (c, st) = rig.run(&[(HDR, 8, R), (STATUS, 1, W)]);
    assert_eq!((st, c.used_len), (IOERR, 1));
}

#[test]
fn unknown_request_types_are_unsupp() {
    let rig = Rig::new(false);
    for kind in [
        VIRTIO_BLK_T_SCSI_CMD,
        VIRTIO_BLK_T_SECURE_ERASE,
        99,
        u32::MAX,
    ] {
        rig.header(kind, 0);
        let (c, st) = rig.run(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        assert_eq!((st, c.used_len), (UNSUPP, 1), "type {kind}");
    }
}

#[test]
fn get_id_returns_the_serial_zero_padded_to_20_bytes() {
    let rig = Rig::new(false);
    rig.mem
        .write_slice(&[0xff; 20], GuestAddress(DATA))
        .unwrap();
    rig.header(VIRTIO_BLK_T_GET_ID, 0);
    let (c, st) = rig.run(&[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]);
    assert_eq!((st, c.used_len), (OK, 21));
    let mut id = [0u8; 20];
    rig.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"colo-serial-0123\0\0\0\0");
    // A shorter buffer gets a prefix; the used length says how much.
    rig.header(VIRTIO_BLK_T_GET_ID, 0);
    let (c, st) = rig.run(&[(HDR, 16, R), (DATA + 100, 4, W), (STATUS, 1, W)]);
    assert_eq!((st, c.used_len), (OK, 5));
    // No buffer at all.
    rig.header(VIRTIO_BLK_T_GET_ID, 0);
    let (_, st) = rig.run(&[(HDR, 16, R), (STATUS, 1, W)]);
    assert_eq!(st, IOERR);
}

fn write_range(rig: &Rig, at: u64, sector: u64, sectors: u32, flags: u32) {
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&sector.to_le_bytes());
    seg[8..12].copy_from_slice(&sectors.to_le_bytes());
    seg[12..16].copy_from_slice(&flags.to_le_bytes());
    rig.mem.write_slice(&seg, GuestAddress(at)).unwrap();
}

#[test]
fn discard_and_write_zeroes_zero_exactly_their_ranges() {
    let rig = Rig::new(false);
    // Two discard segments in one request.
    write_range(&rig, DATA, 8, 8, 0);
    write_range(&rig, DATA + 16, 64, 16, 0);
    rig.header(VIRTIO_BLK_T_DISCARD, 0);
    let (c, st) = rig.run(&[(HDR, 16, R), (DATA, 32, R), (STATUS, 1, W)]);
    assert_eq!((st, c.used_len), (OK, 1));
    assert_eq!(rig.disk_bytes(4096, 4096), vec![0; 4096]);
    assert_eq!(rig.disk_bytes(32768, 8192), vec![0; 8192]);
    assert_eq!(rig.disk_bytes(0, 4096), Rig::pattern(0, 4096));
    assert_eq!(rig.disk_bytes(8192, 4096), Rig::pattern(8192, 4096));

    for flags in [0, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP] {
        let sector = 200 + u64::from(flags) * 10;
        write_range(&rig, DATA, sector, 3, flags);
        rig.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let (_, st) = rig.run(&[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]);
        assert_eq!(st, OK);
        assert_eq!(rig.disk_bytes(sector * 512, 1536), vec![0; 1536]);
        assert_eq!(
            rig.disk_bytes(sector * 512 + 1536, 512),
            Rig::pattern(sector * 512 + 1536, 512)
        );
    }
}

#[test]
fn malformed_discard_lists_are_refused_without_partial_effect() {
    let rig = Rig::new(false);
    // UNMAP is meaningless for discard; reserved bits are refused everywhere.
    write_range(&rig, DATA, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    rig.header(VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(
        rig.run(&[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]).1,
        UNSUPP
    );
    write_range(&rig, DATA, 0, 8, 4);
    rig.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    assert_eq!(
        rig.run(&[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]).1,
        UNSUPP
    );
    // A payload that is not whole segments, and none at all.
    rig.header(VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(
        rig.run(&[(HDR, 16, R), (DATA, 15, R), (STATUS, 1, W)]).1,
        IOERR
    );
    assert_eq!(rig.run(&[(HDR, 16, R), (STATUS, 1, W)]).1, IOERR);
    // A good segment followed by one past the end: nothing is applied.
    write_range(&rig, DATA, 0, 8, 0);
    write_range(&rig, DATA + 16, DISK / 512 - 4, 8, 0);
    rig.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    assert_eq!(
        rig.run(&[(HDR, 16, R), (DATA, 32, R), (STATUS, 1, W)]).1,
        IOERR
    );
    // More segments than max_discard_seg.
    for i in 0..33u64 {
        write_range(&rig, DATA + 16 * i, i * 8, 8, 0);
    }
    rig.header(VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(
        rig.run(&[(HDR, 16, R), (DATA, 33 * 16, R), (STATUS, 1, W)])
            .1,
        UNSUPP
    );
    // A device-writable payload.
    write_range(&rig, DATA, 0, 8, 0);
    rig.header(VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(
        rig.run(&[(HDR, 16, R), (DATA, 16, W), (STATUS, 1, W)]).1,
        IOERR
    );
    assert!(rig.unchanged());
}

#[test]
fn only_the_writeback_byte_of_the_config_space_is_writable() {
    let rig = Rig::new(false);
    assert_eq!(rig.dev.config_space()[32], 1);
    assert!(rig.dev.write_config(32, &[0]));
    assert_eq!(rig.dev.config_space()[32], 0);
    assert!(!rig.dev.write_config(0, &[0; 8]));
    assert!(!rig.dev.write_config(33, &[1]));
    // Writes through, then still serves writes correctly.
    rig.mem
        .write_slice(&[0x31; 512], GuestAddress(DATA))
        .unwrap();
    rig.header(VIRTIO_BLK_T_OUT, 1);
    assert_eq!(
        rig.run(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]).1,
        OK
    );
    assert_eq!(rig.disk_bytes(512, 512), vec![0x31; 512]);
    rig.dev.reset();
    assert_eq!(rig.dev.config_space()[32], 1);
    let ro = Rig::new(true);
    assert!(!ro.dev.write_config(32, &[0]));
}

#[test]
fn a_pass_completes_every_available_chain_in_order() {
    let rig = Rig::new(false);
    let vq = MockSplitQueue::new(&*rig.mem, 16);
    rig.header(VIRTIO_BLK_T_IN, 0);
    // Three chains: read (3 descriptors), flush (2), bad type (3).
    let d = |a: u64, l: u32, f: u32, next: u16| {
        let f = f | if next != 0 { VRING_DESC_F_NEXT } else { 0 };
        RawDescriptor::from(SplitDescriptor::new(a, l, f as u16, next))
    };
    let descs = [
        d(HDR, 16, R, 1),
        d(DATA, 512, W, 2),
        d(STATUS, 1, W, 0),
        d(HDR + 64, 16, R, 4),
        d(STATUS + 8, 1, W, 0),
        d(HDR + 128, 16, R, 6),
        d(DATA + 4096, 512, W, 7),
        d(STATUS + 16, 1, W, 0),
    ];
    let mut flush = [0u8; 16];
    flush[0..4].copy_from_slice(&VIRTIO_BLK_T_FLUSH.to_le_bytes());
    rig.mem.write_slice(&flush, GuestAddress(HDR + 64)).unwrap();
    let mut bad = [0u8; 16];
    bad[0..4].copy_from_slice(&77u32.to_le_bytes());
    rig.mem.write_slice(&bad, GuestAddress(HDR + 128)).unwrap();
    vq.add_desc_chains(&descs, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    let mut scratch = Scratch::default();
    assert_eq!(
        rig.dev.process_queue(&mut q, &rig.mem, &mut scratch, None),
        3
    );
    assert_eq!(q.next_used(), 3);
    let used: Vec<(u32, u32)> = (0..3)
        .map(|i| {
            let e = vq.used().ring().ref_at(i).unwrap().load();
            (e.id(), e.len())
        })
        .collect();
    assert_eq!(used, vec![(0, 513), (3, 1), (5, 1)]);
    let st = |a| rig.mem.read_obj::<u8>(GuestAddress(a)).unwrap();
    assert_eq!(
        (st(STATUS), st(STATUS + 8), st(STATUS + 16)),
        (OK, OK, UNSUPP)
    );
    // Nothing more to do.
    assert_eq!(
        rig.dev.process_queue(&mut q, &rig.mem, &mut scratch, None),
        0
    );
}

#[test]
fn an_avail_index_far_ahead_of_the_ring_is_survived() {
    let rig = Rig::new(false);
    let vq = MockSplitQueue::new(&*rig.mem, 16);
    vq.avail().idx().store(1000);
    let mut q: Queue = vq.create_queue().unwrap();
    let mut scratch = Scratch::default();
    assert_eq!(
        rig.dev.process_queue(&mut q, &rig.mem, &mut scratch, None),
        0
    );
}

/// Collects deferred requests instead of running them; takes writes only when
/// `writes` is set.
struct Collect {
    mem: Arc<GuestMem>,
    reads: Vec<Deferred>,
    writes: bool,
}

impl Offload for Collect {
    fn memory(&self) -> Arc<GuestMem> {
        self.mem.clone()
    }

    fn takes_writes(&self) -> bool {
        self.writes
    }

    fn submit(&mut self, read: Deferred) {
        self.reads.push(read);
    }
}

#[test]
fn large_reads_are_deferred_and_complete_when_run() {
    let rig = Rig::new(false);
    let mut off = Collect {
        mem: rig.mem.clone(),
        reads: Vec::new(),
        writes: false,
    };
    let len = OFFLOAD_MIN as u32 * 2;
    rig.header(VIRTIO_BLK_T_IN, 16);
    let (c, st) = rig.run_with(
        &[(HDR, 16, R), (DATA, len, W), (STATUS, 1, W)],
        Some(&mut off),
    );
    assert_eq!((c, st), (None, UNTOUCHED), "handed over, not completed");
    assert_eq!(off.reads.len(), 1);
    let read = off.reads.pop().unwrap();
    let c = read.run(&rig.dev);
    assert_eq!(c.used_len, len + 1);
    assert_eq!(rig.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), OK);
    let mut back = vec![0u8; len as usize];
    rig.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back == Rig::pattern(16 * 512, len as usize));

    // Small reads, and large reads that fail validation, complete inline.
    rig.header(VIRTIO_BLK_T_IN, 0);
    let (c, st) = rig.run_with(
        &[(HDR, 16, R), (DATA, 4096, W), (STATUS, 1, W)],
        Some(&mut off),
    );
    assert_eq!((c.map(|c| c.used_len), st), (Some(4097), OK));
    rig.header(VIRTIO_BLK_T_IN, DISK / 512 - 8);
    let (c, st) = rig.run_with(
        &[(HDR, 16, R), (DATA, len, W), (STATUS, 1, W)],
        Some(&mut off),
    );
    assert_eq!((c.map(|c| c.used_len), st), (Some(1), IOERR));
    rig.header(VIRTIO_BLK_T_IN, 0);
    let (c, st) = rig.run_with(
        &[(HDR, 16, R), (MEM_SIZE - 4096, len, W), (STATUS, 1, W)],
        Some(&mut off),
    );
    assert_eq!((c.map(|c| c.used_len), st), (Some(1), IOERR));
    // Writes are not deferred unless the offload takes writes.
    rig.header(VIRTIO_BLK_T_OUT, 0);
    let (c, st) = rig.run_with(
        &[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)],
        Some(&mut off),
    );
    assert_eq!((c.map(|c| c.used_len), st), (Some(1), OK));
    assert!(off.reads.is_empty());
}

#[test]
fn writes_discards_and_zeroes_are_deferred_when_the_offload_takes_writes() {
    let rig = Rig::new(false);
    let mut off = Collect {
        mem: rig.mem.clone(),
        reads: Vec::new(),
        writes: true,
    };
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8 + 1).collect();
    rig.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    rig.header(VIRTIO_BLK_T_OUT, 8);
    let (c, st) = rig.run_with(
        &[(HDR, 16, R), (DATA, 4096, R), (STATUS, 1, W)],
        Some(&mut off),
    );
    assert_eq!((c, st), (None, UNTOUCHED), "handed over, not completed");
    let write = off.reads.pop().unwrap();
    assert!(!write.is_read());
    assert_eq!(rig.disk_bytes(4096, 4096), Rig::pattern(4096, 4096));
    assert_eq!(write.run(&rig.dev).used_len, 1);
    assert_eq!(rig.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), OK);
    assert_eq!(rig.disk_bytes(4096, 4096), data);

    write_range(
        &rig,
        DATA + 0x1000,
        64,
        8,
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    );
    rig.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let (c, _) = rig.run_with(
        &[(HDR, 16, R), (DATA + 0x1000, 16, R), (STATUS, 1, W)],
        Some(&mut off),
    );
    assert_eq!(c, None);
    assert_eq!(off.reads.pop().unwrap().run(&rig.dev).used_len, 1);
    assert_eq!(rig.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), OK);
    assert_eq!(rig.disk_bytes(64 * 512, 4096), vec![0; 4096]);

    // Invalid requests are refused inline; flushes never wait in the offload.
    rig.header(VIRTIO_BLK_T_OUT, DISK / 512);
    let (c, st) = rig.run_with(
        &[(HDR, 16, R), (DATA, 4096, R), (STATUS, 1, W)],
        Some(&mut off),
    );
    assert_eq!((c.map(|c| c.used_len), st), (Some(1), IOERR));
    rig.header(VIRTIO_BLK_T_FLUSH, 0);
    let (c, st) = rig.run_with(&[(HDR, 16, R), (STATUS, 1, W)], Some(&mut off));
    assert_eq!((c.map(|c| c.used_len), st), (Some(1), OK));
    assert!(off.reads.is_empty());
}

#[test]
fn a_truncated_write_whose_first_writable_descriptor_is_the_empty_last_kept_one_is_ioerr() {
    // seg_max 14 keeps 17 descriptors: the header and 15 readable ones, then
    // an empty writable one as the 17th; more follow. The write path looks
    // for writable payload before it knows the chain was cut, and that empty
    // descriptor's length must not go below zero (a debug build panicked).
    let rig = Rig::with_queue_size(false, 16);
    let mut descs = vec![(HDR, 16, R)];
    descs.extend((0..15u64).map(|i| (DATA + i * 512, 512, R)));
    descs.push((DATA + 15 * 512, 0, W));
    descs.extend((16..20u64).map(|i| (DATA + i * 512, 512, W)));
    descs.push((STATUS, 1, W));
    rig.header(VIRTIO_BLK_T_OUT, 0);
    let (c, st) = rig.run(&descs);
    assert_ne!(st, OK);
    assert!(c.used_len <= 1, "nothing but the status written");
    assert!(rig.unchanged());
}

#[test]
fn a_truncated_chain_ending_in_a_zero_length_writable_descriptor_is_ioerr() {
    // seg_max 14 keeps 17 descriptors; the 17th kept one is writable and
    // empty, and more follow (the status last). Every request type must answer
    // without arithmetic on that empty descriptor's length going below zero.
    let rig = Rig::with_queue_size(false, 16);
    for kind in [
        VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_GET_ID,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
    ] {
        let mut descs = vec![(HDR, 16, R)];
        descs.extend((0..15u64).map(|i| (DATA + i * 512, 512, W)));
        descs.push((DATA + 15 * 512, 0, W));
        descs.extend((16..20u64).map(|i| (DATA + i * 512, 512, W)));
        descs.push((STATUS, 1, W));
        rig.header(kind, 0);
        let (c, st) = rig.run(&descs);
        assert_ne!(st, OK, "type {kind}");
        assert!(
            c.used_len <= 1,
            "type {kind}: nothing but the status written"
        );
    }
    assert!(rig.unchanged());
}
