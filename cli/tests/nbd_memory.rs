//! A secondary's NBD server against 64 clients that ask for 32 MiB reads and
//! never read the replies: the server's memory stays under the bound the
//! README documents, the work of the clients that left is dropped, and QEMU's
//! client is served afterwards.

mod common;
mod nbd_util;

use common::{sparse_image, Daemon};
use nbd_util::qemu_io;
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// The server's connection limit (its default).
const CLIENTS: usize = 64;
/// READs each client queues: more than the server runs at once.
const READS: u64 = 8;
const READ_LEN: u32 = 32 << 20;
const SIZE: u64 = 256 << 20;

/// README, "Hardening": RSS stays under --nbd-max-memory + 128 MiB, 384 MiB
/// with the defaults, however the clients behave.
const RSS_BOUND: u64 = 384 << 20;

fn vm_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib << 10
}

/// Negotiates with NBD_OPT_EXPORT_NAME and returns the connected socket.
fn negotiate(sock: &Path) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(common::PATIENCE)).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    let mut opt = 3u32.to_be_bytes().to_vec(); // fixed newstyle, no zeroes
    opt.extend_from_slice(b"IHAVEOPT");
    opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(b"parent0");
    s.write_all(&opt).unwrap();
    let mut export = [0u8; 10];
    s.read_exact(&mut export).unwrap();
    assert_eq!(u64::from_be_bytes(export[..8].try_into().unwrap()), SIZE);
    s
}

fn read_request(cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
    r.extend_from_slice(&0u16.to_be_bytes()); // flags
    r.extend_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
    r.extend_from_slice(&cookie.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

/// Reply bytes waiting in `s`, unread.
fn pending(s: &UnixStream) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the pointer we pass.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(rc, 0);
    n as usize
}

#[test]
fn sixty_four_clients_that_never_read_keep_the_server_under_its_memory_bound() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("secondary.img");
    sparse_image(&disk, SIZE);
    let sock = dir.path().join("nbd.sock");
    let d = Daemon::serve(
        dir.path(),
        &disk,
        &[
            "--mode",
            "secondary",
            "--nbd-listen",
            &format!("unix:{}", sock.display()),
            "--control",
            dir.path().join("ctl.sock").to_str().unwrap(),
        ],
    );
    let before = vm_rss(d.pid());
    let clients: Vec<UnixStream> = (0..CLIENTS)
        .map(|_| {
            let mut s = negotiate(&sock);
            for i in 0..READS {
                let offset = (i * u64::from(READ_LEN)) % SIZE;
                s.write_all(&read_request(i, offset, READ_LEN)).unwrap();
            }
            s
        })
        .collect();
    // The server is answering every client (its replies fill their sockets);
    // from then on, watch its memory for a while.
    let patience = Instant::now() + common::PATIENCE;
    while clients.iter().any(|c| pending(c) == 0) && Instant::now() < patience {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        clients.iter().all(|c| pending(c) > 0),
        "not every client got reply bytes:\n{}",
        d.log()
    );
    let mut peak = 0;
    for _ in 0..40 {
        peak = peak.max(vm_rss(d.pid()));
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "VmRSS before {} MiB, peak with {CLIENTS} clients not reading {} MiB (bound {} MiB)",
        before >> 20,
        peak >> 20,
        RSS_BOUND >> 20
    );
    assert!(
        peak < RSS_BOUND,
        "server RSS {} MiB over the documented {} MiB",
        peak >> 20,
        RSS_BOUND >> 20
    );

    // The clients leave: what they still had queued is dropped, and the
    // server serves the next client.
    drop(clients);
    let uri = format!("nbd+unix:///parent0?socket={}", sock.display());
    qemu_io(&uri, &["write -P 0x3c 1M 64k", "read -P 0x3c 1M 64k"]);
    let log = d.log();
    assert!(
        log.contains("queued requests of a client that went away"),
        "the departed clients' requests were not dropped:\n{log}"
    );
}
