//! The `VhostUserBackend` implementation: feature negotiation, config space, and
//! one worker thread per queue.

use super::inflight::{self, InflightBuffer};
use super::queue_io::QueueIo;
use super::resize::Resizer;
use super::vring::Vring;
use super::worker;
use crate::sync::MutexExt;
use crate::virtio_blk::{GuestMem, VirtioBlk};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};
use vhost::vhost_user::message::{
    VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::Backend;
use vhost_user_backend::VhostUserBackend;
use vm_memory::{
    Address, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// The backend of one vhost-user connection.
pub(crate) struct BlkBackend {
    device: Arc<VirtioBlk>,
    /// One per queue, indexed like the queues (and the worker threads).
    queues: Vec<QueueIo>,
    /// The same object the vhost-user handler updates on SET_MEM_TABLE /
    /// ADD_MEM_REGION, so workers always see the current map.
    mem: GuestMemoryAtomic<GuestMem>,
    num_queues: usize,
    queue_size: usize,
    /// Exit-event consumers handed to vhost-user-backend: its event loop takes
    /// them with `into_raw_fd` and never closes them, so the backend does,
    /// once the loops (and their epoll sets) are gone.
    exit_consumers: Mutex<Vec<RawFd>>,
    /// Where the frontend's backend request channel goes (online resize).
    resizer: Arc<Resizer>,
}

impl BlkBackend {
    pub(crate) fn new(
        device: Arc<VirtioBlk>,
        mem: GuestMemoryAtomic<GuestMem>,
        num_queues: usize,
        queue_size: usize,
        poll_us: u32,
        resizer: Arc<Resizer>,
    ) -> io::Result<Self> {
        let depth = u16::try_from(queue_size).unwrap_or(u16::MAX);
        let queues = (0..num_queues)
            .map(|q| QueueIo::new(device.clone(), q, depth, poll_us))
            .collect::<io::Result<Vec<_>>>()?;
        match queues.first().and_then(QueueIo::channel_name) {
            Some(name) => {
                log::info!("I/O engine: {name}, up to {queue_size} requests in flight per queue")
            }
            None => log::info!("I/O engine: synchronous on the queue workers"),
        }
        Ok(BlkBackend {
            device,
            queues,
            mem,
            num_queues,
            queue_size,
            exit_consumers: Mutex::new(Vec::new()),
            resizer,
        })
    }

    /// The epoll event id of a queue's I/O-completion eventfd: ids up to
    /// `num_queues` are vhost-user-backend's own.
    pub(crate) fn completion_event(&self) -> u64 {
        self.num_queues as u64 + 1
    }

    /// The I/O side of queue `q`.
    pub(crate) fn queue(&self, q: usize) -> Option<&QueueIo> {
        self.queues.get(q)
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size
    }

    fn features(&self) -> u64 {
        self.device.geometry().features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.device.set_driver_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            // The channel an online resize is announced on.
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        // On the connection thread: the resizer only stores the channel and
        // starts its sender; it never sends from here (the frontend's answer
        // waits for a GET_CONFIG this thread must serve).
        self.resizer.attach_channel(backend);
    }

    fn get_inflight_fd(&self, msg: &VhostUserInflight) -> io::Result<(VhostUserInflight, File)> {
        let (reply, file) = inflight::create(msg, self.num_queues, self.queue_size)
            .inspect_err(|e| log::warn!("GET_INFLIGHT_FD refused: {e}"))?;
        log::info!(
            "GET_INFLIGHT_FD: new inflight buffer for {} queue(s) of {} ({} bytes)",
            reply.num_queues,
            reply.queue_size,
            reply.mmap_size
        );
        Ok((reply, file))
    }

    fn set_inflight_fd(&self, msg: &VhostUserInflight, file: File) -> io::Result<()> {
        let buffer = InflightBuffer::open(msg, &file, self.num_queues, self.queue_size)
            .inspect_err(|e| log::warn!("SET_INFLIGHT_FD refused: {e}"))?;
        log::info!(
            "SET_INFLIGHT_FD: tracking {} queue(s) of {} in the frontend's buffer ({} bytes)",
            buffer.num_queues(),
            msg.queue_size,
            msg.mmap_size
        );
        for (q, io) in self.queues.iter().enumerate() {
            io.set_inflight(buffer.queue(q));
        }
        Ok(())
    }

    fn reset_device(&self) {
        self.device.reset();
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The handler sets EVENT_IDX on each vring's queue, which is where the
        // worker reads it.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // The frontend asks for as much as its own struct holds; bytes past ours
        // read as zero.
        let space = self.device.config_space();
        (offset..offset.saturating_add(size))
            .map(|i| space.get(i as usize).copied().unwrap_or(0))
            .collect()
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        if self.device.write_config(offset, buf) {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("config bytes {offset}+{} are read-only", buf.len()),
            ))
        }
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMem>) -> io::Result<()> {
        // `self.mem` is a clone of the atomic the handler just updated. A
        // region that claims more bytes than its file holds would kill the
        // process with SIGBUS at the first ring or buffer past the file's end:
        // unmap all guest memory instead (every request then fails) until the
        // frontend sends a table that holds.
        let result = match memory_fits_files(&self.mem.memory()) {
            Ok(()) => Ok(()),
            Err(why) => {
                log::error!("refusing the frontend's memory table: {why}; guest memory unmapped");
                if let Ok(guard) = self.mem.lock() {
                    guard.replace(GuestMem::new());
                }
                Err(io::Error::new(io::ErrorKind::InvalidInput, why))
            }
        };
        // The reply goes out when this returns, and a frontend (libblkio maps
        // its buffers one ADD_MEM_REG at a time) then queues requests in the
        // new regions at once. A worker pass still running on the old
        // snapshot would find them outside guest memory: wait until every
        // pass has seen the change and ended (a pass ends at its next turn
        // once the table changed).
        for io in &self.queues {
            drop(io.lock());
        }
        result
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the ring position reported must include every
        // request handed to the pool, and no write may still be landing on the
        // disk once the queue is stopped (the frontend may then migrate or
        // snapshot it).
        if let Some(io) = self.queues.get(queue_index as usize) {
            io.wait_idle();
        }
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread per queue: queues never wait for each other.
        (0..self.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without an exit event the handler could not stop (and join) the
        // workers when the connection ends.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => {
                self.exit_consumers
                    .lock_or_recover()
                    .push(pair.0.as_raw_fd());
                Some(pair)
            }
            Err(e) => {
                log::error!("cannot create a worker exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // Each worker owns exactly one vring, so its kick is event 0, and its
        // channel's or pool's completions arrive as `completion_event`; both
        // are served the same way. An error returned here would stop the
        // worker for good, so guest-caused problems are logged by the device
        // model and never returned.
        let (Some(vring), Some(io)) = (vrings.first(), self.queues.get(thread_id)) else {
            log::warn!("queue worker {thread_id}: no vring");
            return Ok(());
        };
        if device_event == 0 || u64::from(device_event) == self.completion_event() {
            worker::serve(vring, &self.mem, &self.device, io);
        } else {
            log::warn!("queue worker {thread_id}: unexpected event {device_event}");
        }
        Ok(())
    }
}

/// Checks that every region's file holds the bytes the region maps.
fn memory_fits_files(mem: &GuestMem) -> Result<(), String> {
    for region in mem.iter() {
        let Some(fo) = region.file_offset() else {
            continue;
        };
        let meta = fo.file().metadata().map_err(|e| format!("fstat: {e}"))?;
        // Only regular files (memfd, shm, hugetlbfs) end: device files do not.
        if !meta.is_file() {
            continue;
        }
        let end = fo.start().saturating_add(region.len());
        if meta.len() < end {
            return Err(format!(
                "region at guest address {:#x} maps {} bytes at offset {} of a {}-byte file",
                region.start_addr().raw_value(),
                region.len(),
                fo.start(),
                meta.len()
            ));
        }
    }
    Ok(())
}

impl Drop for BlkBackend {
    fn drop(&mut self) {
        // The last reference goes when the daemon and its worker threads are
        // gone: nothing polls these descriptors any more.
        let fds = self
            .exit_consumers
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for fd in fds.drain(..) {
            // SAFETY: `fd` came from an EventConsumer whose ownership
            // vhost-user-backend took with into_raw_fd and never closes; no
            // one else refers to it now.
            unsafe { libc::close(fd) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::RawFile;
    use crate::virtio_blk::Geometry;
    use std::sync::mpsc;
    use std::time::Duration;
    use vm_memory::GuestAddress;

    #[test]
    fn a_new_memory_table_is_acknowledged_only_after_the_running_pass_ends() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 << 20).unwrap();
        let raw = Arc::new(RawFile::from_file(file, false).unwrap());
        let device = Arc::new(VirtioBlk::new(
            raw.clone(),
            Geometry::new(1 << 20, 512, 16, 1, false),
            "",
        ));
        let mem =
            GuestMemoryAtomic::new(GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
        let resizer = Arc::new(Resizer::new(raw, 512));
        let backend = Arc::new(BlkBackend::new(device, mem.clone(), 1, 16, 0, resizer).unwrap());

        // A worker pass holds its queue for as long as it runs.
        let pass = backend.queue(0).unwrap().lock();
        let (tx, rx) = mpsc::channel();
        let updater = {
            let (backend, mem) = (backend.clone(), mem.clone());
            std::thread::spawn(move || {
                backend.update_memory(mem).unwrap();
                tx.send(()).unwrap();
            })
        };
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "update_memory returned (and the frontend got its reply) during a pass"
        );
        drop(pass);
        rx.recv_timeout(Duration::from_secs(20))
            .expect("update_memory returns once the pass ended");
        updater.join().unwrap();
    }
}
