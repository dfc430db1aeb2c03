//! Consistent hashing on a ring of virtual nodes (Karger et al. 1997, as in
//! ketama), with bounded loads (Mirrokni, Thorup, Zadimoghaddam, "Consistent
//! Hashing with Bounded Loads", 2017).
//!
//! Why a ring: of the usual choices it is the one that meets all of bascule's
//! needs at once.
//! - Removing a backend moves only the keys that were on its points; adding one
//!   moves only the keys that land on its new points. Maglev's table moves a few
//!   percent more than that; rendezvous hashing moves nothing extra but costs
//!   O(n) per pick, microseconds at 10 000 backends.
//! - A backend that is down, draining or full is skipped by walking on to the
//!   next point: only its own keys move, and they come back when it does. The
//!   same walk is how bounded loads spill a hot key.
//! - A pick is a binary search: O(log n), no allocation.
//!
//! Weights are honoured by giving each backend points in proportion to its weight.
//!
//! Points are placed with a fixed, seedless hash of the backend's address, so
//! every bascule process with the same backends builds the same ring, across
//! restarts and reloads.

use super::hash::hash64;

/// A backend's share of the ring strays from its weight's share by about
/// 1/sqrt(points) of it, and removing one of two backends must move no more than
/// half the keys plus 1%: hence many points per unit of weight.
///
/// A backend's points depend only on its name and weight, never on the other
/// backends, so that adding or removing one leaves every other point in place.
/// The one exception is the cap for very large upstreams: past `MAX_POINTS /
/// POINTS_PER_WEIGHT` backends, each gets at most `MAX_POINTS / N` points. Its
/// points are a prefix of its full list, so a change in N drops or adds only a
/// few points per backend: about 1/N of the keys more move, within the 1% slack
/// for such upstreams.
const POINTS_PER_WEIGHT: usize = 40_000;
const MAX_POINTS: usize = 1 << 22;
/// Bits of a hash that index the lookup table of ring positions.
const INDEX_BITS: u32 = 16;

#[derive(Debug)]
pub struct Ring {
    /// Sorted by hash.
    hashes: Box<[u64]>,
    /// `owners[i]` is the backend index of point `hashes[i]`.
    owners: Box<[u32]>,
    /// `index[p]`: the first point whose hash starts with the `INDEX_BITS` bits
    /// `p`, so a lookup searches a few points instead of the whole ring.
    index: Box<[u32]>,
    weights: Box<[u32]>,
    total_weight: f64,
    /// `hash_balance_factor`: no backend takes more than this times its fair
    /// share of the requests in flight. `None`: unbounded.
    bound: Option<f64>,
}

impl Ring {
    /// `names` identify the backends (their addresses); `weights` in the same order.
    pub fn new(names: &[&str], weights: &[u32], bound: Option<f64>) -> Self {
        let n = names.len().max(1);
        let total_weight: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let cap = (MAX_POINTS / n).max(1);
        let mut points: Vec<(u64, u32)> = Vec::new();
        for (i, (name, &w)) in names.iter().zip(weights).enumerate() {
            let count = (POINTS_PER_WEIGHT * w as usize).min(cap).max(1);
            for v in 0..count {
                let mut key = Vec::with_capacity(name.len() + 8);
                key.extend_from_slice(name.as_bytes());
                key.push(b'#');
                key.extend_from_slice(&(v as u64).to_le_bytes());
                points.push((hash64(&key), i as u32));
            }
        }
        // Ties (vanishingly rare) are broken by backend index, so order is deterministic.
        points.sort_unstable();
        let hashes: Box<[u64]> = points.iter().map(|p| p.0).collect();
        let index = (0..=1u64 << INDEX_BITS)
            .map(|prefix| {
                let from = if prefix == 1 << INDEX_BITS {
                    u64::MAX
                } else {
                    prefix << (64 - INDEX_BITS)
                };
                hashes.partition_point(|&h| h < from) as u32
            })
            .collect();
        Ring {
            hashes,
            index,
            owners: points.iter().map(|p| p.1).collect(),
            weights: weights.into(),
            total_weight: total_weight as f64,
            bound,
        }
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// The backend for `key`: the owner of the first point at or after the key's
    /// hash that is `usable` and, with bounded loads, not full.
    ///
    /// `load(i)` is backend i's requests in flight; `total_load` the upstream's.
    pub fn pick(
        &self,
        key: u64,
        usable: impl Fn(usize) -> bool,
        load: impl Fn(usize) -> usize,
        total_load: impl FnOnce() -> usize,
    ) -> Option<usize> {
        if self.hashes.is_empty() {
            return None;
        }
        let prefix = (key >> (64 - INDEX_BITS)) as usize;
        let (lo, hi) = (self.index[prefix] as usize, self.index[prefix + 1] as usize);
        let start = lo + self.hashes[lo..hi].partition_point(|&h| h < key);
        // The upstream's total is summed only when loads are bounded.
        let total_load = self.bound.map(|_| total_load()).unwrap_or(0);
        let capacity = |i: usize| -> bool {
            let Some(factor) = self.bound else {
                return true;
            };
            // The request being placed counts too: (total + 1) × factor × share.
            let share = f64::from(self.weights[i]) / self.total_weight;
            let cap = ((total_load as f64 + 1.0) * factor * share).ceil() as usize;
            load(i) < cap.max(1)
        };
        let mut fallback = None;
        for step in 0..self.hashes.len() {
            let b = self.owners[(start + step) % self.hashes.len()] as usize;
            if !usable(b) {
                continue;
            }
            if capacity(b) {
                return Some(b);
            }
            fallback.get_or_insert(b);
        }
        // Every usable backend is at its bound: take the key's own.
        fallback
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:80")).collect()
    }

    fn ring(names: &[String], weights: &[u32]) -> Ring {
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        Ring::new(&refs, weights, None)
    }

    #[test]
    fn same_backends_same_ring() {
        let n = names(5);
        let (a, b) = (ring(&n, &[1; 5]), ring(&n, &[1; 5]));
        for k in 0..1000u64 {
            let key = hash64(&k.to_le_bytes());
            assert_eq!(
                a.pick(key, |_| true, |_| 0, || 0),
                b.pick(key, |_| true, |_| 0, || 0)
            );
        }
    }

    #[test]
    fn unusable_backend_moves_only_its_own_keys() {
        let n = names(4);
        let r = ring(&n, &[1; 4]);
        for k in 0..5000u64 {
            let key = hash64(&k.to_le_bytes());
            let before = r.pick(key, |_| true, |_| 0, || 0).unwrap();
            let after = r.pick(key, |i| i != 2, |_| 0, || 0).unwrap();
            if before != 2 {
                assert_eq!(before, after);
            } else {
                assert_ne!(after, 2);
            }
        }
    }

    #[test]
    fn bounded_loads_spill_to_the_next_backend() {
        let n = names(3);
        let r = Ring::new(
            &n.iter().map(String::as_str).collect::<Vec<_>>(),
            &[1; 3],
            Some(1.25),
        );
        let key = hash64(b"hot");
        let home = r.pick(key, |_| true, |_| 0, || 0).unwrap();
        // Home holds 10 of 12 in flight: cap is ceil(13 × 1.25 / 3) = 6.
        let loads = |i: usize| if i == home { 10 } else { 1 };
        let spilled = r.pick(key, |_| true, loads, || 12).unwrap();
        assert_ne!(spilled, home);
        // When the load drops the key comes home.
        assert_eq!(r.pick(key, |_| true, |_| 1, || 3), Some(home));
    }
}
