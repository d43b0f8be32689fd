//! One pass over a virtqueue: every available chain is served and put in the used
//! ring. Notifying the driver is left to the caller, once per pass.

use super::chain::GuestMem;
use super::device::{BlkDevice, Offload, Scratch};
use super::RequestError;
use virtio_queue::{Queue, QueueOwnedT, QueueT};

impl BlkDevice {
    /// Serves every chain available on `queue`; returns how many were completed
    /// (put in the used ring). Large reads may go to `offload` instead, which
    /// completes them later.
    ///
    /// A broken ring (an available index too far ahead, a used ring outside guest
    /// memory) ends the pass with a rate-limited log line; the next kick retries.
    pub fn process_queue<'m>(
        &self,
        queue: &mut Queue,
        mem: &'m GuestMem,
        scratch: &mut Scratch<'m>,
        mut offload: Option<&mut dyn Offload>,
    ) -> usize {
        let mut done = 0;
        loop {
            let chain = match queue.iter(mem) {
                Ok(mut avail) => avail.next(),
                Err(e) => {
                    self.report(queue.next_avail(), &RequestError::Queue(e));
                    break;
                }
            };
            let Some(chain) = chain else { break };
            let reborrowed = offload.as_mut().map(|o| &mut **o as &mut dyn Offload);
            let Some(c) = self.handle_chain(mem, chain, scratch, reborrowed) else {
                continue;
            };
            if let Err(e) = queue.add_used(mem, c.head, c.used_len) {
                self.report(c.head, &RequestError::Queue(e));
                break;
            }
            self.account(scratch.queue, &c.stat);
            done += 1;
        }
        done
    }
}
