//! The Python export tools are tested too: re-export a tiny model with transformers and check
//! it against the committed fixtures (`python -m glimpse_export check`). Needs the venv that
//! `.ci/run` creates from `tools/export/requirements.txt` (or `GLIMPSE_PYTHON` pointing at a
//! Python with those packages); without it this test fails and says how to create it. Compiled
//! with the `venv-tests` feature only, so `cargo test --workspace` needs Rust alone.
#![cfg(feature = "venv-tests")]

mod common;

use std::process::Command;

use common::*;
use glimpse::runtime::backend::BackendOptions;
use glimpse::runtime::{GenerationOptions, Pipeline, PipelineOptions};

fn python() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("GLIMPSE_PYTHON") {
        return p.into();
    }
    let venv = repo().join(".venv/bin/python");
    assert!(
        venv.is_file(),
        "{} missing: create it with `python3 -m venv .venv && .venv/bin/pip install -r tools/export/requirements.txt` (or run `bash .ci/run`), or set GLIMPSE_PYTHON",
        venv.display()
    );
    venv
}

#[test]
fn reexported_tiny_model_matches_committed_fixtures() {
    let out = Command::new(python())
        .args(["-m", "glimpse_export", "check", "--model"])
        .arg(model("tiny-smolvlm"))
        .current_dir(repo().join("tools/export"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(out.status.success(), "glimpse_export check failed:\n{stdout}\n{stderr}");
}

/// `quantize` writes onnx-community-named variants next to the originals, and both backends run
/// them: int8, q4 and q4f16 give the same greedy tokens under tract and ONNX Runtime. q4 guards
/// the tract workaround for block-quantized weights (backend/tract.rs, `MERGE_AXES_PASS`).
#[test]
fn quantized_variants_load_and_agree_across_backends() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("tiny-llava");
    std::fs::create_dir_all(dir.join("onnx")).expect("mkdir");
    for entry in std::fs::read_dir(model("tiny-llava")).expect("read model") {
        let p = entry.expect("entry").path();
        if p.is_file() {
            std::fs::copy(&p, dir.join(p.file_name().expect("name"))).expect("copy");
        }
    }
    for part in ["vision_encoder", "embed_tokens", "decoder_model_merged"] {
        let f = format!("onnx/{part}.onnx");
        std::fs::copy(model("tiny-llava").join(&f), dir.join(&f)).expect("copy part");
    }
    let out = Command::new(python())
        .args(["-m", "glimpse_export", "quantize", "--to", "int8,q4,q4f16", "--model"])
        .arg(&dir)
        .current_dir(repo().join("tools/export"))
        .output()
        .expect("run python");
    assert!(out.status.success(), "quantize failed:\n{}", String::from_utf8_lossy(&out.stderr));
    for dtype in ["int8", "q4", "q4f16"] {
        for part in ["vision_encoder", "embed_tokens", "decoder_model_merged"] {
            assert!(dir.join(format!("onnx/{part}_{dtype}.onnx")).is_file(), "{part}_{dtype}.onnx missing");
        }
    }
    let case = &cases(&model("tiny-llava")).1[0];
    let gen = GenerationOptions { max_new_tokens: 12, ..Default::default() };
    for dtype in ["int8", "q4", "q4f16"] {
        let mut tokens = Vec::new();
        for backend in ["tract", "ort"] {
            let opts = PipelineOptions {
                dtype: dtype.parse().expect("dtype"),
                backend: backend.into(),
                backend_options: BackendOptions { ort_library: Some(ort_library()), threads: 1, ..Default::default() },
                ..Default::default()
            };
            let p = Pipeline::load(&dir, &opts).unwrap_or_else(|e| panic!("{dtype} with {backend}: {e}"));
            let a = p.ask(Some(&case.image()), case.prompt(), &gen, &mut |_| {}).expect("ask");
            assert!(!a.token_ids.is_empty(), "{dtype} with {backend}: no tokens");
            tokens.push(a.token_ids);
        }
        assert_eq!(tokens[0], tokens[1], "{dtype}: tract vs ONNX Runtime");
    }
}
