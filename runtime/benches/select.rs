//! Selector overhead: every pruning method at keep 0.25 on SmolVLM-256M's 17-tile shape
//! (N = 1088 rows of d = 576) and LLaVA-1.5's (N = 576, d = 4096), one core.
//! Run: `cargo bench -p glimpse-runtime --bench select` (or `cargo bench --workspace --bench select`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use glimpse_runtime::family::{View, ViewKind};
use glimpse_runtime::select::{available, Budget, SelectConfig, SelectionInput, Selector, Signals};
use ndarray::Array2;

fn features(n: usize, d: usize, seed: u64) -> Array2<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    Array2::from_shape_fn((n, d), |_| {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    })
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("select_keep_0.25");
    group
        .sample_size(10)
        .measurement_time(std::time::Duration::from_secs(2))
        .warm_up_time(std::time::Duration::from_millis(300));
    for (label, views, d) in [("smolvlm256m_17x64_d576", 17usize, 576usize), ("llava15_576_d4096", 1, 4096)] {
        let per = if views == 1 { 576 } else { 64 };
        let n = views * per;
        let side = (per as f64).sqrt() as usize;
        let vs: Vec<View> = (0..views)
            .map(|i| View {
                kind: if views == 1 {
                    ViewKind::Whole
                } else if i + 1 == views {
                    ViewKind::Global
                } else {
                    ViewKind::Tile { row: i / 4, col: i % 4 }
                },
                tokens: per,
                grid: (side, side),
                region: if views == 1 || i + 1 == views {
                    [0.0, 0.0, 1.0, 1.0]
                } else {
                    let (r, c) = ((i / 4) as f32, (i % 4) as f32);
                    [c / 4.0, r / 4.0, (c + 1.0) / 4.0, (r + 1.0) / 4.0]
                },
            })
            .collect();
        let f = features(n, d, 1);
        let mut signals = Signals::default();
        signals.insert("cls_attention", features(n, 3, 2).mapv(f32::abs));
        signals.insert("attention_received", features(n, 1, 3).mapv(f32::abs));
        signals.insert("keys", features(n, 64, 4));
        signals.text = Some(features(12, d, 5));
        for method in available() {
            let cfg = SelectConfig { method: method.into(), budget: Budget::Ratio(0.25), ..Default::default() };
            let sel = Selector::new(cfg).expect("method");
            group.bench_with_input(BenchmarkId::new(method, label), &(), |b, _| {
                b.iter(|| sel.select(&SelectionInput { features: &f, views: &vs, signals: &signals }).expect("select"))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
