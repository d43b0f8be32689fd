//! Malformed handshakes and requests sent from a raw socket: each case gets
//! the reply the protocol prescribes (or a clean disconnect), nothing is
//! written that should not be, and the server keeps serving a good client.

mod nbd_util;

use colo_blk::block::testing::{Gate, Intercept, Op, OpenOnDrop};
use colo_blk::nbd::wire::transmission::REPLY_TYPE_NONE;
use colo_blk::nbd::wire::*;
use colo_blk::nbd::ServerOptions;
use nbd_util::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

const SIZE: u64 = 4 << 20;

/// A hand-driven NBD connection.
struct Raw(UnixStream);

impl Raw {
    /// Connects and reads the greeting.
    fn connect(s: &Served) -> Raw {
        let sock = UnixStream::connect(&s.socket).unwrap();
        // Generous: only bounds a hung test, never decides an outcome.
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut r = Raw(sock);
        let mut g = [0u8; Greeting::LEN];
        r.0.read_exact(&mut g).unwrap();
        let g = Greeting::decode(&g).unwrap();
        assert_eq!(g.flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        r
    }

    /// Connects and sends good client flags.
    fn newstyle(s: &Served) -> Raw {
        let mut r = Raw::connect(s);
        r.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        r
    }

    fn send(&mut self, b: &[u8]) {
        self.0.write_all(b).unwrap();
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let h = OptionHeader {
            option,
            len: data.len() as u32,
        };
        self.send(&h.encode());
        self.send(data);
    }

    fn option_reply(&mut self) -> (OptionReplyHeader, Vec<u8>) {
        let mut h = [0u8; OptionReplyHeader::LEN];
        self.0.read_exact(&mut h).unwrap();
        let h = OptionReplyHeader::decode(&h).unwrap();
        let mut data = vec![0u8; h.len as usize];
        self.0.read_exact(&mut data).unwrap();
        (h, data)
    }

    /// True once the server has closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }

    /// Full negotiation: structured replies, base:allocation, GO.
    fn go(s: &Served, structured: bool) -> Raw {
        let mut r = Raw::newstyle(s);
        if structured {
            r.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(r.option_reply().0.reply, REP_ACK);
            let m = MetaContextRequest {
                export: "parent0".into(),
                queries: vec![BASE_ALLOCATION.into()],
            };
            r.option(OPT_SET_META_CONTEXT, &m.encode());
            assert_eq!(r.option_reply().0.reply, REP_META_CONTEXT);
            assert_eq!(r.option_reply().0.reply, REP_ACK);
        }
        let go = InfoRequest {
            name: "parent0".into(),
            requests: vec![INFO_BLOCK_SIZE],
        };
        r.option(OPT_GO, &go.encode());
        loop {
            let (h, _) = r.option_reply();
            match h.reply {
                REP_INFO => continue,
                REP_ACK => break,
                other => panic!("GO failed: {other:#x}"),
            }
        }
        r
    }

    fn request(&mut self, kind: Command, flags: u16, cookie: u64, offset: u64, len: u32) {
        self.send(&Request::new(kind, flags, cookie, offset, len).encode());
    }

    /// Reads one reply; returns (cookie, error, payload of data or chunk).
    fn reply(&mut self, read_len: usize) -> (u64, u32, Vec<u8>) {
        self.reply_by(|_| read_len)
    }

    /// Like `reply`, with the data length of a simple READ reply per cookie.
    fn reply_by(&mut self, read_len: impl Fn(u64) -> usize) -> (u64, u32, Vec<u8>) {
        let mut magic = [0u8; 4];
        self.0.read_exact(&mut magic).unwrap();
        let kind = ReplyKind::from_magic(u32::from_be_bytes(magic)).unwrap();
        let mut rest = vec![0u8; kind.header_len() - 4];
        self.0.read_exact(&mut rest).unwrap();
        let whole: Vec<u8> = magic.iter().chain(rest.iter()).copied().collect();
        match kind {
            ReplyKind::Simple => {
                let r = SimpleReply::decode(&whole).unwrap();
                let mut data = vec![0u8; if r.error == 0 { read_len(r.cookie) } else { 0 }];
                self.0.read_exact(&mut data).unwrap();
                (r.cookie, r.error, data)
            }
            ReplyKind::Structured => {
                let h = ChunkHeader::decode(&whole).unwrap();
                assert_ne!(h.flags & REPLY_FLAG_DONE, 0, "one chunk per reply expected");
                let mut payload = vec![0u8; h.len as usize];
                self.0.read_exact(&mut payload).unwrap();
                if h.is_error() {
                    let e = ErrorChunk::decode(h.kind, &payload).unwrap();
                    (h.cookie, e.error, e.message.into_bytes())
                } else if h.kind == REPLY_TYPE_NONE {
                    (h.cookie, 0, vec![])
                } else {
                    (h.cookie, 0, payload)
                }
            }
        }
    }
}

/// A good client still works: write and read back through QEMU.
fn still_serves(s: &Served) {
    qemu_io(&s.uri(), &["write -P 0x42 3M 4k", "read -P 0x42 3M 4k"]);
}

#[test]
fn unknown_client_flags_are_disconnected() {
    let s = Served::raw(SIZE);
    let mut r = Raw::connect(&s);
    r.send(&(1u32 << 7 | FLAG_C_FIXED_NEWSTYLE).to_be_bytes());
    assert!(r.closed());
    still_serves(&s);
}

#[test]
fn garbage_instead_of_an_option_magic_is_disconnected() {
    let s = Served::raw(SIZE);
    let mut r = Raw::newstyle(&s);
    r.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(r.closed());
    still_serves(&s);
}

#[test]
fn unknown_and_unsupported_options_get_err_unsup_and_negotiation_goes_on() {
    let s = Served::raw(SIZE);
    let mut r = Raw::newstyle(&s);
    for opt in [99u32, OPT_STARTTLS, OPT_EXTENDED_HEADERS, 4] {
        r.option(opt, b"some data");
        let (h, _) = r.option_reply();
        assert_eq!((h.option, h.reply), (opt, REP_ERR_UNSUP));
    }
    r.option(OPT_LIST, &[]);
    let (h, data) = r.option_reply();
    assert_eq!(h.reply, REP_SERVER);
    assert_eq!(ServerEntry::decode(&data).unwrap().name, "parent0");
    assert_eq!(r.option_reply().0.reply, REP_ACK);
    r.option(OPT_ABORT, &[]);
    assert_eq!(r.option_reply().0.reply, REP_ACK);
    assert!(r.closed());
    still_serves(&s);
}

#[test]
fn malformed_option_data_gets_err_invalid() {
    let s = Served::raw(SIZE);
    let mut r = Raw::newstyle(&s);
    // GO whose name length runs past the data.
    let mut bad_go = InfoRequest {
        name: "parent0".into(),
        requests: vec![],
    }
    .encode();
    bad_go[..4].copy_from_slice(&500u32.to_be_bytes());
    r.option(OPT_GO, &bad_go);
    assert_eq!(r.option_reply().0.reply, REP_ERR_INVALID);
    // LIST and STRUCTURED_REPLY take no data.
    r.option(OPT_LIST, b"x");
    assert_eq!(r.option_reply().0.reply, REP_ERR_INVALID);
    r.option(OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(r.option_reply().0.reply, REP_ERR_INVALID);
    // SET_META_CONTEXT before structured replies.
    let m = MetaContextRequest {
        export: "parent0".into(),
        queries: vec![BASE_ALLOCATION.into()],
    };
    r.option(OPT_SET_META_CONTEXT, &m.encode());
    assert_eq!(r.option_reply().0.reply, REP_ERR_INVALID);
    // A query count larger than the data.
    r.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(r.option_reply().0.reply, REP_ACK);
    let mut bad_meta = m.encode();
    let at = 4 + "parent0".len();
    bad_meta[at..at + 4].copy_from_slice(&1000u32.to_be_bytes());
    r.option(OPT_SET_META_CONTEXT, &bad_meta);
    assert_eq!(r.option_reply().0.reply, REP_ERR_INVALID);
    // Unknown export in GO and in SET_META_CONTEXT.
    let unknown = InfoRequest {
        name: "nosuch".into(),
        requests: vec![],
    };
    r.option(OPT_GO, &unknown.encode());
    assert_eq!(r.option_reply().0.reply, REP_ERR_UNKNOWN);
    // Still negotiating: a correct GO now succeeds.
    let good = InfoRequest {
        name: "parent0".into(),
        requests: vec![],
    };
    r.option(OPT_INFO, &good.encode());
    let (h, data) = r.option_reply();
    assert_eq!(h.reply, REP_INFO);
    assert!(matches!(
        Info::decode(&data).unwrap(),
        Info::Export { size: SIZE, .. }
    ));
    still_serves(&s);
}

#[test]
fn oversized_options_are_skipped_or_disconnected() {
    let s = Served::raw(SIZE);
    let mut r = Raw::newstyle(&s);
    r.option(OPT_INFO, &vec![0u8; 1 << 20]);
    assert_eq!(r.option_reply().0.reply, REP_ERR_TOO_BIG);
    // Still in sync after the skipped data.
    r.option(OPT_LIST, &[]);
    assert_eq!(r.option_reply().0.reply, REP_SERVER);
    assert_eq!(r.option_reply().0.reply, REP_ACK);
    // Announcing 1 GiB of option data is treated as an attack.
    r.send(
        &OptionHeader {
            option: OPT_INFO,
            len: 1 << 30,
        }
        .encode(),
    );
    assert!(r.closed());
    still_serves(&s);
}

#[test]
fn export_name_for_an_unknown_export_disconnects() {
    let s = Served::raw(SIZE);
    let mut r = Raw::newstyle(&s);
    r.option(OPT_EXPORT_NAME, b"nosuch");
    assert!(r.closed());
    // The old-style EXPORT_NAME path with the right name works (no zeroes).
    let mut r = Raw::newstyle(&s);
    r.option(OPT_EXPORT_NAME, b"parent0");
    let mut reply = [0u8; ExportNameReply::LEN];
    r.0.read_exact(&mut reply).unwrap();
    let reply = ExportNameReply::decode(&reply).unwrap();
    assert_eq!(reply.size, SIZE);
    assert_ne!(reply.flags & FLAG_SEND_FLUSH, 0);
    r.request(Command::Read, 0, 1, 0, 512);
    let (cookie, err, data) = r.reply(512);
    assert_eq!((cookie, err, data.len()), (1, 0, 512));
    still_serves(&s);
}

#[test]
fn silent_client_is_dropped_after_the_handshake_timeout() {
    let opts = ServerOptions {
        handshake_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let s = Served::with(SIZE, opts, |d| d);
    let mut r = Raw::connect(&s);
    // Never send client flags.
    assert!(r.closed());
    still_serves(&s);
}

#[test]
fn a_newcomer_beyond_the_limit_is_closed_when_every_slot_stays_working() {
    // Two established clients that just worked are never evicted: the third
    // waits, gets no greeting, and is closed once the handshake deadline
    // passes (slow negotiators would be evicted instead: nbd_slowloris.rs).
    let opts = ServerOptions {
        max_connections: 2,
        handshake_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let s = Served::with(SIZE, opts, |d| d);
    let _a = Raw::go(&s, false);
    let _b = Raw::go(&s, false);
    let mut c = UnixStream::connect(&s.socket).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 1];
    assert!(matches!(c.read(&mut buf), Ok(0) | Err(_)));
    drop((_a, _b));
    for _ in 0..500 {
        if s.server().connections() == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    still_serves(&s);
}

#[test]
fn bad_requests_get_error_replies_and_the_connection_goes_on() {
    let s = Served::raw(SIZE);
    for structured in [false, true] {
        let mut r = Raw::go(&s, structured);
        // Unknown command.
        r.send(
            &Request {
                flags: 0,
                kind: 42,
                cookie: 10,
                offset: 0,
                len: 0,
            }
            .encode(),
        );
        let (cookie, err, _) = r.reply(0);
        assert_eq!((cookie, err), (10, EINVAL));
        // Read past the end, read with an overflowing offset, oversized read.
        r.request(Command::Read, 0, 11, SIZE - 512, 1024);
        assert_eq!(r.reply(0).1, EINVAL);
        r.request(Command::Read, 0, 12, u64::MAX - 10, 512);
        assert_eq!(r.reply(0).1, EINVAL);
        r.request(Command::Read, 0, 13, 0, 33 << 20);
        assert_eq!(r.reply(0).1, EOVERFLOW);
        // A flag that does not belong to the command.
        r.request(Command::Flush, CMD_FLAG_REQ_ONE, 14, 0, 0);
        assert_eq!(r.reply(0).1, EINVAL);
        r.request(Command::Read, 1 << 9, 15, 0, 512);
        assert_eq!(r.reply(0).1, EINVAL);
        // Write past the end: ENOSPC, payload consumed, nothing written.
        r.request(Command::Write, 0, 16, SIZE - 512, 4096);
        r.send(&[0xaa; 4096]);
        assert_eq!(r.reply(0).1, ENOSPC);
        // Oversized write: refused, its 33 MiB skipped, stream still in sync.
        r.request(Command::Write, 0, 17, 0, 33 << 20);
        r.send(&vec![0xbb; 33 << 20]);
        assert_eq!(r.reply(0).1, EINVAL);
        // Write-zeroes past the end; trim past the end.
        r.request(Command::WriteZeroes, 0, 18, SIZE, 512);
        assert_eq!(r.reply(0).1, ENOSPC);
        r.request(Command::Trim, 0, 19, SIZE - 1, 2);
        assert_eq!(r.reply(0).1, EINVAL);
        // Block status needs a selected context.
        r.request(Command::BlockStatus, 0, 20, 0, 4096);
        let (_, err, _) = r.reply(0);
        assert_eq!(err, if structured { 0 } else { EINVAL });
        // Fast zero is refused as documented; plain write-zeroes works.
        r.request(Command::WriteZeroes, CMD_FLAG_FAST_ZERO, 21, 0, 4096);
        assert_eq!(r.reply(0).1, ENOTSUP);
        // After all that, a good write and read on the same connection.
        r.request(Command::Write, CMD_FLAG_FUA, 22, 8192, 512);
        r.send(&[0x5e; 512]);
        let (cookie, err, _) = r.reply(0);
        assert_eq!((cookie, err), (22, 0));
        r.request(Command::Read, 0, 23, 8192, 512);
        let (cookie, err, data) = r.reply(512);
        assert_eq!((cookie, err), (23, 0));
        let data = if structured { data[8..].to_vec() } else { data };
        assert_eq!(data, vec![0x5e; 512]);
        r.request(Command::Disc, 0, 24, 0, 0);
        assert!(r.closed());
    }
    let disk = s.image_bytes();
    assert!(
        disk[SIZE as usize - 4096..].iter().all(|&b| b == 0),
        "refused write landed"
    );
    assert!(!disk.contains(&0xbb), "oversized write landed");
    still_serves(&s);
}

#[test]
fn bad_request_magic_disconnects() {
    let s = Served::raw(SIZE);
    let mut r = Raw::go(&s, true);
    let mut raw = Request::new(Command::Read, 0, 1, 0, 512).encode();
    raw[0] = 0x12;
    r.send(&raw);
    assert!(r.closed());
    still_serves(&s);
}

#[test]
fn peer_vanishing_inside_a_write_payload_writes_nothing() {
    let s = Served::raw(SIZE);
    let mut r = Raw::go(&s, true);
    r.request(Command::Write, 0, 1, 1 << 20, 1 << 20);
    r.send(&vec![0xcd; 512 << 10]);
    drop(r);
    // Wait until the server has finished with that connection.
    for _ in 0..500 {
        if s.server().connections() == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(s.server().connections(), 0);
    assert!(!s.image_bytes().contains(&0xcd), "half a write was applied");
    still_serves(&s);
}

#[test]
fn peer_vanishing_inside_a_request_header_is_survived() {
    let s = Served::raw(SIZE);
    let mut r = Raw::go(&s, false);
    let raw = Request::new(Command::Write, 0, 1, 0, 512).encode();
    r.send(&raw[..13]);
    drop(r);
    still_serves(&s);
}

#[test]
fn block_status_reports_holes_and_data_with_and_without_req_one() {
    let s = Served::raw(SIZE);
    let mut r = Raw::go(&s, true);
    r.request(Command::Write, 0, 1, 1 << 20, 1 << 20);
    r.send(&vec![7u8; 1 << 20]);
    assert_eq!(r.reply(0).1, 0);
    r.request(Command::BlockStatus, 0, 2, 0, SIZE as u32);
    let (_, err, payload) = r.reply(0);
    assert_eq!(err, 0);
    let bs = BlockStatusChunk::decode(&payload).unwrap();
    assert_eq!(
        bs.extents,
        vec![
            (1 << 20, STATE_HOLE | STATE_ZERO),
            (1 << 20, 0),
            (2 << 20, STATE_HOLE | STATE_ZERO)
        ]
    );
    r.request(Command::BlockStatus, CMD_FLAG_REQ_ONE, 3, 4096, 8192);
    let bs = BlockStatusChunk::decode(&r.reply(0).2).unwrap();
    assert_eq!(bs.extents, vec![(8192, STATE_HOLE | STATE_ZERO)]);
}

#[test]
fn replies_go_out_of_order_while_a_slow_request_runs() {
    // Reads at offset 0 wait until the test opens the gate.
    let gate = Arc::new(Gate::closed());
    let g = gate.clone();
    let s = Served::with(SIZE, ServerOptions::default(), move |d| {
        Arc::new(Intercept::new(d, move |op, offset, _| {
            if op == Op::Read && offset == 0 {
                g.pass();
            }
            Ok(())
        }))
    });
    // Opens the gate however the test ends, so the server can shut down.
    let _open = OpenOnDrop(gate.clone());
    let mut r = Raw::go(&s, false);
    r.request(Command::Read, 0, 100, 0, 4096); // blocks in the device
    r.request(Command::Read, 0, 101, 8192, 4096);
    r.request(Command::Write, 0, 102, 16384, 512);
    r.send(&[1u8; 512]);
    let by_cookie = |c: u64| if c == 102 { 0 } else { 4096 };
    let mut first_two = [r.reply_by(by_cookie).0, r.reply_by(by_cookie).0];
    first_two.sort();
    assert_eq!(
        first_two,
        [101, 102],
        "requests behind the slow read must finish first"
    );
    gate.open();
    assert_eq!(r.reply(4096).0, 100);
}
