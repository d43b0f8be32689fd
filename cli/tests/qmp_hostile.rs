//! A real `colo-blk serve` control socket against hostile QMP clients, over raw
//! unix sockets: clients that never read, messages over the size limit with no
//! newlines, and arguments QEMU's QAPI would refuse.

mod common;

use common::{sparse_image, Daemon};
use serde_json::{json, Value};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Reads QMP messages (one JSON object per CRLF line, as the server writes).
struct Reader {
    stream: UnixStream,
    pending: Vec<u8>,
}

impl Reader {
    fn new(stream: UnixStream) -> Self {
        stream
            .set_read_timeout(Some(common::PATIENCE))
            .expect("read timeout");
        Reader {
            stream,
            pending: Vec::new(),
        }
    }

    fn next(&mut self) -> Value {
        loop {
            if let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=i).collect();
                return serde_json::from_slice(&line).expect("server sent JSON");
            }
            let mut buf = [0u8; 65536];
            let n = self
                .stream
                .read(&mut buf)
                .expect("the server answers (no reply within the patience window)");
            assert!(n > 0, "server closed the connection");
            self.pending.extend_from_slice(&buf[..n]);
        }
    }

    /// Next message that is not an event.
    fn reply(&mut self) -> Value {
        loop {
            let m = self.next();
            if m.get("event").is_none() {
                return m;
            }
        }
    }
}

fn connect(control: &Path) -> (UnixStream, Reader) {
    let s = UnixStream::connect(control).expect("connect control socket");
    let mut r = Reader::new(s.try_clone().unwrap());
    assert!(r.next().get("QMP").is_some(), "greeting");
    (s, r)
}

fn negotiated(control: &Path) -> (UnixStream, Reader) {
    let (mut s, mut r) = connect(control);
    s.write_all(br#"{"execute":"qmp_capabilities"}"#).unwrap();
    assert_eq!(r.reply(), json!({"return": {}}));
    (s, r)
}

fn execute(s: &mut UnixStream, r: &mut Reader, msg: Value) -> Value {
    s.write_all(msg.to_string().as_bytes()).unwrap();
    r.reply()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn secondary(dir: &Path) -> (Daemon, std::path::PathBuf) {
    let disk = dir.join("disk.img");
    sparse_image(&disk, 8 << 20);
    let control = dir.join("ctl.sock");
    let nbd = format!("unix:{}", dir.join("nbd.sock").display());
    let d = Daemon::serve(
        dir,
        &disk,
        &[
            "--mode",
            "secondary",
            "--nbd-listen",
            &nbd,
            "--control",
            control.to_str().unwrap(),
        ],
    );
    (d, control)
}

/// The documented bound (README, "Hardening"): a client that never reads
/// costs its output queue and socket buffers, not one reply per command.
const RSS_BOUND_KIB: u64 = 64 << 10;

#[test]
fn a_client_that_never_reads_its_replies_stops_being_read_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, control) = secondary(dir.path());
    let (mut s, _r) = negotiated(&control);
    s.set_nonblocking(true).unwrap();
    let cmd = br#"{"execute":"query-version"}"#;
    let total = 300_000usize;
    let mut stream: Vec<u8> = Vec::with_capacity(cmd.len() * 1024);
    let mut sent_cmds = 0usize;
    let mut written_bytes = 0usize;
    let mut stalled = false;
    // Bounded: at most `total` commands, and a stall ends the loop after 300
    // consecutive refused writes (the server has stopped reading).
    let mut refused = 0;
    while sent_cmds < total && !stalled {
        if stream.is_empty() {
            for _ in 0..1024 {
                stream.extend_from_slice(cmd);
            }
        }
        match s.write(&stream) {
            Ok(n) => {
                refused = 0;
                written_bytes += n;
                stream.drain(..n);
                sent_cmds = written_bytes / cmd.len();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                refused += 1;
                stalled = refused >= 300;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("write: {e}"),
        }
    }
    let rss = rss_kib(daemon.pid());
    assert!(
        rss < RSS_BOUND_KIB,
        "daemon RSS {rss} KiB after {sent_cmds} unread commands (bound {RSS_BOUND_KIB} KiB)"
    );
    assert!(
        stalled,
        "the server kept reading {sent_cmds} commands whose replies were never read"
    );
    // Another client is served meanwhile.
    let (mut s2, mut r2) = negotiated(&control);
    let v = execute(
        &mut s2,
        &mut r2,
        json!({"execute": "query-version", "id": 2}),
    );
    assert_eq!(v["id"], 2);
}

#[test]
fn a_message_over_the_limit_without_newlines_is_answered_and_so_is_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, control) = secondary(dir.path());
    let (mut s, mut r) = negotiated(&control);
    let filler = "a".repeat(2 << 20);
    // No newline anywhere, as qemu.qmp writes.
    let big = format!(r#"{{"execute":"query-version","arguments":{{"x":"{filler}"}}}}"#);
    s.write_all(big.as_bytes()).unwrap();
    s.write_all(br#"{"execute":"query-version","id":"after"}"#)
        .unwrap();
    let first = r.reply();
    assert_eq!(first["error"]["class"], "GenericError", "{first}");
    let second = r.reply();
    assert_eq!(second["id"], "after", "{second}");
    assert!(second["return"]["qemu"].is_object(), "{second}");
}

#[test]
fn wrongly_typed_or_unknown_arguments_are_refused_and_the_stage_is_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, control) = secondary(dir.path());
    let (mut s, mut r) = negotiated(&control);
    let cases = [
        (
            json!({"execute": "replication-start", "arguments": {"mode": "secondary", "sync": 7}}),
            "Invalid parameter type for 'sync', expected: string",
        ),
        (
            json!({"execute": "replication-start", "arguments": {"mode": 5}}),
            "Invalid parameter type for 'mode', expected: string",
        ),
        (
            json!({"execute": "replication-start", "arguments": {}}),
            "Parameter 'mode' is missing",
        ),
        (
            json!({"execute": "xen-set-replication",
                   "arguments": {"enable": true, "primary": false, "extra": {}}}),
            "Parameter 'extra' is unexpected",
        ),
        (
            json!({"execute": "replication-stop", "arguments": {"failover": true, "extra": {}}}),
            "Parameter 'extra' is unexpected",
        ),
    ];
    for (msg, want) in cases {
        let v = execute(&mut s, &mut r, msg.clone());
        assert_eq!(v["error"]["class"], "GenericError", "{msg}: {v}");
        assert_eq!(v["error"]["desc"], want, "{msg}: {v}");
    }
    let st = execute(&mut s, &mut r, json!({"execute": "query-replication"}));
    assert_eq!(st["return"]["stage"], "none", "{st}");
}

#[test]
fn every_listed_command_refuses_an_unexpected_member() {
    let dir = tempfile::tempdir().unwrap();
    let (mut daemon, control) = secondary(dir.path());
    let (mut s, mut r) = negotiated(&control);
    let list = execute(&mut s, &mut r, json!({"execute": "query-commands"}));
    let names: Vec<String> = list["return"]
        .as_array()
        .expect("command list")
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert!(names.len() >= 20, "{names:?}");
    for name in &names {
        let v = execute(
            &mut s,
            &mut r,
            json!({"execute": name, "arguments": {"zz-unknown": 1}}),
        );
        let desc = v["error"]["desc"].as_str().unwrap_or_default();
        // A required member is checked first; either way the command did not run.
        assert!(
            desc == "Parameter 'zz-unknown' is unexpected"
                || desc.ends_with("is missing")
                || desc == "Capabilities negotiation is already complete, command ignored",
            "{name}: {v}"
        );
    }
    // quit refused its argument, so the daemon still runs and answers.
    let st = execute(&mut s, &mut r, json!({"execute": "query-replication"}));
    assert_eq!(st["return"]["stage"], "none");
    assert!(daemon.terminate().success());
}

/// A secondary with no NBD server yet (QEMU's way: `nbd-server-start` later).
fn secondary_without_export(dir: &Path, extra: &[&str]) -> (Daemon, std::path::PathBuf) {
    let disk = dir.join("disk.img");
    sparse_image(&disk, 8 << 20);
    let control = dir.join("ctl.sock");
    let mut args = vec![
        "--mode",
        "secondary",
        "--control",
        control.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let d = Daemon::serve(dir, &disk, &args);
    (d, control)
}

fn nbd_server_start(s: &mut UnixStream, r: &mut Reader, host: &str) -> Value {
    let msg = json!({"execute": "nbd-server-start", "arguments": {
        "addr": {"type": "inet", "data": {"host": host, "port": "0"}}}});
    execute(s, r, msg)
}

#[test]
fn nbd_server_start_beyond_loopback_in_plain_text_needs_nbd_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, control) = secondary_without_export(dir.path(), &[]);
    let (mut s, mut r) = negotiated(&control);
    // Refused before anything is bound.
    let refused = nbd_server_start(&mut s, &mut r, "0.0.0.0");
    let desc = refused["error"]["desc"].as_str().unwrap_or_default();
    assert!(desc.contains("--nbd-insecure"), "{refused}");
    // Loopback is this host only: allowed without TLS.
    assert_eq!(
        nbd_server_start(&mut s, &mut r, "127.0.0.1"),
        json!({"return": {}})
    );

    // With --nbd-insecure the policy lets it through to the bind. The test
    // stays off the network: 192.0.2.1 (TEST-NET-1) is on no interface here,
    // so the bind itself fails, and says so.
    let dir = tempfile::tempdir().unwrap();
    let (_d, control) = secondary_without_export(dir.path(), &["--nbd-insecure"]);
    let (mut s, mut r) = negotiated(&control);
    let bind = nbd_server_start(&mut s, &mut r, "192.0.2.1");
    let desc = bind["error"]["desc"].as_str().unwrap_or_default();
    assert!(desc.starts_with("Failed to bind socket"), "{bind}");
}
