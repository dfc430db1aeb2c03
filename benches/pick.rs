//! Cost of one pick, per algorithm and upstream size: `cargo bench --bench pick`.

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};

use bascule::balance::hash::hash64;
use bascule::balance::{LeastConnections, Ring, RoundRobin};
use criterion::{criterion_group, criterion_main, Criterion};

fn picks(c: &mut Criterion) {
    for n in [3usize, 100, 10_000] {
        let names: Vec<String> = (0..n)
            .map(|i| format!("10.{}.{}.{}:8080", i / 65536, i / 256 % 256, i % 256))
            .collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let weights: Vec<u32> = (0..n).map(|i| 1 + (i % 3) as u32).collect();
        let loads: Vec<AtomicUsize> = (0..n).map(|i| AtomicUsize::new(i % 7)).collect();
        let load = |i: usize| loads[i].load(Ordering::Relaxed);
        let total = || {
            loads
                .iter()
                .map(|l| l.load(Ordering::Relaxed))
                .sum::<usize>()
        };

        let rr = RoundRobin::new(&weights);
        c.bench_function(&format!("round_robin/{n}"), |b| {
            b.iter(|| black_box(rr.pick(|_| true)))
        });

        let lc = LeastConnections::new(&weights);
        c.bench_function(&format!("least_connections/{n}"), |b| {
            b.iter(|| black_box(lc.pick(|_| true, load)))
        });

        let ring = Ring::new(&refs, &weights, None);
        let mut k = 0u64;
        c.bench_function(&format!("consistent_hash/{n}"), |b| {
            b.iter(|| {
                k += 1;
                black_box(ring.pick(hash64(&k.to_le_bytes()), |_| true, load, total))
            })
        });

        // Every backend down: the walk stops once it has seen them all.
        c.bench_function(&format!("consistent_hash_all_down/{n}"), |b| {
            b.iter(|| {
                k += 1;
                black_box(ring.pick(hash64(&k.to_le_bytes()), |_| false, load, total))
            })
        });

        let bounded = Ring::new(&refs, &weights, Some(1.25));
        c.bench_function(&format!("consistent_hash_bounded/{n}"), |b| {
            b.iter(|| {
                k += 1;
                black_box(bounded.pick(hash64(&k.to_le_bytes()), |_| true, load, total))
            })
        });
    }
}

criterion_group!(benches, picks);
criterion_main!(benches);
