//! Property tests of the selection algorithms (pure: no sockets).

use bascule::balance::hash::hash64;
use bascule::balance::least_connections::WINDOW;
use bascule::balance::{LeastConnections, Ring, RoundRobin};
use proptest::prelude::*;

const KEYS: u64 = 100_000;

fn names(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("10.1.{}.{}:8080", i / 250, i % 250))
        .collect()
}

fn ring(names: &[String], weights: &[u32]) -> Ring {
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    Ring::new(&refs, weights, None)
}

fn key(k: u64) -> u64 {
    hash64(&k.to_le_bytes())
}

/// Where each of the sample keys goes (by backend name, so rings over different sets compare).
fn placement<'a>(
    r: &Ring,
    names: &'a [String],
    usable: impl Fn(usize) -> bool + Copy,
) -> Vec<&'a str> {
    (0..KEYS)
        .map(|k| names[r.pick(key(k), usable, |_| 0, || 0).unwrap()].as_str())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn hash_shares_follow_weights(weights in prop::collection::vec(1u32..=5, 2..=10)) {
        let n = names(weights.len());
        let r = ring(&n, &weights);
        let mut counts = vec![0u64; weights.len()];
        for k in 0..KEYS {
            counts[r.pick(key(k), |_| true, |_| 0, || 0).unwrap()] += 1;
        }
        let total: u32 = weights.iter().sum();
        for (i, &c) in counts.iter().enumerate() {
            let expected = KEYS as f64 * f64::from(weights[i]) / f64::from(total);
            let off = (c as f64 - expected).abs() / expected;
            prop_assert!(off <= 0.10, "backend {i} weight {} got {c}, expected {expected:.0}", weights[i]);
        }
    }

    #[test]
    fn removing_a_backend_moves_only_its_keys(n in 2usize..=12, removed in 0usize..12) {
        let removed = removed % n;
        let all = names(n);
        let rest: Vec<String> = all.iter().enumerate().filter(|(i, _)| *i != removed).map(|(_, s)| s.clone()).collect();
        let before = placement(&ring(&all, &vec![1; n]), &all, |_| true);
        let after = placement(&ring(&rest, &vec![1; n - 1]), &rest, |_| true);
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if b != a {
                prop_assert_eq!(*b, all[removed].as_str(), "a key of another backend moved");
                moved += 1;
            }
        }
        let share = moved as f64 / KEYS as f64;
        prop_assert!(share <= 1.0 / n as f64 + 0.01, "{share} moved of {n}");
    }

    #[test]
    fn adding_a_backend_moves_keys_only_to_it(n in 1usize..=12) {
        let old = names(n);
        let new = names(n + 1);
        let before = placement(&ring(&old, &vec![1; n]), &old, |_| true);
        let after = placement(&ring(&new, &vec![1; n + 1]), &new, |_| true);
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if b != a {
                prop_assert_eq!(*a, new[n].as_str(), "a key moved to an old backend");
                moved += 1;
            }
        }
        let share = moved as f64 / KEYS as f64;
        prop_assert!(share <= 1.0 / (n + 1) as f64 + 0.01, "{share} moved adding to {n}");
    }

    #[test]
    fn a_down_backend_moves_only_its_keys_and_they_come_back(n in 2usize..=10, down in 0usize..10) {
        let down = down % n;
        let all = names(n);
        let r = ring(&all, &vec![1; n]);
        let up = placement(&r, &all, |_| true);
        let without = placement(&r, &all, |i| i != down);
        for (u, w) in up.iter().zip(&without) {
            if *u != all[down].as_str() {
                prop_assert_eq!(u, w);
            } else {
                prop_assert_ne!(*w, all[down].as_str());
            }
        }
        prop_assert_eq!(placement(&r, &all, |_| true), up);
    }

    #[test]
    fn every_process_builds_the_same_ring(n in 1usize..=20, weights in prop::collection::vec(1u32..=9, 20)) {
        let all = names(n);
        let a = ring(&all, &weights[..n]);
        let b = ring(&all, &weights[..n]);
        for k in 0..2000 {
            prop_assert_eq!(a.pick(key(k), |_| true, |_| 0, || 0), b.pick(key(k), |_| true, |_| 0, || 0));
        }
    }

    #[test]
    fn bounded_loads_keep_every_backend_under_the_cap(n in 2usize..=8, hot in 0u64..50) {
        let all = names(n);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let factor = 1.25;
        let r = Ring::new(&refs, &vec![1; n], Some(factor));
        // Place 400 requests, a third of them on one hot key, none finishing.
        let mut loads = vec![0usize; n];
        for i in 0..400u64 {
            let k = if i % 3 == 0 { key(hot) } else { key(1000 + i) };
            let total: usize = loads.iter().sum();
            let b = r.pick(k, |_| true, |j| loads[j], || total).unwrap();
            let cap = ((total as f64 + 1.0) * factor / n as f64).ceil() as usize;
            prop_assert!(loads[b] < cap, "backend {b} at {} with cap {cap}", loads[b]);
            loads[b] += 1;
        }
    }

    // Exact up to WINDOW backends. Larger upstreams compare a rotating window of
    // WINDOW of them: at most the others can be less loaded than the one picked.
    #[test]
    fn least_connections_picks_a_minimum(loads in prop::collection::vec(0usize..20, 1..=WINDOW + 8), weights in prop::collection::vec(1u32..=4, WINDOW + 8)) {
        let weights = &weights[..loads.len()];
        let lc = LeastConnections::new(weights);
        let chosen = lc.pick(|_| true, |i| loads[i]).unwrap();
        let per = |i: usize| loads[i] as f64 / f64::from(weights[i]);
        let lower = (0..loads.len()).filter(|&i| per(i) < per(chosen)).count();
        prop_assert!(lower <= loads.len().saturating_sub(WINDOW), "{lower} backends less loaded");
    }

    #[test]
    fn round_robin_shares_are_exact_over_a_cycle(weights in prop::collection::vec(1u32..=6, 1..=8)) {
        let rr = RoundRobin::new(&weights);
        let total: u32 = weights.iter().sum();
        let mut counts = vec![0u32; weights.len()];
        for _ in 0..total * 3 {
            counts[rr.pick(|_| true).unwrap()] += 1;
        }
        let expected: Vec<u32> = weights.iter().map(|w| w * 3).collect();
        prop_assert_eq!(counts, expected);
    }
}

#[test]
fn ten_backends_remove_one_add_one() {
    let ten = names(10);
    let nine: Vec<String> = ten[..9].to_vec();
    let eleven = names(11);
    let base = placement(&ring(&ten, &[1; 10]), &ten, |_| true);
    let moved = |other: &[&str]| {
        base.iter().zip(other).filter(|(a, b)| a != b).count() as f64 / KEYS as f64
    };
    let removed = moved(&placement(&ring(&nine, &[1; 9]), &nine, |_| true));
    let added = moved(&placement(&ring(&eleven, &[1; 11]), &eleven, |_| true));
    eprintln!(
        "10 backends: removing one moved {:.2}% of keys, adding an 11th moved {:.2}%",
        removed * 100.0,
        added * 100.0
    );
    assert!(removed <= 0.1 + 0.01, "{removed}");
    assert!(added <= 1.0 / 11.0 + 0.01, "{added}");
}
