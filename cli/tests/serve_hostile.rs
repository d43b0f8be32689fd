//! `colo-blk serve` against frontends that misbehave or merely come and go a
//! lot: the daemon keeps its resources bounded and keeps serving.

mod common;

use common::{sparse_image, Client, ClientOptions, Daemon};

const SIZE: u64 = 16 << 20;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn connect_4(d: &Daemon) -> Client {
    Client::connect_with(
        d.socket(),
        ClientOptions {
            num_queues: 4,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn a_thousand_reconnects_with_four_queues_leave_the_fd_count_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    sparse_image(&img, SIZE);
    let d = Daemon::serve(dir.path(), &img, &["--num-queues", "4"]);
    // One connection first, so that whatever is opened once (the log, lazily
    // created state) is already counted.
    drop(connect_4(&d));
    std::thread::sleep(std::time::Duration::from_millis(100));
    let before = open_fds(d.pid());
    for i in 0..1000u64 {
        let mut c = connect_4(&d);
        if i % 100 == 0 {
            c.queue((i / 100 % 4) as usize)
                .write(i * 512, &[i as u8; 512])
                .unwrap();
        }
    }
    // The last disconnect is handled asynchronously by the daemon; a fresh
    // connection is served only after the previous one was torn down.
    let mut c = connect_4(&d);
    assert_eq!(c.queue(0).read(0, 512).unwrap(), vec![0u8; 512]);
    drop(c);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let after = open_fds(d.pid());
    assert_eq!(
        after, before,
        "fds before {before}, after 1000 reconnects {after}"
    );
}

/// A raw vhost-user frontend whose memory table claims 16 MiB of a 4 KiB
/// memfd, with its rings past the end of the file; returns after kicking.
fn frontend_with_a_short_memfd(socket: &std::path::Path) -> bool {
    use vhost::vhost_user::message::VhostUserProtocolFeatures;
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
    use vmm_sys_util::eventfd::EventFd;

    let mut fe = Frontend::connect(socket, 1).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    fe.set_features(features).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(pf & VhostUserProtocolFeatures::REPLY_ACK)
        .unwrap();

    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"short".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: fd is the memfd just created.
    assert_eq!(unsafe { libc::ftruncate(fd, 4096) }, 0);
    let user = 0x7000_0000_0000u64;
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: 16 << 20,
        userspace_addr: user,
        mmap_offset: 0,
        mmap_handle: fd,
    };
    fe.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
    let refused = fe.set_mem_table(&[region]).is_err();
    // The rest of a frontend's start-up, rings 1 MiB into the region: the
    // backend must not touch them.
    let _ = fe.set_vring_num(0, 16);
    let _ = fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: 16,
            queue_size: 16,
            flags: 0,
            desc_table_addr: user + 0x10_0000,
            used_ring_addr: user + 0x10_1000,
            avail_ring_addr: user + 0x10_2000,
            log_addr: None,
        },
    );
    let _ = fe.set_vring_base(0, 0);
    let call = EventFd::new(0).unwrap();
    let kick = EventFd::new(0).unwrap();
    let _ = fe.set_vring_call(0, &call);
    let _ = fe.set_vring_kick(0, &kick);
    let _ = fe.set_vring_enable(0, true);
    kick.write(1).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SAFETY: closes the memfd this function created.
    unsafe { libc::close(fd) };
    refused
}

#[test]
fn a_memory_region_larger_than_its_file_is_refused_without_sigbus() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    sparse_image(&img, SIZE);
    let mut d = Daemon::serve(dir.path(), &img, &[]);
    let refused = frontend_with_a_short_memfd(d.socket());
    // Still alive, and the next frontend is served.
    let mut c = Client::connect(d.socket()).unwrap_or_else(|e| panic!("{e:?}: {}", d.log()));
    c.write(4096, &[7u8; 4096]).unwrap();
    assert_eq!(c.read(4096, 4096).unwrap(), vec![7u8; 4096]);
    drop(c);
    assert!(refused, "a 16 MiB region on a 4 KiB file is refused");
    assert!(
        d.log().contains("refusing the frontend's memory table"),
        "{}",
        d.log()
    );
    assert!(d.terminate().success(), "{}", d.log());
}

/// A raw vhost-user frontend with 1 MiB of valid guest memory and queue 0 set
/// up on it, using `kick` and `call` as given; the queue is enabled. Returns
/// the connection and the memfd.
fn raw_frontend(
    socket: &std::path::Path,
    kick: &vmm_sys_util::eventfd::EventFd,
    call: &vmm_sys_util::eventfd::EventFd,
) -> (vhost::vhost_user::Frontend, std::fs::File) {
    use std::os::fd::FromRawFd;
    use vhost::vhost_user::message::VhostUserProtocolFeatures;
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};

    let mut fe = Frontend::connect(socket, 1).unwrap();
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    fe.set_features(features).unwrap();
    let pf = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(pf & VhostUserProtocolFeatures::REPLY_ACK)
        .unwrap();
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: fd is a new memfd that the File now owns.
    let memfd = unsafe { std::fs::File::from_raw_fd(fd) };
    memfd.set_len(1 << 20).unwrap();
    let user = 0x7000_0000_0000u64;
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: 1 << 20,
        userspace_addr: user,
        mmap_offset: 0,
        mmap_handle: fd,
    }])
    .unwrap();
    fe.set_vring_num(0, 16).unwrap();
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: 16,
            queue_size: 16,
            flags: 0,
            desc_table_addr: user + 0x1000,
            used_ring_addr: user + 0x3000,
            avail_ring_addr: user + 0x2000,
            log_addr: None,
        },
    )
    .unwrap();
    fe.set_vring_base(0, 0).unwrap();
    fe.set_vring_call(0, call).unwrap();
    fe.set_vring_kick(0, kick).unwrap();
    fe.set_vring_enable(0, true).unwrap();
    (fe, memfd)
}

/// Connects a libblkio client, writes and reads back a block, on a thread;
/// fails the test if that does not finish in 10 s (a wedged daemon).
fn next_frontend_is_served(d: &Daemon) {
    let socket = d.socket().to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = Client::connect(&socket).and_then(|mut c| {
            c.write(8192, &[3u8; 4096])?;
            c.read(8192, 4096)
        });
        let _ = tx.send(r.map(|b| b == vec![3u8; 4096]));
    });
    match rx.recv_timeout(std::time::Duration::from_secs(10)) {
        Ok(Ok(true)) => {}
        Ok(other) => panic!("next frontend: {other:?}\n{}", d.log()),
        Err(_) => panic!("next frontend not served within 10 s\n{}", d.log()),
    }
}

/// Which of a raw frontend's fds is a pipe, and what it does with the pipe.
#[derive(Clone, Copy)]
enum PipeAs {
    /// The kick fd, with one byte in it: an 8-byte eventfd read would block.
    KickWithOneByte,
    /// The kick fd, its write end closed: a read hits EOF at once.
    KickAtEof,
    /// The call fd, never drained: notifications would fill it and block.
    Call,
}

/// A frontend hands over a pipe where an eventfd belongs and leaves; the next
/// frontend must be served within 10 s and SIGTERM must end the daemon with
/// status 0 within 5 s.
fn pipe_fd_does_not_wedge_the_daemon(how: PipeAs, refusal: &str) {
    use std::os::fd::FromRawFd;
    use vmm_sys_util::eventfd::EventFd;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    sparse_image(&img, SIZE);
    let mut d = Daemon::serve(dir.path(), &img, &[]);
    let mut fds = [0; 2];
    // SAFETY: pipe fills the two-element array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: fds[0] is the pipe's read end, owned by this EventFd from now on;
    // the backend receives a copy through SCM_RIGHTS.
    let pipe = unsafe { EventFd::from_raw_fd(fds[0]) };
    let eventfd = EventFd::new(0).unwrap();
    let (kick, call) = match how {
        PipeAs::KickWithOneByte | PipeAs::KickAtEof => (&pipe, &eventfd),
        PipeAs::Call => (&eventfd, &pipe),
    };
    let (fe, _mem) = raw_frontend(d.socket(), kick, call);
    match how {
        // SAFETY: writes one byte from a valid buffer to the pipe's write end.
        PipeAs::KickWithOneByte => unsafe {
            assert_eq!(libc::write(fds[1], [1u8].as_ptr().cast(), 1), 1);
        },
        // SAFETY: the write end, opened by this test, is closed once.
        PipeAs::KickAtEof => unsafe {
            libc::close(fds[1]);
            fds[1] = -1;
        },
        // A kick makes the worker run a pass and try to notify through the pipe.
        PipeAs::Call => eventfd.write(1).unwrap(),
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    drop(fe);
    next_frontend_is_served(&d);
    assert!(d.log().contains(refusal), "{}", d.log());
    let asked = std::time::Instant::now();
    assert!(d.terminate().success(), "{}", d.log());
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(5),
        "SIGTERM took {:?}\n{}",
        asked.elapsed(),
        d.log()
    );
    if fds[1] >= 0 {
        // SAFETY: closes the write end this test opened.
        unsafe { libc::close(fds[1]) };
    }
}

#[test]
fn a_pipe_as_kick_fd_does_not_wedge_the_daemon() {
    pipe_fd_does_not_wedge_the_daemon(PipeAs::KickWithOneByte, "kick fd refused");
}

#[test]
fn a_kick_fd_at_eof_does_not_end_the_worker_or_wedge_the_daemon() {
    pipe_fd_does_not_wedge_the_daemon(PipeAs::KickAtEof, "kick fd refused");
}

#[test]
fn a_blocking_pipe_as_call_fd_does_not_wedge_the_daemon() {
    pipe_fd_does_not_wedge_the_daemon(PipeAs::Call, "call fd refused");
}
