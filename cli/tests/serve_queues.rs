//! Several virtqueues used at once: each queue has its own worker thread in the
//! backend, and each must complete exactly its own requests with its own data.

mod common;

use common::{pattern, sparse_image, Client, ClientOptions, Daemon};

const QUEUES: usize = 4;
const REGION: u64 = 8 << 20;

#[test]
fn four_queues_write_and_verify_their_own_regions_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    sparse_image(&img, REGION * QUEUES as u64);
    let d = Daemon::serve(dir.path(), &img, &["--num-queues", "4"]);
    let mut c = Client::connect_with(
        d.socket(),
        ClientOptions {
            num_queues: QUEUES,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        c.blkio().get_i32("num-queues").unwrap(),
        i32::try_from(QUEUES).unwrap()
    );
    // One worker thread per queue in the backend. A thread names itself once
    // it runs, so a just-spawned one may not be counted yet: wait for them.
    let deadline = std::time::Instant::now() + common::PATIENCE;
    while worker_threads(d.pid()) < QUEUES && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(worker_threads(d.pid()), QUEUES, "{}", d.log());

    // Each queue owns one region of the disk and interleaves writes and
    // read-backs of varying sizes there, all queues at the same time.
    std::thread::scope(|s| {
        for (qi, q) in c.queues().iter_mut().enumerate() {
            s.spawn(move || {
                let base = qi as u64 * REGION;
                for round in 0..24u64 {
                    let len = 4096usize << (round % 8); // 4 KiB .. 512 KiB
                    let offset = base + ((round * 256) << 10) % (REGION - len as u64);
                    let data = pattern(qi as u64 * 1000 + round, len);
                    q.write(offset, &data)
                        .unwrap_or_else(|e| panic!("queue {qi} write {round}: {e:?}"));
                    let back = q
                        .read(offset, len)
                        .unwrap_or_else(|e| panic!("queue {qi} read {round}: {e:?}"));
                    assert!(back == data, "queue {qi} round {round}: wrong data");
                }
                q.flush().unwrap();
            });
        }
    });

    // Every queue's last write per offset is in the file, and no queue wrote
    // outside its region.
    let img = std::fs::read(&img).unwrap();
    for qi in 0..QUEUES {
        let base = qi as u64 * REGION;
        let mut model = vec![0u8; REGION as usize];
        for round in 0..24u64 {
            let len = 4096usize << (round % 8);
            let offset = ((round * 256) << 10) % (REGION - len as u64);
            model[offset as usize..offset as usize + len]
                .copy_from_slice(&pattern(qi as u64 * 1000 + round, len));
        }
        let got = &img[base as usize..(base + REGION) as usize];
        assert!(got == &model[..], "region of queue {qi} differs");
    }
}

/// Threads of `pid` named like vhost-user-backend's queue workers.
fn worker_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter(|t| {
            let comm = t.as_ref().unwrap().path().join("comm");
            std::fs::read_to_string(comm).is_ok_and(|c| c.trim() == "vring_worker")
        })
        .count()
}

#[test]
fn a_frontend_may_use_fewer_queues_than_offered() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    sparse_image(&img, REGION);
    let d = Daemon::serve(dir.path(), &img, &["--num-queues", "4"]);
    let mut c = Client::connect(d.socket()).unwrap();
    assert_eq!(c.blkio().get_i32("max-queues").unwrap(), 4);
    c.write(0, &pattern(3, 65536)).unwrap();
    assert_eq!(c.read(0, 65536).unwrap(), pattern(3, 65536));
}
