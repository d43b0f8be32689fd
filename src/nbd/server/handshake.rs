//! Server side of the fixed newstyle negotiation.

use super::Inner;
use crate::nbd::stream::Stream;
use crate::nbd::wire::{self, handshake::decode_export_name, *};
use crate::nbd::MAX_PAYLOAD;
use crate::nbd::{NbdError, Violation};
use std::io::{self, Read};

/// Option data we read into memory; larger options are skipped unread.
const MAX_OPTION_DATA: u32 = 64 << 10;
/// Larger options than this are a denial of service: hard disconnect.
const MAX_OPTION_SKIP: u32 = 16 << 20;
/// Id of `base:allocation` when selected (any non-zero value works).
pub(super) const BASE_ALLOCATION_ID: u32 = 1;

/// What the client and the server agreed on.
#[derive(Debug, Clone, Copy)]
pub(super) struct Negotiated {
    /// Structured replies are in use.
    pub structured: bool,
    /// `base:allocation` is selected; block status is allowed.
    pub base_allocation: bool,
}

/// Connection state during option haggling.
struct Haggle<'a> {
    inner: &'a Inner,
    /// Replies go out here; replaced by the TLS session after STARTTLS.
    stream: Stream,
    /// Options are read from here (a clone of `stream`).
    rd: Stream,
    peer: &'a str,
    structured: bool,
    /// Export the last SET_META_CONTEXT selected `base:allocation` for.
    meta_export: Option<String>,
}

/// Runs the negotiation. `Ok(None)`: the client aborted or went away politely.
/// The stream returned is the one to serve on (the TLS session after STARTTLS).
pub(super) fn negotiate(
    inner: &Inner,
    stream: Stream,
    peer: &str,
) -> Result<Option<(Negotiated, Stream)>, NbdError> {
    // A second handle to read from, so replies go out through `&Stream`.
    let mut rd = stream.try_clone()?;
    stream.set_read_timeout(Some(inner.opts.handshake_timeout))?;
    let greeting = Greeting {
        flags: FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
    };
    stream.send_all(&[&greeting.encode()])?;
    let mut raw = [0u8; 4];
    rd.read_exact(&mut raw)?;
    let client_flags = u32::from_be_bytes(raw);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::Protocol(Violation::ClientFlags(client_flags)));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut h = Haggle {
        inner,
        stream,
        rd,
        peer,
        structured: false,
        meta_export: None,
    };
    match h.run(no_zeroes)? {
        Some(n) => {
            h.stream.set_read_timeout(None)?;
            Ok(Some((n, h.stream)))
        }
        None => Ok(None),
    }
}

impl Haggle<'_> {
    /// TLS is configured and the stream is not upgraded yet.
    fn tls_pending(&self) -> bool {
        self.inner.opts.tls.is_some() && !self.stream.is_tls()
    }

    /// Before STARTTLS a TLS server answers nothing but ABORT and STARTTLS
    /// (doc/proto.md, "TLS support"); returns false when `opt` was refused.
    fn tls_gate(&mut self, opt: u32) -> Result<bool, NbdError> {
        if !self.tls_pending() || matches!(opt, OPT_ABORT | OPT_STARTTLS) {
            return Ok(true);
        }
        if opt == OPT_EXPORT_NAME {
            // No error reply exists for it: the connection ends.
            return Err(NbdError::Protocol(Violation::ExportNameBeforeTls));
        }
        log::warn!(
            "nbd {}: {} before STARTTLS refused: TLS is required",
            self.peer,
            option_name(opt)
        );
        self.error(opt, REP_ERR_TLS_REQD, "TLS is required")?;
        Ok(false)
    }

    /// NBD_OPT_STARTTLS: ACK, handshake, check the client's identity, then
    /// the negotiation starts over inside TLS.
    fn starttls(&mut self, data: &[u8]) -> Result<(), NbdError> {
        let Some(tls) = self.inner.opts.tls.clone() else {
            return self.error(OPT_STARTTLS, REP_ERR_UNSUP, "TLS is not configured");
        };
        if self.stream.is_tls() {
            return self.error(OPT_STARTTLS, REP_ERR_INVALID, "TLS is already in use");
        }
        if !data.is_empty() {
            return self.error(
                OPT_STARTTLS,
                REP_ERR_INVALID,
                "NBD_OPT_STARTTLS takes no data",
            );
        }
        self.reply(OPT_STARTTLS, REP_ACK, &[])?;
        let (session, identity) =
            super::super::tls::TlsStream::accept(self.stream.try_clone()?, &tls)?;
        log::info!(
            "nbd {}: TLS established, client {identity:?} ({})",
            self.peer,
            session.describe()
        );
        self.stream = Stream::Tls(std::sync::Arc::new(session));
        self.rd = self.stream.try_clone()?;
        // Nothing negotiated in plain text carries over.
        self.structured = false;
        self.meta_export = None;
        Ok(())
    }

    fn run(&mut self, no_zeroes: bool) -> Result<Option<Negotiated>, NbdError> {
        loop {
            let mut raw = [0u8; OptionHeader::LEN];
            match self.rd.read_exact(&mut raw) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(e.into()),
            }
            let header = OptionHeader::decode(&raw)?;
            let opt = header.option;
            if header.len > MAX_OPTION_DATA {
                if header.len > MAX_OPTION_SKIP {
                    return Err(NbdError::Protocol(Violation::OptionTooLong {
                        option: option_name(opt),
                        len: header.len,
                    }));
                }
                io::copy(&mut (&mut self.rd).take(header.len.into()), &mut io::sink())?;
                log::warn!(
                    "nbd {}: {} with {} bytes of data refused",
                    self.peer,
                    option_name(opt),
                    header.len
                );
                self.error(opt, REP_ERR_TOO_BIG, "option data too large")?;
                continue;
            }
            let mut data = vec![0u8; header.len as usize];
            self.rd.read_exact(&mut data)?;
            if !self.tls_gate(opt)? {
                continue;
            }
            match opt {
                OPT_STARTTLS => self.starttls(&data)?,
                OPT_EXPORT_NAME => {
                    let name = decode_export_name(&data)?;
                    if !self.is_our_export(&name) {
                        // The protocol has no error reply here: hard disconnect.
                        return Err(NbdError::UnknownExport(name));
                    }
                    let reply = ExportNameReply {
                        size: self.inner.dev.size(),
                        flags: self.transmission_flags(),
                    };
                    self.stream.send_all(&[&reply.encode(no_zeroes)])?;
                    return Ok(Some(self.negotiated(&name)));
                }
                OPT_ABORT => {
                    // The client may already be gone; the ACK is a courtesy.
                    let _ = self.reply(opt, REP_ACK, &[]);
                    return Ok(None);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        self.error(opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                        continue;
                    }
                    let entry = ServerEntry {
                        name: self.inner.opts.export_name.clone(),
                        description: self.inner.opts.description.clone(),
                    };
                    self.reply(opt, REP_SERVER, &entry.encode())?;
                    self.reply(opt, REP_ACK, &[])?;
                }
                OPT_INFO | OPT_GO => {
                    if let Some(name) = self.info(opt, &data)? {
                        if opt == OPT_GO {
                            return Ok(Some(self.negotiated(&name)));
                        }
                    }
                }
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        self.error(opt, REP_ERR_INVALID, "option takes no data")?;
                        continue;
                    }
                    self.structured = true;
                    self.reply(opt, REP_ACK, &[])?;
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(opt, &data)?,
                _ => {
                    log::debug!(
                        "nbd {}: unsupported option {opt} ({})",
                        self.peer,
                        option_name(opt)
                    );
                    self.error(opt, REP_ERR_UNSUP, "option not supported")?;
                }
            }
        }
    }

    fn is_our_export(&self, name: &str) -> bool {
        name.is_empty() || name == self.inner.opts.export_name
    }

    fn negotiated(&self, name: &str) -> Negotiated {
        let canonical = |n: &str| self.is_our_export(n);
        Negotiated {
            structured: self.structured,
            base_allocation: self.structured
                && self.meta_export.as_deref().is_some_and(canonical)
                && canonical(name),
        }
    }

    fn transmission_flags(&self) -> u16 {
        let mut flags = FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_SEND_FAST_ZERO
            | FLAG_SEND_CACHE
            | FLAG_CAN_MULTI_CONN;
        if self.inner.dev.read_only() {
            flags |= FLAG_READ_ONLY;
        }
        if self.structured {
            flags |= FLAG_SEND_DF;
        }
        flags
    }

    /// NBD_OPT_INFO / NBD_OPT_GO; returns the export name on success.
    fn info(&mut self, opt: u32, data: &[u8]) -> Result<Option<String>, NbdError> {
        let req = match InfoRequest::decode(data) {
            Ok(r) => r,
            Err(e) => {
                self.error(opt, REP_ERR_INVALID, &e.to_string())?;
                return Ok(None);
            }
        };
        if !self.is_our_export(&req.name) {
            log::info!("nbd {}: unknown export {:?}", self.peer, req.name);
            self.error(opt, REP_ERR_UNKNOWN, "no such export")?;
            return Ok(None);
        }
        let export = Info::Export {
            size: self.inner.dev.size(),
            flags: self.transmission_flags(),
        };
        self.reply(opt, REP_INFO, &export.encode())?;
        // Our constraints are the protocol's defaults; advertising them lets
        // clients that ask use the full 32 MiB payload safely.
        let sizes = Info::BlockSize {
            min: 1,
            preferred: 4096,
            max: MAX_PAYLOAD,
        };
        self.reply(opt, REP_INFO, &sizes.encode())?;
        if req.requests.contains(&INFO_NAME) {
            let name = Info::Name(self.inner.opts.export_name.clone());
            self.reply(opt, REP_INFO, &name.encode())?;
        }
        if req.requests.contains(&INFO_DESCRIPTION) && !self.inner.opts.description.is_empty() {
            let d = Info::Description(self.inner.opts.description.clone());
            self.reply(opt, REP_INFO, &d.encode())?;
        }
        self.reply(opt, REP_ACK, &[])?;
        Ok(Some(req.name))
    }

    fn meta_context(&mut self, opt: u32, data: &[u8]) -> Result<(), NbdError> {
        let set = opt == OPT_SET_META_CONTEXT;
        if set {
            // SET replaces the selection even when it fails.
            self.meta_export = None;
            if !self.structured {
                return self.error(opt, REP_ERR_INVALID, "structured replies not negotiated");
            }
        }
        let req = match MetaContextRequest::decode(data) {
            Ok(r) => r,
            Err(e) => return self.error(opt, REP_ERR_INVALID, &e.to_string()),
        };
        if !self.is_our_export(&req.export) {
            return self.error(opt, REP_ERR_UNKNOWN, "no such export");
        }
        if req.queries.iter().any(|q| !q.contains(':')) {
            return self.error(opt, REP_ERR_INVALID, "query without namespace");
        }
        let matches = if set {
            req.queries.iter().any(|q| q == BASE_ALLOCATION)
        } else {
            req.queries.is_empty()
                || req
                    .queries
                    .iter()
                    .any(|q| q == "base:" || q == BASE_ALLOCATION)
        };
        if matches {
            let reply = MetaContextReply {
                id: if set { BASE_ALLOCATION_ID } else { 0 },
                name: BASE_ALLOCATION.to_string(),
            };
            self.reply(opt, REP_META_CONTEXT, &reply.encode())?;
            if set {
                self.meta_export = Some(req.export);
            }
        }
        self.reply(opt, REP_ACK, &[])
    }

    fn reply(&self, option: u32, reply: u32, data: &[u8]) -> Result<(), NbdError> {
        let header = OptionReplyHeader {
            option,
            reply,
            len: data.len() as u32,
        };
        self.stream.send_all(&[&header.encode(), data])?;
        Ok(())
    }

    fn error(&self, option: u32, reply: u32, message: &str) -> Result<(), NbdError> {
        log::debug!(
            "nbd {}: {} answered with error {reply:#x}: {message}",
            self.peer,
            wire::option_name(option)
        );
        self.reply(option, reply, message.as_bytes())
    }
}
