//! Which of tract's f32 matrix kernels encodes fastest: a dispatch tier registered above tract's
//! own answers every product whose sizes are known with the kernel of the pipeline being
//! planned; each pipeline is warmed under its kernel (its fixed-shape plans built then) and all
//! are timed interleaved. Prints the products each plan asked for and each kernel's median.
//!
//! `GLIMPSE_KERNELS` (comma-separated kernel names, `default` = tract's choice),
//! `GLIMPSE_BENCH_MODEL` (default `models/real/smolvlm-256m`), `GLIMPSE_BENCH_ENCODER`
//! (`monolithic`), `GLIMPSE_BENCH_THREADS` (0: every core), `GLIMPSE_BENCH_RUNS` (3),
//! `GLIMPSE_BENCH_IMAGE`. x86_64 kernel names; results in docs/benchmarks.md ("Kernel choice").
//! Run: `cargo bench --workspace --features venv-tests --bench kernels`.
use std::sync::Mutex;
use std::time::Instant;

use glimpse_runtime::backend::BackendOptions;
use glimpse_runtime::pipeline::EncoderForm;
use glimpse_runtime::{Pipeline, PipelineOptions};
use tract_linalg::isa::{Arch, IsaSet};
use tract_linalg::mmm::{Query, Suitable};
use tract_linalg::mmm_tiers::MmmTier;
use tract_onnx::prelude::DatumType;

mod common;
use common::{env, median, parsed};

/// The kernel the pipeline being planned asks for (`None`: tract's own choice).
static KERNEL: Mutex<Option<&'static str>> = Mutex::new(None);
/// The products (m, k, n) planned since the last clear, with the answer given.
#[allow(clippy::type_complexity)]
static SEEN: Mutex<Vec<(Option<usize>, Option<usize>, Option<usize>, String)>> = Mutex::new(Vec::new());

fn forced(_isa: &IsaSet, dt: DatumType, q: &Query, s: &[Suitable]) -> Option<&'static str> {
    if dt != DatumType::F32 || q.n == Some(1) {
        return None;
    }
    let k = *KERNEL.lock().unwrap();
    SEEN.lock().unwrap().push((q.m, q.k, q.n, format!("{:?} of {}", k, s.len())));
    k
}

inventory::submit! {
    MmmTier { arch: Some(Arch::X86_64), precedence: 250, name: "glimpse-forced", applies: |_| true, preferred: forced }
}

fn main() {
    if common::listing() {
        return;
    }
    let repo = common::repo();
    let model = repo.join(env("GLIMPSE_BENCH_MODEL", "models/real/smolvlm-256m"));
    let image = repo.join(env("GLIMPSE_BENCH_IMAGE", "models/images/strip.png"));
    let encoder: EncoderForm = parsed("GLIMPSE_BENCH_ENCODER", "monolithic");
    let threads: usize = parsed("GLIMPSE_BENCH_THREADS", "0");
    let runs: usize = parsed("GLIMPSE_BENCH_RUNS", "3");
    let names = env("GLIMPSE_KERNELS", "default,avx512_mmm_f32_32x6");
    let mut forms = Vec::new();
    for name in names.split(',') {
        *KERNEL.lock().unwrap() =
            if name == "default" { None } else { Some(Box::leak(name.to_string().into_boxed_str())) };
        let opts = PipelineOptions {
            backend: "tract".into(),
            backend_options: BackendOptions { threads, ..Default::default() },
            encoder,
            ..Default::default()
        };
        let p = Pipeline::load(&model, &opts).unwrap();
        let input = p.preprocess(&p.load_image(&image).unwrap()).unwrap();
        SEEN.lock().unwrap().clear();
        let t = Instant::now();
        p.encode(&input).unwrap();
        let mut seen: Vec<_> =
            SEEN.lock().unwrap().iter().map(|(m, k, n, s)| format!("{m:?}x{k:?}x{n:?} {s}")).collect();
        seen.sort();
        seen.dedup();
        println!("{name}: warm {:.0} ms; queries {seen:?}", t.elapsed().as_secs_f64() * 1e3);
        forms.push((name, p, input));
    }
    let mut times = vec![Vec::new(); forms.len()];
    for round in 0..runs {
        for i in 0..forms.len() {
            let k = if round % 2 == 0 { i } else { forms.len() - 1 - i };
            let t = Instant::now();
            forms[k].1.encode(&forms[k].2).unwrap();
            times[k].push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    for (i, t) in times.into_iter().enumerate() {
        println!("{}: median {:.1} ms", forms[i].0, median(t));
    }
}
