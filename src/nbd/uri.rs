//! Addresses: where a server listens (`unix:PATH`, `tcp:HOST:PORT`) and the
//! NBD URIs a client connects to, in QEMU's forms.
//!
//! Accepted URIs (NetworkBlockDevice/nbd `doc/uri.md`, as QEMU reads them):
//! * `nbd+unix:///NAME?socket=PATH`
//! * `nbd://HOST[:PORT]/NAME` and `nbd+tcp://HOST[:PORT]/NAME` (port 10809 by
//!   default, IPv6 hosts in brackets)
//! * QEMU's legacy pseudo-URIs `nbd:unix:PATH[:exportname=NAME]` and
//!   `nbd:HOST:PORT[:exportname=NAME]`
//!
//! The export name is the URI path without its leading `/`, percent-decoded.
//! TLS schemes (`nbds`, `nbds+unix`) are refused: colo-blk does not speak TLS.

use super::NbdError;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// A socket address: a Unix socket path or a TCP host and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// A Unix domain socket.
    Unix(PathBuf),
    /// A TCP endpoint; `host` is a name or an IP address without brackets.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
}

impl NbdAddr {
    /// True for a unix socket or a TCP address only this host can reach:
    /// anything else exposes the disk to the network.
    pub fn is_loopback_or_unix(&self) -> bool {
        match self {
            NbdAddr::Unix(_) => true,
            NbdAddr::Tcp { host, .. } => {
                host == "localhost"
                    || host
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        }
    }

    /// Parses a listen address: `unix:PATH` or `tcp:HOST:PORT`
    /// (`tcp:[::1]:PORT` for IPv6).
    pub fn parse_listen(s: &str) -> Result<Self, NbdError> {
        let bad = |reason| NbdError::InvalidAddress {
            input: s.to_string(),
            reason,
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("empty socket path"));
            }
            return Ok(NbdAddr::Unix(PathBuf::from(path)));
        }
        if let Some(hp) = s.strip_prefix("tcp:") {
            let (host, port) = split_host_port(hp).ok_or_else(|| bad("expected tcp:HOST:PORT"))?;
            let port = port.ok_or_else(|| bad("expected tcp:HOST:PORT"))?;
            return Ok(NbdAddr::Tcp { host, port });
        }
        Err(bad("expected unix:PATH or tcp:HOST:PORT"))
    }
}

impl FromStr for NbdAddr {
    type Err = NbdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NbdAddr::parse_listen(s)
    }
}

impl fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            NbdAddr::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            NbdAddr::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

/// What a client connects to: an address and an export name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Where the server listens.
    pub addr: NbdAddr,
    /// The export ("" = the server's default export).
    pub export: String,
}

impl NbdUri {
    /// Parses any of the accepted URI forms (see the module documentation).
    pub fn parse(s: &str) -> Result<Self, NbdError> {
        let bad = |reason| NbdError::InvalidAddress {
            input: s.to_string(),
            reason,
        };
        if s.starts_with("nbds") {
            return Err(bad("TLS (nbds) is not supported"));
        }
        if let Some(rest) = s.strip_prefix("nbd+unix://") {
            let (authority, path, query) = split_uri(rest);
            if !authority.is_empty() {
                return Err(bad("nbd+unix URIs take no host"));
            }
            let export = export_from_path(path).ok_or_else(|| bad("bad percent-encoding"))?;
            let mut socket = None;
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                match pair.split_once('=') {
                    Some(("socket", v)) => {
                        socket = Some(percent_decode(v).ok_or_else(|| bad("bad percent-encoding"))?)
                    }
                    _ => return Err(bad("unknown query parameter (only socket= is accepted)")),
                }
            }
            let socket = socket
                .filter(|p| !p.is_empty())
                .ok_or_else(|| bad("nbd+unix needs ?socket=PATH"))?;
            return Ok(NbdUri {
                addr: NbdAddr::Unix(PathBuf::from(socket)),
                export,
            });
        }
        if let Some(rest) = s
            .strip_prefix("nbd://")
            .or_else(|| s.strip_prefix("nbd+tcp://"))
        {
            let (authority, path, query) = split_uri(rest);
            if !query.is_empty() {
                return Err(bad("TCP NBD URIs take no query parameters"));
            }
            // Drop any userinfo; it only matters for TLS.
            let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            let (host, port) = split_host_port(hostport).ok_or_else(|| bad("bad host or port"))?;
            if host.is_empty() {
                return Err(bad("missing host"));
            }
            let export = export_from_path(path).ok_or_else(|| bad("bad percent-encoding"))?;
            return Ok(NbdUri {
                addr: NbdAddr::Tcp {
                    host,
                    port: port.unwrap_or(DEFAULT_PORT),
                },
                export,
            });
        }
        if let Some(rest) = s.strip_prefix("nbd:") {
            return parse_legacy(rest).ok_or_else(|| {
                bad("expected nbd:unix:PATH[:exportname=NAME] or nbd:HOST:PORT[:exportname=NAME]")
            });
        }
        Err(bad(
            "expected nbd+unix:///NAME?socket=PATH or nbd://HOST:PORT/NAME",
        ))
    }
}

impl FromStr for NbdUri {
    type Err = NbdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NbdUri::parse(s)
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let export = percent_encode(&self.export);
        match &self.addr {
            NbdAddr::Unix(p) => write!(
                f,
                "nbd+unix:///{export}?socket={}",
                percent_encode(&p.to_string_lossy())
            ),
            NbdAddr::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{export}")
            }
            NbdAddr::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{export}"),
        }
    }
}

/// Splits `authority/path?query` (the part after `scheme://`).
fn split_uri(rest: &str) -> (&str, &str, &str) {
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    match before_query.find('/') {
        Some(i) => (&before_query[..i], &before_query[i..], query),
        None => (before_query, "", query),
    }
}

fn export_from_path(path: &str) -> Option<String> {
    percent_decode(path.strip_prefix('/').unwrap_or(path))
}

/// Splits `HOST[:PORT]` or `[V6][:PORT]`; `None` on a malformed port.
fn split_host_port(s: &str) -> Option<(String, Option<u16>)> {
    if let Some(v6) = s.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?.parse().ok()?),
        };
        return Some((host.to_string(), port));
    }
    match s.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => {
            Some((host.to_string(), Some(port.parse().ok()?)))
        }
        Some(_) => None,
        None => Some((s.to_string(), None)),
    }
}

/// QEMU's `unix:PATH[:exportname=NAME]` / `HOST:PORT[:exportname=NAME]`.
fn parse_legacy(rest: &str) -> Option<NbdUri> {
    let (main, export) = match rest.split_once(":exportname=") {
        Some((m, e)) => (m, e.to_string()),
        None => (rest, String::new()),
    };
    if let Some(path) = main.strip_prefix("unix:") {
        if path.is_empty() {
            return None;
        }
        return Some(NbdUri {
            addr: NbdAddr::Unix(PathBuf::from(path)),
            export,
        });
    }
    let (host, port) = split_host_port(main)?;
    if host.is_empty() {
        return None;
    }
    Some(NbdUri {
        addr: NbdAddr::Tcp {
            host,
            port: port.unwrap_or(DEFAULT_PORT),
        },
        export,
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(path: &str, export: &str) -> NbdUri {
        NbdUri {
            addr: NbdAddr::Unix(PathBuf::from(path)),
            export: export.into(),
        }
    }

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri {
            addr: NbdAddr::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    #[test]
    fn qemu_uri_forms_parse() {
        let cases = [
            (
                "nbd+unix:///parent0?socket=/run/s.sock",
                unix("/run/s.sock", "parent0"),
            ),
            ("nbd+unix:///?socket=rel.sock", unix("rel.sock", "")),
            (
                "nbd://127.0.0.1:10810/parent0",
                tcp("127.0.0.1", 10810, "parent0"),
            ),
            (
                "nbd+tcp://localhost/disk",
                tcp("localhost", DEFAULT_PORT, "disk"),
            ),
            ("nbd://example.com", tcp("example.com", DEFAULT_PORT, "")),
            ("nbd://[::1]:999/a%20b", tcp("::1", 999, "a b")),
            ("nbd://h//disk", tcp("h", DEFAULT_PORT, "/disk")),
            (
                "nbd:unix:/tmp/x.sock:exportname=parent0",
                unix("/tmp/x.sock", "parent0"),
            ),
            ("nbd:localhost:10809", tcp("localhost", 10809, "")),
            ("nbd:10.0.0.1:7:exportname=e", tcp("10.0.0.1", 7, "e")),
        ];
        for (text, want) in cases {
            assert_eq!(NbdUri::parse(text).unwrap(), want, "{text}");
        }
    }

    #[test]
    fn malformed_uris_are_refused() {
        for text in [
            "nbds://host/x",
            "nbd+unix:///x",
            "nbd+unix:///x?socket=",
            "nbd+unix:///x?socket=/s&tls=1",
            "nbd+unix://host/x?socket=/s",
            "nbd://host:notaport/x",
            "nbd://host:99999/x",
            "nbd:///x",
            "nbd://host/x?socket=/s",
            "nbd://host/%zz",
            "http://host/x",
            "",
        ] {
            assert!(NbdUri::parse(text).is_err(), "{text} should be refused");
        }
    }

    #[test]
    fn display_round_trips() {
        for u in [
            unix("/tmp/a b.sock", "parent 0"),
            tcp("127.0.0.1", 10809, "parent0"),
            tcp("::1", 1234, ""),
        ] {
            assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u);
        }
    }

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(
            NbdAddr::parse_listen("unix:/run/nbd.sock").unwrap(),
            NbdAddr::Unix("/run/nbd.sock".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:10809".parse::<NbdAddr>().unwrap(),
            NbdAddr::Tcp {
                host: "127.0.0.1".into(),
                port: 10809
            }
        );
        assert_eq!(
            NbdAddr::parse_listen("tcp:[::1]:0").unwrap(),
            NbdAddr::Tcp {
                host: "::1".into(),
                port: 0
            }
        );
        for bad in ["unix:", "tcp:host", "tcp::1:2", "udp:1.2.3.4:5", "/tmp/x"] {
            assert!(NbdAddr::parse_listen(bad).is_err(), "{bad}");
        }
        let a = NbdAddr::parse_listen("tcp:[::1]:5").unwrap();
        assert_eq!(NbdAddr::parse_listen(&a.to_string()).unwrap(), a);
    }
}
