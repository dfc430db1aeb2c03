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
/// The one exception is the cap for very large upstreams: past a total weight of
/// `MAX_POINTS / POINTS_PER_WEIGHT`, each unit of weight gets `MAX_POINTS / W`
/// points. A backend's points are a prefix of its full list, so a change in W
/// drops or adds only a few points per backend: about 1/N of the keys more
/// move, within the 1% slack for such upstreams.
const POINTS_PER_WEIGHT: usize = 40_000;
const MAX_POINTS: usize = 1 << 22;

#[derive(Debug)]
pub struct Ring {
    /// (position, backend index), sorted by position. Positions are the top 32
    /// bits of a point's hash: half the memory of 64, and the owner sits next to
    /// its position, so a lookup touches one cache line where two arrays take two.
    points: Box<[(u32, u32)]>,
    /// `index[p]`: the first point whose position starts with the `index_bits`
    /// bits `p`; a lookup then searches a handful of points, not the whole ring.
    index: Box<[u32]>,
    index_bits: u32,
    weights: Box<[u32]>,
    total_weight: f64,
    /// `hash_balance_factor`: no backend takes more than this times its fair
    /// share of the requests in flight. `None`: unbounded.
    bound: Option<f64>,
}

impl Ring {
    /// `names` identify the backends (their addresses); `weights` in the same order.
    pub fn new(names: &[&str], weights: &[u32], bound: Option<f64>) -> Self {
        let total_weight: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        // Points per unit of weight, capped so that the whole ring stays under MAX_POINTS.
        let per_weight = POINTS_PER_WEIGHT
            .min(MAX_POINTS / total_weight.max(1) as usize)
            .max(1);
        let mut points: Vec<(u32, u32)> = Vec::new();
        for (i, (name, &w)) in names.iter().zip(weights).enumerate() {
            let count = (per_weight * w as usize).max(1);
            let mut key = Vec::with_capacity(name.len() + 9);
            for v in 0..count {
                key.clear();
                key.extend_from_slice(name.as_bytes());
                key.push(b'#');
                key.extend_from_slice(&(v as u64).to_le_bytes());
                points.push(((hash64(&key) >> 32) as u32, i as u32));
            }
        }
        // Equal positions are broken by backend index, so the order is deterministic.
        points.sort_unstable();
        // About four points per index slot.
        let index_bits = (usize::BITS - points.len().leading_zeros())
            .saturating_sub(2)
            .clamp(4, 22);
        let slots = 1u64 << index_bits;
        let index = (0..=slots)
            .map(|prefix| {
                let from = prefix << (32 - index_bits);
                points.partition_point(|&(h, _)| u64::from(h) < from) as u32
            })
            .collect();
        Ring {
            points: points.into_boxed_slice(),
            index,
            index_bits,
            weights: weights.into(),
            total_weight: total_weight as f64,
            bound,
        }
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The backend for `key`: the owner of the first point at or after the key's
    /// hash that is `usable` and, with bounded loads, not full.
    ///
    /// `load(i)` is backend i's requests in flight; `total_load` the upstream's,
    /// asked for only when loads are bounded.
    pub fn pick(
        &self,
        key: u64,
        usable: impl Fn(usize) -> bool,
        load: impl Fn(usize) -> usize,
        total_load: impl FnOnce() -> usize,
    ) -> Option<usize> {
        let len = self.points.len();
        if len == 0 {
            return None;
        }
        let position = (key >> 32) as u32;
        let prefix = (position >> (32 - self.index_bits)) as usize;
        let (lo, hi) = (self.index[prefix] as usize, self.index[prefix + 1] as usize);
        let start = lo + self.points[lo..hi].partition_point(|&(h, _)| h < position);
        let total_load = self.bound.map(|_| total_load()).unwrap_or(0);
        let has_room = |i: usize| -> bool {
            let Some(factor) = self.bound else {
                return true;
            };
            // The request being placed counts too: (total + 1) × factor × share.
            let share = f64::from(self.weights[i]) / self.total_weight;
            let cap = ((total_load as f64 + 1.0) * factor * share).ceil() as usize;
            load(i) < cap.max(1)
        };
        let mut fallback = None;
        // Once a point is passed over, the walk counts the distinct backends it
        // has seen and stops when that is all of them: with every backend down
        // it takes about n·ln(n) steps, not the whole ring (millions of points).
        // The set is made only then, so a usual pick allocates nothing.
        let mut seen: Option<(Vec<u64>, usize)> = None;
        let backends = self.weights.len();
        for step in 0..len {
            let at = start + step;
            let b = self.points[if at >= len { at - len } else { at }].1 as usize;
            if usable(b) {
                if has_room(b) {
                    return Some(b);
                }
                fallback.get_or_insert(b);
            }
            let (set, distinct) =
                seen.get_or_insert_with(|| (vec![0u64; backends.div_ceil(64)], 0));
            let (word, bit) = (b / 64, 1u64 << (b % 64));
            if set[word] & bit == 0 {
                set[word] |= bit;
                *distinct += 1;
                if *distinct == backends {
                    break;
                }
            }
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
    fn with_every_backend_down_a_pick_stops_once_it_has_seen_them_all() {
        let n = names(100);
        let ring = ring(&n, &[1; 100]);
        let asked = std::cell::Cell::new(0usize);
        for k in 0..20u64 {
            let key = hash64(&k.to_le_bytes());
            let down = |_| {
                asked.set(asked.get() + 1);
                false
            };
            assert_eq!(ring.pick(key, down, |_| 0, || 0), None);
        }
        // About 100·ln(100) ≈ 520 points a pick, against 4 000 000 on the ring.
        let per_pick = asked.get() / 20;
        assert!(per_pick < 2_000, "{per_pick} points per pick");
        // One backend up, found wherever it is.
        let key = hash64(b"k");
        assert_eq!(ring.pick(key, |b| b == 57, |_| 0, || 0), Some(57));
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
