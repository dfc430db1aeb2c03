//! Smooth weighted round robin, shared by all threads without a lock.
//!
//! NGINX's algorithm (ngx_http_upstream_round_robin.c): every pick adds each
//! backend's weight to its running score, takes the highest score and subtracts
//! the total weight from it. Weights 5, 1, 1 give `a a b a c a a`, spreading the
//! heavy backend through the cycle instead of sending it bursts.
//!
//! The sequence repeats every `sum(weights)` picks, so it is computed once, when
//! the upstream is built, into a table; a pick is then one atomic increment and
//! a table read. Every thread advances the same counter, so the rotation is one
//! rotation for the whole process (unlike per-worker state, which makes N workers
//! each start at the first backend).

use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug)]
pub struct RoundRobin {
    /// One full smooth cycle of backend indexes.
    order: Box<[u32]>,
    next: AtomicUsize,
}

impl RoundRobin {
    /// Builds the cycle for these weights. A weight of 0 never gets picked.
    pub fn new(weights: &[u32]) -> Self {
        let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
        let mut score = vec![0i64; weights.len()];
        let mut order = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for (i, &w) in weights.iter().enumerate() {
                score[i] += i64::from(w);
                if score[i] > score[best] {
                    best = i;
                }
            }
            score[best] -= total;
            order.push(best as u32);
        }
        RoundRobin {
            order: order.into_boxed_slice(),
            next: AtomicUsize::new(0),
        }
    }

    /// The next backend for which `usable` holds, or `None` when none does.
    /// Unusable backends are skipped in cycle order.
    pub fn pick(&self, usable: impl Fn(usize) -> bool) -> Option<usize> {
        if self.order.is_empty() {
            return None;
        }
        self.from(self.next.fetch_add(1, Ordering::Relaxed), usable)
    }

    /// What `pick` would answer now, without moving the rotation on.
    pub fn peek(&self, usable: impl Fn(usize) -> bool) -> Option<usize> {
        if self.order.is_empty() {
            return None;
        }
        self.from(self.next.load(Ordering::Relaxed), usable)
    }

    fn from(&self, start: usize, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let len = self.order.len();
        (0..len)
            .map(|i| self.order[(start.wrapping_add(i)) % len] as usize)
            .find(|&b| usable(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sequence(weights: &[u32], n: usize) -> String {
        let rr = RoundRobin::new(weights);
        (0..n)
            .map(|_| (b'a' + rr.pick(|_| true).unwrap() as u8) as char)
            .collect()
    }

    #[test]
    fn nginx_smooth_sequence() {
        assert_eq!(sequence(&[5, 1, 1], 7), "aabacaa");
        assert_eq!(sequence(&[5, 1, 1], 14), "aabacaaaabacaa");
    }

    #[test]
    fn a_peek_answers_as_the_next_pick_and_moves_nothing() {
        let rr = RoundRobin::new(&[1, 1, 1]);
        rr.pick(|_| true);
        assert_eq!(rr.peek(|_| true), Some(1));
        assert_eq!(rr.peek(|i| i != 1), Some(2));
        assert_eq!(rr.pick(|_| true), Some(1));
    }

    #[test]
    fn equal_weights_rotate() {
        assert_eq!(sequence(&[1, 1, 1], 6), "abcabc");
    }

    #[test]
    fn shares_follow_weights() {
        let rr = RoundRobin::new(&[1, 3, 6]);
        let mut counts = [0; 3];
        for _ in 0..1000 {
            counts[rr.pick(|_| true).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 300, 600]);
    }

    #[test]
    fn skips_unusable_and_reports_none() {
        let rr = RoundRobin::new(&[1, 1, 1]);
        for _ in 0..6 {
            assert_ne!(rr.pick(|i| i != 1), Some(1));
        }
        assert_eq!(rr.pick(|_| false), None);
        assert_eq!(RoundRobin::new(&[]).pick(|_| true), None);
    }

    #[test]
    fn heavy_backend_never_gets_long_bursts() {
        // With 10,1: NGINX gives the light backend one slot in the middle of the cycle.
        let seq = sequence(&[10, 1], 11);
        assert_eq!(seq.matches('b').count(), 1);
        assert!(!seq.contains(&"a".repeat(10)), "{seq}");
    }

    #[test]
    fn shared_across_threads_stays_exact() {
        let rr = std::sync::Arc::new(RoundRobin::new(&[2, 1]));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let rr = rr.clone();
                std::thread::spawn(move || {
                    let mut c = [0usize; 2];
                    for _ in 0..3000 {
                        c[rr.pick(|_| true).unwrap()] += 1;
                    }
                    c
                })
            })
            .collect();
        let total = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .fold([0, 0], |a, c| [a[0] + c[0], a[1] + c[1]]);
        assert_eq!(total, [8000, 4000]);
    }
}
