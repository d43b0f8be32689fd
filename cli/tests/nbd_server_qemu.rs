//! colo-blk's NBD server driven by QEMU's own NBD client (qemu-io, qemu-img,
//! qemu-nbd).

mod nbd_util;

use colo_blk::block::testing::{Intercept, Op};
use colo_blk::block::{BlockError, Refusal};
use colo_blk::nbd::{NbdAddr, Server, ServerOptions};
use nbd_util::*;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

#[test]
fn qemu_io_patterns_written_over_nbd_read_back_over_nbd_and_on_disk() {
    let s = Served::raw(16 << 20);
    let uri = s.uri();
    qemu_io(
        &uri,
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 1M 4k",
            "write -P 0x33 1028k 512",
            "write -P 0x44 15M 1M",
            "aio_write -P 0x55 4M 128k",
            "aio_write -P 0x66 5M 128k",
            "aio_flush",
        ],
    );
    qemu_io(
        &uri,
        &[
            "read -P 0x11 0 64k",
            "read -P 0x22 1M 4k",
            "read -P 0x33 1028k 512",
            "read -P 0 1053184 1k",
            "read -P 0x44 15M 1M",
            "read -P 0x55 4M 128k",
            "read -P 0x66 5M 128k",
            "read -P 0 2M 1M",
        ],
    );
    let disk = s.image_bytes();
    assert!(disk[..64 << 10].iter().all(|&b| b == 0x11));
    assert!(disk[1 << 20..(1 << 20) + 4096].iter().all(|&b| b == 0x22));
    assert!(disk[1028 << 10..(1028 << 10) + 512]
        .iter()
        .all(|&b| b == 0x33));
    assert!(disk[15 << 20..].iter().all(|&b| b == 0x44));
    assert!(disk[4 << 20..(4 << 20) + (128 << 10)]
        .iter()
        .all(|&b| b == 0x55));
    assert!(disk[2 << 20..3 << 20].iter().all(|&b| b == 0));
}

#[test]
fn a_wrong_pattern_is_detected_by_the_read_back_check() {
    // Guards the helper: a mismatch must fail, or the tests above prove nothing.
    let s = Served::raw(1 << 20);
    qemu_io(&s.uri(), &["write -P 0x11 0 4k"]);
    let out = run(
        "qemu-io",
        &["-f", "raw", "-c", "read -P 0x12 0 4k", &s.uri()],
    );
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Pattern verification failed"), "{text}");
}

#[test]
fn qemu_img_convert_of_64mib_into_the_export_gives_an_identical_disk() {
    let s = Served::raw(64 << 20);
    let src = s.dir.path().join("src.img");
    // Data, holes and explicit zeroes mixed.
    let mut content = vec![0u8; 64 << 20];
    for (i, chunk) in content.chunks_mut(1 << 20).enumerate() {
        if i % 3 != 1 {
            chunk.copy_from_slice(&pattern(i as u64 + 1, 1 << 20));
        }
    }
    std::fs::write(&src, &content).unwrap();
    // Pre-dirty the export where the source has holes: convert must zero them.
    qemu_io(&s.uri(), &["write -P 0xee 1M 1M", "write -P 0xee 61M 1M"]);
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &s.uri(),
        ],
    );
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &s.uri(),
        ],
    );
    assert!(s.image_bytes() == content, "image differs from source");
}

#[test]
fn qemu_img_compare_notices_a_difference() {
    let s = Served::raw(1 << 20);
    let src = s.dir.path().join("src.img");
    std::fs::write(&src, vec![0u8; 1 << 20]).unwrap();
    qemu_io(&s.uri(), &["write -P 0x01 8k 512"]);
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &s.uri(),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "compare must report a difference"
    );
}

#[derive(Debug, PartialEq)]
struct MapEntry {
    start: u64,
    length: u64,
    data: bool,
    zero: bool,
}

fn map(uri: &str) -> Vec<MapEntry> {
    let text = run_ok("qemu-img", &["map", "--output=json", "-f", "raw", uri]);
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json.as_array()
        .unwrap()
        .iter()
        .map(|e| MapEntry {
            start: e["start"].as_u64().unwrap(),
            length: e["length"].as_u64().unwrap(),
            data: e["data"].as_bool().unwrap(),
            zero: e["zero"].as_bool().unwrap(),
        })
        .collect()
}

#[test]
fn qemu_img_map_over_nbd_shows_holes_and_data() {
    let s = Served::raw(8 << 20);
    qemu_io(&s.uri(), &["write -P 0x5a 1M 1M", "write -P 0x5b 6M 512k"]);
    let m = map(&s.uri());
    let at = |off: u64| {
        m.iter()
            .find(|e| e.start <= off && off < e.start + e.length)
            .unwrap_or_else(|| panic!("no map entry for {off}: {m:?}"))
    };
    for hole in [0, (512 << 10), 3 << 20, 7 << 20] {
        let e = at(hole);
        assert!(!e.data && e.zero, "{hole} should be a hole: {e:?}");
    }
    for data in [1 << 20, (3 << 19) + 4096, 6 << 20] {
        let e = at(data);
        assert!(e.data && !e.zero, "{data} should be data: {e:?}");
    }
    // Punching through NBD (write-zeroes with unmap) makes a hole again.
    qemu_io(&s.uri(), &["write -z -u 1M 1M"]);
    let m2 = map(&s.uri());
    let e = m2
        .iter()
        .find(|e| e.start <= (1 << 20) && (1 << 20) < e.start + e.length)
        .unwrap();
    assert!(!e.data && e.zero, "punched range should be a hole: {m2:?}");
}

#[test]
fn tcp_loopback_export_with_default_name_works() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("img");
    let dev = colo_blk::block::RawFile::create(&image, 4 << 20).unwrap();
    let server = Server::start(
        &NbdAddr::parse_listen("tcp:127.0.0.1:0").unwrap(),
        Arc::new(dev),
        ServerOptions::default(),
    )
    .unwrap();
    let NbdAddr::Tcp { port, .. } = server.local_addr().clone() else {
        panic!("tcp listener expected");
    };
    let named = format!("nbd://127.0.0.1:{port}/parent0");
    qemu_io(&named, &["write -P 0x77 4k 8k"]);
    // The empty name selects the default (only) export.
    let default = format!("nbd://127.0.0.1:{port}/");
    qemu_io(&default, &["read -P 0x77 4k 8k"]);
    server.shutdown();
}

#[test]
fn unknown_export_is_refused_and_the_server_keeps_serving() {
    let s = Served::raw(1 << 20);
    let bad = format!("nbd+unix:///nosuch?socket={}", s.socket.display());
    let out = run("qemu-io", &["-f", "raw", "-c", "read 0 512", &bad]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nosuch") || err.contains("export"), "{err}");
    qemu_io(&s.uri(), &["write -P 0x01 0 4k", "read -P 0x01 0 4k"]);
}

#[test]
fn qemu_nbd_lists_the_export_with_its_block_sizes_and_context() {
    let s = Served::raw(2 << 20);
    let text = run_ok("qemu-nbd", &["-L", "-k", s.socket.to_str().unwrap()]);
    assert!(text.contains("export: 'parent0'"), "{text}");
    assert!(text.contains("size:  2097152"), "{text}");
    assert!(text.contains("max block: 33554432"), "{text}");
    assert!(text.contains("base:allocation"), "{text}");
}

#[test]
fn several_clients_at_once_write_their_own_regions() {
    let s = Served::raw(8 << 20);
    let children: Vec<_> = (0..4u8)
        .map(|i| {
            let cmd = format!("write -P {} {}M 1M", 0x10 + i, 2 * i);
            std::process::Command::new("qemu-io")
                .args(["-f", "raw", "-c", &cmd, &s.uri()])
                .stdout(std::process::Stdio::null())
                .spawn()
                .map(|c| Process::adopt("qemu-io", c))
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let disk = s.image_bytes();
    for i in 0..4usize {
        let region = &disk[(2 * i) << 20..((2 * i) + 1) << 20];
        assert!(region.iter().all(|&b| b == 0x10 + i as u8), "region {i}");
    }
}

#[test]
fn refused_writes_reach_qemu_as_eperm_and_reads_still_work() {
    // A fenced device: write-type requests refused, reads served.
    let s = Served::with(1 << 20, ServerOptions::default(), |d| {
        Arc::new(Intercept::new(d, |op, _, _| match op {
            Op::Read | Op::Flush => Ok(()),
            _ => Err(BlockError::Refused(Refusal::TakenOver)),
        }))
    });
    let out = run("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &s.uri()]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Operation not permitted"), "{text}");
    qemu_io(&s.uri(), &["read -P 0 0 4k"]);
    assert!(s.image_bytes().iter().all(|&b| b == 0));
}

#[test]
fn read_only_device_is_advertised_and_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("ro.img");
    std::fs::write(&image, vec![0x3c; 1 << 20]).unwrap();
    let dev = colo_blk::block::RawFile::open(
        &image,
        &colo_blk::block::RawFileOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let sock = dir.path().join("ro.sock");
    let server = Server::start(
        &NbdAddr::Unix(sock.clone()),
        Arc::new(dev),
        ServerOptions::default(),
    )
    .unwrap();
    let uri = format!("nbd+unix:///parent0?socket={}", sock.display());
    let text = run_ok("qemu-nbd", &["-L", "-k", sock.to_str().unwrap()]);
    assert!(text.contains("readonly"), "{text}");
    run_ok(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x3c 0 1M", &uri],
    );
    // QEMU honours the flag: it will not even open the export for writing.
    let out = run("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &uri]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Permission denied"), "{text}");
    assert!(std::fs::read(&image).unwrap().iter().all(|&b| b == 0x3c));
    server.shutdown();
}

#[test]
fn shutdown_disconnects_clients_and_removes_the_socket_file() {
    let mut s = Served::raw(1 << 20);
    qemu_io(&s.uri(), &["write -P 9 0 4k"]);
    // A client that stays connected (qemu-io waiting on stdin).
    let mut child = std::process::Command::new("qemu-io")
        .args(["-f", "raw", &s.uri()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take();
    let _idle = Process::adopt("qemu-io", child);
    for _ in 0..500 {
        if s.server().connections() == 1 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(s.server().connections(), 1);
    s.server.take().unwrap().shutdown();
    assert!(!s.socket.exists(), "socket file must be removed");
    let out = run("qemu-io", &["-f", "raw", "-c", "read 0 512", &s.uri()]);
    assert!(!out.status.success());
    drop(stdin);
}

#[test]
fn a_device_whose_writes_wait_on_storage_gets_as_many_workers_as_it_asks_for() {
    // A raw image whose writes each take a while, counting how many run at
    // once, and that says its writes wait on storage (`concurrent_writes`).
    let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (n, m) = (now.clone(), most.clone());
    let served = Served::with(8 << 20, ServerOptions::default(), move |dev| {
        let slow = Intercept::new(dev, move |op, _, _| {
            if op == Op::Write {
                m.fetch_max(n.fetch_add(1, SeqCst) + 1, SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(5));
                n.fetch_sub(1, SeqCst);
            }
            Ok(())
        });
        Arc::new(slow.with_concurrent_writes(16))
    });
    // 256 writes, 32 in flight at a time, from QEMU's own client.
    run_ok(
        "qemu-img",
        &[
            "bench",
            "-w",
            "-f",
            "raw",
            "-c",
            "256",
            "-d",
            "32",
            "-s",
            "4k",
            &served.uri(),
        ],
    );
    let most = most.load(SeqCst);
    // Beyond the 4 workers a connection has by default, up to the hint.
    assert!((5..=16).contains(&most), "{most} writes ran at once");
}
