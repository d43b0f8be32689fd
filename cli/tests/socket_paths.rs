//! The sockets of a real `colo-blk serve` process accept connections from the
//! moment their path exists, and the control socket is private from that
//! moment: VMMs and COLO scripts wait for the path and connect at once.

mod common;

use common::{sparse_image, Daemon, PATIENCE};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Instant;

const ROUNDS: usize = 15;

/// What a client saw the first time a path existed.
#[derive(Debug)]
struct Sight {
    path: PathBuf,
    mode: u32,
    connected: Result<(), String>,
}

/// Polls every path until each has been seen once; at first sight records
/// its mode and connects.
fn watch(paths: Vec<PathBuf>) -> (thread::JoinHandle<Vec<Sight>>, Arc<Barrier>) {
    let ready = Arc::new(Barrier::new(2));
    let r = Arc::clone(&ready);
    let t = thread::spawn(move || {
        r.wait();
        let deadline = Instant::now() + PATIENCE;
        let mut pending = paths;
        let mut seen = Vec::new();
        while !pending.is_empty() && Instant::now() < deadline {
            pending.retain(|p| match std::fs::symlink_metadata(p) {
                Ok(m) => {
                    seen.push(Sight {
                        path: p.clone(),
                        mode: m.permissions().mode() & 0o777,
                        connected: UnixStream::connect(p).map(drop).map_err(|e| e.to_string()),
                    });
                    false
                }
                Err(_) => true,
            });
            thread::yield_now();
        }
        seen
    });
    (t, ready)
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') || Path::new(n).extension().is_some_and(|e| e == "sock"))
        .collect()
}

#[test]
fn vhost_control_and_nbd_sockets_accept_as_soon_as_their_path_exists() {
    for round in 0..ROUNDS {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        sparse_image(&disk, 1 << 20);
        let vhost = dir.path().join("vhost.sock");
        let control = dir.path().join("ctl.sock");
        let nbd = dir.path().join("nbd.sock");
        let (watcher, ready) = watch(vec![vhost.clone(), control.clone(), nbd.clone()]);
        ready.wait();
        let listen = format!("unix:{}", nbd.display());
        let mut daemon = Daemon::serve(
            dir.path(),
            &disk,
            &[
                "--mode",
                "secondary",
                "--nbd-listen",
                &listen,
                "--control",
                control.to_str().unwrap(),
            ],
        );
        let seen = watcher.join().unwrap();
        assert_eq!(seen.len(), 3, "round {round}: {seen:?}\n{}", daemon.log());
        for s in &seen {
            assert!(
                s.connected.is_ok(),
                "round {round}: {} existed but refused: {:?}",
                s.path.display(),
                s.connected
            );
            if s.path == control {
                assert_eq!(s.mode, 0o600, "round {round}: control socket mode");
            }
        }
        // SIGTERM before replication started is a clean exit too.
        let status = daemon.terminate();
        assert!(
            status.success(),
            "round {round}: exit {status:?}\n{}",
            daemon.log()
        );
        assert_eq!(
            leftovers(dir.path()),
            Vec::<String>::new(),
            "round {round}: sockets or staging left behind\n{}",
            daemon.log()
        );
    }
}
