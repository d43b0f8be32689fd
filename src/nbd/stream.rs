//! Sockets: a connected stream (Unix or TCP) and a listener, with gathered
//! sends that go straight from the caller's buffers to the socket.

use super::uri::NbdAddr;
use super::NbdError;
use crate::acceptor::Accept;
use crate::unix_socket::{self, SocketFile};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;
use vm_memory::VolatileSlice;

/// At most this many iovecs per sendmsg (Linux's UIO_MAXIOV).
const IOV_MAX: usize = 1024;

/// A connected NBD socket.
#[derive(Debug)]
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
    /// A TLS session over a plain `Unix` or `Tcp` stream; clones share it.
    Tls(Arc<super::tls::TlsStream>),
}

impl Stream {
    /// Connects to `addr`; TCP gets `TCP_NODELAY` (NBD is request/response).
    pub(crate) fn connect(addr: &NbdAddr) -> io::Result<Stream> {
        match addr {
            NbdAddr::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path)?)),
            NbdAddr::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port))?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
        }
    }

    pub(crate) fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Tls(t) => Stream::Tls(t.clone()),
        })
    }

    /// Shuts both directions down: blocked readers and writers on every clone
    /// of this socket return at once.
    pub(crate) fn shutdown(&self) {
        // Failure means the socket is already disconnected, which is the goal.
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Tls(t) => {
                t.socket().shutdown();
                Ok(())
            }
        };
    }

    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Tls(s) => s.socket().set_read_timeout(t),
        }
    }

    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Tls(s) => s.socket().set_write_timeout(t),
        }
    }

    /// True when the peer closed both directions (or the socket failed), as
    /// opposed to a half-close after which it may still read replies. A TCP
    /// peer's close looks like a half-close until a send fails.
    pub(crate) fn peer_gone(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: pfd is one valid pollfd for the whole call; timeout 0.
        let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
        rc < 0 || pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0
    }

    /// The peer, for log lines.
    pub(crate) fn peer(&self) -> String {
        match self {
            Stream::Unix(_) => "unix peer".to_string(),
            Stream::Tcp(s) => s
                .peer_addr()
                .map_or_else(|_| "tcp peer".to_string(), |a| a.to_string()),
            Stream::Tls(t) => format!("{}, TLS", t.socket().peer()),
        }
    }

    /// True once STARTTLS upgraded the stream.
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Sends every byte of `parts`, in order, in as few syscalls as possible.
    pub(crate) fn send_all(&self, parts: &[&[u8]]) -> io::Result<()> {
        if let Stream::Tls(t) = self {
            return t.send_all(parts);
        }
        let mut iovs: Vec<libc::iovec> = parts
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            })
            .collect();
        send_iovecs(self.as_raw_fd(), &mut iovs)
    }

    /// Sends `head` then the bytes of `bufs` (guest memory), without copying.
    pub(crate) fn send_volatile(&self, head: &[u8], bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        if let Stream::Tls(t) = self {
            return t.send_volatile(head, bufs);
        }
        let mut iovs = Vec::with_capacity(1 + bufs.len());
        iovs.push(libc::iovec {
            iov_base: head.as_ptr() as *mut libc::c_void,
            iov_len: head.len(),
        });
        iovs.extend(bufs.iter().filter(|b| !b.is_empty()).map(|b| libc::iovec {
            iov_base: b.ptr_guard().as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        }));
        send_iovecs(self.as_raw_fd(), &mut iovs)
    }
}

/// sendmsg loop over partial sends and EINTR. MSG_NOSIGNAL: a vanished peer
/// is an error for this connection, never a SIGPIPE for the process.
fn send_iovecs(fd: RawFd, iovs: &mut [libc::iovec]) -> io::Result<()> {
    let mut first = 0;
    while first < iovs.len() {
        let end = (first + IOV_MAX).min(iovs.len());
        let batch = &mut iovs[first..end];
        // SAFETY: a zeroed msghdr is valid (no name, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = batch.as_mut_ptr();
        msg.msg_iovlen = batch.len();
        // SAFETY: every iovec points into a buffer the caller lent us for the
        // duration of this call, with its true length; sendmsg only reads them.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        first = crate::block::iovecs_advance(iovs, first, n as usize);
    }
    Ok(())
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Tls(t) => t.socket().as_raw_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
            Stream::Tls(t) => (&**t).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening socket. A Unix listener removes its socket file when dropped
/// (the listener field drops first, so the file goes after the socket closed).
#[derive(Debug)]
pub(crate) enum Listener {
    Unix(UnixListener, SocketFile),
    Tcp(TcpListener),
}

impl Listener {
    /// Binds `addr`. A Unix socket path appears only once it accepts; a stale
    /// socket file (nobody listening) is replaced, anything else refused.
    pub(crate) fn bind(addr: &NbdAddr) -> Result<Listener, NbdError> {
        match addr {
            NbdAddr::Unix(path) => {
                let (listener, file) = unix_socket::bind(path, None)?;
                Ok(Listener::Unix(listener, file))
            }
            NbdAddr::Tcp { host, port } => {
                let addrs: Vec<_> = (host.as_str(), *port).to_socket_addrs()?.collect();
                Ok(Listener::Tcp(TcpListener::bind(&addrs[..])?))
            }
        }
    }

    /// The bound address (with the real port when bound to port 0).
    pub(crate) fn local_addr(&self) -> io::Result<NbdAddr> {
        Ok(match self {
            Listener::Unix(_, file) => NbdAddr::Unix(file.path().to_owned()),
            Listener::Tcp(l) => {
                let a = l.local_addr()?;
                NbdAddr::Tcp {
                    host: a.ip().to_string(),
                    port: a.port(),
                }
            }
        })
    }
}

impl Accept for Listener {
    type Conn = Stream;

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Unix(l, _) => Accept::set_nonblocking(l),
            Listener::Tcp(l) => Accept::set_nonblocking(l),
        }
    }

    fn accept_conn(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l, _) => Ok(Stream::Unix(l.accept_conn()?)),
            Listener::Tcp(l) => {
                let s = l.accept_conn()?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
        }
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }
}
