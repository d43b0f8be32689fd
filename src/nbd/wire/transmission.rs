//! Messages of the transmission phase: requests, simple replies, structured
//! reply chunks and their payloads.

use super::cursor::Cursor;
use super::{WireError, MAX_STRING, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC};

/// Chunk type: no payload, ends a reply.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: a run of zeroes at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: block status descriptors for one metadata context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type: an error.
pub const REPLY_TYPE_ERROR: u16 = 0x8001;
/// Chunk type: an error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = 0x8002;
/// Bit 15 of a chunk type marks an error chunk.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 0x8000;

/// A transmission command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE` (payload follows the request).
    Write,
    /// `NBD_CMD_DISC`: soft disconnect, no reply.
    Disc,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_CACHE`.
    Cache,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
}

impl Command {
    /// The command for a wire value, if known.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            _ => return None,
        })
    }

    /// The wire value.
    pub fn to_u16(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
        }
    }

    /// Protocol name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Command::Read => "NBD_CMD_READ",
            Command::Write => "NBD_CMD_WRITE",
            Command::Disc => "NBD_CMD_DISC",
            Command::Flush => "NBD_CMD_FLUSH",
            Command::Trim => "NBD_CMD_TRIM",
            Command::Cache => "NBD_CMD_CACHE",
            Command::WriteZeroes => "NBD_CMD_WRITE_ZEROES",
            Command::BlockStatus => "NBD_CMD_BLOCK_STATUS",
        }
    }
}

/// A transmission request header (28 bytes; a WRITE's payload follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command type as sent; see [`Request::command`].
    pub kind: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

impl Request {
    /// Encoded length.
    pub const LEN: usize = 28;

    /// A request for `command`.
    pub fn new(command: Command, flags: u16, cookie: u64, offset: u64, len: u32) -> Self {
        Request {
            flags,
            kind: command.to_u16(),
            cookie,
            offset,
            len,
        }
    }

    /// The command, if the type is known.
    pub fn command(&self) -> Option<Command> {
        Command::from_u16(self.kind)
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Decodes the header; a wrong magic means the stream is out of sync.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(buf, "request");
        let magic = c.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(WireError::BadMagic {
                what: "request",
                expected: REQUEST_MAGIC.into(),
                found: magic.into(),
            });
        }
        let r = Request {
            flags: c.u16()?,
            kind: c.u16()?,
            cookie: c.u64()?,
            offset: c.u64()?,
            len: c.u32()?,
        };
        c.finish()?;
        Ok(r)
    }
}

/// Which kind of reply a magic announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// A simple reply (16-byte header).
    Simple,
    /// A structured reply chunk (20-byte header).
    Structured,
}

impl ReplyKind {
    /// Classifies the first 4 bytes of a reply.
    pub fn from_magic(magic: u32) -> Result<Self, WireError> {
        match magic {
            SIMPLE_REPLY_MAGIC => Ok(ReplyKind::Simple),
            STRUCTURED_REPLY_MAGIC => Ok(ReplyKind::Structured),
            found => Err(WireError::BadMagic {
                what: "reply",
                expected: SIMPLE_REPLY_MAGIC.into(),
                found: found.into(),
            }),
        }
    }

    /// Length of the whole header, magic included.
    pub fn header_len(self) -> usize {
        match self {
            ReplyKind::Simple => SimpleReply::LEN,
            ReplyKind::Structured => ChunkHeader::LEN,
        }
    }
}

/// A simple reply header (a successful READ's data follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// NBD error value, 0 on success.
    pub error: u32,
    /// Cookie of the request.
    pub cookie: u64,
}

impl SimpleReply {
    /// Encoded length.
    pub const LEN: usize = 16;

    /// Encodes the header.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out[4..8].copy_from_slice(&self.error.to_be_bytes());
        out[8..].copy_from_slice(&self.cookie.to_be_bytes());
        out
    }

    /// Decodes the header.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(buf, "simple reply");
        let magic = c.u32()?;
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(WireError::BadMagic {
                what: "simple reply",
                expected: SIMPLE_REPLY_MAGIC.into(),
                found: magic.into(),
            });
        }
        let r = SimpleReply {
            error: c.u32()?,
            cookie: c.u64()?,
        };
        c.finish()?;
        Ok(r)
    }
}

/// A structured reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Reply flags (`REPLY_FLAG_DONE`).
    pub flags: u16,
    /// Chunk type (`REPLY_TYPE_*`).
    pub kind: u16,
    /// Cookie of the request.
    pub cookie: u64,
    /// Payload length.
    pub len: u32,
}

impl ChunkHeader {
    /// Encoded length.
    pub const LEN: usize = 20;

    /// Encodes the header.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Decodes the header.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(buf, "structured reply chunk");
        let magic = c.u32()?;
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(WireError::BadMagic {
                what: "structured reply chunk",
                expected: STRUCTURED_REPLY_MAGIC.into(),
                found: magic.into(),
            });
        }
        let h = ChunkHeader {
            flags: c.u16()?,
            kind: c.u16()?,
            cookie: c.u64()?,
            len: c.u32()?,
        };
        c.finish()?;
        Ok(h)
    }

    /// True for an error chunk (bit 15 of the type).
    pub fn is_error(&self) -> bool {
        self.kind & REPLY_TYPE_FLAG_ERROR != 0
    }

    /// Header plus offset of an `OFFSET_DATA` chunk carrying `data_len` bytes,
    /// so the data itself can be sent straight from its buffer.
    pub fn offset_data(cookie: u64, flags: u16, offset: u64, data_len: u32) -> [u8; 28] {
        let header = ChunkHeader {
            flags,
            kind: REPLY_TYPE_OFFSET_DATA,
            cookie,
            len: data_len.saturating_add(8),
        };
        let mut out = [0u8; 28];
        out[..20].copy_from_slice(&header.encode());
        out[20..].copy_from_slice(&offset.to_be_bytes());
        out
    }
}

/// Encodes a whole chunk (header and payload).
pub fn encode_chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let header = ChunkHeader {
        flags,
        kind,
        cookie,
        len: payload.len() as u32,
    };
    let mut out = Vec::with_capacity(ChunkHeader::LEN + payload.len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(payload);
    out
}

/// Decodes the offset that starts an `OFFSET_DATA` payload; `len` is the
/// chunk's payload length, which must leave at least one data byte.
pub fn decode_offset_data_len(len: u32) -> Result<u32, WireError> {
    if len < 9 {
        return Err(WireError::BadLength {
            what: "OFFSET_DATA chunk",
            len: len.into(),
        });
    }
    Ok(len - 8)
}

/// Payload of an `OFFSET_HOLE` chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffsetHole {
    /// First byte of the hole.
    pub offset: u64,
    /// Length of the hole (non-zero).
    pub len: u32,
}

impl OffsetHole {
    /// Encoded length.
    pub const LEN: usize = 12;

    /// Encodes the payload.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..8].copy_from_slice(&self.offset.to_be_bytes());
        out[8..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Decodes the payload.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(buf, "OFFSET_HOLE chunk");
        let h = OffsetHole {
            offset: c.u64()?,
            len: c.u32()?,
        };
        c.finish()?;
        if h.len == 0 {
            return Err(WireError::BadLength {
                what: "OFFSET_HOLE chunk",
                len: 0,
            });
        }
        Ok(h)
    }
}

/// Payload of a `BLOCK_STATUS` chunk: one context's descriptors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStatusChunk {
    /// Metadata context id.
    pub context: u32,
    /// `(length, status flags)` of consecutive extents (at least one).
    pub extents: Vec<(u32, u32)>,
}

impl BlockStatusChunk {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 8 * self.extents.len());
        out.extend_from_slice(&self.context.to_be_bytes());
        for (len, flags) in &self.extents {
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
        }
        out
    }

    /// Decodes the payload; requires 4 + 8k bytes with k >= 1 and no empty extent.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        if buf.len() < 12 || (buf.len() - 4) % 8 != 0 {
            return Err(WireError::BadLength {
                what: "BLOCK_STATUS chunk",
                len: buf.len() as u64,
            });
        }
        let mut c = Cursor::new(buf, "BLOCK_STATUS chunk");
        let context = c.u32()?;
        let mut extents = Vec::with_capacity(c.remaining() / 8);
        while c.remaining() > 0 {
            let len = c.u32()?;
            let flags = c.u32()?;
            if len == 0 {
                return Err(WireError::BadLength {
                    what: "BLOCK_STATUS extent",
                    len: 0,
                });
            }
            extents.push((len, flags));
        }
        Ok(BlockStatusChunk { context, extents })
    }
}

/// Payload of an error chunk (`ERROR`, or `ERROR_OFFSET` when `offset` is set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorChunk {
    /// NBD error value (non-zero).
    pub error: u32,
    /// Message for humans (may be empty).
    pub message: String,
    /// Where the error happened (`ERROR_OFFSET` only).
    pub offset: Option<u64>,
}

impl ErrorChunk {
    /// Chunk type this payload is sent with.
    pub fn kind(&self) -> u16 {
        if self.offset.is_some() {
            REPLY_TYPE_ERROR_OFFSET
        } else {
            REPLY_TYPE_ERROR
        }
    }

    /// Encodes the payload; the message is cut to the protocol's limit on a
    /// character boundary.
    pub fn encode(&self) -> Vec<u8> {
        let mut end = self.message.len().min(MAX_STRING);
        while !self.message.is_char_boundary(end) {
            end -= 1;
        }
        let msg = &self.message.as_bytes()[..end];
        let mut out = Vec::with_capacity(6 + msg.len() + 8);
        out.extend_from_slice(&self.error.to_be_bytes());
        out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        out.extend_from_slice(msg);
        if let Some(off) = self.offset {
            out.extend_from_slice(&off.to_be_bytes());
        }
        out
    }

    /// Decodes the payload of an error chunk of type `kind`. Unknown error
    /// types keep their trailing fields unread, as the protocol allows.
    pub fn decode(kind: u16, buf: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(buf, "error chunk");
        let error = c.u32()?;
        let n = c.u16()? as usize;
        if n > c.remaining() {
            return Err(WireError::BadLength {
                what: "error chunk message",
                len: n as u64,
            });
        }
        // Messages are for humans: keep what we can rather than fail the reply.
        let message = String::from_utf8_lossy(c.bytes(n)?).into_owned();
        let offset = match kind {
            REPLY_TYPE_ERROR_OFFSET => Some(c.u64()?),
            _ => None,
        };
        if kind == REPLY_TYPE_ERROR || kind == REPLY_TYPE_ERROR_OFFSET {
            c.finish()?;
        }
        Ok(ErrorChunk {
            error,
            message,
            offset,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;

    #[test]
    fn request_round_trips_every_command() {
        for kind in 0..8u16 {
            let r = Request {
                flags: CMD_FLAG_FUA,
                kind,
                cookie: 0xdead_beef_0000_0001 + u64::from(kind),
                offset: 1 << 40,
                len: 4096,
            };
            let d = Request::decode(&r.encode()).unwrap();
            assert_eq!(d, r);
            assert_eq!(d.command().map(Command::to_u16), Some(kind));
        }
        let unknown = Request {
            flags: 0,
            kind: 42,
            cookie: 1,
            offset: 0,
            len: 0,
        };
        assert_eq!(Request::decode(&unknown.encode()).unwrap().command(), None);
    }

    #[test]
    fn request_with_bad_magic_is_rejected() {
        let mut raw = Request::new(Command::Read, 0, 1, 0, 512).encode();
        raw[3] ^= 0xff;
        assert!(matches!(
            Request::decode(&raw),
            Err(WireError::BadMagic { .. })
        ));
    }

    #[test]
    fn replies_round_trip_and_classify_by_magic() {
        let s = SimpleReply {
            error: EIO,
            cookie: 7,
        };
        let enc = s.encode();
        assert_eq!(SimpleReply::decode(&enc), Ok(s));
        let magic = u32::from_be_bytes([enc[0], enc[1], enc[2], enc[3]]);
        assert_eq!(ReplyKind::from_magic(magic), Ok(ReplyKind::Simple));

        let h = ChunkHeader {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_BLOCK_STATUS,
            cookie: 9,
            len: 12,
        };
        let enc = h.encode();
        assert_eq!(ChunkHeader::decode(&enc), Ok(h));
        let magic = u32::from_be_bytes([enc[0], enc[1], enc[2], enc[3]]);
        assert_eq!(ReplyKind::from_magic(magic), Ok(ReplyKind::Structured));
        ReplyKind::from_magic(0x1234_5678).unwrap_err();
    }

    #[test]
    fn offset_data_prefix_matches_chunk_header() {
        let raw = ChunkHeader::offset_data(5, REPLY_FLAG_DONE, 8192, 4096);
        let h = ChunkHeader::decode(&raw[..20]).unwrap();
        assert_eq!(h.kind, REPLY_TYPE_OFFSET_DATA);
        assert_eq!(h.len, 4096 + 8);
        assert_eq!(u64::from_be_bytes(raw[20..].try_into().unwrap()), 8192);
        assert_eq!(decode_offset_data_len(h.len), Ok(4096));
        decode_offset_data_len(8).unwrap_err();
    }

    #[test]
    fn chunk_payloads_round_trip() {
        let hole = OffsetHole {
            offset: 4096,
            len: 65536,
        };
        assert_eq!(OffsetHole::decode(&hole.encode()), Ok(hole));
        OffsetHole::decode(&OffsetHole { offset: 0, len: 0 }.encode()).unwrap_err();

        let bs = BlockStatusChunk {
            context: 1,
            extents: vec![(4096, 0), (1 << 20, STATE_HOLE | STATE_ZERO)],
        };
        assert_eq!(BlockStatusChunk::decode(&bs.encode()), Ok(bs));
        BlockStatusChunk::decode(&[0, 0, 0, 1]).unwrap_err();
        BlockStatusChunk::decode(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap_err();

        for e in [
            ErrorChunk {
                error: EPERM,
                message: "fenced".into(),
                offset: None,
            },
            ErrorChunk {
                error: EIO,
                message: String::new(),
                offset: Some(1 << 33),
            },
        ] {
            assert_eq!(ErrorChunk::decode(e.kind(), &e.encode()), Ok(e));
        }
    }

    #[test]
    fn error_message_is_cut_on_a_char_boundary() {
        let e = ErrorChunk {
            error: EIO,
            message: "é".repeat(3000),
            offset: None,
        };
        let enc = e.encode();
        let d = ErrorChunk::decode(REPLY_TYPE_ERROR, &enc).unwrap();
        assert!(d.message.len() <= MAX_STRING);
        assert!(d.message.chars().all(|c| c == 'é'));
    }

    #[test]
    fn encode_chunk_sets_length() {
        let c = encode_chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 3, &[]);
        let h = ChunkHeader::decode(&c).unwrap();
        assert_eq!(h.len, 0);
        assert_eq!(h.flags, REPLY_FLAG_DONE);
    }

    #[test]
    fn arbitrary_bytes_never_panic_any_decoder() {
        let mut noise = colo_blk_testkit::XorShift::new(0x9e37_79b9_7f4a_7c15);
        for round in 0..20_000 {
            let len = (noise.next() % 64) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| noise.next() as u8).collect();
            // Half the time start with a valid magic so decoders get past it.
            if round % 2 == 0 && buf.len() >= 8 {
                let magic = match round % 6 {
                    0 => IHAVEOPT.to_be_bytes(),
                    2 => OPTION_REPLY_MAGIC.to_be_bytes(),
                    _ => NBD_MAGIC.to_be_bytes(),
                };
                buf[..8].copy_from_slice(&magic);
            }
            let _ = Greeting::decode(&buf);
            let _ = OptionHeader::decode(&buf);
            let _ = OptionReplyHeader::decode(&buf);
            let _ = ExportNameReply::decode(&buf);
            let _ = InfoRequest::decode(&buf);
            let _ = MetaContextRequest::decode(&buf);
            let _ = Info::decode(&buf);
            let _ = ServerEntry::decode(&buf);
            let _ = MetaContextReply::decode(&buf);
            let _ = handshake::decode_export_name(&buf);
            let _ = Request::decode(&buf);
            let _ = SimpleReply::decode(&buf);
            let _ = ChunkHeader::decode(&buf);
            let _ = OffsetHole::decode(&buf);
            let _ = BlockStatusChunk::decode(&buf);
            let _ = ErrorChunk::decode(REPLY_TYPE_ERROR, &buf);
            let _ = ErrorChunk::decode(REPLY_TYPE_ERROR_OFFSET, &buf);
            let _ = ErrorChunk::decode(0x8fff, &buf);
        }
    }

    #[test]
    fn mutated_valid_messages_never_panic() {
        let samples: Vec<Vec<u8>> = vec![
            InfoRequest {
                name: "parent0".into(),
                requests: vec![INFO_BLOCK_SIZE],
            }
            .encode(),
            MetaContextRequest {
                export: "parent0".into(),
                queries: vec![BASE_ALLOCATION.into()],
            }
            .encode(),
            BlockStatusChunk {
                context: 1,
                extents: vec![(512, 3), (512, 0)],
            }
            .encode(),
            ErrorChunk {
                error: EIO,
                message: "x".into(),
                offset: Some(4),
            }
            .encode(),
        ];
        let mut noise = colo_blk_testkit::XorShift::new(42);
        for _ in 0..5_000 {
            for s in &samples {
                let mut m = s.clone();
                let i = (noise.next() as usize) % m.len();
                m[i] = noise.next() as u8;
                let cut = (noise.next() as usize) % (m.len() + 1);
                m.truncate(cut);
                let _ = InfoRequest::decode(&m);
                let _ = MetaContextRequest::decode(&m);
                let _ = BlockStatusChunk::decode(&m);
                let _ = ErrorChunk::decode(REPLY_TYPE_ERROR_OFFSET, &m);
            }
        }
    }
}
