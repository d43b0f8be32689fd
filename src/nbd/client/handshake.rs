//! Client side of the fixed newstyle negotiation.

use crate::nbd::stream::Stream;
use crate::nbd::tls::TlsStream;
use crate::nbd::wire::*;
use crate::nbd::{NbdError, Violation, MAX_PAYLOAD};
use crate::tls::ClientTls;
use std::io::{self, Read};

/// Option replies larger than this are a protocol violation for us.
const MAX_OPTION_REPLY: u32 = 64 << 10;

/// What the server told us about the export and what we agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags (`wire::FLAG_*`).
    pub flags: u16,
    /// Every request's offset and length is a multiple of this.
    pub min_block: u32,
    /// Requests of this size and alignment are efficient.
    pub preferred_block: u32,
    /// Largest READ/WRITE payload we send (the server's maximum, at most 32 MiB).
    pub max_payload: u32,
    /// Structured replies are in use.
    pub structured: bool,
    /// Context id of `base:allocation`, when the server offered it.
    pub base_allocation: Option<u32>,
}

impl ExportInfo {
    /// True when the server advertised transmission flag `flag`.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

struct Negotiator {
    rd: Stream,
    wr: Stream,
}

/// TLS for a connection: the credentials and the host connected to (for
/// the x509 certificate name; `None` for a Unix socket).
pub(super) struct TlsTarget<'a> {
    pub creds: &'a ClientTls,
    pub host: Option<&'a str>,
}

/// Negotiates `export` on a freshly connected stream; with `tls`, upgrades
/// first and refuses a server that will not. Returns the stream to use.
pub(super) fn negotiate(
    stream: Stream,
    export: &str,
    tls: Option<TlsTarget<'_>>,
) -> Result<(ExportInfo, Stream), NbdError> {
    let mut n = Negotiator {
        rd: stream.try_clone()?,
        wr: stream,
    };
    let info = n.run(export, tls)?;
    Ok((info, n.wr))
}

impl Negotiator {
    fn run(&mut self, export: &str, tls: Option<TlsTarget<'_>>) -> Result<ExportInfo, NbdError> {
        let n = self;
        let mut raw = [0u8; Greeting::LEN];
        n.rd.read_exact(&mut raw)?;
        let greeting = Greeting::decode(&raw)?;
        let no_zeroes = greeting.flags & FLAG_NO_ZEROES != 0;
        let mut client_flags = 0;
        if greeting.flags & FLAG_FIXED_NEWSTYLE != 0 {
            client_flags |= FLAG_C_FIXED_NEWSTYLE;
        }
        if no_zeroes {
            client_flags |= FLAG_C_NO_ZEROES;
        }
        n.wr.send_all(&[&client_flags.to_be_bytes()])?;
        if let Some(tls) = tls {
            if greeting.flags & FLAG_FIXED_NEWSTYLE == 0 {
                return Err(NbdError::TlsRefused(
                    "the server does not speak fixed newstyle, so it has no STARTTLS".into(),
                ));
            }
            n.starttls(tls)?;
        }
        if greeting.flags & FLAG_FIXED_NEWSTYLE == 0 {
            // Plain newstyle: EXPORT_NAME is the only option there is.
            return n.export_name(export, no_zeroes);
        }
        let structured = n.simple_option(OPT_STRUCTURED_REPLY)?;
        let base_allocation = if structured {
            n.select_base_allocation(export)?
        } else {
            None
        };
        match n.go(export)? {
            Some((size, flags, sizes)) => finish(size, flags, sizes, structured, base_allocation),
            None => {
                // A server without GO: fall back as the protocol asks clients to.
                let mut info = n.export_name(export, no_zeroes)?;
                info.structured = structured;
                info.base_allocation = base_allocation;
                Ok(info)
            }
        }
    }

    /// NBD_OPT_STARTTLS, then the handshake; anything but ACK is a refusal
    /// (or a downgrade attempt) and ends the connection.
    fn starttls(&mut self, tls: TlsTarget<'_>) -> Result<(), NbdError> {
        self.send_option(OPT_STARTTLS, &[])?;
        let (h, data) = self.reply(OPT_STARTTLS)?;
        if h.reply != REP_ACK || !data.is_empty() {
            let msg = String::from_utf8_lossy(&data);
            return Err(NbdError::TlsRefused(format!(
                "reply {:#x} {}{msg}",
                h.reply,
                if msg.is_empty() { "" } else { ": " }
            )));
        }
        let session = TlsStream::connect(self.wr.try_clone()?, tls.creds, tls.host)?;
        log::info!("nbd client: TLS established ({})", session.describe());
        self.wr = Stream::Tls(std::sync::Arc::new(session));
        self.rd = self.wr.try_clone()?;
        Ok(())
    }
}

type BlockSizes = Option<(u32, u32, u32)>;

fn finish(
    size: u64,
    flags: u16,
    sizes: BlockSizes,
    structured: bool,
    base_allocation: Option<u32>,
) -> Result<ExportInfo, NbdError> {
    let (min, preferred, max) = sizes.unwrap_or((1, 4096, MAX_PAYLOAD));
    let valid = min.is_power_of_two()
        && min <= 1 << 16
        && preferred.is_power_of_two()
        && preferred >= min
        && max >= min;
    if !valid {
        return Err(NbdError::Protocol(Violation::BlockSizes {
            min,
            preferred,
            max,
        }));
    }
    // Largest multiple of min_block not above the server's maximum or ours.
    let max_payload = max.min(MAX_PAYLOAD) / min * min;
    Ok(ExportInfo {
        size,
        flags,
        min_block: min,
        preferred_block: preferred,
        max_payload,
        structured,
        base_allocation,
    })
}

impl Negotiator {
    fn send_option(&self, option: u32, data: &[u8]) -> Result<(), NbdError> {
        let h = OptionHeader {
            option,
            len: data.len() as u32,
        };
        self.wr.send_all(&[&h.encode(), data])?;
        Ok(())
    }

    fn reply(&mut self, option: u32) -> Result<(OptionReplyHeader, Vec<u8>), NbdError> {
        let mut raw = [0u8; OptionReplyHeader::LEN];
        self.rd.read_exact(&mut raw)?;
        let h = OptionReplyHeader::decode(&raw)?;
        if h.option != option {
            return Err(NbdError::Protocol(Violation::ReplyToOtherOption {
                got: h.option,
                waiting: option_name(option),
            }));
        }
        if h.len > MAX_OPTION_REPLY {
            return Err(NbdError::Protocol(Violation::ReplyTooLong {
                len: h.len,
                option: option_name(option),
            }));
        }
        let mut data = vec![0u8; h.len as usize];
        self.rd.read_exact(&mut data)?;
        Ok((h, data))
    }

    /// An option without data that is answered with ACK or an error.
    fn simple_option(&mut self, option: u32) -> Result<bool, NbdError> {
        self.send_option(option, &[])?;
        let (h, _) = self.reply(option)?;
        Ok(h.reply == REP_ACK)
    }

    fn select_base_allocation(&mut self, export: &str) -> Result<Option<u32>, NbdError> {
        let req = MetaContextRequest {
            export: export.to_string(),
            queries: vec![BASE_ALLOCATION.to_string()],
        };
        self.send_option(OPT_SET_META_CONTEXT, &req.encode())?;
        let mut id = None;
        loop {
            let (h, data) = self.reply(OPT_SET_META_CONTEXT)?;
            match h.reply {
                REP_META_CONTEXT => {
                    let m = MetaContextReply::decode(&data)?;
                    if m.name == BASE_ALLOCATION {
                        id = Some(m.id);
                    }
                }
                REP_ACK => return Ok(id),
                // Block status is optional: go on without it.
                _ if h.is_error() => return Ok(None),
                other => {
                    return Err(NbdError::Protocol(Violation::UnexpectedReply {
                        reply: other,
                        option: "NBD_OPT_SET_META_CONTEXT",
                    }))
                }
            }
        }
    }

    /// NBD_OPT_GO; `None` when the server does not know the option.
    fn go(&mut self, export: &str) -> Result<Option<(u64, u16, BlockSizes)>, NbdError> {
        let req = InfoRequest {
            name: export.to_string(),
            requests: vec![INFO_BLOCK_SIZE],
        };
        self.send_option(OPT_GO, &req.encode())?;
        let mut export_info = None;
        let mut sizes = None;
        loop {
            let (h, data) = self.reply(OPT_GO)?;
            match h.reply {
                REP_INFO => match Info::decode(&data)? {
                    Info::Export { size, flags } => export_info = Some((size, flags)),
                    Info::BlockSize {
                        min,
                        preferred,
                        max,
                    } => sizes = Some((min, preferred, max)),
                    _ => {}
                },
                REP_ACK => {
                    let (size, flags) =
                        export_info.ok_or(NbdError::Protocol(Violation::GoWithoutExport))?;
                    return Ok(Some((size, flags, sizes)));
                }
                REP_ERR_UNSUP => return Ok(None),
                REP_ERR_UNKNOWN => return Err(NbdError::UnknownExport(export.to_string())),
                other if h.is_error() => {
                    return Err(NbdError::OptionRefused {
                        option: "NBD_OPT_GO",
                        reply: other,
                        message: String::from_utf8_lossy(&data).into_owned(),
                    })
                }
                other => {
                    return Err(NbdError::Protocol(Violation::UnexpectedReply {
                        reply: other,
                        option: "NBD_OPT_GO",
                    }))
                }
            }
        }
    }

    fn export_name(&mut self, export: &str, no_zeroes: bool) -> Result<ExportInfo, NbdError> {
        self.send_option(OPT_EXPORT_NAME, export.as_bytes())?;
        let mut raw = [0u8; ExportNameReply::LEN];
        match self.rd.read_exact(&mut raw) {
            Ok(()) => {}
            // The server may only hang up on an export it does not have.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(NbdError::UnknownExport(export.to_string()))
            }
            Err(e) => return Err(e.into()),
        }
        let reply = ExportNameReply::decode(&raw)?;
        if !no_zeroes {
            let mut pad = [0u8; ExportNameReply::PADDING];
            self.rd.read_exact(&mut pad)?;
        }
        finish(reply.size, reply.flags, None, false, None)
    }
}
