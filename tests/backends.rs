//! Both backends give the same greedy tokens on the tiny models. The ONNX Runtime library comes
//! from ORT_DYLIB_PATH or the export venv's onnxruntime==1.31.1 wheel, so the tests that load it
//! are compiled with the `venv-tests` feature (`.ci/run` turns it on and creates the venv); with
//! the feature on and neither present they fail and say how to get one.

mod common;

use common::*;
use glimpse::runtime::backend::{BackendOptions, ProviderStatus};
use glimpse::runtime::{GenerationOptions, Pipeline, PipelineOptions};

#[cfg(feature = "venv-tests")]
fn ort_options() -> PipelineOptions {
    PipelineOptions {
        backend: "ort".into(),
        backend_options: BackendOptions { ort_library: Some(ort_library()), threads: 1, ..Default::default() },
        ..Default::default()
    }
}

#[test]
#[cfg(feature = "venv-tests")]
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

/// The PyPI wheel is CPU-only: a GPU-first provider list (the Jetson profiles') skips TensorRT and
/// CUDA with that reason, runs every part on the CPU provider, and still gives the same tokens.
#[test]
#[cfg(feature = "venv-tests")]
fn providers_missing_from_the_library_are_skipped_and_reported() {
    let mut opts = ort_options();
    opts.backend_options.execution_providers = vec!["TensorRT".into(), "CUDA".into(), "CPU".into()];
    opts.backend_options.engine_cache = Some(std::env::temp_dir().join("glimpse-test-trt-cache"));
    let ort = Pipeline::load(model("tiny-llava"), &opts).expect("ort with GPU providers asked for");
    for (part, placement) in ort.placements() {
        assert_eq!(placement.backend, "ort");
        assert_eq!(placement.primary(), "CPU", "{part}: {placement}");
        assert_eq!(
            placement.providers,
            vec![
                ("TensorRT".to_string(), ProviderStatus::NotInLibrary),
                ("CUDA".to_string(), ProviderStatus::NotInLibrary),
                ("CPU".to_string(), ProviderStatus::Registered),
            ],
            "{part}"
        );
        assert!(placement.to_string().contains("CUDA: not in this ONNX Runtime library"), "{placement}");
    }
    let case = &cases(&model("tiny-llava")).1[0];
    let opts = GenerationOptions { max_new_tokens: 8, ..Default::default() };
    let a = ort.ask(Some(&case.image()), case.prompt(), &opts, &mut |_| {}).expect("ask");
    assert_eq!(a.token_ids[..], case.ints("generated_ids")[..a.token_ids.len()]);
    let tract = Pipeline::load(model("tiny-llava"), &PipelineOptions::default()).expect("tract");
    assert_eq!(tract.placements()[0].1.to_string(), "tract on CPU");
}

#[test]
#[cfg(feature = "venv-tests")]
fn unknown_execution_provider_is_an_error_naming_it() {
    let mut opts = ort_options();
    opts.backend_options.execution_providers = vec!["NNAPI".into()];
    let e = Pipeline::load(model("tiny-llava"), &opts).expect_err("unknown provider");
    let msg = e.to_string();
    assert!(msg.contains("NNAPI") && msg.contains("XNNPACK"), "{msg}");
}
