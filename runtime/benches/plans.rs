//! tract's plan for exact shapes against its plan for symbolic ones, interleaved: two pipelines
//! of one folder on tract, one planning the encoder's parts for the shapes they see (the
//! default), one keeping the plans for symbolic shapes (`BackendOptions::symbolic_plans`),
//! encoding the same image in alternating order so that drift on a shared machine hits both
//! alike. Prints each one's median encode time and their ratio.
//!
//! `GLIMPSE_BENCH_MODEL` (default `models/tiny-smolvlm`; e.g. `models/real/smolvlm-256m`),
//! `GLIMPSE_BENCH_ENCODER` (`monolithic` | `staged`, default `staged`), `GLIMPSE_BENCH_THREADS`
//! (0: every core), `GLIMPSE_BENCH_RUNS` (5), `GLIMPSE_BENCH_DTYPE` (`fp32`), `GLIMPSE_BENCH_FAST` (`1`: the `--fast` preset), `GLIMPSE_BENCH_IMAGE` (`models/images/strip.png`).
//! Run: `cargo bench --workspace --features venv-tests --bench plans`.

use std::time::Instant;

use glimpse_runtime::backend::BackendOptions;
use glimpse_runtime::pipeline::EncoderForm;
use glimpse_runtime::{Pipeline, PipelineOptions};

mod common;

use common::{env, median, parsed};

fn main() {
    if common::listing() {
        return;
    }
    let repo = common::repo();
    let model = repo.join(env("GLIMPSE_BENCH_MODEL", "models/tiny-smolvlm"));
    let image = repo.join(env("GLIMPSE_BENCH_IMAGE", "models/images/strip.png"));
    let encoder: EncoderForm = parsed("GLIMPSE_BENCH_ENCODER", "staged");
    let threads: usize = parsed("GLIMPSE_BENCH_THREADS", "0");
    let runs: usize = parsed("GLIMPSE_BENCH_RUNS", "5");
    // `GLIMPSE_BENCH_FAST=1`: both pipelines run the `--fast` preset
    let fast = if env("GLIMPSE_BENCH_FAST", "0") == "1" {
        glimpse_runtime::pipeline::Fast::On
    } else {
        glimpse_runtime::pipeline::Fast::Off
    };
    let dtype: glimpse_runtime::Dtype = parsed("GLIMPSE_BENCH_DTYPE", "fp32");
    let load = |symbolic: bool| {
        let opts = PipelineOptions {
            backend: "tract".into(),
            backend_options: BackendOptions { threads, symbolic_plans: symbolic, ..Default::default() },
            encoder,
            dtype,
            fast,
            ..Default::default()
        };
        Pipeline::load(&model, &opts).unwrap_or_else(|e| panic!("{}: {e}", model.display()))
    };
    let forms = [load(false), load(true)];
    let input = forms[0].preprocess(&forms[0].load_image(&image).expect("image")).expect("preprocess");
    // with the preset the reductions act inside `ask` (one token: encode, prefill, first token)
    let gen = glimpse_runtime::GenerationOptions { max_new_tokens: 1, ..Default::default() };
    let run = |p: &Pipeline| {
        if fast == glimpse_runtime::pipeline::Fast::On {
            p.ask(Some(&image), "Describe.", &gen, &mut |_| {}).map(|_| ())
        } else {
            p.encode(&input).map(|_| ())
        }
    };
    for p in &forms {
        run(p).expect("warm-up (builds the fixed-shape plans)");
    }
    assert!(forms[0].encoder_fixed_plans().iter().any(|p| p.len() == 1), "{:?}", forms[0].encoder_fixed_plans());
    assert!(forms[1].encoder_fixed_plans().iter().all(|p| p.is_empty()), "{:?}", forms[1].encoder_fixed_plans());
    let mut times = [Vec::new(), Vec::new()];
    for round in 0..runs {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for k in order {
            let t = Instant::now();
            run(&forms[k]).expect("encode");
            times[k].push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let [fixed, symbolic] = times.map(median);
    println!(
        "{} ({encoder:?} encoder) on tract ({threads} threads), {} views, {runs} interleaved runs: fixed-shape plans {fixed:.1} ms, symbolic plan {symbolic:.1} ms, symbolic/fixed {:.3}",
        model.display(),
        input.views.len(),
        symbolic / fixed
    );
}
