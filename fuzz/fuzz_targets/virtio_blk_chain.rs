//! virtio-blk descriptor chains -> requests: a chain of up to 8 descriptors
//! (addresses, lengths and flags from the input, in or out of guest memory,
//! indirect included) over a header and data taken from the input, served by
//! the device model on an in-memory disk through `virtio_queue::mock`.
//! Nothing may panic; a completion never claims more bytes than the chain
//! made writable; the status byte, when written, is a virtio-blk status.

#![no_main]

use colo_blk::block::MemDev;
use colo_blk::virtio_blk::{VirtioBlk, Geometry, GuestMem, Scratch};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const MEM: u64 = 1 << 20;
/// Where the input's free bytes (header, data) are placed; the mock queue's
/// rings live below.
const CONTENT: u64 = 0x1_0000;
const DISK: u64 = 1 << 20;
const DESC_BYTES: usize = 7;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 8) + 1;
    if rest.len() < n * DESC_BYTES {
        return;
    }
    let (descs, content) = rest.split_at(n * DESC_BYTES);
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let content = &content[..content.len().min((MEM - CONTENT) as usize)];
    mem.write_slice(content, GuestAddress(CONTENT)).unwrap();

    let mut writable: u64 = 0;
    let raw: Vec<RawDescriptor> = descs
        .chunks(DESC_BYTES)
        .map(|d| {
            // Address: an offset into the content, or anywhere (even past
            // the end of memory) when the top bit is set.
            let a = u32::from_le_bytes([d[0], d[1], d[2], 0]);
            let addr = if d[2] & 0x80 != 0 {
                u64::from(a) << 4
            } else {
                CONTENT + u64::from(a & 0xffff)
            };
            let len = u32::from(u16::from_le_bytes([d[3], d[4]])) << (d[5] % 8);
            let flags = u16::from(d[6]) & (WRITE | INDIRECT);
            if flags & WRITE != 0 {
                writable += u64::from(len);
            }
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
        })
        .collect();
    let vq = MockSplitQueue::new(&mem, 16);
    let Ok(chain) = vq.build_desc_chain(&raw) else {
        return;
    };
    let read_only = descs[6] & 0x80 != 0;
    let dev = VirtioBlk::new(
        Arc::new(MemDev::new(DISK)),
        Geometry::new(DISK, 512, 16, 1, read_only),
        "fuzz-serial",
    );
    let mut scratch = Scratch::default();
    if let Some(c) = dev.handle_chain(&mem, chain, &mut scratch, None) {
        // Indirect tables can add writable bytes the top-level lengths do
        // not show; only direct chains are checked exactly.
        if raw
            .iter()
            .all(|d| SplitDescriptor::from(*d).flags() & INDIRECT == 0)
        {
            assert!(
                u64::from(c.used_len) <= writable,
                "used {} of {writable} writable bytes",
                c.used_len
            );
        }
    }
});
