//! `colo-blk serve` driven through libblkio: data, flush, discard, write-zeroes,
//! capacity and bounds, as a VMM's virtio-blk driver would see them.
//!
//! GET_ID is not here: libblkio has no request for it. It is covered by the
//! virtio_blk unit tests (`get_id_returns_the_serial_zero_padded_to_20_bytes`)
//! and by the QEMU guest tests (the `disk` case reads the serial in Linux).

mod common;

use colo_blk_testkit::XorShift;
use common::{pattern, sparse_image, Client, Daemon};
use std::fs;
use std::os::unix::fs::FileExt;

const SIZE: u64 = 64 << 20;

fn setup(extra: &[&str]) -> (tempfile::TempDir, Daemon) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    sparse_image(&img, SIZE);
    let d = Daemon::serve(dir.path(), &img, extra);
    (dir, d)
}

fn file_bytes(dir: &tempfile::TempDir, offset: u64, len: usize) -> Vec<u8> {
    let f = fs::File::open(dir.path().join("disk.img")).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn capacity_is_the_image_size() {
    let (_dir, d) = setup(&[]);
    let c = Client::connect(d.socket()).unwrap();
    assert_eq!(c.capacity, SIZE);
}

#[test]
fn random_writes_read_back_through_the_device_and_land_in_the_file() {
    let (dir, d) = setup(&[]);
    let mut c = Client::connect(d.socket()).unwrap();
    // Deterministic "random" offsets and sizes from 512 B to 1 MiB.
    let mut rng = XorShift::new(0x2545_f491_4f6c_dd1d);
    let mut next = || rng.next();
    let mut written = Vec::new();
    for i in 0..40u64 {
        let sectors = 1 + next() % 2048;
        let len = (sectors * 512) as usize;
        let offset = next() % (SIZE / 512 - sectors) * 512;
        let data = pattern(i, len);
        let q = c.queue(0);
        if i % 3 == 0 {
            q.writev(offset, &data, 1 + (i as usize % 7)).unwrap();
        } else {
            q.write(offset, &data).unwrap();
        }
        let back = if i % 2 == 0 {
            q.readv(offset, len, 3).unwrap()
        } else {
            q.read(offset, len).unwrap()
        };
        assert_eq!(back, data, "read-back of write {i} at {offset}+{len}");
        written.push((offset, data));
    }
    c.flush().unwrap();
    // Later writes may overlap earlier ones: check the file against the last
    // writer of each byte, replaying in order into a model.
    let mut model = vec![0u8; SIZE as usize];
    for (offset, data) in &written {
        model[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
    }
    assert!(
        file_bytes(&dir, 0, SIZE as usize) == model,
        "image differs from the model"
    );
}

#[test]
fn discard_and_write_zeroes_read_back_as_zeroes_and_leave_neighbours() {
    let (dir, d) = setup(&[]);
    let mut c = Client::connect(d.socket()).unwrap();
    let data = pattern(7, 1 << 20);
    c.write(0, &data).unwrap();
    c.discard(64 << 10, 64 << 10).unwrap();
    c.write_zeroes(256 << 10, 8192, false).unwrap();
    c.write_zeroes(512 << 10, 4096, true).unwrap();
    let back = c.read(0, 1 << 20).unwrap();
    let mut want = data.clone();
    want[64 << 10..128 << 10].fill(0);
    want[256 << 10..(256 << 10) + 8192].fill(0);
    want[512 << 10..(512 << 10) + 4096].fill(0);
    assert!(back == want, "device contents after discard/write-zeroes");
    c.flush().unwrap();
    assert!(file_bytes(&dir, 0, 1 << 20) == want, "file contents");
}

#[test]
fn requests_past_the_end_or_unaligned_fail_with_eio_and_change_nothing() {
    let (dir, d) = setup(&[]);
    let mut c = Client::connect(d.socket()).unwrap();
    let q = c.queue(0);
    // libblkio does not check bounds or read lengths itself: these reach the device.
    let eio = libc::EIO;
    assert_eq!(q.read(SIZE, 512).unwrap_err().errno, eio);
    assert_eq!(q.write(SIZE - 512, &[1u8; 1024]).unwrap_err().errno, eio);
    assert_eq!(q.read(0, 700).unwrap_err().errno, eio);
    assert_eq!(q.discard(SIZE - 4096, 8192).unwrap_err().errno, eio);
    // The queue keeps working afterwards.
    q.write(SIZE - 512, &[9u8; 512]).unwrap();
    assert_eq!(q.read(SIZE - 512, 512).unwrap(), vec![9u8; 512]);
    q.flush().unwrap();
    assert_eq!(file_bytes(&dir, SIZE - 1024, 512), vec![0u8; 512]);
    assert_eq!(
        fs::metadata(dir.path().join("disk.img")).unwrap().len(),
        SIZE
    );
}

#[test]
fn serve_creates_a_missing_image_with_size() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("new.img");
    let d = Daemon::serve(dir.path(), &img, &["--size", "8M"]);
    let mut c = Client::connect(d.socket()).unwrap();
    assert_eq!(c.capacity, 8 << 20);
    c.write(4096, &[3u8; 4096]).unwrap();
    assert_eq!(fs::metadata(&img).unwrap().len(), 8 << 20);
}

#[test]
fn logical_block_size_4096_is_advertised() {
    let (_dir, d) = setup(&["--logical-block-size", "4096"]);
    let c = Client::connect(d.socket()).unwrap();
    assert_eq!(c.blkio().get_i32("request-alignment").unwrap(), 4096);
}

#[test]
fn direct_io_serves_aligned_and_unaligned_requests() {
    let (dir, d) = setup(&["--direct"]);
    let mut c = Client::connect(d.socket()).unwrap();
    let big = pattern(11, 256 << 10);
    c.write(1 << 20, &big).unwrap();
    // 512-byte requests at offsets that are not 4 KiB aligned take the
    // aligned bounce path under O_DIRECT.
    let small = pattern(12, 1536);
    c.write((1 << 20) + 512, &small).unwrap();
    let mut want = big.clone();
    want[512..2048].copy_from_slice(&small);
    assert!(c.read(1 << 20, 256 << 10).unwrap() == want);
    assert_eq!(c.read((1 << 20) + 1024, 512).unwrap(), small[512..1024]);
    c.flush().unwrap();
    assert!(file_bytes(&dir, 1 << 20, 256 << 10) == want);
}
