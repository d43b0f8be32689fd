//! What the TLS tests share, x509 (`nbd_tls.rs`) and PSK (`nbd_tls_psk.rs`)
//! alike: throwaway credentials, the link a secondary listens on, QEMU's
//! tools and raw option exchanges against it, and a serve that must refuse to
//! start. Use with `mod tls_util;` beside `mod common;`.
#![allow(dead_code)]

use super::common::{repo_path, spawn_qemu_nbd, Daemon, Process, BIN, PATIENCE};
use colo_blk::nbd::wire::handshake::{OptionHeader, OptionReplyHeader};
use colo_blk::nbd::{NbdAddr, NbdUri};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Fresh credentials from integration/tls/make-certs.sh in ROOT/certs (x509
/// directories, and psk* directories holding keys.psk).
pub fn make_certs(root: &Path) -> PathBuf {
    let out = root.join("certs");
    let st = Command::new("bash")
        .arg(repo_path("integration/tls/make-certs.sh"))
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .expect("run make-certs.sh");
    assert!(st.success(), "make-certs.sh failed");
    out
}

/// Where an NBD server listens: loopback TCP or a unix socket.
pub enum Link {
    /// 127.0.0.1:PORT.
    Tcp(u16),
    /// A unix socket path.
    Unix(PathBuf),
}

/// The credentials a QEMU client uses on a [`Link`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// None.
    Plain,
    /// `tls-creds-x509` (QEMU checks the certificate name, also on a unix socket).
    X509,
    /// `tls-creds-psk`.
    Psk,
}

impl Link {
    /// `serve --nbd-listen` for it.
    pub fn listen(&self) -> String {
        match self {
            Link::Tcp(p) => format!("tcp:127.0.0.1:{p}"),
            Link::Unix(s) => format!("unix:{}", s.display()),
        }
    }

    /// QEMU `--image-opts` for the export, with `tls-creds=tls0` unless plain.
    pub fn qemu_opts(&self, tls: Tls) -> String {
        let addr = match self {
            Link::Tcp(p) => format!("driver=nbd,host=127.0.0.1,port={p}"),
            Link::Unix(s) => format!("driver=nbd,server.type=unix,server.path={}", s.display()),
        };
        let creds = match (tls, self) {
            (Tls::Plain, _) => "",
            (Tls::X509, Link::Unix(_)) => ",tls-creds=tls0,tls-hostname=localhost",
            (Tls::X509 | Tls::Psk, _) => ",tls-creds=tls0",
        };
        format!("{addr},export=parent0{creds}")
    }

    /// The export's URI for colo-blk's client.
    pub fn uri(&self) -> NbdUri {
        NbdUri {
            addr: match self {
                Link::Tcp(p) => NbdAddr::Tcp {
                    host: "127.0.0.1".into(),
                    port: *p,
                },
                Link::Unix(s) => NbdAddr::Unix(s.clone()),
            },
            export: "parent0".into(),
        }
    }

    /// Waits until a server accepts on it.
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let up = match self {
                Link::Tcp(p) => TcpStream::connect(("127.0.0.1", *p)).is_ok(),
                Link::Unix(s) => s.exists(),
            };
            if up {
                return;
            }
            assert!(Instant::now() < deadline, "NBD server never came up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// qemu-nbd serving `image` as `parent0` on `link`, with `--object OBJECT
/// --tls-creds tls0` when given; returns once it accepts.
pub fn qemu_nbd(link: &Link, image: &Path, object: Option<String>) -> Process {
    match &object {
        Some(object) => qemu_nbd_with(link, image, &["--object", object, "--tls-creds", "tls0"]),
        None => qemu_nbd_with(link, image, &[]),
    }
}

/// qemu-nbd serving `image` as `parent0` on `link` with `args` first (its
/// objects and TLS options); returns once it accepts.
pub fn qemu_nbd_with(link: &Link, image: &Path, args: &[&str]) -> Process {
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(args);
    match link {
        Link::Tcp(p) => cmd.args(["-b", "127.0.0.1", "-p", &p.to_string()]),
        Link::Unix(s) => cmd.arg("-k").arg(s),
    };
    // -e 4: the readiness probe must not hold the only connection slot.
    cmd.args([
        "-f",
        "raw",
        "-x",
        "parent0",
        "-t",
        "-e",
        "4",
        "--cache=none",
    ])
    .arg(image)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let q = spawn_qemu_nbd(&mut cmd);
    link.wait_ready();
    q
}

/// Runs a QEMU tool; (success, stdout and stderr).
pub fn qemu(tool: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(tool).args(args).output().expect(tool);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// True if the file holds only zeroes.
pub fn all_zero(path: &Path) -> bool {
    std::fs::read(path).unwrap().iter().all(|&b| b == 0)
}

/// Waits until the daemon's log contains `text` (the line may come just
/// after the peer saw the refusal).
pub fn wait_log(d: &Daemon, text: &str) {
    let deadline = Instant::now() + PATIENCE;
    while !d.log().contains(text) {
        assert!(
            Instant::now() < deadline,
            "log never said {text:?}:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends one option request.
pub fn send_option(s: &mut impl Write, opt: u32, data: &[u8]) {
    let h = OptionHeader {
        option: opt,
        len: u32::try_from(data.len()).unwrap(),
    };
    s.write_all(&h.encode()).unwrap();
    s.write_all(data).unwrap();
}

/// Reads one option reply: (option, reply type).
pub fn read_reply(s: &mut impl Read) -> (u32, u32) {
    let mut h = [0u8; OptionReplyHeader::LEN];
    s.read_exact(&mut h).unwrap();
    let h = OptionReplyHeader::decode(&h).unwrap();
    let mut data = vec![0u8; h.len as usize];
    s.read_exact(&mut data).unwrap();
    (h.option, h.reply)
}

/// Runs `colo-blk serve ARGS` (with `env` set) that must refuse to start;
/// returns (exit code, stderr).
pub fn refused_start(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut child = Command::new(BIN)
        .arg("serve")
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    let mut child = Process::adopt("colo-blk serve", child);
    let Some(status) = child.wait_exit(PATIENCE) else {
        panic!("colo-blk serve {args:?} did not refuse to start");
    };
    let mut text = String::new();
    err.read_to_string(&mut text).unwrap();
    (status.code().unwrap_or(-1), text)
}

/// [`refused_start`] of a 1 MiB disk `disk` served on `sock`, with `args`
/// after those.
pub fn refused_1m(sock: &Path, disk: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut all = vec![
        "--socket",
        sock.to_str().unwrap(),
        "--disk",
        disk.to_str().unwrap(),
        "--size",
        "1M",
    ];
    all.extend_from_slice(args);
    refused_start(&all, env)
}

/// Writes five patterned extents (`seed` picks the bytes) through `client` into
/// `image`, which a QEMU NBD server (`server`) exports, reads the largest back
/// over the same link, then stops both and requires `qemu-img compare` to
/// find the image identical to what was written. `what` names the link in
/// failures.
pub fn write_through_and_compare(
    client: colo_blk::nbd::Client,
    server: Process,
    image: &Path,
    size: u64,
    seed: u64,
    what: &str,
) {
    use colo_blk::block::{BlockDev, BlockDevExt};
    let mut expected = vec![0u8; size as usize];
    for (i, off) in [0u64, 4096, 1 << 20, 5 << 20, (15 << 20) + 512]
        .iter()
        .enumerate()
    {
        let len = [4096, 64 << 10, 1 << 20, 3 << 20, 4096][i];
        let data = super::common::pattern(i as u64 + seed, len);
        client.write_at(*off, &data).unwrap();
        expected[*off as usize..*off as usize + len].copy_from_slice(&data);
    }
    client.flush().unwrap();
    let mut back = vec![0u8; 3 << 20];
    client.read_at(5 << 20, &mut back).unwrap();
    assert!(back == expected[5 << 20..8 << 20], "read back over {what}");
    drop(client);
    drop(server);
    let want = image.with_extension("want");
    std::fs::write(&want, &expected).unwrap();
    let (ok, out) = qemu(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            want.to_str().unwrap(),
            image.to_str().unwrap(),
        ],
    );
    assert!(ok && out.contains("Images are identical"), "{out}");
}
