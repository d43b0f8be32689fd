//! A COLO pair of two real `colo-blk serve` processes (primary forwarding over
//! NBD into a secondary), over a unix socket and over TCP on loopback, driven
//! through libblkio guests and `colo-blk ctl` as COLO tooling would.

mod common;
mod tls_util;

use colo_blk::block::BlockDevExt;
use colo_blk::nbd;
use common::{ctl, ctl_ok, ctl_status, free_port, pattern, sparse_image, Client, Daemon};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tls_util::make_certs;

const SIZE: u64 = 32 << 20;
const CLUSTER: u64 = 64 << 10;

#[derive(Clone, Copy)]
enum Link {
    Unix,
    Tcp,
    /// TCP on loopback with NBD over TLS (make-certs.sh credentials, the
    /// primary's identity required by --tls-authz).
    TcpTls,
    /// The same with pre-shared keys (make-certs.sh's keys.psk, username
    /// `primary` required by --tls-authz).
    TcpPsk,
}

impl Link {
    fn tls(self) -> bool {
        matches!(self, Link::TcpTls | Link::TcpPsk)
    }
}

struct Side {
    dir: PathBuf,
    disk: PathBuf,
    control: PathBuf,
    socket: PathBuf,
}

impl Side {
    fn new(root: &Path, name: &str) -> Side {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        Side {
            disk: dir.join("disk.img"),
            control: dir.join("ctl.sock"),
            socket: dir.join("vhost.sock"),
            dir,
        }
    }

    fn spawn(&self, extra: &[String]) -> Daemon {
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--socket".into(),
            self.socket.display().to_string(),
            "--disk".into(),
            self.disk.display().to_string(),
            "--control".into(),
            self.control.display().to_string(),
        ];
        args.extend_from_slice(extra);
        let mut d = Daemon::spawn(&args, &self.socket, &self.dir.join("serve.log"));
        // A restarted side finds its SIGKILLed predecessor's socket files:
        // wait until this daemon listens, not until the path exists.
        d.wait_for_listener(&self.control);
        d
    }
}

struct Pair {
    _root: tempfile::TempDir,
    p: Side,
    s: Side,
    listen: String,
    uri: String,
    primary: Option<Daemon>,
    secondary: Option<Daemon>,
    /// TLS credentials directory (TcpTls, TcpPsk).
    certs: Option<PathBuf>,
    link: Link,
}

impl Pair {
    fn new(link: Link) -> Pair {
        let root = tempfile::tempdir().unwrap();
        let (p, s) = (Side::new(root.path(), "p"), Side::new(root.path(), "s"));
        sparse_image(&p.disk, SIZE);
        sparse_image(&s.disk, SIZE);
        let (listen, uri) = match link {
            Link::Unix => {
                let sock = s.dir.join("nbd.sock");
                (
                    format!("unix:{}", sock.display()),
                    format!("nbd+unix:///parent0?socket={}", sock.display()),
                )
            }
            Link::Tcp | Link::TcpTls | Link::TcpPsk => {
                let port = free_port();
                (
                    format!("tcp:127.0.0.1:{port}"),
                    format!("nbd://127.0.0.1:{port}/parent0"),
                )
            }
        };
        let certs = link.tls().then(|| make_certs(root.path()));
        let mut pair = Pair {
            _root: root,
            p,
            s,
            listen,
            uri,
            primary: None,
            secondary: None,
            certs,
            link,
        };
        pair.start_secondary_process();
        let mut args = ["--mode", "primary", "--secondary", &pair.uri]
            .map(String::from)
            .to_vec();
        if let Some(c) = &pair.certs {
            args.extend(match link {
                Link::TcpPsk => [
                    "--tls-creds-psk".into(),
                    c.join("psk-client/keys.psk").display().to_string(),
                    "--tls-psk-username".into(),
                    "primary".into(),
                ]
                .to_vec(),
                _ => [
                    "--tls-creds-x509".into(),
                    c.join("client").display().to_string(),
                ]
                .to_vec(),
            });
        }
        pair.primary = Some(pair.p.spawn(&args));
        pair
    }

    fn start_secondary_process(&mut self) {
        let mut args = ["--mode", "secondary", "--nbd-listen", &self.listen]
            .map(String::from)
            .to_vec();
        if let Some(c) = &self.certs {
            args.extend(match self.link {
                Link::TcpPsk => [
                    "--tls-creds-psk".into(),
                    c.join("psk").display().to_string(),
                    "--tls-authz".into(),
                    "primary".into(),
                ],
                _ => [
                    "--tls-creds-x509".into(),
                    c.join("server").display().to_string(),
                    "--tls-authz".into(),
                    "C=GB,O=Example,CN=client".into(),
                ],
            });
        }
        let mut d = self.s.spawn(&args);
        self.wait_nbd_listening(&mut d);
        self.secondary = Some(d);
    }

    /// Waits until the secondary's NBD server accepts connections.
    fn wait_nbd_listening(&self, d: &mut Daemon) {
        if let Some(path) = self.listen.strip_prefix("unix:") {
            d.wait_for_listener(Path::new(path));
            return;
        }
        let addr = self.listen.trim_start_matches("tcp:");
        let deadline = Instant::now() + common::PATIENCE;
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "nothing listens on {addr}:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// An NBD client like the primary's (with its TLS credentials if any).
    fn nbd_client(&self) -> Result<nbd::Client, nbd::NbdError> {
        let mut opts = nbd::ClientOptions::default();
        if let Some(c) = &self.certs {
            let tls = match self.link {
                Link::TcpPsk => {
                    colo_blk::tls::ClientTls::load_psk(&c.join("psk-client"), "primary")
                }
                _ => colo_blk::tls::ClientTls::load(&c.join("client"), None),
            };
            opts.tls = Some(Arc::new(tls.unwrap()));
        }
        nbd::Client::connect_to(&nbd::NbdUri::parse(&self.uri).unwrap(), opts)
    }

    fn kill_secondary(&mut self) {
        self.secondary.take();
    }

    fn checkpoint(&self) {
        ctl_ok(&self.p.control, &["checkpoint"]);
        ctl_ok(&self.s.control, &["checkpoint"]);
    }

    fn assert_disks_equal(&self, when: &str) {
        assert_bytes_equal(
            when,
            &std::fs::read(&self.p.disk).unwrap(),
            &std::fs::read(&self.s.disk).unwrap(),
        );
    }
}

fn assert_bytes_equal(when: &str, a: &[u8], b: &[u8]) {
    assert_eq!(a.len(), b.len(), "{when}: lengths");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!(
            "{when}: first difference at byte {i} (cluster {})",
            i as u64 / CLUSTER
        );
    }
}

fn random_writes(c: &mut Client, seed: u64, count: u64) {
    for i in 0..count {
        let h = (seed * 1_000_003 + i).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let len = ((h >> 7) % 16 + 1) * 4096;
        let off = (h >> 20) % ((SIZE - len) / 4096) * 4096;
        c.write(off, &pattern(seed * 7919 + i, len as usize))
            .unwrap();
    }
}

fn read_all(c: &mut Client) -> Vec<u8> {
    let mut v = Vec::with_capacity(SIZE as usize);
    for off in (0..SIZE).step_by(1 << 20) {
        v.extend(c.read(off, 1 << 20).unwrap());
    }
    v
}

fn wait_stage(control: &Path, want: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = ctl_status(control);
        if st["stage"] == want {
            return st;
        }
        assert!(Instant::now() < deadline, "stage never became {want}: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn checkpoints_then_failover(link: Link) {
    let pair = Pair::new(link);
    let mut pg = Client::connect(&pair.p.socket).unwrap();
    let mut sg = Client::connect(&pair.s.socket).unwrap();
    random_writes(&mut pg, 1, 100); // before replication: reaches the secondary by resync
    ctl_ok(&pair.s.control, &["start"]);
    ctl_ok(&pair.p.control, &["start"]);
    pair.checkpoint();
    pair.assert_disks_equal("after the initial resync");
    if pair.certs.is_some() {
        let log = std::fs::read_to_string(pair.s.dir.join("serve.log")).unwrap();
        let client = match link {
            Link::TcpPsk => "TLS established, client \"primary\" (ECDHE-PSK",
            _ => "TLS established, client \"C=GB,O=Example,CN=client\"",
        };
        assert!(
            log.contains(client),
            "the primary's link is not TLS:\n{log}"
        );
    }

    for round in 2..5 {
        random_writes(&mut pg, round, 150);
        random_writes(&mut sg, 100 + round, 40); // the secondary VM diverges
        pair.checkpoint();
        pair.assert_disks_equal(&format!("after checkpoint {round}"));
        assert_bytes_equal(
            "secondary guest view at a checkpoint",
            &read_all(&mut sg),
            &std::fs::read(&pair.p.disk).unwrap(),
        );
    }

    // The primary dies with uncheckpointed writes; the secondary takes over.
    random_writes(&mut pg, 9, 100);
    random_writes(&mut sg, 109, 60);
    let view = read_all(&mut sg);
    drop(pg);
    let mut pair = pair;
    pair.primary.take();
    ctl_ok(&pair.s.control, &["stop", "--failover"]);
    wait_stage(&pair.s.control, "done");
    assert_bytes_equal(
        "secondary disk after failover vs the secondary guest's view",
        &std::fs::read(&pair.s.disk).unwrap(),
        &view,
    );
    assert_bytes_equal("guest view after failover", &read_all(&mut sg), &view);

    // Fencing: a write from the old primary's side is refused, the disk untouched.
    let old_primary = pair.nbd_client().expect("NBD still served");
    let err = old_primary.write_at(0, &[0xaa; 4096]).unwrap_err();
    assert_eq!(err.errno(), libc::EPERM, "{err}");
    assert_bytes_equal(
        "disk after a fenced write",
        &std::fs::read(&pair.s.disk).unwrap(),
        &view,
    );
    // The promoted secondary keeps serving its guest.
    sg.write(0, &[5u8; 4096]).unwrap();
    assert_eq!(sg.read(0, 4096).unwrap(), vec![5u8; 4096]);
}

#[test]
fn pair_over_unix_socket_stays_equal_at_checkpoints_and_fails_over_to_the_guest_view() {
    checkpoints_then_failover(Link::Unix);
}

#[test]
fn pair_over_tcp_loopback_stays_equal_at_checkpoints_and_fails_over_to_the_guest_view() {
    checkpoints_then_failover(Link::Tcp);
}

#[test]
fn pair_over_tls_on_tcp_loopback_stays_equal_at_checkpoints_and_fails_over_to_the_guest_view() {
    checkpoints_then_failover(Link::TcpTls);
}

#[test]
fn pair_over_tls_psk_on_tcp_loopback_stays_equal_at_checkpoints_and_fails_over_to_the_guest_view() {
    checkpoints_then_failover(Link::TcpPsk);
}

#[test]
fn losing_the_secondary_under_load_is_survived_and_dirty_resync_copies_only_changes() {
    let mut pair = Pair::new(Link::Unix);
    ctl_ok(&pair.s.control, &["start"]);
    ctl_ok(&pair.p.control, &["start"]);
    pair.checkpoint();

    // A writer hammers the primary guest while the secondary is killed.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, written) = (Arc::clone(&stop), Arc::clone(&written));
        let sock = pair.p.socket.clone();
        std::thread::spawn(move || {
            let mut g = Client::connect(&sock).unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) || i < 200 {
                // Cycles over the first 64 clusters, so the dirty set is bounded.
                let off = (i % 64) * CLUSTER + (i % 16) * 4096;
                g.write(off, &pattern(i, 4096))
                    .unwrap_or_else(|e| panic!("guest write {i} failed: {e}"));
                written.fetch_add(1, Ordering::SeqCst);
                i += 1;
            }
        })
    };
    while written.load(Ordering::SeqCst) < 100 {
        std::thread::sleep(Duration::from_millis(2));
    }
    pair.kill_secondary();
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("every primary guest write succeeded");

    let out = ctl(&pair.p.control, &["get-error"]);
    assert_eq!(out.status.code(), Some(1), "the loss is reported");
    let st = ctl_status(&pair.p.control);
    let dirty = st["dirty-clusters"].as_u64().unwrap();
    assert!((1..=64).contains(&dirty), "{st}");

    // A restarted secondary gets exactly the dirty clusters.
    pair.start_secondary_process();
    ctl_ok(&pair.p.control, &["stop"]);
    ctl_ok(&pair.p.control, &["start", "--sync", "dirty"]);
    ctl_ok(&pair.s.control, &["start"]);
    pair.checkpoint();
    pair.assert_disks_equal("after the dirty resync");
    let st = ctl_status(&pair.p.control);
    assert_eq!(
        st["resync"]["total"].as_u64(),
        Some(dirty * CLUSTER),
        "{st}"
    );
    assert_eq!(st["resync"]["done"].as_u64(), Some(dirty * CLUSTER), "{st}");
    assert_eq!(st["dirty-clusters"], 0);
    assert_eq!(ctl(&pair.p.control, &["get-error"]).status.code(), Some(0));
}
