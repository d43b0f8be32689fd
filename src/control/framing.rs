//! Splits a QMP byte stream into JSON texts without parsing them.
//!
//! QMP clients do not all end messages with a newline (the `qemu.qmp` library
//! does not), so the framer tracks brace depth, strings and escapes and yields a
//! text as soon as its outermost object closes. Bytes outside any object that are
//! not white space are garbage: they are yielded as one [`Frame::Garbage`] so the
//! server can answer with an error and carry on, as QEMU does.

/// One unit cut from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete JSON object or array text.
    Json(Vec<u8>),
    /// Bytes that cannot start a JSON object, up to the end of the line, or an
    /// object longer than the limit.
    Garbage(Vec<u8>),
}

/// Incremental framer; feed bytes with [`Framer::push`], then drain frames.
#[derive(Debug)]
pub struct Framer {
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escaped: bool,
    garbage: bool,
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
            garbage: false,
            limit,
        }
    }

    /// Consumes `bytes`, appending every completed frame to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<Frame>) {
        for &b in bytes {
            self.push_byte(b, out);
        }
    }

    fn push_byte(&mut self, b: u8, out: &mut Vec<Frame>) {
        if self.garbage {
            if b == b'\n' {
                self.garbage = false;
                out.push(Frame::Garbage(std::mem::take(&mut self.buf)));
            } else if self.buf.len() < self.limit {
                self.buf.push(b);
            }
            return;
        }
        if self.depth == 0 {
            match b {
                b' ' | b'\t' | b'\r' | b'\n' => return,
                b'{' | b'[' => {}
                _ => {
                    self.garbage = true;
                    self.buf.clear();
                    self.buf.push(b);
                    return;
                }
            }
        }
        self.buf.push(b);
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
            }
        } else {
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        out.push(Frame::Json(std::mem::take(&mut self.buf)));
                    }
                }
                _ => {}
            }
        }
        if self.depth > 0 && self.buf.len() > self.limit {
            // Drop the oversized message; the rest of its line is skipped too.
            self.buf.truncate(self.limit);
            self.depth = 0;
            self.in_string = false;
            self.escaped = false;
            self.garbage = true;
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
}
