//! NBD over TLS against QEMU's own TLS (GnuTLS) in both directions, and the
//! refusals: untrusted CA, expired or missing client certificate, identity
//! not in --tls-authz, plain text against TLS and back, a tampered STARTTLS
//! reply, bad credentials at start, and SIGHUP reloading credentials while a
//! session stays up. The secondary is the real `colo-blk serve` binary, so
//! the log lines an operator reads are checked too.

mod common;
mod tls_util;

use colo_blk::block::BlockDevExt;
use colo_blk::nbd::{Client, ClientOptions};
use colo_blk::tls::ClientTls;
use common::{free_port, pattern, Daemon, PATIENCE};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use tls_util::{
    all_zero, make_certs, qemu, qemu_nbd, qemu_nbd_with, read_reply, refused_1m, send_option,
    wait_log, write_through_and_compare, Link, Tls,
};

const SIZE: u64 = 16 << 20;
/// The credentials QEMU uses here.
const TLS: Tls = Tls::X509;
const CLIENT_ID: &str = "C=GB,O=Example,CN=client";

fn x509_object(dir: &Path, endpoint: &str) -> String {
    format!(
        "tls-creds-x509,id=tls0,dir={},endpoint={endpoint}",
        dir.display()
    )
}

/// A `colo-blk serve --mode secondary` serving its NBD export over TLS.
fn tls_secondary(dir: &Path, link: &Link, creds: &Path, authz: &[&str]) -> Daemon {
    let disk = dir.join("disk.img");
    let listen = link.listen();
    let creds = creds.display().to_string();
    let mut extra = vec![
        "--size",
        "16M",
        "--mode",
        "secondary",
        "--nbd-listen",
        &listen,
        "--tls-creds-x509",
        &creds,
    ];
    if !authz.is_empty() {
        extra.push("--tls-authz");
        extra.extend_from_slice(authz);
    }
    let d = Daemon::serve(dir, &disk, &extra);
    link.wait_ready();
    d
}

fn client_tls(dir: &Path) -> ClientOptions {
    ClientOptions {
        tls: Some(Arc::new(ClientTls::load(dir, None).expect("client creds"))),
        ..ClientOptions::default()
    }
}

fn qemu_copy_into_tls_secondary(link: Link) {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let d = tls_secondary(dir.path(), &link, &certs.join("server"), &[CLIENT_ID]);
    let src = dir.path().join("src.img");
    let mut data = vec![0u8; SIZE as usize];
    for (i, chunk) in data.chunks_mut(1 << 20).enumerate() {
        if i % 3 != 1 {
            chunk.copy_from_slice(&pattern(i as u64 + 7, 1 << 20));
        }
    }
    std::fs::write(&src, &data).unwrap();
    let obj = x509_object(&certs.join("client"), "client");
    let target = link.qemu_opts(TLS);
    let (ok, out) = qemu(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "--object",
            &obj,
            "--target-image-opts",
            src.to_str().unwrap(),
            &target,
        ],
    );
    assert!(ok, "qemu-img convert over TLS: {out}\n{}", d.log());
    let src_opts = format!("driver=raw,file.filename={}", src.display());
    let (ok, out) = qemu(
        "qemu-img",
        &[
            "compare",
            "--object",
            &obj,
            "--image-opts",
            &src_opts,
            &target,
        ],
    );
    assert!(ok && out.contains("Images are identical"), "{out}");
    assert!(d
        .log()
        .contains(&format!("TLS established, client \"{CLIENT_ID}\"")));
    drop(d);
    assert!(std::fs::read(dir.path().join("disk.img")).unwrap() == data);
}

#[test]
fn qemu_img_copies_into_a_tls_secondary_over_tcp_and_compares_identical() {
    qemu_copy_into_tls_secondary(Link::Tcp(free_port()));
}

#[test]
fn qemu_img_copies_into_a_tls_secondary_over_unix_and_compares_identical() {
    let dir = tempfile::tempdir().unwrap();
    qemu_copy_into_tls_secondary(Link::Unix(dir.path().join("nbd.sock")));
}

fn colo_blk_client_into_qemu_nbd_tls(link: Link) {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let image = dir.path().join("qemu.img");
    std::fs::write(&image, vec![0u8; SIZE as usize]).unwrap();
    let server = qemu_nbd(
        &link,
        &image,
        Some(x509_object(&certs.join("server"), "server")),
    );
    let client = Client::connect_to(&link.uri(), client_tls(&certs.join("client")))
        .expect("TLS connection to qemu-nbd");
    write_through_and_compare(client, server, &image, SIZE, 1, "TLS");
}

#[test]
fn colo_blk_client_writes_into_qemu_nbd_over_tls_on_tcp_and_qemu_img_compare_agrees() {
    colo_blk_client_into_qemu_nbd_tls(Link::Tcp(free_port()));
}

#[test]
fn colo_blk_client_writes_into_qemu_nbd_over_tls_on_unix_and_qemu_img_compare_agrees() {
    let dir = tempfile::tempdir().unwrap();
    colo_blk_client_into_qemu_nbd_tls(Link::Unix(dir.path().join("nbd.sock")));
}

/// Greeting read, fixed newstyle + no zeroes answered.
fn plain_hello(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s
}

/// STARTTLS then a TLS handshake with a client certificate rustls would
/// never let our own loader accept (an expired one): only the server can
/// refuse it. Returns whether the session got as far as a reply inside TLS.
fn raw_tls_client(port: u16, ca: &Path, cert_dir: &Path) -> bool {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let certs: Vec<_> = CertificateDer::pem_file_iter(cert_dir.join("client-cert.pem"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(cert_dir.join("client-key.pem")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .unwrap();
    let mut s = plain_hello(port);
    send_option(&mut s, 5, &[]);
    assert_eq!(read_reply(&mut s), (5, 1), "STARTTLS acknowledged");
    let conn =
        rustls::ClientConnection::new(Arc::new(cfg), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, s);
    send_option(&mut tls, 3, &[]); // NBD_OPT_LIST
    let mut h = [0u8; 20];
    tls.read_exact(&mut h).is_ok()
}

#[test]
fn a_tls_secondary_refuses_untrusted_expired_missing_and_unauthorised_clients_and_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let port = free_port();
    let link = Link::Tcp(port);
    let d = tls_secondary(dir.path(), &link, &certs.join("server"), &[CLIENT_ID]);
    let disk = dir.path().join("disk.img");
    let target = link.qemu_opts(TLS);
    let attempt = |creds: &str| {
        let obj = x509_object(&certs.join(creds), "client");
        let (ok, out) = qemu(
            "qemu-io",
            &[
                "--object",
                &obj,
                "--image-opts",
                &target,
                "-c",
                "write -P 0x5a 0 64k",
            ],
        );
        assert!(!ok, "{creds}: qemu-io succeeded: {out}");
        out
    };

    // A client that trusts another CA rejects our certificate.
    let out = attempt("other-ca");
    assert!(out.contains("certificate") || out.contains("TLS"), "{out}");
    wait_log(&d, "TLS handshake failed");

    // No client certificate: the server asks for one and gets none.
    let before = d.log().len();
    attempt("nocert");
    wait_log(&d, "no certificates");
    assert!(d.log().len() > before);

    // Trusted CA, identity not listed.
    attempt("intruder");
    wait_log(
        &d,
        "client identity \"C=GB,O=Example,CN=intruder\" is not authorised",
    );

    // Expired client certificate (QEMU refuses to even load it, so a raw
    // rustls client presents it).
    assert!(!raw_tls_client(
        port,
        &certs.join("client/ca-cert.pem"),
        &certs.join("expired")
    ));
    wait_log(&d, "xpired");

    // Plain text: QEMU's client without TLS is told TLS is required.
    let (ok, out) = qemu(
        "qemu-io",
        &[
            "--image-opts",
            &link.qemu_opts(Tls::Plain),
            "-c",
            "write -P 0x5a 0 64k",
        ],
    );
    assert!(!ok && out.contains("TLS"), "{out}");
    wait_log(&d, "NBD_OPT_GO before STARTTLS refused: TLS is required");

    // A raw plain client: TLS_REQD for GO, then EXPORT_NAME hangs up.
    let mut s = plain_hello(port);
    send_option(
        &mut s,
        7,
        &[0, 0, 0, 7, b'p', b'a', b'r', b'e', b'n', b't', b'0', 0, 0],
    );
    assert_eq!(
        read_reply(&mut s),
        (7, (1 << 31) | 5),
        "NBD_REP_ERR_TLS_REQD"
    );
    send_option(&mut s, 1, b"parent0");
    let mut rest = Vec::new();
    let n = s.read_to_end(&mut rest).unwrap_or(0);
    assert_eq!(n, 0, "EXPORT_NAME before STARTTLS must end the connection");
    wait_log(&d, "NBD_OPT_EXPORT_NAME before STARTTLS");

    assert!(all_zero(&disk), "a refused client wrote to the disk");
    // The control case: the authorised client does get in.
    let obj = x509_object(&certs.join("client"), "client");
    let (ok, out) = qemu(
        "qemu-io",
        &[
            "--object",
            &obj,
            "--image-opts",
            &target,
            "-c",
            "write -P 0x5a 0 64k",
        ],
    );
    assert!(ok, "{out}");
    drop(d);
    assert!(!all_zero(&disk));
}

/// Forwards a connection to `to`, rewriting the server's first option reply
/// (the STARTTLS ACK) into NBD_REP_ERR_UNSUP: a downgrade attempt.
fn tampering_proxy(to: u16) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        // Bounded: at most two clients in this test.
        for _ in 0..2 {
            let Ok((mut c, _)) = l.accept() else { return };
            let Ok(mut s) = TcpStream::connect(("127.0.0.1", to)) else {
                return;
            };
            let (mut c2, mut s2) = (c.try_clone().unwrap(), s.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c2, &mut s2);
                let _ = s2.shutdown(std::net::Shutdown::Both);
            });
            std::thread::spawn(move || {
                // The greeting passes; the reply after it is rewritten.
                let mut greeting = [0u8; 18];
                if s.read_exact(&mut greeting).is_err() || c.write_all(&greeting).is_err() {
                    return;
                }
                let mut reply = [0u8; 20];
                if s.read_exact(&mut reply).is_err() {
                    return;
                }
                reply[12..16].copy_from_slice(&((1u32 << 31) | 1).to_be_bytes());
                let _ = c.write_all(&reply);
                let _ = std::io::copy(&mut s, &mut c);
                let _ = c.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    port
}

#[test]
fn tls_clients_refuse_a_plain_server_and_a_tampered_starttls_reply() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let image = dir.path().join("plain.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let plain = Link::Tcp(free_port());
    let server = qemu_nbd(&plain, &image, None);
    let err = Client::connect_to(&plain.uri(), client_tls(&certs.join("client")))
        .expect_err("a TLS client must not use a plain server");
    assert!(err.to_string().contains("refused STARTTLS"), "{err}");
    drop(server);
    assert!(all_zero(&image));

    // A TLS secondary behind a proxy that rewrites the STARTTLS ACK.
    let tls_port = free_port();
    let d = tls_secondary(dir.path(), &Link::Tcp(tls_port), &certs.join("server"), &[]);
    let proxy = Link::Tcp(tampering_proxy(tls_port));
    let err = Client::connect_to(&proxy.uri(), client_tls(&certs.join("client")))
        .expect_err("a tampered STARTTLS reply must be refused");
    assert!(
        err.to_string().contains("not continuing without TLS"),
        "{err}"
    );
    let obj = x509_object(&certs.join("client"), "client");
    let (ok, out) = qemu(
        "qemu-io",
        &[
            "--object",
            &obj,
            "--image-opts",
            &proxy.qemu_opts(TLS),
            "-c",
            "write -P 0x5a 0 64k",
        ],
    );
    assert!(!ok, "QEMU accepted a downgrade: {out}");
    drop(d);
    assert!(all_zero(&dir.path().join("disk.img")));
}

#[test]
fn bad_credentials_and_insecure_listeners_refuse_to_start_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let sock = dir.path().join("v.sock");
    let disk = dir.path().join("d.img");
    let nbd = format!("unix:{}", dir.path().join("n.sock").display());
    let secondary = |creds: &Path| {
        let c = creds.display().to_string();
        refused_1m(
            &sock,
            &disk,
            &[
                "--mode",
                "secondary",
                "--nbd-listen",
                &nbd,
                "--tls-creds-x509",
                &c,
            ],
            &[],
        )
    };
    let copy = |name: &str| {
        let to = dir.path().join(name);
        std::fs::create_dir_all(&to).unwrap();
        for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
            std::fs::copy(certs.join("server").join(f), to.join(f)).unwrap();
        }
        to
    };
    use std::os::unix::fs::PermissionsExt;

    let missing = copy("missing");
    std::fs::remove_file(missing.join("server-key.pem")).unwrap();
    let (code, err) = secondary(&missing);
    assert!(
        code != 0 && err.contains("server-key.pem is missing"),
        "{err}"
    );

    let open = copy("open");
    std::fs::set_permissions(
        open.join("server-key.pem"),
        PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let (code, err) = secondary(&open);
    assert!(code != 0 && err.contains("chmod 600"), "{err}");

    let mismatch = copy("mismatch");
    std::fs::copy(
        certs.join("intruder/client-key.pem"),
        mismatch.join("server-key.pem"),
    )
    .unwrap();
    let (code, err) = secondary(&mismatch);
    assert!(code != 0 && err.contains("does not match"), "{err}");

    let (code, err) = refused_1m(
        &sock,
        &disk,
        &[
            "--mode",
            "primary",
            "--secondary",
            "nbd://127.0.0.1:1/parent0",
            "--tls-creds-x509",
            certs.join("expired").to_str().unwrap(),
        ],
        &[],
    );
    assert!(code != 0 && err.contains("expired on"), "{err}");

    let (code, err) = refused_1m(
        &sock,
        &disk,
        &["--mode", "secondary", "--nbd-listen", "tcp:0.0.0.0:10809"],
        &[],
    );
    assert!(code == 2 && err.contains("--nbd-insecure"), "{err}");
    assert!(!sock.exists());
}

#[test]
fn sighup_reloads_credentials_for_new_sessions_and_keeps_the_established_one() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let live = dir.path().join("live");
    std::fs::create_dir_all(&live).unwrap();
    let install = |from: &str| {
        for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
            std::fs::copy(certs.join(from).join(f), live.join(f)).unwrap();
        }
    };
    install("server");
    let link = Link::Tcp(free_port());
    let d = tls_secondary(dir.path(), &link, &live, &[]);
    let old = Client::connect_to(&link.uri(), client_tls(&certs.join("client"))).unwrap();
    old.write_at(0, &[1u8; 4096]).unwrap();

    // Rotate to the second CA's server certificate and CA.
    install("other-ca");
    d.signal(libc::SIGHUP);
    wait_log(&d, "SIGHUP: TLS credentials reloaded");

    let refused = Client::connect_to(&link.uri(), client_tls(&certs.join("client")));
    assert!(refused.is_err(), "the old CA's client still got in");
    let new = Client::connect_to(&link.uri(), client_tls(&certs.join("other-ca")))
        .expect("a client of the new CA");
    new.write_at(8192, &[2u8; 4096]).unwrap();
    // The session from before the reload carries on.
    old.write_at(4096, &[3u8; 4096]).unwrap();
    let mut back = vec![0u8; 12288];
    old.read_at(0, &mut back).unwrap();
    assert!(back[..4096].iter().all(|&b| b == 1));
    assert!(back[4096..8192].iter().all(|&b| b == 3));
    assert!(back[8192..].iter().all(|&b| b == 2));

    // A broken directory is refused and the current credentials stay.
    std::fs::remove_file(live.join("server-key.pem")).unwrap();
    d.signal(libc::SIGHUP);
    wait_log(&d, "keeping the previous credentials");
    Client::connect_to(&link.uri(), client_tls(&certs.join("other-ca")))
        .expect("still served with the reloaded credentials");
}

/// The identity string given to --tls-authz is the one QEMU's authz-simple
/// matches: qemu-nbd with that identity lets our client in and refuses the
/// intruder, as a colo-blk secondary with the same --tls-authz does.
#[test]
fn a_tls_authz_identity_means_the_same_to_qemu_authz_simple() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let image = dir.path().join("qemu.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let link = Link::Tcp(free_port());
    // QEMU's option syntax doubles the commas inside a value.
    let authz = format!(
        "authz-simple,id=auth0,identity={}",
        CLIENT_ID.replace(',', ",,")
    );
    let server_creds = x509_object(&certs.join("server"), "server");
    let _server = qemu_nbd_with(
        &link,
        &image,
        &[
            "--object",
            &authz,
            "--object",
            &server_creds,
            "--tls-creds",
            "tls0",
            "--tls-authz",
            "auth0",
        ],
    );
    let ok = Client::connect_to(&link.uri(), client_tls(&certs.join("client")))
        .expect("QEMU's authz-simple accepts the identity colo-blk renders");
    ok.write_at(0, &[7u8; 4096]).unwrap();
    drop(ok);
    let refused = Client::connect_to(&link.uri(), client_tls(&certs.join("intruder")));
    assert!(refused.is_err(), "QEMU let the intruder in");
}
