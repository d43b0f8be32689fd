//! The one way colo-blk stops a thread that waits for connections: a [`Stop`]
//! (a flag and an eventfd) that the waiting thread polls beside its listener,
//! and the [`Acceptor`] thread built on it for the NBD server, the control
//! socket and the metrics endpoint. The vhost-user serve loop waits on the same
//! [`Stop`] (inside `vhost::Shutdown`).
//!
//! A stop is seen at once whatever the listener is (Unix or TCP, its path
//! still there or not), and a listener never blocks its thread: it is polled,
//! and accepts without blocking.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

/// After a failed accept (EMFILE and friends, which leave the listener
/// readable), the acceptor waits this long rather than spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// A stop request: set once from any thread, seen by every waiter.
#[derive(Debug)]
pub struct Stop {
    requested: AtomicBool,
    wake: EventFd,
}

/// What ended a [`Stop::wait_readable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The fd is readable (a connection is waiting).
    Ready,
    /// A stop was requested.
    Stopped,
    /// The timeout passed.
    TimedOut,
}

impl Stop {
    /// A stop nobody has requested yet.
    pub fn new() -> io::Result<Stop> {
        Ok(Stop {
            requested: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
        })
    }

    /// Requests the stop. Idempotent; safe from any thread (not from a signal
    /// handler).
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        // A full counter (EAGAIN) still leaves the fd readable.
        let _ = self.wake.write(1);
    }

    /// True once [`Stop::request`] was called.
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Blocks until `fd` is readable, a stop is requested (also one requested
    /// before the call), or `timeout` (`None`: no limit) passes.
    pub fn wait_readable(&self, fd: RawFd, timeout: Option<Duration>) -> io::Result<Wake> {
        let ms = match timeout {
            None => -1,
            Some(t) => libc::c_int::try_from(t.as_millis()).unwrap_or(libc::c_int::MAX),
        };
        loop {
            if self.is_requested() {
                return Ok(Wake::Stopped);
            }
            let mut fds = [
                libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfd for the whole call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
            if rc < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if fds[1].revents != 0 || self.is_requested() {
                return Ok(Wake::Stopped);
            }
            if fds[0].revents != 0 {
                return Ok(Wake::Ready);
            }
            return Ok(Wake::TimedOut);
        }
    }
}

/// A listening socket an [`Acceptor`] can serve.
pub trait Accept: AsRawFd + Send + 'static {
    /// An accepted connection.
    type Conn: Send + 'static;
    /// Makes `accept` return `WouldBlock` instead of blocking.
    fn set_nonblocking(&self) -> io::Result<()>;
    /// Accepts one connection (a blocking one, whatever the listener is).
    fn accept_conn(&self) -> io::Result<Self::Conn>;
}

impl Accept for UnixListener {
    type Conn = UnixStream;
    fn set_nonblocking(&self) -> io::Result<()> {
        UnixListener::set_nonblocking(self, true)
    }
    fn accept_conn(&self) -> io::Result<UnixStream> {
        let (s, _) = self.accept()?;
        s.set_nonblocking(false)?;
        Ok(s)
    }
}

impl Accept for TcpListener {
    type Conn = TcpStream;
    fn set_nonblocking(&self) -> io::Result<()> {
        TcpListener::set_nonblocking(self, true)
    }
    fn accept_conn(&self) -> io::Result<TcpStream> {
        let (s, _) = self.accept()?;
        s.set_nonblocking(false)?;
        Ok(s)
    }
}

/// What an [`Acceptor`] hands its handler.
#[derive(Debug)]
pub enum Event<C> {
    /// A new connection.
    Accepted(C),
    /// The timeout the handler asked for passed with no connection.
    Idle,
}

/// A thread accepting connections on a listener until stopped. The handler
/// is called for every connection and, when it asks for a timeout, once per
/// timeout without one; it returns the next timeout (`None`: wait for the next
/// connection however long). Dropping the acceptor stops it and joins the
/// thread, which drops the listener.
#[derive(Debug)]
pub struct Acceptor {
    stop: Arc<Stop>,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor {
    /// Starts thread `name` serving `listener`; `timeout` is the handler's
    /// first timeout.
    pub fn spawn<L, F>(
        name: &str,
        listener: L,
        timeout: Option<Duration>,
        mut handler: F,
    ) -> io::Result<Acceptor>
    where
        L: Accept,
        F: FnMut(Event<L::Conn>) -> Option<Duration> + Send + 'static,
    {
        listener.set_nonblocking()?;
        let stop = Arc::new(Stop::new()?);
        let st = Arc::clone(&stop);
        let label = name.to_string();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let mut timeout = timeout;
                loop {
                    let event = match st.wait_readable(listener.as_raw_fd(), timeout) {
                        Ok(Wake::Stopped) => return,
                        Ok(Wake::TimedOut) => Event::Idle,
                        Ok(Wake::Ready) => match listener.accept_conn() {
                            Ok(conn) => Event::Accepted(conn),
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                            Err(e) => {
                                log::warn!("{label}: accept failed: {e}");
                                std::thread::sleep(ACCEPT_BACKOFF);
                                continue;
                            }
                        },
                        Err(e) => {
                            log::error!(
                                "{label}: poll on the listener failed: {e}; no longer accepting"
                            );
                            return;
                        }
                    };
                    timeout = handler(event);
                }
            })?;
        Ok(Acceptor {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops accepting and waits for the thread (and its handler) to end.
    /// Idempotent.
    pub fn stop(&mut self) {
        self.stop.request();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("an accept thread panicked");
            }
        }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::mpsc;

    #[test]
    fn accepts_until_stopped_then_drops_the_listener() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (tx, rx) = mpsc::channel();
        let mut a = Acceptor::spawn("test-accept", listener, None, move |ev| {
            if let Event::Accepted(s) = ev {
                tx.send(s).unwrap();
            }
            None
        })
        .unwrap();
        let mut c = UnixStream::connect(&path).unwrap();
        let mut served = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        // The connection blocks, whatever the listener does.
        let reader = std::thread::spawn(move || {
            let mut b = [0u8; 1];
            served.read_exact(&mut b).map(|()| b[0])
        });
        std::thread::sleep(Duration::from_millis(20));
        c.write_all(&[7]).unwrap();
        assert_eq!(reader.join().unwrap().unwrap(), 7);
        a.stop();
        // The listener went with the thread: nobody accepts any more.
        UnixStream::connect(&path).unwrap_err();
    }

    #[test]
    fn a_stop_requested_first_ends_the_wait_at_once_and_timeouts_tick() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let stop = Stop::new().unwrap();
        assert_eq!(
            stop.wait_readable(l.as_raw_fd(), Some(Duration::from_millis(1)))
                .unwrap(),
            Wake::TimedOut
        );
        stop.request();
        assert_eq!(
            stop.wait_readable(l.as_raw_fd(), None).unwrap(),
            Wake::Stopped
        );
        let (tx, rx) = mpsc::channel();
        let _a = Acceptor::spawn("test-idle", l, Some(Duration::from_millis(1)), move |ev| {
            let _ = tx.send(matches!(ev, Event::Idle));
            Some(Duration::from_millis(1))
        })
        .unwrap();
        assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap());
    }
}
