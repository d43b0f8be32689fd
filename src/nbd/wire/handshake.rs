//! Messages of the fixed newstyle negotiation (option haggling).

use super::cursor::{check_string, put_string32, Cursor};
use super::{
    WireError, IHAVEOPT, INFO_BLOCK_SIZE, INFO_DESCRIPTION, INFO_EXPORT, INFO_NAME, MAX_STRING,
    NBD_MAGIC, OPTION_REPLY_MAGIC,
};

/// The server's first message: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    /// Handshake flags (`FLAG_FIXED_NEWSTYLE`, `FLAG_NO_ZEROES`).
    pub flags: u16,
}

impl Greeting {
    /// Encoded length.
    pub const LEN: usize = 18;

    /// Encodes the greeting.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
        out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[16..].copy_from_slice(&self.flags.to_be_bytes());
        out
    }

    /// Decodes a greeting; fails on an oldstyle or foreign server.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(buf, "greeting");
        let magic = c.u64()?;
        if magic != NBD_MAGIC {
            return Err(WireError::BadMagic {
                what: "greeting",
                expected: NBD_MAGIC,
                found: magic,
            });
        }
        let second = c.u64()?;
        if second != IHAVEOPT {
            return Err(WireError::BadMagic {
                what: "greeting (newstyle)",
                expected: IHAVEOPT,
                found: second,
            });
        }
        let flags = c.u16()?;
        c.finish()?;
        Ok(Greeting { flags })
    }
}

/// Header of an option request: `IHAVEOPT`, option, data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option (`OPT_*`).
    pub option: u32,
    /// Length of the data that follows.
    pub len: u32,
}

impl OptionHeader {
    /// Encoded length.
    pub const LEN: usize = 16;

    /// Encodes the header.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Decodes the header.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(buf, "option request");
        let magic = c.u64()?;
        if magic != IHAVEOPT {
            return Err(WireError::BadMagic {
                what: "option request",
                expected: IHAVEOPT,
                found: magic,
            });
        }
        let option = c.u32()?;
        let len = c.u32()?;
        c.finish()?;
        Ok(OptionHeader { option, len })
    }
}

/// Header of an option reply: magic, option echoed, reply type, data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this replies to.
    pub option: u32,
    /// Reply type (`REP_*`).
    pub reply: u32,
    /// Length of the data that follows.
    pub len: u32,
}

impl OptionReplyHeader {
    /// Encoded length.
    pub const LEN: usize = 20;

    /// Encodes the header.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..16].copy_from_slice(&self.reply.to_be_bytes());
        out[16..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Decodes the header.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(buf, "option reply");
        let magic = c.u64()?;
        if magic != OPTION_REPLY_MAGIC {
            return Err(WireError::BadMagic {
                what: "option reply",
                expected: OPTION_REPLY_MAGIC,
                found: magic,
            });
        }
        let option = c.u32()?;
        let reply = c.u32()?;
        let len = c.u32()?;
        c.finish()?;
        Ok(OptionReplyHeader { option, reply, len })
    }

    /// True for an error reply (bit 31 set).
    pub fn is_error(&self) -> bool {
        self.reply & super::REP_FLAG_ERROR != 0
    }
}

/// The server's answer to `NBD_OPT_EXPORT_NAME`: size, flags, optional zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportNameReply {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
}

impl ExportNameReply {
    /// Length without the zero padding.
    pub const LEN: usize = 10;
    /// Length of the zero padding sent unless NO_ZEROES was negotiated.
    pub const PADDING: usize = 124;

    /// Encodes the reply, with the 124 zero bytes unless `no_zeroes`.
    pub fn encode(&self, no_zeroes: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN + Self::PADDING);
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        if !no_zeroes {
            out.resize(Self::LEN + Self::PADDING, 0);
        }
        out
    }

    /// Decodes the first 10 bytes (the caller skips any padding).
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(buf, "export name reply");
        let size = c.u64()?;
        let flags = c.u16()?;
        c.finish()?;
        Ok(ExportNameReply { size, flags })
    }
}

/// Data of `NBD_OPT_INFO` / `NBD_OPT_GO`: export name and information requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name ("" = default export).
    pub name: String,
    /// Requested information types (`INFO_*`).
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Encodes the option data.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(6 + self.name.len() + 2 * self.requests.len());
        put_string32(&mut out, &self.name);
        out.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for r in &self.requests {
            out.extend_from_slice(&r.to_be_bytes());
        }
        out
    }

    /// Decodes the option data; the request count must match the length exactly.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(buf, "NBD_OPT_INFO/GO data");
        let name = c.string32()?;
        let n = c.u16()? as usize;
        if c.remaining() != 2 * n {
            return Err(WireError::BadLength {
                what: "NBD_OPT_INFO/GO information requests",
                len: n as u64,
            });
        }
        let requests = (0..n).map(|_| c.u16()).collect::<Result<_, _>>()?;
        c.finish()?;
        Ok(InfoRequest { name, requests })
    }
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export the contexts are for.
    pub export: String,
    /// Query strings (`namespace:leaf`).
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// Encodes the option data.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_string32(&mut out, &self.export);
        out.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            put_string32(&mut out, q);
        }
        out
    }

    /// Decodes the option data.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(buf, "meta context request");
        let export = c.string32()?;
        let n = c.u32()?;
        // Each query takes at least its 4-byte length: bound the count by the
        // data actually present before allocating for it.
        if n as usize > c.remaining() / 4 {
            return Err(WireError::BadLength {
                what: "meta context query count",
                len: n.into(),
            });
        }
        let queries = (0..n).map(|_| c.string32()).collect::<Result<_, _>>()?;
        c.finish()?;
        Ok(MetaContextRequest { export, queries })
    }
}

/// One `NBD_REP_INFO` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_NAME`: canonical name.
    Name(String),
    /// `NBD_INFO_DESCRIPTION`: description for humans.
    Description(String),
    /// `NBD_INFO_BLOCK_SIZE`: size constraints.
    BlockSize {
        /// Minimum block size (alignment of every request).
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum payload of one request.
        max: u32,
    },
    /// A type this implementation does not know (clients must ignore it).
    Unknown {
        /// The information type.
        kind: u16,
        /// Its payload.
        data: Vec<u8>,
    },
}

impl Info {
    /// Encodes type and payload (the data of an `NBD_REP_INFO`).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Info::Export { size, flags } => {
                out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
            }
            Info::Name(s) => {
                out.extend_from_slice(&INFO_NAME.to_be_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            Info::Description(s) => {
                out.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            Info::BlockSize {
                min,
                preferred,
                max,
            } => {
                out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                out.extend_from_slice(&min.to_be_bytes());
                out.extend_from_slice(&preferred.to_be_bytes());
                out.extend_from_slice(&max.to_be_bytes());
            }
            Info::Unknown { kind, data } => {
                out.extend_from_slice(&kind.to_be_bytes());
                out.extend_from_slice(data);
            }
        }
        out
    }

    /// Decodes the data of an `NBD_REP_INFO`.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(buf, "NBD_REP_INFO");
        let kind = c.u16()?;
        let info = match kind {
            INFO_EXPORT => {
                let size = c.u64()?;
                let flags = c.u16()?;
                Info::Export { size, flags }
            }
            INFO_NAME => Info::Name(c.rest_string()?),
            INFO_DESCRIPTION => Info::Description(c.rest_string()?),
            INFO_BLOCK_SIZE => {
                let min = c.u32()?;
                let preferred = c.u32()?;
                let max = c.u32()?;
                Info::BlockSize {
                    min,
                    preferred,
                    max,
                }
            }
            _ => {
                let n = c.remaining();
                Info::Unknown {
                    kind,
                    data: c.bytes(n)?.to_vec(),
                }
            }
        };
        c.finish()?;
        Ok(info)
    }
}

/// One `NBD_REP_SERVER` payload: an export name and an optional description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEntry {
    /// Export name.
    pub name: String,
    /// Free text after the name (may be empty).
    pub description: String,
}

impl ServerEntry {
    /// Encodes the reply data.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_string32(&mut out, &self.name);
        out.extend_from_slice(self.description.as_bytes());
        out
    }

    /// Decodes the reply data.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(buf, "NBD_REP_SERVER");
        let name = c.string32()?;
        let description = c.rest_string()?;
        Ok(ServerEntry { name, description })
    }
}

/// One `NBD_REP_META_CONTEXT` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextReply {
    /// Context id used in block status chunks (0 in LIST replies).
    pub id: u32,
    /// Context name.
    pub name: String,
}

impl MetaContextReply {
    /// Encodes the reply data.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.name.len());
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out
    }

    /// Decodes the reply data.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut c = Cursor::new(buf, "NBD_REP_META_CONTEXT");
        let id = c.u32()?;
        let name = c.rest_string()?;
        Ok(MetaContextReply { id, name })
    }
}

/// Decodes the data of an `NBD_OPT_EXPORT_NAME` (the whole data is the name).
pub fn decode_export_name(buf: &[u8]) -> Result<String, WireError> {
    if buf.len() > MAX_STRING {
        return Err(WireError::BadString {
            what: "NBD_OPT_EXPORT_NAME",
        });
    }
    check_string(buf, "NBD_OPT_EXPORT_NAME")
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::decode_export_name;

    #[test]
    fn greeting_round_trips_and_rejects_oldstyle() {
        let g = Greeting {
            flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
        };
        assert_eq!(Greeting::decode(&g.encode()), Ok(g));
        let mut old = g.encode();
        old[8..16].copy_from_slice(&0x0000_4202_8186_1253_u64.to_be_bytes());
        assert!(matches!(
            Greeting::decode(&old),
            Err(WireError::BadMagic { .. })
        ));
        Greeting::decode(&g.encode()[..17]).unwrap_err();
    }

    #[test]
    fn option_headers_round_trip_and_check_magic() {
        let h = OptionHeader {
            option: OPT_GO,
            len: 42,
        };
        assert_eq!(OptionHeader::decode(&h.encode()), Ok(h));
        let mut bad = h.encode();
        bad[0] ^= 1;
        assert!(matches!(
            OptionHeader::decode(&bad),
            Err(WireError::BadMagic { .. })
        ));
        let r = OptionReplyHeader {
            option: OPT_LIST,
            reply: REP_ERR_UNSUP,
            len: 7,
        };
        assert_eq!(OptionReplyHeader::decode(&r.encode()), Ok(r));
        assert!(r.is_error());
    }

    #[test]
    fn export_name_reply_has_padding_unless_no_zeroes() {
        let r = ExportNameReply {
            size: 1 << 30,
            flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH,
        };
        let padded = r.encode(false);
        assert_eq!(padded.len(), 134);
        assert!(padded[10..].iter().all(|&b| b == 0));
        let short = r.encode(true);
        assert_eq!(short.len(), 10);
        assert_eq!(ExportNameReply::decode(&short), Ok(r));
    }

    #[test]
    fn info_request_round_trips_and_rejects_bad_counts() {
        let r = InfoRequest {
            name: "parent0".into(),
            requests: vec![INFO_BLOCK_SIZE, INFO_NAME],
        };
        let enc = r.encode();
        assert_eq!(InfoRequest::decode(&enc), Ok(r));
        // Count says 3 requests but only 2 are present.
        let mut bad = enc.clone();
        let at = 4 + "parent0".len();
        bad[at..at + 2].copy_from_slice(&3u16.to_be_bytes());
        InfoRequest::decode(&bad).unwrap_err();
        // Name length beyond the data.
        let mut bad = enc;
        bad[..4].copy_from_slice(&1000u32.to_be_bytes());
        InfoRequest::decode(&bad).unwrap_err();
    }

    #[test]
    fn meta_context_request_round_trips_and_bounds_count() {
        let r = MetaContextRequest {
            export: "parent0".into(),
            queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:x".into()],
        };
        assert_eq!(MetaContextRequest::decode(&r.encode()), Ok(r));
        let mut huge = Vec::new();
        huge.extend_from_slice(&0u32.to_be_bytes());
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            MetaContextRequest::decode(&huge),
            Err(WireError::BadLength { .. })
        ));
    }

    #[test]
    fn info_payloads_round_trip() {
        for info in [
            Info::Export {
                size: 64 << 20,
                flags: FLAG_HAS_FLAGS | FLAG_READ_ONLY,
            },
            Info::Name("parent0".into()),
            Info::Description("colo-blk".into()),
            Info::BlockSize {
                min: 1,
                preferred: 4096,
                max: 32 << 20,
            },
            Info::Unknown {
                kind: 99,
                data: vec![1, 2, 3],
            },
        ] {
            assert_eq!(Info::decode(&info.encode()), Ok(info));
        }
        Info::decode(&[0, 0, 1]).unwrap_err();
        let mut long = Info::BlockSize {
            min: 1,
            preferred: 1,
            max: 1,
        }
        .encode();
        long.push(0);
        assert!(matches!(
            Info::decode(&long),
            Err(WireError::Trailing { .. })
        ));
    }

    #[test]
    fn server_entry_and_meta_context_reply_round_trip() {
        let s = ServerEntry {
            name: "parent0".into(),
            description: "secondary disk".into(),
        };
        assert_eq!(ServerEntry::decode(&s.encode()), Ok(s));
        let m = MetaContextReply {
            id: 1,
            name: BASE_ALLOCATION.into(),
        };
        assert_eq!(MetaContextReply::decode(&m.encode()), Ok(m));
    }

    #[test]
    fn strings_reject_nul_invalid_utf8_and_overlong() {
        decode_export_name(b"a\0b").unwrap_err();
        decode_export_name(&[0xff, 0xfe]).unwrap_err();
        decode_export_name(&vec![b'a'; MAX_STRING + 1]).unwrap_err();
        assert_eq!(decode_export_name(b"parent0").as_deref(), Ok("parent0"));
        assert_eq!(decode_export_name(b"").as_deref(), Ok(""));
    }
}
