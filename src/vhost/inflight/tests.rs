//! The inflight record on its own: what a successor reads back after a crash at
//! each point of a request's life.

use super::*;

const QSIZE: u16 = 16;

/// A new buffer for one queue, as GET_INFLIGHT_FD makes it.
fn new_buffer() -> (File, VhostUserInflight) {
    let ask = VhostUserInflight::new(0, 0, 1, QSIZE);
    let (reply, file) = create(&ask, 1, usize::from(QSIZE)).unwrap();
    (file, reply)
}

/// Queue 0's record as a (re)started backend maps it from SET_INFLIGHT_FD.
fn open(file: &File, msg: &VhostUserInflight) -> QueueRegion {
    InflightBuffer::open(msg, file, 1, usize::from(QSIZE))
        .unwrap()
        .queue(0)
        .unwrap()
}

/// A used ring nobody wrote to since the record was last in line with it.
fn no_used(_: u16) -> Option<u16> {
    None
}

fn resume(next_avail: u16, resubmit: &[u16]) -> Recovery {
    Recovery::Resume {
        next_avail,
        resubmit: resubmit.to_vec(),
    }
}

#[test]
fn a_head_taken_and_never_completed_is_resubmitted_exactly_once() {
    let (file, msg) = new_buffer();
    let mut first = open(&file, &msg);
    assert_eq!(first.recover(0, QSIZE, no_used), Recovery::Fresh);
    first.taken(5);
    drop(first);

    let mut second = open(&file, &msg);
    assert_eq!(second.recover(0, QSIZE, no_used), resume(1, &[5]));
    // Killed again before serving it: the third backend owes it just as much,
    // and still once.
    drop(second);
    let mut third = open(&file, &msg);
    assert_eq!(third.recover(0, QSIZE, no_used), resume(1, &[5]));
}

#[test]
fn a_completed_head_is_never_resubmitted() {
    let (file, msg) = new_buffer();
    let mut first = open(&file, &msg);
    first.recover(0, QSIZE, no_used);
    first.taken(5);
    first.taken(6);
    first.using(6);
    first.used(6, 1);
    drop(first);

    let mut second = open(&file, &msg);
    assert_eq!(second.recover(1, QSIZE, no_used), resume(2, &[5]));
}

#[test]
fn a_head_published_but_not_yet_cleared_is_not_resubmitted() {
    let (file, msg) = new_buffer();
    let mut first = open(&file, &msg);
    first.recover(7, QSIZE, no_used);
    first.taken(5);
    first.taken(9);
    first.using(9);
    // Killed after the used index went to 8 with head 9 in slot 7, before the
    // mark was cleared.
    drop(first);

    let used_ring = |slot: u16| (slot == 7).then_some(9);
    let mut second = open(&file, &msg);
    assert_eq!(second.recover(8, QSIZE, used_ring), resume(9, &[5]));
    assert!(!second.is_inflight(9));
}

#[test]
fn counters_order_resubmission_across_restarts() {
    let (file, msg) = new_buffer();
    let mut first = open(&file, &msg);
    first.recover(0, QSIZE, no_used);
    for head in [9, 2, 14, 4] {
        first.taken(head);
    }
    first.using(14);
    first.used(14, 1);
    drop(first);

    let mut second = open(&file, &msg);
    assert_eq!(second.recover(1, QSIZE, no_used), resume(4, &[9, 2, 4]));
    // Taken after the restart: later than everything the predecessor took.
    second.taken(0);
    drop(second);
    let mut third = open(&file, &msg);
    assert_eq!(third.recover(1, QSIZE, no_used), resume(5, &[9, 2, 4, 0]));
}

#[test]
fn head_0_survives_a_fresh_buffer_on_a_ring_whose_used_index_is_not_0() {
    // SPDK issue 3766: a new buffer on a ring already used (after a migration),
    // requests taken, none completed, then a crash. A recorded used index left at
    // 0 differs from the ring's, and the "stale last batch" rule then clears head
    // 0, losing its request.
    let (file, msg) = new_buffer();
    let mut first = open(&file, &msg);
    assert_eq!(first.recover(40, QSIZE, no_used), Recovery::Fresh);
    first.taken(0);
    first.taken(3);
    drop(first);

    // Slots 0..40 hold old completions, head 0 among them; none may count.
    let old_completions = |slot: u16| Some(slot % QSIZE);
    let mut second = open(&file, &msg);
    assert_eq!(
        second.recover(40, QSIZE, old_completions),
        resume(42, &[0, 3])
    );
}

#[test]
fn a_record_that_does_not_describe_the_ring_is_reset_not_trusted() {
    let (file, msg) = new_buffer();
    let mut first = open(&file, &msg);
    first.recover(0, QSIZE, no_used);
    first.taken(1);
    drop(first);

    // A used index further ahead than one ring's worth of completions.
    let mut second = open(&file, &msg);
    assert!(matches!(
        second.recover(1000, QSIZE, |s| Some(s % QSIZE)),
        Recovery::Reset(_)
    ));
    // Reset means reset: nothing is owed afterwards.
    assert_eq!(second.recover(1000, QSIZE, no_used), resume(1000, &[]));

    // An unreadable used ring is no better.
    second.taken(2);
    assert!(matches!(
        second.recover(1001, QSIZE, no_used),
        Recovery::Reset(_)
    ));
}

#[test]
fn heads_outside_the_ring_are_neither_recorded_nor_resubmitted() {
    let (file, msg) = new_buffer();
    let mut region = open(&file, &msg);
    region.recover(0, 8, no_used);
    region.taken(QSIZE); // beyond the buffer: ignored
    region.taken(12); // beyond an 8-entry ring: not a request anyone waits for
    region.taken(3);
    assert_eq!(region.recover(0, 8, no_used), resume(1, &[3]));
}

#[test]
fn buffers_of_the_wrong_shape_are_refused() {
    let too_many = VhostUserInflight::new(0, 0, 3, QSIZE);
    assert!(matches!(
        create(&too_many, 2, 128),
        Err(InflightError::Shape { .. })
    ));
    let too_long = VhostUserInflight::new(0, 0, 1, 256);
    assert!(matches!(
        create(&too_long, 2, 128),
        Err(InflightError::Shape { .. })
    ));

    let (file, mut msg) = new_buffer();
    msg.mmap_size -= 1;
    assert!(matches!(
        InflightBuffer::open(&msg, &file, 1, usize::from(QSIZE)),
        Err(InflightError::TooSmall { .. })
    ));
    // A buffer claiming more queues than its file holds.
    let (file, mut msg) = new_buffer();
    msg.num_queues = 2;
    msg.mmap_size *= 2;
    assert!(matches!(
        InflightBuffer::open(&msg, &file, 2, usize::from(QSIZE)),
        Err(InflightError::TooSmall { .. })
    ));
}

#[test]
fn the_buffer_cannot_be_shrunk_under_a_backend() {
    let (file, msg) = new_buffer();
    assert_eq!(msg.mmap_size, queue_region_len(QSIZE) as u64);
    assert!(file.set_len(0).is_err(), "sealed against shrinking");
}
