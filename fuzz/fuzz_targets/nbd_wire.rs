//! The NBD wire parsers on arbitrary bytes, in both directions: what the
//! server decodes from a client (option headers and data, requests) and what
//! the client decodes from a server (greeting, option replies, export info,
//! simple and structured replies). Nothing may panic, and whatever decodes
//! must survive an encode/decode round trip unchanged.

#![no_main]

use colo_blk::nbd::wire::handshake::decode_export_name;
use colo_blk::nbd::wire::transmission::decode_offset_data_len;
use colo_blk::nbd::wire::*;
use libfuzzer_sys::fuzz_target;

macro_rules! round_trip {
    ($ty:ty, $buf:expr) => {
        if let Ok(v) = <$ty>::decode($buf) {
            let again = <$ty>::decode(&v.encode()).expect(concat!(stringify!($ty), " re-decodes"));
            assert_eq!(v, again, concat!(stringify!($ty), " round trip"));
        }
    };
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, buf)) = data.split_first() else {
        return;
    };
    match which % 16 {
        // Client -> server.
        0 => round_trip!(OptionHeader, buf),
        1 => round_trip!(InfoRequest, buf),
        2 => round_trip!(MetaContextRequest, buf),
        3 => {
            let _ = decode_export_name(buf);
        }
        4 => round_trip!(Request, buf),
        // Server -> client.
        5 => round_trip!(Greeting, buf),
        6 => round_trip!(OptionReplyHeader, buf),
        7 => {
            if let Ok(v) = ExportNameReply::decode(buf) {
                // The 124 zero bytes (without NO_ZEROES) are read apart.
                for no_zeroes in [false, true] {
                    let raw = v.encode(no_zeroes);
                    let (head, zeroes) = raw.split_at(ExportNameReply::LEN);
                    assert!(zeroes.iter().all(|&b| b == 0));
                    assert_eq!(zeroes.len(), if no_zeroes { 0 } else { 124 });
                    let again = ExportNameReply::decode(head).expect("re-decodes");
                    assert_eq!(v, again);
                }
            }
        }
        8 => round_trip!(Info, buf),
        9 => round_trip!(ServerEntry, buf),
        10 => round_trip!(MetaContextReply, buf),
        11 => round_trip!(SimpleReply, buf),
        12 => {
            if let Ok(h) = ChunkHeader::decode(buf) {
                assert_eq!(ChunkHeader::decode(&h.encode()).expect("re-decodes"), h);
                let _ = decode_offset_data_len(h.len);
            }
        }
        13 => round_trip!(OffsetHole, buf),
        14 => round_trip!(BlockStatusChunk, buf),
        _ => {
            let Some((&kind, rest)) = buf.split_first() else {
                return;
            };
            let kind = 1u16 << 15 | u16::from(kind % 4);
            if let Ok(v) = ErrorChunk::decode(kind, rest) {
                let again = ErrorChunk::decode(kind, &v.encode()).expect("re-decodes");
                assert_eq!(v, again);
            }
        }
    }
});
