//! Per-node times of one ONNX file on tract: where a part's run goes (docs/benchmarks.md, "Kernel
//! choice, mask sums and plans under region skipping"). Inputs are filled with constants (f32
//! 0.5, bool true, i64 1), given in graph order as `name:f32|bool|i64:D0xD1x..`; the plan is for
//! those shapes exactly, or for the file's symbolic ones with `SYMBOLIC=1`. Prints the 25
//! slowest nodes (op, name, input shapes) averaged over RUNS runs after one warm-up, clearing the
//! upper vector registers after each node as the runtime does.
//!
//! `cargo run --release --workspace --features venv-tests --example nodeprof -- FILE RUNS INPUT..`
use std::collections::HashMap;
use std::time::Instant;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::{SimplePlan, SimpleState};

fn main() -> TractResult<()> {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = args[2].parse()?;
    let mut model = tract_onnx::onnx().model_for_path(&args[1])?;
    let mut values = tvec![];
    for (ix, spec) in args[3..].iter().enumerate() {
        let parts: Vec<&str> = spec.split(':').collect();
        let shape: Vec<usize> = parts[2].split('x').map(|d| d.parse().unwrap()).collect();
        let (dt, t): (DatumType, Tensor) = match parts[1] {
            "f32" => (f32::datum_type(), tract_ndarray::ArrayD::from_elem(shape.clone(), 0.5f32).into()),
            "bool" => (bool::datum_type(), tract_ndarray::ArrayD::from_elem(shape.clone(), true).into()),
            _ => (i64::datum_type(), tract_ndarray::ArrayD::from_elem(shape.clone(), 1i64).into()),
        };
        if std::env::var("SYMBOLIC").is_err() {
            model.set_input_fact(ix, InferenceFact::dt_shape(dt, &shape))?;
        }
        values.push(t.into_tvalue());
    }
    let model = model.into_optimized()?;
    let plan = SimplePlan::new(model)?;
    let mut state = SimpleState::new(&plan)?;
    let threads: usize = std::env::var("THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or(1);
    let executor = if threads > 1 {
        tract_linalg::multithread::Executor::multithread(threads)
    } else {
        tract_linalg::multithread::Executor::SingleThread
    };
    if let Some(v) = std::env::var("ELEMENTS").ok().and_then(|t| t.parse().ok()) {
        tract_linalg::multithread::set_threading_element_threshold(v);
    }
    if let Some(v) = std::env::var("PANELS").ok().and_then(|t| t.parse().ok()) {
        tract_linalg::multithread::set_threading_panel_threshold(v);
    }
    tract_linalg::multithread::multithread_tract_scope(executor, || run(&mut state, values, runs))
}

fn run(state: &mut SimpleState<TypedFact, Box<dyn TypedOp>>, values: TVec<TValue>, runs: usize) -> TractResult<()> {
    state.run(values.clone())?;
    let mut times: HashMap<String, (f64, usize)> = HashMap::new();
    let t0 = Instant::now();
    for _ in 0..runs {
        state.run_plan_with_eval(values.clone(), |ctx, st, node, inputs| {
            let t = Instant::now();
            let shapes: Vec<String> = inputs.iter().map(|i| format!("{:?}{:?}", i.datum_type(), i.shape())).collect();
            let r = tract_onnx::tract_core::plan::eval(ctx, st, node, inputs);
            glimpse_runtime::backend::tract::clear_vector_upper();
            let e = times.entry(format!("{} {} {}", node.op().name(), node.name, shapes.join(","))).or_default();
            e.0 += t.elapsed().as_secs_f64() * 1e3 / runs as f64;
            e.1 += 1;
            r
        })?;
    }
    println!("total {:.3} ms per run", t0.elapsed().as_secs_f64() * 1e3 / runs as f64);
    let mut v: Vec<_> = times.into_iter().collect();
    v.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    for (k, (ms, _)) in v.iter().take(25) {
        println!("{ms:8.3} ms  {k}");
    }
    Ok(())
}
