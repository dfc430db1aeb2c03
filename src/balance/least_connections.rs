//! Weighted least connections: the backend with the fewest requests in flight
//! per unit of weight.
//!
//! The in-flight counts are the exact, process-wide counts kept in each
//! backend's state (an RAII guard that lives as long as the response body), so
//! every worker thread sees the same loads. Ties are broken by rotation: the
//! scan starts one place further each time and keeps the first minimum, so idle
//! backends share the work evenly instead of the first one taking it all.
//!
//! A pick compares `load_a × weight_b` with `load_b × weight_a`: no division.
//! Upstreams of more than `WINDOW` backends compare a rotating window of that
//! many, which bounds the cost of a pick (the exact minimum over 10 000 backends
//! would cost microseconds) at the price of choosing the least loaded of 32
//! rather than of all.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The most backends one pick compares.
pub const WINDOW: usize = 32;

#[derive(Debug)]
pub struct LeastConnections {
    weights: Box<[u32]>,
    next: AtomicUsize,
}

impl LeastConnections {
    pub fn new(weights: &[u32]) -> Self {
        LeastConnections {
            weights: weights.into(),
            next: AtomicUsize::new(0),
        }
    }

    /// The usable backend with the lowest `load(i) / weight`, or `None`.
    pub fn pick(
        &self,
        usable: impl Fn(usize) -> bool,
        load: impl Fn(usize) -> usize,
    ) -> Option<usize> {
        if self.weights.is_empty() {
            return None;
        }
        self.from(self.next.fetch_add(1, Ordering::Relaxed), usable, load)
    }

    /// What `pick` would answer now, without moving the tie-breaking rotation on.
    pub fn peek(
        &self,
        usable: impl Fn(usize) -> bool,
        load: impl Fn(usize) -> usize,
    ) -> Option<usize> {
        if self.weights.is_empty() {
            return None;
        }
        self.from(self.next.load(Ordering::Relaxed), usable, load)
    }

    fn from(
        &self,
        start: usize,
        usable: impl Fn(usize) -> bool,
        load: impl Fn(usize) -> usize,
    ) -> Option<usize> {
        let n = self.weights.len();
        let start = start % n;
        let mut best: Option<(usize, u64, u64)> = None;
        let mut compared = 0;
        for i in (start..n).chain(0..start) {
            if !usable(i) {
                continue;
            }
            let (l, w) = (load(i) as u64, u64::from(self.weights[i].max(1)));
            match best {
                Some((_, bl, bw)) if l * bw >= bl * w => {}
                _ => best = Some((i, l, w)),
            }
            compared += 1;
            if compared == WINDOW {
                break;
            }
        }
        best.map(|(i, _, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_lowest_load_per_weight() {
        let lc = LeastConnections::new(&[1, 1, 1]);
        let loads = [5, 2, 7];
        for _ in 0..5 {
            assert_eq!(lc.pick(|_| true, |i| loads[i]), Some(1));
        }
        let lc = LeastConnections::new(&[1, 4]);
        // 3/1 against 8/4: the heavier backend is less loaded per unit of weight.
        assert_eq!(lc.pick(|_| true, |i| [3, 8][i]), Some(1));
    }

    #[test]
    fn ties_rotate_and_unusable_are_skipped() {
        let lc = LeastConnections::new(&[1, 1, 1, 1]);
        let picks: Vec<_> = (0..8)
            .map(|_| lc.pick(|i| i != 2, |_| 0).unwrap())
            .collect();
        assert!(!picks.contains(&2));
        for b in [0, 1, 3] {
            assert!(picks.iter().filter(|&&p| p == b).count() >= 2, "{picks:?}");
        }
        assert_eq!(lc.pick(|_| false, |_| 0), None);
    }
}
