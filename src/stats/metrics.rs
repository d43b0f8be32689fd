//! The optional Prometheus endpoint (`serve --metrics unix:PATH|tcp:HOST:PORT`):
//! answers every HTTP request on it with the statistics in Prometheus text
//! format. Loopback or a unix socket only: the numbers describe a guest's
//! I/O, and the endpoint has no authentication.

use super::StatsError;
use crate::acceptor::{Accept, Acceptor, Event};
use crate::unix_socket::{self, SocketFile};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Where the endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddr {
    /// A unix socket (mode 0600).
    Unix(PathBuf),
    /// A loopback TCP address.
    Tcp(SocketAddr),
}

impl MetricsAddr {
    /// Parses `unix:PATH` or `tcp:HOST:PORT` (HOST a loopback address).
    pub fn parse(s: &str) -> Result<Self, StatsError> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(StatsError::Addr(s.into(), "empty path".into()));
            }
            return Ok(MetricsAddr::Unix(path.into()));
        }
        let Some(rest) = s.strip_prefix("tcp:") else {
            return Err(StatsError::Addr(
                s.into(),
                "expected unix:PATH or tcp:HOST:PORT".into(),
            ));
        };
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| StatsError::Addr(s.into(), "no port".into()))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let ip: IpAddr = match host {
            "localhost" => IpAddr::from([127, 0, 0, 1]),
            h => h
                .parse()
                .map_err(|_| StatsError::Addr(s.into(), "host must be an IP address".into()))?,
        };
        if !ip.is_loopback() {
            return Err(StatsError::Addr(
                s.into(),
                "the metrics endpoint has no authentication: listen on loopback or a unix socket"
                    .into(),
            ));
        }
        let port: u16 = port
            .parse()
            .map_err(|_| StatsError::Addr(s.into(), "bad port".into()))?;
        Ok(MetricsAddr::Tcp(SocketAddr::new(ip, port)))
    }
}

/// What the endpoint serves: called once per request.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

enum Listener {
    /// The file removes the socket path when the listener goes.
    Unix(UnixListener, #[allow(dead_code)] SocketFile),
    Tcp(TcpListener),
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }
}

impl Accept for Listener {
    type Conn = Box<dyn Conn>;

    fn set_nonblocking(&self) -> std::io::Result<()> {
        match self {
            Listener::Unix(l, _) => Accept::set_nonblocking(l),
            Listener::Tcp(l) => Accept::set_nonblocking(l),
        }
    }

    fn accept_conn(&self) -> std::io::Result<Box<dyn Conn>> {
        Ok(match self {
            Listener::Unix(l, _) => Box::new(l.accept_conn()?),
            Listener::Tcp(l) => Box::new(l.accept_conn()?),
        })
    }
}

/// A running endpoint; dropping it stops it (and removes a unix socket).
pub struct MetricsServer {
    _acceptor: Acceptor,
}

impl MetricsServer {
    /// Listens on `addr` and serves `render`'s text on a background thread.
    pub fn spawn(addr: &MetricsAddr, render: Render) -> Result<Self, StatsError> {
        let listener = match addr {
            MetricsAddr::Unix(p) => {
                let (l, f) = unix_socket::bind(p, Some(0o600))?;
                Listener::Unix(l, f)
            }
            MetricsAddr::Tcp(a) => {
                Listener::Tcp(TcpListener::bind(a).map_err(|e| StatsError::Listen(*a, e))?)
            }
        };
        let acceptor = Acceptor::spawn("metrics", listener, None, move |event| {
            if let Event::Accepted(mut c) = event {
                if let Err(e) = answer(&mut *c, &render) {
                    log::debug!("metrics: {e}");
                }
            }
            None
        })
        .map_err(StatsError::Thread)?;
        log::info!("metrics endpoint on {addr:?}");
        Ok(MetricsServer {
            _acceptor: acceptor,
        })
    }
}

trait Conn: Read + Write + Send {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()>;
}

impl Conn for std::os::unix::net::UnixStream {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

impl Conn for std::net::TcpStream {
    fn set_timeouts(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))?;
        self.set_write_timeout(Some(t))
    }
}

/// Reads the request head (bounded in size and time) and answers it.
fn answer(c: &mut dyn Conn, render: &Render) -> std::io::Result<()> {
    c.set_timeouts(Duration::from_secs(2))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = c.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let body = render();
    let reply = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    c.write_all(reply.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_or_unix_addresses_are_accepted() {
        assert_eq!(
            MetricsAddr::parse("tcp:127.0.0.1:9100").unwrap(),
            MetricsAddr::Tcp("127.0.0.1:9100".parse().unwrap())
        );
        MetricsAddr::parse("tcp:[::1]:9100").unwrap();
        MetricsAddr::parse("unix:/run/m.sock").unwrap();
        for bad in [
            "tcp:0.0.0.0:9100",
            "tcp:10.0.0.1:1",
            "tcp:127.0.0.1",
            "http://x",
            "unix:",
        ] {
            assert!(MetricsAddr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_http_get_gets_the_rendered_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.sock");
        let srv = MetricsServer::spawn(
            &MetricsAddr::Unix(path.clone()),
            Arc::new(|| "coloblk_x 1\n".to_string()),
        )
        .unwrap();
        let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.0 200 OK\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\ncoloblk_x 1\n"), "{out}");
        drop(srv);
        assert!(!path.exists());
    }
}
