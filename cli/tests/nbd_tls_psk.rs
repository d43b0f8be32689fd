//! NBD over TLS with pre-shared keys (`--tls-creds-psk`, QEMU's keys.psk)
//! against QEMU's own PSK TLS in both directions, on TCP and unix sockets,
//! and the refusals: a wrong key, an unknown username, a username not in
//! --tls-authz, plain text, bad keys.psk files and a missing GnuTLS at start,
//! and SIGHUP reloading keys.psk while a session stays up. The secondary is
//! the real `colo-blk serve` binary, so the log lines are checked too.

mod common;
mod tls_util;

use colo_blk::block::BlockDevExt;
use colo_blk::nbd::{Client, ClientOptions};
use colo_blk::tls::ClientTls;
use common::{free_port, pattern, Daemon, PATIENCE};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use tls_util::{
    all_zero, make_certs, qemu, qemu_nbd, read_reply, refused_1m, send_option, wait_log,
    write_through_and_compare, Link, Tls,
};

const SIZE: u64 = 16 << 20;
/// The credentials QEMU uses here.
const TLS: Tls = Tls::Psk;
/// The primary's username in make-certs.sh's keys.psk files.
const USER: &str = "primary";

/// QEMU's `tls-creds-psk` object for the directory `dir` (holding keys.psk).
fn psk_object(dir: &Path, endpoint: &str, username: Option<&str>) -> String {
    let user = username.map_or(String::new(), |u| format!(",username={u}"));
    format!(
        "tls-creds-psk,id=tls0,dir={},endpoint={endpoint}{user}",
        dir.display()
    )
}

/// A `colo-blk serve --mode secondary` serving its NBD export over TLS-PSK.
fn psk_secondary(dir: &Path, link: &Link, keys: &Path, authz: &[&str]) -> Daemon {
    let disk = dir.join("disk.img");
    let listen = link.listen();
    let keys = keys.display().to_string();
    let mut extra = vec![
        "--size",
        "16M",
        "--mode",
        "secondary",
        "--nbd-listen",
        &listen,
        "--tls-creds-psk",
        &keys,
    ];
    if !authz.is_empty() {
        extra.push("--tls-authz");
        extra.extend_from_slice(authz);
    }
    let d = Daemon::serve(dir, &disk, &extra);
    link.wait_ready();
    d
}

fn client_psk(keys: &Path, username: &str) -> ClientOptions {
    ClientOptions {
        tls: Some(Arc::new(
            ClientTls::load_psk(keys, username).expect("client keys.psk"),
        )),
        ..ClientOptions::default()
    }
}

fn qemu_copy_into_psk_secondary(link: Link) {
    let dir = tempfile::tempdir().unwrap();
    let creds = make_certs(dir.path());
    // The server is given the file itself; QEMU gets the directory.
    let d = psk_secondary(dir.path(), &link, &creds.join("psk/keys.psk"), &[USER]);
    let src = dir.path().join("src.img");
    let mut data = vec![0u8; SIZE as usize];
    for (i, chunk) in data.chunks_mut(1 << 20).enumerate() {
        if i % 3 != 1 {
            chunk.copy_from_slice(&pattern(i as u64 + 11, 1 << 20));
        }
    }
    std::fs::write(&src, &data).unwrap();
    let obj = psk_object(&creds.join("psk-client"), "client", Some(USER));
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
    assert!(ok, "qemu-img convert over TLS-PSK: {out}\n{}", d.log());
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
    let log = d.log();
    assert!(
        // ECDHE (forward secrecy) and AES-128-GCM even though QEMU's client
        // lists ChaCha20 first (the server's order wins).
        log.contains(&format!(
            "TLS established, client \"{USER}\" (ECDHE-PSK (TLS1.3)--(AES-128-GCM))"
        )),
        "{log}"
    );
    drop(d);
    assert!(std::fs::read(dir.path().join("disk.img")).unwrap() == data);
}

#[test]
fn qemu_img_copies_into_a_psk_secondary_over_tcp_and_compares_identical() {
    qemu_copy_into_psk_secondary(Link::Tcp(free_port()));
}

#[test]
fn qemu_img_copies_into_a_psk_secondary_over_unix_and_compares_identical() {
    let dir = tempfile::tempdir().unwrap();
    qemu_copy_into_psk_secondary(Link::Unix(dir.path().join("nbd.sock")));
}

fn colo_blk_client_into_qemu_nbd_psk(link: Link) {
    let dir = tempfile::tempdir().unwrap();
    let creds = make_certs(dir.path());
    let image = dir.path().join("qemu.img");
    std::fs::write(&image, vec![0u8; SIZE as usize]).unwrap();
    let server = qemu_nbd(
        &link,
        &image,
        Some(psk_object(&creds.join("psk"), "server", None)),
    );
    // The client is given QEMU's directory.
    let client = Client::connect_to(&link.uri(), client_psk(&creds.join("psk-client"), USER))
        .expect("TLS-PSK connection to qemu-nbd");
    write_through_and_compare(client, server, &image, SIZE, 21, "TLS-PSK");
}

#[test]
fn colo_blk_client_writes_into_qemu_nbd_over_psk_on_tcp_and_qemu_img_compare_agrees() {
    colo_blk_client_into_qemu_nbd_psk(Link::Tcp(free_port()));
}

#[test]
fn colo_blk_client_writes_into_qemu_nbd_over_psk_on_unix_and_qemu_img_compare_agrees() {
    let dir = tempfile::tempdir().unwrap();
    colo_blk_client_into_qemu_nbd_psk(Link::Unix(dir.path().join("nbd.sock")));
}

#[test]
fn a_psk_secondary_refuses_a_wrong_key_unknown_or_unauthorised_username_and_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let creds = make_certs(dir.path());
    let port = free_port();
    let link = Link::Tcp(port);
    let d = psk_secondary(dir.path(), &link, &creds.join("psk"), &[USER]);
    let disk = dir.path().join("disk.img");
    let target = link.qemu_opts(TLS);
    let attempt = |keys: &str, user: &str| {
        let obj = psk_object(&creds.join(keys), "client", Some(user));
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
        assert!(!ok, "{keys}: qemu-io succeeded: {out}");
        assert!(out.contains("TLS handshake failed"), "{keys}: {out}");
    };

    // The right username with another key.
    attempt("psk-wrongkey", USER);
    wait_log(
        &d,
        "PSK username \"primary\": An illegal parameter has been received; \
         the client's key does not match the one keys.psk holds for it",
    );
    // A username keys.psk does not have.
    attempt("psk-unknown", "stranger");
    wait_log(&d, "PSK username \"stranger\" is not in keys.psk");
    // In keys.psk, not in --tls-authz.
    attempt("psk-intruder", "intruder");
    wait_log(
        &d,
        "client identity \"intruder\" is not authorised (--tls-authz)",
    );

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
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
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

    // colo-blk's own client with the wrong key says why it may have failed.
    let err = Client::connect_to(&link.uri(), client_psk(&creds.join("psk-wrongkey"), USER))
        .expect_err("a wrong key must not get in");
    assert!(
        err.to_string().contains("TLS handshake failed") && err.to_string().contains("\"primary\""),
        "{err}"
    );

    assert!(all_zero(&disk), "a refused client wrote to the disk");
    // The control case: the authorised client does get in.
    let obj = psk_object(&creds.join("psk-client"), "client", Some(USER));
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

#[test]
fn psk_clients_refuse_a_plain_server_and_qemu_nbd_refuses_a_wrong_key() {
    let dir = tempfile::tempdir().unwrap();
    let creds = make_certs(dir.path());
    let image = dir.path().join("qemu.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let plain = Link::Tcp(free_port());
    let server = qemu_nbd(&plain, &image, None);
    let err = Client::connect_to(&plain.uri(), client_psk(&creds.join("psk-client"), USER))
        .expect_err("a PSK client must not use a plain server");
    assert!(err.to_string().contains("refused STARTTLS"), "{err}");
    drop(server);

    let link = Link::Tcp(free_port());
    let _server = qemu_nbd(
        &link,
        &image,
        Some(psk_object(&creds.join("psk"), "server", None)),
    );
    for (keys, user) in [("psk-wrongkey", USER), ("psk-unknown", "stranger")] {
        let err = Client::connect_to(&link.uri(), client_psk(&creds.join(keys), user))
            .expect_err("qemu-nbd let a wrong key in");
        let want = format!("a server that does not know username \"{user}\", or holds");
        assert!(
            err.to_string().contains("TLS handshake failed") && err.to_string().contains(&want),
            "{err}"
        );
    }
    assert!(all_zero(&image));
}

#[test]
fn bad_keys_psk_files_and_a_missing_gnutls_refuse_to_start_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let creds = make_certs(dir.path());
    let sock = dir.path().join("v.sock");
    let disk = dir.path().join("d.img");
    let nbd = format!("unix:{}", dir.path().join("n.sock").display());
    let secondary = |keys: &Path, env: &[(&str, &str)]| {
        let k = keys.display().to_string();
        refused_1m(
            &sock,
            &disk,
            &[
                "--mode",
                "secondary",
                "--nbd-listen",
                &nbd,
                "--tls-creds-psk",
                &k,
            ],
            env,
        )
    };
    let write = |name: &str, text: &str, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let f = d.join("keys.psk");
        std::fs::write(&f, text).unwrap();
        std::fs::set_permissions(&f, PermissionsExt::from_mode(mode)).unwrap();
        d
    };

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (code, err) = secondary(&empty, &[]);
    let want = format!("{} is missing", empty.join("keys.psk").display());
    assert!(code != 0 && err.contains(&want), "{err}");

    let open = write("open", "primary:00112233\n", 0o644);
    let (code, err) = secondary(&open, &[]);
    assert!(code != 0 && err.contains("chmod 600"), "{err}");

    let badhex = write("badhex", "# keys\nprimary:0011zz33\n", 0o600);
    let (code, err) = secondary(&badhex, &[]);
    assert!(
        code != 0 && err.contains("keys.psk:2: the key of \"primary\" is not"),
        "{err}"
    );
    assert!(!err.contains("0011zz33"), "the key leaked: {err}");

    // No GnuTLS: the flag fails at start, naming the library.
    let (code, err) = secondary(
        &creds.join("psk"),
        &[("COLO_BLK_LIBGNUTLS", "/nonexistent/libgnutls.so.30")],
    );
    assert!(
        code != 0 && err.contains("GnuTLS") && err.contains("libgnutls.so.30 cannot be loaded"),
        "{err}"
    );

    // The primary's username must have a line.
    let (code, err) = refused_1m(
        &sock,
        &disk,
        &[
            "--mode",
            "primary",
            "--secondary",
            "nbd://127.0.0.1:1/parent0",
            "--tls-creds-psk",
            creds.join("psk-client").to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        code != 0 && err.contains("username \"qemu\" not found in"),
        "{err}"
    );
    assert!(!sock.exists());
}

#[test]
fn sighup_reloads_keys_psk_for_new_sessions_and_keeps_the_established_one() {
    let dir = tempfile::tempdir().unwrap();
    let creds = make_certs(dir.path());
    let live = dir.path().join("live");
    std::fs::create_dir_all(&live).unwrap();
    let install = |text: &str| {
        use std::os::unix::fs::PermissionsExt;
        let f = live.join("keys.psk");
        std::fs::write(&f, text).unwrap();
        std::fs::set_permissions(&f, PermissionsExt::from_mode(0o600)).unwrap();
    };
    let keys_of = |name: &str| std::fs::read_to_string(creds.join(name).join("keys.psk")).unwrap();
    install(&keys_of("psk-client"));
    let link = Link::Tcp(free_port());
    let d = psk_secondary(dir.path(), &link, &live, &[]);
    let old = Client::connect_to(&link.uri(), client_psk(&creds.join("psk-client"), USER)).unwrap();
    old.write_at(0, &[1u8; 4096]).unwrap();

    // Rotate the primary's key.
    install(&keys_of("psk-wrongkey"));
    d.signal(libc::SIGHUP);
    wait_log(&d, "SIGHUP: TLS credentials reloaded");

    let refused = Client::connect_to(&link.uri(), client_psk(&creds.join("psk-client"), USER));
    assert!(refused.is_err(), "the old key still got in");
    let new = Client::connect_to(&link.uri(), client_psk(&creds.join("psk-wrongkey"), USER))
        .expect("the new key");
    new.write_at(8192, &[2u8; 4096]).unwrap();
    // The session from before the reload carries on.
    old.write_at(4096, &[3u8; 4096]).unwrap();
    let mut back = vec![0u8; 12288];
    old.read_at(0, &mut back).unwrap();
    assert!(back[..4096].iter().all(|&b| b == 1));
    assert!(back[4096..8192].iter().all(|&b| b == 3));
    assert!(back[8192..].iter().all(|&b| b == 2));

    // A broken file is refused and the current keys stay.
    install("primary:not-hex\n");
    d.signal(libc::SIGHUP);
    wait_log(&d, "keeping the previous credentials");
    Client::connect_to(&link.uri(), client_psk(&creds.join("psk-wrongkey"), USER))
        .expect("still served with the reloaded keys");
}
