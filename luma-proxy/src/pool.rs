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
//! - taken in turn while traffic keeps them busy, the freshest otherwise: the stalest of those
//!   last used less than [`ROTATE_WITHIN`] ago is taken, and when there is none, the top one.
//!   Taking only the top (as before stop 32) let a steady load wear the same few connections
//!   and leave the rest to expire, so a backlog after a stall had to open a dozen or more at once
//!   (41-87 connects in a 10 s run at 16,000 req/s; 3-18 taken in turn; `docs/profile.md`,
//!   "Upstream connections taken in turn"). The cost: a busy pool holds what its peak
//!   needed, as long as traffic reaches each connection within the window (at most the
//!   thread's rate x [`ROTATE_WITHIN`], and [`MAX_IDLE`]), where the top alone would let it
//!   shrink to what the steady rate needs. A quiet pool still shrinks. Another rule was
//!   tried and undone: the freshest first, and the stalest only once idle for half the
//!   limit. With 2 workers at half nginx's rate its p50 was higher in four runs, and its p99
//!   1.5-2x this rule's in the two paired ones. What it gave: at 1 worker a p50 lower by a
//!   median of 14-16 µs per round in some paired runs (level in others), and at saturation
//!   1.11-1.14x the req/s on one VM but 0.96-1.02x on the next (`docs/profile.md`, "The
//!   freshest connection first" and "Back to taking them in turn");
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
/// A pooled connection last used less than this long ago is taken in turn (the stalest of
/// those first), so that a steady load keeps all of them warm. It stays below the inline
/// client's `PEEK_AFTER` (checked there), so a connection taken in turn is never idle long
/// enough to need the peek.
pub const ROTATE_WITHIN: Duration = Duration::from_millis(40);

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
    /// than `max_idle` old (the caller's reuse rule): the stalest of those used within
    /// [`ROTATE_WITHIN`] (and `max_idle`), and when there is none, the freshest. Expired ones
    /// are closed on the way.
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
        // The stalest one used within the window: stale ones below it (a long answer checks in
        // with an old stamp) are passed over and left to expire, so they do not stop the turn.
        let rotate = max_idle.min(ROTATE_WITHIN);
        let first_in_turn =
            stack.partition_point(|(_, since)| now.saturating_duration_since(*since) >= rotate);
        if let Some((conn, since)) = stack.remove(first_in_turn) {
            return Some((conn, now.saturating_duration_since(since)));
        }
        match stack.back() {
            Some((_, since)) if now.saturating_duration_since(*since) < max_idle => stack
                .pop_back()
                .map(|(conn, since)| (conn, now.saturating_duration_since(since))),
            _ => None,
        }
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
    fn connections_in_use_are_taken_in_turn_and_a_quiet_pool_shrinks() {
        // Every stamp and checkout is at a fixed `now`: the test reads no clock.
        let p = pool();
        let now = Instant::now();
        let ms = Duration::from_millis;
        // A steady load: all three were used within ROTATE_WITHIN, so the stalest goes first
        // and each comes back on top, behind none of the others.
        p.checkin(1, now - ms(30), || false);
        p.checkin(2, now - ms(20), || false);
        p.checkin(3, now - ms(10), || false);
        assert_eq!(p.checkout_at(now, LIMIT), Some((1, ms(30))));
        p.checkin(1, now, || false);
        assert_eq!(p.checkout_at(now, LIMIT), Some((2, ms(20))));
        assert_eq!(p.checkout_at(now, LIMIT), Some((3, ms(10))));
        assert_eq!(p.checkout_at(now, LIMIT), Some((1, ms(0))));
        // Quiet: the bottom one was last used ROTATE_WITHIN ago or more, so the freshest is
        // taken and the stale one is left to expire.
        let p = pool();
        p.checkin(1, now - ROTATE_WITHIN, || false);
        p.checkin(2, now - ms(1), || false);
        assert_eq!(p.checkout_at(now, LIMIT), Some((2, ms(1))));
        assert_eq!(p.len(), 1);
        // A stale one at the bottom (a long answer's) does not stop the turn: the stalest of
        // those within the window goes first, and the stale one is left to expire.
        let p = pool();
        p.checkin(9, now - Duration::from_secs(1), || false);
        p.checkin(1, now - ms(30), || false);
        p.checkin(2, now - ms(10), || false);
        assert_eq!(p.checkout_at(now, LIMIT), Some((1, ms(30))));
        assert_eq!(p.checkout_at(now, LIMIT), Some((2, ms(10))));
        assert_eq!(p.checkout_at(now, LIMIT), Some((9, Duration::from_secs(1))));
        // A caller's rule tighter than the window bounds it: the bottom one is not taken in
        // turn when it is older than the rule allows.
        let p = pool();
        p.checkin(1, now - ms(20), || false);
        p.checkin(2, now - ms(5), || false);
        assert_eq!(p.checkout_at(now, ms(15)), Some((2, ms(5))));
        assert_eq!(p.checkout_at(now, ms(15)), None);
    }

    #[test]
    fn a_late_checkin_keeps_the_stack_ordered_by_stamp() {
        // A long answer that started first checks in last; the fresher one stays on top.
        let p = pool();
        let now = Instant::now();
        p.checkin(2, now - Duration::from_secs(1), || false);
        p.checkin(1, now - Duration::from_secs(5), || false);
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
        let base = Instant::now() - Duration::from_secs(5);
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
