//! The vring type the backend uses: vhost-user-backend's `VringRwLock` with the
//! frontend's file descriptors checked before they are used.
//!
//! Kick and call fds come from the frontend and are untrusted: a pipe given as
//! a kick fd blocks the worker in an 8-byte read (or ends it at EOF); a call
//! fd nobody drains, or an eventfd whose counter the frontend drove to the
//! top, blocks it in a write. Both while holding the vring lock, which then
//! wedges GET_VRING_BASE and every later frontend. So: only eventfds are
//! accepted, they are made non-blocking, and "would block" is never an error
//! that ends a worker.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use vhost_user_backend::{VringRwLock, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::Error as VirtQueError;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};

/// A `VringRwLock` that only takes non-blocking eventfds from the frontend.
#[derive(Clone)]
pub(crate) struct GuardedVring<M: GuestAddressSpace> {
    inner: VringRwLock<M>,
    /// Set when the ring (re)starts (a new kick fd): the driver's `used_event`
    /// may lag behind a ring rewound on reconnect, so the next pass notifies
    /// whatever it says (libvhost-user's `signalled_used_valid = false`).
    started: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl<M: GuestAddressSpace> GuardedVring<M> {
    /// True once after each (re)start of the ring.
    pub(crate) fn take_started(&self) -> bool {
        self.started
            .swap(false, std::sync::atomic::Ordering::AcqRel)
    }
}

/// Why a frontend's fd is refused, if it is.
fn check_eventfd(file: &File) -> Result<(), String> {
    let fd = file.as_raw_fd();
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map_err(|e| format!("cannot inspect it: {e}"))?;
    if target.as_os_str() != "anon_inode:[eventfd]" {
        return Err(format!("it is {}, not an eventfd", target.display()));
    }
    // SAFETY: F_GETFL/F_SETFL on an fd this process owns; no memory involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(format!(
            "cannot make it non-blocking: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Makes the ring's first pass happen as soon as it is enabled, kick or not: a
/// restarted backend owes the driver the requests its predecessor took, and a
/// driver waiting for them has no reason to kick (libvhost-user does the same).
pub(crate) fn kick_self(kick: &impl AsRawFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: an 8-byte write from a live buffer to an eventfd this vring owns.
    let rc = unsafe { libc::write(kick.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    if rc < 0 {
        // A counter at the top already means "kicked".
        log::debug!("cannot kick the ring: {}", io::Error::last_os_error());
    }
}

fn checked(what: &str, file: Option<File>) -> Option<File> {
    let file = file?;
    match check_eventfd(&file) {
        Ok(()) => Some(file),
        Err(why) => {
            log::warn!("frontend's {what} fd refused: {why}; the queue will not be served");
            None
        }
    }
}

impl<'a, M: 'a + GuestAddressSpace> VringStateGuard<'a, M> for GuardedVring<M> {
    type G = <VringRwLock<M> as VringStateGuard<'a, M>>::G;
}

impl<'a, M: 'a + GuestAddressSpace> VringStateMutGuard<'a, M> for GuardedVring<M> {
    type G = <VringRwLock<M> as VringStateMutGuard<'a, M>>::G;
}

impl<M: 'static + GuestAddressSpace> VringT<M> for GuardedVring<M> {
    fn new(mem: M, max_queue_size: u16) -> Result<Self, VirtQueError> {
        Ok(GuardedVring {
            inner: VringRwLock::new(mem, max_queue_size)?,
            started: Default::default(),
        })
    }
    fn get_ref(&self) -> <Self as VringStateGuard<'_, M>>::G {
        self.inner.get_ref()
    }
    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, M>>::G {
        self.inner.get_mut()
    }
    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), VirtQueError> {
        self.inner.add_used(desc_index, len)
    }
    fn signal_used_queue(&self) -> io::Result<()> {
        match self.inner.signal_used_queue() {
            // The frontend left its call counter at the top: it gets no
            // interrupt now, and the worker does not stop.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            r => r,
        }
    }
    fn enable_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.enable_notification()
    }
    fn disable_notification(&self) -> Result<(), VirtQueError> {
        self.inner.disable_notification()
    }
    fn needs_notification(&self) -> Result<bool, VirtQueError> {
        self.inner.needs_notification()
    }
    fn set_enabled(&self, enabled: bool) {
        self.inner.set_enabled(enabled)
    }
    fn set_queue_info(&self, desc: u64, avail: u64, used: u64) -> Result<(), VirtQueError> {
        self.inner.set_queue_info(desc, avail, used)
    }
    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }
    fn set_queue_next_avail(&self, base: u16) {
        self.inner.set_queue_next_avail(base)
    }
    fn set_queue_next_used(&self, idx: u16) {
        self.inner.set_queue_next_used(idx)
    }
    fn queue_used_idx(&self) -> Result<u16, VirtQueError> {
        self.inner.queue_used_idx()
    }
    fn set_queue_size(&self, num: u16) {
        self.inner.set_queue_size(num)
    }
    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled)
    }
    fn set_queue_ready(&self, ready: bool) {
        self.inner.set_queue_ready(ready)
    }
    fn set_kick(&self, file: Option<File>) {
        let file = checked("kick", file);
        if let Some(kick) = &file {
            self.started
                .store(true, std::sync::atomic::Ordering::Release);
            kick_self(kick);
        }
        self.inner.set_kick(file)
    }
    fn read_kick(&self) -> io::Result<bool> {
        match self.inner.read_kick() {
            // Someone else (the frontend itself) drained the kick first: an
            // error here would end the worker thread for good.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(self.get_ref().is_enabled()),
            r => r,
        }
    }
    fn set_call(&self, file: Option<File>) {
        self.inner.set_call(checked("call", file))
    }
    fn set_err(&self, file: Option<File>) {
        self.inner.set_err(checked("err", file))
    }
}

/// The vring of every queue of the backend.
pub(crate) type Vring = GuardedVring<GuestMemoryAtomic<crate::virtio_blk::GuestMem>>;
