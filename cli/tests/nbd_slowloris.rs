//! A secondary's NBD server under a slow-loris flood: clients that trickle one
//! byte at a time and never finish negotiating fill every connection slot,
//! and the real client (QEMU's qemu-io, playing the primary) still gets in.

mod common;
mod nbd_util;

use common::{sparse_image, Daemon};
use nbd_util::run;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The server's connection limit (its default).
const SLOTS: usize = 64;
/// A short deadline, so the test does not wait 30 s for each expiry.
const HANDSHAKE_SECS: &str = "3";

/// The bytes a slow-loris client dribbles: a valid start of negotiation
/// (client flags, then an NBD_OPT_GO header announcing data that never
/// comes in time).
fn trickle() -> Vec<u8> {
    let mut b = 3u32.to_be_bytes().to_vec();
    b.extend_from_slice(b"IHAVEOPT");
    b.extend_from_slice(&7u32.to_be_bytes());
    b.extend_from_slice(&1000u32.to_be_bytes());
    b.extend_from_slice(&[0u8; 1000]);
    b
}

/// One slow-loris client: connects, sends a byte every 200 ms, reconnects
/// when closed, until `stop`. Counts itself in `greeted` while it holds a
/// slot (it got the server's greeting). Bounded by `stop` and by a count.
fn slow_loris(sock: PathBuf, stop: Arc<AtomicBool>, greeted: Arc<AtomicUsize>) {
    let bytes = trickle();
    for _ in 0..200 {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut s) = UnixStream::connect(&sock) else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut greeting = [0u8; 18];
        let mut got = 0;
        let mut counted = false;
        for &b in bytes.iter() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if got < greeting.len() {
                match s.read(&mut greeting[got..]) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(_) => {}
                }
                if got == greeting.len() && !counted {
                    counted = true;
                    greeted.fetch_add(1, Ordering::SeqCst);
                }
            } else {
                std::thread::sleep(Duration::from_millis(200));
            }
            if s.write_all(&[b]).is_err() {
                break;
            }
        }
        if counted {
            greeted.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn secondary(dir: &Path) -> Daemon {
    let disk = dir.join("secondary.img");
    sparse_image(&disk, 16 << 20);
    let nbd = dir.join("nbd.sock");
    Daemon::serve(
        dir,
        &disk,
        &[
            "--mode",
            "secondary",
            "--nbd-listen",
            &format!("unix:{}", nbd.display()),
            "--control",
            dir.join("ctl.sock").to_str().unwrap(),
            "--nbd-handshake-timeout",
            HANDSHAKE_SECS,
        ],
    )
}

#[test]
fn sixty_four_slow_loris_clients_do_not_keep_qemu_io_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = secondary(dir.path());
    let sock = dir.path().join("nbd.sock");
    let stop = Arc::new(AtomicBool::new(false));
    let greeted = Arc::new(AtomicUsize::new(0));
    let flood: Vec<_> = (0..SLOTS)
        .map(|_| {
            let (sock, stop, greeted) = (sock.clone(), stop.clone(), greeted.clone());
            std::thread::spawn(move || slow_loris(sock, stop, greeted))
        })
        .collect();
    // Every slot is held by a slow-loris client before the real one comes.
    let patience = Instant::now() + common::PATIENCE;
    while greeted.load(Ordering::SeqCst) < SLOTS && Instant::now() < patience {
        std::thread::sleep(Duration::from_millis(20));
    }
    let held = greeted.load(Ordering::SeqCst);

    let uri = format!("nbd+unix:///parent0?socket={}", sock.display());
    let started = Instant::now();
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 64k",
            "-c",
            "read -P 0x5a 0 64k",
            &uri,
        ],
    );
    let waited = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in flood {
        t.join().unwrap();
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("slow-loris clients holding slots: {held}; qemu-io took {waited:?}");
    assert_eq!(
        held,
        SLOTS,
        "the flood did not fill the slots:\n{}",
        d.log()
    );
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("error"),
        "qemu-io was kept out by {SLOTS} slow-loris clients:\n{text}\n{}",
        d.log()
    );
    let log = d.log();
    assert!(
        log.contains("evicting connection") || log.contains("did not finish negotiating"),
        "room was made without a log line:\n{log}"
    );
}
