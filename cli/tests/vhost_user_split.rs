//! vhost-user runs over a stream socket: a frontend may hand a message to the
//! kernel in several writes, and the backend must put it back together.

mod common;

use common::{sparse_image, Daemon};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
/// Version 1, a request.
const FLAGS_REQUEST: u32 = 0x1;
/// Version 1, a reply.
const FLAGS_REPLY: u32 = 0x5;

fn header(code: u32, size: u32) -> Vec<u8> {
    [code, FLAGS_REQUEST, size]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

/// Sends GET_FEATURES and returns the backend's answer.
fn get_features(s: &mut UnixStream) -> std::io::Result<u64> {
    s.write_all(&header(GET_FEATURES, 0))?;
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply)?;
    let word = |i: usize| u32::from_le_bytes(reply[i..i + 4].try_into().unwrap());
    assert_eq!(word(0), GET_FEATURES, "reply to another request");
    assert_eq!(word(4), FLAGS_REPLY, "reply flags");
    assert_eq!(word(8), 8, "reply size");
    Ok(u64::from_le_bytes(reply[12..20].try_into().unwrap()))
}

#[test]
fn a_message_split_across_two_writes_is_served_like_a_whole_one() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    sparse_image(&img, 1 << 20);
    let d = Daemon::serve(dir.path(), &img, &[]);
    let mut s = UnixStream::connect(d.socket()).unwrap();
    s.set_read_timeout(Some(common::PATIENCE)).unwrap();

    s.write_all(&header(SET_OWNER, 0)).unwrap();
    let offered = get_features(&mut s).unwrap();

    // SET_FEATURES: the header and half of its 8-byte body, a pause long
    // enough for the backend to be waiting in its receive, then the rest.
    let mut msg = header(SET_FEATURES, 8);
    msg.extend_from_slice(&offered.to_le_bytes());
    s.write_all(&msg[..16]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    s.write_all(&msg[16..]).unwrap();

    // The connection survives it and the next request is answered.
    let again = get_features(&mut s).unwrap_or_else(|e| {
        panic!(
            "backend dropped the connection after a split message ({e}):\n{}",
            d.log()
        )
    });
    assert_eq!(again, offered);
    assert!(
        !d.log().contains("invalid message"),
        "backend refused the split message:\n{}",
        d.log()
    );
}
