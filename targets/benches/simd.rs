//! Scalar vs run-time dispatched SIMD kernels at the hidden sizes that matter for token
//! selection: 576 (SigLIP/SmolVLM vision width) and 4096 (7B-class LLM width).
//! Run: `cargo bench -p glimpse-targets --bench simd`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use glimpse_targets::simd::{self, Kernels};
use std::hint::black_box;

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / (1u32 << 24) as f32 - 0.5)
        .collect()
}

fn bench(c: &mut Criterion) {
    let paths = [("scalar", Kernels::scalar()), ("dispatched", *simd::kernels())];
    eprintln!("dispatched path: {}", simd::active_isa());
    for d in [576usize, 4096] {
        let (a, b) = (data(d, 1), data(d, 7));
        let (ai, bi): (Vec<i8>, Vec<i8>) =
            ((0..d).map(|i| (i * 7) as i8).collect(), (0..d).map(|i| (i * 13) as i8).collect());
        let rows = 64;
        let m = data(rows * d, 3);
        let mut out = vec![0.0f32; rows];

        let mut g = c.benchmark_group(format!("d{d}"));
        g.throughput(Throughput::Elements(d as u64));
        for (name, k) in &paths {
            g.bench_with_input(BenchmarkId::new("dot", name), &d, |bn, _| {
                bn.iter(|| k.dot(black_box(&a), black_box(&b)))
            });
            g.bench_with_input(BenchmarkId::new("cosine", name), &d, |bn, _| {
                bn.iter(|| k.cosine(black_box(&a), black_box(&b)))
            });
            g.bench_with_input(BenchmarkId::new("l1_norm", name), &d, |bn, _| bn.iter(|| k.l1_norm(black_box(&a))));
            g.bench_with_input(BenchmarkId::new("dot_i8", name), &d, |bn, _| {
                bn.iter(|| k.dot_i8(black_box(&ai), black_box(&bi)))
            });
            g.bench_with_input(BenchmarkId::new("dots_64rows", name), &d, |bn, _| {
                bn.iter(|| k.dots(black_box(&m), black_box(&a), &mut out))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
