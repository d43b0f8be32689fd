//! `colo-blk serve` against frontends that misbehave or merely come and go a
//! lot: the daemon keeps its resources bounded and keeps serving.

mod common;

use common::{sparse_image, Client, ClientOptions, Daemon};

const SIZE: u64 = 16 << 20;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
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
    assert_eq!(after, before, "fds before {before}, after 1000 reconnects {after}");
}
