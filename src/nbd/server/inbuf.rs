//! The reader's input buffer: one `read` takes in as many queued requests
//! (headers and small payloads) as the socket holds, and a payload that is
//! already buffered is handed out in place, mutable, so a write can go from
//! it straight to the device without another copy.

use std::io::{self, Read};

/// Outcome of waiting for bytes.
pub(super) enum Fill {
    Ok,
    /// Clean end of stream with nothing buffered.
    Eof,
    Err(io::Error),
}

/// A refillable window over a stream.
pub(super) struct InBuf<R> {
    rd: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl<R: Read> InBuf<R> {
    pub(super) fn new(rd: R, capacity: usize) -> Self {
        InBuf {
            rd,
            buf: vec![0; capacity],
            start: 0,
            end: 0,
        }
    }

    /// Bytes received and not yet consumed.
    pub(super) fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Waits until `n` bytes (`n <= capacity`) are buffered, reading as much
    /// as the socket offers each time.
    pub(super) fn fill(&mut self, n: usize) -> Fill {
        if self.buffered() >= n {
            return Fill::Ok;
        }
        if self.buf.len() - self.start < n {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.buffered() < n {
            match self.rd.read(&mut self.buf[self.end..]) {
                Ok(0) if self.buffered() == 0 => return Fill::Eof,
                Ok(0) => return Fill::Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(k) => self.end += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Fill::Err(e),
            }
        }
        Fill::Ok
    }

    /// Consumes `n` buffered bytes (after a successful `fill(n)`).
    pub(super) fn take(&mut self, n: usize) -> &mut [u8] {
        let s = self.start;
        let n = n.min(self.buffered());
        self.start += n;
        if self.start == self.end {
            // Empty: the next read starts at the front, leaving the most room
            // (the bytes handed out stay untouched until then).
            self.start = 0;
            self.end = 0;
        }
        &mut self.buf[s..s + n]
    }

    /// Fills `out` with `len` bytes, growing it `step` bytes at a time as
    /// they arrive (so memory follows the bytes received, not the length a
    /// header announced). `before_read` runs before every read from the
    /// stream and may refuse it (a deadline).
    pub(super) fn read_growing(
        &mut self,
        out: &mut Vec<u8>,
        len: usize,
        step: usize,
        mut before_read: impl FnMut() -> io::Result<()>,
    ) -> io::Result<()> {
        let mut got = 0;
        while got < len {
            let want = got.saturating_add(step.max(1)).min(len);
            if out.len() < want {
                out.resize(want, 0);
            }
            let have = self.buffered().min(want - got);
            if have > 0 {
                out[got..got + have].copy_from_slice(self.take(have));
                got += have;
                continue;
            }
            before_read()?;
            match self.rd.read(&mut out[got..want]) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Discards the next `n` bytes.
    pub(super) fn skip(&mut self, mut n: u64) -> io::Result<()> {
        while n > 0 {
            if self.buffered() == 0 {
                match self.fill(1) {
                    Fill::Ok => {}
                    Fill::Eof => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Fill::Err(e) => return Err(e),
                }
            }
            let k = (self.buffered() as u64).min(n) as usize;
            self.take(k);
            n -= k as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out at most `chunk` bytes per read, like a slow socket.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        chunk: usize,
    }

    impl Read for Trickle {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.chunk.min(out.len()).min(self.data.len() - self.pos);
            out[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    fn inbuf(data: Vec<u8>, chunk: usize) -> InBuf<Trickle> {
        InBuf::new(
            Trickle {
                data,
                pos: 0,
                chunk,
            },
            16,
        )
    }

    #[test]
    fn a_growing_read_allocates_only_as_far_as_bytes_arrived() {
        let data: Vec<u8> = (0..100u8).collect();
        let mut rd = inbuf(data.clone(), 7);
        let mut out = Vec::new();
        let mut reads = 0;
        rd.read_growing(&mut out, 100, 10, || {
            reads += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(out, data);
        assert!(reads >= 100 / 7, "{reads} reads");

        // A payload cut short: the buffer never outgrew what arrived + a step.
        let mut rd = inbuf(data[..25].to_vec(), 7);
        let mut out = Vec::new();
        let err = rd.read_growing(&mut out, 1000, 10, || Ok(())).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(out.len() <= 25 + 10, "grew to {} for 25 bytes", out.len());
    }

    #[test]
    fn a_growing_read_stops_when_its_deadline_refuses_the_next_read() {
        let mut rd = inbuf(vec![1; 64], 8);
        let mut out = Vec::new();
        let mut allowed = 3;
        let err = rd
            .read_growing(&mut out, 64, 16, || {
                if allowed == 0 {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                allowed -= 1;
                Ok(())
            })
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // Three reads of 8 bytes arrived; the buffer is at most one step ahead.
        assert!(out.len() <= 24 + 16, "grew to {}", out.len());
    }
}
