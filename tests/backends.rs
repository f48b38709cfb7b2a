//! Both backends give the same greedy tokens on the tiny models. The ONNX Runtime library comes
//! from ORT_DYLIB_PATH or the export venv's onnxruntime==1.31.1 wheel (`.ci/run` creates it);
//! without either this test fails and says how to get one.

mod common;

use common::*;
use glimpse::runtime::backend::BackendOptions;
use glimpse::runtime::{GenerationOptions, Pipeline, PipelineOptions};

fn ort_library() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return p.into();
    }
    let venv = repo().join(".venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1");
    assert!(
        venv.is_file(),
        "no ONNX Runtime library: set ORT_DYLIB_PATH or create the venv (`bash .ci/run` does) so that {} exists",
        venv.display()
    );
    venv
}

fn ort_options() -> PipelineOptions {
    PipelineOptions {
        backend: "ort".into(),
        backend_options: BackendOptions { ort_library: Some(ort_library()), threads: 1 },
        ..Default::default()
    }
}

#[test]
fn ort_and_tract_give_the_same_greedy_tokens() {
    for name in TINY_MODELS {
        let ort = Pipeline::load(model(name), &ort_options()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(ort.backend_name(), "ort");
        let tract = Pipeline::load(model(name), &PipelineOptions::default()).expect("tract");
        for case in cases(&model(name)).1 {
            let opts = GenerationOptions { max_new_tokens: 20, ..Default::default() };
            let a = ort.ask(Some(&case.image()), case.prompt(), &opts, &mut |_| {}).expect("ort ask");
            let b = tract.ask(Some(&case.image()), case.prompt(), &opts, &mut |_| {}).expect("tract ask");
            assert_eq!(a.token_ids, b.token_ids, "{name}/{}", case.name());
            assert_eq!(a.token_ids, case.ints("generated_ids"), "{name}/{}: ort vs transformers", case.name());
        }
    }
}

#[test]
fn unknown_backend_lists_the_available_ones() {
    let opts = PipelineOptions { backend: "tensorflow".into(), ..Default::default() };
    let e = Pipeline::load(model("tiny-llava"), &opts).expect_err("unknown backend");
    assert!(e.to_string().contains("tract") && e.to_string().contains("ort"), "{e}");
}
