//! `colo-blk serve` as a process: reconnects, signals, read-only mode, bad
//! command lines.

mod common;

use common::{is_socket, pattern, sparse_image, Client, ClientOptions, Daemon, BIN};
use std::process::Command;

const SIZE: u64 = 16 << 20;

fn setup(extra: &[&str]) -> (tempfile::TempDir, Daemon) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    sparse_image(&img, SIZE);
    let d = Daemon::serve(dir.path(), &img, extra);
    (dir, d)
}

#[test]
fn three_reconnects_in_a_row_see_the_previous_connections_data() {
    let (_dir, d) = setup(&[]);
    let first = pattern(1, 64 << 10);
    {
        let mut c = Client::connect(d.socket()).unwrap();
        c.write(0, &first).unwrap();
    }
    for round in 0..3u64 {
        let mut c = Client::connect(d.socket())
            .unwrap_or_else(|e| panic!("reconnect {round}: {e:?}\n{}", d.log()));
        let prev = if round == 0 {
            first.clone()
        } else {
            pattern(100 + round - 1, 64 << 10)
        };
        assert_eq!(c.read(0, 64 << 10).unwrap(), prev, "round {round}");
        c.write(0, &pattern(100 + round, 64 << 10)).unwrap();
    }
    assert!(is_socket(d.socket()));
}

#[test]
fn sigterm_removes_the_socket_and_exits_zero() {
    let (_dir, mut d) = setup(&[]);
    let socket = d.socket().to_path_buf();
    // With a frontend attached and idle.
    let mut c = Client::connect(&socket).unwrap();
    c.write(0, &[5u8; 4096]).unwrap();
    let status = d.terminate();
    assert!(status.success(), "exit status {status}\n{}", d.log());
    assert!(!socket.exists(), "socket left behind");
}

#[test]
fn sigint_without_a_frontend_exits_zero() {
    let (_dir, mut d) = setup(&[]);
    d.signal(libc::SIGINT);
    let status = d.wait_exit();
    assert!(status.success(), "exit status {status}\n{}", d.log());
    assert!(!d.socket().exists());
}

#[test]
fn sigterm_completes_writes_in_flight_on_every_queue() {
    let (dir, mut d) = setup(&["--num-queues", "2"]);
    let mut c = Client::connect_with(
        d.socket(),
        ClientOptions {
            num_queues: 2,
            ..Default::default()
        },
    )
    .unwrap();
    // Acknowledged writes must be in the file after a SIGTERM exit.
    for (i, q) in c.queues().iter_mut().enumerate() {
        q.write(i as u64 * (1 << 20), &pattern(i as u64, 1 << 20))
            .unwrap();
    }
    assert!(d.terminate().success(), "{}", d.log());
    let img = std::fs::read(dir.path().join("disk.img")).unwrap();
    for i in 0..2 {
        assert!(img[i << 20..(i + 1) << 20] == pattern(i as u64, 1 << 20)[..]);
    }
}

#[test]
fn read_only_disk_is_advertised_and_serves_reads() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::write(&img, pattern(9, SIZE as usize)).unwrap();
    let d = Daemon::serve(dir.path(), &img, &["--readonly"]);
    // A read-write frontend is refused: the device advertises VIRTIO_BLK_F_RO.
    let err = Client::connect(d.socket())
        .err()
        .expect("read-write connect");
    assert_eq!(err.errno, libc::EROFS, "{err:?}");
    let mut c = Client::connect_with(
        d.socket(),
        ClientOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        c.read(4096, 4096).unwrap(),
        pattern(9, SIZE as usize)[4096..8192]
    );
    // libblkio refuses writes on a read-only device before they reach the
    // backend; the backend's own refusal is covered by the virtio_blk unit tests.
    assert!(c.write(0, &[0u8; 512]).is_err());
    assert_eq!(std::fs::read(&img).unwrap(), pattern(9, SIZE as usize));
}

fn serve_exit_code(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN).arg("serve").args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_command_lines_exit_2_with_a_message_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s.sock");
    let img = dir.path().join("disk.img");
    sparse_image(&img, SIZE);
    let base = [
        "--socket",
        sock.to_str().unwrap(),
        "--disk",
        img.to_str().unwrap(),
    ];
    let cases: &[(&[&str], &str)] = &[
        (&["--logical-block-size", "1024"], "--logical-block-size"),
        (&["--num-queues", "0"], "--num-queues"),
        (&["--queue-size", "1000"], "--queue-size"),
        (&["--serial", "this-serial-is-too-long"], "--serial"),
        (&["--mode", "tertiary"], "--mode"),
        (&["--active", "a"], "--active"),
        (&["--mode", "primary"], "--secondary"),
        (
            &["--mode", "secondary", "--nbd-listen", "udp:x"],
            "--nbd-listen",
        ),
        (&["--cluster-size", "1000"], "--cluster-size"),
        (&["--size", "12Q"], "--size"),
    ];
    for (extra, flag) in cases {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let (code, stderr) = serve_exit_code(&args);
        assert_eq!(code, Some(2), "{extra:?}: {stderr}");
        assert!(stderr.contains(flag), "{extra:?}: {stderr}");
    }
    let (code, stderr) = serve_exit_code(&["--socket", "s", "--disk", "/nonexistent/x.img"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--size"), "{stderr}");
    assert!(!sock.exists());
}

#[test]
fn secondary_with_an_unusable_nbd_address_exits_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    sparse_image(&img, SIZE);
    let sock = dir.path().join("s.sock");
    let (code, stderr) = serve_exit_code(&[
        "--socket",
        sock.to_str().unwrap(),
        "--disk",
        img.to_str().unwrap(),
        "--mode",
        "secondary",
        "--nbd-listen",
        "unix:/nonexistent/dir/nbd.sock",
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("NBD server"), "{stderr}");
    assert!(!sock.exists());
}

#[test]
fn a_live_socket_is_not_stolen_by_a_second_daemon() {
    let (dir, d) = setup(&[]);
    let img = dir.path().join("disk.img");
    let (code, stderr) = serve_exit_code(&[
        "--socket",
        d.socket().to_str().unwrap(),
        "--disk",
        img.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("listening"), "{stderr}");
    // The first daemon still serves.
    let mut c = Client::connect(d.socket()).unwrap();
    c.write(0, &[1u8; 512]).unwrap();
}
