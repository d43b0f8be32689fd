//! The backend request channel of one connection, for the one message colo-blk
//! sends on it: VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, after an online resize.
//!
//! The frontend answers it (with REPLY_ACK) only after it has re-read the
//! config space with GET_CONFIG on the main channel, which the connection
//! thread serves. So the message is never sent from that thread, and nothing
//! the connection thread takes is held while the answer is awaited: a sender
//! thread of the channel's own sends and waits, and whoever asked for the
//! message waits for its outcome at most a bound. A frontend that never
//! answers therefore costs one blocked sender per connection, never a wedged
//! control socket. Closing the channel (the connection ended, or the frontend
//! sent another one) shuts its socket down, which ends a wait in progress.

use crate::sync::{CondvarExt, MutexExt};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};

/// How one config-change message went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// The frontend took the message; with REPLY_ACK it also answered that it
    /// handled it (QEMU: re-read the config, notified the guest).
    Delivered,
    /// Sending failed, or the frontend answered with an error.
    Failed(String),
    /// No answer within the bound. The message may still be handled later.
    NoAnswer,
    /// The channel was closed before the message went out or was answered.
    Closed,
}

/// A frontend's backend request channel and its sender thread.
pub(crate) struct ConfigChannel {
    shared: Arc<Shared>,
    /// Keeps the socket open until the channel is dropped, so the descriptor
    /// [`close`](Self::close) shuts down is never another file's.
    backend: Backend,
    sender: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    /// Config changes asked for so far.
    asked: u64,
    /// Config changes a message already covers: a message sent after the
    /// capacity changed tells the frontend of every change before it, so
    /// requests made while one is in flight share the next message.
    sent: u64,
    /// The outcome of the last message (an error text when it failed).
    last: Option<String>,
    closed: bool,
}

impl ConfigChannel {
    /// Takes over the channel the frontend sent (SET_BACKEND_REQ_FD) and
    /// starts its sender thread.
    pub(crate) fn open(backend: Backend) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let sender = {
            let shared = Arc::clone(&shared);
            let backend = backend.clone();
            std::thread::Builder::new()
                .name("config-change".into())
                .spawn(move || send_loop(&shared, &backend))?
        };
        Ok(ConfigChannel {
            shared,
            backend,
            sender: Mutex::new(Some(sender)),
        })
    }

    /// Asks for a config-change message and waits at most `bound` for its
    /// outcome. Call it after the change, so the message covers it.
    pub(crate) fn notify(&self, bound: Duration) -> Delivery {
        let deadline = Instant::now() + bound;
        let mut st = self.shared.state.lock_or_recover();
        if st.closed {
            return Delivery::Closed;
        }
        st.asked += 1;
        let mine = st.asked;
        self.shared.changed.notify_all();
        loop {
            if st.sent >= mine {
                return match &st.last {
                    None => Delivery::Delivered,
                    Some(e) => Delivery::Failed(e.clone()),
                };
            }
            if st.closed {
                return Delivery::Closed;
            }
            let now = Instant::now();
            if now >= deadline {
                return Delivery::NoAnswer;
            }
            st = self
                .shared
                .changed
                .wait_timeout_or_recover(st, deadline - now)
                .0;
        }
    }

    /// Stops the sender, ending a wait for an answer in progress, and joins
    /// it. Bounded: after the shutdown, the socket answers every receive and
    /// send at once.
    pub(crate) fn close(&self) {
        {
            let mut st = self.shared.state.lock_or_recover();
            st.closed = true;
            self.shared.changed.notify_all();
        }
        // SAFETY: shutdown only reads its integer arguments; the descriptor
        // is open, since `self.backend` holds it until the channel is dropped.
        unsafe { libc::shutdown(self.backend.as_raw_fd(), libc::SHUT_RDWR) };
        let sender = self.sender.lock_or_recover().take();
        if let Some(sender) = sender {
            let _ = sender.join();
        }
    }
}

impl Drop for ConfigChannel {
    fn drop(&mut self) {
        self.close();
    }
}

/// The sender thread: one message per batch of requests, until closed.
fn send_loop(shared: &Shared, backend: &Backend) {
    loop {
        let target = {
            let mut st = shared.state.lock_or_recover();
            while st.sent == st.asked && !st.closed {
                st = shared.changed.wait_or_recover(st);
            }
            if st.closed {
                return;
            }
            st.asked
        };
        let outcome = backend.handle_config_change().err().map(|e| e.to_string());
        let mut st = shared.state.lock_or_recover();
        st.sent = target;
        st.last = outcome;
        shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::FromRawFd;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vhost::vhost_user::{FrontendReqHandler, HandlerResult};

    #[derive(Default)]
    struct Frontend {
        changes: AtomicUsize,
    }

    impl VhostUserFrontendReqHandler for Frontend {
        fn handle_config_change(&self) -> HandlerResult<u64> {
            self.changes.fetch_add(1, Ordering::SeqCst);
            Ok(0)
        }
    }

    /// A channel whose other end is `vhost`'s frontend-side handler.
    fn pair() -> (ConfigChannel, FrontendReqHandler<Frontend>, Arc<Frontend>) {
        let frontend = Arc::new(Frontend::default());
        let mut handler = FrontendReqHandler::new(Arc::clone(&frontend)).unwrap();
        handler.set_reply_ack_flag(true);
        // SAFETY: dup of the handler's live socket; the stream owns the copy.
        let fd = unsafe { libc::dup(handler.get_tx_raw_fd()) };
        assert!(fd >= 0);
        // SAFETY: `fd` is a fresh descriptor of a unix stream socket.
        let backend = Backend::from_stream(unsafe { UnixStream::from_raw_fd(fd) });
        backend.set_reply_ack_flag(true);
        (ConfigChannel::open(backend).unwrap(), handler, frontend)
    }

    #[test]
    fn the_frontend_receives_config_change_and_its_answer_is_awaited() {
        let (channel, mut handler, frontend) = pair();
        let served = std::thread::spawn(move || {
            let r = handler.handle_request();
            (r.is_ok(), handler)
        });
        assert_eq!(channel.notify(Duration::from_secs(20)), Delivery::Delivered);
        let (ok, _handler) = served.join().unwrap();
        assert!(ok);
        assert_eq!(frontend.changes.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_silent_frontend_costs_the_bound_and_close_ends_the_wait() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let backend = Backend::from_stream(ours);
        backend.set_reply_ack_flag(true);
        let channel = ConfigChannel::open(backend).unwrap();
        let started = Instant::now();
        assert_eq!(
            channel.notify(Duration::from_millis(200)),
            Delivery::NoAnswer
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        // The message is there: CONFIG_CHANGE_MSG (2), version 1 with
        // NEED_REPLY (0x8), no body.
        let mut hdr = [0u8; 12];
        theirs.read_exact(&mut hdr).unwrap();
        let word = |i: usize| u32::from_le_bytes(hdr[i..i + 4].try_into().unwrap());
        assert_eq!((word(0), word(4), word(8)), (2, 0x9, 0));
        // Another request waits behind the unanswered one, also bounded.
        assert_eq!(
            channel.notify(Duration::from_millis(100)),
            Delivery::NoAnswer
        );
        let closing = Instant::now();
        channel.close();
        assert!(closing.elapsed() < Duration::from_secs(5));
        assert_eq!(channel.notify(Duration::from_secs(5)), Delivery::Closed);
    }

    #[test]
    fn a_frontend_that_hung_up_is_a_failure_not_a_wait() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let backend = Backend::from_stream(ours);
        let channel = ConfigChannel::open(backend).unwrap();
        match channel.notify(Duration::from_secs(20)) {
            Delivery::Failed(_) => {}
            other => panic!("{other:?}"),
        }
    }
}
