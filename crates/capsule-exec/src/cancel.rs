//! Stopping a call: from outside, with a [`Cancel`] flag shared by a run's sandboxes, or at
//! its deadline. Wasm code yields to the host regularly (every fuel interval, or every epoch
//! tick under time metering, `config`), and [`until_stopped`] looks at both each time, so
//! CPU-bound code stops at its next yield; a wait in the host ends at once.

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use tokio::sync::watch;

/// A cancellation flag shared by a run and everyone who may stop it. Cloning is cheap.
#[derive(Clone)]
pub struct Cancel {
    sender: Arc<watch::Sender<bool>>,
}

impl Default for Cancel {
    fn default() -> Self {
        Self { sender: Arc::new(watch::Sender::new(false)) }
    }
}

impl Cancel {
    pub fn cancel(&self) {
        self.sender.send_replace(true);
    }

    pub fn is_cancelled(&self) -> bool {
        *self.sender.borrow()
    }

    /// Completes once the flag is set (at once if it already is).
    pub async fn cancelled(&self) {
        let mut receiver = self.sender.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = receiver.wait_for(|cancelled| *cancelled).await;
    }
}

/// Why [`until_stopped`] ended a call before it completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    Deadline,
    Cancelled,
}

/// Drives `call` until it completes, `deadline` passes or `cancel` is set, whichever comes
/// first; a call stopped early is dropped, which unwinds Wasm suspended at a yield. Both are
/// checked at every poll, not only when their wakers fire: code that yields wakes its task
/// at once, and the runtime's timers may not be processed while its workers stay busy.
pub async fn until_stopped<F: Future>(deadline: Instant, cancel: &Cancel, call: F) -> Result<F::Output, Stopped> {
    let mut call = pin!(call);
    let mut timer = pin!(tokio::time::sleep_until(deadline.into()));
    let mut cancelled = pin!(cancel.cancelled());
    poll_fn(|cx| {
        if cancel.is_cancelled() {
            return Poll::Ready(Err(Stopped::Cancelled));
        }
        if Instant::now() >= deadline {
            return Poll::Ready(Err(Stopped::Deadline));
        }
        if let Poll::Ready(output) = call.as_mut().poll(cx) {
            return Poll::Ready(Ok(output));
        }
        if cancelled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(Stopped::Cancelled));
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(Stopped::Deadline));
        }
        Poll::Pending
    })
    .await
}

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cancel").field("cancelled", &self.is_cancelled()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_wake_when_cancelled() {
        let cancel = Cancel::default();
        let waiter = tokio::spawn({
            let cancel = cancel.clone();
            async move { cancel.cancelled().await }
        });
        assert!(!cancel.is_cancelled());
        cancel.cancel();
        waiter.await.unwrap();
        assert!(cancel.is_cancelled());
        cancel.cancelled().await;
    }

    /// A future that never completes and wakes its task again each time it is polled, like
    /// Wasm code that keeps yielding.
    async fn busy() {
        loop {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_call_that_keeps_yielding_stops_at_its_deadline() {
        let deadline = Instant::now() + std::time::Duration::from_millis(20);
        assert_eq!(until_stopped(deadline, &Cancel::default(), busy()).await, Err(Stopped::Deadline));
        assert!(Instant::now() >= deadline);
    }

    #[tokio::test]
    async fn a_waiting_call_stops_when_cancelled() {
        let cancel = Cancel::default();
        let far = Instant::now() + std::time::Duration::from_secs(3600);
        let stopper = tokio::spawn({
            let cancel = cancel.clone();
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                cancel.cancel();
            }
        });
        let waiting = std::future::pending::<()>();
        assert_eq!(until_stopped(far, &cancel, waiting).await, Err(Stopped::Cancelled));
        stopper.await.unwrap();
    }

    #[tokio::test]
    async fn a_completed_call_gives_its_output() {
        let far = Instant::now() + std::time::Duration::from_secs(3600);
        assert_eq!(until_stopped(far, &Cancel::default(), async { 7 }).await, Ok(7));
    }
}
