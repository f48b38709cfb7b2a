//! The compatibility corpus (`models/compat/`, written by `python -m glimpse_export compat`):
//! folders exported the way other tools export them — transformers' own mask code, dynamic
//! image height/width, torch's dynamo exporter, external data, a decoder-only int8/fp16
//! variant, transformers v5 processor files, LLaVA-OneVision without an `image_newline` output —
//! with the tokens transformers' `generate()` gave. Every folder answers with those tokens on
//! tract (the default backend), and on ONNX Runtime with the `venv-tests` feature.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use glimpse::runtime::folder::Part;
use glimpse::runtime::{Dtype, GenerationOptions, Pipeline, PipelineOptions};

/// Every folder of the corpus (each has `fixtures/fixtures.json`).
fn corpus() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(repo().join("models/compat"))
        .expect("models/compat")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.join("fixtures/fixtures.json").is_file())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 7, "the corpus has {} folders", dirs.len());
    dirs
}

/// The dtype a folder is run with and the fixture key of the tokens it must give: the
/// decoder-only variants run their int8 / fp16 decoder against what ONNX Runtime gave for it
/// (tract's int8 gives the same tokens on both cases).
fn runs(dir: &Path) -> Vec<(Vec<(Part, Dtype)>, &'static str)> {
    if dir.ends_with("llava-int8-decoder-only") {
        vec![
            (vec![(Part::Decoder, Dtype::Fp16)], "generated_ids_ort_fp16"),
            (vec![(Part::Decoder, Dtype::Int8)], "generated_ids_ort_int8"),
        ]
    } else {
        vec![(Vec::new(), "generated_ids")]
    }
}

fn check(dir: &Path, opts: &PipelineOptions, key: &str, label: &str) {
    let p = Pipeline::load(dir, opts).unwrap_or_else(|e| panic!("{label} {}: {e}", dir.display()));
    for case in cases(dir).1 {
        let want = case.ints(key);
        let gen = GenerationOptions { max_new_tokens: want.len(), ..Default::default() };
        let a = p.ask(Some(&case.image()), case.prompt(), &gen, &mut |_| {}).expect("ask");
        assert_eq!(a.token_ids, want, "{label} {}/{}: tokens vs {key}", dir.display(), case.name());
        assert_eq!(a.stats.prompt_tokens, case.ints("input_ids").len(), "{label} {}: prompt length", dir.display());
    }
}

#[test]
fn every_compat_folder_answers_with_the_reference_tokens_on_tract() {
    for dir in corpus() {
        for (part_dtypes, key) in runs(&dir) {
            let label = format!("tract {part_dtypes:?}");
            check(&dir, &PipelineOptions { part_dtypes, ..Default::default() }, key, &label);
        }
    }
}

#[cfg(feature = "venv-tests")]
#[test]
fn every_compat_folder_answers_with_the_reference_tokens_on_onnx_runtime() {
    use glimpse::runtime::backend::BackendOptions;
    for dir in corpus() {
        for (part_dtypes, key) in runs(&dir) {
            let opts = PipelineOptions {
                backend: "ort".into(),
                backend_options: BackendOptions { ort_library: Some(ort_library()), threads: 1, ..Default::default() },
                part_dtypes: part_dtypes.clone(),
                ..Default::default()
            };
            check(&dir, &opts, key, &format!("ort {part_dtypes:?}"));
        }
    }
}

/// An anyres folder that can supply `image_newline` from nowhere is refused when it loads.
#[test]
fn llava_onevision_without_any_image_newline_is_refused_at_load() {
    let tmp = temp_copy(&repo().join("models/compat/llava-onevision-no-newline"));
    let path = tmp.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("image_newline");
    std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
    let e = Pipeline::load(tmp.path(), &PipelineOptions::default()).expect_err("no image_newline anywhere");
    let s = e.to_string();
    assert!(s.contains("image_newline") && s.contains("config.json"), "{s}");
}

/// A graph tract cannot analyse is named in plain words with the way out (`--backend ort`).
#[test]
fn an_unanalysable_graph_names_the_node_op_and_the_other_backend() {
    use prost::Message;
    use tract_onnx::pb;
    let tmp = temp_copy(&model("tiny-llava"));
    let path = tmp.path().join("onnx/embed_tokens.onnx");
    let mut proto = pb::ModelProto::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
    let g = proto.graph.as_mut().unwrap();
    g.node[0].op_type = "NoSuchOp".into();
    g.node[0].name = "the_bad_node".into();
    std::fs::write(&path, proto.encode_to_vec()).unwrap();
    let s = Pipeline::load(tmp.path(), &PipelineOptions::default()).expect_err("unknown op").to_string();
    assert!(s.contains("the_bad_node") && s.contains("NoSuchOp") && s.contains("--backend ort"), "{s}");
}
