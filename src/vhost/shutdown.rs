//! Asking a running `serve` loop to stop, from any thread.

use crate::acceptor::{Stop, Wake};
use crate::sync::MutexExt;
use std::io;
use std::os::unix::io::RawFd;
use std::sync::Mutex;
use vhost_user_backend::ShutdownHandle;

/// A stop request shared between the serve loop and whoever may ask for it (the
/// signal thread, a control socket's `quit`, a test).
///
/// Stopping closes the current vhost-user connection; the loop then joins the
/// queue workers (so every request they picked up completes), flushes the disk,
/// and removes the socket.
pub struct Shutdown {
    stop: Stop,
    /// The live connection, if any. Control path only: never touched by workers.
    connection: Mutex<Option<ShutdownHandle>>,
}

impl Shutdown {
    /// A handle nobody has triggered yet.
    pub fn new() -> io::Result<Self> {
        Ok(Shutdown {
            stop: Stop::new()?,
            connection: Mutex::new(None),
        })
    }

    /// Asks the serve loop to stop. Idempotent; safe from any thread.
    pub fn request(&self) {
        self.stop.request();
        if let Some(conn) = self.lock().as_ref() {
            conn.shutdown();
        }
    }

    /// True once [`request`](Self::request) was called.
    pub fn is_requested(&self) -> bool {
        self.stop.is_requested()
    }

    /// Waits until `fd` (the vhost-user listener) is readable or a stop was
    /// requested.
    pub(crate) fn wait_readable(&self, fd: RawFd) -> io::Result<Wake> {
        self.stop.wait_readable(fd, None)
    }

    /// Records the live connection so that a stop request can close it. A request
    /// that raced with the connection being set up is honoured here.
    pub(crate) fn attach(&self, conn: Option<ShutdownHandle>) {
        let mut slot = self.lock();
        *slot = conn;
        if self.is_requested() {
            if let Some(conn) = slot.as_ref() {
                conn.shutdown();
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<ShutdownHandle>> {
        // A panic while holding this lock cannot leave the Option inconsistent.
        self.connection.lock_or_recover()
    }
}
