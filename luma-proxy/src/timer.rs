//! A sleep that is polled only when it needs the caller's waker.
//!
//! Polling a tokio [`Sleep`] registers the caller's waker with the timer every time: an atomic
//! handshake, and a unit of the task's coop budget. A connection's timers (its idle timeout in
//! `idle`, its park check in `park`) are looked at on every wake of the connection, several
//! times a request, while they mostly have not moved (about 300 instructions per request,
//! `docs/profile.md`). [`LazySleep`] remembers the waker the timer holds and polls only when
//! the timer has fired or another waker asks (a tunnel's task taking the socket over).
//!
//! A poll made when the task's coop budget has run out registers nothing (tokio only schedules
//! the task again), so it is not remembered: the next poll registers.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use tokio::time::{Instant, Sleep};

pub struct LazySleep {
    sleep: Pin<Box<Sleep>>,
    /// The waker the timer holds, while it has not fired: the one it will wake.
    armed_for: Option<Waker>,
}

impl LazySleep {
    pub fn until(deadline: Instant) -> LazySleep {
        LazySleep {
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            armed_for: None,
        }
    }

    /// Ready once the deadline has passed; otherwise the caller's waker is woken then.
    #[inline(always)]
    pub fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // Should the timer fire right after this check, it wakes the remembered waker, which is
        // the caller's, and the next poll sees it.
        if !self.sleep.is_elapsed()
            && self
                .armed_for
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        self.poll_sleep(cx)
    }

    /// The real poll, apart so that the check above is inlined where the timer is looked at.
    #[inline(never)]
    fn poll_sleep(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let registers = tokio::task::coop::has_budget_remaining();
        if self.sleep.as_mut().poll(cx).is_ready() {
            self.armed_for = None;
            return Poll::Ready(());
        }
        match (&mut self.armed_for, registers) {
            (Some(w), true) => w.clone_from(cx.waker()),
            (slot, true) => *slot = Some(cx.waker().clone()),
            (slot, false) => *slot = None,
        }
        Poll::Pending
    }

    /// Moves the deadline. A timer that has not fired keeps the waker it holds; one that fired
    /// gave it away, seen or not, and the next poll registers again.
    pub fn reset(&mut self, deadline: Instant) {
        if self.sleep.is_elapsed() {
            self.armed_for = None;
        }
        self.sleep.as_mut().reset(deadline);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A timer that fires while nobody looks gives its waker away; moved afterwards, it must
    /// still wake the task that polls it next, not count as armed.
    #[tokio::test(start_paused = true)]
    async fn a_timer_moved_after_an_unseen_fire_still_wakes() {
        let start = Instant::now();
        let mut timer = LazySleep::until(start + Duration::from_secs(1));
        std::future::poll_fn(|cx| {
            assert!(timer.poll(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        // It fires at 1 s, unseen.
        tokio::time::sleep(Duration::from_secs(2)).await;
        timer.reset(Instant::now() + Duration::from_secs(5));
        let woke = tokio::time::timeout(
            Duration::from_secs(600),
            std::future::poll_fn(|cx| timer.poll(cx)),
        )
        .await;
        assert!(woke.is_ok(), "the moved timer never woke its task");
        assert_eq!(start.elapsed(), Duration::from_secs(7));
    }
}
