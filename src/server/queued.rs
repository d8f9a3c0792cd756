//! queued: the shard's budget for bytes of requests held in memory (`queued.max.request.bytes`):
//! read off sockets and not yet answered, whether still being read, waiting for admission or in
//! flight. A connection takes a grant from the budget before each read and reads at most that
//! much; when the budget is spent the shard's connections stop reading (the peers see TCP
//! backpressure) until replies or closed connections give bytes back. So the bytes the shard holds
//! in requests never exceed the budget, however many peers send the first part of a large frame.

use std::cell::{Cell, RefCell};

/// One shard's budget; lives on the shard's thread.
pub(crate) struct QueuedBytes {
    limit_bytes: u64,
    used_bytes: Cell<u64>,
    /// Readers waiting for bytes to be given back; all are woken, each takes what it can.
    waiters: RefCell<Vec<flume::Sender<()>>>,
}

impl QueuedBytes {
    /// `None` is no limit (Kafka's -1).
    pub(crate) fn new(limit_bytes: Option<u64>) -> Self {
        QueuedBytes {
            limit_bytes: limit_bytes.unwrap_or(u64::MAX),
            used_bytes: Cell::new(0),
            waiters: RefCell::new(Vec::new()),
        }
    }

    /// Takes up to `wanted` bytes; returns how many were granted (0 when the budget is spent).
    pub(crate) fn take(&self, wanted: u64) -> u64 {
        let granted = wanted.min(self.limit_bytes - self.used_bytes.get());
        self.used_bytes.set(self.used_bytes.get() + granted);
        granted
    }

    /// Gives `bytes` back and wakes every waiting reader.
    pub(crate) fn give_back(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        assert!(
            bytes <= self.used_bytes.get(),
            "more bytes given back than taken"
        );
        self.used_bytes.set(self.used_bytes.get() - bytes);
        for waiter in self.waiters.borrow_mut().drain(..) {
            let _ = waiter.try_send(());
        }
    }

    /// A token arrives here the next time bytes are given back. Register before the `take` that
    /// found nothing is retried, so a give-back in between is not missed.
    pub(crate) fn on_give_back(&self) -> flume::Receiver<()> {
        let (sender, receiver) = flume::bounded(1);
        self.waiters.borrow_mut().push(sender);
        receiver
    }

    #[cfg(test)]
    fn used_bytes(&self) -> u64 {
        self.used_bytes.get()
    }
}

/// Bytes one connection holds from the budget (read and not yet answered), given back when the
/// connection ends, however it ends.
pub(crate) struct Held<'a> {
    pub(crate) queued: &'a QueuedBytes,
    pub(crate) bytes: Cell<u64>,
}

impl Held<'_> {
    pub(crate) fn add(&self, bytes: u64) {
        self.bytes.set(self.bytes.get() + bytes);
    }

    pub(crate) fn release(&self, bytes: u64) {
        self.bytes.set(self.bytes.get() - bytes);
        self.queued.give_back(bytes);
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.queued.give_back(self.bytes.get());
    }
}

/// A grant for one read, given back when dropped except for the bytes the read moved into
/// [`Held`].
pub(crate) struct Grant<'a> {
    pub(crate) queued: &'a QueuedBytes,
    pub(crate) bytes: u64,
}

impl Grant<'_> {
    /// `read_bytes` of the grant now hold request bytes.
    pub(crate) fn keep(&mut self, read_bytes: u64, held: &Held<'_>) {
        let kept = read_bytes.min(self.bytes);
        self.bytes -= kept;
        held.add(kept);
    }
}

impl Drop for Grant<'_> {
    fn drop(&mut self) {
        self.queued.give_back(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_never_exceed_the_budget_and_come_back() {
        let queued = QueuedBytes::new(Some(100));
        let held = Held {
            queued: &queued,
            bytes: Cell::new(0),
        };
        let mut grant = Grant {
            queued: &queued,
            bytes: queued.take(70),
        };
        assert_eq!(grant.bytes, 70);
        assert_eq!(queued.take(70), 30, "only the rest of the budget");
        queued.give_back(30);
        let woken = queued.on_give_back();
        grant.keep(50, &held);
        drop(grant);
        assert!(woken.try_recv().is_ok(), "the unused grant came back");
        assert_eq!(queued.used_bytes(), 50);
        held.release(20);
        drop(held);
        assert_eq!(queued.used_bytes(), 0);
        assert_eq!(QueuedBytes::new(None).take(u64::MAX / 2), u64::MAX / 2);
    }
}
