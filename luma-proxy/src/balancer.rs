//! Picks a replica per request: power of two choices over the healthy backends, by fewest
//! in-flight requests. The DNS answer order is never used (Docker shuffles it anyway).
//!
//! The backend set is an immutable snapshot swapped atomically by the background refresh, so a
//! request only loads a pointer and never waits on DNS or a lock.

use crate::backend::Backend;
use arc_swap::ArcSwap;
use std::sync::Arc;

pub struct LoadBalancer {
    backends: ArcSwap<Vec<Arc<Backend>>>,
}

impl LoadBalancer {
    pub fn new(backends: Vec<Arc<Backend>>) -> LoadBalancer {
        LoadBalancer {
            backends: ArcSwap::from_pointee(backends),
        }
    }

    pub fn backends(&self) -> Arc<Vec<Arc<Backend>>> {
        self.backends.load_full()
    }

    pub fn replace(&self, backends: Vec<Arc<Backend>>) {
        self.backends.store(Arc::new(backends));
    }

    pub fn has_healthy(&self) -> bool {
        self.backends.load().iter().any(|b| b.is_healthy())
    }

    /// Picks a healthy backend, avoiding `exclude` (the one a retry just failed on) when
    /// another healthy one exists.
    pub fn pick(&self, exclude: Option<&Arc<Backend>>) -> Option<Arc<Backend>> {
        let set = self.backends.load();
        pick_from(&set, exclude, fastrand::usize(..usize::MAX)).cloned()
    }
}

fn eligible(b: &Arc<Backend>, exclude: Option<&Arc<Backend>>) -> bool {
    b.is_healthy() && !exclude.is_some_and(|x| Arc::ptr_eq(x, b))
}

/// The selection itself, with the randomness passed in so it can be tested.
pub fn pick_from<'a>(
    set: &'a [Arc<Backend>],
    exclude: Option<&Arc<Backend>>,
    rand: usize,
) -> Option<&'a Arc<Backend>> {
    let n = set.len();
    match n {
        0 => None,
        1 => set.first().filter(|b| eligible(b, exclude)),
        _ => {
            let i = rand % n;
            let j = (i + 1 + (rand / n) % (n - 1)) % n;
            let (a, b) = (&set[i], &set[j]);
            match (eligible(a, exclude), eligible(b, exclude)) {
                (true, true) => Some(if b.inflight() < a.inflight() { b } else { a }),
                (true, false) => Some(a),
                (false, true) => Some(b),
                // Both sampled ones are out: scan from a random start for the least loaded.
                (false, false) => (0..n)
                    .map(|k| &set[(i + k) % n])
                    .filter(|b| eligible(b, exclude))
                    .min_by_key(|b| b.inflight()),
            }
        }
    }
    .or_else(|| {
        // Only the excluded backend is healthy: a retry may still use it (fresh connection).
        exclude
            .filter(|x| x.is_healthy() && set.iter().any(|b| Arc::ptr_eq(b, x)))
            .and_then(|x| set.iter().find(|b| Arc::ptr_eq(b, x)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::RouteTimeouts;

    fn backends(n: usize) -> Vec<Arc<Backend>> {
        (0..n)
            .map(|i| {
                let b = Backend::new(
                    format!("127.0.0.{}:80", i + 1).parse().unwrap(),
                    None,
                    &RouteTimeouts::default(),
                );
                b.mark_up();
                b
            })
            .collect()
    }

    #[test]
    fn spreads_evenly_over_idle_backends() {
        let set = backends(3);
        let mut counts = [0usize; 3];
        for r in 0..30_000 {
            let b = pick_from(&set, None, fastrand::usize(..usize::MAX).wrapping_add(r)).unwrap();
            counts[set.iter().position(|x| Arc::ptr_eq(x, b)).unwrap()] += 1;
        }
        for c in counts {
            assert!((8_000..12_000).contains(&c), "unfair share: {counts:?}");
        }
    }

    #[test]
    fn prefers_fewer_inflight_and_skips_unhealthy() {
        let set = backends(2);
        let _busy = set[0].begin();
        for r in 0..100 {
            assert!(Arc::ptr_eq(pick_from(&set, None, r).unwrap(), &set[1]));
        }
        set[1].mark_down("test".into());
        for r in 0..100 {
            assert!(Arc::ptr_eq(pick_from(&set, None, r).unwrap(), &set[0]));
        }
        set[0].mark_down("test".into());
        assert!(pick_from(&set, None, 7).is_none());
    }

    #[test]
    fn retry_avoids_the_failed_backend_when_it_can() {
        let set = backends(3);
        for r in 0..300 {
            let b = pick_from(&set, Some(&set[0]), r).unwrap();
            assert!(!Arc::ptr_eq(b, &set[0]));
        }
        let one = backends(1);
        assert!(Arc::ptr_eq(
            pick_from(&one, Some(&one[0]), 3).unwrap(),
            &one[0]
        ));
    }
}
