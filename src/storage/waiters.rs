//! storage::waiters: single-thread wait lists for the log's async conditions (append turn, group
//! commit, high-watermark advance). Each waiting future holds exactly one slot and frees it when it is
//! dropped, so a list never grows past the number of live waiters, and cancelled waits leave nothing.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// A set of parked tasks waiting for some state change on this thread.
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    next_key: Cell<u64>,
    parked: RefCell<BTreeMap<u64, Waker>>,
}

impl Waiters {
    /// Wakes every parked task; each re-checks its own condition.
    pub(crate) fn wake_all(&self) {
        let parked = std::mem::take(&mut *self.parked.borrow_mut());
        for waker in parked.into_values() {
            waker.wake();
        }
    }

    /// A future that resolves once `condition` returns true; it is re-checked after every `wake_all`.
    pub(crate) fn wait_until<F: FnMut() -> bool>(&self, condition: F) -> WaitUntil<'_, F> {
        WaitUntil {
            waiters: self,
            condition,
            key: None,
        }
    }
}

pub(crate) struct WaitUntil<'a, F> {
    waiters: &'a Waiters,
    condition: F,
    key: Option<u64>,
}

impl<F: FnMut() -> bool + Unpin> Future for WaitUntil<'_, F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if (this.condition)() {
            if let Some(key) = this.key.take() {
                this.waiters.parked.borrow_mut().remove(&key);
            }
            return Poll::Ready(());
        }
        let key = *this.key.get_or_insert_with(|| {
            let key = this.waiters.next_key.get();
            this.waiters.next_key.set(key + 1);
            key
        });
        this.waiters
            .parked
            .borrow_mut()
            .insert(key, context.waker().clone());
        Poll::Pending
    }
}

impl<F> Drop for WaitUntil<'_, F> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.waiters.parked.borrow_mut().remove(&key);
        }
    }
}

/// A one-holder async lock for one thread: the append path holds it so batches reach the file in
/// offset order. Dropping the guard (even by cancelling the holder) releases it.
#[derive(Debug, Default)]
pub(crate) struct Turnstile {
    held: Cell<bool>,
    waiters: Waiters,
}

pub(crate) struct TurnstileGuard<'a> {
    turnstile: &'a Turnstile,
}

impl Turnstile {
    pub(crate) async fn enter(&self) -> TurnstileGuard<'_> {
        self.waiters
            .wait_until(|| {
                if self.held.get() {
                    false
                } else {
                    self.held.set(true);
                    true
                }
            })
            .await;
        TurnstileGuard { turnstile: self }
    }
}

impl Drop for TurnstileGuard<'_> {
    fn drop(&mut self) {
        self.turnstile.held.set(false);
        self.turnstile.waiters.wake_all();
    }
}
