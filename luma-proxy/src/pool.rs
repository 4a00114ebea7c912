//! Idle upstream connections of one backend, kept by the reuse rule of the `backend` module doc:
//! one stack per serving thread, each connection stamped with when its last answer's head
//! arrived.
//!
//! Why one type: a backend keeps two kinds of idle connection, hyper's client connections (for
//! requests with a body or an upgrade) and the inline client's sockets (`inline`). Both obey
//! the same rule, so the rule is written once here and the kinds differ only in what they hold:
//! - a stack per serving thread, because a connection is driven by the runtime of the thread
//!   that opened it;
//! - ordered by stamp, freshest on top, the stalest at the bottom, where they expire after
//!   `limit` (`timeouts.pool_idle_ms`);
//! - the freshest taken first, so a steady load keeps using the same few connections; but the
//!   stalest is taken instead once it has been idle for half the limit ([`REFRESH_DIVISOR`])
//!   and the caller's rule allows it, so that the connections a burst opened stay open while
//!   traffic lasts, and a backlog after a stall finds them instead of opening a dozen or more
//!   at once (41-87 connects in a 10 s run at 16,000 req/s with the freshest alone,
//!   `docs/profile.md`, "Upstream connections taken in turn"; that setup was not rerun with
//!   this rule). Taking them all in turn, as before, also kept them open, but cost latency:
//!   at a fixed rate its median was higher in 24 of 32 paired rounds, by 14 µs at the median
//!   (`docs/profile.md`, "The freshest connection first"). The cost of keeping them: a busy
//!   pool holds what its peak needed while each connection is reached once per half of the
//!   limit (and at most [`MAX_IDLE`]). A quiet pool still shrinks;
//! - at most [`MAX_IDLE`] per stack, the oldest closed beyond that;
//! - a connection checked in while its backend is retired is refused, and `retired` is read
//!   under the stack's lock, so a checkin racing `retire` is either refused or cleared by it.
//!
//! Closing a connection is dropping it: both kinds close their socket on drop.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Idle connections kept per backend, kind and serving thread.
pub const MAX_IDLE: usize = 256;
/// An idle connection is taken ahead of the freshest, to keep it open, once it has been idle
/// for the pool's limit divided by this: the backend sees it used well before either side's
/// idle timer runs out (the limit is below the backends' own, `backend` module doc).
pub const REFRESH_DIVISOR: u32 = 2;

/// One serving thread's idle connections, stalest first, each with its stamp.
type Stack<C> = VecDeque<(C, Instant)>;

/// The idle connections of one backend, of one kind.
pub struct IdlePool<C> {
    /// One stack per serving thread.
    stacks: Box<[Mutex<Stack<C>>]>,
    /// A connection stamped this long ago is closed, never reused (zero: no pooling).
    limit: Duration,
}

impl<C> IdlePool<C> {
    pub fn new(limit: Duration) -> IdlePool<C> {
        Self::with_stacks(crate::workers::count(), limit)
    }

    fn with_stacks(count: usize, limit: Duration) -> IdlePool<C> {
        IdlePool {
            stacks: (0..count.max(1))
                .map(|_| Mutex::new(VecDeque::new()))
                .collect(),
            limit,
        }
    }

    fn stack(&self) -> &Mutex<Stack<C>> {
        &self.stacks[crate::workers::index() % self.stacks.len()]
    }

    /// One of this thread's connections, and how long it has been idle, if its stamp is less
    /// than `max_idle` old (the caller's reuse rule): the freshest, or the stalest when it has
    /// been idle half the limit ([`REFRESH_DIVISOR`]) and the caller's rule allows it. Expired
    /// ones are closed on the way.
    // Inlined into the request path: called as functions they cost ~300 instructions more per
    // request (callgrind, docs/profile.md).
    #[inline]
    pub fn checkout(&self, max_idle: Duration) -> Option<(C, Duration)> {
        self.checkout_at(Instant::now(), max_idle)
    }

    #[inline]
    fn checkout_at(&self, now: Instant, max_idle: Duration) -> Option<(C, Duration)> {
        if max_idle.is_zero() {
            return None;
        }
        let mut stack = self.stack().lock().ok()?;
        expire(&mut stack, now, self.limit);
        let idle = |since: &Instant| now.saturating_duration_since(*since);
        let refresh = self.limit / REFRESH_DIVISOR;
        let stalest_due = stack
            .front()
            .is_some_and(|(_, since)| (refresh..max_idle).contains(&idle(since)));
        let taken = if stalest_due {
            stack.pop_front()
        } else if stack
            .back()
            .is_some_and(|(_, since)| idle(since) < max_idle)
        {
            stack.pop_back()
        } else {
            None
        };
        taken.map(|(conn, since)| (conn, idle(&since)))
    }

    /// Pools `conn`, stamped `head_at`, on this thread's stack; closes it instead if the stamp
    /// is already `limit` old or `retired()` says its backend is retired.
    #[inline]
    pub fn checkin(&self, conn: C, head_at: Instant, retired: impl Fn() -> bool) {
        if self.is_expired(head_at) {
            return;
        }
        let Ok(mut stack) = self.stack().lock() else {
            return;
        };
        if retired() {
            return;
        }
        if stack.len() >= MAX_IDLE {
            stack.pop_front();
        }
        // Almost always the freshest: it goes on top.
        if stack.back().is_none_or(|(_, since)| *since <= head_at) {
            stack.push_back((conn, head_at));
            return;
        }
        // A long answer checks in after shorter ones that started later: keep the stack ordered
        // by stamp.
        let at = stack
            .iter()
            .rposition(|(_, since)| *since <= head_at)
            .map_or(0, |i| i + 1);
        stack.insert(at, (conn, head_at));
    }

    /// True when a connection stamped `head_at` would not be kept (also for a zero limit: no
    /// pooling), so a caller can skip readying it for the pool.
    pub fn is_expired(&self, head_at: Instant) -> bool {
        Instant::now().saturating_duration_since(head_at) >= self.limit
    }

    /// Closes the expired connections of every thread's stack, so a backend no request reaches
    /// does not keep them open (called at each health probe).
    pub fn expire(&self) {
        self.expire_at(Instant::now());
    }

    fn expire_at(&self, now: Instant) {
        for stack in self.stacks.iter() {
            if let Ok(mut s) = stack.lock() {
                expire(&mut s, now, self.limit);
            }
        }
    }

    /// Closes every idle connection (the backend is retired).
    pub fn clear(&self) {
        for stack in self.stacks.iter() {
            if let Ok(mut s) = stack.lock() {
                s.clear();
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.stacks
            .iter()
            .map(|s| s.lock().map_or(0, |s| s.len()))
            .sum()
    }
}

/// Closes the connections at the bottom of `stack` (the stalest) stamped `limit` or more ago.
fn expire<C>(stack: &mut Stack<C>, now: Instant, limit: Duration) {
    while stack
        .front()
        .is_some_and(|(_, since)| now.saturating_duration_since(*since) >= limit)
    {
        stack.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(10);

    fn pool() -> IdlePool<u32> {
        IdlePool::with_stacks(1, LIMIT)
    }

    #[test]
    fn a_quiet_pool_reuses_the_freshest_first() {
        let p = pool();
        let now = Instant::now();
        p.checkin(1, now - Duration::from_secs(3), || false);
        p.checkin(2, now - Duration::from_secs(1), || false);
        assert_eq!(p.checkout(LIMIT).map(|c| c.0), Some(2));
        assert_eq!(p.checkout(LIMIT).map(|c| c.0), Some(1));
        assert!(p.checkout(LIMIT).is_none());
    }

    #[test]
    fn the_freshest_is_taken_and_the_stalest_is_kept_open_before_it_expires() {
        // Every stamp and checkout is at a fixed `now`: the test reads no clock.
        let p = pool();
        let now = Instant::now();
        let ms = Duration::from_millis;
        let due = LIMIT / REFRESH_DIVISOR;
        // A steady load: the freshest goes out and comes back on top, again and again; the
        // others stay below, untouched while they are not yet due.
        p.checkin(1, now - ms(30), || false);
        p.checkin(2, now - ms(20), || false);
        p.checkin(3, now - ms(10), || false);
        assert_eq!(p.checkout_at(now, LIMIT), Some((3, ms(10))));
        p.checkin(3, now, || false);
        assert_eq!(p.checkout_at(now, LIMIT), Some((3, ms(0))));
        p.checkin(3, now, || false);
        // Once the bottom one has been idle for half the limit it goes first, and comes back
        // on top; the freshest is taken again after it.
        let later = now - ms(30) + due;
        assert_eq!(p.checkout_at(later, LIMIT), Some((1, due)));
        p.checkin(1, later, || false);
        assert_eq!(p.checkout_at(later, LIMIT), Some((1, ms(0))));
        // A caller's rule tighter than the refresh (a request that cannot be replayed) is
        // never handed the stale one: it gets the freshest, or nothing.
        let p = pool();
        p.checkin(1, now - due, || false);
        p.checkin(2, now - ms(5), || false);
        assert_eq!(p.checkout_at(now, ms(15)), Some((2, ms(5))));
        assert_eq!(p.checkout_at(now, ms(15)), None);
        assert_eq!(p.len(), 1);
        // A caller's rule between the refresh and the stalest's idle time: the stalest is too
        // old for it, so the freshest goes.
        let q = pool();
        q.checkin(1, now - due - ms(20), || false);
        q.checkin(2, now - ms(5), || false);
        assert_eq!(q.checkout_at(now, due + ms(10)), Some((2, ms(5))));
        assert_eq!(q.checkout_at(now, due + ms(10)), None);
        // Quiet: nothing is taken, and the stale ones expire at the limit.
        p.expire_at(now - due + LIMIT);
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn a_late_checkin_keeps_the_stack_ordered_by_stamp() {
        // A long answer that started first checks in last; the fresher one stays on top.
        let p = pool();
        let now = Instant::now();
        p.checkin(2, now - Duration::from_secs(1), || false);
        p.checkin(1, now - Duration::from_secs(3), || false);
        assert_eq!(p.checkout(LIMIT).map(|c| c.0), Some(2));
    }

    #[test]
    fn max_idle_is_the_callers_rule_and_idle_time_is_reported() {
        let p = pool();
        let stamp = Instant::now() - Duration::from_secs(2);
        p.checkin(7, stamp, || false);
        // Not recent enough for a request that asks for proof of life within 1 s: left pooled.
        assert!(p.checkout(Duration::from_secs(1)).is_none());
        let (conn, idle) = p.checkout(LIMIT).expect("pooled");
        assert_eq!(conn, 7);
        assert!(idle >= Duration::from_secs(2), "{idle:?}");
        // Zero: no pooled connection is recent enough, however fresh.
        p.checkin(8, Instant::now(), || false);
        assert!(p.checkout(Duration::ZERO).is_none());
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn expired_and_stale_connections_are_closed() {
        let p = pool();
        let now = Instant::now();
        // Already past the limit when it comes back: never pooled.
        p.checkin(1, now - LIMIT, || false);
        assert_eq!(p.len(), 0);
        p.checkin(2, now - LIMIT + Duration::from_secs(1), || false);
        p.checkin(3, now, || false);
        assert_eq!(p.len(), 2);
        p.expire_at(now + Duration::from_secs(2));
        assert_eq!(p.len(), 1);
        assert_eq!(p.checkout(LIMIT).map(|c| c.0), Some(3));
    }

    #[test]
    fn a_zero_limit_pools_nothing() {
        let p: IdlePool<u32> = IdlePool::with_stacks(1, Duration::ZERO);
        p.checkin(1, Instant::now(), || false);
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn retired_is_read_under_the_stack_lock() {
        // `retire` sets the flag, then clears each stack under its lock: a checkin that reads
        // the flag under the same lock is either refused or cleared afterwards.
        let p = pool();
        p.checkin(1, Instant::now(), || {
            assert!(
                p.stacks[0].try_lock().is_err(),
                "retired() was read outside the stack's lock"
            );
            false
        });
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn retired_backends_take_nothing_back_and_clear_closes_all() {
        let p = pool();
        p.checkin(1, Instant::now(), || true);
        assert_eq!(p.len(), 0);
        p.checkin(2, Instant::now(), || false);
        p.clear();
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn the_oldest_is_closed_beyond_max_idle() {
        let p = pool();
        let base = Instant::now() - Duration::from_secs(2);
        for i in 0..=MAX_IDLE as u32 {
            p.checkin(i, base + Duration::from_millis(u64::from(i)), || false);
        }
        assert_eq!(p.len(), MAX_IDLE);
        let mut last = None;
        while let Some((c, _)) = p.checkout(LIMIT) {
            last = Some(c);
        }
        assert_eq!(last, Some(1), "connection 0 was the oldest and was closed");
    }
}
