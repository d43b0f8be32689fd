//! QMP framing and argument checking on arbitrary client bytes: the framer cuts
//! the stream (fed in two pieces, at a split point taken from the input), every
//! frame goes through a negotiated session. Nothing may panic; every reply is a
//! QMP reply object; no frame outgrows the limit; the framer keeps no more than
//! the limit buffered.

#![no_main]

use colo_blk::control::framing::{Frame, Framer};
use colo_blk::control::protocol::{After, Session, Targets};
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let (a, b) = data.split_at(split);
    let mut framer = Framer::new(LIMIT);
    let mut frames = Vec::new();
    framer.push(a, &mut frames);
    framer.push(b, &mut frames);
    let mut session = Session::default();
    let (r, _) = session.handle(br#"{"execute":"qmp_capabilities"}"#, Targets::default());
    assert!(r.get("return").is_some());
    for frame in frames {
        match frame {
            Frame::Json(text) => {
                assert!(text.len() <= LIMIT, "frame of {} bytes", text.len());
                let (reply, after) = session.handle(&text, Targets::default());
                let obj = reply.as_object().expect("reply is an object");
                let ok = obj.contains_key("return");
                let err = obj.get("error").and_then(|e| e.get("desc")).is_some();
                assert!(ok != err, "reply {reply}");
                if after == After::Quit {
                    return;
                }
            }
            Frame::Garbage(g) => assert!(g.len() <= LIMIT),
        }
    }
});
