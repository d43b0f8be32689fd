//! A bounds-checked big-endian reader over a byte slice.

use super::{WireError, MAX_STRING};

/// Reads fields front to back; every accessor fails instead of panicking when
/// the slice is too short.
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Cursor { buf, pos: 0, what }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.remaining() < n {
            return Err(WireError::Truncated {
                what: self.what,
                len: self.buf.len(),
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub(crate) fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A protocol string of `n` bytes: UTF-8, no NUL, at most 4096 bytes.
    pub(crate) fn string(&mut self, n: usize) -> Result<String, WireError> {
        if n > MAX_STRING {
            return Err(WireError::BadString { what: self.what });
        }
        let raw = self.bytes(n)?;
        check_string(raw, self.what)
    }

    /// A string prefixed by its 32-bit length.
    pub(crate) fn string32(&mut self) -> Result<String, WireError> {
        let n = self.u32()? as usize;
        if n > self.remaining() {
            return Err(WireError::BadLength {
                what: self.what,
                len: n as u64,
            });
        }
        self.string(n)
    }

    /// The rest of the buffer as a string.
    pub(crate) fn rest_string(&mut self) -> Result<String, WireError> {
        let n = self.remaining();
        self.string(n)
    }

    /// Fails unless every byte was consumed.
    pub(crate) fn finish(self) -> Result<(), WireError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(WireError::Trailing {
                what: self.what,
                extra,
            }),
        }
    }
}

pub(crate) fn check_string(raw: &[u8], what: &'static str) -> Result<String, WireError> {
    if raw.len() > MAX_STRING || raw.contains(&0) {
        return Err(WireError::BadString { what });
    }
    String::from_utf8(raw.to_vec()).map_err(|_| WireError::BadString { what })
}

/// Appends a string prefixed by its 32-bit length.
pub(crate) fn put_string32(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}
