//! Staging overhead, interleaved: the monolithic and the staged vision encoder of one folder,
//! both loaded, encoding the same image in alternating order, so that drift on a shared machine
//! hits both alike. Prints each form's median encode time and their ratio.
//!
//! `GLIMPSE_BENCH_MODEL` (default `models/tiny-smolvlm`; e.g. `models/real/smolvlm-256m`),
//! `GLIMPSE_BENCH_BACKEND` (`tract` | `ort`), `GLIMPSE_BENCH_THREADS` (0: backend default),
//! `GLIMPSE_BENCH_RUNS` (5), `GLIMPSE_BENCH_IMAGE` (`models/images/strip.png`).
//! Run: `cargo bench --workspace --features venv-tests --bench stages`.

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
    let backend = env("GLIMPSE_BENCH_BACKEND", "tract");
    let threads: usize = parsed("GLIMPSE_BENCH_THREADS", "0");
    let runs: usize = parsed("GLIMPSE_BENCH_RUNS", "5");
    let load = |encoder| {
        let opts = PipelineOptions {
            backend: backend.clone(),
            backend_options: BackendOptions { threads, ..Default::default() },
            encoder,
            ..Default::default()
        };
        Pipeline::load(&model, &opts).unwrap_or_else(|e| panic!("{}: {e}", model.display()))
    };
    let forms = [load(EncoderForm::Monolithic), load(EncoderForm::Staged)];
    let input = forms[0].preprocess(&forms[0].load_image(&image).expect("image")).expect("preprocess");
    for p in &forms {
        p.encode(&input).expect("warm-up");
    }
    let mut times = [Vec::new(), Vec::new()];
    for round in 0..runs {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for k in order {
            let t = Instant::now();
            forms[k].encode(&input).expect("encode");
            times[k].push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let [mono, staged] = times.map(median);
    println!(
        "{} on {backend} ({} threads), {} views, {runs} interleaved runs: monolithic {mono:.1} ms, staged {staged:.1} ms, staged/monolithic {:.4}",
        model.display(),
        threads,
        input.views.len(),
        staged / mono
    );
}
