//! A queue worker's reaction to an event (a kick, or completions): drain the
//! ring, start or run the requests, reap what finished, notify once, poll for
//! more while polling pays, and re-arm notifications without losing a request
//! that raced with re-arming.

use super::queue_io::{QueueIo, QueueState};
use super::resume;
use super::vring::{kick_self, Vring};
use crate::virtio_blk::{Completion, GuestMem, NoLog, Offload, RingLog, Scratch, VirtioBlk};
use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::time::Instant;
use vhost_user_backend::{VringState, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};

/// Turns with work one pass takes at most before it yields to the epoll loop
/// (each turn takes everything available, so this is many requests).
const MAX_TURNS: u32 = 32;

/// Serves queue `io.index`: everything available on `vring`, and every
/// completion waiting on the queue's channel or pool.
///
/// The vring lock is held for the whole pass: it is per queue, so only the
/// control thread (e.g. GET_VRING_BASE, which must wait for in-flight requests
/// anyway) can wait on it, for at most one polling window.
///
/// Driver notifications are suppressed while draining (and polling) and
/// re-enabled at the end; `enable_notification` reports entries that arrived in
/// between, and then the loop drains again, so no request is left waiting for a
/// kick that will never come. With EVENT_IDX this publishes `avail_event`;
/// without it it toggles VRING_USED_F_NO_NOTIFY. Used-buffer notifications go
/// out once per batch, and only when `needs_notification` (the driver's
/// `used_event`) asks for them.
pub(crate) fn serve(
    vring: &Vring,
    mem: &GuestMemoryAtomic<GuestMem>,
    device: &VirtioBlk,
    io: &QueueIo,
) {
    let mut st = io.lock();
    let st = &mut *st;
    st.poller.woke();
    let mut state = vring.get_mut();
    let guard = mem.memory();
    let m: &GuestMem = &guard;
    let q = io.index;
    // A stopped queue (GET_VRING_BASE) only retires what is in flight.
    let ready = state.get_queue().ready();
    // The first pass after the ring (re)started notifies unconditionally.
    let mut force_notify = ready && vring.take_started();
    let window = st.poller.window();
    let mut scratch = Scratch::for_queue(q);
    let mut done: Vec<Completion> = Vec::new();
    let mut pool_done: Vec<Completion> = Vec::new();
    let mut last_work = Instant::now();
    let mut idle_passes = 0;
    let mut first_pass = true;
    let mut no_log = NoLog;
    // Before anything is taken from a (re)started ring: what a predecessor
    // took and never completed is served again, and the ring resumes after it.
    if force_notify {
        if let Some(next) = st.inflight_next.take() {
            st.inflight = next;
        }
        if let Some(region) = st.inflight.as_mut() {
            let queue = state.get_queue_mut();
            match st.channel.as_mut() {
                Some(ch) => {
                    let mut sub = ch.submitter(device, &guard, &mut done);
                    resume::resume(queue, m, device, q, region, &mut scratch, Some(&mut sub));
                }
                None => {
                    let mut off = io.pool.offload(&guard);
                    resume::resume(queue, m, device, q, region, &mut scratch, Some(&mut off));
                }
            }
        }
    }
    let mut busy_turns = 0u32;
    loop {
        // A guest that never lets the ring run dry would keep this pass going
        // for ever, and the epoll loop around it with it: the worker's exit
        // event (a shutdown, a disconnect) would wait. And once the frontend
        // changed its memory table (ADD_MEM_REG and the like), what it queues
        // may sit in regions `m` does not map (update_memory waits for this
        // pass to end). Either way the pass ends, and its own kick starts
        // the next one.
        if busy_turns >= MAX_TURNS || (!first_pass && memory_replaced(mem, m)) {
            if let Some(kick) = state.get_kick() {
                kick_self(kick);
            }
            break;
        }
        let mut work = 0;
        let mut completed = 0;
        let log: &mut dyn RingLog = match st.inflight.as_mut() {
            Some(region) => region,
            None => &mut no_log,
        };
        if ready {
            let queue = state.get_queue_mut();
            if let Err(e) = queue.disable_notification(m) {
                device.report_ring_error(q, "cannot disable notifications", e);
            }
            let before = Wrapping(queue.next_avail());
            completed += match st.channel.as_mut() {
                Some(ch) => {
                    // An unreadable index counts as nothing available: the
                    // pass below reports it.
                    let available = queue
                        .avail_idx(m, Ordering::Acquire)
                        .map_or(0, |idx| (idx - before).0);
                    let mut sub = ch.turn_submitter(device, &guard, &mut done, available);
                    let off = Some(&mut sub as &mut dyn Offload);
                    let n = device.process_queue_logged(queue, m, &mut scratch, off, log);
                    ch.end_turn((Wrapping(queue.next_avail()) - before).0);
                    n
                }
                None => {
                    let mut off = io.pool.offload(&guard);
                    let off = Some(&mut off as &mut dyn Offload);
                    device.process_queue_logged(queue, m, &mut scratch, off, log)
                }
            };
            work += usize::from((Wrapping(queue.next_avail()) - before).0);
        }
        if let Some(ch) = st.channel.as_mut() {
            ch.submit();
            // The first pass reaps even when nothing shows: it clears the
            // completion eventfd, which a completion reaped by an earlier pass
            // may have left readable (level-triggered epoll would spin).
            if first_pass || ch.has_completions() {
                work += ch.reap(device, &mut done);
            }
        }
        if io.pool.busy() {
            io.pool.drain(&mut pool_done);
            work += pool_done.len();
        }
        completed += add_used(&mut state, m, device, q, &done, log);
        completed += add_used(&mut state, m, device, q, &pool_done, log);
        if completed > 0 || force_notify {
            notify(&mut state, m, device, q, std::mem::take(&mut force_notify));
        }
        done.clear();
        io.pool.retire(pool_done.len());
        pool_done.clear();
        first_pass = false;

        if work > 0 {
            busy_turns += 1;
            idle_passes = 0;
            if !window.is_zero() {
                last_work = Instant::now();
            }
            continue;
        }
        if ready && !window.is_zero() && waits_on_guest(st, io) && last_work.elapsed() < window {
            // Yield, not spin: the frontend this worker waits for may need
            // this very CPU (a frontend woken by our call runs where we run).
            // Spinning held it off for the whole window.
            std::thread::yield_now();
            continue;
        }
        if !ready {
            break;
        }
        idle_passes += 1;
        match state.get_queue_mut().enable_notification(m) {
            // A ring that claims entries but yields none twice in a row is broken;
            // wait for the next kick rather than spin.
            Ok(true) if idle_passes < 2 => continue,
            Ok(_) => break,
            Err(e) => {
                device.report_ring_error(q, "cannot enable notifications", e);
                break;
            }
        }
    }
    st.poller.sleeping(waits_on_guest(st, io));
}

/// True when nothing is in flight on the queue's channel or pool: the next
/// event can only be the guest's (see [`super::poll`]).
fn waits_on_guest(st: &QueueState, io: &QueueIo) -> bool {
    st.channel.as_ref().map_or(true, |ch| ch.in_flight() == 0) && !io.pool.busy()
}

/// True when the memory table in `mem` is no longer the snapshot `m`.
fn memory_replaced(mem: &GuestMemoryAtomic<GuestMem>, m: &GuestMem) -> bool {
    let current = mem.memory();
    !std::ptr::eq::<GuestMem>(&*current, m)
}

/// Puts finished requests in the used ring; returns how many went in.
fn add_used(
    state: &mut VringState<GuestMemoryAtomic<GuestMem>>,
    mem: &GuestMem,
    device: &VirtioBlk,
    q: usize,
    done: &[Completion],
    log: &mut dyn RingLog,
) -> usize {
    let queue: &mut Queue = state.get_queue_mut();
    for c in done {
        match log.add_used(queue, mem, c.head, c.used_len) {
            Ok(()) => device.account(q, &c.stat),
            Err(e) => device.report_ring_error(q, "cannot complete a request", e),
        }
    }
    done.len()
}

/// Notifies the driver, if its `used_event` asks for it (or `always`).
fn notify(
    state: &mut VringState<GuestMemoryAtomic<GuestMem>>,
    mem: &GuestMem,
    device: &VirtioBlk,
    q: usize,
    always: bool,
) {
    let wanted = match state.get_queue_mut().needs_notification(mem) {
        Ok(wanted) => wanted,
        Err(e) => {
            device.report_ring_error(q, "used_event unreadable", e);
            false
        }
    };
    if wanted || always {
        if let Err(e) = state.signal_used_queue() {
            log::warn!("queue {q}: cannot notify the driver: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::testing::{Gate, Intercept, Op};
    use crate::block::RawFile;
    use crate::virtio_blk::Geometry;
    use std::fs::File;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::sync::Arc;
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const SIZE: u16 = 16;
    /// A guard against hanging, not a measurement.
    const HANG: std::time::Duration = std::time::Duration::from_secs(20);

    /// A 1 MiB raw disk on an unlinked temporary file.
    fn temp_disk() -> Arc<RawFile> {
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 << 20).unwrap();
        Arc::new(RawFile::from_file(file, false).unwrap())
    }

    /// The geometry every test device uses: 1 MiB, 512-byte blocks, one queue.
    fn geometry() -> Geometry {
        Geometry::new(1 << 20, 512, SIZE, 1, false)
    }

    /// 16 MiB of guest memory at address 0.
    fn guest_memory() -> GuestMemoryAtomic<GuestMem> {
        GuestMemoryAtomic::new(GuestMem::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap())
    }

    /// Appends flush requests `first..first + n` (two descriptors each).
    fn add_flushes(mem: &GuestMem, vq: &MockSplitQueue<GuestMem>, first: u16, n: u16) {
        let mut descs = Vec::new();
        for i in first..first + n {
            let hdr = 0x10_0000 + u64::from(i) * 0x100;
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&VIRTIO_BLK_T_FLUSH.to_le_bytes());
            mem.write_slice(&h, GuestAddress(hdr)).unwrap();
            let next = (2 * i + 1) % SIZE;
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                hdr,
                16,
                VRING_DESC_F_NEXT as u16,
                next,
            )));
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                hdr + 0x80,
                1,
                VRING_DESC_F_WRITE as u16,
                0,
            )));
        }
        vq.add_desc_chains(&descs, 2 * first).unwrap();
    }

    #[test]
    fn a_restarted_ring_notifies_once_even_when_used_event_says_not_yet() {
        let disk = temp_disk();
        let device = Arc::new(VirtioBlk::new(disk, geometry(), ""));
        let io = QueueIo::new(device.clone(), 0, SIZE, 0).unwrap();
        let atomic = guest_memory();
        let guard = atomic.memory();
        let mem: &GuestMem = &guard;
        let vq = MockSplitQueue::new(mem, SIZE);
        let vring = Vring::new(atomic.clone(), SIZE).unwrap();
        vring.set_queue_size(SIZE);
        vring
            .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
            .unwrap();
        vring.set_queue_event_idx(true);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        // SAFETY: dup returns a new fd that the File then owns exclusively.
        let dup = unsafe { File::from_raw_fd(libc::dup(call.as_raw_fd())) };
        vring.set_call(Some(dup));
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        // SAFETY: as above. Setting the kick fd is what (re)starts a ring.
        let dup = unsafe { File::from_raw_fd(libc::dup(kick.as_raw_fd())) };
        vring.set_kick(Some(dup));

        // A driver whose used_event lags far behind a ring rewound on
        // reconnect: by EVENT_IDX rules it wants no interrupt yet.
        let used_event = vq.avail_addr().unchecked_add(4 + 2 * u64::from(SIZE));
        mem.write_obj(10u16, used_event).unwrap();
        add_flushes(mem, &vq, 0, 1);
        serve(&vring, &atomic, &device, &io);
        assert_eq!(call.read().unwrap(), 1, "first pass after start notifies");
    }

    #[test]
    fn a_started_ring_kicks_itself_so_its_first_pass_needs_no_guest_kick() {
        let atomic = guest_memory();
        let vring = Vring::new(atomic, SIZE).unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        // SAFETY: dup returns a new fd that the File then owns exclusively.
        let dup = unsafe { File::from_raw_fd(libc::dup(kick.as_raw_fd())) };
        vring.set_kick(Some(dup));
        assert_eq!(kick.read().unwrap(), 1);
    }

    #[test]
    fn a_pass_notifies_once_per_batch_and_rearms_event_idx() {
        let disk = temp_disk();
        let device = Arc::new(VirtioBlk::new(disk, geometry(), ""));
        let io = QueueIo::new(device.clone(), 0, SIZE, 0).unwrap();

        let atomic = guest_memory();
        let guard = atomic.memory();
        let mem: &GuestMem = &guard;
        let vq = MockSplitQueue::new(mem, SIZE);
        let vring = Vring::new(atomic.clone(), SIZE).unwrap();
        vring.set_queue_size(SIZE);
        vring
            .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
            .unwrap();
        vring.set_queue_event_idx(true);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        // SAFETY: dup returns a new fd that the File then owns exclusively.
        let dup = unsafe { File::from_raw_fd(libc::dup(call.as_raw_fd())) };
        vring.set_call(Some(dup));

        // Spec layout: used_event follows the avail ring, avail_event the used ring.
        let used_event = vq.avail_addr().unchecked_add(4 + 2 * u64::from(SIZE));
        let avail_event = vq.used_addr().unchecked_add(4 + 8 * u64::from(SIZE));
        let used_idx = vq.used_addr().unchecked_add(2);
        let read16 = |a| mem.read_obj::<u16>(a).unwrap();

        // The driver wants an interrupt as soon as the first request completes.
        mem.write_obj(0u16, used_event).unwrap();
        add_flushes(mem, &vq, 0, 3);
        serve(&vring, &atomic, &device, &io);
        assert_eq!(read16(used_idx), 3);
        assert_eq!(call.read().unwrap(), 1, "one interrupt for the whole batch");
        assert_eq!(read16(avail_event), 3, "re-armed: the next request kicks");

        // The driver asks for an interrupt only after 10 completions.
        mem.write_obj(10u16, used_event).unwrap();
        add_flushes(mem, &vq, 3, 1);
        serve(&vring, &atomic, &device, &io);
        assert_eq!(read16(used_idx), 4);
        assert!(call.read().is_err(), "no interrupt before used_event");
        assert_eq!(read16(avail_event), 4);
    }

    #[test]
    fn deferred_reads_complete_through_the_pool_and_the_worker() {
        use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;

        let gate = Arc::new(Gate::closed());
        let disk = gated_disk(temp_disk(), &gate);
        let device = Arc::new(VirtioBlk::new(disk, geometry(), ""));
        let io = QueueIo::new(device.clone(), 0, SIZE, 0).unwrap();

        let atomic = guest_memory();
        let guard = atomic.memory();
        let mem: &GuestMem = &guard;
        let vq = MockSplitQueue::new(mem, SIZE);
        let vring = Vring::new(atomic.clone(), SIZE).unwrap();
        vring.set_queue_size(SIZE);
        vring
            .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
            .unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);

        let (hdr, data, status, len) = (0x10_0000u64, 0x20_0000u64, 0x30_0000u64, 256u32 << 10);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        let d = |a, l, f: u32, n| RawDescriptor::from(SplitDescriptor::new(a, l, f as u16, n));
        vq.add_desc_chains(
            &[
                d(hdr, 16, VRING_DESC_F_NEXT, 1),
                d(data, len, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2),
                d(status, 1, VRING_DESC_F_WRITE, 0),
            ],
            0,
        )
        .unwrap();
        mem.write_obj(0xeeu8, GuestAddress(status)).unwrap();
        let used_idx = vq.used_addr().unchecked_add(2);

        serve(&vring, &atomic, &device, &io);
        // The worker returns while the read is still held at the gate in the
        // pool; only the worker puts it in the used ring, once the pool says
        // it is done.
        assert_eq!(gate.wait_for(1, HANG), 1);
        assert_eq!(mem.read_obj::<u16>(used_idx).unwrap(), 0);
        gate.open();
        let mut pfd = libc::pollfd {
            fd: io.pool.notify_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, -1) }, 1);
        serve(&vring, &atomic, &device, &io);
        assert_eq!(mem.read_obj::<u16>(used_idx).unwrap(), 1);
        let elem = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!((elem.id(), elem.len()), (0, len + 1));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(status)).unwrap(), 0);
        // Nothing is left in flight: GET_VRING_BASE would not block.
        io.wait_idle();
    }

    /// A disk whose reads and writes wait at `gate`, and that asks for
    /// writes to run concurrently (as a forwarding primary does).
    fn gated_disk(inner: Arc<RawFile>, gate: &Arc<Gate>) -> Arc<Intercept> {
        let gate = gate.clone();
        let disk = Intercept::new(inner, move |op, _, _| {
            if matches!(op, Op::Read | Op::Write) {
                gate.pass();
            }
            Ok(())
        });
        Arc::new(disk.with_concurrent_writes(4))
    }

    /// Appends 4k writes `first..first + n` of byte `i + 1` to sector `8 * i`.
    fn add_writes(mem: &GuestMem, vq: &MockSplitQueue<GuestMem>, first: u16, n: u16) {
        use virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;
        let mut descs = Vec::new();
        for i in first..first + n {
            let hdr = 0x10_0000 + u64::from(i) * 0x100;
            let data = 0x20_0000 + u64::from(i) * 0x1000;
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
            h[8..].copy_from_slice(&(8 * u64::from(i)).to_le_bytes());
            mem.write_slice(&h, GuestAddress(hdr)).unwrap();
            mem.write_slice(&[i as u8 + 1; 4096], GuestAddress(data))
                .unwrap();
            mem.write_obj(0xeeu8, GuestAddress(hdr + 0x80)).unwrap();
            let d = |a, l, f: u32, n| RawDescriptor::from(SplitDescriptor::new(a, l, f as u16, n));
            descs.push(d(hdr, 16, VRING_DESC_F_NEXT, 3 * i + 1));
            descs.push(d(data, 4096, VRING_DESC_F_NEXT, 3 * i + 2));
            descs.push(d(hdr + 0x80, 1, VRING_DESC_F_WRITE, 0));
        }
        vq.add_desc_chains(&descs, 3 * first).unwrap();
    }

    fn ready_vring(atomic: &GuestMemoryAtomic<GuestMem>, vq: &MockSplitQueue<GuestMem>) -> Vring {
        let vring = Vring::new(atomic.clone(), SIZE).unwrap();
        vring.set_queue_size(SIZE);
        vring
            .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
            .unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        vring
    }

    #[test]
    fn writes_run_in_the_pool_when_the_node_asks_and_a_stop_waits_for_them() {
        use crate::block::BlockDevExt;

        let raw = temp_disk();
        let gate = Arc::new(Gate::closed());
        let disk = gated_disk(raw.clone(), &gate);
        let device = Arc::new(VirtioBlk::new(disk, geometry(), ""));
        let io = Arc::new(QueueIo::new(device.clone(), 0, SIZE, 0).unwrap());

        let atomic = guest_memory();
        let guard = atomic.memory();
        let mem: &GuestMem = &guard;
        let vq = MockSplitQueue::new(mem, SIZE);
        let vring = ready_vring(&atomic, &vq);
        let used_idx = vq.used_addr().unchecked_add(2);

        add_writes(mem, &vq, 0, 3);
        serve(&vring, &atomic, &device, &io);
        // The worker is free again while all three writes are in progress at
        // once, on the pool's threads.
        assert_eq!(gate.wait_for(3, HANG), 3);
        assert_eq!(mem.read_obj::<u16>(used_idx).unwrap(), 0);

        // A stop (GET_VRING_BASE) waits until every write is in the used ring,
        // not merely until the disk has it.
        let (stopped_tx, stopped) = std::sync::mpsc::channel();
        let stopper = {
            let io = io.clone();
            std::thread::spawn(move || {
                io.wait_idle();
                stopped_tx.send(()).unwrap();
            })
        };
        gate.open();
        let mut done = 0;
        while done < 3 {
            let mut pfd = libc::pollfd {
                fd: io.pool.notify_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            assert_eq!(unsafe { libc::poll(&mut pfd, 1, -1) }, 1);
            assert!(
                stopped.try_recv().is_err(),
                "stop returned before completion"
            );
            serve(&vring, &atomic, &device, &io);
            done = mem.read_obj::<u16>(used_idx).unwrap();
        }
        stopper.join().unwrap();
        stopped.try_recv().unwrap();
        for i in 0..3u16 {
            let status = 0x10_0000 + u64::from(i) * 0x100 + 0x80;
            assert_eq!(mem.read_obj::<u8>(GuestAddress(status)).unwrap(), 0);
            let mut back = vec![0u8; 4096];
            raw.read_at(u64::from(i) * 4096, &mut back).unwrap();
            assert!(back.iter().all(|&b| b == i as u8 + 1), "write {i} on disk");
        }
    }

    #[test]
    fn a_pass_that_sees_the_memory_table_change_ends_and_kicks_its_ring() {
        let atomic = guest_memory();
        // The frontend adds a region while the worker is writing: the
        // handler replaces the table under the running pass.
        let replaced = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let disk = {
            let (atomic, replaced) = (atomic.clone(), replaced.clone());
            Intercept::new(temp_disk(), move |op, _, _| {
                if op == Op::Write && !replaced.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    let bigger = GuestMem::from_ranges(&[
                        (GuestAddress(0), 0x100_0000),
                        (GuestAddress(0x200_0000), 0x1_0000),
                    ])
                    .unwrap();
                    atomic.lock().unwrap().replace(bigger);
                }
                Ok(())
            })
        };
        let device = Arc::new(VirtioBlk::new(Arc::new(disk), geometry(), ""));
        let io = QueueIo::new(device.clone(), 0, SIZE, 0).unwrap();
        let guard = atomic.memory();
        let mem: &GuestMem = &guard;
        let vq = MockSplitQueue::new(mem, SIZE);
        let vring = ready_vring(&atomic, &vq);
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        // SAFETY: dup returns a new fd that the File then owns exclusively.
        let dup = unsafe { File::from_raw_fd(libc::dup(kick.as_raw_fd())) };
        vring.set_kick(Some(dup));
        assert_eq!(kick.read().unwrap(), 1, "the start's own kick");

        add_writes(mem, &vq, 0, 2);
        serve(&vring, &atomic, &device, &io);
        assert!(replaced.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(
            kick.read().unwrap(),
            1,
            "the pass kicked itself so the next one starts on the new table"
        );
        let used_idx = vq.used_addr().unchecked_add(2);
        assert_eq!(mem.read_obj::<u16>(used_idx).unwrap(), 2);
    }

    #[test]
    fn a_plain_disk_still_writes_inline_on_the_worker() {
        let disk = temp_disk();
        let device = Arc::new(VirtioBlk::new(disk, geometry(), ""));
        let io = QueueIo::new(device.clone(), 0, SIZE, 0).unwrap();
        let atomic = guest_memory();
        let guard = atomic.memory();
        let mem: &GuestMem = &guard;
        let vq = MockSplitQueue::new(mem, SIZE);
        let vring = ready_vring(&atomic, &vq);

        add_writes(mem, &vq, 0, 2);
        serve(&vring, &atomic, &device, &io);
        let used_idx = vq.used_addr().unchecked_add(2);
        assert_eq!(
            mem.read_obj::<u16>(used_idx).unwrap(),
            2,
            "completed in the pass"
        );
        let mut pfd = libc::pollfd {
            fd: io.pool.notify_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 0, "nothing deferred");
    }
}
