//! colo-blk's NBD client against QEMU's NBD server (qemu-storage-daemon) and
//! against colo-blk's own server.

mod nbd_util;

use colo_blk::block::testing::{Gate, Intercept, Op, OpenOnDrop};
use colo_blk::block::{BlockDev, BlockDevExt, BlockError, ExtentKind, Refusal};
use colo_blk::nbd::{Client, ClientOptions, NbdError, NbdUri, ServerOptions};
use nbd_util::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vm_memory::VolatileSlice;

fn uri(socket: &Path) -> String {
    format!("nbd+unix:///parent0?socket={}", socket.display())
}

fn sparse(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p
}

/// The same operations applied to the client and to a local reference file.
fn apply_workload(client: &Arc<Client>, reference: &Path) {
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let client = client.clone();
            std::thread::spawn(move || {
                let mut out = Vec::new();
                for i in 0..64u64 {
                    // Disjoint 4 KiB slots per thread, spread over the disk.
                    let off = ((i * 8 + t) * 37 % 4096) * 4096;
                    let data = pattern(t * 1000 + i + 1, 4096);
                    if i % 16 == 5 {
                        client
                            .write_fua(off, &[VolatileSlice::from(&mut data.clone()[..])])
                            .unwrap();
                    } else {
                        client.write_at(off, &data).unwrap();
                    }
                    out.push((off, data));
                }
                out
            })
        })
        .collect();
    let mut reference_bytes = std::fs::read(reference).unwrap();
    for t in threads {
        for (off, data) in t.join().unwrap() {
            let o = off as usize;
            reference_bytes[o..o + data.len()].copy_from_slice(&data);
        }
    }
    // A multi-buffer write, write-zeroes both ways, a discard.
    let mut a = vec![0xa1u8; 512];
    let mut b = vec![0xb2u8; 7680];
    client
        .write_vectored(
            8 << 20,
            &[
                VolatileSlice::from(&mut a[..]),
                VolatileSlice::from(&mut b[..]),
            ],
        )
        .unwrap();
    reference_bytes[8 << 20..(8 << 20) + 512].fill(0xa1);
    reference_bytes[(8 << 20) + 512..(8 << 20) + 8192].fill(0xb2);
    client.write_zeroes(4096, 8192, false).unwrap();
    client.write_zeroes(1 << 20, 1 << 20, true).unwrap();
    client.discard(3 << 20, 65536).unwrap();
    for (o, l) in [(4096, 8192), (1 << 20, 1 << 20), (3 << 20, 65536)] {
        reference_bytes[o..o + l].fill(0);
    }
    client.flush().unwrap();
    std::fs::write(reference, &reference_bytes).unwrap();
}

#[test]
fn client_writes_into_qemu_storage_daemon_and_qemu_img_compare_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 << 20;
    let image = sparse(dir.path(), "qsd.img", size);
    let reference = sparse(dir.path(), "ref.img", size);
    let socket = dir.path().join("qsd.sock");
    let mut daemon = qsd_nbd(&image, &socket);
    let client = Arc::new(Client::connect(&uri(&socket)).unwrap());
    assert_eq!(client.size(), size);
    let info = client.info();
    assert!(
        info.structured && info.base_allocation.is_some(),
        "{info:?}"
    );
    apply_workload(&client, &reference);
    // Read back through NBD before stopping the daemon.
    let mut back = vec![0u8; size as usize];
    client.read_at(0, &mut back).unwrap();
    assert!(
        back == std::fs::read(&reference).unwrap(),
        "read-back differs"
    );
    drop(client);
    daemon.kill();
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            reference.to_str().unwrap(),
            image.to_str().unwrap(),
        ],
    );
}

#[test]
fn reads_of_sparse_areas_from_qemu_reassemble_hole_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse(dir.path(), "sparse.img", 8 << 20);
    // Data islands in a sparse file: QEMU answers reads with data and hole chunks.
    let mut content = vec![0u8; 8 << 20];
    for (i, off) in [0usize, 3 << 20, (5 << 20) + 4096].into_iter().enumerate() {
        let p = pattern(i as u64 + 7, 65536);
        content[off..off + 65536].copy_from_slice(&p);
        run_ok(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                &format!("write -P {} {off} 64k", 0x30 + i),
                image.to_str().unwrap(),
            ],
        );
        content[off..off + 65536].fill(0x30 + i as u8);
    }
    let socket = dir.path().join("qsd.sock");
    let _daemon = qsd_nbd(&image, &socket);
    let client = Client::connect(&uri(&socket)).unwrap();
    let mut back = vec![0xffu8; 8 << 20];
    client.read_at(0, &mut back).unwrap();
    assert!(back == content);
    // Across buffers with odd sizes.
    let mut x = vec![0u8; 1000];
    let mut y = vec![0u8; 3096];
    client
        .read_vectored(
            (3 << 20) - 1000,
            &[
                VolatileSlice::from(&mut x[..]),
                VolatileSlice::from(&mut y[..]),
            ],
        )
        .unwrap();
    assert!(x.iter().all(|&b| b == 0));
    assert!(y.iter().all(|&b| b == 0x31));
    // Block status from QEMU's base:allocation.
    let e = client.block_status(1 << 20, 1 << 20).unwrap();
    assert_eq!(e.kind, ExtentKind::Hole);
    let e = client.block_status(3 << 20, 1 << 20).unwrap();
    assert_eq!((e.kind, e.len), (ExtentKind::Data, 65536));
}

#[test]
fn client_against_our_server_round_trips_big_and_concurrent_io() {
    let s = Served::raw(64 << 20);
    let client = Arc::new(
        Client::connect_to(
            &NbdUri::parse(&s.uri()).unwrap(),
            ClientOptions {
                max_in_flight: 4,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let reference = s.dir.path().join("ref.img");
    std::fs::write(&reference, vec![0u8; 64 << 20]).unwrap();
    apply_workload(&client, &reference);
    // 40 MiB in one call: split into 32 MiB requests, pipelined.
    let big = pattern(99, 40 << 20);
    client.write_at(20 << 20, &big).unwrap();
    let mut back = vec![0u8; 40 << 20];
    client.read_at(20 << 20, &mut back).unwrap();
    assert!(back == big);
    let mut expected = std::fs::read(&reference).unwrap();
    expected[20 << 20..60 << 20].copy_from_slice(&big);
    assert!(s.image_bytes() == expected);
    // base:allocation through our own server.
    client.discard(62 << 20, 2 << 20).unwrap();
    let e = client.block_status(62 << 20, 2 << 20).unwrap();
    assert_eq!((e.kind, e.len), (ExtentKind::Hole, 2 << 20));
    let e = client.block_status(20 << 20, 1 << 20).unwrap();
    assert_eq!(e.kind, ExtentKind::Data);
}

#[test]
fn client_over_tcp_loopback_to_our_server() {
    let dir = tempfile::tempdir().unwrap();
    let dev = colo_blk::block::RawFile::create(&dir.path().join("img"), 1 << 20).unwrap();
    let server = colo_blk::nbd::Server::start(
        &colo_blk::nbd::NbdAddr::parse_listen("tcp:127.0.0.1:0").unwrap(),
        Arc::new(dev),
        ServerOptions::default(),
    )
    .unwrap();
    let colo_blk::nbd::NbdAddr::Tcp { port, .. } = server.local_addr().clone() else {
        panic!("tcp expected")
    };
    let client = Client::connect(&format!("nbd://127.0.0.1:{port}/parent0")).unwrap();
    client.write_at(512, b"hello over tcp").unwrap();
    let mut back = [0u8; 14];
    client.read_at(512, &mut back).unwrap();
    assert_eq!(&back, b"hello over tcp");
    drop(client);
    server.shutdown();
}

#[test]
fn unknown_export_is_reported() {
    let s = Served::raw(1 << 20);
    let err =
        Client::connect(&format!("nbd+unix:///nosuch?socket={}", s.socket.display())).unwrap_err();
    assert!(
        matches!(err, NbdError::UnknownExport(ref n) if n == "nosuch"),
        "{err}"
    );
}

#[test]
fn a_fenced_secondary_refuses_writes_with_refused() {
    let s = Served::with(1 << 20, ServerOptions::default(), |d| {
        Arc::new(Intercept::new(d, |op, _, _| match op {
            Op::Write | Op::Discard | Op::WriteZeroes => {
                Err(BlockError::Refused(Refusal::TakenOver))
            }
            Op::Read | Op::Flush => Ok(()),
        }))
    });
    let client = Client::connect(&s.uri()).unwrap();
    let err = client.write_at(0, &[1u8; 4096]).unwrap_err();
    match &err {
        BlockError::Refused(why) => assert!(why.to_string().contains("fenced"), "{why}"),
        other => panic!("expected Refused, got {other:?}"),
    }
    assert_eq!(err.errno(), libc::EPERM);
    // The connection itself is fine: reads still work.
    let mut b = [1u8; 512];
    client.read_at(0, &mut b).unwrap();
    assert_eq!(b, [0u8; 512]);
    assert!(client.broken().is_none());
}

#[test]
fn losing_the_server_fails_pending_and_later_requests_until_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let size = 32 << 20;
    let image = sparse(dir.path(), "qsd.img", size);
    let socket = dir.path().join("qsd.sock");
    let mut daemon = qsd_nbd(&image, &socket);
    let client = Arc::new(Client::connect(&uri(&socket)).unwrap());
    // Writers keep the pipe full while the server is killed.
    let writers: Vec<_> = (0..6u64)
        .map(|t| {
            let client = client.clone();
            std::thread::spawn(move || {
                let data = pattern(t + 1, 256 << 10);
                let mut results = Vec::new();
                for i in 0..400u64 {
                    let off = ((i * 6 + t) % 128) * (256 << 10);
                    let r = client.write_at(off, &data);
                    let failed = r.is_err();
                    results.push(r);
                    if failed {
                        break;
                    }
                }
                results
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(50));
    daemon.kill();
    let mut failures = 0;
    for w in writers {
        for r in w.join().unwrap() {
            if let Err(e) = r {
                failures += 1;
                match e {
                    BlockError::Io { source, .. } => {
                        assert_eq!(source.kind(), std::io::ErrorKind::NotConnected, "{source}")
                    }
                    other => panic!("expected an I/O error, got {other:?}"),
                }
            }
        }
    }
    assert!(failures > 0, "the writers should have seen the loss");
    assert!(client.broken().is_some());
    // Every later request fails at once, without touching a socket.
    assert!(matches!(
        client.write_at(0, &[0u8; 512]),
        Err(BlockError::Io { .. })
    ));
    assert!(client.flush().is_err());
    // Reconnect is explicit: reconnecting while the server is down fails...
    assert!(client.reconnect().is_err());
    // ...and works once it is back.
    let _daemon2 = qsd_nbd(&image, &socket);
    client.reconnect().unwrap();
    assert!(client.broken().is_none());
    client.write_at(0, &[0x77u8; 4096]).unwrap();
    let mut b = [0u8; 4096];
    client.read_at(0, &mut b).unwrap();
    assert_eq!(b, [0x77u8; 4096]);
}

#[test]
fn reconnect_refuses_an_export_whose_size_changed() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse(dir.path(), "a.img", 4 << 20);
    let socket = dir.path().join("qsd.sock");
    let mut daemon = qsd_nbd(&image, &socket);
    let client = Client::connect(&uri(&socket)).unwrap();
    daemon.kill();
    let other = sparse(dir.path(), "b.img", 8 << 20);
    let _daemon = qsd_nbd(&other, &socket);
    let err = client.reconnect().unwrap_err();
    assert!(matches!(err, NbdError::SizeChanged { old, new } if old == 4 << 20 && new == 8 << 20));
}

#[test]
fn a_request_timeout_turns_a_hung_server_into_a_broken_connection() {
    // Reads stall until the gate opens: a hung server, as seen by the client.
    let gate = Arc::new(Gate::closed());
    let g = gate.clone();
    let s = Served::with(1 << 20, ServerOptions::default(), move |d| {
        Arc::new(Intercept::new(d, move |op, _, _| {
            if op == Op::Read {
                g.pass();
            }
            Ok(())
        }))
    });
    // Opens the gate however the test ends, so the server can shut down.
    let _open = OpenOnDrop(gate);
    let client = Client::connect_to(
        &NbdUri::parse(&s.uri()).unwrap(),
        ClientOptions {
            request_timeout: Some(std::time::Duration::from_millis(300)),
            ..Default::default()
        },
    )
    .unwrap();
    // Writes are not stalled: the connection works.
    client.write_at(0, &[1u8; 512]).unwrap();
    let err = client.read_at(0, &mut [0u8; 512]).unwrap_err();
    match err {
        BlockError::Io { source, .. } => {
            assert_eq!(source.kind(), std::io::ErrorKind::NotConnected);
            assert!(source.to_string().contains("no reply within"), "{source}");
        }
        other => panic!("expected an I/O error, got {other:?}"),
    }
    assert!(client.broken().is_some());
    assert!(client.write_at(0, &[2u8; 512]).is_err());
}
