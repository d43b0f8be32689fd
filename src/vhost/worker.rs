//! A queue worker's reaction to a kick: drain the ring, notify once, and re-arm
//! notifications without losing a request that raced with re-arming.

use crate::virtio_blk::{BlkDevice, GuestMem, Scratch};
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};

/// Serves everything available on `vring`.
///
/// The vring lock is held for the whole pass: it is per queue, so only the
/// control thread (e.g. GET_VRING_BASE, which must wait for in-flight requests
/// anyway) can wait on it.
///
/// Driver notifications are suppressed while draining and re-enabled at the end;
/// `enable_notification` reports entries that arrived in between, and then the
/// loop drains again, so no request is left waiting for a kick that will never
/// come. With EVENT_IDX this publishes `avail_event`; without it it toggles
/// VRING_USED_F_NO_NOTIFY. The used-buffer notification is sent once per pass,
/// and only when `needs_notification` (the driver's `used_event`) asks for it.
pub(crate) fn serve_vring(
    vring: &VringRwLock,
    mem: &GuestMemoryAtomic<GuestMem>,
    device: &BlkDevice,
    queue_index: usize,
) {
    let mut state = vring.get_mut();
    if !state.get_queue().ready() {
        return;
    }
    let guard = mem.memory();
    let mem: &GuestMem = &guard;
    let mut scratch = Scratch::default();
    let mut idle_passes = 0;
    loop {
        let queue = state.get_queue_mut();
        if let Err(e) = queue.disable_notification(mem) {
            log::warn!("queue {queue_index}: cannot disable notifications: {e}");
        }
        let done = device.process_queue(queue, mem, &mut scratch);
        idle_passes = if done == 0 { idle_passes + 1 } else { 0 };
        if done > 0 {
            match queue.needs_notification(mem) {
                Ok(false) => {}
                Ok(true) => {
                    if let Err(e) = state.signal_used_queue() {
                        log::warn!("queue {queue_index}: cannot notify the driver: {e}");
                    }
                }
                Err(e) => log::warn!("queue {queue_index}: used_event unreadable: {e}"),
            }
        }
        match state.get_queue_mut().enable_notification(mem) {
            // A ring that claims entries but yields none twice in a row is broken;
            // wait for the next kick rather than spin.
            Ok(true) if idle_passes < 2 => continue,
            Ok(_) => break,
            Err(e) => {
                log::warn!("queue {queue_index}: cannot enable notifications: {e}");
                break;
            }
        }
    }
}
