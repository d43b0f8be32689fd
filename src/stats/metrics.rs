//! The optional Prometheus endpoint (`serve --metrics unix:PATH|tcp:HOST:PORT`):
//! answers every HTTP request on it with the statistics in Prometheus text
//! format. Loopback or a unix socket only: the numbers describe a guest's
//! I/O, and the endpoint has no authentication.

use super::StatsError;
use crate::unix_socket::{self, SocketFile};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
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

/// A running endpoint; dropping it stops it (and removes a unix socket).
pub struct MetricsServer {
    fd: i32,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    _listener: Arc<Listener>,
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
        let listener = Arc::new(listener);
        let fd = match &*listener {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        };
        let stopping = Arc::new(AtomicBool::new(false));
        let (l, stop) = (Arc::clone(&listener), Arc::clone(&stopping));
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || serve(&l, &stop, &render))
            .map_err(StatsError::Thread)?;
        log::info!("metrics endpoint on {addr:?}");
        Ok(MetricsServer {
            fd,
            stopping,
            thread: Some(thread),
            _listener: listener,
        })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // SAFETY: shutdown only reads its integer arguments; the fd belongs to
        // the listener this struct keeps alive. It makes a blocked accept()
        // return on Linux.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(l: &Listener, stopping: &AtomicBool, render: &Render) {
    loop {
        let conn: Result<Box<dyn Conn>, std::io::Error> = match l {
            Listener::Unix(u, _) => u.accept().map(|(s, _)| Box::new(s) as Box<dyn Conn>),
            Listener::Tcp(t) => t.accept().map(|(s, _)| Box::new(s) as Box<dyn Conn>),
        };
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        match conn {
            Ok(mut c) => {
                if let Err(e) = answer(&mut *c, render) {
                    log::debug!("metrics: {e}");
                }
            }
            Err(e) => {
                log::warn!("metrics: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

trait Conn: Read + Write {
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
        assert!(MetricsAddr::parse("tcp:[::1]:9100").is_ok());
        assert!(MetricsAddr::parse("unix:/run/m.sock").is_ok());
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
