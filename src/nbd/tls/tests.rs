//! The x509 session's own record layer against itself and against rustls'
//! (the peer QEMU's GnuTLS is checked by cli/tests/nbd_tls.rs): bulk data
//! both ways at once, key updates from either side, TLS 1.2, refusals.

use super::*;
use crate::tls::{ClientTls, ServerTls};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Throwaway credentials from integration/tls/make-certs.sh, made once.
fn certs() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("integration/tls/make-certs.sh");
        let st = std::process::Command::new("bash")
            .arg(script)
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "make-certs.sh failed");
        (dir, out)
    })
    .1
}

fn server_config() -> Arc<ServerConfig> {
    ServerTls::load(&certs().join("server"), Vec::new())
        .unwrap()
        .x509_config()
        .unwrap()
}

fn client_config() -> Arc<ClientConfig> {
    ClientTls::load(&certs().join("client"), None)
        .unwrap()
        .x509_config()
        .unwrap()
}

/// A stock rustls client (its own record layer) with `dir`'s certificate,
/// limited to `versions`.
fn rustls_client_config(
    dir: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let dir = certs().join(dir);
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("ca-cert.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<_> = CertificateDer::pem_file_iter(dir.join("client-cert.pem"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("client-key.pem")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    Arc::new(cfg)
}

fn localhost() -> ServerName<'static> {
    ServerName::try_from("localhost").unwrap()
}

fn pair() -> (Stream, Stream) {
    let (a, b) = UnixStream::pair().unwrap();
    (Stream::Unix(a), Stream::Unix(b))
}

/// Our client and our server on a socket pair.
fn our_pair(client: Arc<ClientConfig>) -> (RecordStream, RecordStream) {
    let (a, b) = pair();
    let server = std::thread::spawn(move || RecordStream::accept(b, server_config()).unwrap());
    let client = RecordStream::connect(a, client, localhost()).unwrap();
    (client, server.join().unwrap())
}

/// Our client and server, and a raw handle on the client's socket: what is
/// written there reaches the server as if the client had sent it.
fn tapped_pair() -> (RecordStream, RecordStream, UnixStream) {
    let (a, b) = pair();
    let Stream::Unix(raw) = a.try_clone().unwrap() else {
        unreachable!()
    };
    let server = std::thread::spawn(move || RecordStream::accept(b, server_config()).unwrap());
    let c = RecordStream::connect(a, client_config(), localhost()).unwrap();
    (c, server.join().unwrap(), raw)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn read_exactly(s: &RecordStream, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = s.read(&mut out[got..]).unwrap();
        assert!(n > 0, "EOF after {got} of {len} bytes");
        got += n;
    }
    out
}

/// Both sides send `len` bytes in odd-sized pieces while reading the
/// other's: more than the socket buffers hold, so a send that held up its
/// own reader would deadlock.
fn exchange(a: &RecordStream, b: &RecordStream, len: usize) {
    let (da, db) = (pattern(len, 1), pattern(len, 2));
    std::thread::scope(|s| {
        s.spawn(|| {
            for piece in da.chunks(100_003) {
                a.send_all(&[piece]).unwrap();
            }
        });
        s.spawn(|| {
            for piece in db.chunks(70_001) {
                let mut guest = piece.to_vec();
                let (x, y) = guest.split_at_mut(piece.len() / 2);
                let bufs = [VolatileSlice::from(x), VolatileSlice::from(y)];
                b.send_volatile(b"", &bufs).unwrap();
            }
        });
        let got_b = s.spawn(|| read_exactly(b, len));
        let got_a = read_exactly(a, len);
        assert!(got_a == db, "client read wrong bytes");
        assert!(got_b.join().unwrap() == da, "server read wrong bytes");
    });
}

#[test]
fn our_client_and_server_move_bulk_data_both_ways_at_once() {
    let (c, s) = our_pair(client_config());
    assert!(
        c.describe().contains("TLS13_AES_128_GCM_SHA256"),
        "{}",
        c.describe()
    );
    assert!(s.peer_certificates().is_some());
    exchange(&c, &s, 8 << 20);
}

/// [`exchange`]s `len` bytes with each sender's key good for only `limits`
/// records (a few dozen instead of millions): keys update on both sides.
fn exchange_updating_keys(
    c: &mut RecordStream,
    s: &mut RecordStream,
    limits: (u64, u64),
    len: usize,
) {
    (c.limit, s.limit) = limits;
    exchange(c, s, len);
    assert!(c.send.lock().unwrap().key.seq() <= limits.0);
    assert!(s.send.lock().unwrap().key.seq() <= limits.1);
}

#[test]
fn keys_update_when_a_sender_reaches_its_record_limit() {
    let (mut c, mut s) = our_pair(client_config());
    exchange_updating_keys(&mut c, &mut s, (100, 37), 16 << 20);
}

#[test]
fn a_stock_rustls_peer_interoperates_including_its_key_updates() {
    for versions in [
        &[&rustls::version::TLS13][..],
        &[&rustls::version::TLS12][..],
    ] {
        let tls13 = versions[0] == &rustls::version::TLS13;
        let data = pattern(3 << 20, 7);
        let (a, b) = pair();
        let server = {
            let data = data.clone();
            std::thread::spawn(move || {
                let s = RecordStream::accept(b, server_config()).unwrap();
                assert!(
                    read_exactly(&s, data.len()) == data,
                    "server read wrong bytes"
                );
                // The client's key update restarted the count mid-way.
                let rx_seq = s.recv.lock().unwrap().key.seq();
                s.send_all(&[&data]).unwrap();
                // rustls' close_notify reads as a clean EOF.
                let mut one = [0u8; 1];
                assert_eq!(s.read(&mut one).unwrap(), 0);
                rx_seq
            })
        };
        let Stream::Unix(sock) = a else {
            unreachable!()
        };
        let conn =
            rustls::ClientConnection::new(rustls_client_config("client", versions), localhost())
                .unwrap();
        let mut tls = rustls::StreamOwned::new(conn, sock);
        tls.write_all(&data[..1 << 20]).unwrap();
        if tls13 {
            // It asks for ours in return, which must come back before data.
            tls.conn.refresh_traffic_keys().unwrap();
        }
        tls.write_all(&data[1 << 20..]).unwrap();
        tls.flush().unwrap();
        let mut back = vec![0u8; data.len()];
        tls.read_exact(&mut back).unwrap();
        assert!(back == data, "client read wrong bytes");
        tls.conn.send_close_notify();
        tls.flush().unwrap();
        let rx_seq = server.join().unwrap();
        if tls13 {
            // 2 MiB after the update: 128 full records, not 192.
            assert!(
                rx_seq < 160,
                "no key update seen: {rx_seq} records on one key"
            );
        }
        // Ours came when the session was dropped: a clean EOF here too.
        let mut one = [0u8; 1];
        assert_eq!(tls.read(&mut one).unwrap(), 0);
    }
}

#[test]
fn an_expired_or_unknown_client_certificate_is_refused_in_the_handshake() {
    // The server refuses an expired client certificate and says why; a
    // client that trusts another CA refuses the server and says why.
    for (dir, server_says, client_says) in [
        ("expired", "expired", "alert"),
        ("other-ca", "UnknownCA", "UnknownIssuer"),
    ] {
        let (a, b) = pair();
        let server = std::thread::spawn(move || RecordStream::accept(b, server_config()));
        let Stream::Unix(sock) = a else {
            unreachable!()
        };
        let cfg = rustls_client_config(dir, &[&rustls::version::TLS13]);
        let conn = rustls::ClientConnection::new(cfg, localhost()).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, sock);
        // The client's flight goes out with its first write.
        let wrote = tls.write_all(b"hello");
        let err = server.join().unwrap().unwrap_err();
        assert!(err.to_string().contains(server_says), "{dir}: {err}");
        let mut one = [0u8; 1];
        let why = match wrote {
            Err(e) => e,
            Ok(()) => tls.read(&mut one).unwrap_err(),
        };
        assert!(why.to_string().contains(client_says), "{dir}: {why}");
    }
}

#[test]
fn a_tampered_record_ends_the_session() {
    // Small reads open records in our buffer, big ones in the caller's.
    for size in [1, 1 << 20] {
        let (c, s, raw) = tapped_pair();
        // A good record, then garbage in place of a sealed one.
        c.send_all(&[b"fine"]).unwrap();
        let mut rec = vec![23u8, 3, 3, 0, 40];
        rec.extend_from_slice(&[0x55; 40]);
        (&raw).write_all(&rec).unwrap();
        let mut buf = vec![0u8; size];
        let mut got = Vec::new();
        let err = loop {
            match s.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => break e,
            }
        };
        // What came before the bad record may or may not be handed out
        // first: the session is dead either way.
        assert!(b"fine".starts_with(&got), "{got:?}");
        assert!(err.to_string().contains("authenticate"), "{err}");
        drop(c);
    }
}

#[test]
fn hostile_bytes_after_the_handshake_end_the_session_without_a_panic() {
    // A peer (or whoever sits on the wire) controls every byte after the
    // handshake: odd record types and versions, lengths from zero past the
    // limit, bodies shorter than a tag, records cut off by EOF.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let lens = [
        0usize,
        1,
        15,
        16,
        17,
        21,
        40,
        16_384 + 256,
        16_384 + 2_049,
        65_535,
    ];
    for case in 0..40 {
        let (c, s, raw) = tapped_pair();
        c.send_all(&[b"fine"]).unwrap();
        let r = next();
        let ty = [20u8, 21, 22, 23, 23, 23, 24, 0, 255][(r % 9) as usize];
        let version: u16 = if r & 0x100 == 0 {
            0x0303
        } else {
            (r >> 16) as u16
        };
        let len = if case % 3 == 0 {
            (r >> 32) as usize % 70_000
        } else {
            lens[(r >> 40) as usize % lens.len()]
        };
        let len16 = len.min(usize::from(u16::MAX)) as u16;
        let mut wire = vec![ty];
        wire.extend_from_slice(&version.to_be_bytes());
        wire.extend_from_slice(&len16.to_be_bytes());
        // Sometimes the whole body, sometimes cut short by EOF.
        let sent = if r & 0x200 == 0 {
            usize::from(len16)
        } else {
            usize::from(len16) / 2
        };
        wire.extend((0..sent).map(|_| next() as u8));
        // A write of a closed session is fine to fail: the reader may have
        // hung up already.
        let _ = (&raw).write_all(&wire);
        raw.shutdown(std::net::Shutdown::Write).unwrap();
        let size = if case % 2 == 0 { 1 } else { 1 << 20 };
        let mut buf = vec![0u8; size];
        let mut got = Vec::new();
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            assert!(got.len() <= 4, "case {case}: garbage read as data: {got:?}");
        }
        assert!(b"fine".starts_with(&got), "case {case}: {got:?}");
        drop(c);
    }
}

mod psk {
    use super::*;
    use crate::tls::psk::{PskKeys, PskLookup, Secret};

    fn key() -> Secret {
        let text = "alice:000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n";
        let keys = PskKeys::parse(Path::new("test"), text.as_bytes()).unwrap();
        keys.get(b"alice").unwrap().clone()
    }

    /// GnuTLS sessions on both ends of a socket pair, handshaken.
    fn sessions() -> (gnutls::Session<Stream>, gnutls::Session<Stream>) {
        let (a, b) = pair();
        let server = std::thread::spawn(move || {
            let k = key();
            gnutls::Session::server(b, &|_| PskLookup::Key(k.clone())).unwrap()
        });
        let client = gnutls::Session::client(a, "alice", &key()).unwrap();
        (client, server.join().unwrap())
    }

    fn records(s: gnutls::Session<Stream>, client: bool) -> RecordStream {
        match TlsStream::psk(s, client).unwrap() {
            TlsStream::Records(r) => r,
            TlsStream::Psk(_) => panic!("GnuTLS kept the records"),
        }
    }

    #[test]
    fn psk_sessions_hand_their_records_over_and_update_keys() {
        let (c, s) = sessions();
        let (mut c, mut s) = (records(c, true), records(s, false));
        assert!(c.describe().contains("AES-128-GCM"), "{}", c.describe());
        exchange(&c, &s, 4 << 20);
        // Key updates both ways, derived from the secrets on each side.
        exchange_updating_keys(&mut c, &mut s, (50, 23), 8 << 20);
    }

    #[test]
    fn a_handed_over_psk_session_talks_to_gnutls_records() {
        let (c, s) = sessions();
        // The server's records are ours, the client's stay GnuTLS's.
        let s = records(s, false);
        let data = pattern(3 << 20, 9);
        std::thread::scope(|scope| {
            scope.spawn(|| c.send_all(&[&data]).unwrap());
            assert!(read_exactly(&s, data.len()) == data, "GnuTLS -> ours");
        });
        std::thread::scope(|scope| {
            scope.spawn(|| s.send_all(&[&data]).unwrap());
            let mut back = vec![0u8; data.len()];
            let mut got = 0;
            while got < back.len() {
                let n = c.read(&mut back[got..]).unwrap();
                assert!(n > 0);
                got += n;
            }
            assert!(back == data, "ours -> GnuTLS");
        });
        // GnuTLS's close_notify reads as a clean end.
        drop(c);
        let mut one = [0u8; 1];
        assert_eq!(s.read(&mut one).unwrap(), 0);
    }
}
