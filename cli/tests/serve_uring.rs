//! `colo-blk serve` on the io_uring engine (`--direct`, or `--io-engine
//! uring` on the page cache), driven through libblkio with many requests in
//! flight: data lands, survives a SIGTERM under load, and every queue works.

mod common;

use common::{pattern, sparse_image, Client, ClientOptions, Daemon};
use std::os::unix::fs::FileExt;
use std::time::Duration;

const SIZE: u64 = 64 << 20;
const BLOCK: usize = 4096;

fn setup(extra: &[&str]) -> (tempfile::TempDir, Daemon) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    sparse_image(&img, SIZE);
    let d = Daemon::serve(dir.path(), &img, extra);
    (dir, d)
}

fn image(dir: &tempfile::TempDir) -> std::fs::File {
    std::fs::File::open(dir.path().join("disk.img")).unwrap()
}

/// The contents write `k` carries: its number, then a byte derived from it.
fn block_for(k: u64) -> Vec<u8> {
    let mut b = vec![(k % 251) as u8 + 1; BLOCK];
    b[..8].copy_from_slice(&k.to_le_bytes());
    b
}

/// Writes blocks `0..count` at queue depth `depth` through libblkio, block
/// `k` at `k * 4096` with [`block_for`]`(k)`; after `signal_after`
/// acknowledgements, calls `at_signal` once. Stops at the first error or when
/// the device stops answering (2 s). Returns the acknowledged block numbers.
fn write_at_depth(
    socket: &std::path::Path,
    count: u64,
    depth: usize,
    signal_after: usize,
    mut at_signal: impl FnMut(),
) -> Vec<u64> {
    let mut client = Client::connect_with(
        socket,
        ClientOptions {
            buf_per_queue: depth * BLOCK,
            ..ClientOptions::default()
        },
    )
    .unwrap();
    let q = client.queue(0);
    let mut done = Vec::new();
    let mut slot_block = vec![0u64; depth];
    let mut free: Vec<usize> = (0..depth).collect();
    let mut next = 0u64;
    let mut acked = Vec::new();
    let mut signalled = false;
    let mut in_flight = 0;
    loop {
        while next < count {
            let Some(slot) = free.pop() else { break };
            q.buf()[slot * BLOCK..(slot + 1) * BLOCK].copy_from_slice(&block_for(next));
            q.submit(true, next * BLOCK as u64, BLOCK, slot);
            slot_block[slot] = next;
            next += 1;
            in_flight += 1;
        }
        if in_flight == 0 {
            break;
        }
        if q.reap_within(&mut done, Duration::from_secs(2)).is_err() {
            break;
        }
        let mut failed = false;
        for d in &done {
            in_flight -= 1;
            free.push(d.slot);
            if d.ret == 0 {
                acked.push(slot_block[d.slot]);
            } else {
                failed = true;
            }
        }
        if !signalled && acked.len() >= signal_after {
            signalled = true;
            at_signal();
        }
        if failed {
            break;
        }
    }
    acked
}

#[test]
fn direct_io_at_queue_depth_32_lands_every_write() {
    let (dir, d) = setup(&["--direct"]);
    let count = 4096;
    let acked = write_at_depth(d.socket(), count, 32, usize::MAX, || {});
    assert_eq!(acked.len() as u64, count, "{}", d.log());
    assert!(d.log().contains("I/O engine: io_uring"), "{}", d.log());
    let f = image(&dir);
    let mut got = vec![0u8; BLOCK];
    for k in 0..count {
        f.read_exact_at(&mut got, k * BLOCK as u64).unwrap();
        assert!(got == block_for(k), "block {k}");
    }
}

#[test]
fn sigterm_under_load_keeps_every_acknowledged_write() {
    let (dir, mut d) = setup(&["--direct"]);
    // Far more writes than run before the signal: the daemon stops with
    // requests in flight.
    let acked = write_at_depth(d.socket(), 16_000, 32, 2000, || d.signal(libc::SIGTERM));
    assert!(d.wait_exit().success(), "{}", d.log());
    assert!(acked.len() >= 2000, "{} acknowledged", acked.len());
    let f = image(&dir);
    let mut got = vec![0u8; BLOCK];
    for &k in &acked {
        f.read_exact_at(&mut got, k * BLOCK as u64).unwrap();
        assert!(got == block_for(k), "acknowledged block {k} lost");
    }
}

#[test]
fn page_cache_with_io_uring_serves_data_discard_and_zeroes_on_two_queues() {
    let (dir, d) = setup(&["--io-engine", "uring", "--num-queues", "2"]);
    let mut c = Client::connect_with(
        d.socket(),
        ClientOptions {
            num_queues: 2,
            ..Default::default()
        },
    )
    .unwrap();
    for (i, q) in c.queues().iter_mut().enumerate() {
        let at = i as u64 * (4 << 20);
        let data = pattern(i as u64 + 40, 1 << 20);
        q.writev(at, &data, 5).unwrap();
        assert!(q.readv(at, 1 << 20, 3).unwrap() == data, "queue {i}");
    }
    let q = c.queue(1);
    q.discard(64 << 10, 64 << 10).unwrap();
    q.write_zeroes(256 << 10, 8192, false).unwrap();
    q.flush().unwrap();
    // Unaligned requests on the page cache need no bounce.
    let small = pattern(9, 1536);
    q.write(512, &small).unwrap();
    assert_eq!(q.read(1024, 512).unwrap(), small[512..1024]);
    let mut want = pattern(40, 1 << 20);
    want[512..2048].copy_from_slice(&small);
    want[64 << 10..128 << 10].fill(0);
    want[256 << 10..(256 << 10) + 8192].fill(0);
    c.flush().unwrap();
    let mut got = vec![0u8; 1 << 20];
    image(&dir).read_exact_at(&mut got, 0).unwrap();
    assert!(got == want, "file contents after discard/write-zeroes");
    assert!(d.log().contains("I/O engine: io_uring"), "{}", d.log());
}
