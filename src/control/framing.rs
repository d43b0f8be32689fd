//! Splits a QMP byte stream into JSON texts without parsing them fully.
//!
//! QMP input is a stream of JSON values, and clients do not all end messages
//! with a newline (the `qemu.qmp` library does not), so the framer tracks brace
//! depth, strings and escapes and yields a text as soon as its outermost object
//! closes. Message boundaries come from that structure only, never from
//! newlines: a message over the size limit is skipped up to its own closing
//! brace (still tracked, no longer buffered), so the client's next message is
//! answered whether or not a newline follows. Bytes outside any object that
//! are not white space are garbage, yielded as one [`Frame::Garbage`] up to
//! the end of the line or the next `{`/`[`, so the server can answer with an
//! error and carry on, as QEMU does. A raw control character inside a string
//! is invalid JSON: it ends the message as garbage, which also recovers from a
//! string that is never closed.

/// One unit cut from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete JSON object or array text.
    Json(Vec<u8>),
    /// Bytes that cannot be a JSON message: stray bytes between messages, a
    /// message with a raw control character in a string, or a message longer
    /// than the limit (only its first `limit` bytes are kept).
    Garbage(Vec<u8>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between messages, or inside one that fits the limit.
    Normal,
    /// Stray bytes between messages.
    Garbage,
    /// Inside a message over the limit: structure tracked, bytes dropped.
    Oversized,
}

/// Incremental framer; feed bytes with [`Framer::push`], then drain frames.
#[derive(Debug)]
pub struct Framer {
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escaped: bool,
    state: State,
    limit: usize,
}

impl Framer {
    /// A framer that turns any single message longer than `limit` bytes into
    /// garbage instead of buffering it without bound.
    pub fn new(limit: usize) -> Self {
        Framer {
            buf: Vec::new(),
            depth: 0,
            in_string: false,
            escaped: false,
            state: State::Normal,
            limit,
        }
    }

    /// Consumes `bytes`, appending every completed frame to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<Frame>) {
        for &b in bytes {
            self.push_byte(b, out);
        }
    }

    fn reset(&mut self, out: &mut Vec<Frame>) {
        out.push(Frame::Garbage(std::mem::take(&mut self.buf)));
        self.depth = 0;
        self.in_string = false;
        self.escaped = false;
        self.state = State::Normal;
    }

    fn push_byte(&mut self, b: u8, out: &mut Vec<Frame>) {
        if self.state == State::Garbage {
            match b {
                b'\n' => return self.reset(out),
                b'{' | b'[' => self.reset(out),
                _ => {
                    if self.buf.len() < self.limit {
                        self.buf.push(b);
                    }
                    return;
                }
            }
        }
        if self.depth == 0 {
            match b {
                b' ' | b'\t' | b'\r' | b'\n' => return,
                b'{' | b'[' => {}
                _ => {
                    self.state = State::Garbage;
                    self.buf.clear();
                    self.buf.push(b);
                    return;
                }
            }
        }
        if self.state == State::Normal {
            self.buf.push(b);
            if self.buf.len() > self.limit {
                // Keep the start for the log; skip the rest by structure.
                self.buf.truncate(self.limit);
                self.buf.shrink_to_fit();
                self.state = State::Oversized;
            }
        }
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
            } else if b < 0x20 {
                self.reset(out);
            }
        } else {
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        if self.state == State::Oversized {
                            return self.reset(out);
                        }
                        out.push(Frame::Json(std::mem::take(&mut self.buf)));
                    }
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &[&[u8]]) -> Vec<Frame> {
        let mut f = Framer::new(64);
        let mut out = Vec::new();
        for chunk in input {
            f.push(chunk, &mut out);
        }
        out
    }

    #[test]
    fn objects_without_newlines_and_split_across_reads_are_framed() {
        let out = frames(&[b"{\"execute\": \"a\"}{\"exe", b"cute\": \"b}{\"}"]);
        assert_eq!(
            out,
            vec![
                Frame::Json(b"{\"execute\": \"a\"}".to_vec()),
                Frame::Json(b"{\"execute\": \"b}{\"}".to_vec()),
            ]
        );
    }

    #[test]
    fn escaped_quotes_do_not_end_strings() {
        let out = frames(&[br#"{"a": "x\"}"} "#]);
        assert_eq!(out, vec![Frame::Json(br#"{"a": "x\"}"}"#.to_vec())]);
    }

    #[test]
    fn garbage_is_reported_per_line_and_framing_recovers() {
        let out = frames(&[b"hello\n{\"x\":1}"]);
        assert_eq!(
            out,
            vec![
                Frame::Garbage(b"hello".to_vec()),
                Frame::Json(b"{\"x\":1}".to_vec())
            ]
        );
    }

    #[test]
    fn oversized_message_becomes_garbage_without_unbounded_buffering() {
        let mut big = b"{\"a\":\"".to_vec();
        big.extend(std::iter::repeat_n(b'x', 1000));
        big.extend(b"\"}\n{\"ok\":1}");
        let out = frames(&[&big]);
        assert_eq!(out.len(), 2);
        assert!(matches!(&out[0], Frame::Garbage(g) if g.len() <= 64));
        assert_eq!(out[1], Frame::Json(b"{\"ok\":1}".to_vec()));
    }

    #[test]
    fn after_an_oversized_message_without_newlines_the_next_message_is_framed() {
        // qemu.qmp sends no newlines: the boundary is the closing brace.
        let mut big = b"{\"execute\":\"x\",\"arguments\":{\"a\":[".to_vec();
        for _ in 0..200 {
            big.extend(b"{\"k\":\"}{\\\"\"},");
        }
        big.extend(b"1]}}{\"execute\":\"next\"}");
        let out = frames(&[&big[..100], &big[100..]]);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(matches!(&out[0], Frame::Garbage(g) if g.len() <= 64));
        assert_eq!(out[1], Frame::Json(b"{\"execute\":\"next\"}".to_vec()));
    }

    #[test]
    fn stray_bytes_end_at_the_next_object_and_unclosed_strings_at_a_newline() {
        let out = frames(&[b"junk{\"a\":1}{\"b\":\"open\n{\"c\":2}"]);
        assert_eq!(
            out,
            vec![
                Frame::Garbage(b"junk".to_vec()),
                Frame::Json(b"{\"a\":1}".to_vec()),
                Frame::Garbage(b"{\"b\":\"open\n".to_vec()),
                Frame::Json(b"{\"c\":2}".to_vec()),
            ]
        );
    }

    #[test]
    fn a_message_of_exactly_the_limit_is_kept_and_one_byte_more_is_not() {
        let message = |len: usize| {
            let mut m = b"{\"a\":\"".to_vec();
            m.extend(std::iter::repeat_n(b'x', len - 8));
            m.extend(b"\"}");
            assert_eq!(m.len(), len);
            m
        };
        let exact = message(64);
        assert_eq!(frames(&[&exact]), vec![Frame::Json(exact.clone())]);
        let over = message(65);
        assert!(matches!(&frames(&[&over])[..], [Frame::Garbage(g)] if g.len() == 64));
    }
}
